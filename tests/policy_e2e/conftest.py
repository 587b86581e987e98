from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness.netns import Node

from policy_e2e.kit import LogCapture, Mesh, mesh_of


@pytest.fixture
def mesh(two_nodes: tuple[Node, Node]) -> Iterator[Mesh]:
    with mesh_of(two_nodes) as m:
        yield m


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    with LogCapture() as cap:
        yield cap
