"""Load, attach, detach, crash and cleanup: nothing of ztun's is left behind.

Each test works on its own child cgroup and checks the objects it created (other test runs
may load ztun programs on this host at the same time, so "no ztun_* anywhere" would be a
flaky check; the objects attached to the test's cgroup and everything sharing their maps
are exactly ours)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from bpf_util import KERNEL_FLAKY, Procs, bpftool_json, cgroup_attachments, free_port, wait_gone
from engine_rig import Maps

from ztun import bpf
from ztun.errors import BpfError

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]


def ours(cg: Path) -> dict[str, set[int]]:
    """Programs attached to cg, plus every ztun_* program sharing a map with them, their
    maps, and the links of those programs."""
    attached = {int(str(a["id"])) for a in cgroup_attachments(cg)}
    progs = [p for p in bpftool_json("prog", "show") if str(p.get("name", "")).startswith("ztun_")]
    maps: set[int] = set()
    for p in progs:
        if p["id"] in attached:
            maps |= {int(m) for m in p.get("map_ids", [])}  # type: ignore[attr-defined]
    ids = {
        int(str(p["id"])) for p in progs if attached & {p["id"]} or maps & set(p.get("map_ids", []))
    }  # type: ignore[arg-type]
    links = {int(str(lk["id"])) for lk in bpftool_json("link", "show") if lk.get("prog_id") in ids}
    return {"progs": ids, "maps": maps, "links": links}


def _loader_script(cg: Path, extra: str) -> str:
    return textwrap.dedent(f"""
        import sys, time
        from ztun import bpf
        acc = bpf.SockmapAccelerator({str(cg)!r}{extra})
        print("READY", flush=True)
        time.sleep(600)
    """)


def test_available_reports_this_kernel() -> None:
    ok, why = bpf.available()
    assert ok, why
    f = bpf.features()
    assert f.btf and f.rdonly_cast and f.bound in ("exact", "rmem")
    assert f.kernel in why


def test_attach_detach_in_child_cgroup(joined_cgroup: Path) -> None:
    acc = bpf.SockmapAccelerator(joined_cgroup)
    try:
        names = {a.get("name") for a in cgroup_attachments(joined_cgroup)}
        assert names == {"ztun_sockops"}
        mine = ours(joined_cgroup)
        assert len(mine["progs"]) == 2 and len(mine["links"]) == 2, mine
        assert bpf.status().active >= 1
        ls, a, b = _hop(acc)
    finally:
        acc.close()
    assert cgroup_attachments(joined_cgroup) == []
    # Accelerated sockets keep their verdict program until they close ...
    left = wait_gone(mine, timeout=0.5)
    assert left["progs"], "live accelerated sockets lost their program on detach"
    b.sendall(b"still here")  # ... and keep working
    assert a.recv(64) == b"still here"
    for s in (ls, a, b):
        s.close()
    assert wait_gone(mine) == {"progs": set(), "maps": set(), "links": set()}
    with pytest.raises(BpfError, match="closed"):
        acc.add_listener(0)


def _hop(acc: bpf.SockmapAccelerator) -> tuple[socket.socket, socket.socket, socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)
    acc.add_listener(ls)
    a = socket.create_connection(ls.getsockname())
    b, _ = ls.accept()
    a.sendall(b"ping")
    assert b.recv(4) == b"ping"
    assert acc.stats()["hop_redirect"] >= 1
    return ls, a, b


@KERNEL_FLAKY
@pytest.mark.parametrize("live", [False, True])
def test_sigkilled_loader_leaves_nothing(
    live: bool, ztrelay: Path, procs: Procs, joined_cgroup: Path
) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = free_port()
    maps = Maps()
    relay = procs.start(
        ztrelay,
        "relay",
        f"127.0.0.1:{port}",
        f"127.0.0.1:{server.getsockname()[1]}",
        "--bpf",
        str(joined_cgroup),
        "--pairs",
    )
    mine = ours(joined_cgroup)
    assert len(mine["progs"]) == 2
    conn = None
    if live:
        a = socket.create_connection(("127.0.0.1", port), timeout=10)
        server.settimeout(10)
        b, _ = server.accept()
        b.settimeout(10)
        a.sendall(b"x")
        assert b.recv(1) == b"x"
        conn = (a, b)
        # The relay pairs (and sets SO_LINGER 0) just after the first bytes: kill it once
        # the pair's two routes are in place, not before.
        end = time.monotonic() + 10
        while maps.routes() < 2 and time.monotonic() < end:
            time.sleep(0.02)
        assert maps.routes() == 2
    relay.send_signal(signal.SIGKILL)
    relay.wait()
    if conn:
        # The apps' sockets hold their psock (and so the program) until they close; the
        # relay's death reset them (SO_LINGER 0 from pair_add).
        with pytest.raises(ConnectionResetError):
            conn[1].recv(1)
        for s in conn:
            s.close()
    server.close()
    assert wait_gone(mine) == {"progs": set(), "maps": set(), "links": set()}
    assert cgroup_attachments(joined_cgroup) == []


def test_pinned_objects_survive_sigkill_until_cleanup(
    procs: Procs, joined_cgroup: Path, bpf_pin_dir: str
) -> None:
    # bpf_pin_dir (harness): a fresh directory on bpffs, mounted for the session if needed
    # and unmounted at its end if the harness mounted it.
    pin = Path(bpf_pin_dir) / "acc"
    p = procs.start(sys.executable, "-c", _loader_script(joined_cgroup, f", pin_dir={str(pin)!r}"))
    mine = ours(joined_cgroup)
    p.send_signal(signal.SIGKILL)
    p.wait()
    try:
        time.sleep(0.3)
        assert wait_gone(mine, timeout=0.3) == mine, "pinned objects vanished with the process"
        assert {a.get("name") for a in cgroup_attachments(joined_cgroup)} == {"ztun_sockops"}
        assert sorted(os.listdir(pin)) == sorted(
            [
                "link_skmsg",
                "link_sockops",
                "ztun_expect",
                "ztun_local_addrs",
                "ztun_pairs",
                "ztun_ports",
                "ztun_routes",
                "ztun_sockinfo",
                "ztun_socks",
                "ztun_stats",
            ]
        )
    finally:
        removed = bpf.cleanup(pin, cgroup_root=joined_cgroup)
    assert any("unpin" in r for r in removed), removed
    assert not pin.exists()
    assert wait_gone(mine) == {"progs": set(), "maps": set(), "links": set()}
    assert cgroup_attachments(joined_cgroup) == []


def test_cleanup_detaches_a_running_loader(procs: Procs, joined_cgroup: Path) -> None:
    """`ztund bpf cleanup` while a ztun runs: its links go (scoped here to our joined_cgroup)."""
    p = procs.start(sys.executable, "-c", _loader_script(joined_cgroup, ""))
    mine = ours(joined_cgroup)
    removed = bpf.cleanup(None, cgroup_root=joined_cgroup)
    assert len([r for r in removed if r.startswith("detach link")]) == 2, removed
    assert cgroup_attachments(joined_cgroup) == []
    procs.stop(p)
    assert wait_gone(mine) == {"progs": set(), "maps": set(), "links": set()}


def test_ztund_bpf_cleanup_scoped_to_a_cgroup(procs: Procs, joined_cgroup: Path) -> None:
    """The command line: `ztund bpf cleanup --cgroup-root` detaches the loader in that
    cgroup, names what it removed, and leaves everything else alone."""
    p = procs.start(sys.executable, "-c", _loader_script(joined_cgroup, ""))
    mine = ours(joined_cgroup)
    others = {a.get("id") for a in cgroup_attachments(joined_cgroup.parent)}
    cp = subprocess.run(
        [sys.executable, "-m", "ztun", "bpf", "cleanup", "--cgroup-root", str(joined_cgroup)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert len([ln for ln in lines if ln.startswith("detach link")]) == 2, lines
    assert lines[-1] == "cleaned up: 2 object(s) removed", lines
    assert cgroup_attachments(joined_cgroup) == []
    assert {a.get("id") for a in cgroup_attachments(joined_cgroup.parent)} == others
    procs.stop(p)
    assert wait_gone(mine) == {"progs": set(), "maps": set(), "links": set()}


def test_legacy_attachment_is_cleaned_after_sigkill(procs: Procs, joined_cgroup: Path) -> None:
    """Legacy bpf_prog_attach (kernels < 6.10) outlives the process: cleanup finds it."""
    p = procs.start(sys.executable, "-c", _loader_script(joined_cgroup, ", legacy_attach=True"))
    mine = ours(joined_cgroup)
    assert mine["links"] == set()
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(0.3)
    assert {a.get("name") for a in cgroup_attachments(joined_cgroup)} == {"ztun_sockops"}
    removed = bpf.cleanup(None, cgroup_root=joined_cgroup)
    assert any(r.startswith("detach prog") for r in removed), removed
    assert cgroup_attachments(joined_cgroup) == []
    assert wait_gone(mine) == {"progs": set(), "maps": set(), "links": set()}


def test_engine_handle_and_errors(joined_cgroup: Path) -> None:
    with bpf.SockmapAccelerator(joined_cgroup) as acc:
        h, api = acc.engine_handle()
        assert h and api
        assert acc.mark & 0xFFFF == bpf.DEFAULT_MARK  # another live accelerator: k << 16 | it
        # What the engine does with the two integers: cast, check the ABI, call.
        from ztun import _bpf

        table = _bpf.ffi.cast("struct ztun_bpf_api *", api)
        handle = _bpf.ffi.cast("ztun_bpf *", h)
        assert table.abi == _bpf.lib.ZTUN_BPF_API_ABI
        assert table.size == _bpf.ffi.sizeof("struct ztun_bpf_api")
        assert table.mark(handle) == acc.mark
        assert table.relay_busy(handle, 1 << 32, 0, 1) == -10004  # ZTUN_ENOTFOUND
        with pytest.raises(BpfError, match="pair_add"):
            acc.pair_add(0, 1)
        with pytest.raises(BpfError, match="pair_del"):
            acc.pair_del(12345)
        assert acc.socket_count() == 0
    with pytest.raises(BpfError, match="attach to cgroup"):
        bpf.SockmapAccelerator(joined_cgroup / "does-not-exist")
