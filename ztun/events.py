"""Events the engine reports: connections opened and closed, and its own log lines.

The engine's worker threads write fixed-layout records into a bounded ring; this
module turns a drained batch into typed objects and routes them: connection records
to the ``ztun.access`` logger (one line per finished connection, with ztunnel's
access-log fields) and to subscribers, engine log lines to ``ztun.engine``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

__all__ = ["ConnectionEvent", "EngineLog", "access_log_line", "parse_event"]

access_logger = logging.getLogger("ztun.access")
engine_logger = logging.getLogger("ztun.engine")

_MODES = {1: "forward", 2: "outbound", 3: "inbound", 4: "inbound", 5: "outbound"}
_MODE_PROTO = {1: "TCP", 2: "TLS", 3: "TLS", 4: "HBONE", 5: "HBONE"}


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """A connection established (``kind == "open"``) or finished (``"close"``).

    ``"connect_done"`` reports the outcome of a ``Tunnel.connect()`` and ``"accept"``
    carries a tunnelled connection delivered to ``Tunnel.accept()``.
    """

    kind: str
    conn_id: int
    listener_id: int
    mode: int
    reason: str
    src: tuple[str, int] | None
    dst: tuple[str, int] | None
    peer_id: str | None
    local_id: str | None
    bytes_sent: int  # downstream -> upstream
    bytes_received: int  # upstream -> downstream
    start_ns: int
    duration_ns: int
    policy: int
    policy_rule: int
    http_status: int
    errno: int
    detail: str | None
    worker: int
    target: tuple[str, int] | None = None  # HBONE: the CONNECT authority
    trace: str | None = None  # HBONE: traceparent
    baggage: str | None = None  # HBONE: baggage received
    request_id: int = 0  # adopted connections (Tunnel.connect)
    fd: int | None = None  # "accept": the delivered socket

    @property
    def direction(self) -> str:
        return _MODES.get(self.mode, "unknown")

    @property
    def ok(self) -> bool:
        return self.reason == "ok"


@dataclass(frozen=True, slots=True)
class EngineLog:
    level: int
    message: str
    worker: int


def parse_event(raw: dict[str, Any]) -> ConnectionEvent | EngineLog | None:
    kind = raw.get("type")
    if kind in ("open", "close", "connect_done", "accept"):
        return ConnectionEvent(
            kind=kind,
            conn_id=raw["conn_id"],
            listener_id=raw["listener_id"],
            mode=raw["mode"],
            reason=raw["reason"],
            src=raw["src"],
            dst=raw["dst"],
            peer_id=raw["peer_id"],
            local_id=raw["local_id"],
            bytes_sent=raw["bytes_down_up"],
            bytes_received=raw["bytes_up_down"],
            start_ns=raw["start_ns"],
            duration_ns=raw["duration_ns"],
            policy=raw["policy"],
            policy_rule=raw["policy_rule"],
            http_status=raw["http_status"],
            errno=raw["errno"],
            detail=raw["detail"],
            worker=raw["worker"],
            target=raw.get("target"),
            trace=raw.get("trace"),
            baggage=raw.get("baggage"),
            request_id=raw.get("request_id", 0),
            fd=raw.get("fd") if kind == "accept" else None,
        )
    if kind == "log":
        return EngineLog(level=raw["level"], message=raw["message"], worker=raw["worker"])
    return None


def _addr(a: tuple[str, int] | None) -> str:
    if a is None:
        return "-"
    host, port = a
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def access_log_line(ev: ConnectionEvent, policy_name: str | None = None) -> str:
    """One line in the spirit of ztunnel's access log (key=value pairs)."""
    fields = [
        f"conn={ev.conn_id}",
        f"src.addr={_addr(ev.src)}",
        f"dst.addr={_addr(ev.dst)}",
        f"direction={ev.direction}",
        f"protocol={_MODE_PROTO.get(ev.mode, '?')}",
    ]
    if ev.direction == "inbound":
        fields.append(f"src.identity={ev.peer_id or '-'}")
        fields.append(f"dst.identity={ev.local_id or '-'}")
    elif ev.local_id or ev.peer_id:
        fields.append(f"src.identity={ev.local_id or '-'}")
        fields.append(f"dst.identity={ev.peer_id or '-'}")
    fields += [
        f"bytes_sent={ev.bytes_sent}",
        f"bytes_recv={ev.bytes_received}",
        f"duration={ev.duration_ns / 1e6:.1f}ms",
    ]
    if policy_name:
        fields.append(f"policy={policy_name}")
    if ev.target is not None and ev.mode in (4, 5):
        fields.append(f"target={_addr(ev.target)}")
    if ev.http_status:
        fields.append(f"status={ev.http_status}")
    if ev.trace:
        fields.append(f"trace={ev.trace}")
    if not ev.ok:
        err = ev.reason + (f": {ev.detail}" if ev.detail else "")
        fields.append(f'error="{err}"')
    return "connection complete " + " ".join(fields)
