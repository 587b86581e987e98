"""A stalled receiver stops the sender through the real engine: what one connection can
make the kernel (and ztun) hold is bounded, and the data then drains intact.

The receiver never reads; the sender writes without blocking until the kernel refuses for
0.2 s. Everything the sender got accepted is then held somewhere between the two apps:
redirected into the receiver (bounded by the ingress cap, tcp_rmem[2]), in ztun's
sockets and buffers, or in TCP queues. Without the cap the kernel alone would accept
everything (tests/bpf/test_backpressure.py's control: 256 MiB in 0.03 s)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from bpf_util import default_cap, drain_check, fill
from engine_rig import PAIRED, ROUTES, Maps, inq, route

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf, pytest.mark.timeout(60)]

LIMIT = 256 << 20  # the sender stops there in any case


@pytest.mark.parametrize("name", ROUTES)
def test_engine_slow_consumer_is_bounded(name: str, joined_cgroup: Path) -> None:
    cap = default_cap()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    maps = Maps()
    with server, route(name, server.getsockname(), joined_cgroup) as r:
        a = r.connect()
        server.settimeout(30)
        b, _ = server.accept()
        with a, b:
            a.sendall(b"x")
            assert b.recv(1) == b"x"
            time.sleep(0.01)  # the engine's busy flag is down: the next bytes can go direct
            sent = fill(a, LIMIT, 5.0)
            queued = inq(b)
            bst = maps.stats()
            drain_check(b, sent, 20)
        r.wait_idle()
        s = r.entry.stats()
    print(
        f"{name}: sender stopped after {sent} B; receiver held {queued} B redirected-unread; "
        f"{s.bpf_direct_bytes} B direct; bpf { ({k: v for k, v in bst.items() if v}) }"
    )
    assert sent < LIMIT, "the sender was never stopped"
    # The receiver's redirected-unread bytes stay within the cap plus one message.
    assert queued <= cap + (1 << 20), queued
    if name in PAIRED:
        # cap at b + ztun's two sockets and buffer + TCP queues: tens of MB at most.
        assert sent < cap + (48 << 20), sent
        assert s.bpf_direct_bytes > 0 and bst["pair_fallback_cap"] > 0, bst
    else:
        # Two hops, each bounded by a cap (into ztun's socket, into b), plus what the
        # two tunnels and the TLS connection between them hold.
        assert sent < 2 * cap + (64 << 20), sent
        assert bst["hop_redirect"] > 0, bst
    assert s.bytes_sent == sent + 1, (s.bytes_sent, sent)
