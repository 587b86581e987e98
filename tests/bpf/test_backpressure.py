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
from bpf_util import Procs, default_cap, drain_check, fill, free_port

from ztun import bpf

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]

LIMIT = 256 << 20  # stop the control there: it is charged to the host-wide tcp_mem


def _inq(sock: socket.socket) -> int:
    """FIONREAD: on a psock socket, the redirected bytes not yet read (tcp_bpf_ioctl)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0])


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
            sent = fill(a, LIMIT, 2.0)
            queued = _inq(b)
            st = acc.stats()
            drain_check(b, sent, 10)
    bound = cap or default_cap()
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
            sent = fill(a, LIMIT, 2.0)
            secs = time.monotonic() - t0
            queued = _inq(b)
            drain_check(b, sent, 10)
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
            sent = fill(a, LIMIT, 2.0)
            queued = _inq(b)
            drain_check(b, sent, 10)
        lines = procs.lines(relay, 1)[0]
    print(f"pair: sender stopped after {sent} bytes; {queued} redirected-unread; {lines.strip()}")
    assert queued <= default_cap() + (1 << 20)
    # cap at b + TCP buffers at both ztun sockets + the relay's buffer: tens of MB at most.
    assert sent < default_cap() + (48 << 20)
    assert '"direct":[0' not in lines  # the shortcut carried bytes before the cap hit
