"""Small helpers for the mTLS tests: event and log capture, loopback servers, TLS peers.

Everything here is deliberately tiny and thread-based; every wait is bounded. The
two-node test uses the shared harness (tests/harness); the loopback tests use these.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ztun import Forward, Listener, Svid, Tunnel
from ztun.events import ConnectionEvent
from ztun.testing import SpiffeCA

Addr = tuple[str, int]
LOOPBACK = "127.0.0.1"
IO_TIMEOUT = 10.0  # no single socket operation in these tests should take longer

SERVER_ID = "spiffe://example.org/ns/default/sa/server"
CLIENT_ID = "spiffe://example.org/ns/default/sa/client"
AEAD_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"}


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


# ---- engine events and log lines ------------------------------------------------------------


class Events:
    """Every ConnectionEvent of a tunnel, with bounded waits."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._cv = threading.Condition()
        self.items: list[ConnectionEvent] = []
        self.unsubscribe = tunnel.subscribe(self._on)

    def _on(self, ev: ConnectionEvent) -> None:
        with self._cv:
            self.items.append(ev)
            self._cv.notify_all()

    def closes(self, listener_id: int | None = None) -> list[ConnectionEvent]:
        with self._cv:
            return self._closes(listener_id)

    def opens(self, listener_id: int | None = None) -> list[ConnectionEvent]:
        with self._cv:
            return [
                e
                for e in self.items
                if e.kind == "open" and (listener_id is None or e.listener_id == listener_id)
            ]

    def wait_closes(
        self, n: int = 1, listener_id: int | None = None, timeout: float = 5.0
    ) -> list[ConnectionEvent]:
        """Block until ``n`` close events (of ``listener_id``) arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(got := self._closes(listener_id)) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"expected {n} close events (listener {listener_id}), got {len(got)}: "
                        f"{[(e.reason, e.detail) for e in got]}"
                    )
                self._cv.wait(left)
            return got

    def _closes(self, listener_id: int | None) -> list[ConnectionEvent]:
        return [
            e
            for e in self.items
            if e.kind == "close" and (listener_id is None or e.listener_id == listener_id)
        ]


@dataclass
class LogRecord:
    logger: str
    level: int
    message: str


class LogCapture(logging.Handler):
    """Records of ``ztun.engine`` and ``ztun.access`` (enabled at INFO while attached)."""

    NAMES = ("ztun.engine", "ztun.access")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[LogRecord] = []
        self._saved: list[tuple[logging.Logger, int]] = []
        self._mu = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._mu:
            self.records.append(LogRecord(record.name, record.levelno, record.getMessage()))

    def attach(self) -> LogCapture:
        for name in self.NAMES:
            lg = logging.getLogger(name)
            self._saved.append((lg, lg.level))
            lg.setLevel(logging.INFO)
            lg.addHandler(self)
        return self

    def detach(self) -> None:
        for lg, level in self._saved:
            lg.removeHandler(self)
            lg.setLevel(level)
        self._saved.clear()

    def lines(self, logger: str, level: int = logging.DEBUG) -> list[str]:
        with self._mu:
            return [r.message for r in self.records if r.logger == logger and r.level >= level]


# ---- the test bench ------------------------------------------------------------------------------


@dataclass
class Env:
    """What most tests need (see the ``env`` fixture)."""

    ca: SpiffeCA
    server_svid: Svid
    client_svid: Svid
    logs: LogCapture
    echo: ThreadServer
    tunnel: Callable[..., tuple[Tunnel, Events]]

    def pair(
        self, backend: Addr | None = None, **kw: Any
    ) -> tuple[Tunnel, Events, Listener, Tunnel, Events, Forward]:
        """A server tunnel listening in front of ``backend`` (default: the echo server) and
        a client tunnel whose forward expects the server's ID:
        app -> forward -> mTLS -> listen -> backend."""
        ts, es = self.tunnel(self.server_svid, self.ca.bundle, **kw)
        lst = ts.listen((LOOPBACK, 0), backend or self.echo.address)
        tc, ec = self.tunnel(self.client_svid, self.ca.bundle, **kw)
        fwd = tc.forward((LOOPBACK, 0), lst.address, expect=[SERVER_ID])
        return ts, es, lst, tc, ec, fwd


# ---- loopback servers ---------------------------------------------------------------------------


class ThreadServer:
    """A TCP listener on loopback calling ``handler(conn)`` in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = LOOPBACK) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(256)
        self.address: Addr = self.sock.getsockname()[:2]
        self.handler = handler
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._stop:
                conn.close()
                return
            self.accepted += 1
            conn.settimeout(IO_TIMEOUT)
            th = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(th)
            th.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except BaseException as e:  # reported by the test that owns the server
            self.errors.append(e)
        finally:
            conn.close()

    def join(self, timeout: float = IO_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for th in list(self._threads):
            th.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._acceptor.join(2)
        self.join(2)

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def echo_handler(conn: socket.socket) -> None:
    """Echo until EOF, then close (FIN)."""
    while data := conn.recv(256 * 1024):
        conn.sendall(data)


def recv_all(sock: socket.socket | ssl.SSLSocket, limit: int = 64 << 20) -> bytes:
    """Read until EOF (bounded by the socket's timeout and ``limit`` bytes)."""
    parts = []
    total = 0
    while total < limit:
        data = sock.recv(256 * 1024)
        if not data:
            break
        parts.append(data)
        total += len(data)
    return b"".join(parts)


def recv_exact(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(min(256 * 1024, n - len(buf)))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def connect(addr: Addr, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A blocking TCP connection with a timeout on every later operation."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(addr)
    return s


def rst_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def outcome(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; return its value or the exception it raised (for peer-side checks)."""
    try:
        return fn()
    except Exception as e:
        return e


# ---- TLS peers (Python's ssl module) -------------------------------------------------------------


def client_context(
    trust_pem: bytes | None, cert: Any | None = None, *, tls12_only: bool = False
) -> ssl.SSLContext:
    """A Python TLS client: verifies the server against ``trust_pem`` (no hostname check:
    SVIDs carry no DNS names) and presents ``cert`` (an IssuedCert or Svid-like) if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if trust_pem is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=trust_pem.decode())
    if cert is not None:
        load_cert(ctx, cert)
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(
    cert: Any, trust_pem: bytes | None, *, tls12_only: bool = False
) -> ssl.SSLContext:
    """A Python TLS server presenting ``cert``; requires a client certificate when
    ``trust_pem`` is given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_cert(ctx, cert)
    if trust_pem is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=trust_pem.decode())
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def load_cert(ctx: ssl.SSLContext, cert: Any) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ztun-mtls-") as d:
        chain = f"{d}/chain.pem"
        key = f"{d}/key.pem"
        with open(chain, "wb") as f:
            f.write(cert.chain_pem())
        with open(key, "wb") as f:
            f.write(cert.key_pem())
        ctx.load_cert_chain(chain, key)


def peer_uri_sans(tls: ssl.SSLSocket) -> list[str]:
    """URI SANs of the verified peer certificate, as Python's ssl module reports them."""
    cert = tls.getpeercert()
    assert cert, "the peer presented no (verified) certificate"
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]


def peer_serial(tls: ssl.SSLSocket) -> str:
    from cryptography import x509

    der = tls.getpeercert(binary_form=True)
    assert der, "no peer certificate"
    return f"{x509.load_der_x509_certificate(der).serial_number:x}"


def client_hello(n: int | None = None) -> bytes:
    """The first bytes of a real TLS 1.3 ClientHello made by Python's ssl module."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    return hello if n is None else hello[:n]


# ---- deterministic payloads ------------------------------------------------------------------


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
