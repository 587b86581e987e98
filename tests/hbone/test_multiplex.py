"""Many TCP connections multiplexed as CONNECT streams over one pooled HBONE connection.

ztun -> ztun over loopback. The client side is ``forward(protocol="hbone")`` (TCP clients),
one engine worker, so "one pooled connection" is exact. Data is checked with the shared
integrity harness: random sizes, random write chunking, both half-close orders, SHA-256 of
both directions per connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest
from harness.integrity import run_integrity
from harness.servers import EchoServer, TransformServer

from hbone.util import ZTUN_SERVER, rss_bytes, stats, wait_until
from ztun import Tunnel

pytestmark = pytest.mark.timeout(90)
MiB = 1 << 20
STREAM_WINDOW = 4 * MiB
POOL_CACHE = 16 * (256 << 10) + 256 * (16 << 10)  # ZTUN_POOL_KEEP_* x buffer sizes


@pytest.fixture
def server(make_tunnel: Callable[..., Tunnel]) -> Tunnel:
    return make_tunnel(ZTUN_SERVER, workers=1)


@pytest.fixture
def client(make_tunnel: Callable[..., Tunnel]) -> Tunnel:
    return make_tunnel(workers=1)


def barrier_connect(
    n: int, timeout: float = 30.0
) -> Callable[[tuple[str, int], float], socket.socket]:
    """A connector for run_integrity that holds every connection until ``n`` are open, so
    that ``n`` streams exist at the same time (none can finish before the last opened)."""
    barrier = threading.Barrier(n, timeout=timeout)

    def connect(addr: tuple[str, int], t: float) -> socket.socket:
        s = socket.create_connection(addr, timeout=t)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            s.close()
            raise
        return s

    return connect


def test_100_concurrent_streams_share_one_connection(
    server: Tunnel, client: Tunnel, transform_server: TransformServer
) -> None:
    h = server.serve(("127.0.0.1", 0), deliver=False)
    fwd = client.forward(
        ("127.0.0.1", 0), transform_server.address, expect=[ZTUN_SERVER], via=h.address
    )
    s = run_integrity(
        fwd.address,
        transform_server,
        n=100,
        concurrency=100,
        max_size=4 * MiB,
        chunk_max=1 * MiB,
        connect=barrier_connect(100),
        deadline=60,
        seed=int.from_bytes(os.urandom(4)),
    )
    s.assert_clean()
    assert s.mismatched_bytes == 0
    cs, ss = stats(client), stats(server)
    assert cs["hbone_connections_opened"] == 1, cs
    assert ss["hbone_connections_opened"] == 1
    assert ss["hbone_status"][200] == 100
    assert cs["connections_failed"] == 0 and ss["connections_failed"] == 0


def test_100_streams_two_workers_one_pool_per_worker(
    make_tunnel: Callable[..., Tunnel], transform_server: TransformServer
) -> None:
    server = make_tunnel(ZTUN_SERVER, workers=2)
    client = make_tunnel(workers=2)
    h = server.serve(("127.0.0.1", 0), deliver=False)
    fwd = client.forward(
        ("127.0.0.1", 0), transform_server.address, expect=[ZTUN_SERVER], via=h.address
    )
    s = run_integrity(
        fwd.address,
        transform_server,
        n=100,
        concurrency=100,
        max_size=64 << 10,
        connect=barrier_connect(100),
        deadline=30,
        seed=3,
    )
    s.assert_clean()
    # Pools are per worker (docs/hbone.md): a key gets at most one connection per
    # worker, so two workers carry 100 streams on one or two connections.
    assert 1 <= stats(client)["hbone_connections_opened"] <= client.workers


def test_101st_stream_opens_second_connection(
    server: Tunnel, client: Tunnel, echo_server: EchoServer
) -> None:
    """At most 100 streams per pooled connection: the 101st dials a second one, the 102nd
    joins it; all 102 carry data."""
    h = server.serve(("127.0.0.1", 0), deliver=False)
    fwd = client.forward(("127.0.0.1", 0), echo_server.address, expect=[ZTUN_SERVER], via=h.address)
    conns: list[socket.socket] = []
    try:
        for _ in range(100):
            conns.append(socket.create_connection(fwd.address, timeout=10))
        assert echo_server.wait_accepted(100, 10)
        wait_until(lambda: stats(server)["hbone_status"][200] == 100, 10, "100 streams up")
        assert stats(client)["hbone_connections_opened"] == 1
        conns.append(socket.create_connection(fwd.address, timeout=10))
        assert echo_server.wait_accepted(101, 10)
        assert stats(client)["hbone_connections_opened"] == 2
        conns.append(socket.create_connection(fwd.address, timeout=10))
        assert echo_server.wait_accepted(102, 10)
        assert stats(client)["hbone_connections_opened"] == 2
        assert stats(server)["hbone_connections_opened"] == 2
        for i, c in enumerate(conns):
            msg = f"stream {i} ".encode() * 100
            c.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = c.recv(1 << 16)
                assert chunk, f"stream {i}: EOF"
                got += chunk
            assert got == msg
    finally:
        for c in conns:
            c.close()


class StallingApp:
    """The application behind ``Tunnel.serve(deliver=True)``: connections to ``stall_port``
    are accepted and never read (their reader stopped); the others are integrity
    connections served by ``transform``. Bounded by ``stop()``."""

    def __init__(self, t: Tunnel, transform: TransformServer, stall_port: int, push: bool) -> None:
        self.t, self.transform, self.stall_port, self.push = t, transform, stall_port, push
        self.stalled: list[socket.socket] = []
        self.pushed = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._loop, daemon=True, name="stalling-app")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                s = self.t.accept(timeout=0.2)
            except TimeoutError:
                continue
            if s.target is not None and s.target[1] == self.stall_port:
                self.stalled.append(s)
                if self.push:
                    t = threading.Thread(target=self._push, args=(s,), daemon=True)
                    t.start()
                    self._threads.append(t)
                continue
            t = threading.Thread(target=self.transform.handle, args=(s, None), daemon=True)
            t.start()
            self._threads.append(t)

    def _push(self, s: socket.socket) -> None:
        """Write into a connection whose far end never reads, as long as it lets us."""
        s.setblocking(False)
        chunk = b"\xa5" * (256 << 10)
        while not self._stop.is_set():
            try:
                self.pushed += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.stalled:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(10)


def push_until_stuck(s: socket.socket, limit: int, quiet: float = 1.0) -> int:
    """Send into ``s`` until ``limit`` bytes or no progress for ``quiet`` s; bytes accepted."""
    s.setblocking(False)
    chunk = b"\x5a" * (256 << 10)
    sent, last = 0, time.monotonic()
    while sent < limit and time.monotonic() - last < quiet:
        try:
            n = s.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        sent += n
        last = time.monotonic()
    return sent


def wait_quiet(get: Callable[[], int], quiet: float = 1.0, timeout: float = 20.0) -> int:
    """Wait until ``get()`` stops growing for ``quiet`` seconds; its final value."""
    end = time.monotonic() + timeout
    v, since = get(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.05)
        n = get()
        if n != v:
            v, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return v
    raise AssertionError(f"still growing after {timeout} s (last {v})")


@pytest.mark.parametrize("stalled", ["server_app", "client_app"])
def test_stalled_reader_does_not_stall_the_others(
    stalled: str, server: Tunnel, client: Tunnel, transform_server: TransformServer
) -> None:
    """One stream's reader stops for good (the server application never reads it, or the
    TCP client never reads it) while 64 MiB wait to go to it. The 99 other streams on the
    same connection complete with intact data, and what the engines hold for the stuck
    stream stays within its 4 MiB window (engine buffer_bytes; process RSS)."""
    stall_port = 7777
    h = server.serve(("127.0.0.1", 0))
    app = StallingApp(server, transform_server, stall_port, push=stalled == "client_app")
    stall_fwd = client.forward(
        ("127.0.0.1", 0), ("127.0.0.1", stall_port), expect=[ZTUN_SERVER], via=h.address
    )
    fwd = client.forward(("127.0.0.1", 0), ("127.0.0.1", 8080), expect=[ZTUN_SERVER], via=h.address)
    base_srv, base_cli = stats(server)["buffer_bytes"], stats(client)["buffer_bytes"]
    rss0 = rss_bytes()
    stuck = socket.create_connection(stall_fwd.address, timeout=10)
    try:
        if stalled == "server_app":
            accepted = push_until_stuck(stuck, 64 * MiB)
            assert accepted < 64 * MiB, (
                "nothing pushed back: the stalled stream is not flow-controlled"
            )
        else:
            wait_until(lambda: app.stalled, 10, "stalled stream delivered")
            accepted = wait_quiet(lambda: app.pushed)
        srv_held = stats(server)["buffer_bytes"] - base_srv
        cli_held = stats(client)["buffer_bytes"] - base_cli
        # the others go through while that stream is stuck
        s = run_integrity(
            fwd.address,
            transform_server,
            n=99,
            concurrency=33,
            max_size=2 * MiB,
            deadline=45,
            seed=int.from_bytes(os.urandom(4)),
        )
        s.assert_clean()
        rss_growth = rss_bytes() - rss0
        # still stuck, still bounded
        if stalled == "server_app":
            assert push_until_stuck(stuck, 8 * MiB, quiet=0.5) < 1 * MiB
        srv_now = stats(server)["buffer_bytes"] - base_srv
        cli_now = stats(client)["buffer_bytes"] - base_cli
    finally:
        stuck.close()
        app.stop()
    assert stats(client)["hbone_connections_opened"] == 1
    held = srv_held if stalled == "server_app" else cli_held
    # The receiving engine holds at most the stream window (+ one buffer of slack) for it.
    assert held <= STREAM_WINDOW + 1 * MiB, (srv_held, cli_held)
    # After 99 more connections the pools also cache freed buffers (at most 16 large and
    # 256 small per worker: 8 MiB), never trimmed while a flow (the stuck one) is open.
    assert max(srv_now, cli_now) <= STREAM_WINDOW + POOL_CACHE + 1 * MiB, (srv_now, cli_now)
    # Kernel socket buffers take the rest of what the writer got rid of; RSS must not grow
    # by the 64 MiB that waited.
    assert accepted < 24 * MiB, accepted
    assert rss_growth < 48 * MiB, rss_growth
