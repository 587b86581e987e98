from __future__ import annotations

import os
import subprocess

import pytest
from harness import bpffs as hb
from harness import cgroup as hc

pytestmark = pytest.mark.needs_root


def test_cgroup2_is_found():
    mnt = hc.cgroup2_mount()
    assert mnt is not None
    assert os.path.exists(os.path.join(mnt, "cgroup.procs"))


def test_child_cgroup_holds_a_process_and_is_removed(cgroup):
    p = subprocess.Popen(["sleep", "60"])
    try:
        cgroup.add(p.pid)
        assert cgroup.pids() == [p.pid]
        assert p.pid in cgroup
        assert hc.current_cgroup(p.pid) == cgroup.rel
        sub = cgroup.child("inner")
        q = subprocess.Popen(["sleep", "60"])
        sub.add(q.pid)
        cgroup.remove()
        assert not os.path.exists(cgroup.path)
        assert p.wait(5) is not None and q.wait(5) is not None  # killed
    finally:
        for x in (p,):
            if x.poll() is None:
                x.kill()


def test_moving_this_process_in_and_back_out():
    home = hc.current_cgroup()
    with hc.Cgroup.create() as cg:
        cg.add()  # this test process: children inherit the cgroup
        assert hc.current_cgroup() == cg.rel
        child = subprocess.run(
            ["cat", "/proc/self/cgroup"], check=True, capture_output=True, text=True
        )
        assert f"0::{cg.rel}" in child.stdout
    assert hc.current_cgroup() == home
    assert not os.path.exists(cg.path)


def test_stale_cgroups_of_dead_runs_are_removed():
    p = subprocess.Popen(["true"])
    p.wait()
    path = os.path.join(hc.cgroup2_mount(), f"ztt-{p.pid:x}-9")
    os.mkdir(path)
    assert os.path.basename(path) in hc.cleanup_stale()
    assert not os.path.exists(path)


def test_bpffs_is_mounted_and_pin_dir_removed(bpffs, bpf_pin_dir):
    assert hb.bpffs_mount() == bpffs.path
    assert hb.is_bpffs(bpffs.path)
    assert os.path.isdir(bpf_pin_dir)
    assert os.path.dirname(bpf_pin_dir) == bpffs.path


def test_bpffs_mount_and_unmount_only_ours(tmp_path):
    """Mount a private bpffs on a temporary directory; unmount it; leave others alone."""
    target = str(tmp_path / "bpf")
    existing = hb.bpffs_mount()
    fs = hb.Bpffs.__new__(hb.Bpffs)
    fs.path, fs.mounted_by_us = target, False
    os.makedirs(target)
    hb._check(hb._libc.mount(b"bpf", target.encode(), b"bpf", 0, None), "mount")
    fs.mounted_by_us = True
    assert hb.is_bpffs(target)
    d = fs.pin_dir()
    fs.release()  # not empty: stays mounted
    assert hb.is_bpffs(target)
    fs.remove_dir(d)
    fs.release()
    assert not hb.is_bpffs(target)
    assert hb.bpffs_mount() == existing
    # one that we did not mount is never unmounted
    if existing is not None:
        other = hb.Bpffs()
        assert not other.mounted_by_us
        other.release()
        assert hb.bpffs_mount() == existing
