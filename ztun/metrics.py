"""Prometheus metrics with ztunnel's names and labels, computed at scrape time.

ztunnel exports ``istio_tcp_connections_opened_total``, ``..._closed_total``,
``istio_tcp_received_bytes_total`` and ``istio_tcp_sent_bytes_total`` labelled with
who talked to whom (``reporter``, ``source_workload``, ``source_principal``,
``destination_workload``, ...). ztun adds ``istio_tcp_connections_failed_total`` with the
same labels.

Where the numbers come from. The C engine counts bytes per connection in its worker
threads and reports each connection twice through its event ring: when it is
established (``open``) and when it is finished (``close``, with its final byte counts
and reason). No Python runs per byte or per accepted connection; :class:`TrafficMetrics`
folds the batched events into per-label-set totals:

* ``opened`` +1 at ``open`` (or at ``close`` for a connection refused before it was
  established: denied by policy, upstream unreachable), with ``response_flags="-"``;
* ``closed`` +1 and, for failure reasons, ``failed`` +1 at ``close``, with the final
  ``response_flags`` (``DENY`` for a policy denial, ``CONNECT`` for an upstream that
  could not be reached, ``-`` otherwise);
* ``received_bytes`` += bytes client -> server ("bytes received during request") and
  ``sent_bytes`` += bytes server -> client ("bytes sent during response"), at ``close``,
  under the labels of ``open`` (ztunnel keeps a connection's byte counters under its
  opening labels too), for both reporters.

So for every finished connection the labelled byte totals equal, byte for byte, what
its client sent and received. Bytes of connections still open are added at scrape time
when the engine can list live connections with their counts (``live`` callback, see
docs/daemon.md); until then they appear when the connection closes. Events the ring
had to drop (``ztun_events_dropped_total``) are missing from the labelled totals but not
from the engine's own totals (``ztun_engine_*``), which are read from its atomic counters
at each scrape.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "FAILURE_REASONS",
    "ConnectionRecord",
    "EngineSample",
    "MeshCollector",
    "TrafficLabels",
    "TrafficMetrics",
    "response_flags",
]

UNKNOWN = "unknown"  # ztunnel's DefaultedUnknown
# Engine close reasons that are not failures; any other is counted in ..._failed_total.
OK_REASONS = frozenset({"ok", "reset_by_downstream", "reset_by_upstream"})
FAILURE_REASONS = frozenset(
    {
        "connect_refused",
        "connect_timeout",
        "connect_error",
        "idle_timeout",
        "handshake_timeout",
        "tls_error",
        "policy_denied",
        "policy_changed",
        "shutdown",
        "io_error",
        "protocol",
        "upstream_status",
        "no_memory",
    }
)
_DENY = frozenset({"policy_denied", "policy_changed"})
_CONNECT = frozenset(
    {
        "connect_refused",
        "connect_timeout",
        "connect_error",
        "handshake_timeout",
        "tls_error",
        "upstream_status",
    }
)
HTTP_UNAUTHORIZED = 401  # HBONE: the peer's policy denied the CONNECT


def response_flags(reason: str, http_status: int = 0) -> str:
    """ztunnel's response_flags: ``DENY`` (policy), ``CONNECT`` (upstream), ``-``."""
    if reason in _DENY or http_status == HTTP_UNAUTHORIZED:
        return "DENY"
    if reason in _CONNECT:
        return "CONNECT"
    return "-"


@dataclasses.dataclass(frozen=True, slots=True)
class TrafficLabels:
    """The label set of ztunnel's istio_tcp_* metrics that ztun fills."""

    reporter: str  # "source" (outbound side) or "destination" (inbound side)
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = UNKNOWN  # "mutual_tls" when mTLS carried it

    def values(self) -> list[str]:
        return [getattr(self, n) for n in LABEL_NAMES]

    def with_flags(self, flags: str) -> TrafficLabels:
        if flags == self.response_flags:
            return self
        return dataclasses.replace(self, response_flags=flags)


LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrafficLabels))


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """What the metrics need of one connection event (the daemon fills the labels)."""

    key: tuple[str, int]  # (engine name, connection id): unique among live connections
    kind: str  # "open" or "close"
    labels: TrafficLabels  # response_flags "-"; the close flags are derived from reason
    reason: str = "ok"
    http_status: int = 0
    bytes_request: int = 0  # client -> server (engine: bytes_down_up)
    bytes_response: int = 0  # server -> client (engine: bytes_up_down)


@dataclasses.dataclass
class _Totals:
    opened: int = 0
    closed: int = 0
    failed: int = 0
    received: int = 0
    sent: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class EngineSample:
    """One engine's counters at scrape time (``Tunnel.stats()`` of a workload)."""

    workload: str  # "namespace/name"
    stats: Any  # ztun.tunnel.TunnelStats


class TrafficMetrics:
    """Thread-safe aggregation of connection records into per-label-set totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[TrafficLabels, _Totals] = {}
        self._live: dict[tuple[str, int], TrafficLabels] = {}

    def _t(self, labels: TrafficLabels) -> _Totals:
        t = self._totals.get(labels)
        if t is None:
            t = self._totals[labels] = _Totals()
        return t

    def record(self, rec: ConnectionRecord) -> None:
        with self._lock:
            if rec.kind == "open":
                if rec.key not in self._live:
                    self._live[rec.key] = rec.labels
                    self._t(rec.labels).opened += 1
                return
            if rec.kind != "close":
                return
            opened = self._live.pop(rec.key, None)
            if opened is None:  # never established: count its opening now
                opened = rec.labels
                self._t(opened).opened += 1
            t = self._t(opened)
            t.received += rec.bytes_request
            t.sent += rec.bytes_response
            final = self._t(opened.with_flags(response_flags(rec.reason, rec.http_status)))
            final.closed += 1
            if rec.reason not in OK_REASONS:
                final.failed += 1

    def forget_engine(self, engine: str) -> None:
        """An engine stopped: its live connections will never report a close."""
        with self._lock:
            for key in [k for k in self._live if k[0] == engine]:
                del self._live[key]

    def snapshot(
        self, live_bytes: dict[tuple[str, int], tuple[int, int]] | None = None
    ) -> dict[TrafficLabels, _Totals]:
        """Totals per label set; ``live_bytes`` adds open connections' current counts."""
        with self._lock:
            out = {k: dataclasses.replace(v) for k, v in self._totals.items()}
            if live_bytes:
                for key, (req, resp) in live_bytes.items():
                    labels = self._live.get(key)
                    if labels is None:
                        continue
                    t = out.setdefault(labels, _Totals())
                    t.received += req
                    t.sent += resp
        return out

    @property
    def live(self) -> int:
        with self._lock:
            return len(self._live)


class MeshCollector(Collector):
    """A prometheus-client collector: ztunnel's istio_tcp_* families plus ztun_* ones.

    ``engines()`` returns the current engines' counters, ``live()`` (optional) the byte
    counts of open connections, ``extra()`` (optional) further metric families (the
    daemon's certificate and reload gauges). Everything is read when Prometheus scrapes.
    """

    def __init__(
        self,
        traffic: TrafficMetrics,
        engines: Callable[[], Sequence[EngineSample]],
        *,
        live: Callable[[], dict[tuple[str, int], tuple[int, int]]] | None = None,
        extra: Callable[[], Iterable[Metric]] | None = None,
    ) -> None:
        self.traffic = traffic
        self._engines = engines
        self._live = live
        self._extra = extra

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families depend on the traffic seen

    def collect(self) -> Iterator[Metric]:
        live = self._live() if self._live is not None else None
        snap = self.traffic.snapshot(live)
        fams = {
            "opened": CounterMetricFamily(
                "istio_tcp_connections_opened",
                "The total number of TCP connections opened",
                labels=LABEL_NAMES,
            ),
            "closed": CounterMetricFamily(
                "istio_tcp_connections_closed",
                "The total number of TCP connections closed",
                labels=LABEL_NAMES,
            ),
            "failed": CounterMetricFamily(
                "istio_tcp_connections_failed",
                "The total number of TCP connections that ended in a failure "
                "(denied, unreachable upstream, TLS error, reset by a drain, ...)",
                labels=LABEL_NAMES,
            ),
            "received": CounterMetricFamily(
                "istio_tcp_received_bytes",
                "The size of total bytes received during request in case of a TCP connection",
                labels=LABEL_NAMES,
            ),
            "sent": CounterMetricFamily(
                "istio_tcp_sent_bytes",
                "The size of total bytes sent during response in case of a TCP connection",
                labels=LABEL_NAMES,
            ),
        }
        for labels in sorted(snap, key=lambda lb: lb.values()):
            t = snap[labels]
            values = labels.values()
            if t.opened:
                fams["opened"].add_metric(values, t.opened)
            if t.closed:
                fams["closed"].add_metric(values, t.closed)
            if t.failed:
                fams["failed"].add_metric(values, t.failed)
            if labels.response_flags == "-" and (t.opened or t.received or t.sent):
                fams["received"].add_metric(values, t.received)
                fams["sent"].add_metric(values, t.sent)
        yield from fams.values()
        yield from self._engine_families()
        if self._extra is not None:
            yield from self._extra()

    def _engine_families(self) -> Iterator[Metric]:
        samples = list(self._engines())
        wl = ["workload"]
        req = CounterMetricFamily(
            "ztun_engine_received_bytes",
            "Bytes the engine read from clients and wrote upstream (all connections)",
            labels=wl,
        )
        resp = CounterMetricFamily(
            "ztun_engine_sent_bytes",
            "Bytes the engine read from upstreams and wrote to clients (all connections)",
            labels=wl,
        )
        opened = CounterMetricFamily(
            "ztun_engine_connections_opened", "Connections accepted or adopted", labels=wl
        )
        active = GaugeMetricFamily("ztun_engine_connections_active", "Open connections", labels=wl)
        closes = CounterMetricFamily(
            "ztun_engine_connections_closed",
            "Connections finished, by reason",
            labels=["workload", "reason"],
        )
        handshakes = CounterMetricFamily(
            "ztun_engine_handshakes", "Completed TLS handshakes", labels=["workload", "resumed"]
        )
        policy = CounterMetricFamily(
            "ztun_engine_policy_decisions",
            "Connections authorized by policy",
            labels=["workload", "decision"],
        )
        dropped = CounterMetricFamily(
            "ztun_events_dropped",
            "Connection events lost because the event ring was full "
            "(missing from the istio_tcp_* families)",
            labels=wl,
        )
        for s in samples:
            st = s.stats
            w = [s.workload]
            req.add_metric(w, st.bytes_sent)
            resp.add_metric(w, st.bytes_received)
            opened.add_metric(w, st.connections_opened)
            active.add_metric(w, st.connections_active)
            for reason, n in sorted(st.close_reasons.items()):
                if n:
                    closes.add_metric([s.workload, reason], n)
            handshakes.add_metric([s.workload, "false"], st.handshakes - st.handshakes_resumed)
            handshakes.add_metric([s.workload, "true"], st.handshakes_resumed)
            policy.add_metric([s.workload, "allow"], st.policy_allowed)
            policy.add_metric([s.workload, "deny"], st.policy_denied)
            dropped.add_metric(w, st.events_dropped)
        yield from (req, resp, opened, active, closes, handshakes, policy, dropped)
