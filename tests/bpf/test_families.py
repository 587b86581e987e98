"""Address families: IPv6 loopback and dual-stack (IPv4-mapped) sockets are keyed so that
both ends of a hop find each other, and bytes arrive intact."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest
from bpf_apps import recv_all

from ztun import bpf

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]


def _exchange(a: socket.socket, b: socket.socket, n: int = 4 << 20) -> None:
    data = os.urandom(n)
    t = threading.Thread(target=lambda: (a.sendall(data), a.shutdown(socket.SHUT_WR)))
    t.start()
    sha, got = recv_all(b)
    t.join()
    assert got == n and sha == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("listen_family", "listen_addr", "client_family", "client_addr"),
    [
        (socket.AF_INET6, "::1", socket.AF_INET6, "::1"),
        # dual-stack client: an AF_INET6 socket talking to an IPv4 listener
        (socket.AF_INET, "127.0.0.1", socket.AF_INET6, "::ffff:127.0.0.1"),
        # dual-stack listener: an AF_INET6 listener accepting an IPv4 client
        (socket.AF_INET6, "::", socket.AF_INET, "127.0.0.1"),
    ],
    ids=["ipv6", "v4mapped-client", "v4mapped-listener"],
)
def test_hop_across_families(
    listen_family: int, listen_addr: str, client_family: int, client_addr: str, joined_cgroup: Path
) -> None:
    with bpf.SockmapAccelerator(joined_cgroup) as acc:
        ls = socket.socket(listen_family)
        if listen_family == socket.AF_INET6:
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind((listen_addr, 0))
        ls.listen(4)
        acc.add_listener(ls)
        c = socket.socket(client_family)
        c.connect((client_addr, ls.getsockname()[1]))
        s, _ = ls.accept()
        with ls, c, s:
            assert acc.socket_count() == 2, "sock_ops did not key both ends"
            _exchange(c, s)
            _exchange(s, c)
            st = acc.stats()
    assert st["hop_redirect"] > 0 and st["hop_miss"] == 0, st
