"""Source-address policy on plaintext forwards (v4 and v6), and HBONE inbound policy
(``Tunnel.serve`` as a node proxy and delivering to ``accept()``, clients over
``forward(protocol="hbone")``): a denied CONNECT is answered 401 and never reaches the
target; a swap resets live streams; the authority picks the served workload."""

from __future__ import annotations

import contextlib
import socket

import pytest
from harness.servers import EchoServer

from policy_e2e.kit import (
    ALICE,
    BOB,
    IO_TIMEOUT,
    SERVER,
    Events,
    LogCapture,
    Mesh,
    ap,
    attempt,
    deny_principals,
    echo_ok,
    policy_yaml,
    wait_until,
)
from ztun import Tunnel
from ztun.policy import ConnectionFacts

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


# ---- HBONE ----------------------------------------------------------------------------


def _deny_bob_on_app_server() -> str:
    # A selector policy: it applies to a CONNECT only when the authority's IP maps to the
    # served workload through the table's IP map (the tunnel itself has no workload).
    return ap(
        "deny-bob",
        "  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules:\n"
        f'  - from:\n    - source: {{principals: ["{BOB.removeprefix("spiffe://")}"]}}\n',
    )


def _hbone_client(
    mesh: Mesh, spiffe_id: str, target: tuple[str, int]
) -> tuple[Tunnel, tuple[str, int]]:
    t = mesh.tunnel(mesh.client, spiffe_id)
    fwd = mesh.client.call(t.forward, ("127.0.0.1", 0), target, expect=[SERVER], protocol="hbone")
    return t, fwd.address


def test_hbone_node_proxy_denial_is_401_and_swap_resets_streams(mesh: Mesh, logs: LogCapture):
    with EchoServer(sock=mesh.server.listen(mesh.server.ip4)) as target:
        srv = mesh.tunnel(
            mesh.server, SERVER, workloads=[mesh.workload], policies=_deny_bob_on_app_server()
        )
        ev = Events(srv)
        hbone = mesh.server.call(
            srv.serve, (mesh.server.ip4, 15008), workloads=[mesh.server.ip4], deliver=False
        )
        bob_t, bob = _hbone_client(mesh, BOB, target.address)
        alice_t, alice = _hbone_client(mesh, ALICE, target.address)
        bob_ev = Events(bob_t)

        # bob: 401, and the target never sees a connection
        assert attempt(mesh.client, bob) in ("eof", "reset")
        (c,) = ev.wait(1, "close", reason="policy_denied")
        assert c.peer_id == BOB and c.http_status == 401 and c.target == target.address
        assert c.policy_name == "prod/deny-bob" and c.policy_reason == "denied_by_policy"
        (oc,) = bob_ev.wait(1, "close")
        assert oc.http_status == 401 and oc.reason == "policy_denied"
        assert target.accepted == 0
        facts = ConnectionFacts.of(mesh.client.ip4, mesh.server.ip4, target.address[1], BOB)
        assert not srv.explain(facts, listener=hbone).allowed  # the explain API agrees
        assert srv.explain(facts).allowed  # (judged as no workload: the selector misses)

        # alice: allowed; her live stream is reset when a new table denies her
        live = mesh.client.connect(alice, timeout=IO_TIMEOUT)
        live.sendall(b"ping")
        assert live.recv(4) == b"ping"
        assert target.wait_accepted(1)
        (o,) = ev.wait(1, "open", peer_id=ALICE)
        assert o.http_status == 200 and o.policy_reason == "allowed_no_allow_policy"
        srv.set_policy(policy_yaml(_deny_bob_on_app_server(), deny_principals("deny-alice", ALICE)))
        (ch,) = ev.wait(1, "close", reason="policy_changed")
        assert ch.peer_id == ALICE and ch.policy_name == "prod/deny-alice"
        live.settimeout(IO_TIMEOUT)
        with contextlib.suppress(ConnectionResetError):
            assert live.recv(1) == b""
        live.close()
        assert target.wait_idle(IO_TIMEOUT)
        wait_until(
            lambda: logs.lines("ztun.engine", f"closed by a policy change: .*{ALICE}.*deny-alice"),
            what="the per-connection log line",
        )
        # counters carry over by name
        st = srv.stats()
        assert st.policies["prod/deny-bob"].denied == 1
        assert st.policies["prod/deny-alice"].denied == 0
        assert attempt(mesh.client, alice) in ("eof", "reset")
        wait_until(lambda: srv.stats().policies["prod/deny-alice"].denied == 1, what="count")
        assert target.accepted == 1
        del alice_t


def test_hbone_delivery_to_python_only_after_policy(mesh: Mesh):
    srv = mesh.tunnel(
        mesh.server, SERVER, workloads=[mesh.workload], policies=_deny_bob_on_app_server()
    )
    ev = Events(srv)
    mesh.server.call(srv.serve, (mesh.server.ip4, 15008), workloads=[mesh.server.ip4])
    app = (mesh.server.ip4, 8080)  # no socket listens there: the app is srv.accept()
    _, bob = _hbone_client(mesh, BOB, app)
    _, alice = _hbone_client(mesh, ALICE, app)
    assert attempt(mesh.client, bob) in ("eof", "reset")
    ev.wait(1, "close", reason="policy_denied", peer_id=BOB)
    with pytest.raises(TimeoutError):
        srv.accept(timeout=0.5)  # nothing was delivered for bob
    c = mesh.client.connect(alice, timeout=IO_TIMEOUT)
    c.sendall(b"hello")
    s = srv.accept(timeout=IO_TIMEOUT)
    try:
        assert s.peer_id == ALICE
        assert s.recv(5) == b"hello"
    finally:
        s.close()
        c.close()
