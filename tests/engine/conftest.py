"""Fixtures of the engine tests (tests/engine): a started Tunnel, closed after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ztun import Tunnel


@pytest.fixture
def make_tunnel() -> Iterator[Callable[..., Tunnel]]:
    """Factory: ``make_tunnel(**Tunnel kwargs)`` -> a started Tunnel, closed at teardown."""
    made: list[Tunnel] = []

    def make(**kw: Any) -> Tunnel:
        kw.setdefault("workers", 2)
        t = Tunnel(**kw).start()
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture
def tunnel(make_tunnel: Callable[..., Tunnel]) -> Tunnel:
    """A started plaintext Tunnel with two workers."""
    return make_tunnel()
