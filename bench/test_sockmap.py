"""pytest-benchmark view of the sockmap accelerations (root + eBPF; skipped otherwise).

Each benchmark runs the C client of tests/bpf/ztrelay.c against one path and records bytes
and latency in extra_info. pytest-benchmark runs one path after the other; for ratios
that are robust against other load on the host, use the interleaved
`bench/sockmap_bench.py`, whose figures docs/sockmap.md quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "bpf"))
sys.path.insert(0, str(ROOT / "bench"))

from ztun import bpf  # noqa: E402

TPUT_BYTES = 256 << 20
PATHS = ["direct", "relay", "relay_hop", "pair"]


@pytest.fixture(scope="module")
def rig() -> Iterator[dict[str, Any]]:
    ok, why = bpf.available()
    if not ok:
        pytest.skip(f"needs eBPF: {why}")
    from bpf_util import Procs, free_port
    from sockmap_bench import build_ztrelay

    tmp = Path(tempfile.mkdtemp(prefix="ztun-bench-"))
    exe = build_ztrelay(tmp)
    origin = bpf.own_cgroup()
    cg = bpf.Cgroup(f"ztun-pybench-{os.getpid()}")
    cg.add()
    procs = Procs()
    try:
        ports = {"direct": free_port()}
        procs.start(exe, "server", f"127.0.0.1:{ports['direct']}")
        tgt = f"127.0.0.1:{ports['direct']}"
        opts = {
            "relay": [],
            "relay_hop": ["--bpf", str(cg.path), "--mark", "0x7a11"],
            "pair": ["--bpf", str(cg.path), "--pairs", "--mark", "0x7a12"],
        }
        for v, o in opts.items():
            ports[v] = free_port()
            procs.start(exe, "relay", f"127.0.0.1:{ports[v]}", tgt, *o)
        yield {"exe": exe, "ports": ports}
    finally:
        procs.close()
        (origin / "cgroup.procs").write_text(str(os.getpid()))
        cg.remove()


def _client(rig: dict[str, Any], path: str, *args: str) -> dict[str, Any]:
    cmd = [str(rig["exe"]), "client", f"127.0.0.1:{rig['ports'][path]}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("path", PATHS)
def test_throughput(benchmark: Any, rig: dict[str, Any], path: str) -> None:
    res: dict[str, Any] = {}

    def run() -> None:
        res.update(_client(rig, path, "tput", str(TPUT_BYTES), "65536"))

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info["bytes"] = TPUT_BYTES
    benchmark.extra_info["gbps_last"] = res["gbps"]


@pytest.mark.parametrize("path", PATHS)
def test_round_trip_64b(benchmark: Any, rig: dict[str, Any], path: str) -> None:
    res: dict[str, Any] = {}

    def run() -> None:
        res.update(_client(rig, path, "pp", "5000", "64"))

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info["p50_us_last"] = res["p50_us"]
    benchmark.extra_info["p99_us_last"] = res["p99_us"]
