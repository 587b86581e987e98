"""Open file descriptor counts, and a bounded wait for them to return to a baseline."""

from __future__ import annotations

import os
import time


def fd_count(pid: int | None = None) -> int:
    """Number of open fds of ``pid`` (default: this process)."""
    n = len(os.listdir(f"/proc/{pid or 'self'}/fd"))
    # listing our own fds holds one more (the directory being read)
    return n - 1 if pid is None or pid == os.getpid() else n


def fd_targets(pid: int | None = None) -> dict[int, str]:
    """fd -> what it points to (for error messages)."""
    base = f"/proc/{pid or 'self'}/fd"
    out = {}
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(os.path.join(base, name))
        except OSError:
            continue
    return out


def wait_fds(baseline: int, pid: int | None = None, timeout: float = 10.0, slack: int = 0) -> int:
    """Wait until ``pid`` has at most ``baseline + slack`` fds; return the final count."""
    end = time.monotonic() + timeout
    while True:
        n = fd_count(pid)
        if n <= baseline + slack or time.monotonic() > end:
            return n
        time.sleep(0.05)


def assert_fds_return(
    baseline: int | dict[int, str], pid: int | None = None, timeout: float = 10.0, slack: int = 0
) -> None:
    """Assert that ``pid``'s fd count comes back to ``baseline`` (+slack) within ``timeout``.

    ``baseline`` may be a count or the dict from :func:`fd_targets` (better messages).
    """
    base_n = baseline if isinstance(baseline, int) else len(baseline)
    n = wait_fds(base_n, pid, timeout, slack)
    if n > base_n + slack:
        extra = ""
        if isinstance(baseline, dict):
            now = fd_targets(pid)
            new = {fd: t for fd, t in now.items() if baseline.get(fd) != t}
            extra = f"; new fds: {dict(list(new.items())[:20])}"
        raise AssertionError(f"fds of {pid or 'self'}: {n}, baseline {base_n} (+{slack}){extra}")


class FdTracker:
    """``with FdTracker() as t: ...`` asserts on exit that the fd count came back."""

    def __init__(self, pid: int | None = None, timeout: float = 10.0, slack: int = 0) -> None:
        self.pid, self.timeout, self.slack = pid, timeout, slack
        self.baseline: dict[int, str] = {}

    def __enter__(self) -> FdTracker:
        self.baseline = fd_targets(self.pid)
        return self

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        if et is None:
            assert_fds_return(self.baseline, self.pid, self.timeout, self.slack)
