"""Data integrity through ``Tunnel().forward``: random sizes (0 B to 64 MiB), random write
chunking, half-close in both orders, RSTs from either side (issue 2, "Done when")."""

from __future__ import annotations

import socket
import threading

import pytest
from harness.integrity import MiB, make_specs, run_integrity
from harness.payload import Stream

from .helpers import accept_one, read_outcome, rst_close, wait_closed, write_outcome

pytestmark = pytest.mark.timeout(300)


@pytest.mark.slow
def test_1000_connections_random_sizes_chunking_half_close_and_rst(tunnel, transform_server):
    """1,000 connections, sizes log-uniform in 0..64 MiB each way, both half-close orders,
    10 % RST (either side): zero mismatched bytes; the engine's counters agree."""
    n = 1000
    specs = make_specs(
        n, max_size=64 * MiB, rst_fraction=0.1, first_id=transform_server.next_conn_ids(n)
    )
    fwd = tunnel.forward(listen=("127.0.0.1", 0), to=transform_server.address)
    summary = run_integrity(fwd.address, transform_server, concurrency=8, deadline=240, specs=specs)
    summary.assert_clean()
    assert summary.mismatched_bytes == 0
    assert {s.order for s in specs if s.rst == "none"} == {"client_fin", "server_fin"}

    st = wait_closed(tunnel, n)
    rst_client = sum(s.rst == "client" for s in specs)
    rst_server = sum(s.rst == "server" for s in specs)
    assert rst_client and rst_server
    assert st.connections_opened == st.connections_closed == n
    assert st.connections_active == 0
    assert st.close_reasons["reset_by_downstream"] == rst_client
    assert st.close_reasons["reset_by_upstream"] == rst_server
    assert st.close_reasons["ok"] == n - rst_client - rst_server
    assert st.failures == {}
    assert st.connections_failed == 0
    # Clean connections moved exactly their bytes; RST ones at most what was written.
    clean = [s for s in specs if s.rst == "none"]
    assert st.bytes_sent >= sum(s.up_size for s in clean)
    assert st.bytes_received >= sum(s.down_size for s in clean)
    assert st.buffers_in_use == 0


def test_many_small_connections_high_concurrency(tunnel, transform_server):
    """Small flows (<= 256 KiB), 32 at a time, 20 % RST: interleaving inside the workers."""
    fwd = tunnel.forward(listen=("127.0.0.1", 0), to=transform_server.address)
    summary = run_integrity(
        fwd.address,
        transform_server,
        300,
        max_size=256 << 10,
        chunk_max=4096,
        concurrency=32,
        rst_fraction=0.2,
        deadline=120,
    )
    summary.assert_clean()
    st = wait_closed(tunnel, 300)
    assert st.connections_closed == 300 and st.failures == {}


def _pair(tunnel, lsock):
    fwd = tunnel.forward(listen=("127.0.0.1", 0), to=lsock.getsockname()[:2])
    c = socket.create_connection(fwd.address, timeout=5)
    s = accept_one(lsock)
    return c, s


@pytest.fixture
def upstream():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    yield ls
    ls.close()


@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_keeps_the_other_direction_open(tunnel, upstream, first):
    """A FIN one way becomes a FIN on the other leg; the other direction keeps carrying data
    (4 MiB after the half-close) until its own FIN; the engine then closes with 'ok'."""
    c, s = _pair(tunnel, upstream)
    a, b = (c, s) if first == "client" else (s, c)  # a half-closes first
    head = Stream(1, 100_000)
    tail = Stream(2, 4 << 20)
    a.sendall(b"".join(head.views(0, head.size)))
    a.shutdown(socket.SHUT_WR)
    got = bytearray()
    b.settimeout(5)
    while chunk := b.recv(1 << 16):
        got += chunk
    assert bytes(got) == b"".join(head.views(0, head.size)), "data before the FIN"
    # b saw EOF; b's direction is still open both ways for data b -> a
    errs: list[BaseException] = []

    def send_tail() -> None:
        try:
            b.sendall(b"".join(tail.views(0, tail.size)))
            b.shutdown(socket.SHUT_WR)
        except OSError as e:
            errs.append(e)

    th = threading.Thread(target=send_tail)
    th.start()
    got = bytearray()
    a.settimeout(5)
    while chunk := a.recv(1 << 16):
        got += chunk
    th.join(10)
    assert not errs
    assert len(got) == tail.size
    assert tail.mismatches(memoryview(got), 0)[0] == 0
    c.close()
    s.close()
    st = wait_closed(tunnel, 1)
    assert st.close_reasons["ok"] == 1, st.close_reasons
    assert st.bytes_sent + st.bytes_received == head.size + tail.size


@pytest.mark.parametrize("who", ["client", "server"])
@pytest.mark.parametrize("when", ["idle", "after_fin", "peer_writing"])
def test_rst_is_propagated_as_rst(tunnel, upstream, who, when):
    """An RST from one side arrives as an RST (not a FIN) on the other, whether the
    connection was idle, half-closed, or the other side was busy writing."""
    c, s = _pair(tunnel, upstream)
    resetter, other = (c, s) if who == "client" else (s, c)
    resetter.sendall(b"x" * 1000)
    assert other.recv(1000, socket.MSG_WAITALL) == b"x" * 1000
    if when == "after_fin":
        # the resetter half-closed first; the other side saw EOF and keeps writing
        resetter.shutdown(socket.SHUT_WR)
        other.settimeout(5)
        assert other.recv(1) == b""
    if when in ("after_fin", "peer_writing"):
        result: list[tuple[str, int]] = []
        th = threading.Thread(target=lambda: result.append(write_outcome(other, 10)))
        th.start()
        resetter.settimeout(5)
        resetter.recv(1 << 16)  # the other side's bytes started to flow
        rst_close(resetter)
        th.join(15)
        assert result and result[0][0] == "reset", f"the writer saw {result}"
    else:
        rst_close(resetter)
        outcome, _ = read_outcome(other, 5)
        assert outcome == "reset", f"the peer of the RST saw {outcome}"
    other.close()
    st = wait_closed(tunnel, 1)
    reason = "reset_by_downstream" if who == "client" else "reset_by_upstream"
    assert st.close_reasons[reason] == 1, st.close_reasons
    assert st.failures == {}
