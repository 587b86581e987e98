"""Shared pytest configuration: harness hooks and fixtures (see tests/harness/)."""

from __future__ import annotations

from harness.fixtures import (
    bpf_pin_dir,
    bpffs,
    cgroup,
    echo_server,
    make_nodes,
    make_server,
    sink_server,
    test_ca,
    transform_server,
    two_nodes,
)
from harness.plugin import (
    pytest_configure,
    pytest_runtest_makereport,
    pytest_runtest_setup,
)

pytest_plugins = ["pytester"]

__all__ = [
    "bpf_pin_dir",
    "bpffs",
    "cgroup",
    "echo_server",
    "make_nodes",
    "make_server",
    "pytest_configure",
    "pytest_runtest_makereport",
    "pytest_runtest_setup",
    "sink_server",
    "test_ca",
    "transform_server",
    "two_nodes",
]
