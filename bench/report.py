#!/usr/bin/env python3
"""Summarize a pytest-benchmark JSON from bench/: one row per path, with its figures (median
over rounds) and its ratios to direct TCP and to stunnel, each ratio taken within a round
and then the median over rounds (min-max in the detail table).

usage: bench/report.py bench/results/latest.json   -> prints tables, writes latest.md beside
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import defaultdict

# The main table: ("v", metric, key, label, format) is a figure (median over rounds);
# ("r", metric, key, base, label) a ratio to ``base`` measured in the same round.
COLUMNS = [
    ("v", "throughput", "gbps", "Gbit/s", "{:.2f}"),
    ("r", "throughput", "gbps", "direct", "x direct"),
    ("r", "throughput", "gbps", "stunnel", "x stunnel"),
    ("v", "latency", "p50_us", "p50 us", "{:.0f}"),
    ("v", "latency", "p99_us", "p99 us", "{:.0f}"),
    ("r", "latency", "p50_us", "direct", "p50 x direct"),
    ("r", "latency", "p50_us", "stunnel", "p50 x stunnel"),
    ("v", "connrate", "conns_per_s", "conn/s seq", "{:,.0f}"),
    ("r", "connrate", "conns_per_s", "direct", "x direct"),
    ("r", "connrate", "conns_per_s", "stunnel", "x stunnel"),
    ("v", "connrate_concurrent", "cconns_per_s", "conn/s conc", "{:,.0f}"),
    ("v", "throughput", "cpu_s_per_gb", "CPU s/GB", "{:.2f}"),
    ("r", "throughput", "cpu_s_per_gb", "stunnel", "CPU x stunnel"),
    ("v", "connrate", "cpu_us_per_conn", "CPU us/conn", "{:,.0f}"),
]
# Connections, handshakes and memory (same conventions; "s": the sum over rounds).
COLUMNS2 = [
    ("v", "connrate", "conns_per_s", "conn/s seq", "{:,.0f}"),
    ("r", "connrate", "conns_per_s", "direct", "x direct"),
    ("r", "connrate", "conns_per_s", "stunnel", "x stunnel"),
    ("v", "connrate", "conn_p99_us", "conn p99 us", "{:,.0f}"),
    ("v", "connrate_concurrent", "cconns_per_s", "conn/s conc", "{:,.0f}"),
    ("r", "connrate_concurrent", "cconns_per_s", "direct", "x direct"),
    ("v", "connrate", "cpu_us_per_conn", "CPU us/conn", "{:,.0f}"),
    ("v", "handshakes", "hs_per_s", "hs/s", "{:,.0f}"),
    ("v", "handshakes", "hs_per_core", "hs/s/core pair", "{:,.0f}"),
    ("v", "handshakes", "client_hs_per_core", "client hs/s/core", "{:,.0f}"),
    ("v", "handshakes", "server_hs_per_core", "server hs/s/core", "{:,.0f}"),
    ("v", "handshakes", "resumed_pct", "resumed %", "{:.0f}"),
    ("s", "connrate", "conn_errors", "stalled seq (sum)", "{:.0f}"),
    ("s", "connrate_concurrent", "cconn_errors", "stalled conc (sum)", "{:.0f}"),
    ("s", "handshakes", "hs_errors", "stalled hs (sum)", "{:.0f}"),
    ("v", "idle", "kib_per_conn", "idle KiB/conn", "{:.2f}"),
    ("v", "idle", "idle_conns", "idle conns", "{:,.0f}"),
]
# Targets from the issues, checked on this run: (label, metric, key, path, base, op, bound).
# base None: the path's own figure; else the per-round ratio path/base (median).
TARGETS = [
    (
        "issue 2: forward throughput >= 0.5x direct",
        "throughput",
        "gbps",
        "ztun_forward",
        "direct",
        ">=",
        0.5,
    ),
    (
        "issue 2: idle forwarded connection <= 4 KiB RSS",
        "idle",
        "kib_per_conn",
        "ztun_forward",
        None,
        "<=",
        4.0,
    ),
    (
        "issue 2: GIL spinner leaves >= 0.8x relay throughput",
        "gil",
        "spin_ratio",
        "ztun",
        None,
        ">=",
        0.8,
    ),
    (
        "  (the same, relative to direct TCP's ratio under the same spinner)",
        "gil",
        "spin_ratio",
        "ztun",
        "direct",
        ">=",
        0.8,
    ),
    (
        "issue 3: mTLS throughput >= 2x stunnel",
        "throughput",
        "gbps",
        "ztun_mtls",
        "stunnel",
        ">=",
        2.0,
    ),
    ("issue 3: mTLS p50 RTT <= 3x direct", "latency", "p50_us", "ztun_mtls", "direct", "<=", 3.0),
    (
        "issue 5: HBONE throughput >= 0.9x ztun mTLS",
        "throughput",
        "gbps",
        "ztun_hbone",
        "ztun_mtls",
        ">=",
        0.9,
    ),
    (
        "issue 5: HBONE new conn/s (warm pool) >= 0.5x direct",
        "connrate",
        "conns_per_s",
        "ztun_hbone",
        "direct",
        ">=",
        0.5,
    ),
]
RATIOS = [  # the detail table: (metric, key, label)
    ("throughput", "gbps", "tput"),
    ("latency", "p50_us", "p50"),
    ("connrate", "conns_per_s", "conn/s"),
    ("throughput", "cpu_s_per_gb", "CPU/GB"),
]


SEPARATE = {"gil"}  # metrics with their own table (their "paths" are not registry paths)


def load(path: str) -> tuple[dict, dict[tuple[str, str], dict[str, dict[int, float]]], list[str]]:
    with open(path) as f:
        data = json.load(f)
    # values[(metric, key)][path][round] = value
    values: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    order: list[str] = []
    for b in data.get("benchmarks", []):
        e = b.get("extra_info", {})
        if "metric" not in e:
            continue
        if e["path"] not in order and e["metric"] not in SEPARATE:
            order.append(e["path"])
        for k, v in e.items():
            if k in ("metric", "path", "round", "samples") or v is None:
                continue
            values[(e["metric"], k)][e["path"]][e["round"]] = float(v)
    return data, values, order


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ratio(values, metric: str, key: str, path: str, base: str) -> list[float]:
    """Per-round ratios path/base, for rounds where both were measured."""
    a = values.get((metric, key), {}).get(path, {})
    b = values.get((metric, key), {}).get(base, {})
    return [a[r] / b[r] for r in sorted(a) if b.get(r)]


def fmt(v: float | None, f: str) -> str:
    return "-" if v is None else f.format(v)


def fr(xs: list[float]) -> str:
    return "-" if not xs else f"{statistics.median(xs):.3f}"


def fr_range(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def table(values, order: list[str], columns: list[tuple[str, str, str, str, str]]) -> str:
    head = ["path"] + [c[3] if c[0] in "vs" else c[4] for c in columns]
    rows = []
    for p in order:
        row = [p]
        for kind, metric, key, x, f in columns:
            xs = list(values.get((metric, key), {}).get(p, {}).values())
            if kind == "v":
                row.append(fmt(med(xs), f))
            elif kind == "s":
                row.append(fmt(sum(xs) if xs else None, f))
            else:
                row.append("-" if p == x else fr(ratio(values, metric, key, p, x)))
        if any(c != "-" for c in row[1:]):
            rows.append(row)
    return _md(head, rows)


def gil_table(values) -> str:
    paths = list(values.get(("gil", "spin_ratio"), {}))
    if not paths:
        return ""
    head = [
        "relay (in-process)",
        "quiet Gbit/s",
        "spinning Gbit/s",
        "spin ratio med (min-max)",
        "spin ratio / direct's",
        "spins/s",
        "rounds",
    ]
    rows = []
    for p in paths:

        def col(k: str, p: str = p) -> list[float]:
            return list(values.get(("gil", k), {}).get(p, {}).values())

        rel = "-" if p == "direct" else fr_range(ratio(values, "gil", "spin_ratio", p, "direct"))
        rows.append(
            [
                p,
                fmt(med(col("gbps_quiet")), "{:.2f}"),
                fmt(med(col("gbps_spin")), "{:.2f}"),
                fr_range(col("spin_ratio")),
                rel,
                fmt(med(col("spins_per_s")), "{:,.0f}"),
                str(len(col("spin_ratio"))),
            ]
        )
    return _md(head, rows)


def targets(values) -> str:
    out = []
    for label, metric, key, p, base, op, bound in TARGETS:
        if base is None:
            xs = list(values.get((metric, key), {}).get(p, {}).values())
        else:
            xs = ratio(values, metric, key, p, base)
        if not xs:
            out.append(f"- {label}: not measured")
            continue
        v = statistics.median(xs)
        ok = v >= bound if op == ">=" else v <= bound
        out.append(f"- {label}: {v:.3f} -> {'met' if ok else 'NOT met'}")
    return "\n".join(out) + "\n"


def tables(values, order: list[str]) -> tuple[str, str]:
    main = table(values, order, COLUMNS)
    dhead = ["path", "vs"] + [f"{r[2]} ratio med (min-max)" for r in RATIOS] + ["rounds"]
    drows = []
    for p in order:
        for base in ("direct", "stunnel"):
            if p == base or base not in order:
                continue
            rs = [ratio(values, m, k, p, base) for m, k, _ in RATIOS]
            n = max((len(x) for x in rs), default=0)
            drows.append([p, base] + [fr_range(x) for x in rs] + [str(n)])
    return main, _md(dhead, drows)


def _md(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    data, values, order = load(argv[1])
    if not order and not values:
        print(f"{argv[1]}: no ztun benchmark results (extra_info.metric) found", file=sys.stderr)
        return 1
    main_t, detail = tables(values, order)
    conn_t = table(values, order, COLUMNS2)
    gil_t = gil_table(values)
    mi = data.get("machine_info", {})
    ci = data.get("commit_info", {})
    hdr = (
        f"ztun benchmarks — {data.get('datetime', '')} — {mi.get('node', '')}, "
        f"{mi.get('cpu', {}).get('count', os.cpu_count())} CPUs, kernel {os.uname().release}, "
        f"commit {ci.get('id', '?')[:10]}{' (dirty)' if ci.get('dirty') else ''}\n\n"
        "Figures: median over rounds. Ratios: per round against the baseline measured in the "
        "same round, then the median (x1 = same; for p50 and CPU lower is better). CPU is "
        "the tunnel processes' own user+system time (both ends of a pair).\n"
    )
    text = hdr + "\n" + main_t + "\nRatio detail:\n\n" + detail
    text += (
        "\nConnections, TLS handshakes (4 client threads, per core = per CPU second of the "
        "tunnel processes), idle memory (RSS delta / idle connections):\n\n" + conn_t
    )
    if gil_t:
        text += (
            "\nGIL: relay throughput while a pure-Python thread spins in the relay's process "
            "(direct = no relay, the spinner alone: the CPU-contention control; the relative "
            "column divides out that share, per round):\n\n" + gil_t
        )
    text += "\nTargets (issues 2, 3, 5), on this run:\n\n" + targets(values)
    print(text)
    md = os.path.splitext(argv[1])[0] + ".md"
    with open(md, "w") as f:
        f.write("# " + text)
    print(f"(written to {md})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
