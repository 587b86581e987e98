"""The real engine as the relay of the eBPF tests: ``Tunnel(accelerate=True)`` on three routes.

* ``forward``: ``Tunnel.forward`` to a local server. The engine marks its connect and pairs
  the two legs: the same-node shortcut.
* ``socks5``: ``Tunnel.socks5`` with ``set_directory([Destination(ip, id, local=True)])``.
  The engine decides policy with the source's identity and then pairs, like ``forward``.
* ``mtls``: ``forward(expect=[id])`` to a ``listen()`` of a second Tunnel, then the local
  server. The legs are TLS, so nothing pairs; only the app<->ztun hops (and the loopback TLS
  hop between the two tunnels) go socket to socket.

Each route is built inside the test's own cgroup (``joined_cgroup``). ``Tunnel(accelerate=True)``
attaches to the cgroup of the process, and that must never be the cgroup2 root.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import random
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpf_apps import (
    CLIENT_AFTER_EOF,
    HEADER,
    HashServer,
    Job,
    recv_all,
    send_random,
)
from bpf_util import bpftool_json

from ztun import Tunnel, bpf
from ztun.mesh import Destination
from ztun.policy import Workload
from ztun.testing import SpiffeCA

TD = "example.org"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
SERVER_ID = f"spiffe://{TD}/ns/prod/sa/server"
SERVER_WL = Workload("server", "prod", ips=("127.0.0.1",))
ROUTES = ("forward", "socks5", "mtls")
PAIRED = ("forward", "socks5")  # routes whose connections the engine pairs


def ap(name: str, spec: str, namespace: str = "prod") -> str:
    """One Istio AuthorizationPolicy document."""
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )


def rule(action: str, name: str, source: str) -> str:
    return ap(name, f"  action: {action}\n  rules:\n  - from:\n    - source: {source}\n")


#: SOCKS5 route: allow the client's identity; deny it (the mid-transfer change)
ALLOW_CLIENT = rule("ALLOW", "allow-client", '{principals: ["example.org/ns/default/sa/client"]}')
DENY_CLIENT = rule("DENY", "deny-client", '{principals: ["example.org/ns/default/sa/client"]}')
#: forward(policy=True): a plaintext peer, so only addresses can allow or deny it
ALLOW_LOOPBACK = rule("ALLOW", "allow-loopback", '{ipBlocks: ["127.0.0.0/8"]}')
DENY_LOOPBACK = rule("DENY", "deny-loopback", '{ipBlocks: ["127.0.0.0/8"]}')


def check_cgroup(cg: Path) -> None:
    """An accelerated Tunnel of this process attaches to ``cg``, never to the host root."""
    own = bpf.own_cgroup()
    assert own == cg and own != bpf.cgroup2_root(), f"test process in {own}, not {cg}"


@functools.cache
def ca() -> SpiffeCA:
    return SpiffeCA(TD)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            d = s.recv(n - len(buf))
        except BlockingIOError:  # spurious EAGAIN of psock sockets (docs/sockmap.md §4)
            continue
        if not d:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += d
    return buf


def socks5_connect(
    proxy: tuple[str, int], dst: tuple[str, int], timeout: float = 30
) -> socket.socket:
    s = socket.create_connection(proxy, timeout=timeout)
    try:
        s.sendall(b"\x05\x01\x00")
        if recv_exact(s, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5: no-auth method refused")
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(dst[0]) + struct.pack("!H", dst[1]))
        rep = recv_exact(s, 10)
        if rep[1] != 0:
            raise ConnectionError(f"SOCKS5: connect refused, reply {rep[1]}")
    except BaseException:
        s.close()
        raise
    return s


@dataclass
class Route:
    """Tunnels carrying connections to one server; ``connect()`` opens one through them."""

    name: str
    tunnels: list[Tunnel]
    connect: Callable[[], socket.socket]
    entry: Tunnel  # the tunnel the client connects to (its bytes_sent = client -> server)
    address: tuple[str, int]  # where clients connect (the forward, or the SOCKS5 proxy)

    def stats(self) -> list[Any]:
        return [t.stats() for t in self.tunnels]

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Until every tunnel has closed every connection (their counters are then final)."""
        end = time.monotonic() + timeout
        while any(s.connections_active for s in self.stats()):
            if time.monotonic() > end:
                raise TimeoutError(f"{self.name}: connections still active: {self.stats()}")
            time.sleep(0.02)


@contextlib.contextmanager
def route(
    name: str,
    server: tuple[str, int],
    cg: Path,
    *,
    policy: bool = False,
    accelerate: bool = True,
) -> Iterator[Route]:
    """A started route to ``server``; closed (engines first, then accelerators) on exit.
    ``policy``: forward with policy=True (allowing loopback), socks5 with its allow policy."""
    check_cgroup(cg)
    tunnels: list[Tunnel] = []
    try:
        if name == "forward":
            t = Tunnel(
                accelerate=accelerate,
                access_log=False,
                workload=Workload("server", "prod") if policy else None,
                policies=ALLOW_LOOPBACK if policy else None,
            ).start()
            tunnels.append(t)
            addr = t.forward(("127.0.0.1", 0), server, policy=policy).address
            yield Route(name, tunnels, lambda: socket.create_connection(addr, timeout=60), t, addr)
        elif name == "socks5":
            t = Tunnel(
                identity=ca().issue_svid(CLIENT_ID),
                trust=ca().bundle,
                accelerate=accelerate,
                access_log=False,
                workloads=[SERVER_WL],
                policies=ALLOW_CLIENT,
            ).start()
            tunnels.append(t)
            proxy = t.socks5(("127.0.0.1", 0)).address
            t.set_directory([Destination(server[0], SERVER_ID, local=True)])
            yield Route(name, tunnels, lambda: socks5_connect(proxy, server, timeout=60), t, proxy)
        elif name == "mtls":
            # The server's tunnel first: its accelerator is attached first (see the report
            # on two accelerated Tunnels in one cgroup sharing the default mark).
            tb = Tunnel(
                identity=ca().issue_svid(SERVER_ID),
                trust=ca().bundle,
                accelerate=accelerate,
                access_log=False,
            ).start()
            tunnels.append(tb)
            ta = Tunnel(
                identity=ca().issue_svid(CLIENT_ID),
                trust=ca().bundle,
                accelerate=accelerate,
                access_log=False,
            ).start()
            tunnels.append(ta)
            lst = tb.listen(("127.0.0.1", 0), server)
            addr = ta.forward(("127.0.0.1", 0), lst.address, expect=[SERVER_ID]).address
            yield Route(name, tunnels, lambda: socket.create_connection(addr, timeout=60), ta, addr)
        else:
            raise ValueError(name)
    finally:
        for t in reversed(tunnels):
            t.close()


#: header flag (beside bpf_apps' two): the server's reader stalls before it reads, so the
#: client's bytes pile up at the server up to the ingress cap and fall back to the relay
STALL_UP = 4


def inq(sock: socket.socket) -> int:
    """FIONREAD: on a psock socket, the redirected bytes not yet read (tcp_bpf_ioctl)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0])


def stall(sock: socket.socket, quiet: float = 0.15, limit: float = 5.0) -> None:
    """Do not read until nothing more arrives for ``quiet`` seconds: the sender is then
    blocked (TCP backpressure once the ingress cap is reached) or done."""
    end = time.monotonic() + limit
    last, since = -1, time.monotonic()
    while time.monotonic() < end:
        n = inq(sock)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.01)


class StallServer(HashServer):
    """bpf_apps.HashServer that also honours STALL_UP."""

    def _before_read(self, c: socket.socket, flags: int) -> None:
        if flags & STALL_UP:
            stall(c)


def _send_after(s: socket.socket, first: bytes, total: int, seed: int, pause: float) -> str:
    """send_random's stream after ``first`` (already sent); SHA-256 of both."""
    rng = random.Random(seed)
    h = hashlib.sha256(first)
    while total > 0:
        n = min(total, max(1, int(2 ** rng.uniform(0, 18))))
        data = rng.randbytes(n)
        h.update(data)
        s.sendall(data)
        total -= n
        if pause and rng.random() < pause:
            time.sleep(rng.uniform(0, 0.002))
    return h.hexdigest()


def run_job(
    connect: Callable[[], socket.socket],
    job: Job,
    *,
    pause: float = 0.02,
    burst: int = 0,
    stall_down: bool = False,
) -> Job:
    """bpf_apps.run_client with the connection opened by ``connect`` (SOCKS5 needs it).

    ``burst``: the first ``burst`` bytes of the upload go in one sendall() right after the
    header, prepared beforehand, so the writer is busy while ztun connects and pairs (the
    switch to the direct path then happens in the middle of a large write). ``stall_down``:
    the client's reader waits (see stall()) before it reads."""
    side = job.client
    first = b""
    if burst and job.up and not job.flags & CLIENT_AFTER_EOF:
        first = random.Random(job.seed ^ 0xB0B0).randbytes(min(burst, job.up))
    try:
        with connect() as s:
            s.sendall(HEADER.pack(job.conn_id, job.down, job.seed, job.flags) + first)
            got: dict[str, tuple[str, int]] = {}
            errs: list[str] = []

            def reader() -> None:
                try:
                    if stall_down:
                        stall(s)
                    got["r"] = recv_all(s)
                except OSError as e:
                    errs.append(repr(e))

            rt = threading.Thread(target=reader)
            rt.start()
            if job.flags & CLIENT_AFTER_EOF:
                rt.join()
            side.sent_sha = (
                _send_after(s, first, job.up - len(first), job.seed, pause)
                if first
                else send_random(s, job.up, job.seed, pause=pause)
            )
            side.sent = job.up
            s.shutdown(socket.SHUT_WR)
            rt.join()
            if errs:
                raise OSError(f"reader: {errs[0]}")
            side.recv_sha, side.received = got["r"]
    except OSError as e:
        side.error = repr(e)
    return job


# ---- the accelerators' maps, read with bpftool (the tunnels keep them private) ----------


def ztun_map_ids(name: str) -> set[int]:
    return {int(str(m["id"])) for m in bpftool_json("map", "show") if m.get("name") == name}


def map_entries(map_id: int) -> list[dict[str, object]]:
    return bpftool_json("map", "dump", "id", str(map_id))


STAT_NAMES = (
    "sockops_insert",
    "sockops_error",
    "hop_redirect",
    "hop_fallback_order",
    "hop_fallback_cap",
    "hop_miss",
    "pair_redirect",
    "pair_fallback_order",
    "pair_fallback_cap",
    "pair_stale_route",
    "pair_wait_near",
    "pair_wait_busy",
    "pair_wait_far",
)


def bpf_stats(map_ids: set[int]) -> dict[str, int]:
    """The global counters (ztun_stats, per-CPU) of the given accelerators, summed."""
    out = dict.fromkeys(STAT_NAMES, 0)
    for mid in map_ids:
        for e in map_entries(mid):
            f: Any = e.get("formatted", {})  # {"key": i, "values": [{"cpu", "value"}]}
            idx = int(f.get("key", -1))
            if 0 <= idx < len(STAT_NAMES):
                out[STAT_NAMES[idx]] += sum(int(v["value"]) for v in f.get("values", []))
    return out


class Maps:
    """The ztun maps that appeared after construction: this test's accelerators'."""

    def __init__(self) -> None:
        self._before = {n: ztun_map_ids(n) for n in ("ztun_stats", "ztun_routes")}

    def new(self, name: str) -> set[int]:
        return ztun_map_ids(name) - self._before[name]

    def stats(self) -> dict[str, int]:
        return bpf_stats(self.new("ztun_stats"))

    def routes(self) -> int:
        """Pair routes still in the accelerators' ztun_routes (0: every pair is gone)."""
        return sum(len(map_entries(m)) for m in self.new("ztun_routes"))
