"""The original source, shown to the app: ztun's socket to a captured app, tagged with
setsockopt(ZTUN_SO_ORIGINAL_SRC, client) by ztun's process, makes the app's accept() and
getpeername() return that client (cgroup/setsockopt on ztun's cgroup files it; the app's
getpeername hooks, which accept() runs too, show it). The engine's side is one setsockopt call
(docs/capture.md); here a plain relay in ztun's cgroup stands in for it, steered to by
sk_lookup exactly like the engine's plaintext listener."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from capture_rig import EngineFeatures, Mesh, Side, need_engine_source
from harness.cgroup import Cgroup
from harness.netns import Node

from ztun import capture
from ztun.testing import SpiffeCA

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]

SO_ORIGINAL_SRC = 0x7A74


def sockaddr(addr: tuple[str, int]) -> bytes:
    """struct sockaddr_in / sockaddr_in6 as the kernel lays them out."""
    ip, port = addr[0], addr[1]
    if ":" in ip:
        return (
            struct.pack("=H", socket.AF_INET6)
            + struct.pack("!HI", port, 0)
            + (socket.inet_pton(socket.AF_INET6, ip) + b"\0" * 4)
        )
    return (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", port)
        + (socket.inet_aton(ip) + b"\0" * 8)
    )


class Relay:
    """Accepts what sk_lookup steers to it, connects to the original destination (its own
    address: getsockname), optionally tags that socket with the client, copies both ways."""

    def __init__(self, node: Node, family: int, tag: bool) -> None:
        self.node, self.tag = node, tag
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.ls = node.listen(host, 0)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, peer = self.ls.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c, peer), daemon=True).start()

    def _serve(self, c: socket.socket, peer: tuple[str, int]) -> None:
        dst = c.getsockname()[:2]  # the original destination (sk_lookup keeps it)
        u = self.node.socket(c.family)
        with c, u:
            if self.tag:  # before connect(): the app may accept as soon as the SYN arrives
                u.setsockopt(
                    socket.IPPROTO_IPV6 if c.family == socket.AF_INET6 else socket.SOL_IP,
                    SO_ORIGINAL_SRC,
                    sockaddr(peer),
                )
            u.setblocking(False)
            u.connect_ex(dst)
            select.select([], [u], [], 5)
            u.setblocking(True)
            ends = {c: u, u: c}
            open_ = {c, u}
            while open_:
                r, _, _ = select.select(list(open_), [], [], 10)
                if not r:
                    return
                for s in r:
                    data = s.recv(1 << 16)
                    if data:
                        ends[s].sendall(data)
                    else:
                        open_.discard(s)
                        with contextlib.suppress(OSError):
                            ends[s].shutdown(socket.SHUT_WR)


@pytest.fixture
def server_side(
    two_nodes: tuple[Node, Node], engine_cgroup: Cgroup, ca: SpiffeCA
) -> Iterator[tuple[Node, Side, capture.CaptureProgram]]:
    a, b = two_nodes
    side = Side(b, Cgroup.create(), "server", ca)
    try:
        with capture.CaptureProgram() as prog:
            yield a, side, prog
    finally:
        side.cg.remove()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("tag", [True, False], ids=["tagged", "untagged"])
def test_app_sees_the_client_ztun_names(
    server_side: tuple[Node, Side, capture.CaptureProgram], family: int, tag: bool
) -> None:
    a, b, prog = server_side
    relay = Relay(b.node, family, tag)
    v6 = family == socket.AF_INET6
    ls = capture.Listeners(**{"plain6" if v6 else "plain4": relay.ls})
    prog.add("src", cgroup=b.cg.path, netns=b.node.path, listeners=ls)
    b.server("sha-server", "9000")
    client = a.ip6 if v6 else a.ip4
    res = Side(a, b.cg, "client", b.ca).app(
        "sha-client", b.addr(6 if v6 else 4), "9000", str(1 << 20), captured=False
    )
    assert res["ok"], res
    st = prog.stats()
    assert st["in_plaintext"] >= 1, st  # it did go through the relay
    if tag:
        assert res["server_saw"] == client  # accept() shows the client, not the relay
        assert st["source_stored"] >= 1 and st["source_shown"] >= 1
    else:
        assert res["server_saw"] == (b.node.ip6 if v6 else b.node.ip4)  # the relay's address
    prog.remove("src")


@pytest.mark.parametrize("family", [4, 6])
def test_app_behind_ztun_sees_the_client(mesh: Mesh, engine: EngineFeatures, family: int) -> None:
    """Through the engine: HBONE (both captured) and plaintext (A not in the mesh)."""
    mesh.start(mesh.b)
    mesh.b.server("sha-server", "9000")
    plain = mesh.a.app("sha-client", mesh.b.addr(family), "9000", str(1 << 16), captured=False)
    need_engine_source(engine)
    assert plain["ok"] and plain["server_saw"] == mesh.a.addr(family), plain
    mesh.start(mesh.a)
    res = mesh.a.app("sha-client", mesh.b.addr(family), "9000", str(1 << 16))
    assert res["ok"] and res["local"][0] in ("127.0.0.1", "::1"), res  # captured
    # HBONE: the client workload's address (the HBONE peer; its port is not the app's)
    assert res["server_saw"] == mesh.a.addr(family), res
