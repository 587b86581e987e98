"""TrafficMetrics folds connection records into ztunnel's istio_tcp_* families; the
exposition is read back with prometheus_client's parser."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from ztun.metrics import (
    ConnectionRecord,
    EngineSample,
    MeshCollector,
    TrafficLabels,
    TrafficMetrics,
    response_flags,
)

OUT = TrafficLabels(
    reporter="source",
    source_workload="client",
    source_workload_namespace="demo",
    source_principal="spiffe://cluster.local/ns/demo/sa/client",
    destination_workload="api",
    destination_workload_namespace="demo",
    destination_principal="spiffe://cluster.local/ns/demo/sa/api",
    connection_security_policy="mutual_tls",
)


def scrape(traffic: TrafficMetrics, engines: list[EngineSample] | None = None) -> dict:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MeshCollector(traffic, lambda: engines or []))
    out: dict = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(out: dict, name: str, labels: TrafficLabels) -> float | None:
    key = tuple(sorted(zip(labels.__dataclass_fields__, labels.values(), strict=True)))
    return out.get((name, key))


def test_open_close_bytes_and_failures() -> None:
    t = TrafficMetrics()
    t.record(ConnectionRecord(("e", 1), "open", OUT))
    t.record(ConnectionRecord(("e", 2), "open", OUT))
    t.record(ConnectionRecord(("e", 1), "close", OUT, "ok", 200, 1000, 2000))
    # never established: denied by the peer's policy (HBONE 401), counted opened and closed
    t.record(ConnectionRecord(("e", 3), "close", OUT, "upstream_status", 401, 0, 0))
    # established, then the engine stopped before it finished
    t.record(ConnectionRecord(("e", 2), "close", OUT, "shutdown", 200, 10, 0))
    out = scrape(t)
    deny = OUT.with_flags("DENY")
    assert get(out, "istio_tcp_connections_opened_total", OUT) == 3
    assert get(out, "istio_tcp_connections_closed_total", OUT) == 2
    assert get(out, "istio_tcp_connections_closed_total", deny) == 1
    assert get(out, "istio_tcp_connections_failed_total", OUT) == 1  # the shutdown
    assert get(out, "istio_tcp_connections_failed_total", deny) == 1
    # bytes stay under the opening labels (flags "-"), as ztunnel keeps them
    assert get(out, "istio_tcp_received_bytes_total", OUT) == 1010
    assert get(out, "istio_tcp_sent_bytes_total", OUT) == 2000
    assert get(out, "istio_tcp_received_bytes_total", deny) is None
    assert t.live == 0


def test_live_bytes_are_added_at_scrape_time() -> None:
    t = TrafficMetrics()
    t.record(ConnectionRecord(("e", 7), "open", OUT))
    assert t.snapshot({("e", 7): (5, 6)})[OUT].received == 5
    assert t.snapshot()[OUT].received == 0
    t.forget_engine("e")
    assert t.live == 0


def test_response_flags() -> None:
    assert response_flags("ok") == "-"
    assert response_flags("policy_denied") == "DENY"
    assert response_flags("upstream_status", 401) == "DENY"
    assert response_flags("upstream_status", 503) == "CONNECT"
    assert response_flags("connect_refused") == "CONNECT"
    assert response_flags("reset_by_upstream") == "-"


def test_engine_families() -> None:
    stats = SimpleNamespace(
        bytes_sent=11, bytes_received=22, connections_opened=3, connections_active=1,
        close_reasons={"ok": 2, "tls_error": 0}, handshakes=4, handshakes_resumed=1,
        policy_allowed=2, policy_denied=1, events_dropped=0,
    )  # fmt: skip
    out = scrape(TrafficMetrics(), [EngineSample("demo/client", stats)])
    w = (("workload", "demo/client"),)
    assert out[("ztun_engine_received_bytes_total", w)] == 11
    assert out[("ztun_engine_sent_bytes_total", w)] == 22
    assert out[("ztun_engine_connections_active", w)] == 1
    assert out[("ztun_engine_connections_closed_total", (("reason", "ok"), *w))] == 2
    assert ("ztun_engine_connections_closed_total", (("reason", "tls_error"), *w)) not in out
    assert out[("ztun_engine_handshakes_total", (("resumed", "true"), *w))] == 1
