"""Drive the Node.js http2 peers (tests/hbone/js/*.js) over JSON lines.

``NodePeer`` starts ``node <script> <args>``, reads one JSON event per stdout line on a
thread, and lets the test send commands (``peer.send(op=..., ...)``) and wait for events
(``peer.wait("response", n=1)``). Events are kept (not consumed) so a test can look at
everything the peer saw afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
Event = dict[str, Any]


def node_binary() -> str:
    path = shutil.which("node")
    if path is None:
        raise RuntimeError("node is not installed (make system installs nodejs)")
    return path


class NodePeer:
    def __init__(self, script: str, args: Sequence[str], argv_prefix: Sequence[str] = ()) -> None:
        self.argv = [*argv_prefix, node_binary(), os.path.join(PEERS, script), *args]
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.events: list[Event] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read_out, daemon=True, name=f"node-{script}-out"),
            threading.Thread(target=self._read_err, daemon=True, name=f"node-{script}-err"),
        ]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"ev": "garbage", "line": line}
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"ev": "exit"})
            self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def find(self, ev: str, **match: Any) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.get("ev") == ev and _matches(e, match)]

    def wait(self, ev: str, timeout: float = 10.0, **match: Any) -> Event:
        """The first event named ``ev`` whose fields equal ``match`` (waits for it)."""
        return self.wait_for(lambda e: e.get("ev") == ev and _matches(e, match), timeout, ev)

    def wait_for(self, pred: Callable[[Event], bool], timeout: float, what: str = "") -> Event:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                left = end - time.monotonic()
                if left <= 0 or (self.events and self.events[-1].get("ev") == "exit"):
                    raise AssertionError(
                        f"node peer: no {what or 'matching'} event in {timeout} s; events: "
                        f"{self.events[-20:]}; stderr: {''.join(self.stderr)[-2000:]}"
                    )
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for t in self._threads:
            t.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()

    def __enter__(self) -> NodePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _matches(e: Event, match: dict[str, Any]) -> bool:
    return all(e.get(k) == v for k, v in match.items())
