"""A tiny threaded pure-Python TCP relay, with optional fault injection.

It carries half-close (FIN -> shutdown(SHUT_WR)) and RST (a reset on one side becomes an RST
on the other). It exists to test the harness itself (a relay that corrupts or drops one byte
must be caught by the integrity checker) and as a stand-in relay in harness self-tests; it is
not a baseline for benchmarks (see bench/tools/pyrelay.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType

from harness.servers import listen_socket

Addr = tuple[str, int]


@dataclass
class Fault:
    """Damage one connection: ``kind`` "flip" (xor 0xff one byte), "drop" (one byte) or
    "truncate" (FIN at ``offset``, the rest is read and discarded)."""

    kind: str = "flip"
    direction: str = "up"  # "up" client->server, "down" server->client
    conn: int = 1  # 1-based index of the accepted connection
    offset: int = 0  # stream offset of the damaged byte (after the first bytes of the stream)


_libc = ctypes.CDLL(None, use_errno=True)


def send_rst(sock: socket.socket) -> None:
    """Reset a connected TCP socket now, even while another thread blocks on it.

    connect() with AF_UNSPEC disconnects: the kernel sends an RST and wakes blocked readers
    and writers with ECONNRESET (closing with SO_LINGER 0 would wait for those threads).
    """
    sa = (ctypes.c_ubyte * 16)()  # sa_family = AF_UNSPEC (0)
    _libc.connect(sock.fileno(), ctypes.byref(sa), ctypes.sizeof(sa))


TCP_CLOSE = 7  # after an RST; a FIN leaves CLOSE_WAIT (8)


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (first byte of TCP_INFO), -1 if unknown."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return -1


class PyRelay:
    def __init__(
        self,
        to: Addr,
        listen: Addr = ("127.0.0.1", 0),
        fault: Fault | None = None,
        rst_as_fin: bool = False,
    ) -> None:
        self.to = to
        self.fault = fault
        self.rst_as_fin = rst_as_fin  # a broken relay: turns a reset into a FIN
        self._lsock = listen_socket(*listen)
        self._lsock.settimeout(0.2)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._fin_sent: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self.faults_applied = 0
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="pyrelay")

    @property
    def address(self) -> Addr:
        a = self._lsock.getsockname()
        return (a[0], a[1])

    def start(self) -> PyRelay:
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._lsock.close()
        self._acceptor.join(timeout)
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout)
        for s in socks:
            s.close()

    def __enter__(self) -> PyRelay:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                a, _ = self._lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                idx = self.accepted
            t = threading.Thread(target=self._conn, args=(a, idx), daemon=True)
            with self._lock:
                self._threads.append(t)
            t.start()

    def _conn(self, a: socket.socket, idx: int) -> None:
        try:
            b = socket.create_connection(self.to, timeout=10)
        except OSError:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            a.close()
            return
        a.settimeout(None)
        b.settimeout(None)
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._socks.update((a, b))
        f = self.fault if self.fault and self.fault.conn == idx else None
        t = threading.Thread(
            target=self._pump, args=(b, a, f if f and f.direction == "down" else None), daemon=True
        )
        t.start()
        self._pump(a, b, f if f and f.direction == "up" else None)
        t.join()
        with self._lock:
            self._socks.difference_update((a, b))
            self._fin_sent.difference_update((a, b))
        a.close()
        b.close()

    def _reset(self, sock: socket.socket) -> None:
        if self.rst_as_fin:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        else:
            send_rst(sock)

    def _pump(self, src: socket.socket, dst: socket.socket, fault: Fault | None) -> None:
        pos = 0
        while True:
            try:
                data = src.recv(65536)
            except ConnectionResetError:
                self._reset(dst)  # carry the RST
                return
            except OSError:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_RDWR)
                return
            n = len(data)
            if not data:
                with self._lock:
                    # CLOSE without our FIN on src: a reset whose error the other pump consumed
                    reset = src not in self._fin_sent and tcp_state(src) == TCP_CLOSE
                    if not reset:
                        self._fin_sent.add(dst)
                if reset:
                    self._reset(dst)
                else:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                return
            if fault is not None and pos <= fault.offset < pos + n:
                i = fault.offset - pos
                if fault.kind == "flip":
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                elif fault.kind == "drop":
                    data = data[:i] + data[i + 1 :]
                with self._lock:
                    self.faults_applied += 1
                if fault.kind == "truncate":
                    with contextlib.suppress(OSError):
                        dst.sendall(data[:i])
                        dst.shutdown(socket.SHUT_WR)
                    with contextlib.suppress(OSError):
                        while src.recv(65536):
                            pass
                    return
            pos += n
            try:
                dst.sendall(data)
            except OSError:
                send_rst(src)  # the destination went away: reset the source
                return
