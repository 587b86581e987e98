"""Test nodes: netns + veth over IPv4 and IPv6, code and processes inside, full cleanup."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from harness import netns
from harness.servers import EchoServer

pytestmark = pytest.mark.needs_root


def _links_named(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return [ln.split(":")[1].strip() for ln in out.splitlines() if prefix in ln]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_two_nodes_talk_over_veth(two_nodes, family):
    a, b = two_nodes
    with EchoServer(sock=b.listen(family=family)) as srv:
        assert srv.address[0] == b.addr(family)
        c = a.connect(srv.address, timeout=5)
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        assert c.getsockname()[0] == a.addr(family)
        c.close()
        assert srv.accepted == 1


def test_code_and_processes_run_inside(two_nodes):
    a, _ = two_nodes
    host_ns = os.stat("/proc/self/ns/net").st_ino
    assert a.inode != host_ns
    # run_in: a thread that entered the namespace
    assert a.run_in(lambda: os.stat("/proc/thread-self/ns/net").st_ino) == a.inode

    def read_dev() -> str:
        with open("/proc/thread-self/net/dev") as f:
            return f.read()

    devs = a.run_in(read_dev)
    assert "zt0" in devs
    # the calling thread did not move
    assert os.stat("/proc/thread-self/ns/net").st_ino == host_ns
    # popen: the child starts inside, without ip netns exec (so /sys keeps cgroup2 and bpffs)
    p = a.popen(["sleep", "30"])
    assert os.stat(f"/proc/{p.pid}/ns/net").st_ino == a.inode
    out = a.run(["ip", "-o", "addr", "show", "dev", "zt0"]).stdout
    assert a.ip4 in out and a.ip6 in out
    mounts = a.run(["cat", "/proc/self/mountinfo"]).stdout
    assert " - cgroup2 " in mounts
    # nsenter variant of the command line
    out = subprocess.run(
        a.argv(["ip", "-br", "addr"]), check=True, capture_output=True, text=True
    ).stdout
    assert a.ip4 in out


def test_three_nodes_on_a_bridge(make_nodes):
    topo = make_nodes(3)
    assert topo.hub is not None
    with EchoServer(sock=topo[2].listen()) as srv:
        for n in topo.nodes[:2]:
            c = n.connect(srv.address, timeout=5)
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            c.close()
        assert srv.accepted == 2


def test_cleanup_removes_everything_even_after_failure():
    before = netns.list_ours()
    names = []
    with pytest.raises(RuntimeError, match="boom"), netns.Topology(3) as topo:
        names = [n.name for n in topo.nodes] + [topo.hub]
        p = topo[0].popen(["sleep", "60"])
        s = topo[1].listen()
        assert all(os.path.exists(f"/run/netns/{n}") for n in names)
        raise RuntimeError("boom")
    assert p.poll() is not None  # killed
    assert s.fileno() == -1  # closed
    assert netns.list_ours() == before
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)
    assert not _links_named("ztt")


def test_stale_namespaces_of_dead_runs_are_removed():
    from pyroute2 import netns as pnetns

    p = subprocess.Popen(["true"])
    p.wait()  # a pid that is gone
    stale = f"{netns.PREFIX}{p.pid:x}-1-a"
    pnetns.create(stale)
    try:
        assert stale in netns.cleanup_stale()
        assert stale not in netns.list_ours()
    finally:
        if os.path.exists(f"/run/netns/{stale}"):
            pnetns.remove(stale)


def test_unique_names():
    names = {netns.unique_name() for _ in range(100)}
    assert len(names) == 100
    assert all(netns.owner_pid(n) == os.getpid() for n in names)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_integrity_between_nodes(two_nodes, family):
    from harness.integrity import run_integrity
    from harness.servers import TransformServer

    a, b = two_nodes
    with TransformServer(sock=b.listen(family=family)) as srv:
        s = run_integrity(srv.address, srv, n=20, max_size=2 << 20, seed=9, connect=a.connect)
    s.assert_clean()
    assert srv.accepted == 20
