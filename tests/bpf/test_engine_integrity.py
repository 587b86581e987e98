"""Byte integrity through the real engine with the eBPF accelerator (``Tunnel(accelerate=True)``).

1,000 connections over the three routes of engine_rig: the same-node pair behind
``forward`` and behind SOCKS5 with a local directory entry, and hop acceleration on an
mTLS pair. Random sizes and chunking, both directions at once, half-close in both orders,
SHA-256 both ways. The tunnels' counters must equal what the apps moved, to the byte,
whichever path each byte took (direct + relayed).

Writers are active while the path switches. The engine pairs so fast (usually before the
client's first send() has run) that the relay -> direct switch at pairing time is rare on
its own: half the clients therefore start with one large write right after connect, and a
few connections per route have a receiver that stalls for a while, so the sender fills the
ingress cap, falls back to the relay (TCP backpressure) and comes back to the direct path
once the relay path is empty again, all while it keeps writing."""

from __future__ import annotations

import random
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bpf_apps import EAGAIN_SEEN, HEADER, Job, make_jobs, mismatches
from engine_rig import STALL_UP, Maps, StallServer, route, run_job

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf, pytest.mark.timeout(120)]

#: random connections per route, plus STALLS each: 1,000 in all
COUNTS = {"forward": 396, "socks5": 296, "mtls": 296}
STALLS = 4
STALL_BYTES = 48 << 20  # > the default ingress cap (tcp_rmem[2], 32 MiB here)


def _burst(job: Job) -> int:
    """Half the uploads start with one large write (64 KiB to 4 MiB) right after connect."""
    r = random.Random(job.seed)
    return int(2 ** r.uniform(16, 22)) if r.random() < 0.5 else 0


def _stall_jobs(first_id: int, seed: int) -> list[Job]:
    """Big transfers whose receiver stalls: even ones upload (the server stalls), odd ones
    download (the client stalls)."""
    rng = random.Random(seed)
    out = []
    for i in range(STALLS):
        big, small = STALL_BYTES + rng.randrange(1 << 20), rng.randrange(1 << 16)
        up, down = (big, small) if i % 2 == 0 else (small, big)
        out.append(Job(first_id + i, up, down, rng.getrandbits(32), STALL_UP if i % 2 == 0 else 0))
    return out


def _run(r_connect: object, job: Job, n: int) -> Job:
    stalled_down = job.conn_id >= n and not job.flags & STALL_UP
    return run_job(
        r_connect,  # type: ignore[arg-type]
        job,
        burst=0 if job.conn_id >= n else _burst(job),
        stall_down=stalled_down,
    )


@pytest.mark.parametrize("name", list(COUNTS))
def test_engine_integrity(name: str, joined_cgroup: Path) -> None:
    n = COUNTS[name]
    seed = zlib.crc32(f"engine-{name}".encode())
    jobs = _stall_jobs(n, seed) + make_jobs(n, seed)  # the slow ones first
    total = len(jobs)
    server = StallServer()
    maps = Maps()
    try:
        with route(name, server.addr, joined_cgroup) as r:
            with ThreadPoolExecutor(max_workers=12) as ex:
                done = list(ex.map(lambda j: _run(r.connect, j, n), jobs))
            server.wait(total, timeout=60)
            r.wait_idle()
            stats = r.stats()
            routes_left = maps.routes()
            bst = maps.stats()
    finally:
        server.close()

    bad = mismatches(done, server)
    assert not bad, f"{len(bad)} mismatches, first: {bad[:5]}"
    up = sum(j.up for j in done) + total * HEADER.size
    down = sum(j.down for j in done)
    entry = stats[-1] if name == "mtls" else stats[0]  # the client's tunnel
    direct = entry.bpf_direct_bytes
    used = {k: v for k, v in bst.items() if v}
    print(
        f"{name}: {total} connections, {up} B up, {down} B down, {entry.bpf_pairs} pairs, "
        f"{direct} B direct ({100 * direct / (up + down):.1f}%), "
        f"bpf {used}, spurious EAGAIN so far {EAGAIN_SEEN[0]}"
    )
    # Every tunnel on the way counted exactly what the apps moved (the client's payload
    # as bytes_sent, the server's as bytes_received), whatever path the bytes took.
    for s in stats:
        assert (s.bytes_sent, s.bytes_received) == (up, down), s
        assert s.connections_closed == total and s.close_reasons["ok"] == total, s.close_reasons
    assert routes_left == 0, "pairs left in ztun_routes after every connection closed"
    if name == "mtls":
        # TLS legs never pair; the hops went socket to socket, and fell back to TCP while
        # a stalled receiver held ztun up.
        assert entry.bpf_pairs == 0 and direct == 0
        assert bst["hop_redirect"] > 0, bst
        assert bst["hop_fallback_order"] + bst["hop_fallback_cap"] > 0, bst
    else:
        assert entry.bpf_pairs >= 0.9 * total, f"only {entry.bpf_pairs} of {total} paired"
        assert bst["pair_redirect"] > 0 and direct > 0, "no byte took the shortcut"
        assert up + down - direct > 0, "no byte went through the relay"
        # The stalled receivers pushed their senders back to the relay, and senders that
        # kept writing found the relay path busy (the protocol's switch under load).
        assert bst["pair_fallback_cap"] > 0 and bst["pair_fallback_order"] > 0, bst
