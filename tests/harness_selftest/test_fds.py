from __future__ import annotations

import socket

import pytest
from harness.fds import FdTracker, assert_fds_return, fd_count, fd_targets


def test_tracker_passes_when_fds_come_back():
    with FdTracker(timeout=1):
        s = socket.socket()
        s.close()


def test_tracker_catches_a_leak():
    leaked = []
    with pytest.raises(AssertionError, match="socket:"), FdTracker(timeout=0.3):
        leaked.append(socket.socket())
    leaked[0].close()


def test_counts_other_processes_and_waits():
    base = fd_count()
    s = socket.socket()
    assert fd_count() == base + 1
    assert len(fd_targets()) == base + 1
    s.close()
    assert_fds_return(base, timeout=1)
