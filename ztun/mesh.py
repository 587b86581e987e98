"""Mesh-native connections for Python code: HBONE client and server on a Tunnel.

``Tunnel.connect()`` opens an HTTP/2 CONNECT stream over a pooled mutual-TLS
connection (HBONE, as Istio's ztunnel speaks it) and returns a real socket: one end
of a socketpair whose other end the engine carries. ``Tunnel.serve()`` accepts HBONE
and hands each tunnelled connection to Python through ``Tunnel.accept()``, with the
peer's verified SPIFFE ID attached — so a Python service can authorize on it.

The bytes never pass through Python on the way: the engine's worker threads move
them between the socketpair and the encrypted stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ztun._core import _engine
from ztun.errors import ConnectError, ZtunError
from ztun.errors import invalid_argument as _bad

if TYPE_CHECKING:
    from ztun.events import ConnectionEvent
    from ztun.tunnel import Tunnel

__all__ = ["HBONE_PORT", "Destination", "HboneServer", "TunnelSocket"]

HBONE_PORT = 15008
Address = tuple[str, int]


class TunnelSocket(socket.socket):
    """A socket whose other end is carried over HBONE by the engine.

    ``peer_id`` is the verified SPIFFE ID of the peer (the server for ``connect()``,
    the client for ``accept()``); ``target`` the CONNECT authority (workload ip, port);
    ``trace`` the W3C traceparent of this connection (it appears in both ends' logs).
    A reset of the tunnelled connection shows up as a plain close here: the engine
    reports the reason in its events.
    """

    peer_id: str | None
    target: Address | None
    trace: str | None
    conn_id: int

    @classmethod
    def _from_fd(cls, fd: int, ev: ConnectionEvent) -> TunnelSocket:
        s = cls(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
        s.setblocking(True)
        s.peer_id = ev.peer_id
        s.target = ev.target
        s.trace = ev.trace
        s.conn_id = ev.conn_id
        return s

    def __repr__(self) -> str:
        return f"<TunnelSocket fd={self.fileno()} peer={self.peer_id} target={self.target}>"


@dataclass(frozen=True)
class Destination:
    """A mesh workload outbound connections may reach over HBONE.

    ``spiffe_id`` is the identity its server must present; ``via`` where its HBONE
    listener is (default: ``ip`` port 15008). A destination with no ``spiffe_id``
    is outside the mesh: connections to it go out directly (passthrough).
    """

    ip: str
    spiffe_id: str | None = None
    via: Address | None = None
    # On this node: with the eBPF accelerator the tunnel decides policy itself and the
    # payload goes app to app in the kernel (the sockmap shortcut) instead of HBONE.
    local: bool = False


@dataclass
class _Pending:
    done: threading.Event
    sock: socket.socket
    event: ConnectionEvent | None = None
    future: asyncio.Future[ConnectionEvent] | None = None


class HboneServer:
    """Handle of an HBONE listener (``Tunnel.serve``)."""

    def __init__(self, tunnel: Tunnel, listener_id: int, address: Address, deliver: bool) -> None:
        self._tunnel = tunnel
        self.id = listener_id
        self.address = address
        self.deliver = deliver

    def close(self) -> None:
        self._tunnel._remove_listener(self)  # type: ignore[arg-type]

    def __enter__(self) -> HboneServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<HboneServer {self.address[0]}:{self.address[1]} id={self.id}>"


class MeshMixin:
    """HBONE client and server methods of :class:`ztun.Tunnel`."""

    # Provided by Tunnel.
    _lock: threading.RLock
    _tls: Any
    _loop: asyncio.AbstractEventLoop | None
    _endpoints: dict[int, Any]

    def _mesh_init(self) -> None:
        self._request_ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._virtual: dict[tuple[Address, tuple[str, ...]], int] = {}
        self._accepted: queue.Queue[TunnelSocket] = queue.Queue()
        self._accept_waiters: list[asyncio.Future[TunnelSocket]] = []

    # ---- client ----------------------------------------------------------

    def _virtual_listener(self, via: Address, expect: tuple[str, ...]) -> int:
        key = (via, expect)
        with self._lock:
            lid = self._virtual.get(key)
            if lid is not None:
                return lid
            engine = self._require_engine()  # type: ignore[attr-defined]
            new_id: int
            new_id, _ = engine.add_listener(
                _engine.MODE_HBONE_OUT,
                None,
                via,
                tls=self._tls,
                expect=expect,
                flags=_engine.LISTENER_VIRTUAL,
            )
            self._virtual[key] = new_id
            return new_id

    def _start_connect(
        self, address: Address, expect: Sequence[str], via: Address | None
    ) -> tuple[int, _Pending]:
        from ztun.tunnel import _check_address

        address = _check_address(address, "address", allow_port_zero=False)
        if isinstance(expect, str) or not expect:
            raise _bad("expect", "a non-empty list of SPIFFE IDs the server may present")
        ids = tuple(sorted(self._check_spiffe(s, "expect") for s in expect))  # type: ignore[attr-defined]
        if not self._has_identity:  # type: ignore[attr-defined]
            raise _bad("identity", "HBONE needs Tunnel(identity=..., trust=...)")
        via = (
            _check_address(via, "via", allow_port_zero=False)
            if via is not None
            else (address[0], HBONE_PORT)
        )
        lid = self._virtual_listener(via, ids)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        rid = next(self._request_ids)
        pending = _Pending(threading.Event(), mine)
        with self._lock:
            self._pending[rid] = pending
        self._ensure_pump()  # type: ignore[attr-defined]
        try:
            self._require_engine().adopt(lid, theirs.fileno(), address, rid)  # type: ignore[attr-defined]
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            mine.close()
            theirs.close()
            raise
        theirs.detach()  # the engine owns that end now
        return rid, pending

    @staticmethod
    def _finish_connect(pending: _Pending, address: Address) -> TunnelSocket:
        ev = pending.event
        if ev is None:
            pending.sock.close()
            raise ConnectError(f"HBONE connect to {address}: the tunnel closed", reason="shutdown")
        if ev.kind != "connect_done" or ev.reason != "ok":
            pending.sock.close()
            detail = f": {ev.detail}" if ev.detail else ""
            status = ev.http_status or None
            raise ConnectError(
                f"HBONE connect to {address[0]}:{address[1]} failed ({ev.reason}{detail})",
                status=status,
                reason=ev.reason,
            )
        fd = pending.sock.detach()
        return TunnelSocket._from_fd(fd, ev)

    def connect(
        self,
        address: Address,
        *,
        expect: Sequence[str],
        via: Address | None = None,
        timeout: float | None = 30.0,
    ) -> TunnelSocket:
        """Open a tunnelled TCP connection to ``address`` (a workload's ip, port).

        The engine dials ``via`` (default: the workload's IP on port 15008) over a
        pooled mutual-TLS HTTP/2 connection, verifies that the server presents one of
        ``expect``, and sends ``CONNECT address``. Returns once the peer answered 200;
        raises :class:`~ztun.errors.ConnectError` (with ``status`` 401 for a policy
        denial, 503 when the target is unreachable, ...) otherwise.
        """
        rid, pending = self._start_connect(address, expect, via)
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(rid, None)
            pending.sock.close()
            raise ConnectError(f"HBONE connect to {address} timed out", reason="timeout")
        return self._finish_connect(pending, address)

    async def open_connection(
        self,
        address: Address,
        *,
        expect: Sequence[str],
        via: Address | None = None,
        limit: int = 2**16,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """``asyncio.open_connection`` over HBONE (see :meth:`connect`)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ConnectionEvent] = loop.create_future()
        rid, pending = self._start_connect(address, expect, via)
        with self._lock:
            if pending.event is None:
                pending.future = fut
            else:
                fut.set_result(pending.event)
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                self._pending.pop(rid, None)
            pending.sock.close()
            raise
        sock = self._finish_connect(pending, address)
        sock.setblocking(False)
        return await asyncio.open_connection(sock=sock, limit=limit)

    def _on_connect_done(self, ev: ConnectionEvent) -> None:
        with self._lock:
            pending = self._pending.pop(ev.request_id, None)
            if pending is None:
                return
            pending.event = ev
            fut = pending.future
        pending.done.set()
        if fut is not None and not fut.done():
            fut.get_loop().call_soon_threadsafe(_set_result, fut, ev)

    # ---- routed outbound (SOCKS5, capture) --------------------------------

    def set_directory(self, destinations: Sequence[Destination]) -> None:
        """Tell the engine which addresses are mesh workloads (and their identities).

        Outbound connections whose destination is chosen per connection (SOCKS5,
        transparent capture) go over HBONE to listed workloads and directly to
        anything else. The whole directory is replaced atomically.
        """
        from ztun.tunnel import _check_address

        rows = []
        for d in destinations:
            ip = _check_address((d.ip, 1), "destinations", allow_port_zero=False)[0]
            sid = self._check_spiffe(d.spiffe_id, "spiffe_id") if d.spiffe_id else None  # type: ignore[attr-defined]
            via = _check_address(d.via, "via", allow_port_zero=False) if d.via else None
            rows.append((ip, sid, via, d.local))
        self._require_engine().set_directory(rows)  # type: ignore[attr-defined]

    def socks5(self, listen: Address = ("127.0.0.1", 15080)) -> Any:
        """A SOCKS5 entry point (ztunnel's 15080): clients name the destination
        (IP literals only); mesh workloads are reached over HBONE, others directly."""
        from ztun.tunnel import Forward, _check_address

        listen = _check_address(listen, "listen", allow_port_zero=True)
        if not self._has_identity:  # type: ignore[attr-defined]
            raise _bad("identity", "the SOCKS5 entry point needs Tunnel(identity=...)")
        engine = self._require_engine()  # type: ignore[attr-defined]
        lid, bound = engine.add_listener(_engine.MODE_SOCKS5, listen, None, tls=self._tls)
        handle = Forward(self, lid, bound, ("0.0.0.0", 0), ())  # type: ignore[arg-type]
        with self._lock:
            self._endpoints[lid] = handle
        self._ensure_pump()  # type: ignore[attr-defined]
        return handle

    # ---- server ----------------------------------------------------------

    def serve(
        self,
        listen: Address = ("0.0.0.0", HBONE_PORT),
        *,
        workloads: Sequence[str] | None = None,
        deliver: bool = True,
    ) -> HboneServer:
        """Accept HBONE (mTLS + HTTP/2 CONNECT) on ``listen``.

        ``workloads`` are the IP addresses this server answers for: a CONNECT to any
        other address gets 400 (default: the listen address, or loopback when
        listening on a wildcard). With ``deliver`` (the default) each tunnelled
        connection is handed to :meth:`accept`; otherwise the engine dials the
        CONNECT authority itself, as a node proxy does.
        """
        from ztun.tunnel import _check_address

        listen = _check_address(listen, "listen", allow_port_zero=True)
        if not self._has_identity:  # type: ignore[attr-defined]
            raise _bad("identity", "serve() terminates mTLS and needs Tunnel(identity=...)")
        if workloads is None:
            wildcard = listen[0] in ("0.0.0.0", "::")
            workloads = ["127.0.0.1", "::1"] if wildcard else [listen[0]]
        ips = [_check_address((w, 1), "workloads", allow_port_zero=False)[0] for w in workloads]
        if not ips:
            raise _bad("workloads", "at least one workload address is required")
        engine = self._require_engine()  # type: ignore[attr-defined]
        lid, bound = engine.add_listener(
            _engine.MODE_HBONE_IN,
            listen,
            None,
            tls=self._tls,
            workload_ips=ips,
            flags=_engine.LISTENER_DELIVER if deliver else 0,
        )
        handle = HboneServer(self, lid, bound, deliver)  # type: ignore[arg-type]
        with self._lock:
            self._endpoints[lid] = handle
        self._ensure_pump()  # type: ignore[attr-defined]
        return handle

    def accept(self, timeout: float | None = None) -> TunnelSocket:
        """The next tunnelled connection delivered by a :meth:`serve` listener."""
        try:
            return self._accepted.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no tunnelled connection arrived in time") from None

    async def aaccept(self) -> TunnelSocket:
        """``await`` the next tunnelled connection (see :meth:`accept`)."""
        with contextlib.suppress(queue.Empty):
            return self._accepted.get_nowait()
        fut: asyncio.Future[TunnelSocket] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._accept_waiters.append(fut)
        try:
            return await fut
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._accept_waiters.remove(fut)

    def _on_accept(self, ev: ConnectionEvent) -> None:
        if ev.fd is None or ev.fd < 0:
            return
        sock = TunnelSocket._from_fd(ev.fd, ev)
        with self._lock:
            while self._accept_waiters:
                fut = self._accept_waiters.pop(0)
                if not fut.done():
                    fut.get_loop().call_soon_threadsafe(_set_result, fut, sock)
                    return
        self._accepted.put(sock)

    def _mesh_close(self) -> None:
        """Fail pending connects, close undelivered connections."""
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
            waiters, self._accept_waiters = self._accept_waiters, []
        for p in pending:
            p.sock.close()
            p.done.set()
        for fut in waiters:
            if not fut.done():
                fut.get_loop().call_soon_threadsafe(_set_exc, fut, ZtunError("tunnel closed"))
        while True:
            try:
                self._accepted.get_nowait().close()
            except queue.Empty:
                break


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exc(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
