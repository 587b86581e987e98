"""IPv6 forwards: on ::1, across families, and between netns nodes on fd00:198:18::/64."""

from __future__ import annotations

import socket

import pytest
from harness.fixtures import ipv6_loopback_available
from harness.integrity import MiB, run_integrity
from harness.servers import TransformServer

from .helpers import Events, node_tunnel, read_outcome, wait_closed

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback"),
]


@pytest.mark.parametrize(
    "listen,target",
    [("::1", "::1"), ("127.0.0.1", "::1"), ("::1", "127.0.0.1")],
    ids=["v6-v6", "v4-v6", "v6-v4"],
)
def test_loopback_forward_integrity(tunnel, make_server, listen, target):
    srv = make_server("transform", host=target)
    events = Events()
    tunnel.subscribe(events)
    fwd = tunnel.forward(listen=(listen, 0), to=srv.address)
    assert fwd.address[0] == listen
    summary = run_integrity(
        fwd.address, srv, 60, max_size=4 * MiB, concurrency=8, rst_fraction=0.1, deadline=90
    )
    summary.assert_clean()
    closes = events.wait_closes(60)
    assert all(e.src[0] == listen and e.dst == srv.address for e in closes)
    assert wait_closed(tunnel, 60).failures == {}


def test_unspecified_v6_listen_address(tunnel, echo_server):
    fwd = tunnel.forward(listen=("::", 0), to=echo_server.address)
    assert fwd.address[0] == "::"
    with socket.create_connection(("::1", fwd.address[1]), timeout=5) as c:
        c.sendall(b"v6")
        assert c.recv(2, socket.MSG_WAITALL) == b"v6"


@pytest.mark.needs_root
@pytest.mark.parametrize("family", [socket.AF_INET6, socket.AF_INET], ids=["v6", "v4"])
def test_netns_forward_integrity(two_nodes, family):
    """Tunnel in node a on [fd00:198:18::1] (198.18.0.1), server in node b on ::2 (.2)."""
    a, b = two_nodes
    with TransformServer(sock=b.listen(family=family)) as srv, node_tunnel(a, workers=2) as nt:
        events = Events()
        nt.t.subscribe(events)
        fwd = nt.forward(listen=(a.addr(family), 0), to=srv.address)
        assert fwd.address[0] == a.addr(family) and srv.address[0] == b.addr(family)
        summary = run_integrity(
            fwd.address,
            srv,
            100,
            max_size=8 * MiB,
            concurrency=8,
            rst_fraction=0.1,
            deadline=90,
            connect=a.connect,
        )
        summary.assert_clean()
        st = wait_closed(nt.t, 100)
        assert st.failures == {}
        closes = events.wait_closes(100)
        assert {e.src[0] for e in closes} == {a.addr(family)}
        assert {e.dst for e in closes} == {srv.address}


@pytest.mark.needs_root
def test_netns_v6_refused(two_nodes):
    a, b = two_nodes
    s = b.socket(socket.AF_INET6)
    s.bind((b.ip6, 0))
    closed = (b.ip6, s.getsockname()[1])
    s.close()
    with node_tunnel(a, workers=1) as nt:
        fwd = nt.forward(listen=(a.ip6, 0), to=closed)
        try:
            c = a.connect(fwd.address, timeout=5)
        except ConnectionResetError:
            outcome = "reset"
        else:
            outcome, _ = read_outcome(c, 5)
            c.close()
        assert outcome == "reset"
        assert wait_closed(nt.t, 1).failures == {"connect_refused": 1}
