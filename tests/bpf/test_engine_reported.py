"""Engine behaviours with the accelerator that are wrong today, reported to the lead
(docs/sockmap.md §7). Each test states what should happen and is xfail(strict=True) until
the engine is fixed, so a fix shows up as an XPASS failure to remove the mark."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from engine_rig import SERVER_ID, check_cgroup, route

from ztun import Tunnel
from ztun.events import ConnectionEvent

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf, pytest.mark.timeout(60)]


def _sink_server() -> tuple[socket.socket, threading.Thread]:
    """Greets with 'R', then reads to EOF; one thread per connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve(c: socket.socket) -> None:
        with c:
            c.sendall(b"R")
            while True:
                try:
                    if not c.recv(1 << 20):
                        return
                except BlockingIOError:  # spurious EAGAIN of psock sockets
                    continue
                except OSError:
                    return

    def loop() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return srv, t


def _one_transfer(t: Tunnel, port: int) -> None:
    addr = t.forward(("127.0.0.1", 0), ("127.0.0.1", port)).address
    with socket.create_connection(addr, timeout=10) as a:
        assert a.recv(1) == b"R"
        a.sendall(os.urandom(4 << 20))
    end = time.monotonic() + 10
    while t.stats().connections_closed < 1 and time.monotonic() < end:
        time.sleep(0.02)


@pytest.mark.xfail(
    strict=True,
    reason="two accelerated Tunnels in one cgroup share the default SO_MARK (0x7a74): the "
    "first-attached accelerator's sock_ops takes the other's marked sockets, so the second "
    "Tunnel never pairs (its pair_add fails, sockops_error counts the collision). The "
    "loader requires distinct marks per cgroup (docs/sockmap.md §1); Tunnel passes none.",
)
def test_two_accelerated_tunnels_in_one_cgroup_both_pair(joined_cgroup: Path) -> None:
    check_cgroup(joined_cgroup)
    srv, _ = _sink_server()
    with (
        srv,
        Tunnel(accelerate=True, access_log=False) as t1,
        Tunnel(accelerate=True, access_log=False) as t2,
    ):
        _one_transfer(t1, srv.getsockname()[1])
        _one_transfer(t2, srv.getsockname()[1])
        pairs = (t1.stats().bpf_pairs, t2.stats().bpf_pairs)
    assert pairs == (1, 1), f"pairs per tunnel: {pairs}"


@pytest.mark.xfail(
    strict=True,
    reason="a local directory route (Destination(local=True)) sets the connection's peer_id "
    "to the tunnel's own (source) identity, for policy; events and the access log then "
    "name the source as dst.identity instead of the destination's SPIFFE ID",
)
def test_local_route_events_name_the_destination_identity(joined_cgroup: Path) -> None:
    srv, _ = _sink_server()
    with srv, route("socks5", srv.getsockname(), joined_cgroup) as r:
        closed: list[ConnectionEvent] = []
        r.entry.subscribe(lambda ev: closed.append(ev) if ev.kind == "close" else None)
        with r.connect() as a:
            assert a.recv(1) == b"R"
            a.sendall(b"x" * 1000)
        r.wait_idle()
        end = time.monotonic() + 5
        while not closed and time.monotonic() < end:
            time.sleep(0.02)
    assert closed, "no close event"
    assert closed[0].peer_id == SERVER_ID, f"peer_id {closed[0].peer_id}"
