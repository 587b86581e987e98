"""Same-node pairs: what the apps see at the edges of a stream.

FIN is never redirected: ztun forwards it, and it must never overtake a redirected byte.
RST, a close with data still queued, a policy teardown and ztun dying mid-transfer must end
as TCP would: every byte, or an error, never a clean end of a truncated stream."""

from __future__ import annotations

import hashlib
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from bpf_apps import recv_all
from bpf_util import KERNEL_FLAKY, Procs, free_port, relay_lines, stream_until_error

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]


class Rig:
    """ztrelay between a client port and a server socket the test accepts from."""

    def __init__(self, ztrelay: Path, procs: Procs, cg: Path, *opts: str) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = free_port()
        self.procs = procs
        self._lock = threading.Lock()  # connect+accept as one step: threads share server
        self.relay = procs.start(
            ztrelay,
            "relay",
            f"127.0.0.1:{self.port}",
            f"127.0.0.1:{self.server.getsockname()[1]}",
            "--bpf",
            str(cg),
            "--pairs",
            *opts,
        )

    def connect(self) -> tuple[socket.socket, socket.socket]:
        with self._lock:
            a = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self.server.settimeout(30)
            b, _ = self.server.accept()
        b.settimeout(30)
        # One round trip: the relay pairs before it forwards anything, so after this the
        # pair exists and its relay path is empty (the next bytes can go direct).
        a.sendall(b"?")
        assert b.recv(1) == b"?"
        b.sendall(b"!")
        assert a.recv(1) == b"!"
        # The engine clears its busy flag just after its send() returns, when the app may
        # already hold the byte: a sender that never pauses from here on would stay on
        # the relay path (correct, only slower). Real request/response pauses too.
        time.sleep(0.01)
        return a, b

    def lines(self, n: int) -> list[dict[str, object]]:
        """The relay's reports of n connections (each printed when it finished)."""
        return relay_lines("".join(self.procs.lines(self.relay, n, timeout=30)))

    def close(self) -> None:
        self.server.close()


@contextmanager
def rig(ztrelay: Path, procs: Procs, cg: Path, *opts: str) -> Iterator[Rig]:
    r = Rig(ztrelay, procs, cg, *opts)
    try:
        yield r
    finally:
        r.close()


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


def test_fin_never_overtakes_redirected_bytes(
    ztrelay: Path, procs: Procs, joined_cgroup: Path
) -> None:
    n = 300
    with rig(ztrelay, procs, joined_cgroup) as r:
        with ThreadPoolExecutor(max_workers=8) as ex:
            results = list(ex.map(lambda i: _one_way_then_fin(r, i), range(n)))
        lines = r.lines(n)
    bad = [why for ok, why in results if not ok]
    assert not bad, bad[:5]
    assert len(lines) == n
    direct = sum(sum(ln["direct"]) for ln in lines)  # type: ignore[arg-type]
    relayed = sum(sum(ln["relayed"]) for ln in lines)  # type: ignore[arg-type]
    # The point is FIN after redirected bytes: most bytes must have been redirected.
    assert direct > 10 * relayed, (direct, relayed)


@pytest.mark.parametrize("who", ["client", "server"])
def test_rst_reaches_the_other_app(
    who: str, ztrelay: Path, procs: Procs, joined_cgroup: Path
) -> None:
    with rig(ztrelay, procs, joined_cgroup) as r:
        a, b = r.connect()
        resetter, other = (a, b) if who == "client" else (b, a)
        resetter.sendall(b"x" * 100_000)
        assert recv_all(other, 100_000)[1] == 100_000
        resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resetter.close()
        with pytest.raises(ConnectionResetError):
            recv_all(other)  # an EOF here would be a silent end
        other.close()
        lines = r.lines(1)
    assert sum(sum(ln["direct"]) for ln in lines) > 0  # type: ignore[arg-type]


def test_close_with_data_queued_delivers_everything(
    ztrelay: Path, procs: Procs, joined_cgroup: Path
) -> None:
    """A writes more than the ingress cap (tcp_rmem[2], 32 MiB here) and closes while most
    of it is queued (part redirected into B, part in ztun's buffers and TCP queues); B
    reads later."""
    with open("/proc/sys/net/ipv4/tcp_rmem") as f:
        cap = int(f.read().split()[2])
    data = random.Random(1).randbytes(cap + (24 << 20))
    with rig(ztrelay, procs, joined_cgroup) as r:
        a, b = r.connect()
        w = threading.Thread(target=lambda: (a.sendall(data), a.close()))
        with b:
            w.start()
            time.sleep(0.5)  # b does not read yet
            sha, n = recv_all(b)
            w.join()
        lines = r.lines(1)
    assert n == len(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert sum(lines[0]["direct"]) > 0 and sum(lines[0]["relayed"]) > 0, lines  # type: ignore[arg-type]


@KERNEL_FLAKY
@pytest.mark.parametrize("how", ["sigkill", "policy"])
def test_ztun_gone_mid_transfer_is_an_error(
    how: str, ztrelay: Path, procs: Procs, joined_cgroup: Path
) -> None:
    """ztun dies (SIGKILL) or tears the pair down for policy (SIGUSR1: pair_del, then RST)
    while bytes flow app to app: both apps must get an error, never a clean EOF."""
    with rig(ztrelay, procs, joined_cgroup) as r:
        a, b = r.connect()
        sig = signal.SIGKILL if how == "sigkill" else signal.SIGUSR1
        with a, b:
            ea, eb, n, intact = stream_until_error(a, b, 0.5, lambda: r.relay.send_signal(sig))
        if how == "policy":
            line = r.lines(1)[0]
            assert line["error"] and sum(line["direct"]) > 0, line  # type: ignore[arg-type]
    assert n > 0 and intact
    assert ea in ("ConnectionResetError", "BrokenPipeError"), ea
    assert eb == "ConnectionResetError", eb


def test_pair_add_refuses_sockets_sock_ops_never_saw(joined_cgroup: Path) -> None:
    """A pair needs all four sockets in the sockhash with their state readable; a
    connection on a port ztun never registered is refused, not half-accelerated."""
    from ztun import bpf
    from ztun.errors import BpfError

    with bpf.SockmapAccelerator(joined_cgroup) as acc:
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(4)
        c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
        with c, s, ls, pytest.raises(BpfError, match="not seen by sock_ops"):
            acc.pair_add(s, c)
