"""One interface over the independent HTTP/2 peers, so each interop test runs unchanged
against Node.js's http2 and Python's h2.

* ``ServerPeer`` — an HTTP/2 CONNECT server ztun's outbound talks to (``script`` mode: the
  test answers each stream; ``echo``).
* ``ClientPeer`` — an HTTP/2 CONNECT client that talks to ztun's HBONE server.

Both verify ztun's certificate chain against the CA and its SPIFFE ID, and report what
they saw on the wire: request headers (as received, in order), the SETTINGS and the
connection window ztun gave, END_STREAM, RST_STREAM codes. Settings are normalized to
``initial_window_size``, ``max_frame_size``, ``max_concurrent_streams``, ``enable_push``
(present only when the peer can tell).
"""

from __future__ import annotations

import base64
import time
from typing import Any, Self

from hbone import h2peer
from hbone.nodepeer import NodePeer
from hbone.util import PeerFiles

KINDS = ("node", "h2")

_H2_SETTING_NAMES = {
    2: "enable_push",
    3: "max_concurrent_streams",
    4: "initial_window_size",
    5: "max_frame_size",
}
_NODE_SETTING_NAMES = {
    "enablePush": "enable_push",
    "maxConcurrentStreams": "max_concurrent_streams",
    "initialWindowSize": "initial_window_size",
    "maxFrameSize": "max_frame_size",
}


def _norm_node(s: dict[str, Any]) -> dict[str, int]:
    return {_NODE_SETTING_NAMES[k]: int(v) for k, v in s.items() if k in _NODE_SETTING_NAMES}


def _norm_h2(s: dict[int, int]) -> dict[str, int]:
    return {_H2_SETTING_NAMES[k]: int(v) for k, v in s.items() if k in _H2_SETTING_NAMES}


def _at_least(d: bytes, n: int) -> bytes | None:
    return d if len(d) >= n else None


def _wait(pred: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ====================================================================== server side
class ServerStream:
    """A CONNECT stream as the peer server saw it."""

    headers: dict[str, str]
    raw: list[tuple[str, str]]
    conn: int

    def respond(self, status: int, end: bool = False) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError

    def rst(self, code: int = 8) -> None:
        """RST_STREAM(code) the way the implementation's API does it (Node: END_STREAM first)."""
        raise NotImplementedError

    def rst_only(self) -> None:
        """An RST_STREAM with no END_STREAM before it (Node: destroy(), INTERNAL_ERROR)."""
        raise NotImplementedError

    def data(self, n: int, timeout: float = 10.0) -> bytes:
        """Wait until at least ``n`` bytes arrived; return everything received so far."""
        raise NotImplementedError

    def wait_end(self, timeout: float = 10.0) -> None:
        """Wait for END_STREAM from ztun."""
        raise NotImplementedError

    def wait_reset(self, timeout: float = 10.0) -> int:
        """Wait for RST_STREAM from ztun; its error code."""
        raise NotImplementedError

    def ended(self) -> bool:
        raise NotImplementedError

    def reset_code(self) -> int | None:
        """RST_STREAM code received from ztun, if any."""
        raise NotImplementedError


class ServerPeer:
    kind: str
    address: tuple[str, int]

    def stream(self, n: int, timeout: float = 10.0) -> ServerStream:
        """The ``n``-th (0-based) CONNECT stream received, over all connections."""
        raise NotImplementedError

    def settings(self, conn: int = 0) -> dict[str, int]:
        raise NotImplementedError

    def conn_window(self, conn: int = 0) -> int:
        """How much the peer may send on the connection before ztun opens its window
        further, as of the first request (ztun's connection receive window)."""
        raise NotImplementedError

    def client_ids(self, conn: int = 0) -> list[str]:
        raise NotImplementedError

    def connections(self) -> int:
        raise NotImplementedError

    def goaway(self, conn: int = 0) -> None:
        raise NotImplementedError

    def sync(self, conn: int = 0) -> None:
        """Send a PING on ``conn`` and wait for ztun's ACK: everything sent before it has
        been processed by ztun (frames are handled in order)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NodeServerStream(ServerStream):
    def __init__(self, peer: NodePeer, ev: dict[str, Any]) -> None:
        self.p = peer
        self.n = ev["n"]
        self.conn = ev["conn"]
        self.headers = ev["headers"]
        raw = ev["raw"]
        self.raw = list(zip(raw[::2], raw[1::2], strict=True))
        self.event = ev

    def _cmd(self, **kw: Any) -> None:
        before = len(self.p.find("done", op=kw["op"], n=self.n))
        self.p.send(n=self.n, **kw)
        _wait(
            lambda: len(self.p.find("done", op=kw["op"], n=self.n)) > before, 10, f"{kw['op']} done"
        )

    def respond(self, status: int, end: bool = False) -> None:
        self._cmd(op="respond", status=status, endStream=end)

    def write(self, data: bytes) -> None:
        self._cmd(op="write", b64=base64.b64encode(data).decode())

    def end(self) -> None:
        self._cmd(op="end")

    def rst(self, code: int = 8) -> None:
        self._cmd(op="rst", code=code)

    def rst_only(self) -> None:
        self._cmd(op="destroy")

    def _received(self) -> bytes:
        return b"".join(base64.b64decode(e["b64"]) for e in self.p.find("data", n=self.n))

    def data(self, n: int, timeout: float = 10.0) -> bytes:
        if n == 0:
            return self._received()
        got = _wait(
            lambda: _at_least(self._received(), n), timeout, f"{n} bytes on node stream {self.n}"
        )
        return bytes(got)

    def wait_end(self, timeout: float = 10.0) -> None:
        self.p.wait("end", timeout, n=self.n)

    def wait_reset(self, timeout: float = 10.0) -> int:
        ev = self.p.wait_for(
            lambda e: e.get("ev") == "close" and e.get("n") == self.n, timeout, "close"
        )
        assert ev["rstCode"] != 0, f"node stream {self.n} closed without RST_STREAM: {ev}"
        return int(ev["rstCode"])

    def ended(self) -> bool:
        return bool(self.p.find("end", n=self.n))

    def reset_code(self) -> int | None:
        c = self.p.find("close", n=self.n)
        return int(c[0]["rstCode"]) if c and c[0]["rstCode"] else None


class NodeServer(ServerPeer):
    kind = "node"

    def __init__(
        self,
        files: PeerFiles,
        *,
        mode: str = "script",
        expect_client: str | None = None,
        host: str = "127.0.0.1",
        argv_prefix: tuple[str, ...] = (),
    ) -> None:
        args = [*files.node_args(), "--listen", f"{host}:0", "--mode", mode]
        if expect_client:
            args += ["--expect-client", expect_client]
        self.p = NodePeer("h2_server.js", args, argv_prefix)
        self.address = (host, int(self.p.wait("listening")["port"]))

    def stream(self, n: int, timeout: float = 10.0) -> ServerStream:
        return NodeServerStream(self.p, self.p.wait("stream", timeout, n=n))

    def settings(self, conn: int = 0) -> dict[str, int]:
        return _norm_node(self.p.wait("remote_settings", 10, conn=conn)["settings"])

    def conn_window(self, conn: int = 0) -> int:
        ev = self.p.wait_for(
            lambda e: e.get("ev") == "stream" and e.get("conn") == conn, 10, "stream"
        )
        return int(ev["state"]["remoteWindowSize"])

    def client_ids(self, conn: int = 0) -> list[str]:
        return list(self.p.wait("session", 10, conn=conn)["peerSans"])

    def connections(self) -> int:
        return len(self.p.find("session"))

    def goaway(self, conn: int = 0) -> None:
        self.p.send(op="goaway", conn=conn)

    def sync(self, conn: int = 0) -> None:
        before = len(self.p.find("pong", conn=conn))
        self.p.send(op="ping", conn=conn)
        _wait(lambda: len(self.p.find("pong", conn=conn)) > before, 10, "PING ACK")

    def close(self) -> None:
        self.p.close()


class H2ServerStream(ServerStream):
    def __init__(self, ep: h2peer.H2Endpoint, st: h2peer.StreamRecord, conn: int) -> None:
        self.ep, self.st, self.conn = ep, st, conn
        self.raw = list(st.headers)
        self.headers = dict(st.headers)

    def respond(self, status: int, end: bool = False) -> None:
        self.ep.send_headers(self.st.sid, [(":status", str(status))], end_stream=end)

    def write(self, data: bytes) -> None:
        self.ep.send(self.st.sid, data)

    def end(self) -> None:
        self.ep.end(self.st.sid)

    def rst(self, code: int = 8) -> None:
        self.ep.reset(self.st.sid, code)

    def rst_only(self) -> None:
        self.ep.reset(self.st.sid, 2)

    def data(self, n: int, timeout: float = 10.0) -> bytes:
        self.ep.wait(
            lambda: len(self.st.data) >= n, timeout, f"{n} bytes on h2 stream {self.st.sid}"
        )
        with self.ep.lock:
            return bytes(self.st.data)

    def wait_end(self, timeout: float = 10.0) -> None:
        self.ep.wait(lambda: self.st.ended, timeout, f"END_STREAM on h2 stream {self.st.sid}")

    def wait_reset(self, timeout: float = 10.0) -> int:
        self.ep.wait(lambda: self.st.remote_reset is True, timeout, f"RST_STREAM on {self.st.sid}")
        assert self.st.reset_code is not None
        return self.st.reset_code

    def ended(self) -> bool:
        return self.st.ended

    def reset_code(self) -> int | None:
        return self.st.reset_code if self.st.remote_reset else None


class H2ServerPeer(ServerPeer):
    kind = "h2"

    def __init__(
        self,
        files: PeerFiles,
        *,
        mode: str = "script",
        expect_client: str | None = None,
        host: str = "127.0.0.1",
        **kw: Any,
    ) -> None:
        self.srv = h2peer.H2Server(
            files.chain,
            files.key,
            files.ca,
            host=host,
            expect_client=expect_client,
            behavior=mode,
            **kw,
        )
        self.address = self.srv.address

    def stream(self, n: int, timeout: float = 10.0) -> ServerStream:
        ep, st = self.srv.wait_stream(n + 1, timeout)
        return H2ServerStream(ep, st, self.srv.endpoints.index(ep))

    def settings(self, conn: int = 0) -> dict[str, int]:
        ep = self.srv.wait_conns(conn + 1)[conn]
        rec = self.srv.endpoints[conn].record
        self.srv.endpoints[conn].wait(lambda: bool(rec.settings_frames), 10, "client SETTINGS")
        del ep
        return _norm_h2(rec.remote_settings)

    def conn_window(self, conn: int = 0) -> int:
        self.srv.wait_conns(conn + 1)
        rec = self.srv.endpoints[conn].record
        self.srv.endpoints[conn].wait(
            lambda: any(s == 0 for s, _ in rec.window_updates), 10, "connection WINDOW_UPDATE"
        )
        return 65535 + sum(d for s, d in rec.window_updates[:1] if s == 0)

    def client_ids(self, conn: int = 0) -> list[str]:
        return list(self.srv.wait_conns(conn + 1)[conn].peer_ids)

    def connections(self) -> int:
        return len(self.srv.endpoints)

    def goaway(self, conn: int = 0) -> None:
        self.srv.endpoints[conn].goaway()

    def sync(self, conn: int = 0) -> None:
        ep = self.srv.endpoints[conn]
        before = ep.record.ping_acks
        ep.ping()
        ep.wait(lambda: ep.record.ping_acks > before, 10, "PING ACK")

    def close(self) -> None:
        self.srv.close()


def server_peer(kind: str, files: PeerFiles, **kw: Any) -> ServerPeer:
    return NodeServer(files, **kw) if kind == "node" else H2ServerPeer(files, **kw)


# ====================================================================== client side
class ClientStream:
    def status(self, timeout: float = 10.0) -> int:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError

    def rst(self, code: int = 8) -> None:
        """RST_STREAM(code) the way the implementation's API does it (Node: END_STREAM first)."""
        raise NotImplementedError

    def rst_only(self) -> None:
        """An RST_STREAM with no END_STREAM before it (Node: destroy(), INTERNAL_ERROR)."""
        raise NotImplementedError

    def data(self, n: int, timeout: float = 10.0) -> bytes:
        raise NotImplementedError

    def wait_end(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def wait_reset(self, timeout: float = 10.0) -> int:
        raise NotImplementedError

    def ended(self) -> bool:
        raise NotImplementedError


class ClientPeer:
    kind: str

    def settings(self) -> dict[str, int]:
        """The SETTINGS ztun's server sent."""
        raise NotImplementedError

    def conn_window(self) -> int:
        """How much the peer may send on the connection (ztun's connection window)."""
        raise NotImplementedError

    def server_ids(self) -> list[str]:
        raise NotImplementedError

    def open(self, authority: str, headers: dict[str, str] | None = None) -> ClientStream:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NodeClientStream(ClientStream):
    def __init__(self, p: NodePeer, n: int) -> None:
        self.p, self.n = p, n

    def _cmd(self, **kw: Any) -> None:
        before = len(self.p.find("done", op=kw["op"], n=self.n))
        self.p.send(n=self.n, **kw)
        _wait(
            lambda: len(self.p.find("done", op=kw["op"], n=self.n)) > before, 10, f"{kw['op']} done"
        )

    def status(self, timeout: float = 10.0) -> int:
        def done(e: dict[str, Any]) -> bool:
            if e.get("ev") in ("session_error", "session_close"):
                return True
            return e.get("n") == self.n and e.get("ev") in ("response", "close")

        ev = self.p.wait_for(done, timeout, "response")
        if ev["ev"] in ("session_error", "session_close"):
            raise ConnectionError(f"node client: {ev}")
        if ev["ev"] == "close":
            raise AssertionError(f"node stream {self.n} closed without a response: {ev}")
        return int(ev["status"])

    def response_event(self) -> dict[str, Any]:
        return self.p.wait("response", 10, n=self.n)

    def write(self, data: bytes) -> None:
        self._cmd(op="write", b64=base64.b64encode(data).decode())

    def end(self) -> None:
        self._cmd(op="end")

    def rst(self, code: int = 8) -> None:
        self._cmd(op="rst", code=code)

    def rst_only(self) -> None:
        self._cmd(op="destroy")

    def _received(self) -> bytes:
        return b"".join(base64.b64decode(e["b64"]) for e in self.p.find("data", n=self.n))

    def data(self, n: int, timeout: float = 10.0) -> bytes:
        if n == 0:
            return self._received()
        got = _wait(
            lambda: _at_least(self._received(), n),
            timeout,
            f"{n} bytes on node client stream {self.n}",
        )
        return bytes(got)

    def wait_end(self, timeout: float = 10.0) -> None:
        self.p.wait("end", timeout, n=self.n)

    def wait_reset(self, timeout: float = 10.0) -> int:
        ev = self.p.wait_for(
            lambda e: e.get("ev") == "close" and e.get("n") == self.n, timeout, "close"
        )
        assert ev["rstCode"] != 0, f"node client stream {self.n} closed without RST_STREAM: {ev}"
        return int(ev["rstCode"])

    def ended(self) -> bool:
        return bool(self.p.find("end", n=self.n))


class NodeClient(ClientPeer):
    kind = "node"

    def __init__(
        self,
        addr: tuple[str, int],
        files: PeerFiles,
        *,
        expect: str | None,
        argv_prefix: tuple[str, ...] = (),
    ) -> None:
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        args = [*files.node_args(), "--to", f"{host}:{addr[1]}"]
        if expect:
            args += ["--expect-server", expect]
        self.p = NodePeer("h2_client.js", args, argv_prefix)
        self.p.send(op="session", s=0)
        ev = self.p.wait_for(lambda e: e.get("ev") in ("session", "session_error"), 10, "session")
        if ev["ev"] == "session_error":
            self.p.close()
            raise ConnectionError(f"node client: {ev}")
        self._next = 0

    def settings(self) -> dict[str, int]:
        return _norm_node(self.p.wait("remote_settings", 10, s=0)["settings"])

    def conn_window(self) -> int:
        ev = self.p.wait_for(lambda e: e.get("ev") == "response", 10, "a response")
        return int(ev["state"]["remoteWindowSize"])

    def server_ids(self) -> list[str]:
        return list(self.p.wait("session", 10, s=0)["peerSans"])

    def open(self, authority: str, headers: dict[str, str] | None = None) -> ClientStream:
        n = self._next
        self._next += 1
        self.p.send(op="open", s=0, n=n, authority=authority, headers=headers or {})
        return NodeClientStream(self.p, n)

    def close(self) -> None:
        self.p.close()


class H2ClientStream(ClientStream):
    def __init__(self, c: h2peer.H2Client, sid: int) -> None:
        self.c, self.sid = c, sid
        self.st = c.ep.stream(sid)

    def status(self, timeout: float = 10.0) -> int:
        st = self.c.response(self.sid, timeout)
        if st.status is None:
            raise AssertionError(f"h2 stream {self.sid} got no response: {st}")
        return st.status

    def write(self, data: bytes) -> None:
        self.c.ep.send(self.sid, data)

    def end(self) -> None:
        self.c.ep.end(self.sid)

    def rst(self, code: int = 8) -> None:
        self.c.ep.reset(self.sid, code)

    def rst_only(self) -> None:
        self.c.ep.reset(self.sid, 2)

    def data(self, n: int, timeout: float = 10.0) -> bytes:
        self.c.ep.wait(
            lambda: len(self.st.data) >= n, timeout, f"{n} bytes on h2 stream {self.sid}"
        )
        with self.c.ep.lock:
            return bytes(self.st.data)

    def wait_end(self, timeout: float = 10.0) -> None:
        self.c.ep.wait(lambda: self.st.ended, timeout, f"END_STREAM on h2 stream {self.sid}")

    def wait_reset(self, timeout: float = 10.0) -> int:
        self.c.ep.wait(lambda: self.st.remote_reset is True, timeout, f"RST_STREAM on {self.sid}")
        assert self.st.reset_code is not None
        return self.st.reset_code

    def ended(self) -> bool:
        return self.st.ended


class H2ClientPeer(ClientPeer):
    kind = "h2"

    def __init__(self, addr: tuple[str, int], files: PeerFiles, *, expect: str | None) -> None:
        self.c = h2peer.H2Client(addr, files.chain, files.key, files.ca, expect=expect)

    def settings(self) -> dict[str, int]:
        return _norm_h2(self.c.settings_received())

    def conn_window(self) -> int:
        rec = self.c.record
        self.c.ep.wait(
            lambda: any(s == 0 for s, _ in rec.window_updates), 10, "connection WINDOW_UPDATE"
        )
        return 65535 + next(d for s, d in rec.window_updates if s == 0)

    def server_ids(self) -> list[str]:
        return list(self.c.record.peer_ids)

    def open(self, authority: str, headers: dict[str, str] | None = None) -> ClientStream:
        return H2ClientStream(self.c, self.c.open(authority, extra=list((headers or {}).items())))

    def close(self) -> None:
        self.c.close()


def client_peer(
    kind: str, addr: tuple[str, int], files: PeerFiles, *, expect: str | None, **kw: Any
) -> ClientPeer:
    if kind == "node":
        return NodeClient(addr, files, expect=expect, **kw)
    return H2ClientPeer(addr, files, expect=expect)
