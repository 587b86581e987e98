"""Fixtures of the eBPF tests: root + BPF check (fail under CI=true, skip elsewhere), a child
cgroup per test holding the test process and everything it starts, the ztrelay helper
compiled against the installed libztun_bpf.so, and process/bpftool helpers."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bpf_util import Procs, cgroup_tree_ztun, wait_gone, ztun_objects

from ztun import bpf

ROOT = Path(__file__).resolve().parents[2]
_seq = itertools.count()


def _require_bpf() -> None:
    ok, why = bpf.available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"eBPF tests cannot run under CI: {why}")
        pytest.skip(f"needs eBPF: {why}")


@pytest.fixture(autouse=True)
def _bpf_ready() -> None:
    _require_bpf()


@pytest.fixture(scope="package", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """After all eBPF tests (the engine's included): every ztun_* program, map and link they
    created is gone (bpftool prog/map/link list), none is attached anywhere in the cgroup
    tree, and no test cgroup is left. (Objects that existed before are another run's.)"""
    ok, _ = bpf.available()
    before = ztun_objects() if ok else {}
    attached_before = cgroup_tree_ztun() if ok else set()
    yield
    if not ok:
        return
    now = ztun_objects()
    left = wait_gone({k: now[k] - before[k] for k in now}, timeout=10.0)
    cg_left = [p.name for p in bpf.cgroup2_root().glob(f"ztun-test-{os.getpid()}-*")]
    attached = cgroup_tree_ztun() - attached_before
    assert not any(left.values()) and not cg_left and not attached, (
        f"left behind: {left}, cgroups {cg_left}, attached {attached}"
    )


@pytest.fixture
def joined_cgroup() -> Iterator[Path]:
    """A fresh child cgroup v2 holding this test process (and so its children); the process
    goes back to where it was and the directory is removed afterwards, even on failure."""
    origin = bpf.own_cgroup()
    cg = bpf.Cgroup(f"ztun-test-{os.getpid()}-{next(_seq)}")
    try:
        cg.add()
        yield cg.path
    finally:
        (origin / "cgroup.procs").write_text(str(os.getpid()))
        for pid in cg.pids():  # stragglers of this test: put them where we are
            with contextlib.suppress(OSError):  # exited meanwhile
                (origin / "cgroup.procs").write_text(str(pid))
        cg.path.rmdir()


@pytest.fixture
def procs() -> Iterator[Procs]:
    ps = Procs()
    try:
        yield ps
    finally:
        ps.close()


@pytest.fixture(scope="session")
def ztrelay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/bpf/ztrelay.c built against the installed libztun_bpf.so."""
    _require_bpf()
    from ztun import _bpf

    libdir = Path(_bpf.__file__).parent
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.fail("no C compiler to build tests/bpf/ztrelay.c")
    out = tmp_path_factory.mktemp("ztrelay") / "ztrelay"
    subprocess.run(
        [
            cc,
            "-O2",
            "-g",
            "-pthread",
            str(ROOT / "tests/bpf/ztrelay.c"),
            f"-I{ROOT / 'src/include'}",
            f"-L{libdir}",
            "-lztun_bpf",
            f"-Wl,-rpath,{libdir}",
            "-o",
            str(out),
        ],
        check=True,
    )
    return out
