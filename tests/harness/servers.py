"""Threaded TCP test servers: echo, sink, transform (integrity peer).

Each server listens on ``(host, port)`` (127.0.0.1, ::1 or a netns node's address) or on a
listening socket you pass (``sock=node.listen()`` puts it inside a node), serves each
connection on its own thread, counts accepted connections (``accepted``: what a policy test
checks on the destination), and is a context manager. ``stop()`` closes the listener and every
live connection and joins the threads (bounded), so nothing leaks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType

from harness.integrity import ConnSpec, SideResult, serve_connection

log = logging.getLogger(__name__)
Addr = tuple[str, int]


def listen_socket(host: str = "127.0.0.1", port: int = 0, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket on (host, port); IPv6 when ``host`` contains ':'."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    return s


class TcpServer:
    """Base class: accept loop + one thread per connection. Subclasses implement ``handle``."""

    kind = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        backlog: int = 1024,
        io_timeout: float = 60.0,
    ) -> None:
        self._lsock = sock if sock is not None else listen_socket(host, port, backlog)
        self.io_timeout = io_timeout
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._accepted = 0
        self._closed_conns = 0
        self._acceptor: threading.Thread | None = None
        self.errors: list[str] = []
        self._setup()

    def _setup(self) -> None:
        """Subclass state (called at the end of __init__)."""

    # -------------------------------------------------------------- public
    @property
    def address(self) -> Addr:
        a = self._lsock.getsockname()
        return (a[0], a[1])

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._accepted

    @property
    def active(self) -> int:
        """Connections accepted and not yet finished."""
        with self._lock:
            return len(self._conns)

    def wait_accepted(self, n: int, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.accepted >= n:
                return True
            time.sleep(0.005)
        return self.accepted >= n

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no connection is being served."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.active == 0:
                return True
            time.sleep(0.005)
        return self.active == 0

    def start(self) -> TcpServer:
        if self._acceptor is None:
            self._lsock.settimeout(0.2)  # the accept loop polls the stop flag
            self._acceptor = threading.Thread(
                target=self._accept_loop, name=f"{self.kind}-accept", daemon=True
            )
            self._acceptor.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._lsock.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        end = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        for c in conns:
            with contextlib.suppress(OSError):
                c.close()
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            log.warning("%s: %d handler threads still alive after stop", self.kind, len(stuck))

    def __enter__(self) -> TcpServer:
        return self.start()

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------- internals
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)  # EMFILE and friends: back off, keep serving
                continue
            conn.settimeout(self.io_timeout)
            t = threading.Thread(target=self._run, args=(conn, peer), daemon=True)
            with self._lock:
                self._accepted += 1
                self._conns.add(conn)
                self._threads.add(t)
            t.name = f"{self.kind}-conn-{self._accepted}"
            t.start()

    def _run(self, conn: socket.socket, peer: tuple[object, ...]) -> None:
        try:
            self.handle(conn, peer)
        except (OSError, TimeoutError) as e:
            if not self._stopping.is_set():
                self.errors.append(repr(e))
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
                self._closed_conns += 1

    def handle(self, conn: socket.socket, peer: tuple[object, ...]) -> None:
        raise NotImplementedError


class EchoServer(TcpServer):
    """Echoes every byte; answers the client's FIN with its own once all is echoed."""

    kind = "echo"

    def _setup(self) -> None:
        self.bytes_echoed = 0

    def handle(self, conn: socket.socket, peer: tuple[object, ...]) -> None:
        buf = bytearray(256 << 10)
        mv = memoryview(buf)
        total = 0
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                break
            conn.sendall(mv[:n])
            total += n
        conn.shutdown(socket.SHUT_WR)
        with self._lock:
            self.bytes_echoed += total


@dataclass
class SinkResult:
    peer: tuple[object, ...]
    received: int
    sha256: str


class SinkServer(TcpServer):
    """Reads until EOF, then replies with the count (8 bytes, big-endian) and SHA-256 digest
    (32 bytes) of what it got, and closes. Results are also kept in ``results``."""

    kind = "sink"
    REPLY = struct.Struct("!Q32s")

    def _setup(self) -> None:
        self.results: list[SinkResult] = []

    def handle(self, conn: socket.socket, peer: tuple[object, ...]) -> None:
        h = hashlib.sha256()
        buf = bytearray(256 << 10)
        mv = memoryview(buf)
        total = 0
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                break
            h.update(mv[:n])
            total += n
        with self._lock:
            self.results.append(SinkResult(peer, total, h.hexdigest()))
        conn.sendall(self.REPLY.pack(total, h.digest()))
        conn.shutdown(socket.SHUT_WR)

    @classmethod
    def send_and_verify(cls, sock: socket.socket, data: bytes) -> tuple[int, str]:
        """Client helper: send ``data``, half-close, return the sink's (count, sha256 hex)."""
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        raw = b""
        while len(raw) < cls.REPLY.size:
            b = sock.recv(cls.REPLY.size - len(raw))
            if not b:
                break
            raw += b
        n, digest = cls.REPLY.unpack(raw)
        return n, digest.hex()


class TransformServer(TcpServer):
    """The integrity peer (see :mod:`harness.integrity`): reads the client's header, then
    streams back an independent deterministic payload while checking the client's. Results are
    kept by connection id (``wait_result``)."""

    kind = "transform"

    def _setup(self) -> None:
        self._results: dict[int, SideResult] = {}
        self.bad_headers: list[SideResult] = []
        self._cond = threading.Condition()
        self._next_id = 1

    def next_conn_ids(self, n: int) -> int:
        """Reserve ``n`` connection ids; returns the first one."""
        with self._cond:
            first = self._next_id
            self._next_id += n
            return first

    def handle(self, conn: socket.socket, peer: tuple[object, ...]) -> None:
        spec, res = serve_connection(conn, self.io_timeout)
        with self._cond:
            if spec is None:
                self.bad_headers.append(res)
            else:
                self._results[spec.conn_id] = res
            self._cond.notify_all()

    def wait_result(self, conn_id: int, timeout: float = 10.0) -> SideResult | None:
        end = time.monotonic() + timeout
        with self._cond:
            while conn_id not in self._results:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._results.pop(conn_id)


__all__ = [
    "ConnSpec",
    "EchoServer",
    "SinkResult",
    "SinkServer",
    "TcpServer",
    "TransformServer",
    "listen_socket",
]
