"""HBONE between two network-namespace nodes (harness ``two_nodes``), IPv4 and IPv6.

Node B runs ``Tunnel.serve`` on its address, port 15008, in dialing mode (the engine
connects to the CONNECT authority, a TCP server on B). Node A runs
``Tunnel.forward(protocol="hbone")`` to B's server; TCP clients on A go through it. Each
tunnel is started from a thread inside its node, so its workers (and every socket they
make) live in that node's namespace.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness.integrity import run_integrity
from harness.netns import Node
from harness.servers import TransformServer

from hbone.util import ZTUN_CLIENT, ZTUN_SERVER, EventLog, close_within, stats, wait_until
from ztun import Tunnel
from ztun.errors import ConnectError
from ztun.mesh import HBONE_PORT
from ztun.testing import SpiffeCA

pytestmark = [pytest.mark.needs_root, pytest.mark.timeout(120)]
FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"), pytest.param(socket.AF_INET6, id="ipv6")]


@dataclass
class Mesh:
    a: Node
    b: Node
    client: Tunnel  # on A
    server: Tunnel  # on B, serving b's address:15008
    family: int

    @property
    def b_ip(self) -> str:
        return self.b.addr(self.family)


def start_in(node: Node, ca: SpiffeCA, spiffe_id: str) -> Tunnel:
    t = Tunnel(identity=ca.issue_svid(spiffe_id), trust=ca.bundle, workers=2)
    node.call(t.start)
    return t


@pytest.fixture(params=FAMILIES)
def mesh(
    request: pytest.FixtureRequest, two_nodes: tuple[Node, Node], ca: SpiffeCA
) -> Iterator[Mesh]:
    a, b = two_nodes
    fam = int(request.param)
    server = start_in(b, ca, ZTUN_SERVER)
    client = start_in(a, ca, ZTUN_CLIENT)
    try:
        b.call(server.serve, (b.addr(fam), HBONE_PORT), deliver=False, workloads=[b.addr(fam)])
        yield Mesh(a, b, client, server, fam)
    finally:
        hung = [t for t in (client, server) if not close_within(t, 20)]
        assert not hung, f"Tunnel.close() hung: {hung}"


def test_integrity_1000_connections(mesh: Mesh) -> None:
    """1,000 connections A -> B through HBONE: random sizes and chunking, both half-close
    orders, 5 % RSTs from either end; SHA-256 both ways, zero mismatches."""
    srv = TransformServer(sock=mesh.b.listen(family=mesh.family))
    srv.start()
    try:
        fwd = mesh.a.call(
            mesh.client.forward,
            ("127.0.0.1", 0),
            srv.address,
            expect=[ZTUN_SERVER],
            protocol="hbone",
        )
        s = run_integrity(
            fwd.address,
            srv,
            n=1000,
            max_size=1 << 20,
            concurrency=32,
            rst_fraction=0.05,
            deadline=80,
            seed=int.from_bytes(os.urandom(4)),
            connect=mesh.a.connect,
        )
    finally:
        srv.stop()
    s.assert_clean()
    assert s.mismatched_bytes == 0
    cs, ss = stats(mesh.client), stats(mesh.server)
    assert ss["hbone_status"][200] == 1000
    # two workers on A: at most one pooled connection each (<= 100 streams at a time)
    assert 1 <= cs["hbone_connections_opened"] <= 2 * ((32 + 99) // 100), cs
    assert ss["hbone_connections_opened"] == cs["hbone_connections_opened"]


def test_upstream_refused_is_503(mesh: Mesh, engine_log: EventLog) -> None:
    """Inside node B nothing listens on the target port: B's engine gets ECONNREFUSED and
    answers 503; A's client sees a failed connect (status 503) or a reset, counted on both."""
    mesh.server.subscribe(engine_log)
    closed = mesh.b.listen(family=mesh.family)
    port = closed.getsockname()[1]
    closed.close()  # now nothing listens there: a connect inside B is refused
    with pytest.raises(ConnectError) as ei:
        mesh.a.call(mesh.client.connect, (mesh.b_ip, port), expect=[ZTUN_SERVER], timeout=10)
    assert ei.value.status == 503
    fwd = mesh.a.call(
        mesh.client.forward,
        ("127.0.0.1", 0),
        (mesh.b_ip, port),
        expect=[ZTUN_SERVER],
        protocol="hbone",
    )
    # the client is reset (possibly already while connect() waits for writability)
    try:
        c = mesh.a.connect(fwd.address)
        c.settimeout(10)
        try:
            assert c.recv(1) == b""
        except ConnectionResetError:
            pass
        finally:
            c.close()
    except ConnectionResetError:
        pass
    wait_until(lambda: stats(mesh.server)["hbone_status"][503] == 2, 10, "503 counted on B")
    wait_until(lambda: stats(mesh.client)["hbone_status"][503] == 2, 10, "503 counted on A")
    assert stats(mesh.server)["close_reasons"]["connect_refused"] == 2
    closes = wait_until(lambda: [e for e in engine_log.closes() if e.http_status == 503], 10, "")
    assert all(e.reason == "connect_refused" and e.peer_id == ZTUN_CLIENT for e in closes)


def test_target_not_on_node_b_is_400(mesh: Mesh) -> None:
    """A CONNECT for an address B does not serve (A's own) is refused with 400."""
    with pytest.raises(ConnectError) as ei:
        mesh.a.call(
            mesh.client.connect,
            (mesh.a.addr(mesh.family), 8080),
            expect=[ZTUN_SERVER],
            via=(mesh.b_ip, HBONE_PORT),
            timeout=10,
        )
    assert ei.value.status == 400
    assert stats(mesh.server)["hbone_status"][400] == 1
