"""Helpers for the engine tests: bounded waits, event collection, kernel socket queues,
process memory, and tunnels started inside netns nodes."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ztun import Tunnel, TunnelStats
from ztun.events import ConnectionEvent

T = TypeVar("T")
Addr = tuple[str, int]


def wait_until(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.01) -> T:
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` passes
    (then the last falsy value is returned: assert on it)."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(interval)


def wait_closed(t: Tunnel, n: int, timeout: float = 10.0) -> TunnelStats:
    """Wait until the engine counted ``n`` closed connections; the stats then."""
    wait_until(lambda: t.stats().connections_closed >= n, timeout)
    return t.stats()


class Events:
    """Collects a tunnel's connection events (``t.subscribe(events)``), with bounded waits."""

    def __init__(self) -> None:
        self.items: list[ConnectionEvent] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, ev: ConnectionEvent) -> None:
        with self._cond:
            self.items.append(ev)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def closes(self) -> list[ConnectionEvent]:
        with self._cond:
            return [e for e in self.items if e.kind == "close"]

    def wait(self, pred: Callable[[list[ConnectionEvent]], bool], timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while not pred(self.items):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_closes(self, n: int, timeout: float = 10.0) -> list[ConnectionEvent]:
        self.wait(lambda items: sum(e.kind == "close" for e in items) >= n, timeout)
        return self.closes()


# ------------------------------------------------------------------ sockets
def rst_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_outcome(
    sock: socket.socket, timeout: float = 5.0, limit: int = 1 << 30
) -> tuple[str, int]:
    """Read until EOF, reset or timeout: ("eof" | "reset" | "timeout" | "error:<errno>", bytes)."""
    sock.settimeout(timeout)
    n = 0
    try:
        while n < limit:
            b = sock.recv(1 << 16)
            if not b:
                return "eof", n
            n += len(b)
    except ConnectionResetError:
        return "reset", n
    except TimeoutError:
        return "timeout", n
    except OSError as e:
        return f"error:{errno.errorcode.get(e.errno or 0, e.errno)}", n
    return "limit", n


def write_outcome(
    sock: socket.socket, timeout: float = 5.0, total: int = 64 << 20
) -> tuple[str, int]:
    """Write until ``total`` bytes went out, the peer is gone, or timeout."""
    sock.settimeout(timeout)
    chunk = b"w" * (64 << 10)
    n = 0
    try:
        while n < total:
            n += sock.send(chunk)
    except (ConnectionResetError, BrokenPipeError):
        return "reset", n
    except TimeoutError:
        return "timeout", n
    return "done", n


def accept_one(lsock: socket.socket, timeout: float = 5.0) -> socket.socket:
    lsock.settimeout(timeout)
    c, _ = lsock.accept()
    c.settimeout(timeout)
    return c


# ------------------------------------------------------------------ kernel queues
def tcp_queues(ports: set[int], v6: bool = False) -> list[tuple[int, int, int, int]]:
    """(local port, remote port, tx_queue, rx_queue) of established TCP sockets of this
    network namespace with a local or remote port in ``ports`` (from /proc/net/tcp).

    tx_queue: bytes written by the application and not yet acknowledged; rx_queue: bytes
    received and not yet read by the application. On loopback, in a steady state, every byte
    queued in the kernel between two applications is in exactly one of these."""
    out = []
    with open("/proc/net/tcp6" if v6 else "/proc/net/tcp") as f:
        next(f)
        for line in f:
            p = line.split()
            if p[3] != "01":  # ESTABLISHED
                continue
            lport = int(p[1].rsplit(":", 1)[1], 16)
            rport = int(p[2].rsplit(":", 1)[1], 16)
            if lport in ports or rport in ports:
                tx, rx = (int(x, 16) for x in p[4].split(":"))
                out.append((lport, rport, tx, rx))
    return out


def kernel_queued(ports: set[int]) -> int:
    return sum(tx + rx for _, _, tx, rx in tcp_queues(ports))


# ------------------------------------------------------------------ memory
def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples this process's RSS and the tunnel's buffer bytes in the background."""

    def __init__(self, t: Tunnel, interval: float = 0.02) -> None:
        self.t = t
        self.interval = interval
        self.rss: list[int] = []
        self.buffer_bytes: list[int] = []
        self.buffers_in_use: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.t.stats()
            self.rss.append(rss_bytes())
            self.buffer_bytes.append(s.buffer_bytes)
            self.buffers_in_use.append(s.buffers_in_use)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# ------------------------------------------------------------------ tunnels in nodes
class NodeTunnel:
    """A Tunnel whose engine threads and sockets live in a netns node.

    Network namespaces are per thread: the engine creates its listening sockets on the
    calling thread and its outbound sockets on its workers, which inherit the namespace of
    the thread that started them. So everything is done on the node's own thread."""

    def __init__(self, node: Any, **kw: Any) -> None:
        self.node = node
        self.t: Tunnel = node.call(lambda: Tunnel(**kw).start())

    def forward(self, listen: Addr, to: Addr, **kw: Any) -> Any:
        return self.node.call(lambda: self.t.forward(listen=listen, to=to, **kw))

    def close(self) -> None:
        self.t.close()

    def __enter__(self) -> Tunnel:
        return self.t

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def node_tunnel(node: Any, **kw: Any) -> Iterator[NodeTunnel]:
    nt = NodeTunnel(node, **kw)
    try:
        yield nt
    finally:
        nt.close()
