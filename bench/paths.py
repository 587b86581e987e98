"""The benchmark path registry: every way of carrying a TCP connection to the destination
server that the benchmarks compare.

A path is a factory ``(dest, ctx) -> PathHandle``: given the destination ``(host, port)``
and a :class:`PathContext` (temporary dir, test certificates, ``ctx.spawn()`` for helper
processes, torn down automatically), it returns the address to dial, the pids whose CPU time
counts as the tunnel's, and an optional extra teardown. Register one with ``@path("name")``;
``requires=`` returns a reason to skip (or None). The order of registration is the order of
the report. To add a ztun path, write one more factory here (see ``ztun_forward``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "bench", "tools")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from harness.certs import Leaf, TestCA  # noqa: E402

Addr = tuple[str, int]


@dataclass
class PathHandle:
    dial: Addr
    # processes whose CPU and memory count as the tunnel's; pairs: [client side, server side]
    pids: list[int] = field(default_factory=list)
    teardown: Callable[[], None] | None = None
    # ztun paths: the engines' counters, one dict per process (handshakes, resumptions)
    stats: Callable[[], list[dict[str, object]]] | None = None


@dataclass
class PathSpec:
    name: str
    factory: Callable[[Addr, PathContext], PathHandle]
    description: str
    requires: Callable[[], str | None] | None = None
    # None: every metric; else only these (e.g. a variant that matters for handshakes only)
    metrics: tuple[str, ...] | None = None
    # a TLS handshake per client connection (the handshake-rate metric applies)
    tls_per_conn: bool = False

    def missing(self) -> str | None:
        return self.requires() if self.requires else None

    def runs(self, metric: str) -> bool:
        if metric == "handshakes" and not self.tls_per_conn:
            return False
        return self.metrics is None or metric in self.metrics


PATHS: dict[str, PathSpec] = {}


def path(
    name: str,
    *,
    description: str = "",
    requires: Callable[[], str | None] | None = None,
    metrics: tuple[str, ...] | None = None,
    tls_per_conn: bool = False,
) -> Callable[
    [Callable[[Addr, PathContext], PathHandle]], Callable[[Addr, PathContext], PathHandle]
]:
    """Register a path factory under ``name``."""

    def deco(
        fn: Callable[[Addr, PathContext], PathHandle],
    ) -> Callable[[Addr, PathContext], PathHandle]:
        if name in PATHS:
            raise ValueError(f"path {name!r} registered twice")
        PATHS[name] = PathSpec(
            name,
            fn,
            description or (fn.__doc__ or "").strip(),
            requires,
            metrics,
            tls_per_conn,
        )
        return fn

    return deco


@dataclass
class Certs:
    ca: str
    client: Leaf
    server: Leaf


class PathContext:
    """What factories get: a temp dir, certs, and process spawning with automatic teardown."""

    def __init__(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="ztun-bench-")
        self._certs: Certs | None = None
        self._procs: list[subprocess.Popen[str]] = []
        self._teardowns: list[Callable[[], None]] = []
        self.python = sys.executable

    @property
    def certs(self) -> Certs:
        """A CA and two SPIFFE leaf certificates (ECDSA P-256), made once per session."""
        if self._certs is None:
            ca = TestCA(os.path.join(self.tmpdir, "certs"))
            self._certs = Certs(
                ca.ca,
                ca.issue("client", ca.spiffe("bench", "client")),
                ca.issue("server", ca.spiffe("bench", "server")),
            )
        return self._certs

    def spawn(
        self,
        argv: list[str],
        *,
        ready: str | None = "READY",
        wait_for: Addr | None = None,
        timeout: float = 20.0,
        env: dict[str, str] | None = None,
    ) -> tuple[subprocess.Popen[str], str]:
        """Start a helper; wait for a first stdout line starting with ``ready`` (returned) or
        until ``wait_for`` accepts connections. stdin is a pipe: helpers that watch it exit
        when this process dies. Killed at teardown."""
        name = f"{os.path.basename(argv[0])}-{len(self._procs)}.log"
        log = open(os.path.join(self.tmpdir, name), "w")  # noqa: SIM115 (closed at teardown)
        p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if ready else log,
            stderr=log,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=self.tmpdir,
        )
        self._procs.append(p)
        self._teardowns.append(log.close)
        line = ""
        if ready:
            assert p.stdout is not None
            line = _readline(p, timeout)
            if not line.startswith(ready):
                raise RuntimeError(f"{argv[0]} did not start: {line!r}; log {log.name}")
        if wait_for is not None:
            wait_listening(wait_for, timeout, p)
        return p, line.strip()

    def on_teardown(self, fn: Callable[[], None]) -> None:
        self._teardowns.append(fn)

    def close(self) -> None:
        for p in reversed(self._procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self._procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        for fn in reversed(self._teardowns):
            with contextlib.suppress(Exception):
                fn()
        self._procs, self._teardowns = [], []
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _readline(p: subprocess.Popen[str], timeout: float) -> str:
    import selectors

    assert p.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return f"<no output in {timeout} s>"
    return p.stdout.readline()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(addr: Addr, timeout: float, proc: subprocess.Popen[str] | None = None) -> None:
    end = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before listening on {addr}")
        try:
            socket.create_connection(addr, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.02)


def fmt(addr: Addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


# ------------------------------------------------------------------------ baselines
@path("direct", description="direct loopback TCP (no relay)")
def direct(dest: Addr, ctx: PathContext) -> PathHandle:
    return PathHandle(dest)


@path("asyncio", description="plain Python asyncio relay (plaintext, one process)")
def asyncio_relay(dest: Addr, ctx: PathContext) -> PathHandle:
    p, line = ctx.spawn([ctx.python, os.path.join(TOOLS, "pyrelay.py"), "--to", fmt(dest)])
    return PathHandle(("127.0.0.1", int(line.split()[1])), [p.pid])


@path(
    "asyncio_tls",
    description="Python asyncio + ssl relay pair, mutual TLS 1.3",
    tls_per_conn=True,
)
def asyncio_tls(dest: Addr, ctx: PathContext) -> PathHandle:
    c = ctx.certs
    relay = os.path.join(TOOLS, "pyrelay.py")
    srv, line = ctx.spawn(
        [
            ctx.python,
            relay,
            "--to",
            fmt(dest),
            "--accept-tls",
            f"{c.server.chain},{c.server.key},{c.ca}",
        ]
    )
    mid = ("127.0.0.1", int(line.split()[1]))
    cli, line = ctx.spawn(
        [
            ctx.python,
            relay,
            "--to",
            fmt(mid),
            "--connect-tls",
            f"{c.client.chain},{c.client.key},{c.ca},{c.server.spiffe_id}",
        ]
    )
    return PathHandle(("127.0.0.1", int(line.split()[1])), [cli.pid, srv.pid])


def _stunnel_missing() -> str | None:
    return None if shutil.which("stunnel4") or shutil.which("stunnel") else "stunnel not installed"


STUNNEL_COMMON = """foreground = yes
pid =
syslog = no
debug = 3
sslVersionMin = TLSv1.3
ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""


@path(
    "stunnel",
    description="stunnel mutual TLS 1.3 pair (verify chain both ways; its session cache on)",
    requires=_stunnel_missing,
    tls_per_conn=True,
)
def stunnel(dest: Addr, ctx: PathContext) -> PathHandle:
    exe = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel"
    c = ctx.certs
    pids = []
    dial: Addr = ("127.0.0.1", 0)
    for attempt in range(5):  # free ports are picked ahead: retry if one got taken
        mid = ("127.0.0.1", free_port())
        dial = ("127.0.0.1", free_port())
        srv_conf = os.path.join(ctx.tmpdir, f"stunnel-server-{attempt}.conf")
        cli_conf = os.path.join(ctx.tmpdir, f"stunnel-client-{attempt}.conf")
        with open(srv_conf, "w") as f:
            f.write(
                STUNNEL_COMMON
                + f"""[server]
accept = {fmt(mid)}
connect = {fmt(dest)}
cert = {c.server.chain}
key = {c.server.key}
CAfile = {c.ca}
verifyChain = yes
requireCert = yes
"""
            )
        with open(cli_conf, "w") as f:
            f.write(
                STUNNEL_COMMON
                + f"""[client]
client = yes
accept = {fmt(dial)}
connect = {fmt(mid)}
cert = {c.client.chain}
key = {c.client.key}
CAfile = {c.ca}
verifyChain = yes
"""
            )
        try:
            s, _ = ctx.spawn([exe, srv_conf], ready=None, wait_for=mid)
            k, _ = ctx.spawn([exe, cli_conf], ready=None, wait_for=dial)
            pids = [k.pid, s.pid]
            break
        except (RuntimeError, OSError):
            if attempt == 4:
                raise
    return PathHandle(dial, pids)


def _node_missing() -> str | None:
    return None if shutil.which("node") else "node not installed"


@path(
    "node_h2",
    description="Node http2 CONNECT over mutual TLS 1.3 pair (HBONE-like)",
    requires=_node_missing,
)
def node_h2(dest: Addr, ctx: PathContext) -> PathHandle:
    c = ctx.certs
    js = os.path.join(TOOLS, "h2connect.js")
    srv, line = ctx.spawn(
        [
            "node",
            js,
            "server",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            c.server.chain,
            "--key",
            c.server.key,
            "--ca",
            c.ca,
        ]
    )
    mid = ("127.0.0.1", int(line.split()[1]))
    cli, line = ctx.spawn(
        [
            "node",
            js,
            "client",
            "--listen",
            "127.0.0.1:0",
            "--to",
            fmt(mid),
            "--target",
            fmt(dest),
            "--cert",
            c.client.chain,
            "--key",
            c.client.key,
            "--ca",
            c.ca,
            "--peer-id",
            c.server.spiffe_id,
        ]
    )
    return PathHandle(("127.0.0.1", int(line.split()[1])), [cli.pid, srv.pid])


def _ztun_missing() -> str | None:
    try:
        from ztun import Tunnel  # noqa: F401
    except ImportError as e:
        return f"ztun.Tunnel is not importable yet ({e})"
    return None


ZTUN_PATH = os.path.join(TOOLS, "ztun_path.py")


def _ztun(ctx: PathContext, role: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    """Start one ztun end (bench/tools/ztun_path.py); its process and port."""
    p, line = ctx.spawn([ctx.python, ZTUN_PATH, role, *args], timeout=30)
    return p, int(line.split()[1])


def _stats_of(procs: list[subprocess.Popen[str]]) -> Callable[[], list[dict[str, object]]]:
    """Ask each ztun_path.py process for its counters (a "stats" line on its stdin)."""

    def read() -> list[dict[str, object]]:
        out = []
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("stats\n")
            p.stdin.flush()
            out.append(json.loads(_readline(p, 10)))
        return out

    return read


def _tls_args(leaf: Leaf, ca: str) -> list[str]:
    return ["--cert", leaf.chain, "--key", leaf.key, "--ca", ca]


@path(
    "ztun_forward",
    description="ztun plaintext forward (Tunnel.forward, own process)",
    requires=_ztun_missing,
)
def ztun_forward(dest: Addr, ctx: PathContext) -> PathHandle:
    p, port = _ztun(ctx, "forward", "--to", fmt(dest))
    return PathHandle(("127.0.0.1", port), [p.pid], stats=_stats_of([p]))


def _ztun_mtls(dest: Addr, ctx: PathContext, *extra: str) -> PathHandle:
    c = ctx.certs
    srv, mid = _ztun(ctx, "mtls-server", "--to", fmt(dest), *_tls_args(c.server, c.ca), *extra)
    cli, port = _ztun(
        ctx,
        "mtls-client",
        "--to",
        f"127.0.0.1:{mid}",
        "--expect",
        c.server.spiffe_id,
        *_tls_args(c.client, c.ca),
        *extra,
    )
    return PathHandle(("127.0.0.1", port), [cli.pid, srv.pid], stats=_stats_of([cli, srv]))


@path(
    "ztun_mtls",
    description="ztun mutual TLS 1.3 pair: forward(expect=...) -> listen(), two processes, "
    "session resumption on (the default)",
    requires=_ztun_missing,
    tls_per_conn=True,
)
def ztun_mtls(dest: Addr, ctx: PathContext) -> PathHandle:
    return _ztun_mtls(dest, ctx)


@path(
    "ztun_mtls_full",
    description="the ztun mTLS pair with resumption off: every connection a full handshake",
    requires=_ztun_missing,
    metrics=("connrate", "handshakes"),
    tls_per_conn=True,
)
def ztun_mtls_full(dest: Addr, ctx: PathContext) -> PathHandle:
    return _ztun_mtls(dest, ctx, "--no-resume")


@path(
    "ztun_hbone",
    description="ztun HBONE pair: forward(expect=..., via=hop) -> HTTP/2 CONNECT over pooled "
    "mTLS -> serve(deliver=False), two processes",
    requires=_ztun_missing,
)
def ztun_hbone(dest: Addr, ctx: PathContext) -> PathHandle:
    c = ctx.certs
    srv, hb = _ztun(ctx, "hbone-in", "--workload", dest[0], *_tls_args(c.server, c.ca))
    cli, port = _ztun(
        ctx,
        "hbone-out",
        "--to",
        f"127.0.0.1:{hb}",
        "--target",
        fmt(dest),
        "--expect",
        c.server.spiffe_id,
        *_tls_args(c.client, c.ca),
    )
    return PathHandle(("127.0.0.1", port), [cli.pid, srv.pid], stats=_stats_of([cli, srv]))
