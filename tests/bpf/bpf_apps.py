"""Test workloads for the eBPF tests: apps that exchange random bytes in random chunks, both
ways at once, with either side half-closing first, and check everything with SHA-256.

The client sends a header first (connection id, how much the server must send back, a seed,
and flags choosing the half-close order); the server hashes what it receives after the
header and reports per connection id, so results match however the bytes travelled.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

HEADER = struct.Struct("!QQII")
#: server sends only after the client's EOF (client FIN first)
SERVER_AFTER_EOF = 1
#: client sends only after the server's EOF (server FIN first)
CLIENT_AFTER_EOF = 2


def _chunks(rng: random.Random, total: int, max_chunk: int) -> list[int]:
    out = []
    while total > 0:
        # log-uniform chunk sizes: many small writes, some large ones
        n = min(total, max(1, int(2 ** rng.uniform(0, max_chunk.bit_length() - 1))))
        out.append(n)
        total -= n
    return out


def send_random(
    sock: socket.socket, total: int, seed: int, *, pause: float, max_chunk: int = 1 << 18
) -> str:
    """Send ``total`` seeded random bytes in random chunks, pausing now and then (which lets
    the relay path drain, so a pair can switch to direct); returns the SHA-256."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    for n in _chunks(rng, total, max_chunk):
        data = rng.randbytes(n)
        h.update(data)
        sock.sendall(data)
        if pause and rng.random() < pause:
            time.sleep(rng.uniform(0, 0.002))
    return h.hexdigest()


#: Spurious EAGAIN from blocking recv() on accelerated sockets (a kernel behaviour of every
#: socket with a sockmap psock: tcp_bpf_recvmsg() returns -EAGAIN when a wakeup that was not
#: data, e.g. write space freed by the same socket's writer thread, ends its wait). Retried,
#: as a correct app must, and counted so tests can report it.
EAGAIN_SEEN = [0]
_eagain_lock = threading.Lock()


def recv_all(sock: socket.socket, limit: int | None = None) -> tuple[str, int]:
    """Read until EOF (or ``limit`` bytes); returns (SHA-256, byte count)."""
    h = hashlib.sha256()
    n = 0
    while limit is None or n < limit:
        try:
            data = sock.recv(1 << 20 if limit is None else min(1 << 20, limit - n))
        except BlockingIOError:
            with _eagain_lock:
                EAGAIN_SEEN[0] += 1
            continue
        if not data:
            break
        h.update(data)
        n += len(data)
    return h.hexdigest(), n


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            d = sock.recv(n - len(buf))
        except BlockingIOError:
            continue

        if not d:
            raise ConnectionError("EOF inside header")
        buf += d
    return buf


@dataclass
class Side:
    sent_sha: str = ""
    recv_sha: str = ""
    sent: int = 0
    received: int = 0
    error: str = ""


class HashServer:
    """Threaded server; ``results[conn_id]`` is its side of each finished connection."""

    def __init__(self, host: str = "127.0.0.1", *, pause: float = 0.02) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(1024)
        self.addr = self.sock.getsockname()
        self.pause = pause
        self.results: dict[int, Side] = {}
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)
        self._stop = False
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        side = Side()
        conn_id = -1
        with c:
            try:
                conn_id, nsend, seed, flags = HEADER.unpack(_recv_exact(c, HEADER.size))
                got: dict[str, tuple[str, int]] = {}
                errs: list[str] = []

                def reader() -> None:
                    try:
                        self._before_read(c, flags)
                        got["r"] = recv_all(c)
                    except OSError as e:
                        errs.append(repr(e))

                rt = threading.Thread(target=reader)
                rt.start()
                if flags & SERVER_AFTER_EOF:
                    rt.join()
                side.sent_sha = send_random(c, nsend, seed ^ 0x5A5A, pause=self.pause)
                side.sent = nsend
                c.shutdown(socket.SHUT_WR)
                rt.join()
                if errs:
                    raise OSError(f"reader: {errs[0]}")
                side.recv_sha, side.received = got["r"]
            except OSError as e:
                side.error = repr(e)
        with self.done:
            self.results[conn_id] = side
            self.done.notify_all()

    def _before_read(self, c: socket.socket, flags: int) -> None:
        """Hook: runs in the reader thread before it reads the client's bytes."""

    def wait(self, n: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        with self.done:
            while len(self.results) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"server finished {len(self.results)} of {n}")
                self.done.wait(left)

    def close(self) -> None:
        # shutdown() wakes the accept thread; only then close the fd: a thread about to
        # enter accept() with this fd number would otherwise accept on whatever socket
        # reuses the number next (another test's listener).
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._t.join(5)
        self.sock.close()


@dataclass
class Job:
    conn_id: int
    up: int  # client -> server bytes
    down: int  # server -> client bytes
    seed: int
    flags: int
    client: Side = field(default_factory=Side)


def run_client(addr: tuple[str, int], job: Job, *, pause: float = 0.02) -> Job:
    """One connection: header, then random bytes both ways; fills ``job.client``."""
    side = job.client
    try:
        with socket.create_connection(addr, timeout=60) as s:
            s.sendall(HEADER.pack(job.conn_id, job.down, job.seed, job.flags))
            got: dict[str, tuple[str, int]] = {}
            errs: list[str] = []

            def reader() -> None:
                try:
                    got["r"] = recv_all(s)
                except OSError as e:
                    errs.append(repr(e))

            rt = threading.Thread(target=reader)
            rt.start()
            if job.flags & CLIENT_AFTER_EOF:
                rt.join()
            side.sent_sha = send_random(s, job.up, job.seed, pause=pause)
            side.sent = job.up
            s.shutdown(socket.SHUT_WR)
            rt.join()
            if errs:
                raise OSError(f"reader: {errs[0]}")
            side.recv_sha, side.received = got["r"]
    except OSError as e:
        side.error = repr(e)
    return job


def make_jobs(n: int, seed: int, *, max_bytes: int = 1 << 21) -> list[Job]:
    """Random sizes (log-uniform up to max_bytes, some empty) and half-close orders."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):

        def size() -> int:
            return (
                0 if rng.random() < 0.05 else int(2 ** rng.uniform(0, max_bytes.bit_length() - 1))
            )

        flags = rng.choice([0, SERVER_AFTER_EOF, CLIENT_AFTER_EOF])
        jobs.append(Job(i, size(), size(), rng.getrandbits(32), flags))
    return jobs


def mismatches(jobs: list[Job], server: HashServer) -> list[str]:
    """Every difference between what one side sent and what the other received."""
    bad = []
    for j in jobs:
        s = server.results.get(j.conn_id)
        c = j.client
        if s is None:
            bad.append(f"{j.conn_id}: server never finished")
            continue
        if c.error or s.error:
            bad.append(f"{j.conn_id}: error client={c.error} server={s.error}")
            continue
        if c.sent_sha != s.recv_sha or c.sent != s.received:
            bad.append(f"{j.conn_id}: up {c.sent} sent, {s.received} received, sha differs")
        if s.sent_sha != c.recv_sha or s.sent != c.received:
            bad.append(f"{j.conn_id}: down {s.sent} sent, {c.received} received, sha differs")
    return bad
