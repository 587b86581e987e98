"""Data-integrity checking through anything that carries TCP (a relay, a tunnel, a forward).

Every connection gets a :class:`ConnSpec`: independent random sizes for both directions
(log-uniform from 0 to ``max_size``), random write chunking, a half-close order (the client's
FIN first, or the server's FIN first while the client still holds back the tail of its data),
and optionally an RST injected by either side (``SO_LINGER`` 0). The client sends a header,
then both sides stream deterministic payloads (:mod:`harness.payload`) at the same time. Each
receiver compares bytes in place against the expected stream and hashes them; the sender hashes
what it sent. The SHA-256 of both directions are compared per connection.

The server side is :class:`harness.servers.TransformServer` (in this process, so its results
are read directly). ``run_integrity`` drives N connections with bounded concurrency and a global
deadline and returns a :class:`Summary`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.payload import HEADER, MAGIC, ORDERS, RSTS, Stream, down_seed, up_seed

if TYPE_CHECKING:
    from harness.servers import TransformServer

Addr = tuple[str, int]
Connector = Callable[[Addr, float], socket.socket]

MiB = 1 << 20
RECV_BUF = 256 << 10
DEFAULT_CHUNK_MAX = 256 << 10
# How much the side that waits for the peer's FIN keeps back until it has seen that FIN, so
# that data really flows after a half-close.
MAX_HOLD = 256 << 10


def log_uniform(rng: random.Random, max_size: int) -> int:
    """An integer in [0, max_size], uniform in log2(size + 1)."""
    if max_size <= 0:
        return 0
    return min(max_size, round(2 ** rng.uniform(0, math.log2(max_size + 1))) - 1)


@dataclass
class ConnSpec:
    conn_id: int
    seed: int
    up_size: int
    down_size: int
    order: str = "client_fin"  # one of payload.ORDERS
    rst: str = "none"  # one of payload.RSTS
    rst_after: int = 0  # bytes the resetting side sends before its RST
    hold_up: int = 0  # client tail held until the server's FIN (order server_fin)
    hold_down: int = 0  # server tail held until the client's FIN (order client_fin)
    chunk_max: int = DEFAULT_CHUNK_MAX

    def header(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            1,
            ORDERS.index(self.order),
            RSTS.index(self.rst),
            0,
            self.conn_id,
            self.seed,
            self.up_size,
            self.down_size,
            self.rst_after,
            self.hold_up,
            self.hold_down,
        )

    @classmethod
    def from_header(cls, raw: bytes) -> ConnSpec:
        magic, _ver, order, rst, _pad, cid, seed, up, down, rst_after, hu, hd = HEADER.unpack(raw)
        if magic != MAGIC or order >= len(ORDERS) or rst >= len(RSTS):
            raise ValueError(f"bad integrity header {raw[:16]!r}")
        return cls(cid, seed, up, down, ORDERS[order], RSTS[rst], rst_after, hu, hd)


def make_specs(
    n: int,
    *,
    max_size: int = 64 * MiB,
    seed: int | None = None,
    orders: Sequence[str] = ORDERS,
    rst_fraction: float = 0.0,
    chunk_max: int = DEFAULT_CHUNK_MAX,
    first_id: int = 1,
) -> list[ConnSpec]:
    """``n`` random connection specs (reproducible for a given ``seed``)."""
    rng = random.Random(seed if seed is not None else random.getrandbits(32))
    specs = []
    for i in range(n):
        up = log_uniform(rng, max_size)
        down = log_uniform(rng, max_size)
        order = orders[i % len(orders)]
        rst = "none"
        rst_after = 0
        hold = True
        if rst_fraction and rng.random() < rst_fraction:
            rst = rng.choice(("client", "server"))
            hold = False  # the client of an RST connection waits for the server's first byte
            order = "client_fin"
            if rst == "client":
                down = max(down, 1)  # the client waits for 1 byte: the server has the header
                rst_after = rng.randint(0, up)
            else:
                rst_after = rng.randint(0, down)
        specs.append(
            ConnSpec(
                conn_id=first_id + i,
                seed=rng.getrandbits(63),
                up_size=up,
                down_size=down,
                order=order,
                rst=rst,
                rst_after=rst_after,
                hold_up=rng.randint(0, min(up, MAX_HOLD)) if hold and order == "server_fin" else 0,
                hold_down=rng.randint(0, min(down, MAX_HOLD))
                if hold and order == "client_fin"
                else 0,
                chunk_max=chunk_max,
            )
        )
    return specs


@dataclass
class SideResult:
    """What one end of a connection sent and received."""

    sent: int = 0
    sent_sha: str = ""
    received: int = 0
    received_sha: str = ""
    mismatched: int = 0  # received positions that differ from the expected stream
    first_mismatch: int | None = None
    eof: bool = False  # saw a clean FIN
    error: str | None = None  # kind: reset, timeout, broken_pipe, header, os_error
    detail: str = ""


def _error_kind(e: BaseException) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, BrokenPipeError):
        return "broken_pipe"
    if isinstance(e, OSError) and e.errno == errno.ECONNREFUSED:
        return "refused"
    if isinstance(e, OSError):
        return "os_error"
    return type(e).__name__


class _Deadline:
    def __init__(self, at: float, io_timeout: float) -> None:
        self.at = at
        self.io_timeout = io_timeout

    def apply(self, sock: socket.socket) -> None:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(min(self.io_timeout, left))


def _send_range(sock: socket.socket, stream: Stream, start: int, end: int, dl: _Deadline) -> int:
    """Send stream[start:end]; returns bytes sent (== end - start unless an exception)."""
    pos = start
    while pos < end:
        dl.apply(sock)
        pos += sock.sendmsg(stream.views(pos, end))
    return pos - start


def _send_stream(
    sock: socket.socket,
    stream: Stream,
    *,
    limit: int,
    rng: random.Random,
    chunk_max: int,
    res: SideResult,
    h: hashlib._Hash,
    dl: _Deadline,
) -> None:
    pos = res.sent
    while pos < limit:
        n = min(limit - pos, 1 + log_uniform(rng, chunk_max - 1))
        _send_range(sock, stream, pos, pos + n, dl)
        for v in stream.views(pos, pos + n):
            h.update(v)
        pos += n
        res.sent = pos


def _receive(sock: socket.socket, expect: Stream, res: SideResult, dl: _Deadline) -> None:
    """Read until EOF, comparing against ``expect`` and hashing; errors land in ``res``."""
    h = hashlib.sha256()
    buf = bytearray(RECV_BUF)
    mv = memoryview(buf)
    try:
        while True:
            dl.apply(sock)
            n = sock.recv_into(buf)
            if n == 0:
                res.eof = True
                break
            chunk = mv[:n]
            h.update(chunk)
            bad, first = expect.mismatches(chunk, res.received)
            if bad:
                res.mismatched += bad
                if res.first_mismatch is None:
                    res.first_mismatch = first
            res.received += n
    except (OSError, TimeoutError) as e:
        res.error = res.error or _error_kind(e)
        res.detail = res.detail or repr(e)
    finally:
        res.received_sha = h.hexdigest()


def _rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def run_endpoint(
    sock: socket.socket,
    *,
    send: Stream,
    expect: Stream,
    fin_first: bool,
    hold: int,
    rst: bool,
    rst_after: int,
    wait_first_byte: bool,
    chunk_seed: int,
    chunk_max: int,
    dl: _Deadline,
) -> SideResult:
    """One end of an integrity connection: stream ``send`` while reading ``expect``.

    ``fin_first``: shut down our write side as soon as all is sent. Otherwise keep the last
    ``hold`` bytes until the peer's FIN arrived. ``rst``: send ``rst_after`` bytes, then close
    with SO_LINGER 0 (an RST) without reading further (after 1 byte if ``wait_first_byte``).
    Closes ``sock``.
    """
    res = SideResult()
    h = hashlib.sha256()
    rng = random.Random(chunk_seed)
    if rst:
        try:
            if wait_first_byte:
                dl.apply(sock)
                res.received = len(sock.recv(1))
            _send_stream(
                sock,
                send,
                limit=min(rst_after, send.size),
                rng=rng,
                chunk_max=chunk_max,
                res=res,
                h=h,
                dl=dl,
            )
        except (OSError, TimeoutError) as e:
            res.error, res.detail = _error_kind(e), repr(e)
        finally:
            res.sent_sha = h.hexdigest()
            _rst_close(sock)
        return res

    peer_eof = threading.Event()
    send_err: list[BaseException] = []

    def writer() -> None:
        try:
            first_part = send.size if fin_first else send.size - hold
            _send_stream(
                sock, send, limit=first_part, rng=rng, chunk_max=chunk_max, res=res, h=h, dl=dl
            )
            if not fin_first:
                peer_eof.wait(max(0.0, dl.at - time.monotonic()))
                if not peer_eof.is_set():
                    raise TimeoutError("peer FIN never came")
                _send_stream(
                    sock,
                    send,
                    limit=send.size,
                    rng=rng,
                    chunk_max=chunk_max,
                    res=res,
                    h=h,
                    dl=dl,
                )
            sock.shutdown(socket.SHUT_WR)
        except (OSError, TimeoutError) as e:
            send_err.append(e)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # unblock our reader

    t = threading.Thread(target=writer, name="integrity-writer", daemon=True)
    t.start()
    try:
        _receive(sock, expect, res, dl)
    finally:
        peer_eof.set()  # never leave the writer waiting (its check fails if this was no FIN)
    if not res.eof:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    t.join(max(1.0, dl.at - time.monotonic()))
    res.sent_sha = h.hexdigest()
    if t.is_alive():
        res.error = res.error or "timeout"
        res.detail += " writer stuck"
    elif send_err and res.error is None:
        res.error, res.detail = _error_kind(send_err[0]), repr(send_err[0])
    sock.close()
    return res


def serve_connection(
    sock: socket.socket, io_timeout: float = 60.0
) -> tuple[ConnSpec | None, SideResult]:
    """Server side of one integrity connection (used by TransformServer)."""
    dl = _Deadline(time.monotonic() + 3600, io_timeout)
    raw = b""
    try:
        while len(raw) < HEADER.size:
            dl.apply(sock)
            b = sock.recv(HEADER.size - len(raw))
            if not b:
                break
            raw += b
        spec = ConnSpec.from_header(raw)
    except (OSError, TimeoutError, ValueError, struct.error) as e:
        sock.close()
        return None, SideResult(error="header", detail=f"{e!r} after {len(raw)} header bytes")
    res = run_endpoint(
        sock,
        send=Stream(down_seed(spec.seed), spec.down_size),
        expect=Stream(up_seed(spec.seed), spec.up_size),
        fin_first=spec.order == "server_fin",
        hold=spec.hold_down,
        rst=spec.rst == "server",
        rst_after=spec.rst_after,
        wait_first_byte=False,
        chunk_seed=spec.seed ^ 0x5EED,
        chunk_max=spec.chunk_max,
        dl=dl,
    )
    return spec, res


# ---------------------------------------------------------------- per-connection verdict
@dataclass
class ConnResult:
    spec: ConnSpec
    client: SideResult | None = None
    server: SideResult | None = None
    kind: str = "ok"
    mismatched_bytes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    def __str__(self) -> str:
        s = self.spec
        return (
            f"conn {s.conn_id} seed={s.seed} up={s.up_size} down={s.down_size} order={s.order} "
            f"rst={s.rst}/{s.rst_after}: {self.kind} {'; '.join(self.problems)} "
            f"client={self.client} server={self.server}"
        )


def _check_direction(
    name: str, sender: SideResult, receiver: SideResult, size: int, r: ConnResult
) -> None:
    """Both ends finished: the receiver must have exactly ``size`` intact bytes."""
    bad = receiver.mismatched + abs(size - receiver.received)
    if bad == 0 and receiver.received_sha != sender.sent_sha:
        bad = 1  # cannot happen unless the in-place comparison is wrong: count it anyway
    if bad == 0:
        return
    r.mismatched_bytes += bad
    r.problems.append(
        f"{name}: got {receiver.received}/{size} bytes, {receiver.mismatched} differ "
        f"(first at {receiver.first_mismatch}), sha "
        + ("equal" if receiver.received_sha == sender.sent_sha else "differs")
    )
    if r.kind == "ok":
        r.kind = (
            f"mismatch_{name}"
            if receiver.mismatched or receiver.received > size
            else f"short_{name}"
        )


def judge(r: ConnResult) -> ConnResult:
    s, c, v = r.spec, r.client, r.server
    if c is None:
        return r
    if v is None:
        if c.error in ("refused", "connect"):
            r.kind = "connect"
        else:
            r.kind = "server_missing"
            r.problems.append("the server never saw this connection's header")
        return r
    if s.rst == "none":
        for side, res in (("client", c), ("server", v)):
            if res.error:
                r.problems.append(f"{side}: {res.error} {res.detail}")
                if r.kind == "ok":
                    r.kind = res.error
            elif not res.eof:
                r.problems.append(f"{side}: no FIN")
        _check_direction("up", c, v, s.up_size, r)
        _check_direction("down", v, c, s.down_size, r)
        return r
    # An RST was injected: the other side must see a reset, and what it got must be a
    # prefix of what was sent.
    rstr, other, name = (c, v, "up") if s.rst == "client" else (v, c, "down")
    if other.mismatched or other.received > rstr.sent:
        r.kind = f"mismatch_{name}"
        r.mismatched_bytes += other.mismatched + max(0, other.received - rstr.sent)
        r.problems.append(f"{name}: received bytes are not a prefix of what was sent")
    elif other.error is None and other.eof:
        r.kind = "rst_not_propagated"
        r.problems.append(f"{name}: the peer of the RST saw a clean FIN")
    elif other.error not in ("reset", "broken_pipe", None):
        r.kind = other.error
        r.problems.append(f"{name}: {other.error} {other.detail}")
    return r


def run_one(
    addr: Addr,
    spec: ConnSpec,
    server: TransformServer,
    *,
    connect: Connector | None = None,
    io_timeout: float = 60.0,
    deadline: float | None = None,
) -> ConnResult:
    """Run one integrity connection to ``addr`` (which must lead to ``server``)."""
    t0 = time.monotonic()
    at = deadline if deadline is not None else t0 + 10 * io_timeout
    dl = _Deadline(at, io_timeout)
    r = ConnResult(spec)
    try:
        sock = (connect or _default_connect)(addr, min(io_timeout, max(0.1, at - t0)))
    except (OSError, TimeoutError) as e:
        r.client = SideResult(error="connect", detail=repr(e))
        r.kind = "connect"
        r.seconds = time.monotonic() - t0
        return r
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dl.apply(sock)
        sock.sendall(spec.header())
    except (OSError, TimeoutError) as e:
        sock.close()
        r.client = SideResult(error=_error_kind(e), detail=f"sending header: {e!r}")
    else:
        r.client = run_endpoint(
            sock,
            send=Stream(up_seed(spec.seed), spec.up_size),
            expect=Stream(down_seed(spec.seed), spec.down_size),
            fin_first=spec.order == "client_fin",
            hold=spec.hold_up,
            rst=spec.rst == "client",
            rst_after=spec.rst_after,
            wait_first_byte=spec.rst == "client",
            chunk_seed=spec.seed ^ 0xC1,
            chunk_max=spec.chunk_max,
            dl=dl,
        )
    r.server = server.wait_result(spec.conn_id, timeout=max(2.0, min(io_timeout, at - t0)))
    r.seconds = time.monotonic() - t0
    return judge(r)


def _default_connect(addr: Addr, timeout: float) -> socket.socket:
    return socket.create_connection(addr, timeout=timeout)


@dataclass
class Summary:
    n: int = 0
    ok: int = 0
    failed: int = 0
    not_run: int = 0
    mismatched_bytes: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    results: list[ConnResult] = field(default_factory=list)

    @property
    def failures(self) -> list[ConnResult]:
        return [r for r in self.results if not r.ok]

    @property
    def clean(self) -> bool:
        return self.failed == 0 and self.not_run == 0 and self.mismatched_bytes == 0

    def __str__(self) -> str:
        gb = (self.bytes_up + self.bytes_down) / 1e9
        return (
            f"{self.n} connections: {self.ok} ok, {self.failed} failed, {self.not_run} not run "
            f"(deadline); {self.mismatched_bytes} mismatched bytes; errors {self.errors_by_kind}; "
            f"{gb:.2f} GB in {self.seconds:.1f} s"
        )

    def assert_clean(self, show: int = 5) -> None:
        if not self.clean:
            lines = [str(self)] + [str(r) for r in self.failures[:show]]
            raise AssertionError("\n".join(lines))


def summarize(results: list[ConnResult], n: int, seconds: float) -> Summary:
    s = Summary(n=n, seconds=seconds, results=results)
    kinds: Counter[str] = Counter()
    for r in results:
        if r.ok:
            s.ok += 1
        else:
            s.failed += 1
            kinds[r.kind] += 1
        s.mismatched_bytes += r.mismatched_bytes
        s.bytes_up += r.server.received if r.server else 0
        s.bytes_down += r.client.received if r.client else 0
    s.not_run = n - len(results)
    if s.not_run:
        kinds["not_run"] += s.not_run
    s.errors_by_kind = dict(kinds)
    return s


def run_integrity(
    addr: Addr,
    server: TransformServer,
    n: int = 100,
    *,
    max_size: int = 64 * MiB,
    concurrency: int = 8,
    deadline: float = 120.0,
    io_timeout: float = 30.0,
    seed: int | None = None,
    orders: Sequence[str] = ORDERS,
    rst_fraction: float = 0.0,
    chunk_max: int = DEFAULT_CHUNK_MAX,
    connect: Connector | None = None,
    specs: list[ConnSpec] | None = None,
) -> Summary:
    """Drive ``n`` integrity connections through ``addr`` to ``server``.

    At most ``concurrency`` at a time; connections not started within ``deadline`` seconds are
    counted as not run. ``connect(addr, timeout)`` makes the client socket (e.g. inside a netns
    node: ``node.connect``). Returns a :class:`Summary`; call ``.assert_clean()`` in tests.
    """
    if specs is None:
        specs = make_specs(
            n,
            max_size=max_size,
            seed=seed,
            orders=orders,
            rst_fraction=rst_fraction,
            chunk_max=chunk_max,
            first_id=server.next_conn_ids(n),
        )
    t0 = time.monotonic()
    at = t0 + deadline
    results: list[ConnResult] = []
    lock = threading.Lock()

    def one(spec: ConnSpec) -> None:
        if time.monotonic() >= at:
            return
        r = run_one(addr, spec, server, connect=connect, io_timeout=io_timeout, deadline=at)
        with lock:
            results.append(r)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="integrity") as ex:
        for f in [ex.submit(one, s) for s in specs]:
            f.result()
    results.sort(key=lambda r: r.spec.conn_id)
    return summarize(results, len(specs), time.monotonic() - t0)
