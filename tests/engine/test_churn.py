"""10,000 short connections through a forward: none lost, counters exact, file descriptors
back to the baseline (the engine runs in this process, so /proc/self/fd is its table)."""

from __future__ import annotations

import random
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness.fds import assert_fds_return, fd_targets

from ztun import Tunnel

from .helpers import Events, wait_closed

N = 10_000
CONCURRENCY = 32


def _one(addr: tuple[str, int], i: int) -> str | None:
    """Connect, send 0..4 KiB, half-close, read the echo to EOF. None when all went right."""
    rng = random.Random(i)
    data = rng.randbytes(rng.choice((0, 1, rng.randint(2, 4096))))
    try:
        with socket.create_connection(addr, timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            while b := s.recv(65536):
                got += b
    except OSError as e:
        return f"conn {i}: {e!r}"
    if bytes(got) != data:
        return f"conn {i}: sent {len(data)} bytes, got back {len(got)} (differ)"
    return None


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_10000_short_connections_none_lost_fds_back(make_server):
    before_tunnel = fd_targets()
    srv = make_server("echo")
    t = Tunnel(workers=2).start()
    try:
        events = Events()
        t.subscribe(events)
        fwd = t.forward(listen=("127.0.0.1", 0), to=srv.address)
        baseline = fd_targets()

        with ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="churn") as ex:
            errors = [e for e in ex.map(lambda i: _one(fwd.address, i), range(N)) if e]
        assert not errors, f"{len(errors)} of {N} connections failed: {errors[:5]}"

        st = wait_closed(t, N, timeout=30)
        assert st.connections_opened == N
        assert st.connections_closed == N
        assert st.connections_active == 0
        assert st.connections_failed == 0
        assert st.failures == {}
        assert st.close_reasons["ok"] == N
        assert st.buffers_in_use == 0
        assert srv.accepted == N
        # every connection reported once, with its own id
        closes = events.wait_closes(N, timeout=30)
        assert len(closes) == N
        assert len({e.conn_id for e in closes}) == N
        assert all(e.reason == "ok" for e in closes)
        assert st.bytes_sent == st.bytes_received == sum(e.bytes_sent for e in closes)
        # the engine, the echo server and the clients closed everything they opened
        srv.wait_idle(10)
        assert_fds_return(baseline, timeout=15)
    finally:
        t.close()
    srv.stop()
    # and stopping the tunnel released its own descriptors (epoll, eventfd, listeners)
    assert_fds_return(before_tunnel, timeout=10)
