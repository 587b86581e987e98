"""TrafficMetrics folds connection records into ztunnel's istio_tcp_* families; the
exposition is read back with prometheus_client's parser."""

from __future__ import annotations

import itertools
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
    # the engine stopped before the close event came: the bytes seen stay counted
    assert t.snapshot({})[OUT].received == 5


def test_live_bytes_never_double_counted_nor_going_down() -> None:
    t = TrafficMetrics()
    key = ("e", 1)
    scrapes = []

    def scrape_now(live: dict) -> tuple[int, int]:
        s = t.snapshot(live).get(OUT)
        got = (s.received, s.sent) if s else (0, 0)
        scrapes.append(got)
        return got

    # listed by the engine before its open event is folded: not counted yet
    assert scrape_now({key: (10, 1)}) == (0, 0)
    t.record(ConnectionRecord(key, "open", OUT))
    assert scrape_now({key: (100, 50)}) == (100, 50)
    # finished in the engine, close event still in the ring: the last counts stay
    assert scrape_now({}) == (100, 50)
    t.record(ConnectionRecord(key, "close", OUT, "ok", 200, 120, 60))
    # folded: the final counts, once, whether the engine still lists it or not
    assert scrape_now({key: (120, 60)}) == (120, 60)
    assert scrape_now({}) == (120, 60)
    # another connection under the same labels adds to the total
    t.record(ConnectionRecord(("e", 2), "open", OUT))
    assert scrape_now({("e", 2): (3, 4), key: (999, 999)}) == (123, 64)
    for a, b in itertools.pairwise(scrapes):
        assert b[0] >= a[0] and b[1] >= a[1]


def test_collector_exposes_live_bytes() -> None:
    t = TrafficMetrics()
    t.record(ConnectionRecord(("e", 1), "open", OUT))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MeshCollector(t, lambda: [], live=lambda: {("e", 1): (4096, 2048)}))
    out: dict = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    assert get(out, "istio_tcp_received_bytes_total", OUT) == 4096
    assert get(out, "istio_tcp_sent_bytes_total", OUT) == 2048
    assert get(out, "istio_tcp_connections_opened_total", OUT) == 1
    assert get(out, "istio_tcp_connections_closed_total", OUT) is None


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
