"""Every metric against every registered path, interleaved: round r runs each path once (in
an order rotated per round), so machine noise hits all paths alike, and ratios are taken
within a round (bench/report.py). Figures land in ``benchmark.extra_info``."""

from __future__ import annotations

import statistics
import time

import pytest
from conftest import (
    CONN_IO_TIMEOUT,
    KNOBS,
    cpu_seconds,
    hold_connections,
    interleaved,
    release,
    rss_bytes,
    zload_client,
)


def per_path(metric: str, rounds: int | None = None):
    pairs = interleaved(KNOBS.paths, KNOBS.rounds if rounds is None else rounds, metric)
    return pytest.mark.parametrize(
        "rnd,path", pairs, indirect=["path"], ids=[f"r{r}-{n}" for r, n in pairs]
    )


def _record(benchmark, metric: str, path, rnd: int, samples: list[dict[str, float]]) -> None:
    benchmark.group = metric
    info = {"metric": metric, "path": path.name, "round": rnd, "samples": samples}
    for key in samples[0]:
        vals = [s[key] for s in samples if s[key] is not None]
        info[key] = statistics.median(vals) if vals else None
    benchmark.extra_info.update(info)


@per_path("throughput")
def test_throughput(benchmark, path, rnd, knobs):
    """Single stream, 1 MiB writes: Gbit/s, and the tunnel's CPU seconds per GB moved."""
    samples: list[dict[str, float]] = []
    nbytes = path.tput_bytes(knobs)

    def run() -> None:
        c0 = cpu_seconds(path.pids)
        r = zload_client(path.dial, "tput", nbytes, 1 << 20)
        cpu = cpu_seconds(path.pids) - c0
        samples.append(
            {
                "gbps": r["gbps"],
                "cpu_s_per_gb": cpu / (nbytes / 1e9) if path.pids else None,
            }
        )

    benchmark.pedantic(run, rounds=knobs.inner, iterations=1)
    _record(benchmark, "throughput", path, rnd, samples)
    benchmark.extra_info["bytes"] = nbytes


@per_path("latency")
def test_latency(benchmark, path, rnd, knobs):
    """64-byte ping-pong round trips: p50 / p99 in microseconds."""
    samples: list[dict[str, float]] = []

    def run() -> None:
        r = zload_client(path.dial, "pp", knobs.pp_count, 64, 500)
        samples.append({"p50_us": r["p50_us"], "p99_us": r["p99_us"]})

    benchmark.pedantic(run, rounds=knobs.inner, iterations=1)
    _record(benchmark, "latency", path, rnd, samples)


@per_path("connrate")
def test_connrate(benchmark, path, rnd, knobs):
    """Sequential new connections (connect, 1-byte exchange, close) per second."""
    samples: list[dict[str, float]] = []

    def run() -> None:
        c0 = cpu_seconds(path.pids)
        r = zload_client(path.dial, "conns", knobs.conns_secs, io_timeout=CONN_IO_TIMEOUT)
        cpu = cpu_seconds(path.pids) - c0
        samples.append(
            {
                "conns_per_s": r["conns_per_s"],
                "conn_errors": r["errors"],
                "conn_p50_us": r["p50_us"],
                "conn_p99_us": r["p99_us"],
                "cpu_us_per_conn": cpu / r["conns"] * 1e6 if path.pids and r["conns"] else None,
            }
        )

    benchmark.pedantic(run, rounds=knobs.inner, iterations=1)
    _record(benchmark, "connrate", path, rnd, samples)


@per_path("connrate_concurrent")
def test_connrate_concurrent(benchmark, path, rnd, knobs):
    """New connections per second from several client threads at once."""
    samples: list[dict[str, float]] = []

    def run() -> None:
        r = zload_client(
            path.dial,
            "cconns",
            knobs.cconns_secs,
            knobs.cconns_threads,
            io_timeout=CONN_IO_TIMEOUT,
        )
        samples.append({"cconns_per_s": r["conns_per_s"], "cconn_errors": r["errors"]})

    benchmark.pedantic(run, rounds=knobs.inner, iterations=1)
    _record(benchmark, "connrate_concurrent", path, rnd, samples)


@per_path("handshakes")
def test_handshakes(benchmark, path, rnd, knobs):
    """TLS handshake rate of the paths that make one per client connection: new connections
    from 4 threads (the tunnel pair saturated), each one a handshake between the two tunnel
    processes. Per core = handshakes / CPU seconds: of the pair (``hs_per_core``) and of
    each side. ztun paths also report how many of them were resumed (engine counters)."""
    samples: list[dict[str, float]] = []

    def run() -> None:
        cli, srv = path.pids[0], path.pids[-1]
        c0, s0 = cpu_seconds([cli]), cpu_seconds([srv])
        st0 = path.handle.stats() if path.handle.stats else None
        r = zload_client(
            path.dial,
            "cconns",
            knobs.cconns_secs * 2,
            knobs.cconns_threads,
            io_timeout=CONN_IO_TIMEOUT,
        )
        cc, sc = cpu_seconds([cli]) - c0, cpu_seconds([srv]) - s0
        n = r["conns"]
        sample = {
            "hs_per_s": r["conns_per_s"],
            "hs_errors": r["errors"],
            "hs_per_core": n / (cc + sc) if cc + sc else None,
            "client_hs_per_core": n / cc if cc else None,
            "server_hs_per_core": n / sc if sc else None,
            "resumed_pct": None,
        }
        if st0 is not None:
            st1 = path.handle.stats()
            hs = sum(
                int(b["handshakes"]) - int(a["handshakes"]) for a, b in zip(st0, st1, strict=True)
            )
            res = sum(
                int(b["handshakes_resumed"]) - int(a["handshakes_resumed"])
                for a, b in zip(st0, st1, strict=True)
            )
            sample["resumed_pct"] = 100.0 * res / hs if hs else None
        samples.append(sample)

    benchmark.pedantic(run, rounds=knobs.inner, iterations=1)
    _record(benchmark, "handshakes", path, rnd, samples)


@per_path("idle", rounds=1)
def test_idle_memory(benchmark, path, rnd, knobs):
    """Resident memory per idle connection: the tunnel processes' RSS with
    ``knobs.idle_conns`` open, idle connections (each carried a byte each way first) minus
    their RSS before, divided by the count."""
    if not path.pids:
        pytest.skip("no tunnel process on this path")
    samples: list[dict[str, float]] = []

    def run() -> None:
        before = rss_bytes(path.pids)
        p, rep = hold_connections(path.dial, knobs.idle_conns)
        try:
            time.sleep(1.0)  # let the tunnel settle (buffers back to the pool)
            after = rss_bytes(path.pids)
        finally:
            release(p)
        n = rep["conns"]
        samples.append(
            {
                "idle_conns": n,
                "idle_errors": rep["errors"],
                "kib_per_conn": (after - before) / 1024 / n if n else None,
                "rss_mib_before": before / 2**20,
                "rss_mib_after": after / 2**20,
            }
        )

    benchmark.pedantic(run, rounds=1, iterations=1)
    _record(benchmark, "idle", path, rnd, samples)
