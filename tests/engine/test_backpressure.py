"""Backpressure: a reader that stops (or reads slowly) stops (or slows) the writer on the
other side of the forward; the engine holds at most one bounded ring per direction, its
buffer memory and the process RSS stay bounded, and the bytes arrive intact."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness.payload import Stream

from .helpers import RssSampler, accept_one, kernel_queued, rss_bytes, tcp_queues, wait_until

pytestmark = pytest.mark.timeout(120)

# The engine's buffer classes (src/core/buf.h): a direction holds at most one ring.
SMALL = 16 << 10
LARGE = 256 << 10
POOL_KEEP = 256 * SMALL + 16 * LARGE  # what one worker may keep cached


def _fill_until_blocked(sock: socket.socket, limit: int = 512 << 20) -> int:
    """Write without blocking until no byte got out for 0.5 s; bytes written."""
    sock.setblocking(False)
    chunk = memoryview(b"b" * (256 << 10))
    sent = 0
    last = time.monotonic()
    while sent < limit and time.monotonic() - last < 0.5:
        try:
            n = sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        sent += n
        last = time.monotonic()
    sock.setblocking(True)
    return sent


@pytest.fixture
def upstream():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    yield ls
    ls.close()


def _connect(tunnel, upstream, n=1):
    fwd = tunnel.forward(listen=("127.0.0.1", 0), to=upstream.getsockname())
    pairs = []
    for _ in range(n):
        c = socket.create_connection(fwd.address, timeout=10)
        pairs.append((c, accept_one(upstream)))
    return fwd, pairs


@pytest.mark.parametrize("direction", ["up", "down"])
def test_stopped_reader_stops_the_writer(tunnel, upstream, direction):
    """Nothing reads: the writer blocks after kernel buffers + at most one engine ring."""
    fwd, [(c, s)] = _connect(tunnel, upstream)
    writer, reader = (c, s) if direction == "up" else (s, c)
    ports = {fwd.address[1], upstream.getsockname()[1]}
    rss0 = rss_bytes()
    ahead = _fill_until_blocked(writer)
    assert ahead < 512 << 20, "the writer never blocked"
    # Every byte written is queued in a kernel socket buffer or held by the engine.
    queued = kernel_queued(ports)
    held = ahead - queued
    assert 0 <= held <= LARGE, (
        f"writer {ahead} B ahead, kernel queues {queued} B {tcp_queues(ports)}: "
        f"the engine holds {held} B (at most one {LARGE} B ring expected)"
    )
    st = tunnel.stats()
    assert st.buffers_in_use <= 1
    assert st.buffer_bytes <= LARGE + tunnel.workers * POOL_KEEP
    assert rss_bytes() - rss0 < 16 << 20
    # The data still arrives, complete, once the reader reads.
    writer.shutdown(socket.SHUT_WR)
    reader.settimeout(10)
    got = 0
    while b := reader.recv(1 << 20):
        assert b.count(b"b") == len(b)
        got += len(b)
    assert got == ahead
    writer.close()
    reader.close()
    assert wait_until(lambda: tunnel.stats().buffers_in_use == 0, 5)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_slow_reader_slows_the_writer_memory_bounded(tunnel, upstream, direction):
    """A reader at ~50 MiB/s: the writer stays within a bounded distance of it, engine
    buffers and RSS stay bounded, 48 MiB arrive intact (SHA-256)."""
    total = 48 << 20
    stream = Stream(7, total)
    _, [(c, s)] = _connect(tunnel, upstream)
    writer, reader = (c, s) if direction == "up" else (s, c)
    progress = {"sent": 0, "got": 0}
    max_lead = 0
    lead_at_writer_done = None
    sent_sha = hashlib.sha256()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for pos in range(0, total, 1 << 20):
                for v in stream.views(pos, min(total, pos + (1 << 20))):
                    writer.sendall(v)
                    sent_sha.update(v)
                progress["sent"] = min(total, pos + (1 << 20))
            writer.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    rss0 = rss_bytes()
    with RssSampler(tunnel) as sampler:
        th = threading.Thread(target=write, daemon=True)
        th.start()
        got_sha = hashlib.sha256()
        reader.settimeout(20)
        t0 = time.monotonic()
        while True:
            b = reader.recv(128 << 10)
            if not b:
                break
            got_sha.update(b)
            progress["got"] += len(b)
            max_lead = max(max_lead, progress["sent"] - progress["got"])
            if lead_at_writer_done is None and not th.is_alive():
                lead_at_writer_done = total - progress["got"]
            time.sleep(0.0025)  # ~50 MiB/s
        elapsed = time.monotonic() - t0
        th.join(10)
    assert not errors
    assert progress["got"] == total
    assert got_sha.hexdigest() == sent_sha.hexdigest()
    # The writer was held back: when it finished, much of the stream was still unread
    # at most kernel buffers (autotuned up to tcp_rmem/tcp_wmem max) + one engine ring away.
    with open("/proc/sys/net/ipv4/tcp_rmem") as f:
        rmem_max = int(f.read().split()[2])
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        wmem_max = int(f.read().split()[2])
    bound = 2 * (rmem_max + wmem_max) + LARGE + (1 << 20)
    assert max_lead <= min(bound, total), (max_lead, bound)
    assert elapsed > 0.5, "the reader was not slow: the test measured nothing"
    # Engine memory: one connection, at most one ring per direction in use at any time.
    assert max(sampler.buffers_in_use) <= 2
    assert max(sampler.buffer_bytes) <= 2 * LARGE + tunnel.workers * POOL_KEEP
    assert max(sampler.rss) - rss0 < 32 << 20, "RSS grew with the backlog"
    c.close()
    s.close()


def test_many_stalled_connections_hold_bounded_memory(tunnel, upstream):
    """32 connections whose readers stopped: each holds at most one ring in the engine;
    nothing grows with the amount the writers try to push; all data arrives afterwards."""
    n = 32
    fwd, pairs = _connect(tunnel, upstream, n)
    ports = {fwd.address[1], upstream.getsockname()[1]}
    rss0 = rss_bytes()
    with ThreadPoolExecutor(8) as ex:
        aheads = list(ex.map(lambda p: _fill_until_blocked(p[0], 128 << 20), pairs))
    assert all(a < 128 << 20 for a in aheads)
    held = sum(aheads) - kernel_queued(ports)
    assert 0 <= held <= n * LARGE, f"engine holds {held} B for {n} stalled connections"
    st = tunnel.stats()
    assert st.buffers_in_use <= n
    assert st.buffer_bytes <= n * LARGE + tunnel.workers * POOL_KEEP
    assert rss_bytes() - rss0 < n * LARGE + (16 << 20)
    # release: every reader drains everything
    for (c, s), ahead in zip(pairs, aheads, strict=True):
        c.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        got = 0
        while b := s.recv(1 << 20):
            got += len(b)
        assert got == ahead
        c.close()
        s.close()
    assert wait_until(lambda: tunnel.stats().connections_active == 0, 10)
    assert tunnel.stats().buffers_in_use == 0
