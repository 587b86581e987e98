"""Fixtures of the capture tests. They live in ``capture_rig`` (a unique module name: several
test directories have a ``conftest`` module, so ``from conftest import`` would be ambiguous)."""

from __future__ import annotations

from capture_rig import (  # noqa: F401
    _capture_ready,
    _nothing_left_behind,
    ca,
    engine,
    engine_cgroup,
    mesh,
    pin_dir,
)
