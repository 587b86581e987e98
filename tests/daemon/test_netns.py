"""ztun.netns: sockets and threads inside another network namespace."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest
from harness.caps import require

from ztun.netns import (
    NetnsError,
    check_netns,
    current_netns_inode,
    listen_in_netns,
    netns_inode,
    run_in_netns,
)

pytestmark = pytest.mark.needs_root


@pytest.fixture
def ns() -> Iterator[str]:
    require("netns")
    from pyroute2 import NetNS, netns

    name = f"ztd-{os.getpid():x}-nstest-{uuid.uuid4().hex[:6]}"
    netns.create(name)
    try:
        with NetNS(name) as n:
            n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
        yield f"/run/netns/{name}"
    finally:
        netns.remove(name)


def test_run_in_netns_runs_there_and_returns(ns: str) -> None:
    assert run_in_netns(ns, current_netns_inode) == netns_inode(ns)
    assert current_netns_inode() != netns_inode(ns)  # the caller never moved
    with pytest.raises(ZeroDivisionError):
        run_in_netns(ns, lambda: 1 / 0)


def test_listen_in_netns_keeps_its_namespace(ns: str) -> None:
    srv = listen_in_netns(ns, ("127.0.0.1", 0))
    port = srv.getsockname()[1]
    # reachable from inside the namespace, from a thread there ...
    c = run_in_netns(ns, socket.create_connection, ("127.0.0.1", port), 5)
    conn, _ = srv.accept()  # ... and served from this thread, outside it
    c.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    for s in (c, conn, srv):
        s.close()


def test_errors(ns: str, tmp_path: object) -> None:
    assert check_netns(ns) is None
    assert check_netns("/run/netns/ztun-no-such-ns") == "no such network namespace"
    assert "not a network namespace" in (check_netns("/etc/hostname") or "")
    with pytest.raises(NetnsError, match="ztun-no-such-ns"):
        run_in_netns("/run/netns/ztun-no-such-ns", lambda: None)
    with pytest.raises(NetnsError, match="not a network namespace"):
        run_in_netns("/etc/hostname", lambda: None)
