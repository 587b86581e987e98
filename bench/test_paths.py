"""Every metric against every registered path, interleaved: round r runs each path once (in
an order rotated per round), so machine noise hits all paths alike, and ratios are taken
within a round (bench/report.py). Figures land in ``benchmark.extra_info``."""

from __future__ import annotations

import statistics

import pytest
from conftest import KNOBS, cpu_seconds, interleaved, zload_client

PAIRS = interleaved(KNOBS.paths, KNOBS.rounds)
per_path = pytest.mark.parametrize(
    "rnd,path", PAIRS, indirect=["path"], ids=[f"r{r}-{n}" for r, n in PAIRS]
)


def _record(benchmark, metric: str, path, rnd: int, samples: list[dict[str, float]]) -> None:
    benchmark.group = metric
    info = {"metric": metric, "path": path.name, "round": rnd, "samples": samples}
    for key in samples[0]:
        vals = [s[key] for s in samples if s[key] is not None]
        info[key] = statistics.median(vals) if vals else None
    benchmark.extra_info.update(info)


@per_path
def test_throughput(benchmark, path, rnd, knobs):
    """Single stream, 1 MiB writes: Gbit/s, and the tunnel's CPU seconds per GB moved."""
    samples: list[dict[str, float]] = []

    def run() -> None:
        c0 = cpu_seconds(path.pids)
        r = zload_client(path.dial, "tput", knobs.tput_bytes, 1 << 20)
        cpu = cpu_seconds(path.pids) - c0
        samples.append(
            {
                "gbps": r["gbps"],
                "cpu_s_per_gb": cpu / (knobs.tput_bytes / 1e9) if path.pids else None,
            }
        )

    benchmark.pedantic(run, rounds=knobs.inner, iterations=1)
    _record(benchmark, "throughput", path, rnd, samples)


@per_path
def test_latency(benchmark, path, rnd, knobs):
    """64-byte ping-pong round trips: p50 / p99 in microseconds."""
    samples: list[dict[str, float]] = []

    def run() -> None:
        r = zload_client(path.dial, "pp", knobs.pp_count, 64, 500)
        samples.append({"p50_us": r["p50_us"], "p99_us": r["p99_us"]})

    benchmark.pedantic(run, rounds=knobs.inner, iterations=1)
    _record(benchmark, "latency", path, rnd, samples)


@per_path
def test_connrate(benchmark, path, rnd, knobs):
    """Sequential new connections (connect, 1-byte exchange, close) per second."""
    samples: list[dict[str, float]] = []

    def run() -> None:
        c0 = cpu_seconds(path.pids)
        r = zload_client(path.dial, "conns", knobs.conns_secs)
        cpu = cpu_seconds(path.pids) - c0
        samples.append(
            {
                "conns_per_s": r["conns_per_s"],
                "conn_p50_us": r["p50_us"],
                "cpu_us_per_conn": cpu / r["conns"] * 1e6 if path.pids and r["conns"] else None,
            }
        )

    benchmark.pedantic(run, rounds=knobs.inner, iterations=1)
    _record(benchmark, "connrate", path, rnd, samples)


@per_path
def test_connrate_concurrent(benchmark, path, rnd, knobs):
    """New connections per second from several client threads at once."""
    samples: list[dict[str, float]] = []

    def run() -> None:
        r = zload_client(path.dial, "cconns", knobs.cconns_secs, knobs.cconns_threads)
        samples.append({"cconns_per_s": r["conns_per_s"]})

    benchmark.pedantic(run, rounds=knobs.inner, iterations=1)
    _record(benchmark, "connrate_concurrent", path, rnd, samples)
