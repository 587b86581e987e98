"""Shared helpers of the HBONE tests: identities, counters, waiting, fds, memory."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ztun import Tunnel
from ztun.events import ConnectionEvent

TD = "example.org"
ZTUN_CLIENT = f"spiffe://{TD}/ns/ztun/sa/client"
ZTUN_SERVER = f"spiffe://{TD}/ns/ztun/sa/server"
PEER = f"spiffe://{TD}/ns/peer/sa/independent"
OTHER = f"spiffe://{TD}/ns/peer/sa/someone-else"


@dataclass(frozen=True)
class PeerFiles:
    """PEM files an independent peer loads: its chain and key, and the trust root."""

    spiffe_id: str
    chain: str
    key: str
    ca: str

    def node_args(self) -> list[str]:
        return ["--cert", self.chain, "--key", self.key, "--ca", self.ca]


class EventLog:
    """Connection events of a Tunnel (``subscribe``) and engine log lines (``ztun.engine``)."""

    def __init__(self) -> None:
        self.events: list[ConnectionEvent] = []
        self.lines: list[str] = []
        self.records: list[tuple[int, str]] = []  # (logging level, message)

    def __call__(self, ev: ConnectionEvent) -> None:
        self.events.append(ev)

    def closes(self) -> list[ConnectionEvent]:
        return [e for e in self.events if e.kind == "close"]

    def grep(self, text: str) -> list[str]:
        return [m for m in self.lines if text in m]


class LineHandler(logging.Handler):
    def __init__(self, log: EventLog) -> None:
        super().__init__(logging.DEBUG)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.log.records.append((record.levelno, msg))
        self.log.lines.append(msg)


def close_within(t: Tunnel, timeout: float) -> bool:
    """Close ``t`` on a helper thread; False if that did not finish in time (a stuck engine
    worker must fail the test, not hang the whole run)."""
    th = threading.Thread(target=t.close, daemon=True, name="tunnel-close")
    th.start()
    th.join(timeout)
    return not th.is_alive()


def stats(t: Tunnel) -> dict[str, Any]:
    """The engine's raw counters (hbone_* included)."""
    return t._require_engine().stats()


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or pred}")
        time.sleep(0.01)


def wait_stat(t: Tunnel, path: str, at_least: int, timeout: float = 10.0) -> int:
    """Wait until ``stats(t)[a][b]... >= at_least`` (path "a.b")."""

    def get() -> int:
        v: Any = stats(t)
        for k in path.split("."):
            v = v[int(k) if k.isdigit() else k]
        return int(v)

    wait_until(lambda: get() >= at_least, timeout, f"{path} >= {at_least} (now {get()})")
    return get()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def no_fd_leak(slack: int = 0, timeout: float = 10.0) -> Iterator[None]:
    from harness.fds import FdTracker

    with FdTracker(timeout=timeout, slack=slack):
        yield
