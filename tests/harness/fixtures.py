"""pytest fixtures of the harness (re-exported by tests/conftest.py).

Privileged fixtures call :func:`harness.caps.require` first: they skip with a reason when
the machine cannot run them, and fail under CI=true.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from harness import bpffs as _bpffs
from harness import cgroup as _cgroup
from harness import netns as _netns
from harness.caps import require
from harness.certs import TestCA
from harness.servers import EchoServer, SinkServer, TcpServer, TransformServer

SERVER_KINDS: dict[str, type[TcpServer]] = {
    "echo": EchoServer,
    "sink": SinkServer,
    "transform": TransformServer,
}

_stale_done: set[str] = set()


def _cleanup_stale_once() -> None:
    """Remove leftovers of killed runs (dead owner pid) once per session."""
    if _stale_done:
        return
    _stale_done.add("done")
    _netns.cleanup_stale()
    if _cgroup.cgroup2_mount():
        _cgroup.cleanup_stale()
    _bpffs.cleanup_stale()


@pytest.fixture
def make_nodes() -> Iterator[Callable[..., _netns.Topology]]:
    """Factory: ``make_nodes(n=2) -> Topology`` (``topo.nodes``, ``topo[0]``).

    Everything is removed at teardown, also when the test failed."""
    require("netns")
    _cleanup_stale_once()
    topos: list[_netns.Topology] = []

    def make(n: int = 2, tag: str = "") -> _netns.Topology:
        t = _netns.Topology(n, tag)
        topos.append(t)
        return t

    yield make
    errors = []
    for t in topos:
        try:
            t.close()
        except Exception as e:
            errors.append(e)
    if errors:
        raise RuntimeError(f"netns teardown: {errors}")


@pytest.fixture
def two_nodes(make_nodes: Callable[..., _netns.Topology]) -> tuple[_netns.Node, _netns.Node]:
    """Two nodes (198.18.0.1 / fd00:198:18::1 and .2 / ::2) joined by a veth pair."""
    t = make_nodes(2)
    return t.nodes[0], t.nodes[1]


@pytest.fixture
def cgroup() -> Iterator[_cgroup.Cgroup]:
    """A fresh child cgroup v2 (``.add(pid)``, ``.child(name)``, ``.fd()``); removed after."""
    require("cgroup2")
    _cleanup_stale_once()
    cg = _cgroup.Cgroup.create()
    yield cg
    cg.remove()


@pytest.fixture(scope="session")
def bpffs() -> Iterator[_bpffs.Bpffs]:
    """bpffs, mounted at /sys/fs/bpf if it was not; unmounted at the end if we mounted it."""
    require("bpffs")
    _cleanup_stale_once()
    fs = _bpffs.Bpffs()
    yield fs
    fs.release()


@pytest.fixture
def bpf_pin_dir(bpffs: _bpffs.Bpffs) -> Iterator[str]:
    """A fresh directory on bpffs for pins; removed (with its pins) after the test."""
    d = bpffs.pin_dir()
    yield d
    bpffs.remove_dir(d)


@pytest.fixture
def make_server() -> Iterator[Callable[..., Any]]:
    """Factory: ``make_server(kind="echo"|"sink"|"transform", host="127.0.0.1", port=0,
    sock=None)`` -> a started server (``.address``, ``.accepted``); stopped after the test."""
    servers: list[TcpServer] = []

    def make(kind: str = "echo", host: str = "127.0.0.1", port: int = 0, **kw: Any) -> Any:
        srv = SERVER_KINDS[kind](host, port, **kw)
        servers.append(srv)
        return srv.start()

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def echo_server(make_server: Callable[..., EchoServer]) -> EchoServer:
    return make_server("echo")


@pytest.fixture
def sink_server(make_server: Callable[..., SinkServer]) -> SinkServer:
    return make_server("sink")


@pytest.fixture
def transform_server(make_server: Callable[..., TransformServer]) -> TransformServer:
    return make_server("transform")


def ipv6_loopback_available() -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return True
    return False


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A throwaway CA (ECDSA P-256); ``test_ca.issue(name, spiffe_id)`` -> Leaf files."""
    return TestCA(str(tmp_path_factory.mktemp("ca")))
