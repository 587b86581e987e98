"""The sockmap hook (docs/sockmap.md, docs/capture.md): the captured app -> ztun hop is a
loopback hop the issue-7 accelerator carries socket to socket; two captured workloads on
one node served by one accelerated Tunnel are paired by the engine (pair_add), app to app."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from capture_rig import TRUST_DOMAIN, Mesh, Side
from harness.caps import in_ci
from harness.cgroup import Cgroup
from harness.netns import Node

from ztun import Tunnel, bpf
from ztun.capture import Capture
from ztun.events import ConnectionEvent
from ztun.mesh import Destination
from ztun.netns import run_in_netns
from ztun.testing import SpiffeCA

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]


@pytest.fixture
def accelerated(
    two_nodes: tuple[Node, Node], ca: SpiffeCA
) -> Iterator[tuple[Mesh, bpf.SockmapAccelerator]]:
    """A mesh whose apps and ztun share one parent cgroup, with the sockmap programs on it."""
    ok, why = bpf.available()
    if not ok:
        if in_ci():
            pytest.fail(f"sockmap unavailable under CI: {why}")
        pytest.skip(f"needs the sockmap programs: {why}")
    parent = Cgroup.create()
    try:
        parent.child("engine").add()  # this process: ztun's engines
        m = Mesh(two_nodes[0], two_nodes[1], ca, cgroups=[parent.child("a"), parent.child("b")])
        try:
            m.start(m.a)
            m.start(m.b)
            with bpf.SockmapAccelerator(parent.path) as acc:
                assert m.a.capture is not None and m.b.capture is not None
                m.a.capture.accelerate(acc)
                m.b.capture.accelerate(acc)
                yield m, acc
        finally:
            m.close()
    finally:
        parent.remove()


def test_captured_hop_to_ztun_is_accelerated(
    accelerated: tuple[Mesh, bpf.SockmapAccelerator],
) -> None:
    m, acc = accelerated
    m.b.server("sha-server", "9000")
    res = m.a.app("sha-client", m.b.node.ip4, "9000", str(64 << 20))
    assert res["ok"], res
    st = acc.stats()
    assert st["sockops_insert"] >= 2 and st["hop_redirect"] > 0, st


SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/server"


@pytest.fixture
def same_node(
    two_nodes: tuple[Node, Node], ca: SpiffeCA
) -> Iterator[tuple[Side, bpf.SockmapAccelerator, list[ConnectionEvent]]]:
    """One node, its captured apps (client and server) and an accelerated Tunnel serving
    them, all inside one parent cgroup with the sockmap programs; the directory names the
    node's address as a local workload, so the engine decides and pairs."""
    ok, why = bpf.available()
    if not ok:
        if in_ci():
            pytest.fail(f"sockmap unavailable under CI: {why}")
        pytest.skip(f"needs the sockmap programs: {why}")
    node = two_nodes[0]  # the harness's nodes have an address only in a topology of two
    parent = Cgroup.create()
    try:
        parent.child("engine").add()  # this process: ztun's engine
        side = Side(node, parent.child("apps"), "client", ca)
        closed: list[ConnectionEvent] = []
        with bpf.SockmapAccelerator(parent.path) as acc:
            t = Tunnel(
                identity=ca.issue_svid(side.spiffe_id),
                trust=ca.bundle,
                workload=side.workload,
                workers=1,
                access_log=False,
                accelerate=acc,
            )
            try:
                run_in_netns(node.path, t.start)  # workers dial from the node's netns
                t.set_directory([Destination(node.ip4, SERVER_ID, local=True)])
                t.subscribe(lambda ev: closed.append(ev) if ev.kind == "close" else None)
                side.tunnel = t
                side.capture = Capture(t, cgroup=side.cg.path, netns=node.path, name="same")
                yield side, acc, closed
            finally:
                if side.capture is not None:
                    side.capture.close()
                t.close()  # before the accelerator: the engine's workers use it
    finally:
        parent.remove()


def test_same_node_captured_pair_takes_the_shortcut(
    same_node: tuple[Side, bpf.SockmapAccelerator, list[ConnectionEvent]],
) -> None:
    side, acc, closed = same_node
    assert side.tunnel is not None
    srv = side.server("sha-server", "9000")
    try:
        res = side.app("sha-client", side.node.ip4, "9000", str(64 << 20))
    finally:
        srv.kill()
        srv.wait()
    assert res["ok"], res
    st = acc.stats()
    assert st["pair_redirect"] > 0, st
    ts = side.tunnel.stats()
    assert ts.bpf_pairs >= 1 and ts.bpf_direct_bytes > 32 << 20, ts
    end = time.monotonic() + 10
    while not closed and time.monotonic() < end:
        time.sleep(0.05)
    assert closed, "no close event"
    ev = closed[0]
    # Judged here as a local route: the destination's identity, the original destination.
    assert ev.ok and ev.peer_id == SERVER_ID and ev.dst == (side.node.ip4, 9000), ev
