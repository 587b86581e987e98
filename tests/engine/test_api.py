"""The Tunnel API around the engine: lifecycle (with / async with / close), events through
the thread pump and through asyncio, stats, forward handles, the unclosed-Tunnel warning."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness.fds import assert_fds_return, fd_targets

from ztun import Tunnel, TunnelStats
from ztun._core import _engine
from ztun.errors import ZtunError

from .helpers import Events, read_outcome, wait_closed, wait_until

pytestmark = pytest.mark.timeout(60)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _echo_once(addr: tuple[str, int], data: bytes = b"ping") -> bytes:
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while b := s.recv(65536):
            out += b
        return out


# ------------------------------------------------------------------ lifecycle
def test_with_starts_and_stops_releasing_threads_and_fds(echo_server):
    fds, threads = fd_targets(), _threads()
    t = Tunnel(workers=2)
    assert not t.started
    with t as same:
        assert same is t and t.started
        assert t.workers == 2
        assert _threads() >= threads + 2  # the workers (and the event pump, once needed)
        fwd = t.forward(listen=("127.0.0.1", 0), to=echo_server.address)
        assert _echo_once(fwd.address) == b"ping"
    assert not t.started
    assert "closed" in repr(t)
    with pytest.raises(ZtunError):
        t.stats()
    echo_server.wait_idle(5)
    assert_fds_return(fds, timeout=5)
    assert wait_until(lambda: _threads() <= threads, 5), "engine or pump threads left running"


def test_close_is_idempotent_and_safe_before_start():
    Tunnel().close()  # never started
    t = Tunnel(workers=1).start()
    t.close()
    t.close()
    t.close(drain=1.0)
    with Tunnel(workers=1) as t2:
        t2.close()  # closed inside the block; __exit__ closes again
    assert not t2.started


def test_start_is_idempotent(tunnel):
    assert tunnel.start() is tunnel
    assert tunnel.workers == 2


async def test_async_with_starts_stops_and_delivers_events_on_the_loop(echo_server):
    fds = fd_targets()
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []
    got_close = asyncio.Event()

    def on_event(ev) -> None:
        seen.append((ev.kind, threading.get_ident()))
        if ev.kind == "close":
            got_close.set()

    async with Tunnel(workers=2) as t:
        assert t.started
        t.subscribe(on_event)
        fwd = t.forward(listen=("127.0.0.1", 0), to=echo_server.address)
        r, w = await asyncio.open_connection(*fwd.address)
        w.write(b"hello")
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b"hello"
        w.close()
        await w.wait_closed()
        await asyncio.wait_for(got_close.wait(), 5)
        assert t.stats().connections_closed == 1
    assert not t.started
    assert [k for k, _ in seen] == ["open", "close"]
    assert {tid for _, tid in seen} == {loop_thread}, "events ran off the event loop's thread"
    echo_server.wait_idle(5)
    assert_fds_return(fds, timeout=5)


def test_thread_pump_delivers_events_with_their_facts(tunnel, make_server):
    srv = make_server("sink")
    events = Events()
    unsubscribe = tunnel.subscribe(events)
    fwd = tunnel.forward(listen=("127.0.0.1", 0), to=srv.address)
    data = os.urandom(100_000)
    with socket.create_connection(fwd.address, timeout=5) as c:
        src = c.getsockname()
        n, _sha = srv.send_and_verify(c, data)
        assert n == len(data)
        while c.recv(1 << 16):
            pass
    closes = events.wait_closes(1)
    assert events.threads == {"ztun-events"}
    kinds = [e.kind for e in events.items]
    assert kinds == ["open", "close"]
    opened, [closed] = events.items[0], closes
    assert opened.conn_id == closed.conn_id
    for e in (opened, closed):
        assert e.listener_id == fwd.id
        assert e.src == src
        assert e.dst == srv.address
        assert e.direction == "forward"
        assert e.peer_id is None
    assert closed.ok and closed.reason == "ok"
    assert closed.bytes_sent == len(data)
    assert closed.bytes_received == srv.REPLY.size
    assert closed.duration_ns > 0
    assert abs(closed.start_ns / 1e9 - time.time()) < 60
    # unsubscribe: no more deliveries to this callback
    unsubscribe()
    socket.create_connection(fwd.address, 5).close()
    wait_closed(tunnel, 2)
    time.sleep(0.2)
    assert len(events.closes()) == 1


def test_a_failing_subscriber_is_logged_and_others_still_served(tunnel, echo_server, caplog):
    caplog.set_level(logging.INFO, logger="ztun")
    events = Events()

    def broken(ev) -> None:
        raise RuntimeError("subscriber bug")

    tunnel.subscribe(broken)
    tunnel.subscribe(events)
    fwd = tunnel.forward(listen=("127.0.0.1", 0), to=echo_server.address)
    assert _echo_once(fwd.address) == b"ping"
    assert len(events.wait_closes(1)) == 1
    assert wait_until(
        lambda: any("subscriber" in r.getMessage() and r.exc_info for r in caplog.records), 5
    )


def test_access_log_line_per_connection(tunnel, echo_server, caplog):
    caplog.set_level(logging.INFO, logger="ztun.access")
    fwd = tunnel.forward(listen=("127.0.0.1", 0), to=echo_server.address)
    assert _echo_once(fwd.address, b"x" * 123) == b"x" * 123
    line = wait_until(
        lambda: [r.getMessage() for r in caplog.records if r.name == "ztun.access"], 5
    )
    assert line and len(line) == 1
    assert "bytes_sent=123" in line[0] and "bytes_recv=123" in line[0]
    assert f"dst.addr={echo_server.address[0]}:{echo_server.address[1]}" in line[0]
    assert "error=" not in line[0]


def test_access_log_can_be_turned_off(make_tunnel, echo_server, caplog):
    caplog.set_level(logging.INFO, logger="ztun.access")
    t = make_tunnel(access_log=False)
    events = Events()
    t.subscribe(events)
    fwd = t.forward(listen=("127.0.0.1", 0), to=echo_server.address)
    _echo_once(fwd.address)
    events.wait_closes(1)
    assert not [r for r in caplog.records if r.name == "ztun.access"]


def test_unclosed_tunnel_warns_resource_warning():
    threads = _threads()

    def leak() -> None:
        Tunnel(workers=1).start()

    with pytest.warns(ResourceWarning, match="unclosed"):
        leak()
        gc.collect()
    assert wait_until(lambda: _threads() <= threads, 5), "the collected tunnel was not stopped"


def test_unclosed_tunnel_with_forward_is_collected_and_warns(echo_server):
    threads = _threads()

    def leak() -> None:
        t = Tunnel(workers=1).start()
        t.forward(listen=("127.0.0.1", 0), to=echo_server.address)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        leak()
        for _ in range(3):
            gc.collect()
    assert any(issubclass(x.category, ResourceWarning) for x in w)
    assert wait_until(lambda: _threads() <= threads, 5), "the leaked tunnel's threads still run"


# ------------------------------------------------------------------ forwards
def test_forward_handle_and_close_stop_accepting_keep_live(tunnel, echo_server):
    fwd = tunnel.forward(listen=("127.0.0.1", 0), to=echo_server.address)
    assert fwd.address[0] == "127.0.0.1" and fwd.address[1] > 0
    assert fwd.to == echo_server.address and not fwd.secure
    assert str(fwd.address[1]) in repr(fwd)
    live = socket.create_connection(fwd.address, timeout=5)
    live.sendall(b"a")
    assert live.recv(1) == b"a"
    fwd.close()
    fwd.close()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(fwd.address, timeout=5)
    live.sendall(b"b")
    assert live.recv(1) == b"b", "closing the forward cut a live connection"
    live.close()
    # the port can be forwarded again
    again = tunnel.forward(listen=fwd.address, to=echo_server.address)
    assert _echo_once(again.address) == b"ping"


def test_several_forwards_and_tunnels_side_by_side(make_tunnel, echo_server, make_server):
    sink = make_server("sink")
    t1, t2 = make_tunnel(workers=1), make_tunnel(workers=2)
    f1 = t1.forward(listen=("127.0.0.1", 0), to=echo_server.address)
    f2 = t1.forward(listen=("127.0.0.1", 0), to=sink.address)
    f3 = t2.forward(listen=("127.0.0.1", 0), to=echo_server.address)
    assert len({f1.id, f2.id}) == 2
    assert _echo_once(f1.address) == b"ping"
    assert _echo_once(f3.address, b"pong") == b"pong"
    with socket.create_connection(f2.address, timeout=5) as c:
        assert sink.send_and_verify(c, b"z" * 10)[0] == 10
    assert wait_closed(t1, 2).connections_closed == 2
    assert wait_closed(t2, 1).connections_closed == 1


def test_close_without_drain_resets_live_connections(echo_server):
    t = Tunnel(workers=1).start()
    events = Events()
    t.subscribe(events)
    fwd = t.forward(listen=("127.0.0.1", 0), to=echo_server.address)
    c = socket.create_connection(fwd.address, timeout=5)
    c.sendall(b"a")
    assert c.recv(1) == b"a"
    t.close()
    outcome, _ = read_outcome(c, 5)
    assert outcome in ("reset", "eof"), outcome
    c.close()
    assert [e.reason for e in events.closes()] == ["shutdown"]


def test_close_with_drain_lets_live_connections_finish(echo_server):
    t = Tunnel(workers=1).start()
    fwd = t.forward(listen=("127.0.0.1", 0), to=echo_server.address)
    c = socket.create_connection(fwd.address, timeout=5)
    c.sendall(b"a")
    assert c.recv(1) == b"a"
    closer = threading.Thread(target=t.close, kwargs={"drain": 3.0})
    t0 = time.monotonic()
    closer.start()
    time.sleep(0.3)
    c.sendall(b"bcd")  # still relayed while draining
    assert c.recv(3, socket.MSG_WAITALL) == b"bcd"
    c.shutdown(socket.SHUT_WR)
    assert c.recv(1) == b""
    c.close()
    closer.join(10)
    assert not closer.is_alive()
    assert time.monotonic() - t0 < 2.5, (
        "close() waited for the whole drain after the last connection ended"
    )


# ------------------------------------------------------------------ stats
def test_stats_fields_and_exact_counters(tunnel):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    st0 = tunnel.stats()
    assert isinstance(st0, TunnelStats)
    names = {f.name for f in dataclasses.fields(TunnelStats)}
    assert {
        "bytes_sent",
        "bytes_received",
        "connections_opened",
        "connections_closed",
        "connections_active",
        "connections_failed",
        "close_reasons",
        "buffers_in_use",
        "buffer_bytes",
        "events_dropped",
    } <= names
    assert set(st0.close_reasons) == set(_engine.CLOSE_REASONS)
    assert all(v == 0 for v in st0.close_reasons.values())
    assert st0.failures == {}
    fwd = tunnel.forward(listen=("127.0.0.1", 0), to=ls.getsockname())
    c = socket.create_connection(fwd.address, timeout=5)
    ls.settimeout(5)
    s, _ = ls.accept()
    assert wait_until(lambda: tunnel.stats().connections_active == 1, 5)
    st = tunnel.stats()
    assert (st.connections_opened, st.connections_closed) == (1, 0)
    c.sendall(b"u" * 1000)
    assert s.recv(1000, socket.MSG_WAITALL) == b"u" * 1000
    s.sendall(b"d" * 2345)
    assert c.recv(2345, socket.MSG_WAITALL) == b"d" * 2345
    c.close()
    assert s.recv(1) == b""
    s.close()
    st = wait_closed(tunnel, 1)
    assert st.bytes_sent == 1000
    assert st.bytes_received == 2345
    assert (st.connections_opened, st.connections_closed, st.connections_active) == (1, 1, 0)
    assert st.connections_failed == 0
    assert st.close_reasons["ok"] == 1
    assert st.handshakes == st.handshakes_resumed == 0
    assert st.events_dropped == 0
    assert st.buffers_in_use == 0
    ls.close()


def test_a_stuck_subscriber_never_slows_the_relay(tunnel, echo_server):
    """The engine never waits for Python: with the event pump stuck in a subscriber for
    seconds, connections keep being relayed; events that did not fit the ring are counted."""
    release = threading.Event()
    got: list[str] = []

    def stuck(ev) -> None:
        got.append(ev.kind)
        if len(got) == 1:
            release.wait(30)

    tunnel.subscribe(stuck)
    fwd = tunnel.forward(listen=("127.0.0.1", 0), to=echo_server.address)
    n = 3000
    with ThreadPoolExecutor(16) as ex:
        assert all(r == b"ping" for r in ex.map(lambda _: _echo_once(fwd.address), range(n)))
    assert len(got) == 1, "the subscriber should still be stuck on its first event"
    st = wait_closed(tunnel, n)
    assert st.connections_closed == n and st.failures == {}
    release.set()
    # every event was either delivered or counted as dropped
    assert wait_until(lambda: len(got) + tunnel.stats().events_dropped >= 2 * n, 10)
    assert len(got) + tunnel.stats().events_dropped == 2 * n
