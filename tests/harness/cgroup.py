"""A child cgroup v2 per test.

cgroup2 is found in /proc/self/mountinfo (on this machine it is /sys/fs/cgroup/unified, beside
the v1 controllers). Each :class:`Cgroup` is ``<mount>/ztt-<pid hex>-<n>``; ``remove()`` moves
this test process back to where it was (if the test moved itself in), kills every other process
left inside, waits for it to empty, and removes the directory (children first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from types import TracebackType

from harness.netns import owner_pid, pid_alive, unique_name

log = logging.getLogger(__name__)


def mounts(fstype: str) -> list[str]:
    """Mount points of a filesystem type, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == fstype:
                out.append(left.split()[4].replace("\\040", " "))
    return out


def cgroup2_mount() -> str | None:
    m = mounts("cgroup2")
    return m[0] if m else None


def current_cgroup(pid: int | str = "self") -> str:
    """The cgroup v2 path (relative to the mount, starting with '/') of ``pid``."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise RuntimeError(f"no cgroup v2 entry in /proc/{pid}/cgroup")


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class Cgroup:
    """A cgroup v2 directory that this test owns."""

    def __init__(self, path: str, parent: Cgroup | None = None) -> None:
        self.path = path
        self.parent = parent
        self._children: list[Cgroup] = []
        self._moved_self_from: str | None = None

    @classmethod
    def create(cls, name: str | None = None, root: str | None = None) -> Cgroup:
        """Create ``<cgroup2 mount>/<name>`` (default name: unique ztt-<pid>-<n>)."""
        root = root or cgroup2_mount()
        if root is None:
            raise RuntimeError("no cgroup2 mount in /proc/self/mountinfo")
        path = os.path.join(root, name or unique_name())
        os.mkdir(path)
        return cls(path)

    def __repr__(self) -> str:
        return f"Cgroup({self.path!r})"

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def rel(self) -> str:
        """Path relative to the cgroup2 mount, as /proc/<pid>/cgroup shows it."""
        root = cgroup2_mount() or ""
        return "/" + os.path.relpath(self.path, root)

    def fd(self) -> int:
        """An O_RDONLY fd of the directory (what BPF cgroup attach needs); caller closes it."""
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def child(self, name: str) -> Cgroup:
        c = Cgroup(os.path.join(self.path, name), self)
        os.mkdir(c.path)
        self._children.append(c)
        return c

    def add(self, pid: int | None = None) -> None:
        """Move process ``pid`` (default: this process) into this cgroup."""
        if pid is None or pid == os.getpid():
            if self._moved_self_from is None:
                self._moved_self_from = current_cgroup()
            pid = os.getpid()
        _write(os.path.join(self.path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]

    def __contains__(self, pid: int) -> bool:
        return current_cgroup(pid) == self.rel

    def _empty(self, timeout: float) -> None:
        root = cgroup2_mount() or ""
        me = os.getpid()
        if me in self.pids():
            back = self._moved_self_from or "/"
            _write(os.path.join(root, back.lstrip("/"), "cgroup.procs"), str(me))
        end = time.monotonic() + timeout
        while True:
            left = [p for p in self.pids() if p != me]
            if not left:
                return
            kill_file = os.path.join(self.path, "cgroup.kill")
            if os.path.exists(kill_file):
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
            for p in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            if time.monotonic() > end:
                raise RuntimeError(f"{self.path}: processes {left} would not die")
            time.sleep(0.02)

    def remove(self, timeout: float = 10.0) -> None:
        """Empty (kill or move out) and remove this cgroup and its children. Idempotent."""
        for c in self._children:
            c.remove(timeout)
        self._children = []
        if not os.path.isdir(self.path):
            return
        # children this test did not create itself (e.g. made by code under test)
        for entry in os.scandir(self.path):
            if entry.is_dir():
                Cgroup(entry.path, self).remove(timeout)
        self._empty(timeout)
        end = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return
            except OSError:
                # a killed process leaves the cgroup only once it has been reaped
                if time.monotonic() > end:
                    raise
                time.sleep(0.02)

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def list_ours(root: str | None = None) -> list[str]:
    root = root or cgroup2_mount()
    if root is None:
        return []
    return sorted(n for n in os.listdir(root) if n.startswith("ztt-"))


def cleanup_stale(root: str | None = None) -> list[str]:
    """Remove ``ztt-*`` cgroups of dead processes (killing what is left inside)."""
    root = root or cgroup2_mount()
    removed = []
    for name in list_ours(root):
        pid = owner_pid(name)
        if pid is not None and not pid_alive(pid):
            try:
                Cgroup(os.path.join(root, name)).remove(5)  # type: ignore[arg-type]
                removed.append(name)
            except Exception as e:
                log.warning("stale cgroup %s: %r", name, e)
    return removed
