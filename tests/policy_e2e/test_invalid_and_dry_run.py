"""Bad policy input changes nothing (proven with traffic); dry-run policies are counted and
logged but never enforced."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness.integrity import run_integrity
from harness.servers import EchoServer, TransformServer

from policy_e2e.kit import (
    ALICE,
    BOB,
    Events,
    LogCapture,
    Mesh,
    allow_principals,
    ap,
    deny_principals,
    echo_ok,
    policy_yaml,
    refused,
    wait_until,
)
from ztun.errors import PolicyError

pytestmark = [pytest.mark.needs_root, pytest.mark.timeout(180)]
MiB = 1 << 20

ALLOW_BOB = allow_principals("allow-bob", BOB)
BAD = {
    # name: (document, line, field)
    "malformed_yaml": ("  action: ALLOW\n  rules: [\n", 9, None),
    "unknown_field": ("  action: ALLOW\n  rulez: []\n", 8, "spec.rulez"),
    "bad_cidr": (
        "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        ipBlocks: [10.0.0.0/33]\n",
        11,
        "spec.rules[0].from[0].source.ipBlocks[0]",
    ),
    "bad_port": (
        '  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        ports: ["70000"]\n',
        11,
        "spec.rules[0].to[0].operation.ports[0]",
    ),
    "bad_principal": (
        '  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: ["a*b"]\n',
        11,
        "spec.rules[0].from[0].source.principals[0]",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_raises_and_the_old_policy_stays(mesh: Mesh, tmp_path: Path, kind: str):
    body, line, field = BAD[kind]
    with EchoServer(sock=mesh.server.listen()) as guarded:
        srv = mesh.server_tunnel(allow_principals("allow-alice", ALICE))
        l_guarded = mesh.listen(srv, guarded.address)
        alice, bob = mesh.forward(ALICE, l_guarded), mesh.forward(BOB, l_guarded)
        live = mesh.connect(alice)  # an allowed connection open across the attempts
        assert echo_ok_keep(live)
        # the bad document comes AFTER one that would allow bob: nothing may be half-applied
        text = ALLOW_BOB + "\n---\n" + ap("broken", body)
        path = tmp_path / "policies.yaml"
        path.write_text(text)
        for source, where in ((text, "<string>"), (path, str(path))):
            with pytest.raises(PolicyError) as ei:
                srv.set_policy(source)
            err = ei.value
            assert (err.file, err.field) == (where, field), err
            assert err.line == line + ALLOW_BOB.count("\n") + 2, err  # after "\n---\n"
            assert where in str(err)
        # the old policy is in force: alice allowed, bob denied, the live one untouched
        assert srv.stats().policy_generation == 1
        assert srv.policies is not None and [p.key for p in srv.policies] == ["prod/allow-alice"]
        assert echo_ok_keep(live)
        assert refused(mesh.connect(bob)) in ("eof", "reset")
        assert echo_ok(mesh.connect(alice))
        assert guarded.accepted == 2
        live.close()


def echo_ok_keep(sock) -> bool:
    sock.sendall(b"still here")
    got = b""
    while len(got) < 10:
        b = sock.recv(10 - len(got))
        if not b:
            return False
        got += b
    return got == b"still here"


def test_dry_run_is_counted_and_logged_not_enforced(mesh: Mesh, logs: LogCapture):
    policy = policy_yaml(
        allow_principals("allow-clients", ALICE, BOB),
        deny_principals("audit-bob", BOB, dry_run=True),
    )
    with TransformServer(sock=mesh.server.listen()) as data_srv:
        srv = mesh.server_tunnel(policy)
        ev = Events(srv)
        listener = mesh.listen(srv, data_srv.address)
        bob = mesh.forward(BOB, listener)
        s = run_integrity(
            bob, data_srv, n=10, max_size=2 * MiB, seed=5, connect=mesh.client.connect,
            deadline=90,
        )  # fmt: skip
        s.assert_clean()  # not enforced: bob's data flows
        closes = ev.wait(10, "close", peer_id=BOB)
        assert {e.reason for e in closes} == {"ok"}
        for e in closes:
            assert e.policy_name == "prod/allow-clients"
            assert e.dry_run_allowed is False and e.dry_run_policy == "prod/audit-bob"
        st = srv.stats()
        assert st.policies["prod/audit-bob"].dry_run == 10
        assert st.policies["prod/audit-bob"].denied == 0
        assert st.policies["prod/allow-clients"].allowed == 10
        assert st.policy_dry_run == 10 and st.policy_denied == 0
        # alice is not matched by the dry-run policy: nothing to report for her
        alice = mesh.forward(ALICE, listener)
        s = run_integrity(alice, data_srv, n=3, max_size=MiB, seed=6, connect=mesh.client.connect)
        s.assert_clean()
        a_closes = ev.wait(3, "close", peer_id=ALICE)
        assert all(e.dry_run_allowed is True and e.dry_run_policy is None for e in a_closes)
        assert srv.stats().policies["prod/audit-bob"].dry_run == 10
    wait_until(
        lambda: len(logs.lines("ztun.access", r"dry_run=deny:prod/audit-bob")) >= 10,
        what="access log lines naming the dry-run policy",
    )
    assert not logs.lines("ztun.access", r"sa/alice .*dry_run=")
    engine = logs.lines("ztun.engine", r"dry-run policy prod/audit-bob would deny")
    assert len(engine) == 10 and all(BOB in ln for ln in engine)


def test_dry_run_allow_does_not_deny_and_enforcing_it_does(mesh: Mesh):
    """A lone dry-run ALLOW: enforced verdict 'no ALLOW policy -> allow', dry-run verdict
    'deny'. Making it enforced closes bob's live connection."""
    dry = allow_principals("only-alice", ALICE, dry_run=True)
    with EchoServer(sock=mesh.server.listen()) as guarded:
        srv = mesh.server_tunnel(dry)
        ev = Events(srv)
        l_guarded = mesh.listen(srv, guarded.address)
        bob = mesh.connect(mesh.forward(BOB, l_guarded))
        assert echo_ok_keep(bob)
        (o,) = ev.wait(1, "open", peer_id=BOB)
        assert o.policy_reason == "allowed_no_allow_policy" and o.dry_run_allowed is False
        assert srv.stats().policy_dry_run == 1
        assert srv.stats().policies["prod/only-alice"].dry_run == 0  # it did not match bob
        srv.set_policy(allow_principals("only-alice", ALICE))
        (c,) = ev.wait(1, "close", peer_id=BOB)
        assert c.reason == "policy_changed" and c.policy_reason == "denied_no_match"
        with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
            assert echo_ok_keep(bob)
        bob.close()
