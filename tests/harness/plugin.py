"""pytest hooks of the harness (imported by tests/conftest.py and bench/conftest.py).

* A test marked ``needs_root`` needs root; ``needs_bpf`` needs root, cgroup v2, bpffs and
  kernel BTF. Missing ones skip the test with the reason.
* Under ``CI=true`` such a skip is a FAILURE: any skip raised by a missing capability
  (:class:`harness.caps.MissingCapability`, e.g. from the netns/cgroup/bpffs fixtures) and any
  skip of a test marked needs_root/needs_bpf. Other skips stay skips.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from harness.caps import MissingCapability, in_ci, require

MARKERS = {
    "needs_root": ("root",),
    "needs_bpf": ("bpf",),
}


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "needs_root: needs root (network namespaces, cgroups, bpffs)",
        "needs_bpf: needs BPF program loading (root, cgroup v2, bpffs)",
        "slow: takes more than a few seconds",
    ):
        config.addinivalue_line("markers", line)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, caps in MARKERS.items():
        if item.get_closest_marker(marker) is not None:
            require(*caps)


def _privileged(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(m) is not None for m in MARKERS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[Any]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    if not (rep.skipped and in_ci()) or hasattr(rep, "wasxfail"):
        return rep
    capability = call.excinfo is not None and call.excinfo.errisinstance(MissingCapability)
    if capability or _privileged(item):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (
            f"CI=true: this test needs privileges or kernel features and may not skip: {reason}"
        )
    return rep
