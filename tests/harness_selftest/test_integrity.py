"""The integrity checker passes clean paths and catches every kind of damage."""

from __future__ import annotations

import socket

import pytest
from harness.fixtures import ipv6_loopback_available
from harness.integrity import ConnSpec, make_specs, run_integrity
from harness.relay import Fault, PyRelay
from harness.servers import TransformServer

MiB = 1 << 20


def test_direct_both_orders(transform_server):
    s = run_integrity(transform_server.address, transform_server, n=60, max_size=8 * MiB, seed=1)
    s.assert_clean()
    assert s.ok == 60
    assert s.bytes_up > 0 and s.bytes_down > 0
    assert {r.spec.order for r in s.results} == {"client_fin", "server_fin"}
    assert transform_server.accepted == 60


def test_specs_cover_sizes_and_holds():
    specs = make_specs(400, max_size=64 * MiB, seed=3, rst_fraction=0.2)
    sizes = [sp.up_size for sp in specs] + [sp.down_size for sp in specs]
    assert min(sizes) == 0
    assert max(sizes) > 16 * MiB
    assert all(0 <= x <= 64 * MiB for x in sizes)
    assert any(sp.hold_up for sp in specs) and any(sp.hold_down for sp in specs)
    assert {sp.rst for sp in specs} == {"none", "client", "server"}
    assert specs == make_specs(400, max_size=64 * MiB, seed=3, rst_fraction=0.2)


def test_through_relay_with_resets(transform_server):
    with PyRelay(transform_server.address) as relay:
        s = run_integrity(
            relay.address, transform_server, n=80, max_size=4 * MiB, seed=2, rst_fraction=0.3
        )
    s.assert_clean()
    rst = [r for r in s.results if r.spec.rst != "none"]
    assert rst, "the spec mix must include resets"
    # the peer of each RST saw a reset (its reader or its writer, whichever came first: the
    # kernel reports the error once, after which recv() returns b"")
    for r in rst:
        other = r.server if r.spec.rst == "client" else r.client
        assert other is not None and other.error in ("reset", "broken_pipe")


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_ipv6(make_server):
    srv = make_server("transform", "::1")
    s = run_integrity(srv.address, srv, n=20, max_size=MiB, seed=4)
    s.assert_clean()


def _fixed_specs(server: TransformServer, n: int = 4) -> list[ConnSpec]:
    first = server.next_conn_ids(n)
    return [
        ConnSpec(first + i, seed=1000 + i, up_size=300_000, down_size=200_000, order=o)
        for i, o in enumerate(["client_fin", "server_fin"] * (n // 2))
    ]


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("kind", ["flip", "drop"])
def test_catches_one_damaged_byte(transform_server, kind, direction):
    # offset counts relay bytes: the 56-byte header precedes the client's stream
    fault = Fault(kind, direction, conn=2, offset=150_000)
    with PyRelay(transform_server.address, fault=fault) as relay:
        s = run_integrity(
            relay.address, transform_server, specs=_fixed_specs(transform_server), concurrency=1
        )
        assert relay.faults_applied == 1
    assert not s.clean
    assert s.failed == 1
    bad = s.failures[0]
    assert bad.spec.conn_id == s.results[1].spec.conn_id
    if kind == "flip":
        assert bad.kind == f"mismatch_{direction}"
        assert bad.mismatched_bytes == 1
    else:
        assert bad.kind in (f"mismatch_{direction}", f"short_{direction}")
        assert bad.mismatched_bytes >= 1
    with pytest.raises(AssertionError, match="1 failed"):
        s.assert_clean()


def test_catches_rst_turned_into_fin(transform_server):
    with PyRelay(transform_server.address, rst_as_fin=True) as relay:
        specs = make_specs(
            30, max_size=MiB, seed=5, rst_fraction=1.0, first_id=transform_server.next_conn_ids(30)
        )
        s = run_integrity(relay.address, transform_server, specs=specs)
    assert s.errors_by_kind.get("rst_not_propagated", 0) > 0


def test_catches_truncation(transform_server):
    """A relay that closes early (drops the tail) is reported."""
    with PyRelay(
        transform_server.address, fault=Fault("truncate", "down", conn=1, offset=1000)
    ) as r:
        s = run_integrity(r.address, transform_server, specs=_fixed_specs(transform_server, 2))
    assert s.failed >= 1
    assert s.failures[0].mismatched_bytes > 0


def test_deadline_counts_not_run(transform_server):
    s = run_integrity(
        transform_server.address,
        transform_server,
        n=500,
        max_size=8 * MiB,
        concurrency=1,
        deadline=0.5,
        seed=6,
    )
    assert s.not_run > 0
    assert not s.clean
    assert s.errors_by_kind["not_run"] == s.not_run


def test_connect_failure_is_reported(transform_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()
    s = run_integrity(closed, transform_server, n=3, max_size=100, seed=7)
    assert s.errors_by_kind == {"connect": 3}


@pytest.mark.slow
def test_1000_connections_up_to_64mib(transform_server):
    """The scale the engine's acceptance test uses, through the pure-Python relay."""
    with PyRelay(transform_server.address) as relay:
        s = run_integrity(
            relay.address,
            transform_server,
            n=1000,
            max_size=64 * MiB,
            concurrency=8,
            deadline=240,
            seed=8,
        )
    print(s)
    s.assert_clean()
