#!/usr/bin/env python3
"""Interleaved benchmark of ztun's sockmap accelerations (needs root and eBPF).

Every variant moves bytes between the C client and server of tests/bpf/ztrelay.c; relays
are ztrelay's relay, the stand-in for ztun's engine (recv/send, 256 KiB buffer, one poll
loop per connection, the pair protocol of include/ztun/bpf.h):

  direct       client -> server, plain loopback TCP
  skmsg        client -> server, the two app sockets accelerated by ztun's programs
  relay        client -> copy relay -> server
  relay_hop    ... relay whose two loopback hops are accelerated
  pair         ... relay that pairs each connection: app -> app by sk_msg (the shortcut)
  pair_nowait  pair, but the client sends at once and never pauses (throughput only)
  pair_cap64m  pair with a 64 MiB ingress cap instead of the default 16 MiB

Each round runs every variant once, in rotated order; ratios are taken against a baseline
from the same round (skmsg, relay, pair, pair_nowait vs direct; relay_hop vs relay), then
min / median / max over rounds. Writes bench/results/sockmap-<time>.{json,md}.

    sudo .venv/bin/python bench/sockmap_bench.py [--rounds 5] [--bytes 1000000000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "bpf"))

from bpf_util import Procs, free_port  # noqa: E402

from ztun import bpf  # noqa: E402

BASE = {
    "skmsg": "direct",
    "relay": "direct",
    "relay_hop": "relay",
    "pair": "direct",
    "pair_nowait": "direct",
    "pair_cap64m": "direct",
}


def build_ztrelay(out: Path) -> Path:
    from ztun import _bpf

    libdir = Path(_bpf.__file__).parent
    cc = shutil.which("cc") or "gcc"
    exe = out / "ztrelay"
    src = ROOT / "tests/bpf/ztrelay.c"
    inc, rpath = f"-I{ROOT / 'src/include'}", f"-Wl,-rpath,{libdir}"
    cmd = [cc, "-O2", "-pthread", str(src), inc, f"-L{libdir}", "-lztun_bpf", rpath, "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def host_busy() -> int:
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(v) - v[3] - v[4]  # minus idle and iowait


def client(exe: Path, port: int, *args: str) -> dict[str, Any]:
    cmd = [str(exe), "client", f"127.0.0.1:{port}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode:
        raise RuntimeError(f"client on {port} failed: {out.stderr}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def summarize(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bytes", type=int, default=1_000_000_000)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--pp", type=int, default=20000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--only", default="", help="comma-separated subset of variants")
    a = ap.parse_args()
    ok, why = bpf.available()
    if not ok:
        print(f"eBPF unavailable: {why}", file=sys.stderr)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="ztun-bench-"))
    exe = build_ztrelay(tmp)
    procs = Procs()
    origin = bpf.own_cgroup()
    cg = bpf.Cgroup(f"ztun-bench-{os.getpid()}")
    cg.add()
    raw: list[dict[str, Any]] = []
    variants = ["direct", "skmsg", "relay", "relay_hop", "pair", "pair_nowait", "pair_cap64m"]
    if a.only:
        want = set(a.only.split(",")) | {"direct"}
        want |= {BASE[v] for v in want if v in BASE}
        variants = [v for v in variants if v in want]
    try:
        # skmsg: a server whose port ztun's programs treat as a ztun port (both app sockets
        # accelerated, no relay): the bare sk_msg path with ztun's ordering checks.
        skmsg_port = free_port()
        acc = bpf.SockmapAccelerator(cg.path)
        reg = socket.socket()
        reg.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reg.bind(("127.0.0.1", skmsg_port))
        acc.add_listener(reg)
        reg.close()
        direct_port = free_port()
        procs.start(exe, "server", f"127.0.0.1:{direct_port}")
        procs.start(exe, "server", f"127.0.0.1:{skmsg_port}")
        tgt = f"127.0.0.1:{direct_port}"
        ports = {"direct": direct_port, "skmsg": skmsg_port}
        relays = {}
        relay_opts = {
            "relay": [],
            "relay_hop": ["--bpf", str(cg.path), "--mark", "0x7a01"],
            "pair": ["--bpf", str(cg.path), "--pairs", "--mark", "0x7a02"],
            "pair_cap64m": [
                "--bpf",
                str(cg.path),
                "--pairs",
                "--mark",
                "0x7a03",
                "--cap",
                "67108864",
            ],
        }  # loaders sharing a cgroup need distinct marks
        for v, opts in relay_opts.items():
            ports[v] = free_port()
            relays[v] = procs.start(exe, "relay", f"127.0.0.1:{ports[v]}", tgt, *opts)
        ports["pair_nowait"] = ports["pair"]
        relays["pair_nowait"] = relays["pair"]
        time.sleep(0.3)

        def relay_line(v: str) -> dict[str, Any]:
            """The relay's report of the connection that just ended (relay variants)."""
            if v not in relays:
                return {}
            line = procs.lines(relays[v], 1, timeout=30)[0]
            return dict(json.loads(line))

        for v in variants:  # warm-up
            client(exe, ports[v], "tput", str(a.bytes // 10), str(a.chunk))
            relay_line(v)
        hz = os.sysconf("SC_CLK_TCK")
        gib = a.bytes / 2**30
        for r in range(a.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                rp = relays.get(v)
                c0 = cpu_ticks(rp.pid) if rp else 0
                b0 = host_busy()
                extra = ["nowait"] if v == "pair_nowait" else []
                tp = client(exe, ports[v], "tput", str(a.bytes), str(a.chunk), *extra)
                b1 = host_busy()
                c1 = cpu_ticks(rp.pid) if rp else 0
                rl = relay_line(v)
                direct = sum(rl.get("direct", [0, 0]))
                moved = direct + sum(rl.get("relayed", [0, 0]))
                rec: dict[str, Any] = {
                    "round": r,
                    "variant": v,
                    "gbps": tp["gbps"],
                    "relay_cpu_s_per_gib": (c1 - c0) / hz / gib,
                    "host_cpu_s_per_gib": (b1 - b0) / hz / gib,
                    "direct_fraction": direct / moved if moved else 0.0,
                }
                if v != "pair_nowait":
                    pp = client(exe, ports[v], "pp", str(a.pp), str(a.size))
                    relay_line(v)
                    rec.update(p50_us=pp["p50_us"], p99_us=pp["p99_us"])
                raw.append(rec)
                print(json.dumps(rec), flush=True)
        stats = acc.stats()
        acc.close()
    finally:
        procs.close()
        (origin / "cgroup.procs").write_text(str(os.getpid()))
        cg.remove()
        shutil.rmtree(tmp, ignore_errors=True)

    by: dict[str, list[dict[str, Any]]] = {}
    for rec in raw:
        by.setdefault(rec["variant"], []).append(rec)
    summary: dict[str, Any] = {}
    for v, recs in by.items():
        metrics = (
            "gbps",
            "p50_us",
            "p99_us",
            "relay_cpu_s_per_gib",
            "host_cpu_s_per_gib",
            "direct_fraction",
        )
        keys = [k for k in metrics if k in recs[0]]
        s: dict[str, Any] = {k: summarize([x[k] for x in recs]) for k in keys}
        if v in BASE:
            base = {x["round"]: x for x in by[BASE[v]]}
            s["vs"] = BASE[v]
            for k in ("gbps", "p50_us"):
                if k in recs[0]:
                    s[f"ratio_{k}"] = summarize([x[k] / base[x["round"]][k] for x in recs])
        summary[v] = s
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{a.tag}" if a.tag else "")
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "kernel": os.uname().release,
        "ncpu": os.cpu_count(),
        "args": {k: str(x) for k, x in vars(a).items()},
        "skmsg_stats": stats,
    }
    result = {"meta": meta, "raw": raw, "summary": summary}
    (a.out / f"sockmap-{stamp}.json").write_text(json.dumps(result, indent=1))

    def f3(d: dict[str, float] | None, fmt: str = "%.2f") -> str:
        return "-" if d is None else " / ".join(fmt % d[k] for k in ("min", "median", "max"))

    lines = [
        f"kernel {meta['kernel']}, {meta['ncpu']} CPUs, {a.rounds} rounds, "
        f"{a.bytes} B in {a.chunk} B writes, {a.pp} x {a.size} B ping-pong",
        "",
        "| variant | Gbit/s min/med/max | p50 us | p99 us | relay CPU s/GiB (med) "
        "| host CPU s/GiB (med) | bytes direct (med) | vs | tput ratio | p50 ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        s = summary[v]
        cells = [
            v,
            f3(s["gbps"]),
            f3(s.get("p50_us"), "%.1f"),
            f3(s.get("p99_us"), "%.1f"),
            f"{s['relay_cpu_s_per_gib']['median']:.2f}",
            f"{s['host_cpu_s_per_gib']['median']:.2f}",
            f"{100 * s['direct_fraction']['median']:.0f}%" if v.startswith("pair") else "-",
            s.get("vs", "-"),
            f3(s.get("ratio_gbps")),
            f3(s.get("ratio_p50_us")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (a.out / f"sockmap-{stamp}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
