"""Byte integrity through both accelerations, with the C stand-in relay (tests/bpf/ztrelay.c)
keeping the engine's side of the pair protocol.

Many connections at once, random sizes and chunking, both directions at once, half-close in
both orders, SHA-256 both ways. The pair variants switch a live connection to the direct
path (and, with flapping, back and forth) while both writers keep sending."""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
from bpf_apps import EAGAIN_SEEN, HashServer, Job, make_jobs, mismatches, run_client
from bpf_util import Procs, free_port, relay_lines

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]


class V(NamedTuple):
    opts: list[str]  # relay options ({cg}: the test's cgroup)
    n: int  # connections
    direct: bool  # some bytes must take the shortcut (else none may)
    relayed: bool | None  # some bytes must go through the relay (None: either)
    max_bytes: int = 1 << 21  # per direction, log-uniform


BPF = ["--bpf", "{cg}"]
VARIANTS = {
    "plain": V([], 100, False, True),
    "hop": V(BPF, 150, False, True),
    "hop-cap64k": V([*BPF, "--cap", "65536"], 100, False, True),
    "pair": V([*BPF, "--pairs"], 150, True, None),
    # switch to direct while both writers send (random delay up to 3 ms)
    "pair-late": V(
        [*BPF, "--pairs", "--pair-delay-us", "3000", "--jitter"], 200, True, True, 8 << 20
    ),
    # pair_add / pair_del every 0-2 ms, both ways, during the transfers
    "pair-flap": V(
        [*BPF, "--pairs", "--pair-delay-us", "500", "--flap-us", "2000", "--jitter"],
        250,
        True,
        True,
        8 << 20,
    ),
    "pair-nohop-flap": V(
        [*BPF, "--no-hop", "--pairs", "--flap-us", "1500", "--jitter"], 150, True, True
    ),
}


def _run(
    ztrelay: Path, procs: Procs, cg: Path, v: V, *, seed: int
) -> tuple[list[Job], HashServer, list[dict[str, object]]]:
    n = v.n
    server = HashServer()
    try:
        relay = procs.start(
            ztrelay,
            "relay",
            f"127.0.0.1:{free_port()}",
            f"127.0.0.1:{server.addr[1]}",
            *[o.format(cg=cg) for o in v.opts],
        )
        listen = relay.args[2]
        host, port = listen.rsplit(":", 1)
        jobs = make_jobs(n, seed, max_bytes=v.max_bytes)
        with ThreadPoolExecutor(max_workers=12) as ex:
            done = list(ex.map(lambda j: run_client((host, int(port)), j), jobs))
        server.wait(n, timeout=60)
        lines = relay_lines("".join(procs.lines(relay, n, timeout=30)))
        procs.stop(relay)
    finally:
        server.close()
    return done, server, lines


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_integrity(variant: str, ztrelay: Path, procs: Procs, joined_cgroup: Path) -> None:
    v = VARIANTS[variant]
    n, want_direct, want_relayed = v.n, v.direct, v.relayed
    jobs, server, lines = _run(ztrelay, procs, joined_cgroup, v, seed=zlib.crc32(variant.encode()))
    bad = mismatches(jobs, server)
    assert not bad, f"{len(bad)} mismatches, first: {bad[:5]}"
    assert len(lines) == n, "relay did not report every connection"
    assert not [ln for ln in lines if ln["error"]], "relay saw socket errors"
    assert not [ln for ln in lines if ln["pair_errors"]], [ln["why"] for ln in lines if ln["why"]][
        :3
    ]
    direct = sum(sum(ln["direct"]) for ln in lines)  # type: ignore[arg-type]
    relayed = sum(sum(ln["relayed"]) for ln in lines)  # type: ignore[arg-type]
    total = sum(j.up + j.down for j in jobs) + n * 24  # + headers
    print(
        f"{variant}: {n} connections, {total} B, {direct} direct, {relayed} relayed, "
        f"{sum(int(str(ln['pairs'])) for ln in lines)} pair_add, "
        f"{sum(int(str(ln['unpairs'])) for ln in lines)} pair_del, "
        f"spurious EAGAIN so far {EAGAIN_SEEN[0]}"
    )
    assert direct + relayed == total, (direct, relayed, total)
    if want_direct:
        assert direct > 0, "no byte took the shortcut"
    else:
        assert direct == 0
    if want_relayed:
        assert relayed > 0
    if "flap" in variant:
        assert sum(int(str(ln["unpairs"])) for ln in lines) > 0, "no pair went back to the relay"
