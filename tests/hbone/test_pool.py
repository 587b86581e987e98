"""The outbound pool: which streams share a connection, how connections are set up, and
that a connection that went bad (GOAWAY, no PING reply) is never handed out again.

Pool key (DESIGN.md §4): (source identity, acceptable destination identities, destination
ip:15008, source ip). The engine implies the source ip (it never binds one: the kernel
picks it for every connection it makes), which is what these tests see.

The PING tests need ~30 s of wall time (PING after 10 s idle, drop 20 s without reply, both
fixed in the engine): they run in the background of this module's other tests
(``keepalive`` fixture) and are checked by the last tests.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from harness.fds import FdTracker

from hbone import h2peer
from hbone.peers import KINDS, H2ServerPeer, server_peer
from hbone.util import (
    PEER,
    TD,
    ZTUN_CLIENT,
    ZTUN_SERVER,
    EventLog,
    LineHandler,
    PeerFiles,
    close_within,
    stats,
    wait_until,
)
from ztun import Tunnel
from ztun.testing import SpiffeCA, write_svid_files
from ztun.tunnel import Forward

pytestmark = pytest.mark.timeout(90)
OTHER_CLIENT = f"spiffe://{TD}/ns/ztun/sa/other-client"
ALT_PEER = f"spiffe://{TD}/ns/peer/sa/alternate"


def echo_via(fwd_addr: tuple[str, int], msg: bytes = b"ping", timeout: float = 10.0) -> bytes:
    """One TCP connection through a forward to an echo peer; returns what came back."""
    with socket.create_connection(fwd_addr, timeout=timeout) as c:
        c.sendall(msg)
        c.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := c.recv(1 << 16):
            out += chunk
        return out


@pytest.fixture
def echo_peer(pki: dict[str, PeerFiles]) -> Iterator[H2ServerPeer]:
    with H2ServerPeer(pki["peer"], mode="echo") as p:
        yield p


# ---------------------------------------------------------------- the key
def test_same_key_shares_one_connection(client_tunnel: Tunnel, echo_peer: H2ServerPeer) -> None:
    """Different listeners (two forwards, two local addresses, expect lists in another
    order) with the same key use one connection."""
    t = client_tunnel
    a = t.forward(
        ("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER, ALT_PEER], via=echo_peer.address
    )
    b = t.forward(
        ("127.0.0.2", 0), ("127.0.0.1", 9001), expect=[ALT_PEER, PEER], via=echo_peer.address
    )
    for fwd in (a, b, a, b):
        assert echo_via(fwd.address) == b"ping"
    assert stats(t)["hbone_connections_opened"] == 1
    assert echo_peer.connections() == 1


def test_expect_set_is_part_of_the_key(client_tunnel: Tunnel, echo_peer: H2ServerPeer) -> None:
    t = client_tunnel
    a = t.forward(("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER], via=echo_peer.address)
    b = t.forward(
        ("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER, ALT_PEER], via=echo_peer.address
    )
    assert echo_via(a.address) == b"ping"
    assert echo_via(b.address) == b"ping"
    assert echo_via(a.address) == b"ping"
    assert stats(t)["hbone_connections_opened"] == 2
    assert echo_peer.connections() == 2


def test_destination_is_part_of_the_key(client_tunnel: Tunnel, pki: dict[str, PeerFiles]) -> None:
    """Two HBONE servers (another port; IPv6) -> a connection each; the CONNECT authority
    alone (same server) does not split the pool."""
    with contextlib.ExitStack() as stack:
        p4 = stack.enter_context(H2ServerPeer(pki["peer"], mode="echo"))
        p4b = stack.enter_context(H2ServerPeer(pki["peer"], mode="echo"))
        p6 = stack.enter_context(H2ServerPeer(pki["peer"], mode="echo", host="::1"))
        t = client_tunnel
        for p in (p4, p4b, p6, p4):
            for target in (("127.0.0.1", 9000), ("127.0.0.1", 9001)):
                fwd = t.forward(("127.0.0.1", 0), target, expect=[PEER], via=p.address)
                assert echo_via(fwd.address) == b"ping"
                fwd.close()
        assert stats(t)["hbone_connections_opened"] == 3
        assert (p4.connections(), p4b.connections(), p6.connections()) == (1, 1, 1)


@pytest.mark.parametrize(
    "resumption",
    [True, False],
    ids=["resumption", "no_resumption"],
)
def test_source_identity_is_part_of_the_key(
    resumption: bool, ca: SpiffeCA, make_tunnel: Callable[..., Tunnel], echo_peer: H2ServerPeer
) -> None:
    """A renewed certificate of the same identity keeps using the pooled connection; another
    identity gets its own connection, and the peer sees that identity on it (with session
    resumption too: at 00f3a4b the new connection resumed the old identity's session)."""
    t = make_tunnel(resumption=resumption)
    fwd = t.forward(("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER], via=echo_peer.address)
    assert echo_via(fwd.address) == b"ping"
    t.set_identity(ca.issue_svid(ZTUN_CLIENT))  # rotation, same SPIFFE ID
    assert echo_via(fwd.address) == b"ping"
    assert stats(t)["hbone_connections_opened"] == 1
    t.set_identity(ca.issue_svid(OTHER_CLIENT))
    assert echo_via(fwd.address) == b"ping"
    assert stats(t)["hbone_connections_opened"] == 2
    assert echo_peer.client_ids(0) == [ZTUN_CLIENT]
    assert echo_peer.client_ids(1) == [OTHER_CLIENT]


# ---------------------------------------------------------------- setting a key up
def concurrent(n: int, fn: Callable[[], object]) -> list[object]:
    """Run ``fn`` ``n`` times at once (released together); results or exceptions."""
    gate = threading.Barrier(n)

    def one() -> object:
        gate.wait(10)
        try:
            return fn()
        except Exception as e:
            return e

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda _: one(), range(n)))


def test_concurrent_first_connects_share_one_slow_handshake(
    client_tunnel: Tunnel, pki: dict[str, PeerFiles]
) -> None:
    """20 connects at once to a peer that takes 1.5 s to answer a TLS handshake: one
    connection is set up and all 20 streams complete on it (nobody queues behind another's
    handshake to start its own)."""
    with H2ServerPeer(pki["peer"], mode="echo", handshake_delay=1.5) as p:
        fwd = client_tunnel.forward(
            ("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER], via=p.address
        )
        results = concurrent(20, lambda: echo_via(fwd.address, b"x" * 1000, timeout=20))
        assert results == [b"x" * 1000] * 20, [r for r in results if r != b"x" * 1000][:3]
        assert p.srv.tcp_accepted == 1
        assert stats(client_tunnel)["hbone_connections_opened"] == 1


def test_pending_handshake_does_not_hold_up_other_keys(
    make_tunnel: Callable[..., Tunnel], pki: dict[str, PeerFiles], echo_peer: H2ServerPeer
) -> None:
    """While the handshake to one peer hangs (it never answers), another key's connection is
    set up and used; the hung one fails at the handshake timeout with that reason."""
    t = make_tunnel(handshake_timeout=2.0, connect_timeout=8.0)
    with H2ServerPeer(pki["peer"], mode="echo", handshake_delay=60) as hole:
        stuck = t.forward(("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER], via=hole.address)
        good = t.forward(
            ("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER], via=echo_peer.address
        )
        waiting = [socket.create_connection(stuck.address, timeout=10) for _ in range(5)]
        try:
            wait_until(lambda: hole.srv.tcp_accepted == 1, 5, "the hung handshake started")
            assert echo_via(good.address) == b"ping"
            assert all(_still_open(c) for c in waiting), "the stuck streams ended early"
            for c in waiting:
                c.settimeout(10)
                with contextlib.suppress(ConnectionResetError):
                    assert c.recv(1) == b""
        finally:
            for c in waiting:
                c.close()
        s = wait_until(
            lambda: stats(t)["hbone_close_reasons"]["handshake_timeout"] == 1 and stats(t),
            10,
            "handshake timeout counted",
        )
        assert s["hbone_connections_opened"] == 2


def _still_open(c: socket.socket) -> bool:
    c.setblocking(False)
    try:
        return bool(c.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        c.setblocking(True)


def test_failed_handshake_fails_its_streams_and_the_next_connect_redials(
    client_tunnel: Tunnel, pki: dict[str, PeerFiles], engine_log: EventLog
) -> None:
    """The peer resets the first connection during the handshake: the 10 streams waiting on
    it fail right then (not at a timeout), and the next connect dials a new connection
    instead of reusing the dead one."""
    t = client_tunnel
    t.subscribe(engine_log)
    with H2ServerPeer(pki["peer"], mode="echo", handshake_delay=0.5, fail_first=1) as p:
        fwd = t.forward(("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER], via=p.address)
        results = concurrent(10, lambda: echo_via(fwd.address, timeout=20))
        assert all(r != b"ping" for r in results), results
        reasons = {e.reason for e in engine_log.closes()}
        assert reasons <= {"connect_error", "tls_error", "reset_by_upstream"}, reasons
        assert echo_via(fwd.address) == b"ping"
        assert p.srv.tcp_accepted == 2
        assert stats(t)["hbone_connections_opened"] == 2


# ---------------------------------------------------------------- connections that went bad
@pytest.mark.parametrize("kind", KINDS)
def test_goaway_connection_is_never_handed_out_again(
    kind: str, client_tunnel: Tunnel, pki: dict[str, PeerFiles]
) -> None:
    """The peer sends GOAWAY (graceful: the stream in progress may finish). New streams go to
    a new connection; the old one drains and closes with its last stream."""
    t = client_tunnel
    with server_peer(kind, pki["peer"], mode="script") as p:
        fwd = t.forward(("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER], via=p.address)
        c1 = socket.create_connection(fwd.address, timeout=10)
        s1 = p.stream(0)
        s1.respond(200)
        p.goaway(0)
        p.sync(0)  # a PING after the GOAWAY came back: ztun has processed the GOAWAY
        # a new stream: on a new connection
        c2 = socket.create_connection(fwd.address, timeout=10)
        s2 = p.stream(1)
        assert s2.conn == 1, "a stream was opened on the connection that sent GOAWAY"
        s2.respond(200)
        s2.write(b"new")
        assert c2.recv(3) == b"new"
        # the old stream still works, then the old connection drains away
        c1.sendall(b"old")
        assert s1.data(3) == b"old"
        s1.write(b"bye")
        assert c1.recv(3) == b"bye"
        c1.close()
        s1.end()
        wait_until(
            lambda: stats(t)["hbone_connections_closed"] >= 1, 10, "drained connection closed"
        )
        c3 = socket.create_connection(fwd.address, timeout=10)
        assert p.stream(2).conn == 1
        c2.close()
        c3.close()
    assert stats(t)["hbone_connections_opened"] == 2


# ---------------------------------------------------------------- PING (background, ~31 s)
@dataclass
class Keepalive:
    """Started when the module starts, checked by the last tests."""

    client: Tunnel  # ztun client: one connection to a silent peer, one to a normal one
    server: Tunnel  # ztun server: one client that goes silent
    silent: H2ServerPeer
    normal: H2ServerPeer
    silent_client: h2peer.H2Client
    to_silent: Forward
    to_normal: Forward
    started: float
    log: EventLog = field(default_factory=EventLog)


@pytest.fixture(scope="module", autouse=True)
def keepalive(ca: SpiffeCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keepalive]:
    d = tmp_path_factory.mktemp("keepalive")
    bundle = str(ca.write_files(d, "ca.pem"))
    chain, key = (str(x) for x in write_svid_files(ca.issue_svid(PEER), d, "peer"))
    files = PeerFiles(PEER, chain, key, bundle)
    client = Tunnel(identity=ca.issue_svid(ZTUN_CLIENT), trust=ca.bundle, workers=1).start()
    server = Tunnel(identity=ca.issue_svid(ZTUN_SERVER), trust=ca.bundle, workers=1).start()
    silent = H2ServerPeer(files, mode="echo")
    normal = H2ServerPeer(files, mode="echo")
    ka_log = EventLog()
    client.subscribe(ka_log)
    handler = LineHandler(ka_log)
    logging.getLogger("ztun.engine").addHandler(handler)
    to_silent = client.forward(
        ("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER], via=silent.address
    )
    to_normal = client.forward(
        ("127.0.0.1", 0), ("127.0.0.1", 9000), expect=[PEER], via=normal.address
    )
    assert echo_via(to_silent.address) == b"ping"
    assert echo_via(to_normal.address) == b"ping"
    silent.srv.silent()  # from now on: no PING ACK, nothing at all
    h = server.serve(("127.0.0.1", 0))
    silent_client = h2peer.H2Client(h.address, chain, key, bundle, expect=ZTUN_SERVER)
    silent_client.settings_received()
    silent_client.ep.silent()
    ka = Keepalive(
        client,
        server,
        silent,
        normal,
        silent_client,
        to_silent,
        to_normal,
        time.monotonic(),
        ka_log,
    )
    yield ka
    logging.getLogger("ztun.engine").removeHandler(handler)
    silent_client.close()
    for t in (client, server):
        assert close_within(t, 20)
    silent.close()
    normal.close()


def test_unanswered_ping_drops_the_connection_and_it_is_not_reused(keepalive: Keepalive) -> None:
    """The peer stops answering (PING included): after the 10 s PING and 20 s without reply
    the connection is closed (io_error, logged), and the next stream dials a new one."""
    ka = keepalive
    wait_until(
        lambda: stats(ka.client)["hbone_close_reasons"]["io_error"] >= 1,
        45,
        "dead connection dropped",
    )
    assert time.monotonic() - ka.started >= 20, "dropped before 20 s without a PING reply"
    wait_until(lambda: ka.log.grep("no PING reply"), 5, "a log line")
    before = ka.silent.srv.tcp_accepted
    opened = stats(ka.client)["hbone_connections_opened"]
    # The silent peer answers new connections normally: the next stream goes to a new one.
    assert echo_via(ka.to_silent.address) == b"ping"
    assert ka.silent.srv.tcp_accepted == before + 1
    assert stats(ka.client)["hbone_connections_opened"] == opened + 1


def test_idle_connection_is_pinged_and_kept(keepalive: Keepalive) -> None:
    """An idle pooled connection (well under the 5 min idle release) is kept alive by PINGs
    every 10 s and reused. (The 5 min release itself is not testable without a knob.)"""
    ka = keepalive
    rec = ka.normal.srv.endpoints[0].record
    wait_until(lambda: rec.pings >= 2, 45, "two PINGs from ztun on the idle connection")
    assert echo_via(ka.to_normal.address) == b"ping"
    assert ka.normal.connections() == 1, "the idle connection was not reused"


def test_server_drops_a_client_that_stops_answering(keepalive: Keepalive) -> None:
    """ztun's HBONE server PINGs its clients too and drops one that does not answer."""
    ka = keepalive
    wait_until(
        lambda: stats(ka.server)["hbone_close_reasons"]["io_error"] >= 1,
        45,
        "silent client dropped by the server",
    )
    assert ka.silent_client.record.pings >= 1


def test_no_fd_left_after_dead_connections(keepalive: Keepalive) -> None:
    wait_until(lambda: stats(keepalive.client)["hbone_close_reasons"]["io_error"] >= 1, 45, "")
    with FdTracker(timeout=10):
        assert echo_via(keepalive.to_normal.address) == b"ping"
