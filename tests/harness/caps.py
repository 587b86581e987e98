"""Capability checks for tests that need root, network namespaces, cgroup v2 or bpffs.

A missing capability skips the test with a clear reason, except under ``CI=true`` where the
pytest hook in :mod:`harness.plugin` turns that skip into a failure: CI must never pass by
silently not running the privileged tests.

``ZTUN_HARNESS_DENY=root,netns,...`` pretends capabilities are missing (only used to test the
hook itself on a machine where everything is available).
"""

from __future__ import annotations

import os
import shutil

import pytest

# Names accepted by require() and ZTUN_HARNESS_DENY.
CAPABILITIES = ("root", "netns", "cgroup2", "bpffs", "bpf")


class MissingCapability(pytest.skip.Exception):  # type: ignore[misc,name-defined]
    """A skip caused by a missing privilege or kernel feature (a failure under CI=true)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _denied() -> set[str]:
    return {c.strip() for c in os.environ.get("ZTUN_HARNESS_DENY", "").split(",") if c.strip()}


def missing(cap: str) -> str | None:
    """Why ``cap`` is unavailable, or None when it is available."""
    if cap not in CAPABILITIES:
        raise ValueError(f"unknown capability {cap!r}; known: {', '.join(CAPABILITIES)}")
    if cap in _denied():
        return f"{cap} denied by ZTUN_HARNESS_DENY"
    if cap == "root":
        return None if os.geteuid() == 0 else "needs root (euid 0)"
    if cap == "netns":
        why = missing("root")
        if why:
            return f"network namespaces: {why}"
        if not os.path.exists("/proc/self/ns/net"):
            return "network namespaces: kernel without CONFIG_NET_NS"
        return None
    if cap == "cgroup2":
        from harness.cgroup import cgroup2_mount

        why = missing("root")
        if why:
            return f"cgroup v2: {why}"
        mnt = cgroup2_mount()
        if mnt is None:
            return "cgroup v2: no cgroup2 mount in /proc/self/mountinfo"
        if not os.access(mnt, os.W_OK):
            return f"cgroup v2: {mnt} is not writable"
        return None
    if cap == "bpffs":
        from harness.bpffs import bpffs_mount

        why = missing("root")
        if why:
            return f"bpffs: {why}"
        if bpffs_mount() is None and not os.path.isdir("/sys/fs/bpf"):
            return "bpffs: not mounted and /sys/fs/bpf does not exist"
        return None
    # "bpf": loading programs needs root, cgroup v2, bpffs and kernel BTF (CO-RE)
    for sub in ("root", "cgroup2", "bpffs"):
        why = missing(sub)
        if why:
            return f"bpf: {why}"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "bpf: no kernel BTF (/sys/kernel/btf/vmlinux)"
    return None


def require(*caps: str) -> None:
    """Skip the running test (fail under CI=true, via the plugin hook) unless all ``caps`` exist."""
    for cap in caps:
        why = missing(cap)
        if why:
            raise MissingCapability(why)


def require_tool(name: str) -> str:
    """Path of an executable, or a MissingCapability skip naming it."""
    path = shutil.which(name)
    if path is None:
        raise MissingCapability(f"needs the {name!r} executable on PATH")
    return path
