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
RATIOS = [  # the detail table: (metric, key, label)
    ("throughput", "gbps", "tput"),
    ("latency", "p50_us", "p50"),
    ("connrate", "conns_per_s", "conn/s"),
    ("throughput", "cpu_s_per_gb", "CPU/GB"),
]


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
        if e["path"] not in order:
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


def tables(values, order: list[str]) -> tuple[str, str]:
    head = ["path"] + [c[3] if c[0] == "v" else c[4] for c in COLUMNS]
    rows = []
    for p in order:
        row = [p]
        for kind, metric, key, x, f in COLUMNS:
            if kind == "v":
                row.append(fmt(med(list(values.get((metric, key), {}).get(p, {}).values())), f))
            else:
                row.append("-" if p == x else fr(ratio(values, metric, key, p, x)))
        rows.append(row)
    main = _md(head, rows)
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
    if not order:
        print(f"{argv[1]}: no ztun benchmark results (extra_info.metric) found", file=sys.stderr)
        return 1
    main_t, detail = tables(values, order)
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
    print(text)
    md = os.path.splitext(argv[1])[0] + ".md"
    with open(md, "w") as f:
        f.write("# " + text)
    print(f"(written to {md})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
