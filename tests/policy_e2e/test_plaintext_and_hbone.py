"""Source-address policy on plaintext forwards (v4 and v6), and HBONE inbound policy with
the engine's HBONE_IN/OUT listeners (ztun._core._engine: Tunnel does not expose HBONE yet):
a denied CONNECT is answered 401 and never reaches the target; a swap resets live streams."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from harness.netns import Node
from harness.servers import EchoServer

from policy_e2e.kit import (
    ALICE,
    BOB,
    IO_TIMEOUT,
    SERVER,
    Events,
    Mesh,
    ap,
    attempt,
    deny_principals,
    echo_ok,
    policy_yaml,
    wait_until,
)
from ztun._core import _engine
from ztun.policy import PolicySet, Workload

pytestmark = [pytest.mark.needs_root, pytest.mark.timeout(120)]


def _ip_rule(name: str, action: str, cidr: str) -> str:
    rules = f'  rules:\n  - from:\n    - source: {{ipBlocks: ["{cidr}"]}}\n'
    return ap(name, f"  action: {action}\n" + rules)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_plaintext_forward_source_ip_policy(mesh: Mesh, family: int):
    client_ip, server_ip = mesh.client.addr(family), mesh.server.addr(family)
    plen = 32 if family == socket.AF_INET else 128
    with EchoServer(
        sock=mesh.server.listen("::1" if family == socket.AF_INET6 else "127.0.0.1")
    ) as guarded:
        srv = mesh.tunnel(
            mesh.server, None, workload=mesh.workload,
            policies=_ip_rule("from-client", "ALLOW", f"{client_ip}/{plen}"),
        )  # fmt: skip
        ev = Events(srv)
        fwd = mesh.server.call(srv.forward, (server_ip, 0), guarded.address, policy=True)
        open_fwd = mesh.server.call(srv.forward, (server_ip, 0), guarded.address)
        # allowed from the client node
        assert echo_ok(mesh.client.connect(fwd.address, timeout=IO_TIMEOUT))
        (o,) = ev.wait(1, "open")
        assert o.src[0] == client_ip and o.peer_id is None
        assert o.policy_name == "prod/from-client"
        # denied from the server node's own address: a reset, nothing reaches the target
        assert attempt(mesh.server, fwd.address) == "reset"
        (c,) = ev.wait(1, "close", reason="policy_denied")
        assert c.src[0] == server_ip and c.policy_reason == "denied_no_match"
        assert guarded.accepted == 1
        # a forward without policy=True is not subject to it
        assert echo_ok(mesh.server.connect(open_fwd.address, timeout=IO_TIMEOUT))
        assert guarded.accepted == 2
        # identity rules cannot allow a plaintext peer (it has none)
        live = mesh.client.connect(fwd.address, timeout=IO_TIMEOUT)
        live.sendall(b"x")
        assert live.recv(1) == b"x"
        srv.set_policy(
            ap(
                "any-identity",
                '  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: ["*"]}\n',
            )
        )
        changed = ev.wait(1, "close", reason="policy_changed")
        assert changed[0].src[0] == client_ip
        with pytest.raises((ConnectionResetError, AssertionError)):
            live.sendall(b"y")
            assert live.recv(1) == b"y"
        live.close()
        assert attempt(mesh.client, fwd.address) == "reset"
        assert guarded.accepted == 3


# ---- HBONE, through the engine binding ---------------------------------------------------


class EngineEvents:
    """Polls an Engine's event ring (there is no Tunnel pump here)."""

    def __init__(self, engine: _engine.Engine) -> None:
        self.engine = engine
        self.items: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        self.items += self.engine.read_events()
        return self.items

    def wait(self, pred: Any, what: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        return wait_until(lambda: [e for e in self.poll() if pred(e)], timeout, what)


def _tls(mesh: Mesh, spiffe_id: str) -> _engine.TlsContext:
    svid = mesh.ca.issue_svid(spiffe_id)
    bundle = mesh.ca.bundle
    roots = {td: bundle.pem(td) for td in bundle.trust_domains}
    return _engine.TlsContext(svid.chain_pem(), svid.key_pem(), roots)


@contextlib.contextmanager
def _engine_in(node: Node) -> Iterator[_engine.Engine]:
    e = _engine.Engine(workers=2)
    node.call(e.start)
    try:
        yield e
    finally:
        e.close()


def test_hbone_inbound_denial_answers_401_and_swap_resets_streams(mesh: Mesh):
    wl = Workload("server", "prod", "server", labels={"app": "server"}, ips=(mesh.server.ip4,))
    # A selector policy: it applies only if the CONNECT authority maps to the workload
    # through the table's IP map (the engine's ztun_policy_find_workload).
    policy = PolicySet.from_yaml(
        ap(
            "deny-bob",
            "  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules:\n"
            f'  - from:\n    - source: {{principals: ["{BOB.removeprefix("spiffe://")}"]}}\n',
        )
    )
    with (
        EchoServer(sock=mesh.server.listen(mesh.server.ip4)) as target,
        _engine_in(mesh.server) as node_b,
        _engine_in(mesh.client) as node_a,
    ):
        gen = node_b.set_policy(policy.compile([wl]))
        assert gen == 1
        _, inbound = mesh.server.call(
            node_b.add_listener, _engine.MODE_HBONE_IN, (mesh.server.ip4, 15008),
            tls=_tls(mesh, SERVER), workload_ips=[mesh.server.ip4],
        )  # fmt: skip
        outs = {}
        for who, sid in (("alice", ALICE), ("bob", BOB)):
            _, outs[who] = mesh.client.call(
                node_a.add_listener, _engine.MODE_HBONE_OUT, ("127.0.0.1", 0), inbound,
                tls=_tls(mesh, sid), expect=[SERVER], target=target.address,
            )  # fmt: skip
        a_events, b_events = EngineEvents(node_a), EngineEvents(node_b)

        # bob: 401, and the target never sees a connection
        assert attempt(mesh.client, outs["bob"]) in ("eof", "reset")
        (out_close,) = a_events.wait(
            lambda e: e["type"] == "close" and e["peer_id"] == SERVER, "bob's outbound close"
        )
        assert out_close["http_status"] == 401 and out_close["reason"] == "policy_denied"
        (in_close,) = b_events.wait(lambda e: e["type"] == "close", "the inbound refusal")
        assert in_close["peer_id"] == BOB and in_close["http_status"] == 401
        assert in_close["reason"] == "policy_denied" and in_close["policy"] == 0
        assert in_close["policy_gen"] == 1 and in_close["target"] == target.address
        st = node_b.stats()
        assert st["hbone_status"][401] == 1 and st["policy_denied"] == 1
        assert target.accepted == 0

        # alice: allowed; keep her stream open across a swap that denies her
        live = mesh.client.connect(outs["alice"], timeout=IO_TIMEOUT)
        live.sendall(b"ping")
        assert live.recv(4) == b"ping"
        assert target.wait_accepted(1)
        assert node_b.stats()["hbone_status"][200] == 1
        deny_alice = PolicySet.from_yaml(
            policy_yaml(deny_principals("deny-alice", ALICE))
        )  # fmt: skip
        assert node_b.set_policy(deny_alice.compile([wl])) == 2
        changed = b_events.wait(
            lambda e: e["type"] == "close" and e["reason"] == "policy_changed", "the re-check"
        )
        assert changed[0]["peer_id"] == ALICE and changed[0]["policy_gen"] == 2
        logs = [e["message"] for e in b_events.items if e["type"] == "log"]
        assert any(
            "closed by a policy change" in m and ALICE in m and "prod/deny-alice" in m for m in logs
        )
        # the stream was reset: alice's client sees the connection end, the target too
        live.settimeout(IO_TIMEOUT)
        with contextlib.suppress(ConnectionResetError):
            assert live.recv(1) == b""
        live.close()
        assert target.wait_idle(IO_TIMEOUT)
        # counters carry by name: deny-bob is gone, deny-alice counts new denials only
        gen, counters = node_b.policy_counters()
        assert gen == 2 and counters[1] == (0, 0, 0)
        assert attempt(mesh.client, outs["alice"]) in ("eof", "reset")
        wait_until(lambda: node_b.policy_counters()[1][1] == (0, 1, 0), what="deny counted")
        assert target.accepted == 1
