"""ztund's same-node shortcut (engine.accelerate, docs/daemon.md): a connection from one
local workload to another is judged by the source's engine (identities from the config,
the destination's policies) and its payload goes app to app by sk_msg redirect, across
the two workloads' network namespaces.

One real ztund (node-a: demo/client and demo/db, each in its own netns) with its
accelerator on a test cgroup that holds ztund and the apps (this process).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.caps import in_ci
from harness.cgroup import Cgroup
from prometheus_client.parser import text_string_to_metric_families

from daemon.conftest import Mesh, echo_roundtrip
from ztun import bpf
from ztun.demo import POLICIES, EchoServer, socks5_handshake

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf, pytest.mark.timeout(120)]

TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/demo/sa/client"
DB_ID = f"spiffe://{TD}/ns/demo/sa/db"
SOCKS = ("127.0.0.1", 15080)
SIZE = 32 << 20

# The db may never open a connection to the client (a DENY on the client's side).
DENY_DB_TO_CLIENT = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: client-deny-db
  namespace: demo
spec:
  selector:
    matchLabels: {app: client}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/db"]
"""


DENY_CLIENT_TO_DB = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: db-deny-client
  namespace: demo
spec:
  selector:
    matchLabels: {app: db}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
"""


@pytest.fixture
def accel_cgroup() -> Iterator[Cgroup]:
    """A cgroup holding this process (the apps) and so the ztund it starts; the
    accelerator attaches here. Requested before ``mesh``: sockets belong to the cgroup
    of the process that made them, so the apps' listeners must be made inside."""
    ok, why = bpf.available()
    if not ok:
        if in_ci():
            pytest.fail(f"sockmap unavailable under CI: {why}")
        pytest.skip(f"needs the sockmap programs: {why}")
    parent = Cgroup.create()
    try:
        parent.child("procs").add()
        yield parent
    finally:
        parent.remove()


def _metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _one(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in m.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def _ztun_attached(cgroup: str) -> list[str]:
    """Names of the ztun_* programs attached to ``cgroup`` or below (bpftool)."""
    tool = shutil.which("bpftool")
    assert tool, "bpftool is needed to check that nothing stays attached"
    out = subprocess.run(
        [tool, "-j", "cgroup", "tree", cgroup], capture_output=True, text=True, check=True
    ).stdout
    names = []
    for entry in json.loads(out or "[]"):
        for prog in entry.get("programs", []):
            if str(prog.get("name", "")).startswith("ztun_"):
                names.append(f"{entry.get('cgroup')}: {prog['name']}")
    return names


def _socks(m: Mesh, src: Any, dst_ip: str, port: int) -> socket.socket:
    sock = src.connect(SOCKS)
    try:
        socks5_handshake(sock, dst_ip, port)
    except BaseException:
        sock.close()
        raise
    return sock


def test_same_node_route_takes_the_sockmap_shortcut(accel_cgroup: Cgroup, mesh: Mesh) -> None:
    m = mesh
    pol = m.policy_dir(POLICIES + DENY_DB_TO_CLIENT)
    extra = {"engine": {"accelerate": True, "accelerateCgroup": accel_cgroup.path}}
    m.write_config("node-a", m.config("node-a", policies=[str(pol)], extra=extra))
    db_srv = EchoServer(m.db.listen(7000))
    client_srv = EchoServer(m.client.listen(7001))
    m.servers += [db_srv, client_srv]
    m.start("node-a")
    a = m.a

    dump = a.get_json("/config_dump")
    acc = dump["accelerator"]
    assert acc["state"].startswith("on"), acc
    assert acc["sameNodeRoutes"] == ["demo/client", "demo/db"], acc
    assert m.db.ip in acc["localAddresses"] and m.client.ip in acc["localAddresses"], acc
    assert _ztun_attached(accel_cgroup.path), "the accelerator is not attached"

    # 1. client -> db through the client's SOCKS5 entry: a same-node route. Both ways,
    # SHA-256 checked (the echo returns what the client sent).
    payload = os.urandom(SIZE)
    with _socks(m, m.client, m.db.ip, 7000) as sock:
        echoed = echo_roundtrip(sock, payload)
    assert len(echoed) == SIZE
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()

    # 2. db -> client: the client's DENY judged at the source; no byte reaches the app.
    refused = False
    try:
        with _socks(m, m.db, m.client.ip, 7001) as sock:
            refused = echo_roundtrip(sock, b"must not arrive") == b""
    except OSError:
        refused = True
    assert refused
    assert client_srv.accepted == 0

    # 3. The source's access log names both identities, no mTLS, the route.
    ok = m.wait_log(a, lambda r: r.get("route") == "same_node" and r.get("bytes_sent") == SIZE)
    assert ok["src.identity"] == CLIENT_ID and ok["dst.identity"] == DB_ID, ok
    assert ok["src.workload"] == "client" and ok["dst.workload"] == "db", ok
    assert ok["bytes_recv"] == SIZE and "dst.hbone_addr" not in ok, ok
    denied = m.wait_log(a, lambda r: r.get("route") == "same_node" and r.get("decision") == "deny")
    assert denied["src.identity"] == DB_ID and denied["dst.identity"] == CLIENT_ID, denied
    assert denied["policy"] == "demo/client-deny-db" and denied["response_flags"] == "DENY"

    # 4. Metrics: reporter=source with both principals, not mutual_tls; the pair made
    # and the kernel's redirects counted.
    deadline = time.monotonic() + 10
    while True:
        mt = _metrics(a.metrics_text())
        labels = {
            "reporter": "source",
            "source_principal": CLIENT_ID,
            "destination_principal": DB_ID,
        }
        opened = _one(mt, "istio_tcp_connections_opened_total", **labels)
        sent = _one(mt, "istio_tcp_received_bytes_total", **labels)
        if (opened >= 1 and sent >= SIZE) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert opened == 1 and sent == SIZE, mt.get("istio_tcp_received_bytes_total")
    assert _one(mt, "istio_tcp_sent_bytes_total", **labels) == SIZE
    assert (
        _one(mt, "istio_tcp_connections_opened_total", connection_security_policy="mutual_tls") == 0
    ), "a same-node route claimed mTLS"
    assert _one(mt, "istio_tcp_connections_failed_total", response_flags="DENY",
                source_principal=DB_ID, destination_principal=CLIENT_ID) == 1  # fmt: skip
    assert _one(mt, "ztun_bpf_accelerator_active") == 1
    assert _one(mt, "ztun_bpf_pairs_total", workload="demo/client") >= 1
    assert _one(mt, "ztun_bpf_events_total", event="pair_redirect") > 0
    assert _one(mt, "ztun_bpf_direct_bytes_total", workload="demo/client") > 0

    print(
        "same-node route:",
        {
            "pairs": _one(mt, "ztun_bpf_pairs_total", workload="demo/client"),
            "direct_bytes": _one(mt, "ztun_bpf_direct_bytes_total", workload="demo/client"),
            "pair_redirect": _one(mt, "ztun_bpf_events_total", event="pair_redirect"),
            "hop_redirect": _one(mt, "ztun_bpf_events_total", event="hop_redirect"),
        },
    )
    # 5. SIGHUP with a policy that denies client -> db: the same-node route obeys it.
    pol2 = m.policy_dir(POLICIES + DENY_DB_TO_CLIENT + DENY_CLIENT_TO_DB, name="policies2")
    m.write_config("node-a", m.config("node-a", policies=[str(pol2)], extra=extra))
    before = db_srv.accepted
    a.signal(signal.SIGHUP)
    m.wait_log(a, lambda r: r.get("message", "").startswith("reloaded"))
    assert a.get_json("/config_dump")["accelerator"]["sameNodeRoutes"] == acc["sameNodeRoutes"]
    refused = False
    try:
        with _socks(m, m.client, m.db.ip, 7000) as sock:
            refused = echo_roundtrip(sock, b"must not arrive") == b""
    except OSError:
        refused = True
    assert refused and db_srv.accepted == before

    # 6. Nothing stays attached once ztund has stopped.
    assert a.stop(30) == 0
    deadline = time.monotonic() + 15  # the kernel frees detached objects lazily
    while (left := _ztun_attached(accel_cgroup.path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left


def test_accelerate_auto_runs_without_when_it_cannot_attach(
    accel_cgroup: Cgroup, mesh: Mesh
) -> None:
    """``auto`` on a cgroup that does not hold ztund: one warning, no accelerator, and
    same-node connections go over HBONE (mTLS) as without the option."""
    m = mesh
    elsewhere = accel_cgroup.child("elsewhere")  # a sibling of ztund's cgroup
    extra = {"engine": {"accelerate": "auto", "accelerateCgroup": elsewhere.path}}
    m.write_config("node-a", m.config("node-a", extra=extra))
    db_srv = EchoServer(m.db.listen(7000))
    m.servers.append(db_srv)
    m.start("node-a")
    a = m.a
    acc = a.get_json("/config_dump")["accelerator"]
    assert acc["state"].startswith("unavailable:") and "outside" in acc["state"], acc
    assert acc["sameNodeRoutes"] == [] and acc["localAddresses"] == [], acc
    warned = [r for r in a.records if "eBPF acceleration off" in r.get("message", "")]
    assert len(warned) == 1, warned
    with _socks(m, m.client, m.db.ip, 7000) as sock:
        assert echo_roundtrip(sock, b"x" * 100_000) == b"x" * 100_000
    rec = m.wait_log(a, lambda r: r.get("direction") == "outbound" and r.get("bytes_sent"))
    assert "route" not in rec and rec.get("dst.hbone_addr"), rec
    mt = _metrics(a.metrics_text())
    assert _one(mt, "ztun_bpf_accelerator_active") == 0
    assert not _ztun_attached(accel_cgroup.path)


def test_accelerate_true_refuses_the_cgroup2_root(mesh: Mesh) -> None:
    """``accelerateCgroup`` naming the cgroup2 root is a config error, with its line."""
    root = bpf.find_mount("cgroup2")
    if root is None:
        pytest.skip("no cgroup2 mount")
    extra = {"engine": {"accelerate": "auto", "accelerateCgroup": str(root)}}
    mesh.write_config("node-a", mesh.config("node-a", extra=extra))
    from ztun.config import ConfigErrors, load

    with pytest.raises(ConfigErrors) as ei:
        load(mesh.config_path("node-a"))
    (err,) = list(ei.value)
    assert err.field == "engine.accelerateCgroup" and err.line, err
    assert "cgroup2 root" in str(err)
    with contextlib.suppress(Exception):
        Path(mesh.config_path("node-a")).unlink()
