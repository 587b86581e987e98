"""Network namespaces: keys carry the netns cookie, so the same loopback 4-tuple in two
namespaces is two hops, each accelerated and kept apart. Sockets are opened inside the
namespace by switching this thread with setns(2) (how an in-pod proxy opens them), so the
cgroup and the loader stay in the root namespace; `ip netns exec` would remount /sys and
hide cgroup2 and bpffs."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztun import bpf

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def netns(name: str) -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def inside(path: str) -> Iterator[None]:
    """Run the block with this thread in the namespace at path (sockets keep theirs)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        yield
    finally:
        _libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)


def test_same_tuple_in_two_namespaces(joined_cgroup: Path) -> None:
    port, cport = 19333, 19334
    hops = []
    with (
        netns(f"ztun-t1-{os.getpid()}") as n1,
        netns(f"ztun-t2-{os.getpid()}") as n2,
        bpf.SockmapAccelerator(joined_cgroup) as acc,
    ):
        for ns in (n1, n2):
            with inside(ns):
                ls = socket.socket()
                ls.bind(("127.0.0.1", port))
                ls.listen(4)
            acc.add_listener(ls)  # keyed by the namespace's cookie and the port
            with inside(ns):
                c = socket.socket()
                c.bind(("127.0.0.1", cport))  # the same 4-tuple in both namespaces
                c.connect(("127.0.0.1", port))
            s, _ = ls.accept()
            hops.append((ls, c, s))
        assert acc.socket_count() == 4, "one namespace's hop replaced the other's"
        for i, (_, c, s) in enumerate(hops):
            msg = f"namespace {i} ".encode() * 1000
            c.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += s.recv(65536)
            assert got == msg
        st = acc.stats()
        for hop in hops:
            for x in hop:
                x.close()
    assert st["hop_redirect"] >= 2 and st["hop_miss"] == 0 and st["sockops_error"] == 0, st
