"""Privileged tests skip with a reason, except under CI=true where they must fail."""

from __future__ import annotations

import os

import pytest

TESTS = """
import pytest
from harness.caps import require

@pytest.fixture
def needs_netns():
    require("netns")
    return 1

@pytest.mark.needs_root
def test_marked():
    pass

def test_fixture(needs_netns):
    pass

def test_plain_skip():
    pytest.skip("an ordinary skip")

def test_ok():
    pass
"""

CONFTEST = (
    "from harness.plugin import pytest_configure, pytest_runtest_makereport, pytest_runtest_setup\n"
)


@pytest.fixture
def tiny(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_tiny=TESTS)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("ZTUN_HARNESS_DENY", "root,netns")
    return pytester


def test_missing_capability_skips_outside_ci(tiny, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    r = tiny.runpytest_subprocess("-rs", "-p", "no:randomly", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=1, skipped=3)
    r.stdout.fnmatch_lines(["*root denied by ZTUN_HARNESS_DENY*", "*netns*denied*"])


def test_missing_capability_fails_under_ci(tiny, monkeypatch):
    monkeypatch.setenv("CI", "true")
    r = tiny.runpytest_subprocess("-rs", "-p", "no:randomly", "-p", "no:cacheprovider")
    # the ordinary skip stays a skip; the two privileged ones fail
    # (a failure during setup is reported as an error)
    r.assert_outcomes(passed=1, skipped=1, errors=2)
    r.stdout.fnmatch_lines(["*CI=true: this test needs privileges*"])
    assert r.ret != 0


def test_everything_runs_when_available(tiny, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to show the privileged tests running")
    monkeypatch.setenv("ZTUN_HARNESS_DENY", "")
    monkeypatch.setenv("CI", "true")
    r = tiny.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=3, skipped=1)
