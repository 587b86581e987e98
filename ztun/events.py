"""Events the engine reports: connections opened and closed, and its own log lines.

The engine's worker threads write fixed-layout records into a bounded ring; this
module turns a drained batch into typed objects and routes them: connection records
to the ``ztun.access`` logger (one line per finished connection, with ztunnel's
access-log fields) and to subscribers, engine log lines to ``ztun.engine``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ConnectionEvent", "EngineLog", "access_log_line", "parse_event"]

access_logger = logging.getLogger("ztun.access")
engine_logger = logging.getLogger("ztun.engine")

_MODES = {1: "forward", 2: "outbound", 3: "inbound", 4: "inbound", 5: "outbound", 6: "outbound"}
_MODE_PROTO = {1: "TCP", 2: "TLS", 3: "TLS", 4: "HBONE", 5: "HBONE", 6: "SOCKS5"}
# enum ztun_policy_reason (src/include/ztun/policy.h); values of ztun.policy.Reason names
_POLICY_REASONS = {
    1: "denied_by_policy",
    2: "allowed_by_policy",
    3: "allowed_no_allow_policy",
    4: "denied_no_match",
}
_EVPOL_DRY_RUN = 1  # ZTUN_EVPOL_* (engine.h)
_EVPOL_DRY_RUN_DENY = 2
_EVPOL_RECHECKED = 4

#: ``names(generation, index)`` -> "namespace/name" of a policy of that table, or None.
PolicyNamer = Callable[[int, int], "str | None"]


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
    policy: int  # index in the table of generation policy_generation; -1: a default
    policy_rule: int
    http_status: int
    errno: int
    detail: str | None
    worker: int
    policy_generation: int = 0  # 0: no policy table decided this connection
    policy_name: str | None = None  # "namespace/name" of the deciding policy
    policy_reason: str | None = None  # a ztun.policy.Reason name, lower case; None: not judged
    dry_run_policy: str | None = None  # the dry-run policy that would have decided
    dry_run_allowed: bool | None = None  # the verdict with dry-run policies enforced too
    policy_rechecked: bool = False  # the verdict is from a re-check after a policy swap
    target: tuple[str, int] | None = None  # HBONE: the CONNECT authority
    trace: str | None = None  # HBONE: traceparent
    baggage: str | None = None  # HBONE: baggage received
    request_id: int = 0  # adopted connections (Tunnel.connect)
    fd: int | None = None  # "accept": the delivered socket
    tls_reason: str | None = None  # why a TLS handshake was refused ("expired", ...)

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


def parse_event(
    raw: dict[str, Any], names: PolicyNamer | None = None
) -> ConnectionEvent | EngineLog | None:
    """A drained record as a typed event; ``names`` resolves policy indices to names."""
    kind = raw.get("type")
    if kind in ("open", "close", "connect_done", "accept"):
        gen = raw.get("policy_gen", 0)
        flags = raw.get("policy_flags", 0)
        policy_name = dry_name = None
        if gen and names is not None:
            if raw["policy"] >= 0:
                policy_name = names(gen, raw["policy"])
            if raw.get("dry_run_policy", -1) >= 0:
                dry_name = names(gen, raw["dry_run_policy"])
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
            policy_generation=gen,
            policy_name=policy_name,
            policy_reason=_POLICY_REASONS.get(raw.get("policy_reason", 0)),
            dry_run_policy=dry_name,
            dry_run_allowed=(not flags & _EVPOL_DRY_RUN_DENY) if flags & _EVPOL_DRY_RUN else None,
            policy_rechecked=bool(flags & _EVPOL_RECHECKED),
            target=raw.get("target"),
            trace=raw.get("trace"),
            baggage=raw.get("baggage"),
            request_id=raw.get("request_id", 0),
            fd=raw.get("fd") if kind == "accept" else None,
            tls_reason=raw.get("tls_reason"),
        )
    if kind == "log":
        return EngineLog(level=raw["level"], message=raw["message"], worker=raw["worker"])
    return None


def _allowed(ev: ConnectionEvent) -> bool:
    return ev.policy_reason is None or ev.policy_reason.startswith("allowed")


def _addr(a: tuple[str, int] | None) -> str:
    if a is None:
        return "-"
    host, port = a
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def access_log_line(ev: ConnectionEvent, policy_name: str | None = None) -> str:
    """One line in the spirit of ztunnel's access log (key=value pairs).

    ``policy=`` names the policy that decided (``policy_name`` or the event's own);
    ``dry_run=`` says what enforcing the dry-run policies would have changed.
    """
    policy_name = policy_name or ev.policy_name
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
    if ev.dry_run_allowed is not None and ev.dry_run_allowed != _allowed(ev):
        would = "allow" if ev.dry_run_allowed else "deny"
        fields.append(f"dry_run={would}" + (f":{ev.dry_run_policy}" if ev.dry_run_policy else ""))
    if ev.target is not None and ev.mode in (4, 5):
        fields.append(f"target={_addr(ev.target)}")
    if ev.http_status:
        fields.append(f"status={ev.http_status}")
    if ev.trace:
        fields.append(f"trace={ev.trace}")
    if ev.tls_reason:
        fields.append(f"tls_reason={ev.tls_reason}")
    if not ev.ok:
        err = ev.reason + (f": {ev.detail}" if ev.detail else "")
        fields.append(f'error="{err}"')
    return "connection complete " + " ".join(fields)
