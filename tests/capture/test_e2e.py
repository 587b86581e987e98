"""Unmodified programs in captured workloads on two netns nodes: curl against
``python -m http.server`` and a Python client/server moving 1 GiB with SHA-256 checked, over
IPv4 and IPv6; the wire between the nodes carries only TLS on port 15008."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pcap
import pytest
from capture_rig import Mesh

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]

BODY_MARKER = "ztun-capture-body-marker-5f1d"  # in the served file: must not be on the wire
SEND_MARKER = "ztun-capture-request-marker-9c2e"  # sent by a client: must not be on the wire


def http_server(mesh: Mesh, root: Path, port: int = 8080) -> subprocess.Popen[str]:
    """``python -m http.server`` in the server's cgroup, serving ``root``; ready when it
    answers (probed from inside the node, uncaptured, over loopback)."""
    p = mesh.b.popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "::", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    end = time.monotonic() + 15
    while time.monotonic() < end:
        if mesh.b.app("probe", "::1", str(port), captured=False).get("ok"):
            return p
        time.sleep(0.1)
    p.kill()
    raise AssertionError("http.server did not start")


def curl(mesh: Mesh, url: str, out: Path) -> subprocess.CompletedProcess[str]:
    return mesh.a.node.run(
        mesh.a.argv(["curl", "-sS", "-m", "20", "-o", str(out), "-w", "%{http_code}", url]),
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("family", [4, 6])
def test_curl_against_http_server(mesh: Mesh, tmp_path: Path, family: int) -> None:
    (tmp_path / "index.html").write_text(f"<p>{BODY_MARKER}</p>\n")
    mesh.start(mesh.a)
    mesh.start(mesh.b)
    srv = http_server(mesh, tmp_path)
    try:
        host = mesh.b.addr(family)
        url = f"http://[{host}]:8080/" if family == 6 else f"http://{host}:8080/"
        cp = curl(mesh, url, tmp_path / "got.html")
        assert cp.returncode == 0 and cp.stdout == "200", cp.stderr
        assert BODY_MARKER in (tmp_path / "got.html").read_text()
        # It went through both ztuns over HBONE, each side verifying the other's identity.
        out = mesh.wait_close(mesh.a, lambda e: e.mode == 5 and e.reason == "ok")
        assert out.peer_id == mesh.b.spiffe_id and out.target == (host, 8080)
        inb = mesh.wait_close(mesh.b, lambda e: e.mode == 4 and e.reason == "ok")
        assert inb.peer_id == mesh.a.spiffe_id and inb.target == (host, 8080)
        assert inb.http_status == 200
        st = mesh.a.capture.stats() if mesh.a.capture else {}
        assert st[f"rewrite{family}"] >= 1 and st["original_dst_hit"] >= 1
        assert st["in_hbone"] >= 1  # B's sk_lookup (one program set serves both sides here)
    finally:
        srv.kill()
        srv.wait()


@pytest.mark.slow
@pytest.mark.parametrize("family", [4, 6])
def test_python_client_server_1gib_sha256(mesh: Mesh, family: int) -> None:
    mesh.start(mesh.a)
    mesh.start(mesh.b)
    mesh.b.server("sha-server", "9000")
    host = mesh.b.addr(family)
    res = mesh.a.app("sha-client", host, "9000", str(1 << 30), "7", timeout=280)
    assert res["rc"] == 0 and res["ok"], res
    assert res["bytes"] == 1 << 30 and res["sha256"] == res["expected"]
    assert res["peer"] == [host, 9000]  # the app sees the peer it dialled (getpeername)
    inb = mesh.wait_close(mesh.b, lambda e: e.mode == 4 and e.bytes_sent >= 1 << 30)
    assert inb.peer_id == mesh.a.spiffe_id


def test_wire_carries_only_tls_on_15008(mesh: Mesh, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text(f"<p>{BODY_MARKER}</p>\n" * 200)
    mesh.start(mesh.a)
    mesh.start(mesh.b)
    srv = http_server(mesh, tmp_path)
    mesh.b.server("sha-server", "9000")
    dump = tmp_path / "zt0.pcap"
    td = mesh.a.node.popen(
        ["tcpdump", "-i", "zt0", "-s", "0", "-B", "65536", "-U", "-n", "-w", str(dump)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert td.stderr is not None
        line = td.stderr.readline()  # "listening on zt0 ..." once it captures
        assert "listening" in line, line
        for family in (4, 6):
            host = mesh.b.addr(family)
            url = f"http://[{host}]:8080/" if family == 6 else f"http://{host}:8080/"
            cp = curl(mesh, url, tmp_path / f"got{family}.html")
            assert cp.stdout == "200", cp.stderr
            res = mesh.a.app("probe", host, "9000", SEND_MARKER * 4000)
            assert res["ok"] and res["reply"].startswith(str(len(SEND_MARKER) * 4000)), res
        res = mesh.a.app("sha-client", mesh.b.node.ip4, "9000", str(8 << 20))
        assert res["ok"], res
        time.sleep(0.5)
    finally:
        td.send_signal(signal.SIGINT)
        td.wait(10)
        srv.kill()
        srv.wait()
    cap = pcap.read(dump)
    assert cap.truncated == 0
    assert cap.payload_bytes() > 8 << 20, "the capture saw the traffic"
    assert cap.flows, "no TCP at all on the veth"
    for (src, dst), flow in cap.flows.items():
        assert 15008 in (src[1], dst[1]), f"TCP not on the HBONE port: {src} -> {dst}"
        stream = flow.stream()
        assert BODY_MARKER.encode() not in stream and SEND_MARKER.encode() not in stream
        assert b"HTTP/1." not in stream and b"GET /" not in stream
        runs = flow.runs()
        assert len(runs) <= 1, f"the capture missed segments of {src} -> {dst}"
        if runs:
            # From the first byte on, well-formed TLS records (raises at plaintext).
            records, _ = pcap.tls_records(runs[0])
            assert records >= 1 and runs[0][0] == 0x16  # starts with a handshake record
    assert {s[0] for s, _ in cap.flows} >= {mesh.a.node.ip4, mesh.a.node.ip6}


def test_app_sees_original_peer_and_iptables_style_original_dst(mesh: Mesh) -> None:
    """getpeername() shows the app what it dialled; ztun's listener learnt it through
    getsockopt(SO_ORIGINAL_DST), as behind iptables REDIRECT."""
    mesh.start(mesh.a)
    mesh.start(mesh.b)
    mesh.b.server("sha-server", "9000")
    for family in (4, 6):
        host = mesh.b.addr(family)
        res = mesh.a.app("probe", host, "9000", "hello")
        assert res["ok"] and res["peer"] == [host, 9000], res
        # the app's own end is on loopback: connect() was sent to ztun's outbound port
        assert res["local"][0] in ("127.0.0.1", "::1")
    st = mesh.a.capture.stats() if mesh.a.capture else {}
    assert st["original_dst_hit"] >= 2 and st["getpeername"] >= 2


def test_loopback_and_udp_left_alone(mesh: Mesh) -> None:
    import socket

    mesh.start(mesh.a, inbound=False)
    local = mesh.a.server("sha-server", "9100", captured=False)
    res = mesh.a.app("probe", "127.0.0.1", "9100", "x")
    assert res["ok"] and res["peer"] == ["127.0.0.1", 9100]
    res = mesh.a.app("probe", "::1", "9100", "x")
    assert res["ok"]
    st = mesh.a.capture.stats() if mesh.a.capture else {}
    assert st["skip_local"] >= 2 and st["rewrite4"] == 0 and st["rewrite6"] == 0
    local.kill()
    # UDP (DNS's transport) goes out directly: the datagram arrives from A's own address.
    rx = mesh.b.node.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((mesh.b.node.ip4, 5353))
    rx.settimeout(10)
    code = (
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        f"s.sendto(b'dns?', ('{mesh.b.node.ip4}', 5353)); print('{{}}')"
    )
    cp = mesh.a.node.run(mesh.a.argv([sys.executable, "-c", code]), timeout=20)
    assert cp.returncode == 0
    data, peer = rx.recvfrom(100)
    assert data == b"dns?" and peer[0] == mesh.a.node.ip4


def test_passthrough_to_a_destination_outside_the_mesh(mesh: Mesh) -> None:
    """Captured, but the destination is not a mesh workload: ztun connects directly."""
    mesh.start(mesh.a, inbound=False, directory=[])  # nothing is in the mesh
    mesh.b.server("sha-server", "9000", captured=False)
    res = mesh.a.app("sha-client", mesh.b.node.ip4, "9000", str(1 << 20))
    assert res["ok"], res
    assert res["server_saw"] == mesh.a.node.ip4  # from A's namespace, by A's ztun
    ev = mesh.wait_close(mesh.a, lambda e: e.mode == 5 and e.reason == "ok")
    assert ev.peer_id is None and ev.dst == (mesh.b.node.ip4, 9000)


def test_excluded_ports_go_direct(mesh: Mesh) -> None:
    mesh.start(mesh.a, inbound=False, exclude_outbound_ports=[9001])
    mesh.b.server("sha-server", "9001", captured=False)
    res = mesh.a.app("probe", mesh.b.node.ip4, "9001", "x")
    assert res["ok"] and res["local"][0] == mesh.a.node.ip4  # not via loopback: direct
    st = mesh.a.capture.stats() if mesh.a.capture else {}
    assert st["skip_port"] >= 1 and st["rewrite4"] == 0


def test_ztun_own_cgroup_cannot_be_captured(mesh: Mesh) -> None:
    """Capturing the cgroup ztun runs in would capture ztun's own connections: refused."""
    from ztun.errors import BpfError

    mesh.start(mesh.a, capture_it=False)
    from ztun.capture import Capture

    own = Path(f"/proc/{os.getpid()}/cgroup").read_text()
    assert own
    from ztun import bpf

    with pytest.raises(BpfError, match="loop"):
        assert mesh.a.tunnel is not None
        Capture(mesh.a.tunnel, cgroup=bpf.own_cgroup(), netns=mesh.a.node.path, name="self")
