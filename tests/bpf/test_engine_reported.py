"""Engine behaviours with the accelerator that were reported wrong (docs/sockmap.md §7,
"Engine issues found") and are fixed: each test states what should happen. A new report
goes here as xfail(strict=True) until fixed, so the fix shows up as an XPASS failure."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from engine_rig import CLIENT_ID, SERVER_ID, check_cgroup, route

from ztun import Tunnel, bpf
from ztun.events import ConnectionEvent, access_log_line

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf, pytest.mark.timeout(60)]


def _sink_server() -> tuple[socket.socket, threading.Thread]:
    """Greets with 'R', then reads to EOF; one thread per connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def serve(c: socket.socket) -> None:
        with c:
            c.sendall(b"R")
            while True:
                try:
                    if not c.recv(1 << 20):
                        return
                except BlockingIOError:  # spurious EAGAIN of psock sockets
                    continue
                except OSError:
                    return

    def loop() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return srv, t


def _one_transfer(t: Tunnel, port: int) -> None:
    addr = t.forward(("127.0.0.1", 0), ("127.0.0.1", port)).address
    with socket.create_connection(addr, timeout=10) as a:
        assert a.recv(1) == b"R"
        a.sendall(os.urandom(4 << 20))
    end = time.monotonic() + 10
    while t.stats().connections_closed < 1 and time.monotonic() < end:
        time.sleep(0.02)


def _attachments(cg: Path) -> int:
    """ztun sock_ops programs attached to ``cg`` itself."""
    out = subprocess.run(
        ["bpftool", "cgroup", "show", str(cg)], capture_output=True, text=True, check=True
    ).stdout
    return sum(1 for line in out.splitlines() if "ztun_sockops" in line)


def test_two_accelerated_tunnels_in_one_cgroup_both_pair(joined_cgroup: Path) -> None:
    """Two Tunnels of one process share the process's accelerator on the cgroup (one set of
    programs, closed with the last Tunnel), so both pair; the first to close leaves the
    other working."""
    check_cgroup(joined_cgroup)
    srv, _ = _sink_server()
    port = srv.getsockname()[1]
    with srv, Tunnel(accelerate=True, access_log=False) as t1:
        with Tunnel(accelerate=True, access_log=False) as t2:
            assert _attachments(joined_cgroup) == 1
            _one_transfer(t1, port)
            _one_transfer(t2, port)
            pairs = (t1.stats().bpf_pairs, t2.stats().bpf_pairs)
        assert pairs == (1, 1), f"pairs per tunnel: {pairs}"
        # t2 closed: the shared accelerator stays for t1, which still pairs.
        assert _attachments(joined_cgroup) == 1
        _one_transfer(t1, port)
        assert t1.stats().bpf_pairs == 2
    assert _attachments(joined_cgroup) == 0


_CHILD = r"""
import sys, socket, os, time
from ztun import Tunnel
port = int(sys.argv[1])
with Tunnel(accelerate=True, access_log=False) as t:
    addr = t.forward(("127.0.0.1", 0), ("127.0.0.1", port)).address
    print("mark", t._accelerator.mark, flush=True)
    assert sys.stdin.readline() == "go\n"
    with socket.create_connection(addr, timeout=10) as a:
        assert a.recv(1) == b"R"
        a.sendall(os.urandom(4 << 20))
    end = time.monotonic() + 10
    while t.stats().connections_closed < 1 and time.monotonic() < end:
        time.sleep(0.02)
    print("pairs", t.stats().bpf_pairs, flush=True)
    sys.stdin.readline()  # stay attached until the parent's transfer is over
"""


def test_two_processes_in_one_cgroup_both_pair(joined_cgroup: Path) -> None:
    """Two processes cannot share an accelerator: each loads its own, and each takes a mark
    no other live accelerator holds, so neither sock_ops takes the other's sockets. The
    child attaches second and transfers first, then the parent transfers while the
    child's programs are still attached."""
    check_cgroup(joined_cgroup)
    srv, _ = _sink_server()
    port = srv.getsockname()[1]
    with srv, Tunnel(accelerate=True, access_log=False) as t1:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdin is not None and child.stdout is not None
            kind, mark = child.stdout.readline().split()
            assert kind == "mark"
            assert _attachments(joined_cgroup) == 2
            mine = t1._accelerator.mark
            assert int(mark) != mine and mine & 0xFFFF == int(mark) & 0xFFFF == bpf.DEFAULT_MARK
            child.stdin.write("go\n")
            child.stdin.flush()
            kind, child_pairs = child.stdout.readline().split()
            assert kind == "pairs"
            _one_transfer(t1, port)
            pairs = (t1.stats().bpf_pairs, int(child_pairs))
            child.stdin.close()
            assert child.wait(timeout=20) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert pairs == (1, 1), f"pairs (parent, child): {pairs}"


def test_local_route_events_name_the_destination_identity(joined_cgroup: Path) -> None:
    """Policy still judges the source's identity (the route's policy allows the client
    principal only), but the close event and the access log name the destination."""
    srv, _ = _sink_server()
    with srv, route("socks5", srv.getsockname(), joined_cgroup) as r:
        closed: list[ConnectionEvent] = []
        r.entry.subscribe(lambda ev: closed.append(ev) if ev.kind == "close" else None)
        with r.connect() as a:
            assert a.recv(1) == b"R"
            a.sendall(b"x" * 1000)
        r.wait_idle()
        end = time.monotonic() + 5
        while not closed and time.monotonic() < end:
            time.sleep(0.02)
    assert closed, "no close event"
    ev = closed[0]
    assert ev.ok and ev.peer_id == SERVER_ID, f"{ev.reason}, peer_id {ev.peer_id}"
    assert ev.local_id == CLIENT_ID, ev.local_id
    line = access_log_line(ev)
    assert f"src.identity={CLIENT_ID}" in line and f"dst.identity={SERVER_ID}" in line, line
    assert ev.policy_name == "prod/allow-client", ev.policy_name
