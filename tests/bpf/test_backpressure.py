"""A stalled receiver must stop the sender: bytes queued by sk_msg redirects are bounded.

The kernel charges redirected bytes to the receiver (sk_rmem_alloc, psock->msg_tot_len) but
never refuses them below the host-wide tcp_mem limit; the programs read the receiver's
queue and fall back to TCP above a cap, and TCP has backpressure. The control run with the
cap lifted shows what the kernel alone does."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time
from pathlib import Path

import pytest
from bpf_util import Procs, free_port

from ztun import bpf

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]

BLOCK = bytes(range(256)) * 256  # 64 KiB of a counting pattern
LIMIT = 256 << 20  # stop the control there: it is charged to the host-wide tcp_mem


def _default_cap() -> int:
    """The loader's default cap: net.ipv4.tcp_rmem[2]."""
    with open("/proc/sys/net/ipv4/tcp_rmem") as f:
        return int(f.read().split()[2])


def _inq(sock: socket.socket) -> int:
    """FIONREAD: on a psock socket, the redirected bytes not yet read (tcp_bpf_ioctl)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0])


def _fill(a: socket.socket, limit: int, seconds: float = 2.0) -> int:
    """Send without blocking until the kernel refuses (EAGAIN for 0.2 s) or limit."""
    a.setblocking(False)
    sent, stalled, end = 0, None, time.monotonic() + seconds
    two = memoryview(BLOCK * 2)  # partial sends: continue the pattern where it stopped
    while sent < limit and time.monotonic() < end:
        off = sent % len(BLOCK)
        try:
            sent += a.send(two[off : off + min(len(BLOCK), limit - sent)])
            stalled = None
        except BlockingIOError:
            stalled = stalled or time.monotonic()
            if time.monotonic() - stalled > 0.2:
                break
            time.sleep(0.01)
    a.setblocking(True)
    return sent


def _drain_check(b: socket.socket, n: int) -> None:
    got = bytearray()
    b.settimeout(10)
    while len(got) < n:
        try:
            d = b.recv(1 << 20)
        except BlockingIOError:
            continue
        assert d, f"EOF after {len(got)} of {n}"
        got.extend(d)
    whole, rest = divmod(n, len(BLOCK))
    assert bytes(got) == BLOCK * whole + BLOCK[:rest], "bytes reordered or corrupted"


def _app_pair(acc: bpf.SockmapAccelerator) -> tuple[socket.socket, socket.socket, socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    acc.add_listener(ls)  # a and b become the two ends of an accelerated hop
    a = socket.create_connection(ls.getsockname())
    b, _ = ls.accept()
    a.sendall(b"x")
    assert b.recv(1) == b"x"
    return ls, a, b


@pytest.mark.parametrize("cap", [0, 256 << 10])
def test_hop_slow_consumer_is_bounded(cap: int, joined_cgroup: Path) -> None:
    with bpf.SockmapAccelerator(joined_cgroup, ingress_cap=cap) as acc:
        ls, a, b = _app_pair(acc)
        with ls, a, b:
            sent = _fill(a, LIMIT)
            queued = _inq(b)
            st = acc.stats()
            _drain_check(b, sent)
    bound = cap or _default_cap()
    print(f"cap {bound}: sender stopped after {sent} bytes; {queued} redirected-unread")
    assert st["hop_redirect"] > 0 and st["hop_fallback_cap"] > 0
    # The receiver's redirected-unread bytes stay within the cap plus one message (a
    # sendmsg chunk: at most 17 scatterlist pages of up to 32 KiB, well under 1 MiB).
    assert queued <= bound + (1 << 20)
    # And the whole connection (cap + TCP: receive queue, send buffer) stays small.
    assert sent < bound + (24 << 20)


def test_control_without_cap_queues_everything(joined_cgroup: Path) -> None:
    """The kernel alone: with the cap lifted the sender is never stopped below LIMIT."""
    with bpf.SockmapAccelerator(joined_cgroup, ingress_cap=0xFFFFFFFF) as acc:
        ls, a, b = _app_pair(acc)
        with ls, a, b:
            t0 = time.monotonic()
            sent = _fill(a, LIMIT)
            secs = time.monotonic() - t0
            queued = _inq(b)
            _drain_check(b, sent)
    print(f"no cap: {sent} bytes accepted in {secs:.2f} s; {queued} redirected-unread")
    assert sent == LIMIT
    assert queued >= LIMIT - (1 << 20)


def test_pair_slow_consumer_is_bounded(ztrelay: Path, procs: Procs, joined_cgroup: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = free_port()
    relay = procs.start(
        ztrelay,
        "relay",
        f"127.0.0.1:{port}",
        f"127.0.0.1:{server.getsockname()[1]}",
        "--bpf",
        str(joined_cgroup),
        "--pairs",
    )
    with server:
        a = socket.create_connection(("127.0.0.1", port))
        b, _ = server.accept()
        with a, b:
            a.sendall(b"x")
            assert b.recv(1) == b"x"
            time.sleep(0.01)  # see test_pair_semantics.Rig.connect
            sent = _fill(a, LIMIT)
            queued = _inq(b)
            _drain_check(b, sent)
        lines = procs.lines(relay, 1)[0]
    print(f"pair: sender stopped after {sent} bytes; {queued} redirected-unread; {lines.strip()}")
    assert queued <= _default_cap() + (1 << 20)
    # cap at b + TCP buffers at both ztun sockets + the relay's buffer: tens of MB at most.
    assert sent < _default_cap() + (48 << 20)
    assert '"direct":[0' not in lines  # the shortcut carried bytes before the cap hit
