"""The Tunnel's policy API on loopback (no privileges): input forms, validation before any
change, explain() as the engine judges, listener workloads, counters."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from harness.servers import EchoServer

from policy_e2e.kit import ALICE, BOB, SERVER, Events, allow_principals, ap, deny_principals
from ztun import Tunnel
from ztun.errors import PolicyError
from ztun.policy import ConnectionFacts, PolicySet, Reason, Workload
from ztun.testing import SpiffeCA

pytestmark = pytest.mark.timeout(60)
LO = "127.0.0.1"
WEB = Workload("web", "prod", "web", labels={"app": "web"})
DB = Workload("db", "prod", "db", labels={"app": "db"})


@pytest.fixture
def ca() -> SpiffeCA:
    return SpiffeCA("cluster.local")


def _tunnel(ca: SpiffeCA, sid: str, **kw) -> Tunnel:
    return Tunnel(identity=ca.issue_svid(sid), trust=ca.bundle, workers=1, **kw)


def _roundtrip(addr: tuple[str, int]) -> bool:
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(b"hi")
        try:
            return s.recv(2) == b"hi"
        except ConnectionResetError:
            return False


def test_policy_inputs_and_errors_before_start(ca: SpiffeCA, tmp_path: Path):
    text = allow_principals("allow-alice", ALICE)
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yml").write_text(deny_principals("deny-bob", BOB))
    for source in (PolicySet.from_yaml(text), text, text.encode(), tmp_path / "a.yaml"):
        t = _tunnel(ca, SERVER, policies=source)
        assert t.policies is not None and [p.key for p in t.policies] == ["prod/allow-alice"]
        t.close()
    t = _tunnel(ca, SERVER, policies=[tmp_path])
    assert t.policies is not None
    assert [p.key for p in t.policies] == ["prod/allow-alice", "prod/deny-bob"]
    with pytest.raises(PolicyError) as ei:
        t.set_policy(ap("x", "  action: ALLOW\n  rules: 3\n"))
    assert ei.value.field == "spec.rules" and ei.value.line == 8
    assert [p.key for p in t.policies] == ["prod/allow-alice", "prod/deny-bob"]
    with pytest.raises(ValueError, match="policies"):
        t.set_policy(42)  # type: ignore[arg-type]
    with pytest.raises(PolicyError):
        _tunnel(ca, SERVER, policies="metadata: [")
    with pytest.raises(ValueError, match="workload"):
        _tunnel(ca, SERVER, workload="prod/web")  # type: ignore[arg-type]
    t.close()


def test_explain_uses_the_tunnel_and_listener_workloads(ca: SpiffeCA):
    policy = ap(
        "db-only-alice",
        "  selector: {matchLabels: {app: db}}\n  action: ALLOW\n  rules:\n"
        f'  - from:\n    - source: {{principals: ["{ALICE[9:]}"]}}\n',
    )
    with _tunnel(ca, SERVER, policies=policy, workload=WEB) as t, EchoServer() as echo:
        bob_facts = ConnectionFacts.of("10.0.0.1", LO, echo.address[1], BOB)
        d = t.explain(bob_facts)  # judged as the tunnel's workload (web): no ALLOW applies
        assert d.allowed and d.reason is Reason.ALLOWED_NO_ALLOW_POLICY
        db_listener = t.listen((LO, 0), echo.address, workload=DB)
        d = t.explain(bob_facts, listener=db_listener)
        assert not d.allowed and d.reason is Reason.DENIED_NO_MATCH
        d = t.explain(ConnectionFacts.of("10.0.0.1", LO, 1, ALICE, DB))
        assert d.allowed and d.policy == "prod/db-only-alice" and d.rule == 0
        # the engine agrees: bob through the web listener passes, through the db one not
        web_listener = t.listen((LO, 0), echo.address)
        with _tunnel(ca, BOB) as client:
            to_web = client.forward((LO, 0), web_listener.address, expect=[SERVER])
            to_db = client.forward((LO, 0), db_listener.address, expect=[SERVER])
            assert _roundtrip(to_web.address)
            assert not _roundtrip(to_db.address)
        assert echo.accepted == 1
        st = t.stats()
        assert st.policy_defaults.allowed == 1 and st.policy_defaults.denied == 1
        # re-resolved on swaps: the db listener's workload is still known to a new table
        t.set_policy(policy)
        assert t.explain(bob_facts, listener=db_listener).allowed is False
    assert Tunnel().explain(bob_facts).allowed  # no policy: allowed


def test_listener_workload_added_after_policy_is_compiled_in(ca: SpiffeCA):
    deny_db = ap(
        "deny-db",
        "  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules:\n  - {}\n",
    )
    with _tunnel(ca, SERVER, policies=deny_db) as t, EchoServer() as echo:
        ev = Events(t)
        gen0 = t.stats().policy_generation
        lst = t.listen((LO, 0), echo.address, workload=DB)
        assert t.stats().policy_generation == gen0 + 1  # recompiled with the db workload
        with pytest.raises(ValueError, match="two different definitions"):
            t.listen((LO, 0), echo.address, workload=Workload("db", "prod", "other"))
        with _tunnel(ca, ALICE) as client:
            fwd = client.forward((LO, 0), lst.address, expect=[SERVER])
            assert not _roundtrip(fwd.address)
        (c,) = ev.wait(1, "close")
        assert c.policy_name == "prod/deny-db" and c.reason == "policy_denied"
        assert echo.accepted == 0


def test_forward_policy_argument_rules(ca: SpiffeCA):
    with _tunnel(ca, ALICE) as t, EchoServer() as echo:
        with pytest.raises(ValueError, match="plaintext forwards"):
            t.forward((LO, 0), echo.address, expect=[SERVER], policy=True)
        with pytest.raises(ValueError, match="policy=True"):
            t.forward((LO, 0), echo.address, plaintext=True, workload=WEB)
    with Tunnel(workers=1, policies=deny_principals("d", BOB)) as t, EchoServer() as echo:
        fwd = t.forward((LO, 0), echo.address, policy=True)
        assert fwd.policy and _roundtrip(fwd.address)  # plaintext: no identity to deny
        st = t.stats()
        assert st.policy_allowed == 1 and st.policy_defaults.allowed == 1
        assert st.policies == {"prod/d": st.policies["prod/d"]}


def test_serve_is_always_policy_checked(ca: SpiffeCA):
    with _tunnel(ca, SERVER, policies=deny_principals("d", BOB), workload=WEB) as t:
        with pytest.raises(ValueError, match="always authorized"):
            t.serve((LO, 0), policy=False)
        srv = t.serve((LO, 0), policy=True)
        facts = ConnectionFacts.of("10.0.0.1", LO, 8080, BOB)
        assert not t.explain(facts, listener=srv).allowed
    with pytest.raises(ValueError, match="workloads"):
        Tunnel(workloads=WEB)  # type: ignore[arg-type]
