#!/usr/bin/env python3
"""Interleaved benchmark of the eBPF sockmap shortcut through ztun's real engine (root + eBPF).

Load is the C client and server of tests/bpf/ztrelay.c (1 GB in 64 KiB writes, then
64-byte ping-pongs); every ztun end is `bench/tools/ztun_accel_path.py` (a `Tunnel`) in its
own process, so its CPU time is its own:

  direct       client -> server, plain loopback TCP (the baseline of the issue-7 targets)
  fwd          client -> Tunnel().forward -> server (the plain relay)
  fwd_pair     client -> Tunnel(accelerate=True).forward -> server: the same-node pair
  remote       client -> Tunnel().forward -> server in a network namespace behind a veth
               (198.18.0.2): a destination that is not local, so nothing can pair
  remote_hop   the same with accelerate=True: only the app<->ztun hop goes socket to socket
  mtls         client -> Tunnel().forward(expect) -> Tunnel().listen -> server
  mtls_hop     the same two Tunnels with accelerate=True: only the app<->ztun hops (and the
               loopback TLS hop between the tunnels) go socket to socket; TLS never pairs

Each variant lives in its own cgroup v2 (its apps and tunnels; an accelerated Tunnel
attaches to its process's cgroup), so one variant's programs never see another's
sockets. Each round runs every variant's throughput once, in rotated order, then the
ping-pongs in short interleaved bursts (the host's wake-up latency drifts within seconds);
ratios are taken against a baseline of the same round (fwd_pair vs direct and vs fwd,
remote_hop vs remote, mtls_hop vs mtls), then min / median / max over rounds.
During the ping-pongs both CPUs are kept out of their idle states (two SCHED_IDLE spinners,
preempted by anything else; ``--cold`` leaves them out): latency of a busy node, without
the virtual CPU's halt/wake-up cost, which otherwise swings p50 between 14 and 80 us from
one second to the next on this host, whatever the path. After every round the accelerated
variants must still have their programs attached: a host-wide ``ztund bpf cleanup`` (as
tests/daemon runs) detaches every running ztun's, and the run is then aborted.
Writes bench/results/engine-sockmap-<time>.{json,md}.

    sudo .venv/bin/python bench/engine_sockmap_bench.py [--rounds 7] [--bytes 1000000000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "bpf"))
sys.path.insert(0, str(ROOT / "bench"))

from bpf_util import free_port  # noqa: E402
from sockmap_bench import build_ztrelay, cpu_ticks, host_busy, summarize  # noqa: E402

from ztun import bpf  # noqa: E402

TOOL = ROOT / "bench" / "tools" / "ztun_accel_path.py"
VARIANTS = ["direct", "fwd", "fwd_pair", "remote", "remote_hop", "mtls", "mtls_hop"]
#: (variant, baseline) pairs whose per-round ratios are reported
RATIOS = [
    ("fwd", "direct"),
    ("fwd_pair", "direct"),
    ("fwd_pair", "fwd"),
    ("remote_hop", "remote"),
    ("mtls_hop", "mtls"),
]
NETNS_HOST, NETNS_PEER = "198.18.0.1", "198.18.0.2"  # the veth to the "remote" server
CLIENT_ID = "spiffe://example.org/ns/default/sa/client"
SERVER_ID = "spiffe://example.org/ns/prod/sa/server"


def in_cgroup(cg: Path, argv: list[str]) -> list[str]:
    """argv run from inside cg (joined before exec, so all its sockets are cg's)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cg), *argv]


class Variant:
    """One variant's cgroup, server, tunnels and client."""

    def __init__(self, name: str, exe: Path, certs: dict[str, Path], netns: str) -> None:
        self.name = name
        self.exe = exe
        self.procs: list[Any] = []  # every process started, server first
        self.cg = bpf.Cgroup(f"ztun-ebench-{os.getpid()}-{name}")
        self.tunnels: list[Any] = []  # Popen of the ztun ends, entry first
        self.port = 0
        self.certs = certs
        self.netns = netns

    def start(self) -> None:
        exe, certs, name = self.exe, self.certs, self.name
        sport = free_port()
        host = NETNS_PEER if name.startswith("remote") else "127.0.0.1"
        target = f"{host}:{sport}"
        ns = ["ip", "netns", "exec", self.netns] if host != "127.0.0.1" else []
        self._ready(self._start(*ns, exe, "server", target))
        acc = ["--accelerate"] if name.endswith(("_pair", "_hop")) else []
        py = sys.executable
        if name == "direct":
            self.port = sport
        elif name.startswith(("fwd", "remote")):
            t = self._start(py, TOOL, "forward", "--to", target, *acc)
            self.port = self._ready_port(t)
        else:
            tls = ["--ca", str(certs["ca"])]
            srv = self._start(
                py, TOOL, "mtls-server", "--to", target, "--cert", str(certs["server_cert"]),
                "--key", str(certs["server_key"]), *tls, *acc,
            )  # fmt: skip
            cli = self._start(
                py, TOOL, "mtls-client", "--to", f"127.0.0.1:{self._ready_port(srv)}",
                "--expect", SERVER_ID, "--cert", str(certs["client_cert"]),
                "--key", str(certs["client_key"]), *tls, *acc,
            )  # fmt: skip
            self.port = self._ready_port(cli)
            self.tunnels = [cli, srv]
            return
        if name != "direct":
            self.tunnels = [t]

    def _start(self, *argv: str | os.PathLike[str]) -> Any:
        p = subprocess.Popen(
            in_cgroup(self.cg.path, [os.fspath(a) for a in argv]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        return p

    def _ready(self, p: Any) -> list[str]:
        line = p.stdout.readline().split()
        if line[:1] != ["READY"]:
            raise RuntimeError(f"{self.name}: {p.args[-1]} did not start: {line}")
        return list(line)

    def _ready_port(self, p: Any) -> int:
        return int(self._ready(p)[1])

    def stats(self, closed: int = 0) -> dict[str, Any]:
        """The entry tunnel's counters (empty for direct), once it has closed ``closed``
        connections (a pair's direct bytes are counted when its connection closes)."""
        if not self.tunnels:
            return {}
        t = self.tunnels[0]
        end = time.monotonic() + 10
        while True:
            t.stdin.write("stats\n")
            t.stdin.flush()
            st = dict(json.loads(t.stdout.readline()))
            if st["connections_closed"] >= closed or time.monotonic() > end:
                return st
            time.sleep(0.01)

    def cpu(self) -> int:
        return sum(cpu_ticks(t.pid) for t in self.tunnels)

    def client(self, *args: str) -> dict[str, Any]:
        cmd = [str(self.exe), "client", f"127.0.0.1:{self.port}", *args]
        for attempt in range(3):
            out = subprocess.run(
                in_cgroup(self.cg.path, cmd),
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if out.returncode == 0:
                return dict(json.loads(out.stdout.strip().splitlines()[-1]))
            # A blocking recv() on a psock socket can fail with a spurious EAGAIN
            # (docs/sockmap.md §4); ztrelay's client does not retry it.
            print(f"{self.name}: client failed ({out.stderr.strip()}), retry {attempt + 1}")
        raise RuntimeError(f"{self.name}: client keeps failing")

    def close(self) -> None:
        """Tunnels first (stdin closed: the tool closes its Tunnel, engine then
        accelerator), then the server; then the cgroup, empty by then."""
        for t in self.tunnels:
            if t.poll() is None and t.stdin:
                t.stdin.close()
        for p in self.procs:
            if p not in self.tunnels and p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.cg.remove()


BURSTS = 8  # ping-pong bursts per variant and round


def make_netns(ns: str) -> None:
    """A namespace behind a veth pair: NETNS_PEER there, NETNS_HOST here (deleted with it)."""
    veth = f"zteb{os.getpid() % 100000}"
    for cmd in (
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["ip", "addr", "add", f"{NETNS_HOST}/30", "dev", veth],
        ["ip", "link", "set", veth, "up"],
        ["ip", "-n", ns, "addr", "add", f"{NETNS_PEER}/30", "dev", "eth0"],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
    ):
        subprocess.run(cmd, check=True)


def attached(cg: Path) -> bool:
    """Whether ztun's sock_ops program is still attached to cg."""
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cg)], capture_output=True, text=True, check=False
    )
    try:
        progs = json.loads(out.stdout or "[]")
    except json.JSONDecodeError:
        return False
    return any(p.get("name") == "ztun_sockops" for p in progs)


@contextlib.contextmanager
def warmers(on: bool) -> Iterator[None]:
    """With ``on``: one SCHED_IDLE busy loop per CPU (anything else preempts them)."""
    ps = []
    if on:
        for _ in range(os.cpu_count() or 1):
            ps.append(subprocess.Popen(["chrt", "-i", "0", "sh", "-c", "while :; do :; done"]))
    try:
        yield
    finally:
        for p in ps:
            p.kill()
            p.wait()


def make_certs(d: Path) -> dict[str, Path]:
    from ztun.testing import SpiffeCA, write_svid_files

    ca = SpiffeCA("example.org")
    cc, ck = write_svid_files(ca.issue_svid(CLIENT_ID), d, "client")
    sc, sk = write_svid_files(ca.issue_svid(SERVER_ID), d, "server")
    return {
        "ca": ca.write_files(d),
        "client_cert": cc,
        "client_key": ck,
        "server_cert": sc,
        "server_key": sk,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bytes", type=int, default=1_000_000_000)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--pp", type=int, default=20000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--tag", default="")
    ap.add_argument(
        "--cold", action="store_true", help="ping-pongs without the warmers (idle CPUs)"
    )
    a = ap.parse_args()
    ok, why = bpf.available()
    if not ok:
        print(f"eBPF unavailable: {why}", file=sys.stderr)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="ztun-ebench-"))
    exe = build_ztrelay(tmp)
    certs = make_certs(tmp)
    ns = f"ztun-ebench-{os.getpid()}"
    vs: dict[str, Variant] = {}
    raw: list[dict[str, Any]] = []
    try:
        make_netns(ns)
        for v in VARIANTS:
            vs[v] = Variant(v, exe, certs, ns)
            vs[v].start()
        for v in VARIANTS:  # warm-up
            print(f"warm-up {v}", file=sys.stderr, flush=True)
            vs[v].client("tput", str(a.bytes // 10), str(a.chunk))
        hz = os.sysconf("SC_CLK_TCK")
        gib = a.bytes / 2**30
        for r in range(a.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            recs: dict[str, dict[str, Any]] = {}
            for v in order:
                var = vs[v]
                s0, c0, b0 = var.stats(), var.cpu(), host_busy()
                tp = var.client("tput", str(a.bytes), str(a.chunk))
                b1, c1 = host_busy(), var.cpu()
                s1 = var.stats(closed=s0.get("connections_closed", 0) + 1)
                rec: dict[str, Any] = {
                    "round": r,
                    "variant": v,
                    "gbps": tp["gbps"],
                    "ztun_cpu_s_per_gib": (c1 - c0) / hz / gib,
                    "host_cpu_s_per_gib": (b1 - b0) / hz / gib,
                }
                if s1:
                    moved = (s1["bytes_sent"] + s1["bytes_received"]) - (
                        s0["bytes_sent"] + s0["bytes_received"]
                    )
                    direct = s1["bpf_direct_bytes"] - s0["bpf_direct_bytes"]
                    rec["direct_fraction"] = direct / moved if moved else 0.0
                    rec["accelerated"] = s1["accelerated"]
                recs[v] = rec
            # Ping-pongs: BURSTS short runs per variant, interleaved; per round the median
            # of each variant's burst p50s (and p99s).
            p50s: dict[str, list[float]] = {v: [] for v in VARIANTS}
            p99s: dict[str, list[float]] = {v: [] for v in VARIANTS}
            with warmers(not a.cold):
                for _ in range(BURSTS):
                    for v in order:
                        pp = vs[v].client("pp", str(a.pp // BURSTS), str(a.size), "200")
                        p50s[v].append(pp["p50_us"])
                        p99s[v].append(pp["p99_us"])
            for v in order:
                if v.endswith(("_pair", "_hop")) and not attached(vs[v].cg.path):
                    raise RuntimeError(
                        f"round {r}: {v}'s programs are no longer attached to its cgroup "
                        "(someone ran a host-wide ztund bpf cleanup?): figures invalid"
                    )
                recs[v].update(
                    p50_us=statistics.median(p50s[v]),
                    p99_us=statistics.median(p99s[v]),
                    p50_bursts=p50s[v],
                )
                raw.append(recs[v])
                print(json.dumps(recs[v]), flush=True)
    finally:
        for var in vs.values():
            try:
                var.close()
            except Exception as e:  # keep closing the others
                print(f"{var.name}: close: {e!r}", file=sys.stderr)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    by: dict[str, list[dict[str, Any]]] = {}
    for rec in raw:
        by.setdefault(rec["variant"], []).append(rec)
    summary: dict[str, Any] = {}
    metrics = (
        "gbps",
        "p50_us",
        "p99_us",
        "ztun_cpu_s_per_gib",
        "host_cpu_s_per_gib",
        "direct_fraction",
    )
    for v, recs in by.items():
        summary[v] = {k: summarize([x[k] for x in recs]) for k in metrics if k in recs[0]}
    ratios: dict[str, Any] = {}
    for v, base in RATIOS:
        b = {x["round"]: x for x in by[base]}
        ratios[f"{v}/{base}"] = {
            k: summarize([x[k] / b[x["round"]][k] for x in by[v]]) for k in ("gbps", "p50_us")
        }
        # p50 per burst against the baseline's burst run just before or after it (the
        # same k in the same round): the closest pairs in time, so drift cancels best.
        ratios[f"{v}/{base}"]["p50_burst"] = summarize(
            [
                y / z
                for x in by[v]
                for y, z in zip(x["p50_bursts"], b[x["round"]]["p50_bursts"], strict=True)
            ]
        )
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{a.tag}" if a.tag else "")
    a.out.mkdir(parents=True, exist_ok=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    meta = {
        "kernel": os.uname().release,
        "ncpu": os.cpu_count(),
        "loadavg_end": load,
        "args": {k: str(x) for k, x in vars(a).items()},
    }
    result = {"meta": meta, "raw": raw, "summary": summary, "ratios": ratios}
    (a.out / f"engine-sockmap-{stamp}.json").write_text(json.dumps(result, indent=1))

    def f3(d: dict[str, float] | None, fmt: str = "%.2f") -> str:
        return "-" if d is None else " / ".join(fmt % d[k] for k in ("min", "median", "max"))

    lines = [
        f"kernel {meta['kernel']}, {meta['ncpu']} CPUs, load {' '.join(load)}, {a.rounds} "
        f"rounds, {a.bytes} B in {a.chunk} B writes, {a.pp} x {a.size} B ping-pong",
        "",
        "| variant | Gbit/s min/med/max | p50 us | p99 us | ztun CPU s/GiB (med) "
        "| host CPU s/GiB (med) | bytes direct (med) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        s = summary[v]
        df = s.get("direct_fraction")
        cells = [
            v,
            f3(s["gbps"]),
            f3(s["p50_us"], "%.1f"),
            f3(s["p99_us"], "%.1f"),
            f"{s['ztun_cpu_s_per_gib']['median']:.2f}",
            f"{s['host_cpu_s_per_gib']['median']:.2f}",
            f"{100 * df['median']:.1f}%" if df else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| ratio | throughput min/med/max (per round) | p50 RTT (per round) "
        "| p50 RTT (per burst pair) |",
        "|---|---|---|---|",
    ]
    for k, rt in ratios.items():
        lines.append(f"| {k} | {f3(rt['gbps'])} | {f3(rt['p50_us'])} | {f3(rt['p50_burst'])} |")
    md = "\n".join(lines) + "\n"
    (a.out / f"engine-sockmap-{stamp}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
