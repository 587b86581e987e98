"""Benchmark fixtures: the zload tool (built on demand), the destination server, the path
registry (bench/paths.py) with lazily started, cached paths, and the knobs.

Knobs (environment):
  ZTUN_BENCH_QUICK=1       short run (2 rounds, smaller transfers) for a smoke test
  ZTUN_BENCH_ROUNDS=N      rounds; each round runs every path once per metric, order rotated
  ZTUN_BENCH_INNER=N       pedantic rounds inside one test (default 1)
  ZTUN_BENCH_BYTES=N       bytes per throughput run (default 1 GiB, quick 256 MiB)
  ZTUN_BENCH_PATHS=a,b     only these paths (direct is always added: ratios need it)
  ZTUN_BENCH_IDLE=N        idle connections held per path for the memory figure (default
                           9000: 2 fds each in a one-process tunnel, under the 20,000 limit)
  ZTUN_BENCH_TPUT_SECS=S   cap of a throughput run on a slow path (default 3 s): its bytes
                           are cut to what the warm-up rate moves in S seconds
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from paths import PATHS, PathContext, PathHandle  # noqa: E402

ROOT = os.path.dirname(BENCH)
ZLOAD_SRC = os.path.join(BENCH, "tools", "zload.c")
ZLOAD_BIN = os.path.join(ROOT, "build", "bench", "zload")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


@dataclass(frozen=True)
class Knobs:
    quick: bool
    rounds: int
    inner: int
    tput_bytes: int
    pp_count: int
    conns_secs: float
    cconns_secs: float
    cconns_threads: int
    idle_conns: int
    tput_secs: float
    paths: tuple[str, ...]

    @classmethod
    def from_env(cls) -> Knobs:
        quick = os.environ.get("ZTUN_BENCH_QUICK", "") not in ("", "0")
        names = [n for n in PATHS if n]
        want = os.environ.get("ZTUN_BENCH_PATHS", "").strip()
        if want:
            chosen = [n.strip() for n in want.split(",") if n.strip()]
            unknown = [n for n in chosen if n not in PATHS]
            if unknown:
                raise pytest.UsageError(f"unknown ZTUN_BENCH_PATHS {unknown}; known {names}")
            names = ["direct", *[n for n in chosen if n != "direct"]]
        return cls(
            quick=quick,
            rounds=max(1, _env_int("ZTUN_BENCH_ROUNDS", 2 if quick else 5)),
            inner=max(1, _env_int("ZTUN_BENCH_INNER", 1)),
            tput_bytes=_env_int("ZTUN_BENCH_BYTES", (256 if quick else 1024) << 20),
            pp_count=2000 if quick else 10000,
            conns_secs=0.5 if quick else 1.5,
            cconns_secs=0.5 if quick else 1.0,
            cconns_threads=4,
            idle_conns=_env_int("ZTUN_BENCH_IDLE", 1000 if quick else 9000),
            tput_secs=float(os.environ.get("ZTUN_BENCH_TPUT_SECS", "") or 3.0),
            paths=tuple(names),
        )


KNOBS = Knobs.from_env()


def build_zload() -> str:
    """Compile bench/tools/zload.c into build/bench/ when missing or older than its source."""
    if os.path.exists(ZLOAD_BIN) and os.path.getmtime(ZLOAD_BIN) >= os.path.getmtime(ZLOAD_SRC):
        return ZLOAD_BIN
    os.makedirs(os.path.dirname(ZLOAD_BIN), exist_ok=True)
    tmp = ZLOAD_BIN + f".{os.getpid()}"
    subprocess.run(
        ["cc", "-O2", "-Wall", "-pthread", "-o", tmp, ZLOAD_SRC], check=True, timeout=120
    )
    os.replace(tmp, ZLOAD_BIN)
    return ZLOAD_BIN


# Connection-rate runs: a connection that gets no answer in this many seconds counts as an
# error (zload's default is 30 s: one stalled connection would eat the whole run).
CONN_IO_TIMEOUT = 5


def zload_client(
    dial: tuple[str, int], *args: object, timeout: float = 120.0, io_timeout: int | None = None
) -> dict[str, float]:
    """Run one zload client measurement against ``dial``; its JSON result."""
    host = f"[{dial[0]}]" if ":" in dial[0] else dial[0]
    env = None if io_timeout is None else {**os.environ, "ZLOAD_TIMEOUT": str(io_timeout)}
    out = subprocess.run(
        [ZLOAD_BIN, "client", f"{host}:{dial[1]}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    lines = out.stdout.strip().splitlines()
    res = json.loads(lines[-1]) if lines else {"error": out.stderr.strip() or "no output"}
    if out.returncode or "error" in res:
        raise RuntimeError(f"zload {args[0]} via {dial}: {res.get('error')} {out.stderr.strip()}")
    return res  # type: ignore[no-any-return]


_CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (all threads, incl. exited ones) of ``pids``, in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / _CLK


def hold_connections(dial: tuple[str, int], n: int) -> tuple[subprocess.Popen[str], dict]:
    """``zload client hold n``: n open, idle connections through ``dial`` (each carried one
    byte each way), until :func:`release` closes them. Returns the process and its report."""
    host = f"[{dial[0]}]" if ":" in dial[0] else dial[0]
    p = subprocess.Popen(
        [ZLOAD_BIN, "client", f"{host}:{dial[1]}", "hold", str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "ZLOAD_TIMEOUT": str(CONN_IO_TIMEOUT)},
    )
    import selectors

    assert p.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        ready = sel.select(60 + n / 100)
    line = p.stdout.readline() if ready else ""
    if not line:
        release(p)
        raise RuntimeError(f"zload hold {n} via {dial}: no report")
    return p, json.loads(line)


def release(p: subprocess.Popen[str]) -> None:
    if p.stdin is not None:
        p.stdin.close()
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
    if p.stdout is not None:
        p.stdout.close()


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of ``pids``, summed."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * _PAGE
    return total


@dataclass
class ActivePath:
    name: str
    handle: PathHandle
    warm_gbps: float = 0.0  # single-stream rate seen at warm-up

    def tput_bytes(self, knobs: Knobs) -> int:
        """The run's size, cut for a slow path so one run takes about knobs.tput_secs."""
        if not self.warm_gbps:
            return knobs.tput_bytes
        cap = int(self.warm_gbps * 1e9 / 8 * knobs.tput_secs)
        return max(16 << 20, min(knobs.tput_bytes, cap))

    @property
    def dial(self) -> tuple[str, int]:
        return self.handle.dial

    @property
    def pids(self) -> list[int]:
        return self.handle.pids


class Registry:
    """Starts each path once (on first use), warms it up, tears all down at the end."""

    def __init__(self, dest: tuple[str, int]) -> None:
        self.dest = dest
        self.ctx = PathContext()
        self.active: dict[str, ActivePath] = {}
        self.failed: dict[str, str] = {}

    def get(self, name: str) -> ActivePath:
        if name in self.active:
            return self.active[name]
        if name in self.failed:
            pytest.fail(f"path {name} failed to start earlier: {self.failed[name]}")
        spec = PATHS[name]
        why = spec.missing()
        if why:
            pytest.skip(f"path {name}: {why}")
        try:
            h = spec.factory(self.dest, self.ctx)
            if h.teardown:
                self.ctx.on_teardown(h.teardown)
            ap = ActivePath(name, h)
            # warm-up: caches, TLS sessions, pooled connections, JIT (node)
            ap.warm_gbps = zload_client(ap.dial, "tput", 64 << 20)["gbps"]
            zload_client(ap.dial, "pp", 500, 64, 50)
            zload_client(ap.dial, "conns", 0.2, 200)
        except Exception as e:
            self.failed[name] = repr(e)
            raise
        self.active[name] = ap
        return ap

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture(scope="session")
def knobs() -> Knobs:
    return KNOBS


@pytest.fixture(scope="session")
def zload() -> str:
    return build_zload()


@pytest.fixture(scope="session")
def dest_server(zload: str) -> Iterator[tuple[str, int]]:
    """The destination every path leads to: a zload server on 127.0.0.1."""
    ctx = PathContext()
    try:
        _, line = ctx.spawn([zload, "server", "127.0.0.1:0", "64"])
        yield ("127.0.0.1", int(line.split()[1]))
    finally:
        ctx.close()


@pytest.fixture(scope="session")
def bench_paths(dest_server: tuple[str, int]) -> Iterator[Registry]:
    reg = Registry(dest_server)
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def path(request: pytest.FixtureRequest, bench_paths: Registry) -> ActivePath:
    """The path named by the (indirect) parameter, started on first use."""
    return bench_paths.get(request.param)


def interleaved(
    names: tuple[str, ...], rounds: int, metric: str | None = None
) -> list[tuple[int, str]]:
    """(round, path) pairs: each round runs every path once, in an order rotated per round.
    With ``metric``, only the paths that take part in it (PathSpec.runs)."""
    if metric is not None:
        names = tuple(n for n in names if n not in PATHS or PATHS[n].runs(metric))
    out = []
    for r in range(rounds):
        k = r % len(names)
        out += [(r, n) for n in names[k:] + names[:k]]
    return out
