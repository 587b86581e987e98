"""What the apps see at the edges of a stream, through the real engine with the accelerator.

FIN is never redirected: the engine forwards it after the bytes it relayed, and a paired
connection's redirected bytes are already queued at the receiver when the sender's
shutdown() returns, so FIN never overtakes a byte. RST, a close with data still queued, a
policy change and ztun dying mid-transfer end as TCP would: every byte, or an error, never
the clean end of a truncated stream. And a denied pair is gone from the kernel."""

from __future__ import annotations

import hashlib
import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from bpf_apps import recv_all
from bpf_util import KERNEL_FLAKY, stream_until_error
from engine_rig import (
    DENY_CLIENT,
    DENY_LOOPBACK,
    PAIRED,
    ROUTES,
    Maps,
    Route,
    check_cgroup,
    route,
    socks5_connect,
)

HERE = Path(__file__).parent
pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf, pytest.mark.timeout(60)]


class Rig:
    """A route to a server socket the test accepts from: connect() gives both app ends."""

    def __init__(self, r: Route, server: socket.socket) -> None:
        self.r = r
        self.server = server
        self._lock = threading.Lock()  # connect + accept as one step: threads share server

    def connect(self) -> tuple[socket.socket, socket.socket]:
        with self._lock:
            a = self.r.connect()
            self.server.settimeout(30)
            b, _ = self.server.accept()
        a.settimeout(30)
        b.settimeout(30)
        # One round trip, then a pause: the pair exists, its relay path is empty and the
        # engine's busy flags are down, so the next bytes can go direct.
        a.sendall(b"?")
        assert b.recv(1) == b"?"
        b.sendall(b"!")
        assert a.recv(1) == b"!"
        time.sleep(0.01)
        return a, b


@contextmanager
def rig(name: str, cg: Path, *, policy: bool = False) -> Iterator[Rig]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    try:
        with route(name, server.getsockname(), cg, policy=policy) as r:
            yield Rig(r, server)
    finally:
        server.close()


def _one_way_then_fin(r: Rig, seed: int) -> tuple[bool, str]:
    """One side sends n bytes and shuts down at once; the other must read exactly them,
    then EOF; then the reverse direction, on the same (half-closed) connection."""
    rng = random.Random(seed)
    a, b = r.connect()
    with a, b:
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        for src, dst in ((first, second), (second, first)):
            data = rng.randbytes(int(2 ** rng.uniform(0, 20)))
            t = threading.Thread(
                target=lambda s=src, d=data: (s.sendall(d), s.shutdown(socket.SHUT_WR))
            )
            t.start()
            sha, n = recv_all(dst)
            t.join()
            if n != len(data) or sha != hashlib.sha256(data).hexdigest():
                return False, f"seed {seed}: {n} of {len(data)} bytes before EOF"
    return True, ""


@pytest.mark.parametrize("name", ROUTES)
def test_fin_never_overtakes_redirected_bytes(name: str, joined_cgroup: Path) -> None:
    n = 100
    with rig(name, joined_cgroup) as r:
        with ThreadPoolExecutor(max_workers=8) as ex:
            results = list(ex.map(lambda i: _one_way_then_fin(r, i), range(n)))
        r.r.wait_idle()
        s = r.r.entry.stats()
    bad = [why for ok, why in results if not ok]
    assert not bad, bad[:5]
    assert s.close_reasons["ok"] == n, s.close_reasons
    total = s.bytes_sent + s.bytes_received
    if name in PAIRED:
        # The point is FIN right behind redirected bytes: most bytes must be redirected.
        assert s.bpf_pairs == n and s.bpf_direct_bytes > 0.9 * total, s


@pytest.mark.parametrize("who", ["client", "server"])
@pytest.mark.parametrize("name", ROUTES)
def test_rst_reaches_the_other_app(name: str, who: str, joined_cgroup: Path) -> None:
    with rig(name, joined_cgroup) as r:
        a, b = r.connect()
        resetter, other = (a, b) if who == "client" else (b, a)
        resetter.sendall(b"x" * 100_000)
        assert recv_all(other, 100_000)[1] == 100_000
        resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resetter.close()
        with pytest.raises(ConnectionResetError):
            recv_all(other)  # an EOF here would be a silent end
        other.close()
        r.r.wait_idle()
        s = r.r.entry.stats()
    assert s.close_reasons["reset_by_downstream" if who == "client" else "reset_by_upstream"] == 1
    if name in PAIRED:
        assert s.bpf_direct_bytes >= 100_000, s


@pytest.mark.parametrize("name", ROUTES)
def test_close_with_data_queued_delivers_everything(name: str, joined_cgroup: Path) -> None:
    """A writes more than the ingress cap (tcp_rmem[2], 32 MiB here) and closes while most
    of it is queued (redirected into B, in ztun's buffers and TCP queues); B reads later."""
    with open("/proc/sys/net/ipv4/tcp_rmem") as f:
        cap = int(f.read().split()[2])
    data = random.Random(1).randbytes(cap + (24 << 20))
    with rig(name, joined_cgroup) as r:
        a, b = r.connect()
        w = threading.Thread(target=lambda: (a.sendall(data), a.close()))
        with b:
            w.start()
            time.sleep(0.5)  # b does not read yet
            sha, n = recv_all(b)
            w.join()
        r.r.wait_idle()
        s = r.r.entry.stats()
    assert n == len(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert s.bytes_sent == len(data) + 1 and s.close_reasons["ok"] == 1, s
    if name in PAIRED:
        # Both paths carried part of it: direct up to the cap, then the relay.
        assert 0 < s.bpf_direct_bytes < s.bytes_sent, s


@KERNEL_FLAKY
@pytest.mark.parametrize("name", PAIRED)
def test_policy_change_resets_a_paired_connection(name: str, joined_cgroup: Path) -> None:
    """set_policy() denying a live paired connection: the engine ends the pair, then resets
    both apps (never a clean EOF), and the kernel holds nothing of the pair any more."""
    deny = DENY_LOOPBACK if name == "forward" else DENY_CLIENT
    maps = Maps()
    with rig(name, joined_cgroup, policy=True) as r:
        a, b = r.connect()
        t = r.r.entry
        assert t.stats().bpf_pairs == 1 and maps.routes() == 2  # one route per direction
        with a, b:
            ea, eb, n, intact = stream_until_error(a, b, 0.5, lambda: t.set_policy(deny))
        r.r.wait_idle()
        s = t.stats()
        routes_left = maps.routes()
    assert n > 0 and intact, (n, intact)
    assert ea in ("ConnectionResetError", "BrokenPipeError"), ea
    assert eb == "ConnectionResetError", eb
    assert s.close_reasons["policy_changed"] == 1, s.close_reasons
    # The pair ended before the close (its kernel byte count joined the counters).
    assert s.bpf_direct_bytes > 0 and routes_left == 0, (s, routes_left)
    assert n <= s.bytes_sent  # b got no byte the tunnel did not count


CHILD = textwrap.dedent(
    """
    import socket, sys, time
    sys.path.insert(0, sys.argv[3])
    from engine_rig import route
    from ztun import bpf
    name, port = sys.argv[1], int(sys.argv[2])
    with route(name, ("127.0.0.1", port), bpf.own_cgroup()) as r:
        print("READY", name, r.address[1], flush=True)
        time.sleep(600)
    """
)


@pytest.mark.parametrize("name", ROUTES)
def test_ztun_killed_mid_transfer_is_an_error(name: str, joined_cgroup: Path) -> None:
    """The Tunnel in a child process (same cgroup), SIGKILLed while bytes flow: both apps
    get an error (the engine's plaintext sockets linger 0, so the kernel resets them),
    never a clean EOF, and what arrived is an intact prefix."""
    check_cgroup(joined_cgroup)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, name, str(server.getsockname()[1]), str(HERE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line[:1] == ["READY"], line
        port = int(line[2])
        if name == "socks5":
            a = socks5_connect(("127.0.0.1", port), server.getsockname())
        else:
            a = socket.create_connection(("127.0.0.1", port), timeout=30)
        server.settimeout(30)
        b, _ = server.accept()
        with a, b:
            a.sendall(b"?")
            assert recv_all(b, 1)[1] == 1
            ea, eb, n, intact = stream_until_error(
                a, b, 0.5, lambda: child.send_signal(signal.SIGKILL)
            )
    finally:
        child.kill()
        child.wait(10)
        server.close()
    assert n > 0 and intact, (n, intact)
    assert ea in ("ConnectionResetError", "BrokenPipeError"), ea
    assert eb == "ConnectionResetError", eb
