"""Turning capture off restores direct connections and leaves nothing attached; pinned
capture fails closed while ztun is away (connects refused, inbound refused) and a new ztun
takes it over; ``ztund bpf cleanup`` removes everything after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from capture_rig import Mesh, cap_objects, wait_no_capture

from ztun import bpf, capture

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]

HOLDER = Path(__file__).with_name("holder.py")


def test_disable_restores_direct_connections_and_leaves_nothing(mesh: Mesh) -> None:
    before = cap_objects()
    mesh.start(mesh.a)
    mesh.start(mesh.b)
    mesh.b.server("sha-server", "9000", captured=False)
    host = mesh.b.node.ip4
    res = mesh.a.app("sha-client", host, "9000", str(1 << 20))
    assert res["ok"] and res["local"][0] == "127.0.0.1", res  # sent to A's ztun
    mesh.wait_close(mesh.b, lambda e: e.mode == 4 and e.peer_id == mesh.a.spiffe_id)
    assert cap_objects()["links"] - before["links"], "capture attached links"
    mesh.stop(mesh.a)
    mesh.stop(mesh.b)
    n = len(mesh.b.events)
    res = mesh.a.app("sha-client", host, "9000", str(1 << 20))
    assert res["ok"] and res["server_saw"] == mesh.a.node.ip4  # direct again
    assert res["local"][0] == mesh.a.node.ip4  # not rewritten to loopback
    assert len(mesh.b.events) == n  # B's ztun saw nothing of it
    left = wait_no_capture(before)
    assert not any(left.values()), f"left attached: {left}"


def test_pinned_capture_fails_closed_then_is_taken_over(mesh: Mesh, pin_dir: str) -> None:
    before = cap_objects()
    mesh.start(mesh.a, pin_dir=pin_dir)
    mesh.start(mesh.b, pin_dir=pin_dir)
    mesh.b.server("sha-server", "9000")
    host = mesh.b.node.ip4
    assert mesh.a.app("probe", host, "9000", "x")["ok"]
    n_links = len(cap_objects()["links"] - before["links"])

    # B's ztun goes away: nothing reaches B's app, neither HBONE nor plaintext.
    mesh.stop(mesh.b, disable=False)
    assert mesh.a.capture is not None
    refused0 = mesh.a.capture.stats()["in_refused"]
    res = mesh.a.app("probe", host, "9000", "x")
    assert not res["ok"] and res["seconds"] < 5, res
    res = mesh.a.app("probe", host, "9000", "x", captured=False)  # plaintext, not captured
    assert not res["ok"] and res["error"] == "ECONNREFUSED", res
    assert mesh.a.capture.stats()["in_refused"] >= refused0 + 2

    # A's ztun goes away: A's app has no way out (no plaintext path), refused at once.
    mesh.stop(mesh.a, disable=False)
    res = mesh.a.app("probe", host, "9000", "x")
    assert not res["ok"] and res["error"] == "ECONNREFUSED" and res["seconds"] < 5, res
    assert sorted(capture.captured(pin_dir)) == ["client", "server"]
    assert len(cap_objects()["links"] - before["links"]) == n_links  # still attached

    # Back: the pinned programs are taken over in place (no second set of links).
    mesh.start(mesh.a, pin_dir=pin_dir)
    mesh.start(mesh.b, pin_dir=pin_dir)
    res = mesh.a.app("sha-client", host, "9000", str(1 << 20))
    assert res["ok"], res
    assert len(cap_objects()["links"] - before["links"]) == n_links

    mesh.stop(mesh.a)
    mesh.stop(mesh.b)
    assert capture.captured(pin_dir) == [] and not os.path.exists(pin_dir)
    left = wait_no_capture(before)
    assert not any(left.values()), left


def test_crashed_ztun_fails_closed_until_ztund_bpf_cleanup(mesh: Mesh) -> None:
    if os.path.exists(bpf.DEFAULT_PIN_ROOT):
        pytest.fail(f"{bpf.DEFAULT_PIN_ROOT} exists (a ztund's state?): not wiping it")
    before = cap_objects()
    mesh.b.server("sha-server", "9000", captured=False)
    host = mesh.b.node.ip4
    holder = subprocess.Popen(
        [sys.executable, str(HOLDER), mesh.a.node.path, mesh.a.cg.path, capture.DEFAULT_PIN_DIR],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and "READY" in holder.stdout.readline()
        res = mesh.a.app("sha-client", host, "9000", str(1 << 20))
        assert res["ok"] and res["local"][0] == "127.0.0.1", res  # via ztun: passthrough
        assert res["server_saw"] == mesh.a.node.ip4  # dialled from A's namespace
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        res = mesh.a.app("probe", host, "9000", "x")
        assert not res["ok"] and res["error"] == "ECONNREFUSED", res  # fail closed
        cp = subprocess.run(
            # Scoped to this test's cgroup (an unscoped cleanup would also detach every
            # other ztun running on the host); the pins: ztun's whole pin root.
            [
                sys.executable,
                "-m",
                "ztun",
                "bpf",
                "cleanup",
                "--cgroup-root",
                mesh.a.cg.path,
                "--pin-root",
                bpf.DEFAULT_PIN_ROOT,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert cp.returncode == 0, cp.stderr
        assert "capture" in cp.stdout  # the pins it removed
        res = mesh.a.app("probe", host, "9000", "x")
        assert res["ok"] and res["local"][0] == mesh.a.node.ip4, res  # direct
        assert not os.path.exists(bpf.DEFAULT_PIN_ROOT)
        left = wait_no_capture(before)
        assert not any(left.values()), left
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if os.path.exists(capture.DEFAULT_PIN_DIR):
            capture.uncapture(pin_dir=capture.DEFAULT_PIN_DIR)
