#!/usr/bin/env python3
"""Interleaved benchmark of transparent capture (needs root and eBPF): captured cross-node
vs explicit forward vs direct, in the same run.

Two netns nodes joined by a veth (tests/harness), the zload C load generator
(bench/tools/zload.c) as client in node A and as servers in node B, and a ztun Tunnel per
node in this process (their C workers do the relaying; this process only waits):

  direct    A: zload -> B:9001                            plain TCP over the veth
  forward   A: zload -> 127.0.0.1:P  Tunnel.forward(protocol="hbone") -> B:15009
            serve(deliver=False) -> B:9002                explicit HBONE entry point
  captured  A: zload in the captured cgroup -> B:9000, rewritten by cgroup/connect4 to A's
            15001 (SO_ORIGINAL_DST from cgroup/getsockopt) -> HBONE -> B:15008, steered by
            sk_lookup to B's capture listener -> B:9000

Both ztun paths are the same tunnel (HBONE, pooled mTLS, same engines, one worker each);
what differs is only how connections reach it. B's sk_lookup program runs for every new
inbound TCP connection in B, also for the direct and forward ones (their ports are excluded:
one hash lookup, then the kernel's own lookup).

Metrics per round (each round runs every path once, order rotated): single-stream
throughput (1 MiB writes), 64-byte ping-pong p50/p99, sequential new connections/s
(connect, 1-byte exchange, close), the same from 4 threads, and the CPU seconds of the ztun
process per GB and per connection. Ratios are taken within each round (captured/forward,
captured/direct, forward/direct), then min / median / max over rounds.

    sudo .venv/bin/python bench/capture_bench.py [--rounds 5] [--bytes 1073741824] [--family 4]

Writes bench/results/capture-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.cgroup import Cgroup  # noqa: E402
from harness.netns import Node, Topology  # noqa: E402

from ztun import Tunnel, capture  # noqa: E402
from ztun.mesh import Destination  # noqa: E402
from ztun.netns import run_in_netns  # noqa: E402
from ztun.testing import SpiffeCA  # noqa: E402

PATHS = ("direct", "forward", "captured")
RATIOS = (("captured", "forward"), ("captured", "direct"), ("forward", "direct"))
ZLOAD_SRC = ROOT / "bench" / "tools" / "zload.c"
ZLOAD_BIN = ROOT / "build" / "bench" / "zload"
PORT_CAPTURED, PORT_DIRECT, PORT_FORWARD, PORT_HBONE_EXPLICIT = 9000, 9001, 9002, 15009
_CLK = os.sysconf("SC_CLK_TCK")


def build_zload() -> Path:
    if ZLOAD_BIN.exists() and ZLOAD_BIN.stat().st_mtime >= ZLOAD_SRC.stat().st_mtime:
        return ZLOAD_BIN
    ZLOAD_BIN.parent.mkdir(parents=True, exist_ok=True)
    tmp = ZLOAD_BIN.with_suffix(f".{os.getpid()}")
    subprocess.run(["cc", "-O2", "-Wall", "-pthread", "-o", str(tmp), str(ZLOAD_SRC)], check=True)
    os.replace(tmp, ZLOAD_BIN)
    return ZLOAD_BIN


def own_cpu() -> float:
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def prog_stats() -> dict[str, tuple[int, int]]:
    """name -> (run count, run time ns) of ztun's capture programs (kernel bpf_stats)."""
    cp = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=False
    )
    out: dict[str, tuple[int, int]] = {}
    for p in json.loads(cp.stdout or "[]"):
        name = p.get("name", "")
        if name.startswith("ztun_cap"):
            cnt, ns = out.get(name, (0, 0))
            out[name] = (cnt + p.get("run_cnt", 0), ns + p.get("run_time_ns", 0))
    return out


def hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class DetachedError(RuntimeError):
    """ztun.bpf.cleanup() detaches every ztun link on the host: another process did."""


class Bench:
    def __init__(self, family: int) -> None:
        self.family = family
        self.zload = str(build_zload())
        self.ca = SpiffeCA("cluster.local")
        self.topo = Topology(2, "cbench")
        self.a, self.b = self.topo.nodes
        self.engine_cg = Cgroup.create()
        self.app_cg = Cgroup.create()  # the captured client
        self.srv_cg = Cgroup.create()  # the captured server
        self.other_cg = Cgroup.create()  # the other paths' clients: not ztun's cgroup
        self.engine_cg.add()
        self.tunnels: list[Tunnel] = []
        self.captures: list[capture.Capture] = []
        self.servers: list[subprocess.Popen[str]] = []
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def capture(self) -> None:
        """(Re)capture: B inbound (the other paths' ports left alone), A's app cgroup."""
        for c in self.captures:
            c.close()
        self.captures = [
            capture.Capture(
                self.tb,
                cgroup=self.srv_cg.path,
                netns=self.b.path,
                name="bench-server",
                exclude_inbound_ports=[PORT_DIRECT, PORT_FORWARD, PORT_HBONE_EXPLICIT],
            ),
            capture.Capture(
                self.ta, cgroup=self.app_cg.path, netns=self.a.path, name="bench-client"
            ),
        ]

    def ip(self, node: Node) -> str:
        return node.ip6 if self.family == 6 else node.ip4

    def _tunnel(self, node: Node, name: str) -> Tunnel:
        t = Tunnel(
            identity=self.ca.issue_svid(f"spiffe://cluster.local/ns/bench/sa/{name}"),
            trust=self.ca.bundle,
            workers=1,
            access_log=False,
        )
        run_in_netns(node.path, t.start)
        self.tunnels.append(t)
        return t

    def _setup(self) -> None:
        a, b = self.a, self.b
        ids = {"client": "spiffe://cluster.local/ns/bench/sa/client"}
        ids["server"] = "spiffe://cluster.local/ns/bench/sa/server"
        ta, tb = self._tunnel(a, "client"), self._tunnel(b, "server")
        directory = [Destination(ip, ids["server"]) for ip in (b.ip4, b.ip6)]
        directory += [Destination(ip, ids["client"]) for ip in (a.ip4, a.ip6)]
        ta.set_directory(directory)
        tb.set_directory(directory)
        self.ta, self.tb = ta, tb
        self.capture()
        # Explicit path: forward on A -> serve() on B:15009, outside capture.
        wild = "::" if self.family == 6 else "0.0.0.0"
        run_in_netns(
            b.path, tb.serve, (wild, PORT_HBONE_EXPLICIT), workloads=[b.ip4, b.ip6], deliver=False
        )
        fwd = run_in_netns(
            a.path,
            ta.forward,
            ("127.0.0.1", 0),
            (self.ip(b), PORT_FORWARD),
            expect=[ids["server"]],
            via=(self.ip(b), PORT_HBONE_EXPLICIT),
            protocol="hbone",
        )
        self.forward_addr = ("127.0.0.1", fwd.address[1])
        for port in (PORT_CAPTURED, PORT_DIRECT, PORT_FORWARD):
            # Inbound capture is per namespace; the captured path's server is also in B's
            # captured cgroup (its sockets meet sock_ops and sock_release), the others not.
            cg = self.srv_cg if port == PORT_CAPTURED else self.other_cg
            argv = ["sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', cg.path]
            argv += [self.zload, "server", hostport(wild, port), "16"]
            p = b.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert p.stdout is not None
            line = p.stdout.readline()
            if "READY" not in line:
                raise RuntimeError(f"zload server: {line!r}")
            self.servers.append(p)

    def dial(self, path: str) -> tuple[str, int, bool]:
        """(host, port, captured) a client uses for ``path``."""
        if path == "direct":
            return self.ip(self.b), PORT_DIRECT, False
        if path == "forward":
            return *self.forward_addr, False
        return self.ip(self.b), PORT_CAPTURED, True

    def client(self, path: str, *args: object, timeout: float = 300) -> dict[str, Any]:
        host, port, captured = self.dial(path)
        argv = [self.zload, "client", hostport(host, port), *map(str, args)]
        cg = self.app_cg if captured else self.other_cg
        argv = ["sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', cg.path, *argv]
        env = {**os.environ, "ZLOAD_TIMEOUT": "5"}
        cp = self.a.run_in(
            subprocess.run,
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
        lines = cp.stdout.strip().splitlines()
        res: dict[str, Any] = json.loads(lines[-1]) if lines else {"error": cp.stderr}
        if cp.returncode or "error" in res:
            raise RuntimeError(f"zload {args[0]} via {path}: {res} {cp.stderr.strip()}")
        return res

    def rewrites(self) -> int:
        st = self.captures[0].stats()
        return st["rewrite4"] + st["rewrite6"]

    def measure(self, path: str, nbytes: int, pp: int, secs: float) -> dict[str, float]:
        """One run of every metric on ``path``. A captured run must show its rewrites: other
        programs on the host may detach ztun's (``ztun.bpf.cleanup()`` is host-wide)."""
        before = self.rewrites()
        out = self._measure(path, nbytes, pp, secs)
        if path == "captured" and self.rewrites() - before < out["conns"]:
            raise DetachedError(
                "the captured path was not captured (programs detached by another process?)"
            )
        if path != "captured" and self.rewrites() != before:
            raise RuntimeError(f"{path} connections were captured")
        return out

    def _measure(self, path: str, nbytes: int, pp: int, secs: float) -> dict[str, float]:
        out: dict[str, float] = {}
        c0 = own_cpu()
        r = self.client(path, "tput", nbytes)
        out["cpu_s_per_gb"] = (own_cpu() - c0) / (nbytes / 1e9)
        out["gbit_s"] = r["gbps"]
        r = self.client(path, "pp", pp, 64, 500)
        out["p50_us"], out["p99_us"] = r["p50_us"], r["p99_us"]
        c0 = own_cpu()
        r = self.client(path, "conns", secs)
        out["conn_s"] = r["conns_per_s"]
        out["conn_setup_p50_us"] = r["p50_us"]  # connect + 1-byte exchange + close
        out["cpu_us_per_conn"] = (own_cpu() - c0) / max(1, r["conns"]) * 1e6
        out["conn_errors"] = r["errors"]
        out["conns"] = r["conns"]
        r = self.client(path, "cconns", secs, 4)
        out["cconn_s"] = r["conns_per_s"]
        return out

    def close(self) -> None:
        for p in self.servers:
            p.kill()
            p.wait()
        for c in self.captures:
            with contextlib.suppress(Exception):
                c.close()
        for t in self.tunnels:
            with contextlib.suppress(Exception):
                t.close()
        for cg in (self.app_cg, self.srv_cg, self.other_cg, self.engine_cg):
            with contextlib.suppress(Exception):
                cg.remove()
        self.topo.close()


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    metrics = list(rounds[0]["direct"])
    med = {p: {m: statistics.median(r[p][m] for r in rounds) for m in metrics} for p in PATHS}
    ratios: dict[str, dict[str, list[float]]] = {}
    for num, den in RATIOS:
        key = f"{num}/{den}"
        ratios[key] = {}
        for m in ("gbit_s", "p50_us", "p99_us", "conn_s", "conn_setup_p50_us", "cconn_s"):
            vals = [r[num][m] / r[den][m] for r in rounds if r[den][m]]
            ratios[key][m] = [min(vals), statistics.median(vals), max(vals)]
    return {"median": med, "ratios": ratios}


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    med, ratios = summary["median"], summary["ratios"]
    lines = [
        f"# capture benchmark {meta['time']} (IPv{meta['family']}, {meta['rounds']} rounds, "
        f"{meta['bytes'] / 2**30:.2f} GiB per throughput run, kernel {meta['kernel']})",
        "",
        "| path | Gbit/s | p50 / p99 us | conn/s seq | conn setup p50 us | conn/s x4 "
        "| ztun CPU s/GB | ztun CPU us/conn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in PATHS:
        m = med[p]
        cpu = "-" if p == "direct" else f"{m['cpu_s_per_gb']:.2f}"
        cpc = "-" if p == "direct" else f"{m['cpu_us_per_conn']:.0f}"
        lines.append(
            f"| {p} | {m['gbit_s']:.2f} | {m['p50_us']:.0f} / {m['p99_us']:.0f} | "
            f"{m['conn_s']:.0f} | {m['conn_setup_p50_us']:.0f} | {m['cconn_s']:.0f} | "
            f"{cpu} | {cpc} |"
        )
    lines += [
        "",
        "Ratios within each round, median (min-max):",
        "",
        "| ratio | throughput | p50 | p99 | conn/s seq | conn setup p50 | conn/s x4 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in ratios.items():
        cells = [f"{v[1]:.2f} ({v[0]:.2f}-{v[2]:.2f})" for v in r.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def programs_md(progs: dict[str, tuple[int, int]], counters: dict[str, int]) -> str:
    """What the programs cost per run, and per captured connection (kernel's own clock)."""
    conns = max(1, counters.get("rewrite4", 0) + counters.get("rewrite6", 0))
    lines = [
        "",
        f"Capture programs, kernel bpf_stats over the whole run ({conns} captured "
        "connections). The workload-cgroup programs see only captured sockets; the programs "
        "on ztun's cgroup (getsockopt, setsockopt, its sock_ops link) run for every socket of "
        "the ztun process, forward path included, and sk_lookup for every new inbound "
        "connection of B, whatever the path: their share per captured connection is an "
        "upper bound:",
        "",
        "| program | runs | ns/run | runs per captured conn | ns per captured conn |",
        "|---|---|---|---|---|",
    ]
    total = 0.0
    for name, (cnt, ns) in sorted(progs.items()):
        if not cnt:
            continue
        per = ns / conns
        total += per
        lines.append(f"| {name} | {cnt} | {ns / cnt:.0f} | {cnt / conns:.1f} | {per:.0f} |")
    lines.append(f"| all | | | | {total:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bytes", type=int, default=1 << 30)
    ap.add_argument("--pp", type=int, default=20000, help="ping-pongs per latency run")
    ap.add_argument("--secs", type=float, default=3.0, help="seconds per connection-rate run")
    ap.add_argument("--family", type=int, choices=(4, 6), default=4)
    args = ap.parse_args()
    ok, why = capture.available()
    if not ok:
        print(f"capture unavailable: {why}", file=sys.stderr)
        return 2
    bench = Bench(args.family)
    rounds: list[dict[str, dict[str, float]]] = []
    stats_was = BPF_STATS.read_text().strip()
    BPF_STATS.write_text("1")  # per-program run counts and times, for the cost of capture
    try:
        for p in PATHS:  # warm-up: pools, handshakes, ARP/ND
            bench.client(p, "conns", 0.5)
        retries = 0
        while len(rounds) < args.rounds:
            r = len(rounds)
            order = PATHS[r % 3 :] + PATHS[: r % 3]
            try:
                res = {p: bench.measure(p, args.bytes, args.pp, args.secs) for p in order}
            except DetachedError as e:
                retries += 1
                if retries > 5:
                    raise
                print(f"round {r + 1}: {e}: captured again, round repeated", flush=True)
                bench.capture()
                continue
            rounds.append(res)
            print(
                f"round {r + 1}: "
                + ", ".join(
                    f"{p} {res[p]['gbit_s']:.1f} Gb/s {res[p]['conn_s']:.0f} c/s "
                    f"p50 {res[p]['p50_us']:.0f}us"
                    for p in PATHS
                ),
                flush=True,
            )
        stats = bench.captures[0].stats()
        progs = prog_stats()
    finally:
        BPF_STATS.write_text(stats_was)
        bench.close()
    meta = {
        "time": time.strftime("%Y%m%d-%H%M%S"),
        "family": args.family,
        "rounds": args.rounds,
        "bytes": args.bytes,
        "kernel": os.uname().release,
        "capture_counters": stats,
        "rounds_repeated": retries,
        "programs": progs,
    }
    summary = summarize(rounds)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"capture-{meta['time']}"
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rounds": rounds, **summary}, indent=1)
    )
    md = markdown(summary, meta) + programs_md(progs, stats)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"capture counters: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
