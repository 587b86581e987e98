"""Fixtures of the HBONE tests: one SPIFFE CA, identities for ztun and for the independent
peers (Node.js, h2, nghttpx) as files, started Tunnels that are closed after the test, and
the engine's log lines."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hbone.util import (
    OTHER,
    PEER,
    TD,
    ZTUN_CLIENT,
    ZTUN_SERVER,
    EventLog,
    LineHandler,
    PeerFiles,
    close_within,
)
from ztun import Tunnel
from ztun.testing import SpiffeCA, write_svid_files


@pytest.fixture(scope="session")
def ca() -> SpiffeCA:
    # With an intermediate: the peers must build and check a real chain.
    return SpiffeCA(TD, intermediate=True)


@pytest.fixture(scope="session")
def pki(ca: SpiffeCA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PeerFiles]:
    """Files for the peers: ``peer`` (PEER), ``other`` (OTHER, same CA), ``stranger`` (PEER's
    name from an unknown CA), ``ztun_client`` / ``ztun_server`` (ztun's own, for tools
    that impersonate nobody but need ztun's files, e.g. nghttpx's backend client cert)."""
    d = tmp_path_factory.mktemp("hbone-pki")
    bundle = str(ca.write_files(d, "ca.pem"))
    out = {}
    for name, sid in (
        ("peer", PEER),
        ("other", OTHER),
        ("ztun_client", ZTUN_CLIENT),
        ("ztun_server", ZTUN_SERVER),
    ):
        chain, key = write_svid_files(ca.issue_svid(sid), d, name)
        out[name] = PeerFiles(sid, str(chain), str(key), bundle)
    stranger = SpiffeCA(TD, _root_name="stranger root").issue_svid(PEER)
    chain, key = write_svid_files(stranger, d, "stranger")
    out["stranger"] = PeerFiles(PEER, str(chain), str(key), bundle)
    return out


@pytest.fixture
def make_tunnel(ca: SpiffeCA) -> Iterator[Callable[..., Tunnel]]:
    """``make_tunnel(spiffe_id, workers=1, **kw)`` -> a started Tunnel (closed after)."""
    made: list[Tunnel] = []

    def make(spiffe_id: str = ZTUN_CLIENT, workers: int = 1, **kw: Any) -> Tunnel:
        t = Tunnel(identity=ca.issue_svid(spiffe_id), trust=ca.bundle, workers=workers, **kw)
        made.append(t)
        return t.start()

    yield make
    hung = [t for t in made if not close_within(t, 20.0)]
    if hung:
        pytest.fail(
            f"Tunnel.close() did not return within 20 s for {hung} (an engine worker is stuck)"
        )


@pytest.fixture
def client_tunnel(make_tunnel: Callable[..., Tunnel]) -> Tunnel:
    return make_tunnel(ZTUN_CLIENT)


@pytest.fixture
def server_tunnel(make_tunnel: Callable[..., Tunnel]) -> Tunnel:
    return make_tunnel(ZTUN_SERVER)


@pytest.fixture
def engine_log() -> Iterator[EventLog]:
    """Engine log lines of every Tunnel in the test (``log.lines``, ``log.grep(text)``);
    subscribe a tunnel's events with ``t.subscribe(log)``."""
    log = EventLog()
    logger = logging.getLogger("ztun.engine")
    handler = LineHandler(log)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield log
    logger.removeHandler(handler)
    logger.setLevel(old)
