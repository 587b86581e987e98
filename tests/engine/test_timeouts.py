"""Connect and idle timeouts.

The sandbox intercepts outbound TCP from the host namespace (a connect to anything
succeeds), so targets that never answer live inside netns nodes: an address on the node's
subnet that no host owns (ARP never resolves, the SYN is never answered), and a listening
socket whose accept queue is full (the kernel drops further SYNs).
"""

from __future__ import annotations

import logging
import socket
import time

import pytest
from harness.fds import assert_fds_return, fd_targets

from .helpers import Events, node_tunnel, read_outcome, rst_close, wait_closed, wait_until

pytestmark = pytest.mark.timeout(60)

NOBODY = "198.18.0.99"  # on the nodes' /24, owned by no node


def _fill_accept_queue(node, lsock: socket.socket) -> list[socket.socket]:
    """Connect to ``lsock`` (backlog 0) until the kernel stops completing handshakes."""
    addr = lsock.getsockname()[:2]
    socks = []
    for _ in range(4):
        s = node.socket()
        s.setblocking(False)
        s.connect_ex(addr)
        socks.append(s)
    time.sleep(0.3)
    return socks


@pytest.mark.needs_root
@pytest.mark.parametrize("target", ["no_such_host", "full_backlog"])
def test_connect_timeout_resets_client_counts_and_logs(two_nodes, caplog, target):
    a, b = two_nodes
    caplog.set_level(logging.INFO, logger="ztun")
    fillers: list[socket.socket] = []
    if target == "no_such_host":
        to = (NOBODY, 8080)
    else:
        ls = b.listen(backlog=0)
        fillers = _fill_accept_queue(a, ls)
        to = ls.getsockname()[:2]
    with node_tunnel(a, workers=1, connect_timeout=0.5) as nt:
        events = Events()
        nt.t.subscribe(events)
        fwd = nt.forward(listen=(a.ip4, 0), to=to)
        t0 = time.monotonic()
        c = a.connect(fwd.address, timeout=5)
        outcome, n = read_outcome(c, timeout=5)
        elapsed = time.monotonic() - t0
        c.close()
        assert outcome == "reset", f"client saw {outcome}"
        assert n == 0
        assert elapsed >= 0.4, f"closed after {elapsed:.2f} s, before the 0.5 s timeout"
        st = wait_closed(nt.t, 1)
        assert st.close_reasons["connect_timeout"] == 1, st.close_reasons
        assert st.connections_failed == 1
        assert st.failures == {"connect_timeout": 1}
        [ev] = events.wait_closes(1)
        assert ev.reason == "connect_timeout"
        assert ev.dst == to
        assert wait_until(
            lambda: any("connect_timeout" in r.getMessage() for r in caplog.records), 5
        ), "no access log line names connect_timeout"
        assert any(
            r.name == "ztun.engine" and r.levelno == logging.WARNING and "connect" in r.getMessage()
            for r in caplog.records
        )
    for s in fillers:
        s.close()


@pytest.mark.needs_root
def test_client_reset_while_connecting(two_nodes):
    """The client gives up before the upstream answers: counted as its reset, the pending
    upstream socket is closed (no fd left behind)."""
    a, _ = two_nodes
    with node_tunnel(a, workers=1, connect_timeout=5) as nt:
        fwd = nt.forward(listen=(a.ip4, 0), to=(NOBODY, 8080))
        baseline = fd_targets()
        c = a.connect(fwd.address, timeout=5)
        assert wait_until(lambda: nt.t.stats().connections_opened == 1, 5)
        time.sleep(0.1)
        rst_close(c)
        st = wait_closed(nt.t, 1, timeout=3)
        assert st.connections_closed == 1
        assert st.close_reasons["reset_by_downstream"] == 1, st.close_reasons
        assert_fds_return(baseline, timeout=5)


def test_idle_timeout_closes_idle_keeps_busy(make_tunnel, echo_server):
    t = make_tunnel(idle_timeout=0.5)
    events = Events()
    t.subscribe(events)
    fwd = t.forward(listen=("127.0.0.1", 0), to=echo_server.address)
    idle = socket.create_connection(fwd.address, timeout=5)
    idle.sendall(b"x")
    assert idle.recv(1) == b"x"
    silent = socket.create_connection(fwd.address, timeout=5)  # never sends a byte
    busy = socket.create_connection(fwd.address, timeout=5)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:  # three idle timeouts long, a byte every 0.1 s
        busy.sendall(b"y")
        assert busy.recv(1) == b"y"
        time.sleep(0.1)
    for s in (idle, silent):
        outcome, _ = read_outcome(s, timeout=3)
        assert outcome in ("reset", "eof"), outcome
        s.close()
    busy.sendall(b"z")
    assert busy.recv(1) == b"z", "the busy connection was closed"
    busy.shutdown(socket.SHUT_WR)
    assert busy.recv(1) == b""
    busy.close()
    st = wait_closed(t, 3)
    assert st.close_reasons["idle_timeout"] == 2, st.close_reasons
    assert st.close_reasons["ok"] == 1
    closes = events.wait_closes(3)
    assert sorted(e.reason for e in closes) == ["idle_timeout", "idle_timeout", "ok"]
    for e in closes:
        if e.reason == "idle_timeout":
            assert e.duration_ns >= 0.45e9


def test_idle_timeout_reaches_both_sides(make_tunnel):
    """The idle close resets both legs: the upstream server learns it too."""
    t = make_tunnel(idle_timeout=0.3)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    fwd = t.forward(listen=("127.0.0.1", 0), to=ls.getsockname())
    c = socket.create_connection(fwd.address, timeout=5)
    ls.settimeout(5)
    s, _ = ls.accept()
    ls.close()
    out_c, _ = read_outcome(c, timeout=3)
    out_s, _ = read_outcome(s, timeout=3)
    assert out_c in ("reset", "eof") and out_s in ("reset", "eof"), (out_c, out_s)
    c.close()
    s.close()
    assert wait_closed(t, 1).close_reasons["idle_timeout"] == 1
