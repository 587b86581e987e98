"""pytest-benchmark view of the sockmap shortcut through the real engine (root + eBPF;
skipped otherwise).

Each benchmark runs the C client of tests/bpf/ztrelay.c against one variant of
`bench/engine_sockmap_bench.py` (ztun ends are `Tunnel` processes, each variant in its own
cgroup) and records throughput, latency and the share of bytes that went app to app in
extra_info. pytest-benchmark runs one variant after the other; the interleaved figures that
docs/sockmap.md quotes come from `bench/engine_sockmap_bench.py`."""

from __future__ import annotations

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
VARIANTS = ["direct", "fwd", "fwd_pair", "remote", "remote_hop", "mtls", "mtls_hop"]


@pytest.fixture(scope="module")
def variants() -> Iterator[dict[str, Any]]:
    ok, why = bpf.available()
    if not ok:
        pytest.skip(f"needs eBPF: {why}")
    from engine_sockmap_bench import Variant, build_ztrelay, make_certs, make_netns

    tmp = Path(tempfile.mkdtemp(prefix="ztun-ebench-"))
    ns = f"ztun-ebench-{os.getpid()}"
    vs: dict[str, Any] = {}
    try:
        exe = build_ztrelay(tmp)
        certs = make_certs(tmp)
        make_netns(ns)
        for v in VARIANTS:
            vs[v] = Variant(v, exe, certs, ns)
            vs[v].start()
        yield vs
    finally:
        for var in vs.values():
            var.close()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


@pytest.mark.parametrize("name", VARIANTS)
def test_engine_throughput(benchmark: Any, variants: dict[str, Any], name: str) -> None:
    var = variants[name]
    res: dict[str, Any] = {}
    s0 = var.stats()

    def run() -> None:
        res.update(var.client("tput", str(TPUT_BYTES), "65536"))

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    s1 = var.stats(closed=s0.get("connections_closed", 0) + 6)
    benchmark.extra_info["bytes"] = TPUT_BYTES
    benchmark.extra_info["gbps_last"] = res["gbps"]
    if s1:
        moved = s1["bytes_sent"] + s1["bytes_received"] - s0["bytes_sent"] - s0["bytes_received"]
        direct = s1["bpf_direct_bytes"] - s0["bpf_direct_bytes"]
        benchmark.extra_info["direct_fraction"] = direct / moved if moved else 0.0


@pytest.mark.parametrize("name", VARIANTS)
def test_engine_round_trip_64b(benchmark: Any, variants: dict[str, Any], name: str) -> None:
    var = variants[name]
    res: dict[str, Any] = {}

    def run() -> None:
        res.update(var.client("pp", "5000", "64"))

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info["p50_us_last"] = res["p50_us"]
    benchmark.extra_info["p99_us_last"] = res["p99_us"]
