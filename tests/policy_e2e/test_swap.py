"""A policy swap under load: allowed connections carry on intact, newly denied ones are
reset with reason ``policy_changed`` and logged one by one; counters carry over by name."""

from __future__ import annotations

import re
import threading

import pytest
from harness.integrity import ConnSpec, Summary, run_integrity
from harness.payload import HEADER
from harness.servers import TransformServer

from policy_e2e.kit import (
    ALICE,
    BOB,
    Events,
    LogCapture,
    Mesh,
    allow_principals,
    deny_principals,
    policy_yaml,
    refused,
    wait_until,
)

pytestmark = [pytest.mark.needs_root, pytest.mark.timeout(240)]
MiB = 1 << 20
N = 12  # long transfers per identity, all in flight when the policy changes
SIZE = 48 * MiB  # alice's, each way: seconds at the shared rate, far longer than the swap
BOB_SIZE = 1 << 30  # bob's are cut by the swap, so their size costs nothing: never done


def _specs(server: TransformServer, seed: int, size: int) -> list[ConnSpec]:
    first = server.next_conn_ids(N)
    orders = ("client_fin", "server_fin")
    return [
        ConnSpec(first + i, seed=seed * 1000 + i, up_size=size, down_size=size, order=orders[i % 2])
        for i in range(N)
    ]


def test_swap_under_load_keeps_allowed_and_closes_newly_denied(mesh: Mesh, logs: LogCapture):
    before = policy_yaml(allow_principals("allow-clients", ALICE, BOB))
    after = policy_yaml(
        allow_principals("allow-clients", ALICE, BOB), deny_principals("deny-bob", BOB)
    )
    with TransformServer(sock=mesh.server.listen(), io_timeout=60) as data_srv:
        srv = mesh.server_tunnel(before)
        ev = Events(srv)
        listener = mesh.listen(srv, data_srv.address)
        alice, bob = mesh.forward(ALICE, listener), mesh.forward(BOB, listener)
        results: dict[str, Summary] = {}

        def drive(name: str, addr: tuple[str, int], seed: int, size: int) -> None:
            results[name] = run_integrity(
                addr, data_srv, specs=_specs(data_srv, seed, size), concurrency=N,
                connect=mesh.client.connect, deadline=150, io_timeout=60,
            )  # fmt: skip

        threads = [
            threading.Thread(target=drive, args=("alice", alice, 1, SIZE)),
            threading.Thread(target=drive, args=("bob", bob, 2, BOB_SIZE)),
        ]
        for t in threads:
            t.start()
        try:
            ev.wait(N, "open", peer_id=ALICE, timeout=30)
            ev.wait(N, "open", peer_id=BOB, timeout=30)
            live_bob = {e.conn_id for e in ev.select("open", peer_id=BOB)}
            assert not ev.select("close", peer_id=BOB)
            srv.set_policy(after)
        finally:
            for t in threads:
                t.join(200)
        assert not any(t.is_alive() for t in threads)

        # no allowed connection dropped: every byte of alice's arrived intact both ways
        results["alice"].assert_clean()
        alice_closes = ev.wait(N, "close", peer_id=ALICE)
        assert {e.reason for e in alice_closes} == {"ok"}
        assert all(
            e.bytes_sent == SIZE + HEADER.size and e.bytes_received == SIZE for e in alice_closes
        )
        assert all(e.policy_name == "prod/allow-clients" for e in alice_closes)
        # those live at the swap were re-checked (and allowed) by the new table
        survivors = [e for e in alice_closes if e.policy_rechecked]
        assert len(survivors) >= N // 2, f"only {len(survivors)} alice transfers spanned the swap"
        assert all(e.policy_generation == 2 for e in survivors)

        # every live bob connection was reset by the policy change, named by its decider
        bob_closes = ev.wait(N, "close", peer_id=BOB)
        assert {e.conn_id for e in bob_closes} == live_bob
        assert {e.reason for e in bob_closes} == {"policy_changed"}
        assert all(e.policy_name == "prod/deny-bob" for e in bob_closes)
        assert results["bob"].failed == N  # their clients saw the reset
        assert all(r.kind != "ok" for r in results["bob"].results)

        # ... and each is logged with its conn id, peer and the deciding policy
        logged = set()
        for line in logs.lines("ztun.engine", "closed by a policy change"):
            m = re.match(
                r"conn (\d+): closed by a policy change: peer (\S+) \((\S+)\) .* by (\S+)", line
            )
            assert m, line
            assert m.group(3) == BOB and m.group(4) == "prod/deny-bob"
            assert m.group(2).startswith(mesh.client.ip4 + ":")
            logged.add(int(m.group(1)))
        assert logged == live_bob
        assert len(logs.lines("ztun.access", 'error="policy_changed')) == N

        # a new bob connection is denied and never reaches the server
        accepted = data_srv.accepted
        assert refused(mesh.connect(bob)) in ("eof", "reset")
        ev.wait(1, "close", reason="policy_denied")
        assert data_srv.accepted == accepted

        st = srv.stats()
        assert st.close_reasons["policy_changed"] == N
        assert st.policy_generation == 2
        # counted once each, carried across the swap by name (re-checks are not counted)
        assert st.policies["prod/allow-clients"].allowed == 2 * N
        assert st.policies["prod/deny-bob"].denied == 1
        assert st.policy_allowed == 2 * N and st.policy_denied == 1


def test_swap_to_identical_policy_drops_nothing(mesh: Mesh):
    text = allow_principals("allow-alice", ALICE)
    with TransformServer(sock=mesh.server.listen()) as data_srv:
        srv = mesh.server_tunnel(text)
        listener = mesh.listen(srv, data_srv.address)
        alice = mesh.forward(ALICE, listener)
        stop = threading.Event()
        swaps = 0

        def swapper() -> None:
            nonlocal swaps
            while not stop.is_set():
                srv.set_policy(text)
                swaps += 1

        t = threading.Thread(target=swapper)
        t.start()
        try:
            s = run_integrity(
                alice, data_srv, n=40, max_size=8 * MiB, seed=7, concurrency=8,
                connect=mesh.client.connect, deadline=120,
            )  # fmt: skip
        finally:
            stop.set()
            t.join(30)
        s.assert_clean()
        assert swaps > 10
        st = srv.stats()
        assert st.policies["prod/allow-alice"].allowed == 40
        assert st.close_reasons["policy_changed"] == 0
        wait_until(lambda: srv.stats().policy_generation == swaps + 1, what="generation")
