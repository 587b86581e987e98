"""Bad input on ztun's HBONE server: never a crash or a leak; each case is answered (an
HTTP status, RST_STREAM or GOAWAY, or a close) and counted with a reason (engine counters
and a log line). After every case the same engine still serves a good client and the
process has no more file descriptors than before.

Frames are written by hand (``RawH2``) after a real mutual-TLS handshake, so the checks
reach the HTTP/2 layer.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from harness.fds import FdTracker
from harness.servers import EchoServer

from hbone import h2peer
from hbone.h2peer import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    H2Client,
    RawH2,
    frame,
    settings_frame,
)
from hbone.util import PEER, ZTUN_SERVER, EventLog, PeerFiles, stats, wait_until
from ztun import Tunnel

pytestmark = pytest.mark.timeout(60)

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 6, 7, 8, 11


@dataclass
class Server:
    t: Tunnel
    address: tuple[str, int]
    echo: EchoServer
    files: PeerFiles
    log: EventLog

    def raw(self, handshake: bool = True) -> RawH2:
        r = RawH2(self.address, self.files.chain, self.files.key, self.files.ca, expect=ZTUN_SERVER)
        if handshake:
            r.preface()
            r.read(5, until=lambda f: f.type == SETTINGS and not f.flags & 1)
            # our ACK went out in read(); wait for theirs so their limits (1 MiB frames) apply
            r.read(5, until=lambda f: f.type == SETTINGS and bool(f.flags & 1))
        return r

    def good_client_works(self) -> None:
        with H2Client(
            self.address, self.files.chain, self.files.key, self.files.ca, expect=ZTUN_SERVER
        ) as c:
            sid = c.open(f"127.0.0.1:{self.echo.address[1]}")
            assert c.response(sid).status == 200
            c.ep.send(sid, b"still serving", end=True)
            c.ep.wait(lambda: c.ep.stream(sid).ended, 10, "echo")
            assert bytes(c.ep.stream(sid).data) == b"still serving"

    def counters(self) -> dict[str, int]:
        s = stats(self.t)
        return {
            "protocol_errors": s["hbone_protocol_errors"],
            "h2_protocol_error": s["hbone_close_reasons"]["protocol_error"],
            "h2_ok": s["hbone_close_reasons"]["ok"],
            "h2_closed": s["hbone_connections_closed"],
            "h2_active": s["hbone_connections_active"],
            "400": s["hbone_status"][400],
            "503": s["hbone_status"][503],
            "flow_protocol_error": s["close_reasons"]["protocol_error"],
        }


@pytest.fixture
def server(
    server_tunnel: Tunnel, echo_server: EchoServer, pki: dict[str, PeerFiles], engine_log: EventLog
) -> Iterator[Server]:
    h = server_tunnel.serve(("127.0.0.1", 0), deliver=False, workloads=["127.0.0.1"])
    server_tunnel.subscribe(engine_log)
    srv = Server(server_tunnel, h.address, echo_server, pki["peer"], engine_log)
    srv.good_client_works()  # warm: pools and lazily created state exist before fds are counted
    wait_until(lambda: srv.counters()["h2_active"] == 0, 10, "warm-up connection closed")
    yield srv


# ---------------------------------------------------------------- connection-level abuse
def _flood_headers(r: RawH2, target: str) -> None:
    r.send(b"".join(r.connect_frame(2 * i + 1, target) for i in range(2000)))


def _rapid_reset(r: RawH2, target: str) -> None:
    out = []
    for i in range(3000):
        out.append(r.connect_frame(2 * i + 1, target))
        out.append(frame(RST_STREAM, 0, 2 * i + 1, struct.pack("!I", CANCEL)))
    r.send(b"".join(out))


def _continuation_flood(r: RawH2, target: str) -> None:
    first = r.headers_block([(":method", "CONNECT"), (":authority", target)])
    rest = b"".join(
        frame(CONTINUATION, 0, 1, r.headers_block([(f"x-pad-{i}", "v" * 1000)])) for i in range(100)
    )
    r.send(frame(HEADERS, 0, 1, first) + rest)


@dataclass(frozen=True)
class Abuse:
    name: str
    act: Callable[[RawH2, str], object]
    answer: str  # "goaway:<code>", "close" (no GOAWAY: nghttp2 asks the caller to drop it)
    log: str  # what the engine's log line says
    handshake: bool = True
    counted_bug: str | None = None  # why the close reason is not counted (xfail)


ABUSES = [
    Abuse(
        "garbage_http1_before_preface",
        lambda r, t: r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        "close",
        "bad client magic",
        handshake=False,
    ),
    Abuse(
        "garbage_binary_before_preface",
        lambda r, t: r.send(os.urandom(4096)),
        "close",
        "bad client magic",
        handshake=False,
    ),
    Abuse(
        "data_on_stream_0",
        lambda r, t: r.send(frame(DATA, 0, 0, b"xx")),
        f"goaway:{PROTOCOL_ERROR}",
        "DATA",
    ),
    Abuse(
        "headers_on_even_stream",
        lambda r, t: r.send(r.connect_frame(2, t)),
        f"goaway:{PROTOCOL_ERROR}",
        "invalid",
    ),
    Abuse(
        "window_update_zero",
        lambda r, t: r.send(frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", 0))),
        f"goaway:{PROTOCOL_ERROR}",
        "invalid",
    ),
    Abuse(
        "window_update_overflow",
        lambda r, t: r.send(frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", 0x7FFFFFFF))),
        f"goaway:{FLOW_CONTROL_ERROR}",
        "low control",
    ),
    Abuse(
        "settings_initial_window_too_big",
        lambda r, t: r.send(settings_frame([(4, 1 << 31)])),
        f"goaway:{FLOW_CONTROL_ERROR}",
        "low control",
    ),
    Abuse(
        "settings_ack_with_payload",
        lambda r, t: r.send(frame(SETTINGS, 1, 0, b"\0" * 6)),
        f"goaway:{FRAME_SIZE_ERROR}",
        "SETTINGS",
    ),
    Abuse(
        "rst_stream_on_idle_stream",
        lambda r, t: r.send(frame(RST_STREAM, 0, 99, struct.pack("!I", CANCEL))),
        f"goaway:{PROTOCOL_ERROR}",
        "RST_STREAM",
    ),
    Abuse(
        "priority_on_stream_0",
        lambda r, t: r.send(frame(PRIORITY, 0, 0, b"\0" * 5)),
        f"goaway:{PROTOCOL_ERROR}",
        "PRIORITY",
    ),
    Abuse(
        "frame_larger_than_max_frame_size",
        lambda r, t: r.send(r.connect_frame(1, t) + frame(DATA, 0, 1, b"x" * ((1 << 20) + 1))),
        f"goaway:{FRAME_SIZE_ERROR}",
        "frame size",
    ),
    Abuse(
        "settings_too_many_entries",
        lambda r, t: r.send(settings_frame([(4, 65535)] * 100)),
        f"goaway:{ENHANCE_YOUR_CALM}",
        "SETTINGS",
    ),
    Abuse("settings_flood", lambda r, t: r.send(settings_frame() * 20000), "close", "Flooding"),
    Abuse(
        "ping_flood",
        lambda r, t: r.send(frame(PING, 0, 0, b"12345678") * 20000),
        "close",
        "Flooding",
    ),
    Abuse("continuation_flood", _continuation_flood, "close", "CONTINUATION"),
    Abuse("rapid_reset_flood", _rapid_reset, "goaway:any", "reset"),
    # Beyond the 200 concurrent streams ztun advertises (and that were acknowledged),
    # nghttp2 ends the connection (RFC 9113 §5.1.2 allows a stream or connection error).
    Abuse(
        "headers_flood",
        lambda r, t: _flood_headers(r, "10.255.255.1:80"),
        f"goaway:{PROTOCOL_ERROR}",
        "concurrent",
    ),
]


def _answered(r: RawH2, answer: str) -> str:
    r.read(8, until=lambda f: f.type == GOAWAY)
    if not r.eof:
        r.read(3)  # after a GOAWAY the server closes: see that too
    g = r.goaway()
    if answer == "close":
        assert r.eof, f"the connection was not closed; frames: {r.frames[-5:]}"
        return "close" if g is None else f"goaway:{g.error_code()}"
    assert g is not None, f"no GOAWAY; eof={r.eof} frames={r.frames[-5:]} err={r.error}"
    if answer != "goaway:any":
        assert f"goaway:{g.error_code()}" == answer, g
    assert r.eof, "the connection must be closed after a GOAWAY for a connection error"
    return f"goaway:{g.error_code()}"


@pytest.mark.parametrize("case", ABUSES, ids=[a.name for a in ABUSES])
def test_abuse_is_answered_and_engine_survives(case: Abuse, server: Server) -> None:
    before = server.counters()
    with FdTracker(timeout=10):
        r = server.raw(handshake=case.handshake)
        try:
            case.act(r, f"127.0.0.1:{server.echo.address[1]}")
            _answered(r, case.answer)
        finally:
            r.close()
        wait_until(lambda: server.counters()["h2_closed"] > before["h2_closed"], 10, "h2 closed")
        server.good_client_works()
    wait_until(lambda: server.counters()["h2_active"] == 0, 10, "no HBONE connection left")
    assert stats(server.t)["connections_active"] == 0


def _counted_params() -> list[Any]:
    out = []
    for a in ABUSES:
        marks = [pytest.mark.xfail(strict=True, reason=a.counted_bug)] if a.counted_bug else []
        out.append(pytest.param(a, id=a.name, marks=marks))
    return out


@pytest.mark.parametrize("case", _counted_params())
def test_abuse_is_counted_with_a_reason(case: Abuse, server: Server) -> None:
    """The connection's close is counted as a protocol error and a warning names the cause."""
    before = server.counters()
    n_lines = len(server.log.lines)
    r = server.raw(handshake=case.handshake)
    try:
        case.act(r, f"127.0.0.1:{server.echo.address[1]}")
        _answered(r, case.answer)
    finally:
        r.close()
    wait_until(lambda: server.counters()["h2_closed"] > before["h2_closed"], 10, "h2 closed")
    after = server.counters()
    assert after["h2_protocol_error"] == before["h2_protocol_error"] + 1, (
        after,
        server.log.lines[n_lines:][-5:],
    )

    def named() -> bool:
        # A warning about this peer's connection that says more than "it closed".
        new = server.log.records[n_lines:]
        generic = ("close_notify", "session finished", "peer closed")
        return any(
            level >= logging.WARNING
            and PEER in msg
            and not any(g in msg for g in generic)
            and (case.counted_bug is not None or case.log.lower() in msg.lower())
            for level, msg in new
        )

    wait_until(named, 5, f"a warning naming the cause ({case.log!r})")


# ---------------------------------------------------------------- stream-level abuse
def _send_huge_header_list(r: RawH2, target: str, how: str) -> None:
    block = r.headers_block(
        [(":method", "CONNECT"), (":authority", target)]
        + [(f"x-big-{i}", "v" * 4000) for i in range(64)]  # 256 KiB, CONNECT needs < 200 B
    )
    if how == "one_frame":  # fits: ztun allows 1 MiB frames
        r.send(frame(HEADERS, END_HEADERS, 1, block))
        return
    n = 8  # as many CONTINUATIONs as nghttp2 accepts here
    part = len(block) // (n + 1) + 1
    chunks = [block[i : i + part] for i in range(0, len(block), part)]
    frames = [frame(HEADERS, 0, 1, chunks[0])]
    frames += [
        frame(CONTINUATION, END_HEADERS if i == len(chunks) - 1 else 0, 1, c)
        for i, c in enumerate(chunks[1:], 1)
    ]
    r.send(b"".join(frames))


@pytest.mark.parametrize("how", ["one_frame", "continuations"])
def test_huge_header_list_refused_engine_survives(how: str, server: Server) -> None:
    """A request whose header list is far beyond what CONNECT needs (ztun reads 16 KiB):
    the stream is refused (a status or RST_STREAM), the connection and engine live on."""
    with FdTracker(timeout=10):
        r = server.raw()
        try:
            _send_huge_header_list(r, f"127.0.0.1:{server.echo.address[1]}", how)
            r.read(5, until=lambda f: f.sid == 1 or f.type == GOAWAY)
            st = r.status(1)
            assert st in (None, 400, 431), st
            assert st is not None or r.rst(1) is not None, r.frames[-3:]
            # the same connection still works
            r.send(r.connect_frame(3, f"127.0.0.1:{server.echo.address[1]}"))
            r.read(5, until=lambda f: f.sid == 3)
            assert r.status(3) == 200
        finally:
            r.close()
        server.good_client_works()


@pytest.mark.parametrize("how", ["one_frame", "continuations"])
def test_huge_header_list_counted_with_a_reason(how: str, server: Server) -> None:
    before = server.counters()
    n_lines = len(server.log.lines)
    r = server.raw()
    try:
        _send_huge_header_list(r, f"127.0.0.1:{server.echo.address[1]}", how)
        r.read(5, until=lambda f: f.sid == 1 or f.type == GOAWAY)
    finally:
        r.close()
    wait_until(lambda: stats(server.t)["connections_active"] == 0, 10, "flow closed")
    after = server.counters()
    assert r.status(1) == 431 or r.rst(1) not in (None, INTERNAL_ERROR), r.frames[-3:]
    assert after["flow_protocol_error"] == before["flow_protocol_error"] + 1, after
    assert stats(server.t)["close_reasons"]["reset_by_downstream"] == 0
    wait_until(lambda: any("too large" in m for m in server.log.lines[n_lines:]), 5, "a log line")


BAD_REQUESTS = [
    # (name, headers after :method/:authority, method, authority, acceptable answers, log)
    ("port_15001", "CONNECT", "127.0.0.1:15001", {"400"}, "own"),
    ("port_15006", "CONNECT", "127.0.0.1:15006", {"400"}, "own"),
    ("port_15008", "CONNECT", "127.0.0.1:15008", {"400"}, "own"),
    ("not_a_local_workload", "CONNECT", "10.1.2.3:8080", {"400"}, "not a workload"),
    ("ipv6_not_local", "CONNECT", "[fd00::1]:8080", {"400"}, "not a workload"),
    ("authority_no_port", "CONNECT", "127.0.0.1", {"400"}, "authority"),
    ("authority_port_0", "CONNECT", "127.0.0.1:0", {"400"}, "authority"),
    ("authority_port_65536", "CONNECT", "127.0.0.1:65536", {"400"}, "authority"),
    ("authority_port_plus", "CONNECT", "127.0.0.1:+80", {"400"}, "authority"),
    ("authority_port_junk", "CONNECT", "127.0.0.1:80x", {"400"}, "authority"),
    ("authority_hostname", "CONNECT", "localhost:8080", {"400"}, "authority"),
    ("authority_v6_unbracketed", "CONNECT", "::1:8080", {"400"}, "authority"),
    ("authority_v6_no_port", "CONNECT", "[::1]", {"400"}, "authority"),
    ("authority_bracketed_v4", "CONNECT", "[127.0.0.1]:80", {"400"}, "authority"),
    ("authority_userinfo", "CONNECT", "u@127.0.0.1:80", {"400", "rst"}, "authority"),
    ("authority_garbage", "CONNECT", "bad", {"400"}, "authority"),
    ("authority_empty", "CONNECT", "", {"400", "rst"}, ""),
]


@pytest.mark.parametrize(
    ("method", "authority", "answers", "log"),
    [pytest.param(*b[1:], id=b[0]) for b in BAD_REQUESTS],
)
def test_bad_connect_request(
    method: str, authority: str, answers: set[str], log: str, server: Server
) -> None:
    """Refused with 400 (RST_STREAM(PROTOCOL_ERROR) where nghttp2 itself finds the request
    malformed), counted, logged; the connection stays up for the next request."""
    before = server.counters()
    n_lines = len(server.log.lines)
    with (
        FdTracker(timeout=10),
        H2Client(
            server.address,
            server.files.chain,
            server.files.key,
            server.files.ca,
            expect=ZTUN_SERVER,
        ) as c,
    ):
        sid = c.open(authority, method=method)
        st = c.response(sid)
        got = answer_of(st)
        assert got in answers, (got, st, c.record)
        # the same connection still carries a good request
        sid = c.open(f"127.0.0.1:{server.echo.address[1]}")
        assert c.response(sid).status == 200
    after = server.counters()
    if got == "400":
        assert after["400"] == before["400"] + 1
        assert after["flow_protocol_error"] == before["flow_protocol_error"] + 1
        wait_until(
            lambda: any("refused with 400" in m and log in m for m in server.log.lines[n_lines:]),
            5,
            f"'refused with 400 ... {log}' logged",
        )
    else:
        assert after["protocol_errors"] > before["protocol_errors"]


@pytest.mark.parametrize(
    ("method", "extra", "answers"),
    [
        pytest.param("GET", [(":scheme", "https"), (":path", "/")], {"400"}, id="GET"),
        pytest.param("POST", [(":scheme", "https"), (":path", "/")], {"400"}, id="POST"),
        pytest.param("GET", [], {"400", "rst"}, id="GET_without_path"),
        pytest.param("CONNECT", [(":path", "/")], {"400", "rst"}, id="CONNECT_with_path"),
        pytest.param(
            "CONNECT",
            [(":protocol", "websocket"), (":scheme", "https"), (":path", "/")],
            {"400", "rst"},
            id="extended_CONNECT",
        ),
    ],
)
def test_not_a_plain_connect(
    method: str, extra: list[tuple[str, str]], answers: set[str], server: Server
) -> None:
    before = server.counters()
    with (
        FdTracker(timeout=10),
        H2Client(
            server.address,
            server.files.chain,
            server.files.key,
            server.files.ca,
            expect=ZTUN_SERVER,
        ) as c,
    ):
        sid = c.open(f"127.0.0.1:{server.echo.address[1]}", method=method, extra=extra)
        st = c.response(sid)
        got = answer_of(st)
        assert got in answers, (got, st, c.record)
        sid = c.open(f"127.0.0.1:{server.echo.address[1]}")
        assert c.response(sid).status == 200
    after = server.counters()
    if got == "400":
        assert after["400"] == before["400"] + 1
        wait_until(lambda: any("not a CONNECT request" in m for m in server.log.lines), 5, "logged")
    else:
        assert after["protocol_errors"] > before["protocol_errors"]


def answer_of(st: h2peer.StreamRecord) -> str:
    if st.status is not None:
        return str(st.status)
    return "rst" if st.reset_code is not None else "?"


def test_unknown_frame_type_is_ignored(server: Server) -> None:
    """RFC 9113 §4.1: unknown frame types are ignored — not an error, the connection lives."""
    r = server.raw()
    try:
        r.send(frame(0xFA, 0, 0, b"hello") + frame(0xFB, 0xFF, 5, b"x" * 100))
        r.send(r.connect_frame(1, f"127.0.0.1:{server.echo.address[1]}"))
        r.read(5, until=lambda f: f.type == HEADERS and f.sid == 1)
        assert r.status(1) == 200 and r.goaway() is None
    finally:
        r.close()


def test_ping_is_answered_and_pong_ignored(server: Server) -> None:
    r = server.raw()
    try:
        r.send(frame(PING, 0, 0, b"abcdefgh") + frame(PING, 1, 0, b"unsolici"))
        r.read(5, until=lambda f: f.type == PING and bool(f.flags & 1))
        acks = [f for f in r.frames if f.type == PING and f.flags & 1]
        assert acks and acks[0].payload == b"abcdefgh"
        assert r.goaway() is None
    finally:
        r.close()


def test_alpn_other_than_h2_is_refused(server: Server) -> None:
    before = server.counters()
    with pytest.raises(OSError):
        r = RawH2(
            server.address, server.files.chain, server.files.key, server.files.ca, alpn=["http/1.1"]
        )
        try:
            r.send(PREFACE + settings_frame())
            r.read(3)
            if r.eof:
                raise ConnectionResetError("closed")
        finally:
            r.close()
    wait_until(lambda: server.counters()["h2_closed"] > before["h2_closed"], 10, "closed")
    server.good_client_works()


ALLOW_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: prod
spec:
  action: ALLOW
  rules:
  - {}
"""


def test_listener_answers_only_for_its_own_workloads(
    make_tunnel: Callable[..., Tunnel], echo_server: EchoServer, pki: dict[str, PeerFiles]
) -> None:
    """A policy table that also knows another workload of the node (ztund's same-node
    routes give every engine the others) does not make a listener that names its own
    workloads answer for that one: 400, nothing dialled."""
    from ztun.policy import Workload

    other = Workload("other", "prod", ips=("127.0.0.3",))
    t = make_tunnel(
        ZTUN_SERVER,
        policies=ALLOW_ALL,
        workload=Workload("server", "prod", ips=("127.0.0.1",)),
        workloads=[other],
    )
    h = t.serve(("127.0.0.1", 0), deliver=False, workloads=["127.0.0.1"])
    files = pki["peer"]
    with H2Client(h.address, files.chain, files.key, files.ca, expect=ZTUN_SERVER) as c:
        sid = c.open(f"127.0.0.3:{echo_server.address[1]}")
        assert answer_of(c.response(sid)) == "400"
        sid = c.open(f"127.0.0.1:{echo_server.address[1]}")
        assert c.response(sid).status == 200
    assert stats(t)["hbone_status"][400] == 1
