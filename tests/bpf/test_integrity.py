"""Byte integrity through both accelerations, with the C stand-in relay (tests/bpf/ztrelay.c)
keeping the engine's side of the pair protocol.

Many connections at once, random sizes and chunking, both directions at once, half-close in
both orders, SHA-256 both ways. The pair variants switch a live connection to the direct
path (and, with flapping, back and forth) while both writers keep sending."""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bpf_apps import HashServer, Job, make_jobs, mismatches, run_client
from bpf_util import Procs, free_port, relay_lines

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]

VARIANTS = {
    # name: (relay options, connections, expect direct bytes, expect relayed bytes)
    "plain": ([], 100, False, True),
    "hop": (["--bpf", "{cg}"], 150, False, True),
    "hop-cap64k": (["--bpf", "{cg}", "--cap", "65536"], 100, False, True),
    "pair": (["--bpf", "{cg}", "--pairs"], 150, True, None),
    "pair-late": (
        ["--bpf", "{cg}", "--pairs", "--pair-delay-us", "3000", "--jitter"],
        200,
        True,
        True,
    ),
    "pair-flap": (
        ["--bpf", "{cg}", "--pairs", "--pair-delay-us", "500", "--flap-us", "2000", "--jitter"],
        250,
        True,
        True,
    ),
    "pair-nohop-flap": (
        ["--bpf", "{cg}", "--no-hop", "--pairs", "--flap-us", "1500", "--jitter"],
        150,
        True,
        True,
    ),
}


def _run(
    ztrelay: Path, procs: Procs, cg: Path, opts: list[str], *, n: int, seed: int
) -> tuple[list[Job], HashServer, list[dict[str, object]]]:
    server = HashServer()
    try:
        relay = procs.start(
            ztrelay,
            "relay",
            f"127.0.0.1:{free_port()}",
            f"127.0.0.1:{server.addr[1]}",
            *[o.format(cg=cg) for o in opts],
        )
        listen = relay.args[2]
        host, port = listen.rsplit(":", 1)
        jobs = make_jobs(n, seed)
        with ThreadPoolExecutor(max_workers=12) as ex:
            done = list(ex.map(lambda j: run_client((host, int(port)), j), jobs))
        server.wait(n, timeout=60)
        lines = relay_lines("".join(procs.lines(relay, n, timeout=30)))
        procs.stop(relay)
    finally:
        server.close()
    return done, server, lines


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_integrity(variant: str, ztrelay: Path, procs: Procs, cgroup: Path) -> None:
    opts, n, want_direct, want_relayed = VARIANTS[variant]
    jobs, server, lines = _run(ztrelay, procs, cgroup, opts, n=n, seed=zlib.crc32(variant.encode()))
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
    assert direct + relayed == total, (direct, relayed, total)
    if want_direct:
        assert direct > 0, "no byte took the shortcut"
    else:
        assert direct == 0
    if want_relayed:
        assert relayed > 0
    if "flap" in variant:
        assert sum(int(str(ln["unpairs"])) for ln in lines) > 0, "no pair went back to the relay"
