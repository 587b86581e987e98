"""Fixtures of the capture tests: two netns nodes (tests/harness), a ztun Tunnel per node
running in this test process (moved into a cgroup of its own: the SO_ORIGINAL_DST program
hooks ztun's cgroup), a per-test cgroup per node holding the captured programs, and helpers
to run unmodified programs inside (node, cgroup).

Needs root, cgroup v2, bpffs and kernel BTF: skipped elsewhere, a failure under CI=true.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness.caps import in_ci, require
from harness.cgroup import Cgroup
from harness.netns import Node

from ztun import Tunnel, capture
from ztun.capture import Capture
from ztun.events import ConnectionEvent
from ztun.mesh import Destination
from ztun.netns import run_in_netns
from ztun.policy import Workload
from ztun.testing import SpiffeCA

APPS = Path(__file__).with_name("apps.py")
TRUST_DOMAIN = "cluster.local"
ENGINE_CHANGE = (
    "the engine did not connect a FORWARD + LISTENER_ORIGINAL_DST listener to the original "
    "destination (zflow_inbound_dst in src/core/outbound.c; docs/capture.md)"
)


def _require_capture() -> None:
    require("bpf")
    ok, why = capture.available()
    if not ok:
        if in_ci():
            pytest.fail(f"capture tests cannot run under CI: {why}")
        pytest.skip(f"needs eBPF capture: {why}")


@pytest.fixture(autouse=True)
def _capture_ready() -> None:
    _require_capture()


def _bpftool(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["bpftool", "-j", *args], check=False, capture_output=True, text=True)
    data = json.loads(out.stdout or "[]")
    return data if isinstance(data, list) else []


def cap_objects() -> dict[str, set[int]]:
    """IDs of ztun_cap_* programs and of the links that run them."""
    progs = {
        int(p["id"]) for p in _bpftool("prog", "show") if p.get("name", "").startswith("ztun_cap")
    }
    links = {int(lk["id"]) for lk in _bpftool("link", "show") if lk.get("prog_id") in progs}
    return {"progs": progs, "links": links}


def wait_no_capture(before: dict[str, set[int]], timeout: float = 10.0) -> dict[str, set[int]]:
    """Capture objects beyond ``before``, once they are gone or the timeout passed (program
    release is deferred to an RCU grace period)."""
    end = time.monotonic() + timeout
    while True:
        now = cap_objects()
        left = {k: now[k] - before[k] for k in now}
        if not any(left.values()) or time.monotonic() > end:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="package", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    ok, _ = capture.available()
    before = cap_objects() if ok else {"progs": set(), "links": set()}
    yield
    if ok:
        left = wait_no_capture(before)
        assert not any(left.values()), f"capture objects left behind: {left}"


@pytest.fixture
def engine_cgroup() -> Iterator[Cgroup]:
    """This test process (ztun's engines) in a fresh cgroup; moved back afterwards."""
    require("cgroup2")
    cg = Cgroup.create()
    cg.add()
    try:
        yield cg
    finally:
        cg.remove()


@pytest.fixture(scope="session")
def ca() -> SpiffeCA:
    return SpiffeCA(TRUST_DOMAIN)


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise AssertionError(f"no JSON result in output: {text!r}")


@dataclass
class Side:
    """One node: its netns, the cgroup of its captured programs, its ztun."""

    node: Node
    cg: Cgroup
    name: str
    ca: SpiffeCA
    tunnel: Tunnel | None = None
    capture: Capture | None = None
    events: list[ConnectionEvent] = field(default_factory=list)

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/{self.name}"

    @property
    def workload(self) -> Workload:
        return Workload(
            self.name,
            "demo",
            self.name,
            labels={"app": self.name},
            ips=(self.node.ip4, self.node.ip6),
        )

    def addr(self, family: int) -> str:
        return self.node.ip6 if family == 6 else self.node.ip4

    # -- programs inside (node, cgroup)

    def argv(self, argv: list[str], *, captured: bool = True) -> list[str]:
        if not captured:
            return argv
        # Join the cgroup before exec, so the program's first connect is already in it.
        return ["sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', self.cg.path, *argv]

    def app(self, *args: str, captured: bool = True, timeout: float = 120.0) -> dict[str, Any]:
        """Run apps.py to completion in the node (and cgroup); its JSON result."""
        cp = self.node.run(
            self.argv([sys.executable, str(APPS), *args], captured=captured),
            timeout=timeout,
            check=False,
        )
        res = last_json(cp.stdout)
        res["rc"] = cp.returncode
        res["stderr"] = cp.stderr
        return res

    def server(self, *args: str, captured: bool = True) -> subprocess.Popen[str]:
        """Start an apps.py server in the node (and cgroup); returns once it listens."""
        p = self.node.popen(
            self.argv([sys.executable, str(APPS), *args], captured=captured),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None
        line = p.stdout.readline()
        assert "READY" in line, f"server did not start: {line!r} {p.stderr and p.stderr.read()}"
        return p

    def popen(self, argv: list[str], *, captured: bool = True, **kw: Any) -> subprocess.Popen[Any]:
        return self.node.popen(self.argv(argv, captured=captured), **kw)


class Mesh:
    """Two sides, each with a Tunnel in its node's netns; capture per side on demand."""

    def __init__(self, a: Node, b: Node, ca: SpiffeCA, cgroups: list[Cgroup] | None = None) -> None:
        self.cgroups = cgroups or [Cgroup.create(), Cgroup.create()]
        self.a = Side(a, self.cgroups[0], "client", ca)
        self.b = Side(b, self.cgroups[1], "server", ca)
        self._lock = threading.Lock()

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.a, self.b

    def directory(self) -> list[Destination]:
        return [Destination(ip, s.spiffe_id) for s in self.sides for ip in (s.node.ip4, s.node.ip6)]

    def start(
        self,
        side: Side,
        *,
        capture_it: bool = True,
        policies: str | None = None,
        directory: list[Destination] | None = None,
        **cap_kw: Any,
    ) -> Side:
        t = Tunnel(
            identity=side.ca.issue_svid(side.spiffe_id),
            trust=side.ca.bundle,
            workload=side.workload,
            workers=1,
            policies=policies,
            access_log=False,
        )
        run_in_netns(side.node.path, t.start)  # worker threads dial from the node's netns
        t.set_directory(self.directory() if directory is None else directory)
        side.events = []

        def record(ev: Any) -> None:
            if isinstance(ev, ConnectionEvent):
                with self._lock:
                    side.events.append(ev)

        t.subscribe(record)
        side.tunnel = t
        if capture_it:
            side.capture = Capture(
                t, cgroup=side.cg.path, netns=side.node.path, name=side.name, **cap_kw
            )
        return side

    def stop(self, side: Side, *, disable: bool = True) -> None:
        """Stop a side's ztun: disable its capture (or, ``disable=False``, leave pinned
        programs behind: fail closed), then close its tunnel."""
        if side.capture is not None:
            if disable:
                side.capture.close()
            else:
                side.capture.release()
            side.capture = None
        if side.tunnel is not None:
            side.tunnel.close()
            side.tunnel = None

    def closes(self, side: Side) -> list[ConnectionEvent]:
        with self._lock:
            return [e for e in side.events if e.kind == "close"]

    def wait_close(
        self, side: Side, pred: Callable[[ConnectionEvent], bool], timeout: float = 10.0
    ) -> ConnectionEvent:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.closes(side):
                if pred(e):
                    return e
            time.sleep(0.05)
        raise AssertionError(f"no matching close event on {side.name}: {self.closes(side)}")

    def close(self) -> None:
        errors = []
        for s in self.sides:
            try:
                self.stop(s)
            except Exception as e:  # keep tearing down
                errors.append(e)
        for cg in self.cgroups:
            with contextlib.suppress(Exception):
                cg.remove()
        if errors:
            raise errors[0]


@pytest.fixture
def mesh(two_nodes: tuple[Node, Node], engine_cgroup: Cgroup, ca: SpiffeCA) -> Iterator[Mesh]:
    m = Mesh(two_nodes[0], two_nodes[1], ca)
    try:
        yield m
    finally:
        m.close()


@dataclass(frozen=True)
class EngineFeatures:
    inbound: bool  # FORWARD + ORIGINAL_DST connects to the original destination
    source: bool  # connections to apps are tagged with the client (ZTUN_SO_ORIGINAL_SRC)


@pytest.fixture(scope="session")
def engine(ca: SpiffeCA) -> EngineFeatures:
    """What this build's engine does for capture (docs/capture.md, 'Engine change'). Probed
    once: a plain server on a captured node, a plaintext client on the other."""
    from harness.netns import Topology

    _require_capture()
    with Topology(2, "probe") as topo:
        cg = Cgroup.create()
        try:
            cg.add()
            m = Mesh(topo[0], topo[1], ca)
            try:
                m.start(m.b)
                srv = m.b.server("sha-server", "18080")
                res = m.a.app("sha-client", m.b.node.ip4, "18080", "10", captured=False)
                srv.kill()
                srv.wait()
                ok = bool(res.get("ok"))
                return EngineFeatures(ok, ok and res.get("server_saw") == m.a.node.ip4)
            finally:
                m.close()
        finally:
            cg.remove()


def need_engine_inbound(engine: EngineFeatures) -> None:
    if not engine.inbound:
        pytest.fail(ENGINE_CHANGE)


def need_engine_source(engine: EngineFeatures) -> None:
    if not engine.source:
        pytest.fail(
            "the engine did not tag its connection to the app with the client "
            "(setsockopt ZTUN_CAPTURE_SO_ORIGINAL_SRC; docs/capture.md, 'Engine change')"
        )


@pytest.fixture
def pin_dir(bpf_pin_dir: str) -> str:
    """A pin directory for one test (under the harness's bpffs dir, removed after)."""
    return os.path.join(bpf_pin_dir, "capture")
