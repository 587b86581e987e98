"""TLS 1.3 session resumption: it happens, it is counted, and it never weakens a check.

A resumed handshake carries no certificate: the peer's identity comes from the session.
The engine re-checks the SPIFFE ID after every handshake (the verify callback does not run
on a resumption), so ``expect`` and the trust domain hold. What a resumption must not
carry past either: the peer certificate's expiry, and a change of the trust bundle.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from typing import Any

import pytest
from mtlskit import (
    CLIENT_ID,
    IO_TIMEOUT,
    LOOPBACK,
    SERVER_ID,
    Env,
    ThreadServer,
    client_context,
    connect,
    outcome,
    peer_uri_sans,
    recv_exact,
    server_context,
)

from ztun import Svid
from ztun.testing import SpiffeCA

pytestmark = pytest.mark.timeout(30)

OTHER_ID = "spiffe://example.org/ns/default/sa/other"


def ping(addr: tuple[str, int], data: bytes = b"ping") -> bytes:
    with connect(addr) as app:
        app.sendall(data)
        got = recv_exact(app, len(data))
        app.shutdown(socket.SHUT_WR)
        assert app.recv(1) == b""
    return got


@pytest.mark.parametrize("resumption", [True, False], ids=["on", "off"])
def test_second_connection_resumes(resumption: bool, env: Env) -> None:
    ts, es, lst, tc, ec, fwd = env.pair(resumption=resumption)
    n = 5
    for i in range(n):
        assert ping(fwd.address, b"ping %d" % i) == b"ping %d" % i
        ec.wait_closes(i + 1, fwd.id)  # the ticket arrives after the handshake: one at a time
    closes_out = ec.wait_closes(n, fwd.id)
    closes_in = es.wait_closes(n, lst.id)
    sc, ss = tc.stats(), ts.stats()
    assert sc.handshakes == ss.handshakes == n
    want = n - 1 if resumption else 0
    assert sc.handshakes_resumed == want, sc
    assert ss.handshakes_resumed == want, ss
    # A resumed connection reports the same identities as a full one.
    assert {e.peer_id for e in closes_out} == {SERVER_ID}
    assert {e.peer_id for e in closes_in} == {CLIENT_ID}
    assert {e.reason for e in closes_out + closes_in} == {"ok"}


def test_expect_is_enforced_for_every_forward(env: Env) -> None:
    """A forward whose ``expect`` does not match the server is refused, even though the
    server has just given another forward of the same tunnel a resumable session.

    The exact case "resumable session, but expect no longer matches" cannot be built with
    the public API: ``expect`` is fixed for the life of a forward and the session slot
    belongs to one forward. This is the nearest case.
    """
    _ts, _es, lst, tc, ec, good = env.pair()
    ping(good.address)
    ping(good.address)
    assert tc.stats().handshakes_resumed == 1
    bad = tc.forward((LOOPBACK, 0), lst.address, expect=[OTHER_ID])
    got = outcome(lambda: ping(bad.address))
    (ev,) = ec.wait_closes(1, bad.id)
    assert isinstance(got, ConnectionResetError), got
    assert ev.reason == "tls_error"
    assert ev.detail and f"unexpected SPIFFE ID {SERVER_ID}" in ev.detail
    assert tc.stats().handshakes_resumed == 1
    assert ping(good.address) == b"ping"  # the good forward still resumes
    assert tc.stats().handshakes_resumed == 2


def test_listener_trust_change_invalidates_tickets(env: Env) -> None:
    """A listener that stops trusting the client's CA does not resume its old sessions."""
    ts, es, lst = _listener(env)
    ctx = client_context(env.ca.cert_pem, env.client_svid)
    sess = _tls_ping(lst.address, ctx)
    assert _tls_ping(lst.address, ctx, sess).session_reused
    # Same trust domain, another root: the client's CA is no longer trusted.
    ts.set_identity(env.server_svid, SpiffeCA("example.org").bundle)
    got = outcome(lambda: _tls_ping(lst.address, ctx, sess))
    closes = es.wait_closes(3, lst.id)
    assert isinstance(got, ssl.SSLError | ConnectionError), got
    assert closes[2].reason == "tls_error"
    assert closes[2].detail == "certificate signed by an unknown CA"
    assert ts.stats().handshakes_resumed == 1


def _listener(env: Env, **kw: Any) -> tuple[Any, Any, Any]:
    ts, es = env.tunnel(env.server_svid, env.ca.bundle, **kw)
    lst = ts.listen((LOOPBACK, 0), env.echo.address)
    return ts, es, lst


class _Done:
    def __init__(self, session: ssl.SSLSession | None, reused: bool) -> None:
        self.session = session
        self.session_reused = reused


def _tls_ping(addr: tuple[str, int], ctx: ssl.SSLContext, session: _Done | None = None) -> _Done:
    with (
        connect(addr) as raw,
        # No ragged-EOF suppression: b"" then means a real close_notify.
        ctx.wrap_socket(
            raw, session=session.session if session else None, suppress_ragged_eofs=False
        ) as tls,
    ):
        tls.sendall(b"ping")
        assert recv_exact(tls, 4) == b"ping"  # by now the ticket has arrived too
        done = _Done(tls.session, tls.session_reused)
        tls.unwrap()
    return done


def _short(ca: SpiffeCA, spiffe_id: str, seconds: float) -> Any:
    now = dt.datetime.now(dt.UTC)
    return ca.issue_cert(
        uris=[spiffe_id],
        not_before=now - dt.timedelta(minutes=1),
        not_after=now + dt.timedelta(seconds=seconds),
    )


def _sleep_past(not_after: dt.datetime) -> None:
    left = (not_after - dt.datetime.now(dt.UTC)).total_seconds() + 1.1
    assert left < 10
    if left > 0:
        time.sleep(left)


def test_resumption_does_not_outlive_the_client_certificate(env: Env) -> None:
    """Found here, fixed on main in c346d41 (validity re-checked after every handshake)."""
    _ts, es, lst = _listener(env)
    short = _short(env.ca, CLIENT_ID, 2)
    ctx = client_context(env.ca.cert_pem, short)
    sess = _tls_ping(lst.address, ctx)
    _sleep_past(short.leaf.not_valid_after_utc)
    # Without the session: refused, the certificate has expired.
    assert isinstance(outcome(lambda: _tls_ping(lst.address, ctx)), ssl.SSLError)
    # With it: must be refused too.
    got = outcome(lambda: _tls_ping(lst.address, ctx, sess))
    closes = es.wait_closes(3, lst.id)
    assert closes[2].reason == "tls_error", (closes[2].reason, got)
    assert closes[2].detail and "expired" in closes[2].detail


class TicketServer(ThreadServer):
    """Python's ssl as a server with one long-lived context (so its tickets stay good)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.seen: list[Any] = []

        def handler(conn: socket.socket) -> None:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                self.seen.append(peer_uri_sans(tls))
                tls.sendall(recv_exact(tls, 4))
                while tls.recv(1024):
                    pass
                tls.unwrap()

        super().__init__(handler)


def test_resumption_does_not_outlive_the_server_certificate(env: Env, client_svid: Svid) -> None:
    """Found here, fixed on main in c346d41."""
    t, events = env.tunnel(client_svid, env.ca.bundle)
    short = _short(env.ca, SERVER_ID, 2)
    with TicketServer(server_context(short, env.ca.cert_pem)) as srv:
        fwd = t.forward((LOOPBACK, 0), srv.address, expect=[SERVER_ID])
        assert ping(fwd.address) == b"ping"
        _sleep_past(short.leaf.not_valid_after_utc)
        got = outcome(lambda: ping(fwd.address))
        closes = events.wait_closes(2, fwd.id, timeout=IO_TIMEOUT)
    assert closes[1].reason == "tls_error", (closes[1].reason, got, t.stats())
    assert closes[1].detail and "expired" in closes[1].detail


def test_client_trust_change_is_not_bypassed_by_resumption(env: Env) -> None:
    """Found here, fixed on main in 7d12e0a (the forward's session slot is cleared when
    the listener's identity or trust changes)."""
    _ts, _es, _lst, tc, ec, fwd = env.pair()
    ping(fwd.address)
    ping(fwd.address)
    assert tc.stats().handshakes_resumed == 1
    # The client now trusts another root for example.org only: the server is unknown.
    tc.set_identity(env.client_svid, SpiffeCA("example.org").bundle)
    got = outcome(lambda: ping(fwd.address))
    closes = ec.wait_closes(3, fwd.id)
    assert closes[2].reason == "tls_error", (closes[2].reason, got, tc.stats())
    assert closes[2].detail == "certificate signed by an unknown CA"


def test_refused_resumption_gets_an_alert(env: Env) -> None:
    """TLS 1.3: the client's resumed handshake completes before the server re-checks the
    identity in the session; the refusal must still read as an error to the client."""
    _ts, es, lst = _listener(env)
    short = _short(env.ca, CLIENT_ID, 2)
    ctx = client_context(env.ca.cert_pem, short)
    sess = _tls_ping(lst.address, ctx)
    _sleep_past(short.leaf.not_valid_after_utc)
    got = outcome(lambda: _tls_ping(lst.address, ctx, sess))
    closes = es.wait_closes(2, lst.id)
    assert closes[1].reason == "tls_error"
    # Today: EOFError, i.e. recv() returned b"" after a close_notify (ragged EOFs raise).
    assert isinstance(got, ssl.SSLError | ConnectionError), got
