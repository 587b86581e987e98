"""ztund with ``capture: true``: real daemons on the demo cluster (two nodes, each workload in
its own netns behind its node). A captured workload's connections are carried over HBONE;
while its ztund is stopped they are refused (fail closed); a restarted ztund takes the
pinned capture over; a reload with ``capture: false`` restores direct connections and leaves
nothing attached."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from capture_rig import APPS, cap_objects, last_json, wait_no_capture
from harness.cgroup import Cgroup

from ztun import bpf, capture
from ztun.demo import Cluster, WorkloadNs, Ztund, node_config, write_yaml
from ztun.netns import run_in_netns

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf, pytest.mark.slow]


def app(w: WorkloadNs, cg: Cgroup, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Run apps.py inside workload ``w``'s netns and cgroup ``cg``; its JSON result."""
    argv = ["sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', cg.path]
    argv += [sys.executable, str(APPS), *args]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    cp = run_in_netns(w.path, run, timeout=timeout + 10)
    return last_json(cp.stdout)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster("cap") as c:
        yield c


def test_ztund_capture_fail_closed_restart_and_disable(cluster: Cluster, tmp_path: Path) -> None:
    pins = {n: f"{capture.DEFAULT_PIN_DIR}/{n}" for n in ("node-a", "node-b")}
    if any(os.path.exists(p) for p in pins.values()):
        pytest.fail(f"{capture.DEFAULT_PIN_DIR} holds node-a/node-b state: not touching it")
    a, b = cluster.add_nodes("node-a", "node-b")
    client = cluster.add_workload(a, "client")
    api = cluster.add_workload(b, "api")
    cluster.wait_reachable()
    cgs = {n: Cgroup.create() for n in ("client", "api", "ztund-a", "ztund-b")}
    daemons: dict[str, Ztund] = {}
    before = cap_objects()

    def config(node: Any, on: bool) -> dict[str, Any]:
        cfg = node_config(
            cluster,
            node,
            ca_dir=str(tmp_path / "ca"),
            state_dir=str(tmp_path / node.name),
            drain_timeout="2s",
        )
        for w in cfg["workloads"]:
            if w["node"] == node.name:
                w["cgroup"] = cgs[w["name"]].path
                w["capture"] = on
        return cfg

    def start(node: Any) -> Ztund:
        wrapper = tmp_path / f"python-{node.name}"
        wrapper.write_text(
            f'#!/bin/sh\necho 0 > "{cgs["ztund-" + node.name[-1]].path}/cgroup.procs"\n'
            f'exec {sys.executable} "$@"\n'
        )
        wrapper.chmod(0o755)
        d = Ztund(
            node,
            tmp_path / f"{node.name}.yaml",
            log_path=tmp_path / f"{node.name}.log",
            python=str(wrapper),
        ).start()
        d.wait_ready(60)
        daemons[node.name] = d
        return d

    srv = None
    try:
        for node in (a, b):
            write_yaml(tmp_path / f"{node.name}.yaml", config(node, True))
            start(node)
        argv = ["sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', cgs["api"].path]
        argv += [sys.executable, str(APPS), "sha-server", "9000"]
        srv = run_in_netns(
            api.path, lambda: subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        )
        assert srv.stdout is not None and "READY" in srv.stdout.readline()

        res = app(client, cgs["client"], "sha-client", api.ip, "9000", str(4 << 20))
        assert res["ok"] and res["local"][0] == "127.0.0.1", res  # sent to client's ztund
        deadline = time.monotonic() + 15
        while not (
            inbound := [r for r in daemons["node-b"].access if r.get("direction") == "inbound"]
        ):
            assert time.monotonic() < deadline, daemons["node-b"].tail()
            time.sleep(0.1)
        assert inbound[-1]["src.identity"].endswith("/sa/client"), inbound

        # ztund of node-a stops: the client has no plaintext path out.
        daemons.pop("node-a").stop(30)
        res = app(client, cgs["client"], "probe", api.ip, "9000", "x")
        assert not res["ok"] and res["error"] == "ECONNREFUSED", res
        assert capture.captured(pins["node-a"]) == ["demo/client"]

        # ...and takes the pinned capture over when it is back.
        start(a)
        res = app(client, cgs["client"], "sha-client", api.ip, "9000", str(4 << 20))
        assert res["ok"] and res["local"][0] == "127.0.0.1", res

        # Reload with capture off: direct again, nothing left attached or pinned.
        for node in (a, b):
            write_yaml(tmp_path / f"{node.name}.yaml", config(node, False))
            n = len(daemons[node.name].records)
            daemons[node.name].signal(1)  # SIGHUP
            deadline = time.monotonic() + 30
            while not any(
                "reloaded" in str(r.get("message")) for r in daemons[node.name].records[n:]
            ):
                assert time.monotonic() < deadline, daemons[node.name].tail()
                time.sleep(0.1)
        res = app(client, cgs["client"], "sha-client", api.ip, "9000", str(1 << 20))
        assert res["ok"] and res["local"][0] == client.ip, res  # direct
        assert not any(os.path.exists(p) for p in pins.values())
        left = wait_no_capture(before)
        assert not any(left.values()), left
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        for d in daemons.values():
            with contextlib.suppress(Exception):
                d.stop(30)
        for p in pins.values():
            if os.path.exists(p):
                capture.uncapture(pin_dir=p)
        for d in (capture.DEFAULT_PIN_DIR, bpf.DEFAULT_PIN_ROOT):
            with contextlib.suppress(OSError):
                Path(d).rmdir()
        for cg in cgs.values():
            cg.remove()
