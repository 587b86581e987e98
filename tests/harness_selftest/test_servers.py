from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest
from harness.fds import FdTracker
from harness.fixtures import ipv6_loopback_available
from harness.servers import EchoServer, SinkServer

HOSTS = ["127.0.0.1"] + (["::1"] if ipv6_loopback_available() else [])


@pytest.mark.parametrize("host", HOSTS)
def test_echo_counts_and_half_close(make_server, host):
    srv = make_server("echo", host)
    data = os.urandom(300_000)
    for _ in range(3):
        with socket.create_connection(srv.address, timeout=10) as c:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            got = b"".join(iter(lambda c=c: c.recv(65536), b""))
        assert got == data
    assert srv.accepted == 3
    assert srv.wait_idle(5)


@pytest.mark.parametrize("host", HOSTS)
def test_sink_returns_count_and_sha(make_server, host):
    srv = make_server("sink", host)
    data = os.urandom(1_000_003)
    with socket.create_connection(srv.address, timeout=10) as c:
        n, sha = SinkServer.send_and_verify(c, data)
    assert (n, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert srv.results[0].received == len(data)
    assert srv.accepted == 1


def test_stop_closes_live_connections_and_leaks_nothing():
    with FdTracker(timeout=5):
        srv = EchoServer().start()
        clients = [socket.create_connection(srv.address, timeout=5) for _ in range(20)]
        assert srv.wait_accepted(20)
        threads_before = threading.active_count()
        srv.stop()
        assert threading.active_count() <= threads_before - 20
        for c in clients:
            assert c.recv(1) == b""  # the server side went away
            c.close()


def test_stop_is_quick_with_idle_listener():
    srv = EchoServer().start()
    srv.stop(timeout=2)
    with pytest.raises(OSError):
        socket.create_connection(srv.address, timeout=1)
