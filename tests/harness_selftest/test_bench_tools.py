"""The benchmark harness's own pieces: the report's per-round ratios, the interleaving, and
the asyncio baseline relay carrying data (and half-close) intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from harness.integrity import run_integrity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")


def _bench(metric, path, rnd, **vals):
    return {"extra_info": {"metric": metric, "path": path, "round": rnd, "samples": [], **vals}}


def test_report_ratios_are_per_round(tmp_path):
    # round 0: direct 10, stunnel 2, x 4; round 1: direct 20, stunnel 2, x 2 (noisy machine)
    data = {
        "benchmarks": [
            _bench("throughput", "direct", 0, gbps=10.0, cpu_s_per_gb=None),
            _bench("throughput", "stunnel", 0, gbps=2.0, cpu_s_per_gb=2.0),
            _bench("throughput", "x", 0, gbps=4.0, cpu_s_per_gb=1.0),
            _bench("throughput", "direct", 1, gbps=20.0, cpu_s_per_gb=None),
            _bench("throughput", "stunnel", 1, gbps=2.0, cpu_s_per_gb=2.0),
            _bench("throughput", "x", 1, gbps=2.0, cpu_s_per_gb=1.0),
            _bench("latency", "direct", 0, p50_us=10.0, p99_us=20.0),
            _bench("latency", "x", 0, p50_us=30.0, p99_us=60.0),
        ]
    }
    src = tmp_path / "r.json"
    src.write_text(json.dumps(data))
    out = subprocess.run(
        [sys.executable, os.path.join(BENCH, "report.py"), str(src)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    row = next(ln for ln in out.splitlines() if ln.startswith("| x |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Gbit/s median 3.00; x direct: median of 0.4 and 0.1 = 0.25; x stunnel: median(2, 1) = 1.5
    assert cells[1:4] == ["3.00", "0.250", "1.500"]
    assert cells[6] == "3.000"  # p50 x direct
    assert "CPU" in out and (tmp_path / "r.md").exists()


def test_interleaving_rotates_each_round():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_conftest", f"{BENCH}/conftest.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_conftest"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    pairs = mod.interleaved(("a", "b", "c"), 3)
    assert [n for r, n in pairs if r == 0] == ["a", "b", "c"]
    assert [n for r, n in pairs if r == 1] == ["b", "c", "a"]
    assert [n for r, n in pairs if r == 2] == ["c", "a", "b"]


@pytest.fixture
def asyncio_relay(transform_server):
    p = subprocess.Popen(
        [
            sys.executable,
            os.path.join(BENCH, "tools", "pyrelay.py"),
            "--to",
            "{}:{}".format(*transform_server.address),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = p.stdout.readline()
        assert line.startswith("READY"), line
        yield ("127.0.0.1", int(line.split()[1]))
    finally:
        p.terminate()
        p.wait(10)
        p.stdin.close()
        p.stdout.close()


def test_asyncio_baseline_relay_is_correct(asyncio_relay, transform_server):
    s = run_integrity(
        asyncio_relay, transform_server, n=40, max_size=4 << 20, seed=11, rst_fraction=0.0
    )
    s.assert_clean()
