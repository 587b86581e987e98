"""Benchmark fixtures: the zload tool (built on demand), the destination server, the path
registry (bench/paths.py) with lazily started, cached paths, and the knobs.

Knobs (environment):
  ZTUN_BENCH_QUICK=1       short run (2 rounds, smaller transfers) for a smoke test
  ZTUN_BENCH_ROUNDS=N      rounds; each round runs every path once per metric, order rotated
  ZTUN_BENCH_INNER=N       pedantic rounds inside one test (default 1)
  ZTUN_BENCH_BYTES=N       bytes per throughput run (default 1 GiB, quick 256 MiB)
  ZTUN_BENCH_PATHS=a,b     only these paths (direct is always added: ratios need it)
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


def zload_client(dial: tuple[str, int], *args: object, timeout: float = 120.0) -> dict[str, float]:
    """Run one zload client measurement against ``dial``; its JSON result."""
    host = f"[{dial[0]}]" if ":" in dial[0] else dial[0]
    out = subprocess.run(
        [ZLOAD_BIN, "client", f"{host}:{dial[1]}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
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


@dataclass
class ActivePath:
    name: str
    handle: PathHandle

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
            zload_client(ap.dial, "tput", 64 << 20)
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


def interleaved(names: tuple[str, ...], rounds: int) -> list[tuple[int, str]]:
    """(round, path) pairs: each round runs every path once, in an order rotated per round."""
    out = []
    for r in range(rounds):
        k = r % len(names)
        out += [(r, n) for n in names[k:] + names[:k]]
    return out
