"""HTTP/2 CONNECT peers written with Python's ``h2`` package, over ``ssl`` with ALPN h2.

These are the independent HBONE implementations the interop tests put next to ztun:

* :class:`H2Server` accepts mutual TLS 1.3 (client chain verified against the CA, optional
  SPIFFE ID check), records every connection's SETTINGS, window updates, PINGs and GOAWAYs
  and every stream's request headers, data, END_STREAM and RST_STREAM. Behaviours: ``echo``
  (200, echo, END_STREAM after the client's), ``script`` (the test answers), or a callable.
  Knobs for pool tests: ``handshake_delay`` (a slow peer), ``fail_first`` (abort the first N
  handshakes), ``silent()`` (stop answering anything, PINGs included).
* :class:`H2Client` dials an HBONE server, verifies its SPIFFE ID and opens CONNECT streams.
* :class:`RawH2` writes hand-made frames (for the abuse tests) and parses what comes back.

Everything runs on daemon threads, is bounded by timeouts and closes its sockets on
``close()``; the h2 state machine is only touched under the connection's lock.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack

Addr = tuple[str, int]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
FRAME_NAMES = {
    0: "DATA",
    1: "HEADERS",
    2: "PRIORITY",
    3: "RST_STREAM",
    4: "SETTINGS",
    5: "PUSH_PROMISE",
    6: "PING",
    7: "GOAWAY",
    8: "WINDOW_UPDATE",
    9: "CONTINUATION",
}


# ---------------------------------------------------------------- TLS
def server_context(chain: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def client_context(chain: str, key: str, ca: str, alpn: Sequence[str] = ("h2",)) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # HBONE: no SNI, no host names; the SPIFFE ID is checked
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(chain, key)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def peer_spiffe_ids(sock: ssl.SSLSocket) -> list[str]:
    cert = sock.getpeercert() or {}
    sans: Any = cert.get("subjectAltName", ())
    return [str(v) for k, v in sans if k == "URI"]


def tls_connect(
    addr: Addr, ctx: ssl.SSLContext, expect: str | None = None, timeout: float = 10.0
) -> ssl.SSLSocket:
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    raw = socket.socket(fam, socket.SOCK_STREAM)
    raw.settimeout(timeout)
    try:
        raw.connect(addr)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = ctx.wrap_socket(raw, server_hostname=None)
    except BaseException:
        raw.close()
        raise
    if expect is not None and expect not in peer_spiffe_ids(s):
        ids = peer_spiffe_ids(s)
        s.close()
        raise ssl.SSLError(f"server presented {ids}, expected {expect}")
    return s


# ---------------------------------------------------------------- records
@dataclass
class StreamRecord:
    sid: int
    headers: list[tuple[str, str]] = field(default_factory=list)  # request (server side)
    status: int | None = None  # response (client side)
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False  # END_STREAM received
    reset_code: int | None = None  # RST_STREAM (either direction)
    remote_reset: bool | None = None
    sent: int = 0
    end_sent: bool = False
    frames_in: list[tuple[str, int]] = field(default_factory=list)  # (kind, length) as received

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def closed(self) -> bool:
        return self.reset_code is not None or (self.ended and self.end_sent)


@dataclass
class ConnRecord:
    index: int
    peer_ids: list[str] = field(default_factory=list)
    alpn: str | None = None
    peer_cert: bytes | None = None  # DER of the peer's leaf
    remote_settings: dict[int, int] = field(default_factory=dict)  # first SETTINGS frame
    settings_frames: list[dict[int, int]] = field(default_factory=list)
    window_updates: list[tuple[int, int]] = field(default_factory=list)  # (sid, increment)
    pings: int = 0
    ping_acks: int = 0
    goaway: tuple[int, int, bytes] | None = None  # (error code, last stream id, debug)
    closed: bool = False
    error: str | None = None


# ---------------------------------------------------------------- one h2 connection
class H2Endpoint:
    """An h2 connection over a connected TLS socket, run by a reader thread."""

    def __init__(
        self,
        sock: ssl.SSLSocket,
        *,
        client_side: bool,
        record: ConnRecord,
        settings: dict[int, int] | None = None,
        conn_window: int | None = None,
        auto_ack: bool = True,
        on_event: Callable[[H2Endpoint, Any], None] | None = None,
    ) -> None:
        self.sock = sock
        self.record = record
        self.auto_ack = auto_ack
        self.on_event = on_event
        self.streams: dict[int, StreamRecord] = {}
        self._out: dict[int, bytearray] = {}
        self._end_after: set[int] = set()
        self._silent = False
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        cfg = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(cfg)
        if settings:
            self.conn.local_settings = h2.settings.Settings(
                client=client_side,
                initial_values={h2.settings.SettingCodes(k): v for k, v in settings.items()},
            )
        sock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._wbuf = bytearray()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="h2peer")
        with self.lock:
            self.conn.initiate_connection()
            if conn_window:
                self.conn.increment_flow_control_window(conn_window - 65535)
            self._flush()
        self.thread.start()

    # -- thread-safe operations -------------------------------------------------------
    def silent(self) -> None:
        """From now on write nothing: no PING ACKs, no WINDOW_UPDATEs, no data."""
        with self.lock:
            self._silent = True

    def send_headers(
        self, sid: int, headers: Sequence[tuple[str, str]], end_stream: bool = False
    ) -> None:
        with self.lock:
            self.conn.send_headers(sid, list(headers), end_stream=end_stream)
            rec = self.streams.setdefault(sid, StreamRecord(sid))
            rec.end_sent = rec.end_sent or end_stream
            self._flush()

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        """Queue ``data`` on the stream; it goes out as flow control allows."""
        with self.lock:
            self._out.setdefault(sid, bytearray()).extend(data)
            if end:
                self._end_after.add(sid)
            self._flush()

    def end(self, sid: int) -> None:
        self.send(sid, b"", end=True)

    def reset(self, sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        with self.lock:
            self.conn.reset_stream(sid, code)
            self._out.pop(sid, None)
            self._end_after.discard(sid)
            rec = self.streams.setdefault(sid, StreamRecord(sid))
            rec.reset_code, rec.remote_reset = code, False
            self._flush()
            self.cond.notify_all()

    def goaway(self, code: int = 0) -> None:
        """A graceful GOAWAY (last stream id = the highest one the peer opened). Written by
        hand so that h2's state machine stays open: the streams in progress go on, and a
        PING can follow (``H2ServerPeer.sync``)."""
        with self.lock:
            self._flush()
            last = self.conn.highest_inbound_stream_id
            self._wbuf += frame(GOAWAY, 0, 0, struct.pack("!II", last, code))
            self._flush()
            self._wake()

    def ping(self, data: bytes = b"12345678") -> None:
        with self.lock:
            self.conn.ping(data)
            self._flush()

    def ack(self, sid: int, n: int) -> None:
        """Open the window for ``n`` bytes read on ``sid`` (when ``auto_ack`` is off)."""
        with self.lock:
            self.conn.acknowledge_received_data(n, sid)
            self._flush()

    def wait(self, pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        end = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"h2 peer: timed out waiting for {what or pred}")
                self.cond.wait(min(left, 0.2))

    def stream(self, sid: int) -> StreamRecord:
        with self.lock:
            return self.streams.setdefault(sid, StreamRecord(sid))

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        with contextlib.suppress(OSError):
            self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- internals ---------------------------------------------------------------------
    def _flush(self) -> None:
        for sid in list(self._out):
            buf = self._out[sid]
            while buf:
                try:
                    room = min(
                        self.conn.local_flow_control_window(sid),
                        self.conn.max_outbound_frame_size,
                        len(buf),
                    )
                except h2.exceptions.StreamClosedError:
                    buf.clear()
                    break
                if room <= 0:
                    break
                self.conn.send_data(sid, bytes(buf[:room]))
                self.streams.setdefault(sid, StreamRecord(sid)).sent += room
                del buf[:room]
            if not buf:
                del self._out[sid]
                if sid in self._end_after:
                    self._end_after.discard(sid)
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        self.conn.end_stream(sid)
                        self.streams.setdefault(sid, StreamRecord(sid)).end_sent = True
        data = self.conn.data_to_send()
        if data and not self._silent:
            self._wbuf += data
            self._wake()

    def _wake(self) -> None:
        if threading.current_thread() is not self.thread:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"w")

    def _write_some(self) -> None:
        """Write what is queued, as far as the socket takes it (loop thread only)."""
        while self._wbuf:
            with self.lock:
                chunk = bytes(self._wbuf[: 1 << 16])
            try:
                n = self.sock.send(chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            except (OSError, ValueError) as e:  # the peer closed or reset
                self.record.error = self.record.error or f"send: {e!r}"
                self._wbuf.clear()
                self._stop = True
                return
            with self.lock:
                del self._wbuf[:n]

    def _run(self) -> None:
        # All TLS I/O happens on this thread: OpenSSL must not see concurrent SSL_read and
        # SSL_write on one connection (a TLS 1.3 session ticket arriving while another
        # thread writes corrupts records). Other threads queue bytes and wake us.
        try:
            while not self._stop:
                self._write_some()
                if not self.sock.pending():
                    wants_write = bool(self._wbuf)
                    rlist: list[Any] = [self.sock, self._wake_r]
                    wlist: list[Any] = [self.sock] if wants_write else []
                    r, _w, _ = select.select(rlist, wlist, [], 0.5)
                    if self._wake_r in r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                    if self.sock not in r:
                        continue
                try:
                    data = self.sock.recv(1 << 16)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    continue
                except (OSError, ValueError) as e:
                    self.record.error = self.record.error or f"recv: {e!r}"
                    break
                if not data:
                    break
                with self.lock:
                    try:
                        events = self.conn.receive_data(data)
                    except h2.exceptions.ProtocolError as e:
                        self.record.error = f"h2: {e!r}"
                        self._flush()
                        self._stop = True
                        events = []
                    for ev in events:
                        self._handle(ev)
                    self._flush()
                    self.cond.notify_all()
            self._write_some()  # e.g. a GOAWAY queued last
        finally:
            with self.lock:
                self.record.closed = True
                self.cond.notify_all()

    def _handle(self, ev: Any) -> None:
        rec = self.record
        ev_ = h2.events
        sid = getattr(ev, "stream_id", None)
        st = self.streams.setdefault(sid, StreamRecord(sid)) if sid else None
        if isinstance(ev, ev_.RequestReceived):
            assert st is not None
            st.headers = [(_s(k), _s(v)) for k, v in ev.headers]
            st.frames_in.append(("HEADERS", 0))
            if ev.stream_ended is not None:
                st.ended = True
        elif isinstance(ev, ev_.ResponseReceived):
            assert st is not None
            st.response_headers = [(_s(k), _s(v)) for k, v in ev.headers]
            st.status = int(dict(st.response_headers).get(":status", "0"))
            if ev.stream_ended is not None:
                st.ended = True
        elif isinstance(ev, ev_.DataReceived):
            assert st is not None
            st.data.extend(ev.data)
            st.frames_in.append(("DATA", len(ev.data)))
            if self.auto_ack and ev.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, ev_.StreamEnded):
            assert st is not None
            st.ended = True
        elif isinstance(ev, ev_.StreamReset):
            assert st is not None
            st.reset_code, st.remote_reset = int(ev.error_code or 0), ev.remote_reset
            self._out.pop(ev.stream_id, None)
        elif isinstance(ev, ev_.RemoteSettingsChanged):
            frame = {int(k): v.new_value for k, v in ev.changed_settings.items()}
            if not rec.settings_frames:
                rec.remote_settings = dict(frame)
            rec.settings_frames.append(frame)
        elif isinstance(ev, ev_.WindowUpdated):
            rec.window_updates.append((ev.stream_id, ev.delta))
        elif isinstance(ev, ev_.PingReceived):
            rec.pings += 1
        elif isinstance(ev, ev_.PingAckReceived):
            rec.ping_acks += 1
        elif isinstance(ev, ev_.ConnectionTerminated):
            rec.goaway = (
                int(ev.error_code or 0),
                ev.last_stream_id or 0,
                ev.additional_data or b"",
            )
        if self.on_event is not None:
            self.on_event(self, ev)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


# ---------------------------------------------------------------- server
class H2Server:
    """A threaded HTTP/2 CONNECT server over mutual TLS (see the module docstring)."""

    def __init__(
        self,
        chain: str,
        key: str,
        ca: str,
        *,
        host: str = "127.0.0.1",
        expect_client: str | None = None,
        behavior: str | Callable[[H2Endpoint, StreamRecord], None] = "echo",
        settings: dict[int, int] | None = None,
        conn_window: int | None = None,
        handshake_delay: float = 0.0,
        fail_first: int = 0,
        sock: socket.socket | None = None,
    ) -> None:
        self.ctx = server_context(chain, key, ca)
        self.expect_client = expect_client
        self.behavior = behavior
        self.settings = settings
        self.conn_window = conn_window
        self.handshake_delay = handshake_delay
        self.fail_first = fail_first
        if sock is None:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sock.listen(256)
        self.lsock = sock
        self.lsock.settimeout(0.2)
        self.endpoints: list[H2Endpoint] = []
        self.conns: list[ConnRecord] = []
        self.handshake_errors: list[str] = []
        self.tcp_accepted = 0
        self.handshakes_started = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._raw: list[socket.socket] = []
        t = threading.Thread(target=self._accept_loop, daemon=True, name="h2server-accept")
        t.start()
        self._threads.append(t)

    @property
    def address(self) -> Addr:
        a = self.lsock.getsockname()
        return (a[0], a[1])

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.tcp_accepted += 1
                n = self.tcp_accepted
                self._raw.append(raw)
            t = threading.Thread(target=self._handshake, args=(raw, n), daemon=True)
            t.start()
            with self._lock:
                self._threads.append(t)

    def _handshake(self, raw: socket.socket, n: int) -> None:
        raw.settimeout(10)
        with self._lock:
            self.handshakes_started += 1
        if n <= self.fail_first:
            # A peer whose handshake fails: wait a little (others may queue behind it),
            # then reset the TCP connection.
            self._stop.wait(self.handshake_delay)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
            return
        if self.handshake_delay and self._stop.wait(self.handshake_delay):
            raw.close()
            return
        try:
            s = self.ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as e:
            with self._lock:
                self.handshake_errors.append(repr(e))
            raw.close()
            return
        rec = ConnRecord(
            len(self.conns),
            peer_ids=peer_spiffe_ids(s),
            alpn=s.selected_alpn_protocol(),
            peer_cert=s.getpeercert(binary_form=True),
        )
        if rec.alpn != "h2" or (self.expect_client and self.expect_client not in rec.peer_ids):
            rec.error = f"refused: alpn={rec.alpn} peer={rec.peer_ids}"
            with self._lock:
                self.conns.append(rec)
            s.close()
            return
        ep = H2Endpoint(
            s,
            client_side=False,
            record=rec,
            settings=self.settings,
            conn_window=self.conn_window,
            on_event=self._on_event,
        )
        with self._lock:
            self.conns.append(rec)
            self.endpoints.append(ep)

    def _on_event(self, ep: H2Endpoint, ev: Any) -> None:
        if not isinstance(
            ev, h2.events.RequestReceived | h2.events.DataReceived | h2.events.StreamEnded
        ):
            return
        st = ep.streams[ev.stream_id]
        if callable(self.behavior):
            if isinstance(ev, h2.events.RequestReceived):
                self.behavior(ep, st)
            return
        if self.behavior != "echo":
            return
        if isinstance(ev, h2.events.RequestReceived):
            ok = st.header(":method") == "CONNECT" and st.header(":authority")
            ep.conn.send_headers(
                ev.stream_id, [(":status", "200" if ok else "400")], end_stream=not ok
            )
        elif isinstance(ev, h2.events.DataReceived):
            ep._out.setdefault(ev.stream_id, bytearray()).extend(ev.data)
        elif isinstance(ev, h2.events.StreamEnded):
            ep._end_after.add(ev.stream_id)
            ep._out.setdefault(ev.stream_id, bytearray())

    def wait_stream(self, n: int = 1, timeout: float = 10.0) -> tuple[H2Endpoint, StreamRecord]:
        """The ``n``-th request stream (1-based, over all connections) once it arrived."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            seen = []
            with self._lock:
                eps = list(self.endpoints)
            for ep in eps:
                with ep.lock:
                    seen += [(ep, s) for s in ep.streams.values() if s.headers]
            seen.sort(key=lambda x: (self.endpoints.index(x[0]), x[1].sid))
            if len(seen) >= n:
                return seen[n - 1]
            time.sleep(0.01)
        raise AssertionError(f"h2 server: request {n} never arrived")

    def wait_conns(self, n: int, timeout: float = 10.0) -> list[ConnRecord]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if len(self.endpoints) >= n:
                    return list(self.conns)
            time.sleep(0.01)
        raise AssertionError(f"h2 server: {n} connections expected, got {len(self.endpoints)}")

    def silent(self) -> None:
        with self._lock:
            eps = list(self.endpoints)
        for ep in eps:
            ep.silent()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.lsock.close()
        with self._lock:
            eps = list(self.endpoints)
            threads = list(self._threads)
            raws = list(self._raw)
        for ep in eps:
            ep.close()
        for r in raws:
            with contextlib.suppress(OSError):
                r.close()
        for t in threads:
            t.join(5)

    def __enter__(self) -> H2Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- client
class H2Client:
    """An HBONE client: mutual TLS to ``addr`` (SPIFFE ID ``expect`` checked), CONNECT streams."""

    def __init__(
        self,
        addr: Addr,
        chain: str,
        key: str,
        ca: str,
        *,
        expect: str | None = None,
        settings: dict[int, int] | None = None,
        conn_window: int | None = None,
        auto_ack: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.sock = tls_connect(addr, client_context(chain, key, ca), expect, timeout)
        self.record = ConnRecord(
            0, peer_ids=peer_spiffe_ids(self.sock), alpn=self.sock.selected_alpn_protocol()
        )
        self.ep = H2Endpoint(
            self.sock,
            client_side=True,
            record=self.record,
            settings=settings,
            conn_window=conn_window,
            auto_ack=auto_ack,
        )

    def open(
        self,
        authority: str,
        *,
        method: str = "CONNECT",
        extra: Sequence[tuple[str, str]] = (),
        end_stream: bool = False,
    ) -> int:
        with self.ep.lock:
            sid = self.ep.conn.get_next_available_stream_id()
            headers = [(":method", method), (":authority", authority), *extra]
            self.ep.send_headers(sid, headers, end_stream=end_stream)
            return sid

    def response(self, sid: int, timeout: float = 10.0) -> StreamRecord:
        st = self.ep.stream(sid)
        self.ep.wait(
            lambda: st.status is not None or st.reset_code is not None or self.record.closed,
            timeout,
            f"response on stream {sid}",
        )
        return st

    def settings_received(self, timeout: float = 10.0) -> dict[int, int]:
        self.ep.wait(lambda: bool(self.record.settings_frames), timeout, "server SETTINGS")
        return self.record.remote_settings

    def close(self) -> None:
        self.ep.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- raw frames
def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack("!BHBBI", n >> 16, n & 0xFFFF, ftype, flags, sid & 0x7FFFFFFF) + payload


def settings_frame(entries: Sequence[tuple[int, int]] = (), ack: bool = False) -> bytes:
    return frame(
        SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack("!HI", k, v) for k, v in entries)
    )


@dataclass
class Frame:
    type: int
    flags: int
    sid: int
    payload: bytes
    headers: dict[str, str] | None = None  # HEADERS: decoded (HPACK state is per connection)

    @property
    def name(self) -> str:
        return FRAME_NAMES.get(self.type, f"0x{self.type:x}")

    def error_code(self) -> int:
        if self.type == RST_STREAM:
            return int(struct.unpack("!I", self.payload[:4])[0])
        if self.type == GOAWAY:
            return int(struct.unpack("!I", self.payload[4:8])[0])
        raise ValueError(f"{self.name} has no error code")

    def __repr__(self) -> str:
        extra = ""
        if self.type in (RST_STREAM, GOAWAY):
            extra = f" code={self.error_code()}"
            if self.type == GOAWAY:
                extra += f" debug={self.payload[8:60]!r}"
        return f"<{self.name} sid={self.sid} flags=0x{self.flags:x} len={len(self.payload)}{extra}>"


class RawH2:
    """A TLS connection on which the test writes raw HTTP/2 bytes and reads frames."""

    def __init__(
        self,
        addr: Addr,
        chain: str,
        key: str,
        ca: str,
        *,
        expect: str | None = None,
        alpn: Sequence[str] = ("h2",),
        timeout: float = 10.0,
    ) -> None:
        self.sock = tls_connect(addr, client_context(chain, key, ca, alpn), expect, timeout)
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.dec.max_header_list_size = 1 << 24
        self.buf = bytearray()
        self.frames: list[Frame] = []
        self.eof = False
        self.error: str | None = None

    def send(self, data: bytes) -> bool:
        """Write; False if the peer already closed (reset / broken pipe)."""
        try:
            self.sock.sendall(data)
            return True
        except (OSError, ssl.SSLError) as e:
            self.error = repr(e)
            return False

    def preface(self, entries: Sequence[tuple[int, int]] = ()) -> None:
        self.send(PREFACE + settings_frame(entries))

    def headers_block(self, headers: Sequence[tuple[str, str]]) -> bytes:
        return bytes(self.enc.encode(list(headers)))

    def connect_frame(
        self,
        sid: int,
        authority: str,
        *,
        method: str = "CONNECT",
        extra: Sequence[tuple[str, str]] = (),
        end_stream: bool = False,
    ) -> bytes:
        block = self.headers_block([(":method", method), (":authority", authority), *extra])
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, block)

    def read(
        self, timeout: float = 5.0, until: Callable[[Frame], bool] | None = None
    ) -> list[Frame]:
        """Read frames until ``until`` matches one, EOF, or ``timeout``; returns new frames."""
        new: list[Frame] = []
        end = time.monotonic() + timeout
        while not self.eof:
            if until is not None and any(until(f) for f in new):
                break
            left = end - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(1 << 16)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except (OSError, ssl.SSLError) as e:
                self.error = repr(e)
                self.eof = True
                break
            if not data:
                self.eof = True
                break
            self.buf.extend(data)
            while len(self.buf) >= 9:
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + n:
                    break
                t, fl = self.buf[3], self.buf[4]
                sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
                f = Frame(t, fl, sid, bytes(self.buf[9 : 9 + n]))
                del self.buf[: 9 + n]
                if f.type == SETTINGS and not f.flags & ACK:
                    self.send(settings_frame(ack=True))
                if f.type == PING and not f.flags & ACK:
                    self.send(frame(PING, ACK, 0, f.payload))
                if f.type == HEADERS and f.flags & END_HEADERS:
                    with contextlib.suppress(Exception):
                        f.headers = {_s(k): _s(v) for k, v in self.dec.decode(f.payload)}
                new.append(f)
                self.frames.append(f)
        return new

    def goaway(self) -> Frame | None:
        return next((f for f in self.frames if f.type == GOAWAY), None)

    def status(self, sid: int) -> int | None:
        for f in self.frames:
            if f.type == HEADERS and f.sid == sid and f.headers:
                return int(f.headers[":status"])
        return None

    def rst(self, sid: int) -> int | None:
        for f in self.frames:
            if f.type == RST_STREAM and f.sid == sid:
                return f.error_code()
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
