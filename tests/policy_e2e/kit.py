"""Helpers for the policy end-to-end tests: tunnels inside netns nodes, event and log capture.

A Tunnel's engine threads and listening sockets live in the network namespace of the thread
that starts it / opens them, so every Tunnel call that creates sockets runs on the node's own
thread (``node.call``). Everything here waits with a bound.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from harness.netns import Node

from ztun import Tunnel
from ztun.events import ConnectionEvent
from ztun.policy import PolicySet, Workload
from ztun.testing import SpiffeCA

Addr = tuple[str, int]
TD = "cluster.local"
ALICE = f"spiffe://{TD}/ns/prod/sa/alice"
BOB = f"spiffe://{TD}/ns/prod/sa/bob"
SERVER = f"spiffe://{TD}/ns/prod/sa/server"
IO_TIMEOUT = 10.0


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def policy_yaml(*docs: str) -> str:
    """Istio AuthorizationPolicy documents from ``name|namespace|spec-yaml`` shorthands."""
    return "\n---\n".join(docs)


def ap(name: str, spec: str, *, namespace: str = "prod", dry_run: bool = False) -> str:
    """One AuthorizationPolicy document; ``spec`` is the indented body under ``spec:``."""
    ann = '  annotations: {"istio.io/dry-run": "true"}\n' if dry_run else ""
    return (
        "apiVersion: security.istio.io/v1\n"
        "kind: AuthorizationPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n{ann}"
        f"spec:\n{spec}"
    )


def allow_principals(name: str, *ids: str, dry_run: bool = False) -> str:
    ps = ", ".join(f'"{i.removeprefix("spiffe://")}"' for i in ids)
    return ap(
        name,
        f"  action: ALLOW\n  rules:\n  - from:\n    - source: {{principals: [{ps}]}}\n",
        dry_run=dry_run,
    )


def deny_principals(name: str, *ids: str, dry_run: bool = False) -> str:
    ps = ", ".join(f'"{i.removeprefix("spiffe://")}"' for i in ids)
    return ap(
        name,
        f"  action: DENY\n  rules:\n  - from:\n    - source: {{principals: [{ps}]}}\n",
        dry_run=dry_run,
    )


class Events:
    """Every ConnectionEvent of one tunnel."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._cv = threading.Condition()
        self.items: list[ConnectionEvent] = []
        self.unsubscribe = tunnel.subscribe(self._on)

    def _on(self, ev: ConnectionEvent) -> None:
        with self._cv:
            self.items.append(ev)
            self._cv.notify_all()

    def select(self, kind: str | None = None, **attrs: Any) -> list[ConnectionEvent]:
        with self._cv:
            return [
                e
                for e in self.items
                if (kind is None or e.kind == kind)
                and all(getattr(e, k) == v for k, v in attrs.items())
            ]

    def wait(
        self, n: int, kind: str | None = None, timeout: float = 10.0, **attrs: Any
    ) -> list[ConnectionEvent]:
        wait_until(lambda: len(self.select(kind, **attrs)) >= n, timeout, f"{n} {kind} {attrs}")
        return self.select(kind, **attrs)


class LogCapture(logging.Handler):
    """Lines logged on ztun.engine / ztun.access while active (INFO and up)."""

    LOGGERS = ("ztun.engine", "ztun.access", "ztun.tunnel")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._lock2 = threading.Lock()
        self.records: list[tuple[str, int, str]] = []
        self._saved: list[tuple[logging.Logger, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.records.append((record.name, record.levelno, record.getMessage()))

    def lines(self, logger: str, pattern: str = "") -> list[str]:
        rx = re.compile(pattern)
        with self._lock2:
            return [m for n, _, m in self.records if n == logger and rx.search(m)]

    def __enter__(self) -> LogCapture:
        for name in self.LOGGERS:
            lg = logging.getLogger(name)
            self._saved.append((lg, lg.level))
            lg.setLevel(logging.DEBUG)
            lg.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for lg, level in self._saved:
            lg.removeHandler(self)
            lg.setLevel(level)


@dataclass
class Mesh:
    """Two nodes: clients on ``client`` (node 1), the protected service on ``server``."""

    client: Node
    server: Node
    ca: SpiffeCA
    tunnels: list[Tunnel] = field(default_factory=list)

    @property
    def workload(self) -> Workload:
        return Workload(
            "server", "prod", "server", labels={"app": "server"}, ips=(self.server.ip4,)
        )

    def tunnel(self, node: Node, spiffe_id: str | None, **kw: Any) -> Tunnel:
        """A started Tunnel whose engine runs inside ``node``."""
        if spiffe_id is not None:
            kw.update(identity=self.ca.issue_svid(spiffe_id), trust=self.ca.bundle)
        kw.setdefault("workers", 2)
        t = Tunnel(**kw)
        self.tunnels.append(t)
        node.call(t.start)
        return t

    def server_tunnel(self, policies: Any = None, **kw: Any) -> Tunnel:
        kw.setdefault("workload", self.workload)
        return self.tunnel(self.server, SERVER, policies=policies, **kw)

    def listen(self, t: Tunnel, to: Addr, **kw: Any) -> Addr:
        """An mTLS listener on the server node's address, forwarding to ``to``."""
        return self.server.call(t.listen, (self.server.ip4, 0), to, **kw).address

    def forward(self, spiffe_id: str, to: Addr) -> Addr:
        """A client-node tunnel with ``spiffe_id``: plaintext on 127.0.0.1, mTLS to ``to``."""
        t = self.tunnel(self.client, spiffe_id)
        return self.client.call(t.forward, ("127.0.0.1", 0), to, expect=[SERVER]).address

    def connect(self, addr: Addr) -> socket.socket:
        return self.client.connect(addr, timeout=IO_TIMEOUT)

    def close(self) -> None:
        for t in self.tunnels:
            with contextlib.suppress(Exception):
                t.close()
        self.tunnels.clear()


def refused(sock: socket.socket, payload: bytes = b"hello?") -> str:
    """Send, then read: 'eof' (clean close) or 'reset'; anything else is a failure."""
    sock.settimeout(IO_TIMEOUT)
    try:
        try:
            sock.sendall(payload)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        data = sock.recv(1024)
    except ConnectionResetError:
        return "reset"
    finally:
        sock.close()
    if data:
        raise AssertionError(f"a denied connection received data: {data[:32]!r}")
    return "eof"


def attempt(node: Node, addr: Addr) -> str:
    """Connect from ``node`` and see a denial: 'eof' or 'reset' (also during connect())."""
    try:
        sock = node.connect(addr, timeout=IO_TIMEOUT)
    except ConnectionResetError:
        return "reset"
    return refused(sock)


def echo_ok(sock: socket.socket, payload: bytes = b"ping") -> bool:
    sock.settimeout(IO_TIMEOUT)
    try:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            b = sock.recv(len(payload) - len(got))
            if not b:
                break
            got += b
        return got == payload
    finally:
        sock.close()


@contextlib.contextmanager
def mesh_of(nodes: tuple[Node, Node]) -> Iterator[Mesh]:
    m = Mesh(nodes[0], nodes[1], SpiffeCA(TD))
    try:
        yield m
    finally:
        m.close()


__all__ = [
    "ALICE",
    "BOB",
    "SERVER",
    "Events",
    "LogCapture",
    "Mesh",
    "PolicySet",
    "allow_principals",
    "ap",
    "attempt",
    "deny_principals",
    "echo_ok",
    "mesh_of",
    "policy_yaml",
    "refused",
    "wait_until",
]
