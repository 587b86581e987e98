"""HBONE interop with independent HTTP/2 implementations, both directions.

Every test runs against Node.js's built-in ``http2`` (nghttp2 inside, a separate process)
and Python's ``h2`` (a pure-Python state machine), each over its own TLS stack, verifying
ztun's chain and SPIFFE ID while ztun verifies theirs. What is checked is what the peer
saw on the wire: request headers, SETTINGS, the connection window, END_STREAM, RST_STREAM.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness.integrity import ConnSpec
from harness.servers import EchoServer, TransformServer

from hbone.peers import KINDS, ClientPeer, ServerPeer, client_peer, server_peer
from hbone.util import OTHER, PEER, ZTUN_CLIENT, ZTUN_SERVER, PeerFiles, stats, wait_until
from ztun import Tunnel
from ztun._core import _engine
from ztun.errors import ConnectError
from ztun.mesh import TunnelSocket

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
CONNECT_ERROR = 0xA  # RFC 9113 §8.5: the TCP connection was reset
CANCEL = 0x8
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
BAGGAGE = (
    "k8s.cluster.name=c1,k8s.namespace.name=ns1,k8s.deployment.name=web,"
    "service.name=web,service.version=v1"
)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8, thread_name_prefix="interop") as ex:
        yield ex


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def peer_server(kind: str, pki: dict[str, PeerFiles]) -> Iterator[ServerPeer]:
    with server_peer(kind, pki["peer"], mode="script", expect_client=ZTUN_CLIENT) as p:
        yield p


def rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def recv_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until EOF."""
    s.settimeout(timeout)
    out = bytearray()
    while chunk := s.recv(1 << 16):
        out += chunk
    return bytes(out)


def recv_exact(s: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise AssertionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def expect_reset(s: socket.socket, *, fin_first_ok: bool = False, timeout: float = 10.0) -> None:
    """The TCP peer reset us: recv raises ECONNRESET. With ``fin_first_ok`` a clean EOF may
    come first (Node's ``stream.close(code)`` sends END_STREAM before its RST_STREAM, and
    ztun relays both in order), but the RST must follow: a write then fails."""
    s.settimeout(timeout)
    try:
        while s.recv(1 << 16):
            pass
    except ConnectionResetError:
        return
    assert fin_first_ok, "got a clean FIN where a TCP RST was expected"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            s.send(b"x")
        except (ConnectionResetError, BrokenPipeError):
            return
        time.sleep(0.02)
    raise AssertionError("a FIN came and no RST followed")


def check_connect_headers(raw: list[tuple[str, str]], authority: str) -> dict[str, str]:
    """The request as HBONE wants it: CONNECT, authority ip:port, no :path/:scheme, a W3C
    traceparent; pseudo-headers first. Returns the headers as a dict."""
    names = [k for k, _ in raw]
    assert len(names) == len(set(names)), f"duplicate headers: {raw}"
    h = dict(raw)
    assert h[":method"] == "CONNECT"
    assert h[":authority"] == authority
    assert ":path" not in h and ":scheme" not in h and ":protocol" not in h, raw
    pseudo = [k for k in names if k.startswith(":")]
    assert names[: len(pseudo)] == pseudo, f"pseudo-headers must come first: {names}"
    m = TRACEPARENT.match(h.get("traceparent", ""))
    assert m, f"traceparent is not W3C: {h.get('traceparent')!r}"
    assert int(m.group(1), 16) != 0 and int(m.group(2), 16) != 0
    return h


def payload(n: int) -> bytes:
    return os.urandom(n)


# ====================================================================== ztun -> peer
def test_outbound_headers_settings_window(
    peer_server: ServerPeer, client_tunnel: Tunnel, pool: ThreadPoolExecutor
) -> None:
    """Tunnel.connect, forward(protocol="hbone") and a listener with baggage all become CONNECT
    streams on ONE pooled connection; the peer sees exactly the HBONE request headers and
    ztun's SETTINGS (stream window 4 MiB, max frame 1 MiB, no push) and 16 MiB connection
    window; each connection has its own traceparent, equal to what ztun reports."""
    t = client_tunnel
    via = peer_server.address
    # 1. Tunnel.connect (no TCP source: the application is local)
    fut = pool.submit(t.connect, ("127.0.0.1", 9000), expect=[PEER], via=via)
    s0 = peer_server.stream(0)
    h0 = check_connect_headers(s0.raw, "127.0.0.1:9000")
    s0.respond(200)
    sock = fut.result(10)
    assert isinstance(sock, TunnelSocket)
    assert sock.peer_id == PEER
    assert sock.target == ("127.0.0.1", 9000)
    assert sock.trace == h0["traceparent"]
    sock.close()
    # 2. forward(protocol="hbone"): forwarded for="<client ip:port>"
    fwd = t.forward(("127.0.0.1", 0), ("127.0.0.1", 9001), expect=[PEER], via=via)
    c = socket.create_connection(fwd.address, timeout=10)
    s1 = peer_server.stream(1)
    h1 = check_connect_headers(s1.raw, "127.0.0.1:9001")
    src = c.getsockname()
    assert h1.get("forwarded") == f'for="{src[0]}:{src[1]}"'
    assert "baggage" not in h1
    s1.respond(200)
    c.close()
    # 3. a listener with baggage configured (the engine's knob; Tunnel has none yet)
    engine = t._require_engine()
    _, addr = engine.add_listener(
        _engine.MODE_HBONE_OUT,
        ("127.0.0.1", 0),
        via,
        target=("127.0.0.1", 9002),
        tls=t._tls,
        expect=[PEER],
        baggage=BAGGAGE,
    )
    c = socket.create_connection(addr, timeout=10)
    s2 = peer_server.stream(2)
    h2_ = check_connect_headers(s2.raw, "127.0.0.1:9002")
    assert h2_.get("baggage") == BAGGAGE
    s2.respond(200)
    c.close()
    traces = {h0["traceparent"], h1["traceparent"], h2_["traceparent"]}
    assert len(traces) == 3, "traceparent must be fresh per connection"
    assert len({tp.split("-")[1] for tp in traces}) == 3, "trace ids must differ"
    # One pooled connection, ztun's identity, ztun's settings.
    assert peer_server.connections() == 1
    assert stats(t)["hbone_connections_opened"] == 1
    assert peer_server.client_ids(0) == [ZTUN_CLIENT]
    st = peer_server.settings(0)
    assert st["initial_window_size"] == 4 * MiB
    assert st["max_frame_size"] == 1 * MiB
    assert st.get("enable_push", 0) == 0
    assert peer_server.conn_window(0) == 16 * MiB


@pytest.mark.parametrize("first", ["ztun", "peer"])
def test_outbound_half_close(
    first: str, peer_server: ServerPeer, client_tunnel: Tunnel, pool: ThreadPoolExecutor
) -> None:
    """FIN -> END_STREAM and END_STREAM -> FIN, in both orders, data intact around them
    (more than a default 64 KiB window each way, so WINDOW_UPDATEs are exercised)."""
    up, down = payload(300_000), payload(200_000)
    fut = pool.submit(
        client_tunnel.connect, ("127.0.0.1", 9000), expect=[PEER], via=peer_server.address
    )
    st = peer_server.stream(0)
    st.respond(200)
    sock = fut.result(10)
    try:
        if first == "ztun":
            sock.sendall(up)
            sock.shutdown(socket.SHUT_WR)
            assert st.data(len(up)) == up
            st.wait_end()
            assert not st.ended() or st.reset_code() is None
            # our write side is closed, our read side still works
            st.write(down)
            st.end()
            assert recv_all(sock) == down
        else:
            st.write(down)
            st.end()
            assert recv_all(sock) == down  # END_STREAM arrived as EOF
            sock.sendall(up)  # and we may still send
            sock.shutdown(socket.SHUT_WR)
            assert st.data(len(up)) == up
            st.wait_end()
        assert st.reset_code() is None
    finally:
        sock.close()


def test_outbound_rst_both_ways(peer_server: ServerPeer, client_tunnel: Tunnel) -> None:
    """A TCP RST from the client becomes RST_STREAM(CONNECT_ERROR) at the peer; an RST_STREAM
    from the peer becomes a TCP RST to the client (forward with protocol="hbone")."""
    fwd = client_tunnel.forward(
        ("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER], via=peer_server.address
    )
    # client resets
    c = socket.create_connection(fwd.address, timeout=10)
    st = peer_server.stream(0)
    st.respond(200)
    c.sendall(b"before the reset")
    assert st.data(16) == b"before the reset"
    rst_close(c)
    assert st.wait_reset() == CONNECT_ERROR
    assert not st.ended(), "an RST must not look like a FIN"
    # peer resets (RST_STREAM alone)
    c = socket.create_connection(fwd.address, timeout=10)
    st = peer_server.stream(1)
    st.respond(200)
    st.write(b"hello")
    assert recv_exact(c, 5) == b"hello"
    st.rst_only()
    expect_reset(c)
    c.close()
    # peer resets through its usual API (Node: END_STREAM, then RST_STREAM; ztun relays both)
    c = socket.create_connection(fwd.address, timeout=10)
    st = peer_server.stream(2)
    st.respond(200)
    st.rst(CANCEL)
    expect_reset(c, fin_first_ok=peer_server.kind == "node")
    c.close()


@pytest.mark.parametrize(
    ("status", "reason"),
    [(401, "policy_denied"), (503, "upstream_status"), (400, "upstream_status")],
)
def test_outbound_error_status(
    status: int,
    reason: str,
    peer_server: ServerPeer,
    client_tunnel: Tunnel,
    pool: ThreadPoolExecutor,
) -> None:
    """A non-200 answer fails the connect with that status; the pooled connection stays usable."""
    fut = pool.submit(
        client_tunnel.connect, ("127.0.0.1", 9000), expect=[PEER], via=peer_server.address
    )
    peer_server.stream(0).respond(status, end=True)
    with pytest.raises(ConnectError) as ei:
        fut.result(10)
    assert ei.value.status == status
    assert ei.value.reason == reason
    assert (
        stats(client_tunnel)["hbone_status"][status if status in (400, 401, 503) else "other"] == 1
    )
    # the next connect reuses the connection
    fut = pool.submit(
        client_tunnel.connect, ("127.0.0.1", 9000), expect=[PEER], via=peer_server.address
    )
    peer_server.stream(1).respond(200)
    fut.result(10).close()
    assert peer_server.connections() == 1


def test_outbound_verifies_peer_identity(peer_server: ServerPeer, client_tunnel: Tunnel) -> None:
    """ztun refuses a peer whose SPIFFE ID is not expected (no CONNECT is ever sent)."""
    with pytest.raises(ConnectError) as ei:
        client_tunnel.connect(
            ("127.0.0.1", 9000), expect=[OTHER], via=peer_server.address, timeout=10
        )
    assert ei.value.reason == "tls_error"
    wait_until(lambda: stats(client_tunnel)["hbone_close_reasons"]["tls_error"] == 1, 10, "counted")


def test_outbound_peer_verifies_ztun(
    kind: str, pki: dict[str, PeerFiles], client_tunnel: Tunnel
) -> None:
    """The peer refuses ztun when ztun is not the client it expects."""
    with (
        server_peer(kind, pki["peer"], mode="script", expect_client=OTHER) as p,
        pytest.raises(ConnectError),
    ):
        client_tunnel.connect(("127.0.0.1", 9000), expect=[PEER], via=p.address, timeout=10)


# ====================================================================== peer -> ztun
@pytest.fixture
def hbone_server(server_tunnel: Tunnel) -> Iterator[tuple[Tunnel, tuple[str, int]]]:
    h = server_tunnel.serve(("127.0.0.1", 0))
    yield server_tunnel, h.address
    h.close()


def make_client(
    kind: str, addr: tuple[str, int], files: PeerFiles, expect: str = ZTUN_SERVER
) -> ClientPeer:
    return client_peer(kind, addr, files, expect=expect)


def test_inbound_settings_window_and_facts(
    kind: str, hbone_server: tuple[Tunnel, tuple[str, int]], pki: dict[str, PeerFiles]
) -> None:
    """ztun's server SETTINGS (200 streams, 4 MiB stream window, 1 MiB frames) and 16 MiB
    connection window as the peer sees them; the request's traceparent/forwarded/baggage
    become the connection's facts; the delivered socket carries the peer's SPIFFE ID."""
    t, addr = hbone_server
    closes: list[object] = []
    t.subscribe(lambda ev: closes.append(ev) if ev.kind == "close" else None)
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with make_client(kind, addr, pki["peer"]) as c:
        assert c.server_ids() == [ZTUN_SERVER]
        st = c.settings()
        assert st["max_concurrent_streams"] == 200
        assert st["initial_window_size"] == 4 * MiB
        assert st["max_frame_size"] == 1 * MiB
        s = c.open(
            "127.0.0.1:8080",
            {"traceparent": tp, "forwarded": 'for="198.18.0.9:4711"', "baggage": BAGGAGE},
        )
        app = t.accept(timeout=10)
        assert s.status() == 200
        assert c.conn_window() == 16 * MiB
        assert app.peer_id == PEER
        assert app.target == ("127.0.0.1", 8080)
        assert app.trace == tp
        s.write(b"ping")
        s.end()
        assert recv_all(app) == b"ping"
        app.sendall(b"pong")
        app.close()
        assert s.data(4) == b"pong"
        s.wait_end()
        ev = wait_until(
            lambda: [e for e in closes if getattr(e, "trace", None) == tp], 10, "close event"
        )[0]
        assert ev.baggage == BAGGAGE
        assert ev.peer_id == PEER
        assert ev.http_status == 200


@pytest.mark.parametrize("first", ["peer", "ztun"])
def test_inbound_half_close(
    kind: str, first: str, hbone_server: tuple[Tunnel, tuple[str, int]], pki: dict[str, PeerFiles]
) -> None:
    t, addr = hbone_server
    up, down = payload(300_000), payload(200_000)
    with make_client(kind, addr, pki["peer"]) as c:
        s = c.open("127.0.0.1:8080")
        app = t.accept(timeout=10)
        assert s.status() == 200
        try:
            if first == "peer":
                s.write(up)
                s.end()
                assert recv_all(app) == up  # END_STREAM -> EOF
                app.sendall(down)  # the other direction is still open
                app.shutdown(socket.SHUT_WR)
                assert s.data(len(down)) == down
                s.wait_end()
            else:
                app.sendall(down)
                app.shutdown(socket.SHUT_WR)
                assert s.data(len(down)) == down
                s.wait_end()  # FIN -> END_STREAM
                s.write(up)
                s.end()
                assert recv_all(app) == up
        finally:
            app.close()


class TcpTarget:
    """A listening TCP socket on 127.0.0.1; ``accept()`` gives the next connection."""

    def __init__(self) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(10)
        self.address = self.lsock.getsockname()[:2]
        self.accepted: list[socket.socket] = []

    def accept(self) -> socket.socket:
        s, _ = self.lsock.accept()
        self.accepted.append(s)
        return s

    def close(self) -> None:
        for s in self.accepted:
            s.close()
        self.lsock.close()


@pytest.fixture
def tcp_target() -> Iterator[TcpTarget]:
    t = TcpTarget()
    yield t
    t.close()


def test_inbound_rst_both_ways(
    kind: str,
    server_tunnel: Tunnel,
    pki: dict[str, PeerFiles],
    tcp_target: TcpTarget,
) -> None:
    """Node mode (the engine dials the authority): RST_STREAM from the peer resets the TCP
    connection to the target; a TCP RST from the target becomes RST_STREAM(CONNECT_ERROR)."""
    h = server_tunnel.serve(("127.0.0.1", 0), deliver=False)
    port = tcp_target.address[1]
    with make_client(kind, h.address, pki["peer"]) as c:
        for how in ("rst_only", "rst"):
            s = c.open(f"127.0.0.1:{port}")
            up = tcp_target.accept()
            assert s.status() == 200
            s.write(b"abc")
            assert recv_exact(up, 3) == b"abc"
            if how == "rst_only":
                s.rst_only()
                expect_reset(up)
            else:
                s.rst(CANCEL)
                expect_reset(up, fin_first_ok=kind == "node")
        s = c.open(f"127.0.0.1:{port}")
        up = tcp_target.accept()
        assert s.status() == 200
        up.sendall(b"xyz")
        assert s.data(3) == b"xyz"
        rst_close(up)
        assert s.wait_reset() == CONNECT_ERROR
        assert not s.ended()


def test_inbound_node_mode_concurrent_echo(
    kind: str, server_tunnel: Tunnel, pki: dict[str, PeerFiles], echo_server: EchoServer
) -> None:
    """20 concurrent streams of random sizes through the engine's dialing mode to an echo
    server: every byte comes back (SHA-256 compared by the peer)."""
    h = server_tunnel.serve(("127.0.0.1", 0), deliver=False)
    port = echo_server.address[1]
    sizes = [0, 1, 1000, 65535, 65536, 65537, 300_000, 1 * MiB + 3] + [
        random.randrange(1 * MiB) for _ in range(12)
    ]
    with make_client(kind, h.address, pki["peer"]) as c:
        streams = [(c.open(f"127.0.0.1:{port}"), payload(n)) for n in sizes]
        for s, data in streams:
            assert s.status() == 200
            s.write(data)
            s.end()
        for s, data in streams:
            got = s.data(len(data), timeout=30)
            s.wait_end()
            assert len(got) == len(data) and got == data
    assert stats(server_tunnel)["hbone_connections_opened"] == 1


def test_inbound_refuses_unknown_ca(
    kind: str, hbone_server: tuple[Tunnel, tuple[str, int]], pki: dict[str, PeerFiles]
) -> None:
    """ztun refuses a client whose certificate does not chain to its trust bundle."""
    t, addr = hbone_server
    with pytest.raises((ConnectionError, OSError, AssertionError)):
        c = make_client(kind, addr, pki["stranger"])
        try:
            c.open("127.0.0.1:8080").status(5)
        finally:
            c.close()
    wait_until(lambda: stats(t)["hbone_close_reasons"]["tls_error"] >= 1, 10, "tls_error counted")


def test_inbound_peer_verifies_ztun_chain(
    kind: str, pki: dict[str, PeerFiles], make_tunnel: Callable[..., Tunnel]
) -> None:
    """The peer refuses a ztun server whose chain is not from the peer's CA, and one whose
    SPIFFE ID is not the expected one."""
    from ztun.testing import SpiffeCA

    stranger_ca = SpiffeCA("example.org", _root_name="stranger root")
    rogue = Tunnel(
        identity=stranger_ca.issue_svid(ZTUN_SERVER), trust=stranger_ca.bundle, workers=1
    )
    with rogue:
        h = rogue.serve(("127.0.0.1", 0))
        with pytest.raises((ConnectionError, OSError, AssertionError)):
            make_client(kind, h.address, pki["peer"]).close()
    good = make_tunnel(ZTUN_SERVER)
    h = good.serve(("127.0.0.1", 0))
    with pytest.raises((ConnectionError, OSError, AssertionError)):
        make_client(kind, h.address, pki["peer"], expect=OTHER).close()


# ====================================================================== through Node as a proxy
def specs_resetting_only(side: str, server: TransformServer, n: int, seed: int) -> list[ConnSpec]:
    """Integrity specs whose RSTs (15 %) all come from ``side``: the side that touches ztun's
    TCP end. Resets that enter at Node's TCP end are left out: libuv reads the data queued
    before an RST and then reports EOF (it consumes the error with SO_ERROR first), so Node
    turns such a reset into END_STREAM — Node's behaviour, not what these tests measure."""
    from harness.integrity import make_specs

    specs = make_specs(
        n, max_size=2 * MiB, seed=seed, rst_fraction=0.15, first_id=server.next_conn_ids(n)
    )
    for sp in specs:
        if sp.rst not in ("none", side):
            sp.rst, sp.rst_after = "none", 0
    return specs


def test_integrity_via_node_proxy(
    pki: dict[str, PeerFiles], client_tunnel: Tunnel, transform_server: TransformServer
) -> None:
    """ztun forward(protocol="hbone") -> Node http2 CONNECT proxy -> TCP server: random sizes
    and chunking, both half-close orders, RSTs from either end; SHA-256 both ways."""
    from harness.integrity import run_integrity

    from hbone.peers import NodeServer

    with NodeServer(pki["peer"], mode="proxy", expect_client=ZTUN_CLIENT) as node:
        fwd = client_tunnel.forward(
            ("127.0.0.1", 0), transform_server.address, expect=[PEER], via=node.address
        )
        specs = specs_resetting_only("client", transform_server, 60, seed=5)
        s = run_integrity(fwd.address, transform_server, concurrency=12, deadline=40, specs=specs)
    s.assert_clean()
    assert stats(client_tunnel)["hbone_connections_opened"] == 1


def test_integrity_from_node_client(
    pki: dict[str, PeerFiles], server_tunnel: Tunnel, transform_server: TransformServer
) -> None:
    """TCP client -> Node http2 CONNECT client (pooled session) -> ztun HBONE server (node mode)
    -> TCP server: the same integrity run in the other direction."""
    from harness.integrity import run_integrity

    from hbone.nodepeer import NodePeer

    h = server_tunnel.serve(("127.0.0.1", 0), deliver=False)
    target = transform_server.address
    args = [
        *pki["peer"].node_args(),
        "--to",
        f"127.0.0.1:{h.address[1]}",
        "--expect-server",
        ZTUN_SERVER,
        "--forward",
        "127.0.0.1:0",
        "--target",
        f"{target[0]}:{target[1]}",
    ]
    with contextlib.closing(NodePeer("h2_client.js", args)) as node:
        port = node.wait("listening")["port"]
        specs = specs_resetting_only("server", transform_server, 60, seed=6)
        s = run_integrity(
            ("127.0.0.1", port), transform_server, concurrency=12, deadline=40, specs=specs
        )
    s.assert_clean()
    assert stats(server_tunnel)["hbone_connections_opened"] == 1


# ====================================================================== IPv6 authorities
def test_ipv6_authority_both_ways(
    kind: str,
    pki: dict[str, PeerFiles],
    make_tunnel: Callable[..., Tunnel],
    make_server: Callable[..., EchoServer],
) -> None:
    """``:authority`` is ``[ip6]:port`` on the wire (ztun -> peer) and is accepted as such
    (peer -> ztun), over connections on ::1."""
    client = make_tunnel(ZTUN_CLIENT)
    with server_peer(kind, pki["peer"], mode="script", expect_client=ZTUN_CLIENT, host="::1") as p:
        fwd = client.forward(("127.0.0.1", 0), ("::1", 9000), expect=[PEER], via=p.address)
        c = socket.create_connection(fwd.address, timeout=10)
        st = p.stream(0)
        check_connect_headers(st.raw, "[::1]:9000")
        st.respond(200)
        st.write(b"v6")
        assert recv_exact(c, 2) == b"v6"
        c.close()
    echo = make_server("echo", host="::1")
    server = make_tunnel(ZTUN_SERVER)
    h = server.serve(("::1", 0), deliver=False)  # workloads: the listen address, ::1
    with make_client(kind, h.address, pki["peer"]) as pc:
        s = pc.open(f"[::1]:{echo.address[1]}")
        assert s.status() == 200
        s.write(b"over v6")
        s.end()
        assert s.data(7) == b"over v6"
        s.wait_end()
