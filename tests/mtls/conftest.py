"""Fixtures for the mTLS suite: a test CA, tunnels that are always closed, log capture."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from mtlskit import (
    CLIENT_ID,
    SERVER_ID,
    Env,
    Events,
    LogCapture,
    ThreadServer,
    echo_handler,
)

from ztun import Svid, TrustBundle, Tunnel
from ztun.testing import SpiffeCA


@pytest.fixture(scope="session")
def ca() -> SpiffeCA:
    return SpiffeCA("example.org")


@pytest.fixture(scope="session")
def server_svid(ca: SpiffeCA) -> Svid:
    return ca.issue_svid(SERVER_ID)


@pytest.fixture(scope="session")
def client_svid(ca: SpiffeCA) -> Svid:
    return ca.issue_svid(CLIENT_ID)


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    cap = LogCapture().attach()
    try:
        yield cap
    finally:
        cap.detach()


@pytest.fixture
def echo() -> Iterator[ThreadServer]:
    with ThreadServer(echo_handler) as srv:
        yield srv


@pytest.fixture
def env(
    ca: SpiffeCA, server_svid: Svid, client_svid: Svid, logs: LogCapture, echo: ThreadServer
) -> Iterator[Env]:
    """The usual test bench; tunnels made with ``env.tunnel(...)`` are closed afterwards.

    Tunnels get one worker by default, so the events of a connection come in order.
    """
    made: list[Tunnel] = []

    def tunnel(identity: Any, trust: TrustBundle | None = None, **kw: Any) -> tuple[Tunnel, Events]:
        kw.setdefault("workers", 1)
        t = Tunnel(identity=identity, trust=trust, **kw)
        made.append(t)
        t.start()
        return t, Events(t)

    yield Env(ca, server_svid, client_svid, logs, echo, tunnel)
    for t in made:
        t.close()
