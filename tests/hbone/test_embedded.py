"""The embedded HBONE API (``Tunnel.connect`` / ``open_connection`` / ``serve`` /
``accept``) against the independent h2 peers, and the engine bugs found through it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from harness.fds import FdTracker

from hbone.h2peer import RST_STREAM, SETTINGS, H2Client, RawH2, frame
from hbone.peers import H2ServerPeer
from hbone.util import PEER, ZTUN_CLIENT, ZTUN_SERVER, PeerFiles, stats, wait_until
from ztun import Tunnel
from ztun.mesh import TunnelSocket
from ztun.testing import SpiffeCA

pytestmark = pytest.mark.timeout(60)
CANCEL = 0x8


def connect_in_thread(t: Tunnel, peer: H2ServerPeer, n: int) -> TunnelSocket:
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(t.connect, ("127.0.0.1", 9000), expect=[PEER], via=peer.address)
        peer.stream(n).respond(200)
        return fut.result(10)


def test_connect_socket_without_fin_does_not_block_the_engine(
    client_tunnel: Tunnel, pki: dict[str, PeerFiles]
) -> None:
    """Write a few bytes on a Tunnel.connect() socket and keep it open (no FIN, as every
    request/response protocol does): the bytes must reach the peer, the peer's answer must
    come back, and another connection on the same (single) worker must not stall.
    (Failed at 00f3a4b: the worker blocked in readv() on the adopted socketpair.)"""
    with H2ServerPeer(pki["peer"], mode="script") as peer:
        s = connect_in_thread(client_tunnel, peer, 0)
        st = peer.stream(0)
        try:
            s.sendall(b"hello")
            assert st.data(5, timeout=3) == b"hello", "bytes never left the socketpair"
            st.write(b"world")
            s.settimeout(3)
            assert s.recv(5) == b"world"
            fwd = client_tunnel.forward(
                ("127.0.0.1", 0), ("127.0.0.1", 9001), expect=[PEER], via=peer.address
            )
            with socket.create_connection(fwd.address, timeout=3):
                peer.stream(1, timeout=3).respond(200)
        finally:
            # Unblocks a worker stuck in readv() on the engine's end, so teardown can close.
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
            s.close()


def test_engine_end_of_connect_socket_is_nonblocking(
    client_tunnel: Tunnel, pki: dict[str, PeerFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine is edge-triggered and reads until EAGAIN: every fd it owns must be
    non-blocking, the socketpair end it adopts for Tunnel.connect() included."""
    import fcntl
    import os

    import ztun.mesh

    ends: list[int] = []
    real = socket.socketpair

    def spy(*a: object) -> tuple[socket.socket, socket.socket]:
        mine, theirs = real(*a)  # type: ignore[arg-type]
        ends.append(theirs.fileno())
        return mine, theirs

    monkeypatch.setattr(ztun.mesh.socket, "socketpair", spy)
    with H2ServerPeer(pki["peer"], mode="script") as peer:
        s = connect_in_thread(client_tunnel, peer, 0)
        with s:
            flags = fcntl.fcntl(ends[-1], fcntl.F_GETFL)  # the engine's fd, still open
            assert flags & os.O_NONBLOCK, "the engine adopted a blocking socket"


def test_connect_request_response_with_fin(
    client_tunnel: Tunnel, pki: dict[str, PeerFiles]
) -> None:
    """What works today: a request, FIN, then the response (the FIN wakes the engine)."""
    with H2ServerPeer(pki["peer"], mode="script") as peer:
        s = connect_in_thread(client_tunnel, peer, 0)
        st = peer.stream(0)
        with s:
            assert s.peer_id == PEER
            s.sendall(b"request")
            s.shutdown(socket.SHUT_WR)
            assert st.data(7) == b"request"
            st.wait_end()
            st.write(b"response")
            st.end()
            s.settimeout(10)
            got = b""
            while chunk := s.recv(100):
                got += chunk
            assert got == b"response"


async def test_open_connection_and_aaccept(make_tunnel: Callable[..., Tunnel]) -> None:
    """asyncio on both ends: open_connection() to a serve() whose connections are taken
    with aaccept(); the server authorizes on the peer's SPIFFE ID."""
    server = make_tunnel(ZTUN_SERVER)
    client = make_tunnel(ZTUN_CLIENT)
    async with server, client:
        h = server.serve(("127.0.0.1", 0))

        async def serve_one() -> str:
            s = await server.aaccept()
            assert s.peer_id == ZTUN_CLIENT
            r, w = await asyncio.open_connection(sock=s)
            data = await r.read()  # until the client's FIN
            w.write(data[::-1])
            await w.drain()
            w.close()
            await w.wait_closed()
            return data.decode()

        task = asyncio.create_task(serve_one())
        r, w = await client.open_connection(
            ("127.0.0.1", 7000), expect=[ZTUN_SERVER], via=h.address
        )
        w.write(b"abcdef")
        await w.drain()
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 10) == b"fedcba"
        w.close()
        assert await asyncio.wait_for(task, 10) == "abcdef"


def _serial(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def test_set_identity_reaches_serve_listener(
    ca: SpiffeCA, make_tunnel: Callable[..., Tunnel], pki: dict[str, PeerFiles]
) -> None:
    """After set_identity() a new handshake with serve() presents the new SVID (failed at
    00f3a4b: set_identity() skipped the HBONE listeners)."""
    t = make_tunnel(ZTUN_SERVER, resumption=False)
    h = t.serve(("127.0.0.1", 0))
    new = ca.issue_svid(ZTUN_SERVER)
    t.set_identity(new)
    f = pki["peer"]
    with H2Client(h.address, f.chain, f.key, f.ca, expect=ZTUN_SERVER) as c:
        presented = c.sock.getpeercert(binary_form=True)
    assert presented is not None
    assert _serial(presented) == new.chain[0].serial_number, "serve() still presents the old SVID"


def test_set_identity_reaches_connect(
    ca: SpiffeCA, make_tunnel: Callable[..., Tunnel], pki: dict[str, PeerFiles]
) -> None:
    """After set_identity() a new connection made by connect() presents the new SVID."""
    t = make_tunnel(ZTUN_CLIENT, resumption=False)
    with H2ServerPeer(pki["peer"], mode="script") as peer:
        connect_in_thread(t, peer, 0).close()
        new = ca.issue_svid(ZTUN_CLIENT)
        t.set_identity(new)
        peer.goaway(0)  # force a new connection (and so a new handshake)
        peer.sync(0)
        connect_in_thread(t, peer, 1).close()
        rec = peer.srv.conns[1]
        assert rec.peer_cert is not None
        assert _serial(rec.peer_cert) == new.chain[0].serial_number, "connect() used the old SVID"


def test_rapid_reset_in_deliver_mode_leaks_nothing(
    server_tunnel: Tunnel, pki: dict[str, PeerFiles]
) -> None:
    """Streams opened and reset at once against serve(deliver=True) with an application that
    accepts and closes: every delivered socket is accounted for, nothing is left open."""
    h = server_tunnel.serve(("127.0.0.1", 0))
    stop = threading.Event()
    accepted = [0]

    def app() -> None:
        while not stop.is_set():
            try:
                s = server_tunnel.accept(timeout=0.1)
            except TimeoutError:
                continue
            accepted[0] += 1
            s.close()

    th = threading.Thread(target=app, daemon=True)
    f = pki["peer"]
    with FdTracker(timeout=15):
        th.start()
        try:
            r = RawH2(h.address, f.chain, f.key, f.ca, expect=ZTUN_SERVER)
            with r:
                r.preface()
                r.read(5, until=lambda fr: fr.type == SETTINGS and bool(fr.flags & 1))
                out = []
                for i in range(150):  # below the 200-stream limit and nghttp2's reset budget
                    out.append(r.connect_frame(2 * i + 1, "127.0.0.1:8080"))
                    out.append(frame(RST_STREAM, 0, 2 * i + 1, struct.pack("!I", CANCEL)))
                r.send(b"".join(out))
                r.read(0.5)
            wait_until(lambda: stats(server_tunnel)["connections_active"] == 0, 10, "flows closed")
            wait_until(
                lambda: accepted[0] == stats(server_tunnel)["hbone_status"][200], 10, "all accepted"
            )
        finally:
            stop.set()
            th.join(5)
