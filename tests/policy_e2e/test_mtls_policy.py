"""Policy enforced by a Tunnel's mTLS listener between two netns nodes.

Node 1 runs one client tunnel per identity (alice, bob), each forwarding plaintext from
127.0.0.1 over mTLS to node 2; node 2 runs the protected tunnel (``listen``) in front of
test servers. The destination servers' accept counters prove what reached them.
"""

from __future__ import annotations

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
    deny_principals,
    echo_ok,
    policy_yaml,
    refused,
    wait_until,
)

pytestmark = [pytest.mark.needs_root, pytest.mark.timeout(180)]
MiB = 1 << 20


def test_allowed_carry_data_denied_never_reach_the_destination(mesh: Mesh, logs: LogCapture):
    policy = policy_yaml(allow_principals("allow-alice", ALICE), deny_principals("deny-bob", BOB))
    with (
        TransformServer(sock=mesh.server.listen()) as data_srv,
        EchoServer(sock=mesh.server.listen()) as guarded,
    ):
        srv = mesh.server_tunnel(policy)
        ev = Events(srv)
        l_data = mesh.listen(srv, data_srv.address)
        l_guarded = mesh.listen(srv, guarded.address)
        alice_data = mesh.forward(ALICE, l_data)
        bob_guarded = mesh.forward(BOB, l_guarded)
        alice_guarded = mesh.forward(ALICE, l_guarded)

        # allowed: data flows intact both ways
        s = run_integrity(
            alice_data, data_srv, n=24, max_size=4 * MiB, seed=41, connect=mesh.client.connect,
            deadline=90,
        )  # fmt: skip
        s.assert_clean()
        assert data_srv.accepted == 24

        # denied: bob's connections never reach the guarded server
        outcomes = {refused(mesh.connect(bob_guarded)) for _ in range(5)}
        assert outcomes <= {"eof", "reset"}
        denied = ev.wait(5, "close", reason="policy_denied")
        assert guarded.accepted == 0
        for e in denied:
            assert e.peer_id == BOB
            assert e.policy_name == "prod/deny-bob"
            assert e.policy_reason == "denied_by_policy"
            assert e.bytes_sent == 0 and e.bytes_received == 0
            assert e.dst == guarded.address
        # the same path works for alice: the zero above is the policy, not a broken path
        assert echo_ok(mesh.connect(alice_guarded))
        assert guarded.wait_accepted(1)

        st = srv.stats()
        assert st.policy_denied == 5
        assert st.policy_allowed == 24 + 1
        assert st.policies["prod/deny-bob"].denied == 5
        assert st.policies["prod/allow-alice"].allowed == 25
        assert st.close_reasons["policy_denied"] == 5
        opened = ev.select("open")
        assert len(opened) == 25 and all(e.policy_name == "prod/allow-alice" for e in opened)
    lines = wait_until(
        lambda: logs.lines("ztun.access", "policy=prod/deny-bob .*policy_denied") or None,
        what="access log lines of the denials",
    )
    assert all("src.identity=" + BOB in ln for ln in lines)
    assert logs.lines("ztun.access", "direction=inbound .*policy=prod/allow-alice")


def test_default_deny_names_no_policy(mesh: Mesh):
    """ALLOW policies apply and none matches: denied by the default (no policy named)."""
    with EchoServer(sock=mesh.server.listen()) as guarded:
        srv = mesh.server_tunnel(allow_principals("only-alice", ALICE))
        ev = Events(srv)
        l_guarded = mesh.listen(srv, guarded.address)
        assert refused(mesh.connect(mesh.forward(BOB, l_guarded))) in ("eof", "reset")
        (e,) = ev.wait(1, "close", reason="policy_denied")
        assert e.policy_name is None and e.policy_reason == "denied_no_match"
        assert e.detail == "denied: ALLOW policies apply but none matched"
        assert guarded.accepted == 0
        assert srv.stats().policy_defaults.denied == 1


def test_no_policy_allows_and_removing_policy_reopens(mesh: Mesh):
    with EchoServer(sock=mesh.server.listen()) as guarded:
        srv = mesh.server_tunnel(None)
        l_guarded = mesh.listen(srv, guarded.address)
        bob = mesh.forward(BOB, l_guarded)
        assert echo_ok(mesh.connect(bob))
        srv.set_policy(deny_principals("deny-bob", BOB))
        assert refused(mesh.connect(bob)) in ("eof", "reset")
        assert guarded.accepted == 1
        srv.set_policy(None)
        assert echo_ok(mesh.connect(bob))
        assert guarded.accepted == 2
        st = srv.stats()
        assert st.policy_generation == 0 and st.policies == {}
