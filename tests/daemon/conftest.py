"""Fixtures for the daemon tests: a two-node cluster of namespaces running real ztund's.

The cluster is the demo's (:class:`ztun.demo.Cluster`): node-a runs demo/client and demo/db,
node-b runs demo/api, every workload in its own network namespace behind its node. Each
node runs ``python -m ztun run --config ...`` as a subprocess inside the node's namespace;
its admin port is 127.0.0.1:15000 there. Everything is removed at teardown, also when the
test failed; a daemon's log tail is attached to the failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness.caps import require

from ztun.demo import POLICIES, Cluster, EchoServer, WorkloadNs, Ztund, node_config, write_yaml

DEFAULT_FORWARDS = {
    "demo/client": [(9080, "demo/api:8080"), (9081, "demo/db:5432")],
    "demo/api": [(9082, "demo/db:5432")],
}
START_TIMEOUT = 60.0


class Sink:
    """A server that reads to EOF and replies with (count, SHA-256) — a big-transfer peer."""

    REPLY = struct.Struct("!Q32s")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.results: list[tuple[int, str]] = []
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        h = hashlib.sha256()
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        total = 0
        with contextlib.suppress(OSError), c:
            while True:
                n = c.recv_into(buf)
                if n == 0:
                    break
                h.update(mv[:n])
                total += n
            self.results.append((total, h.hexdigest()))
            c.sendall(self.REPLY.pack(total, h.digest()))
            c.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def echo_roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data``, half-close, return everything echoed until EOF or a reset.

    A connection ztund refuses is reset; the reset may come before the send finished
    (EPIPE / ECONNRESET), so a failed send ends the exchange too: what was echoed so far
    is returned, and a caller comparing it with ``data`` sees the difference.
    """
    out = bytearray()

    def reader() -> None:
        with contextlib.suppress(OSError):
            while True:
                chunk = sock.recv(1 << 18)
                if not chunk:
                    return
                out.extend(chunk)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    t.join(60)
    return bytes(out)


def refused_roundtrip(workload: WorkloadNs, addr: tuple[str, int], data: bytes = b"no") -> bytes:
    """Connect through a forward and echo ``data``; b"" when ztund refuses the connection.

    ztund accepts the app's connection before it asks the peer (HBONE CONNECT); a refusal
    reaches the app as a reset, which may already be there when ``connect()`` returns.
    """
    try:
        sock = workload.connect(addr)
    except (ConnectionResetError, ConnectionAbortedError):
        return b""
    with sock:
        return echo_roundtrip(sock, data)


@dataclass
class Mesh:
    """Two nodes, three workloads, a ztund per node (see the module docstring)."""

    root: Path
    cluster: Cluster
    client: WorkloadNs
    db: WorkloadNs
    api: WorkloadNs
    daemons: dict[str, Ztund] = field(default_factory=dict)
    servers: list[Any] = field(default_factory=list)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def a(self) -> Ztund:
        return self.daemons["node-a"]

    @property
    def b(self) -> Ztund:
        return self.daemons["node-b"]

    def config_path(self, node: str) -> Path:
        return self.root / f"{node}.yaml"

    def config(self, node: str, **kw: Any) -> dict[str, Any]:
        """The generated config of ``node`` (``kw`` as for ztun.demo.node_config)."""
        n = next(x for x in self.cluster.nodes if x.name == node)
        opts = {**self.options.get(node, {}), **kw}
        opts.setdefault("forwards", DEFAULT_FORWARDS)
        # short drains, so a failed test's leftover connections do not hold teardown
        opts.setdefault("drain_timeout", "5s")
        return node_config(
            self.cluster, n, ca_dir=str(self.root / "ca"), state_dir=str(self.root / node), **opts
        )

    def write_config(self, node: str, data: dict[str, Any] | str) -> None:
        path = self.config_path(node)
        if isinstance(data, str):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(data)
            os.replace(tmp, path)
        else:
            write_yaml(path, data)

    def start(self, *nodes: str, wait: bool = True) -> None:
        for name in nodes or ("node-a", "node-b"):
            n = next(x for x in self.cluster.nodes if x.name == name)
            if not self.config_path(name).exists():
                self.write_config(name, self.config(name))
            self.daemons[name] = Ztund(
                n, self.config_path(name), log_path=self.root / f"{name}.log"
            ).start()
        if wait:
            for name in nodes or ("node-a", "node-b"):
                self.daemons[name].wait_ready(START_TIMEOUT)

    def policy_dir(self, text: str = POLICIES, name: str = "policies") -> Path:
        d = self.root / name
        d.mkdir(exist_ok=True)
        tmp = self.root / f".{name}.yaml.tmp"  # outside d: a daemon may be reading d now
        tmp.write_text(text)
        os.replace(tmp, d / "policies.yaml")
        return d

    def wait_log(
        self, daemon: Ztund, pred: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in list(daemon.records):
                if pred(r):
                    return r
            time.sleep(0.05)
        raise AssertionError(f"no matching log record within {timeout}s:\n{daemon.tail()}")

    def close(self) -> None:
        for d in self.daemons.values():
            with contextlib.suppress(Exception):
                d.stop(30)
        for s in self.servers:
            with contextlib.suppress(Exception):
                s.close()
        self.cluster.close()


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """The cluster with echo servers on api:8080 and db:5432 (daemons not started yet)."""
    require("netns")
    cluster = Cluster("t")
    m: Mesh | None = None
    try:
        a, b = cluster.add_nodes("node-a", "node-b")
        client = cluster.add_workload(a, "client")
        db = cluster.add_workload(a, "db")
        api = cluster.add_workload(b, "api")
        cluster.wait_reachable()
        m = Mesh(tmp_path, cluster, client, db, api)
        m.servers += [EchoServer(api.listen(8080)), EchoServer(db.listen(5432))]
        yield m
    finally:
        failed = getattr(request.node, "rep_call", None)
        if m is not None:
            if failed is not None and failed.failed:
                for name, d in m.daemons.items():
                    print(f"--- {name} log tail ---\n{d.tail(40)}")
            m.close()
        else:
            cluster.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
