"""bpffs: mount it at /sys/fs/bpf when missing (it is not mounted on a fresh machine here);
unmount only what we mounted, and only if nobody else left pins in it."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
from types import TracebackType

from harness.cgroup import mounts
from harness.netns import owner_pid, pid_alive, unique_name

log = logging.getLogger(__name__)
BPF_FS_MAGIC = 0xCAFE4A11
DEFAULT = "/sys/fs/bpf"
_libc = ctypes.CDLL(None, use_errno=True)
# entries the kernel itself puts in every new bpffs (bpf_preload iterators)
KERNEL_ENTRIES = frozenset({"maps.debug", "progs.debug"})


def bpffs_mount() -> str | None:
    m = mounts("bpf")
    return DEFAULT if DEFAULT in m else (m[0] if m else None)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


class Bpffs:
    """Ensures a bpffs mount; ``release()`` unmounts it if we mounted it and it is empty."""

    def __init__(self, path: str = DEFAULT) -> None:
        existing = bpffs_mount()
        self.mounted_by_us = False
        if existing is not None:
            self.path = existing
            return
        self.path = path
        os.makedirs(path, exist_ok=True)
        _check(_libc.mount(b"bpf", path.encode(), b"bpf", 0, None), f"mount bpf {path}")
        self.mounted_by_us = True
        log.info("mounted bpffs at %s", path)

    def pin_dir(self, name: str | None = None) -> str:
        """A fresh directory for pins (``ztt-<pid>-<n>``); remove it with :meth:`remove_dir`."""
        d = os.path.join(self.path, name or unique_name())
        os.mkdir(d)
        return d

    @staticmethod
    def remove_dir(d: str) -> None:
        # pins are unlinked like files; directories need rmdir (shutil handles both)
        shutil.rmtree(d, ignore_errors=True)
        if os.path.exists(d):
            raise RuntimeError(f"could not remove bpffs dir {d}")

    def release(self) -> None:
        if not self.mounted_by_us:
            return
        left = [n for n in os.listdir(self.path) if n not in KERNEL_ENTRIES]
        if left:
            log.warning("bpffs %s still holds %s: leaving it mounted", self.path, left)
            return
        _check(_libc.umount2(self.path.encode(), 0), f"umount {self.path}")
        self.mounted_by_us = False

    def __enter__(self) -> Bpffs:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def is_bpffs(path: str) -> bool:
    """True when ``path`` is on a bpffs (statfs f_type == BPF_FS_MAGIC)."""

    class Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    st = Statfs()
    _check(_libc.statfs(path.encode(), ctypes.byref(st)), f"statfs {path}")
    return (st.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def cleanup_stale() -> list[str]:
    """Remove ``ztt-*`` pin directories of dead processes."""
    path = bpffs_mount()
    removed: list[str] = []
    if path is None:
        return removed
    for name in os.listdir(path):
        pid = owner_pid(name)
        if pid is not None and not pid_alive(pid):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
            removed.append(name)
    return removed
