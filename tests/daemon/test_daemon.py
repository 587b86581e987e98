"""The real daemon, as a subprocess in namespace nodes: readiness, traffic, metrics,
the admin endpoints, SIGHUP reloads and the SIGTERM drain."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from daemon.conftest import DEFAULT_FORWARDS, Mesh, Sink, echo_roundtrip, refused_roundtrip
from ztun.ca import CertificateAuthority
from ztun.demo import EchoServer, Ztund, socks5_handshake
from ztun.tunnel import Tunnel

pytestmark = [pytest.mark.needs_root, pytest.mark.slow]


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of ``name`` parsed with prometheus_client's own parser."""
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out.append((dict(s.labels), s.value))
    return out


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for lb, v in samples(text, name) if all(lb.get(k) == x for k, x in labels.items()))


def access(mesh: Mesh, daemon: Any, **match: Any) -> dict[str, Any]:
    def pred(r: dict[str, Any]) -> bool:
        return r.get("scope") == "ztun.access" and all(r.get(k) == v for k, v in match.items())

    return mesh.wait_log(daemon, pred)


@pytest.mark.timeout(120)
def test_ready_traffic_and_metrics_equal_the_bytes(mesh: Mesh) -> None:
    mesh.start()
    ok, text = mesh.a.ready()
    assert ok and text.strip() == "ready"
    sizes = {9080: 3_000_001, 9081: 1_234_567}  # client -> api (cross-node), -> db (same node)
    for port, n in sizes.items():
        data = os.urandom(n)
        with mesh.client.connect(("127.0.0.1", port)) as s:
            assert echo_roundtrip(s, data) == data
    # SOCKS5, ztunnel's 15080: the destination is routed by the engine's directory.
    socks_n = 777_777
    data = os.urandom(socks_n)
    with mesh.client.connect(("127.0.0.1", 15080)) as s:
        socks5_handshake(s, mesh.api.ip, 8080)
        assert echo_roundtrip(s, data) == data

    # The metrics are folded from the same events as the access log: wait for the lines.
    for r in ("source", "destination"):
        access(mesh, mesh.a, **{"dst.workload": "db", "direction": "outbound" if r == "source"
                                else "inbound"})  # fmt: skip
    deadline = time.monotonic() + 15
    while (
        len(mesh.b.access) < 2
        or len([r for r in mesh.a.access if r.get("dst.workload") == "api"]) < 2
    ):
        assert time.monotonic() < deadline, (mesh.a.tail(), mesh.b.tail())
        time.sleep(0.05)
    ta, tb = mesh.a.metrics_text(), mesh.b.metrics_text()

    api_bytes = sizes[9080] + socks_n
    pair = {"source_workload": "client", "response_flags": "-"}
    # node-a, reporter=source: client -> api (forward + SOCKS5) and client -> db
    for name in ("istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"):
        assert value(ta, name, reporter="source", destination_workload="api", **pair) == api_bytes
        assert value(ta, name, reporter="source", destination_workload="db", **pair) == sizes[9081]
        # the destination side counts the same bytes
        assert (
            value(tb, name, reporter="destination", destination_workload="api", **pair) == api_bytes
        )
        assert (
            value(ta, name, reporter="destination", destination_workload="db", **pair)
            == sizes[9081]
        )
    assert value(ta, "istio_tcp_connections_opened_total", reporter="source",
                 destination_workload="api") == 2  # fmt: skip
    assert value(ta, "istio_tcp_connections_closed_total", reporter="source",
                 destination_workload="api") == 2  # fmt: skip
    assert value(tb, "istio_tcp_connections_opened_total", reporter="destination") == 2
    assert not samples(ta, "istio_tcp_connections_failed_total")

    labels, _ = samples(tb, "istio_tcp_received_bytes_total")[0]
    assert labels == {
        "reporter": "destination",
        "source_workload": "client",
        "source_workload_namespace": "demo",
        "source_principal": "spiffe://cluster.local/ns/demo/sa/client",
        "destination_workload": "api",
        "destination_workload_namespace": "demo",
        "destination_principal": "spiffe://cluster.local/ns/demo/sa/api",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    # The labelled totals add up to the engine's own atomic counters.
    engine = value(ta, "ztun_engine_received_bytes_total", workload="demo/client")
    assert engine == sum(sizes.values()) + socks_n
    labelled = value(ta, "istio_tcp_received_bytes_total", reporter="source")
    assert labelled == engine
    assert value(ta, "ztun_ready") == 1

    rec = access(mesh, mesh.b, **{"direction": "inbound", "bytes_sent": sizes[9080]})
    assert rec["src.identity"] == "spiffe://cluster.local/ns/demo/sa/client"
    assert rec["dst.identity"] == "spiffe://cluster.local/ns/demo/sa/api"
    assert rec["src.workload"] == "client" and rec["dst.workload"] == "api"
    assert rec["src.addr"].startswith(mesh.client.ip + ":")  # dialled from the workload
    assert rec["dst.hbone_addr"] == f"{mesh.api.ip}:8080"


def _wait_metric(
    daemon: Ztund, name: str, want: float, timeout: float = 10.0, **labels: str
) -> str:
    """Scrape until ``name{labels}`` equals ``want``; the last scrape's text."""
    deadline = time.monotonic() + timeout
    while True:
        text = daemon.metrics_text()
        if value(text, name, **labels) == want or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_bytes_of_open_connections_are_counted_at_scrape_time(mesh: Mesh) -> None:
    mesh.start()
    src = {"reporter": "source", "destination_workload": "api", "response_flags": "-"}
    dst = {"reporter": "destination", "source_workload": "client", "response_flags": "-"}
    received, sent = "istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"
    live = mesh.client.connect(("127.0.0.1", 9080))  # client -> api, cross-node
    live.settimeout(10)
    total = 0
    for n in (300_001, 4_000_000):
        data = os.urandom(n)
        live.sendall(data)
        got = bytearray()
        while len(got) < n:
            chunk = live.recv(1 << 20)
            assert chunk, "closed early"
            got += chunk
        assert got == data
        total += n
        # still open: both reporters already count every byte, each way
        for d, labels in ((mesh.a, src), (mesh.b, dst)):
            text = _wait_metric(d, received, total, **labels)
            assert value(text, received, **labels) == total, d.node.name
            assert value(text, sent, **labels) == total, d.node.name
            assert value(text, "istio_tcp_connections_opened_total", **labels) == 1
            assert value(text, "istio_tcp_connections_closed_total", **labels) == 0
    live.shutdown(socket.SHUT_WR)
    assert live.recv(10) == b""
    live.close()
    # closed: the final counts replace the live ones, nothing is counted twice
    for d, labels in ((mesh.a, src), (mesh.b, dst)):
        text = _wait_metric(d, "istio_tcp_connections_closed_total", 1, **labels)
        assert value(text, "istio_tcp_connections_closed_total", **labels) == 1, d.node.name
        assert value(text, received, **labels) == total
        assert value(text, sent, **labels) == total


@pytest.mark.timeout(120)
def test_not_ready_while_a_listener_cannot_open(mesh: Mesh) -> None:
    blocker = mesh.db.listen(15008)  # db's HBONE port is taken inside its namespace
    try:
        mesh.start("node-a", wait=False)
        deadline = time.monotonic() + 30
        while True:
            ok, text = mesh.a.ready()
            if "demo/db" in text and "demo/client" not in text:  # client up, db failing
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert not ok
        assert "workload demo/db: listeners not open" in text
        assert "in use" in text  # the reason, from the bind error
        status, _ = mesh.a.request("/healthz/ready")
        assert status == 500
    finally:
        blocker.close()
    mesh.a.wait_ready(30)  # retried, then ready


@pytest.mark.timeout(120)
def test_config_dump_has_no_key_material(mesh: Mesh) -> None:
    # Identities from files, so the test knows every private key the daemons hold.
    ca = CertificateAuthority(mesh.root / "files-ca", "cluster.local")
    keys = []
    for w in mesh.cluster.workloads:
        svid = ca.issue(f"spiffe://cluster.local/ns/{w.namespace}/sa/{w.service_account}")
        d = mesh.root / "certs" / w.namespace / w.service_account
        d.mkdir(parents=True)
        (d / "cert-chain.pem").write_bytes(svid.chain_pem())
        (d / "key.pem").write_bytes(svid.key_pem())
        (d / "root-cert.pem").write_bytes(ca.bundle.pem("cluster.local"))
        keys.append(svid)
    for node in ("node-a", "node-b"):
        cfg = mesh.config(node)
        cfg["identity"] = {"source": "files", "files": {"dir": str(mesh.root / "certs")}}
        mesh.write_config(node, cfg)
    mesh.start()
    with mesh.client.connect(("127.0.0.1", 9080)) as s:
        assert echo_roundtrip(s, b"x" * 1000) == b"x" * 1000

    status, body = mesh.a.request("/config_dump")
    assert status == 200
    dump = json.loads(body)
    text = body.decode()
    for svid in keys:
        key = svid.private_key
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )  # fmt: skip
        pem_body = "".join(svid.key_pem().decode().splitlines()[1:-1])
        scalar = key.private_numbers().private_value  # type: ignore[union-attr]
        for needle in (der.hex(), pem_body, pem_body[:40], format(scalar, "x"), str(scalar)):
            assert needle not in text
            assert needle.lower() not in text.lower()
    assert "PRIVATE" not in text.upper()
    assert "-----BEGIN" not in text
    # ... but the certificates are described: serial and validity of what is in use.
    certs = {c["identity"]: c for c in dump["certificates"]}
    client = certs["spiffe://cluster.local/ns/demo/sa/client"]
    want = next(k for k in keys if str(k.spiffe_id).endswith("/sa/client"))
    assert client["serial"] == want.serial
    assert client["state"] == "valid"
    assert client["notAfter"] == want.not_after.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert client["chain"][0]["serial"] == format(want.leaf.serial_number, "x")
    names = {(w["namespace"], w["name"]): w for w in dump["workloads"]}
    assert names[("demo", "client")]["running"] is True
    kinds = [li["kind"] for li in names[("demo", "client")]["listeners"]]
    assert kinds == ["hbone_inbound", "socks5", "forward", "forward"]
    assert names[("demo", "api")]["local"] is False


@pytest.mark.timeout(90)
def test_admin_logging_and_quitquitquit(mesh: Mesh) -> None:
    cfg = mesh.config("node-a")
    cfg["listeners"]["metrics"] = "127.0.0.1:15020"
    mesh.write_config("node-a", cfg)
    mesh.start("node-a")
    scraper = Ztund(
        mesh.a.node, mesh.a.config_path, log_path=os.devnull, admin=("127.0.0.1", 15020)
    )
    status, body = scraper.request("/stats/prometheus")
    assert status == 200 and b"ztun_ready 1.0" in body
    assert scraper.request("/config_dump")[0] == 404  # the metrics port serves metrics only
    levels = mesh.a.get_json("/logging")
    assert levels["ztun"] == "info"
    status, body = mesh.a.request("/logging?level=debug", method="POST")
    assert status == 200 and json.loads(body)["ztun"] == "debug"
    status, body = mesh.a.request("/logging?ztun.access=warning", method="POST")
    assert status == 200 and json.loads(body)["ztun.access"] == "warning"
    status, _ = mesh.a.request("/logging?level=loud", method="POST")
    assert status == 400
    status, _ = mesh.a.request("/logging?level=debug")  # changes need POST
    assert status == 405
    status, _ = mesh.a.request("/quitquitquit", method="POST")
    assert status == 200
    assert mesh.a.wait(40) == 0


@pytest.mark.timeout(120)
def test_sighup_with_a_broken_file_changes_nothing(mesh: Mesh) -> None:
    mesh.start()
    live = mesh.client.connect(("127.0.0.1", 9080))
    live.sendall(b"before")
    assert live.recv(100) == b"before"
    gen = mesh.a.get_json("/config_dump")["config"]["generation"]
    good = mesh.config("node-a")
    blocker = mesh.client.listen(9091, "127.0.0.1")
    try:
        broken: list[tuple[str, Any]] = [
            ("syntax", "node: node-a\nworkloads: [\n"),
            ("schema", {**good, "drainTimeout": "soon"}),
            ("policy", {**good, "policies": [str(mesh.policy_dir("kind: AuthorizationPolicy\n"
                                                              "spec: {action: NOPE}\n"))]}),
            # valid, but one of its new forwards cannot bind: the other must not appear
            ("apply", {**good, "workloads": _with_forwards(good, "client", [
                {"port": 9090, "to": "demo/api:8080"}, {"port": 9091, "to": "demo/api:8080"}])}),
        ]  # fmt: skip
        for i, (what, cfg) in enumerate(broken, start=1):
            mesh.write_config("node-a", cfg)
            mesh.a.signal(signal.SIGHUP)
            mesh.wait_log(mesh.a, lambda r, i=i: r.get("message", "").startswith("reload rejected")
                          and sum(1 for x in mesh.a.records if x.get("message", "").startswith(
                              "reload rejected")) >= i)  # fmt: skip
            dump = mesh.a.get_json("/config_dump")
            assert dump["config"]["generation"] == gen, what
            assert dump["config"]["lastReloadOk"] is False, what
            assert mesh.a.ready()[0], what
            with pytest.raises(ConnectionRefusedError):
                mesh.client.connect(("127.0.0.1", 9090)).close()  # not half-applied
            with mesh.client.connect(("127.0.0.1", 9081)) as s:  # old forwards still work
                assert echo_roundtrip(s, b"ok") == b"ok"
    finally:
        blocker.close()
    live.sendall(b"after")
    assert live.recv(100) == b"after"  # the live connection never noticed
    live.close()
    text = mesh.a.metrics_text()
    assert value(text, "ztun_config_reloads_total", result="rejected") == len(broken)


def _with_forwards(cfg: dict[str, Any], name: str, forwards: list[dict[str, Any]]) -> list[Any]:
    out = []
    for w in cfg["workloads"]:
        entry = dict(w)
        if entry["name"] == name:
            entry["forwards"] = list(entry.get("forwards", [])) + forwards
        out.append(entry)
    return out


@pytest.mark.timeout(120)
def test_sighup_applies_forwards_without_dropping_live_connections(mesh: Mesh) -> None:
    mesh.start()
    live = mesh.client.connect(("127.0.0.1", 9080))  # on a forward the reload removes
    live.sendall(b"one")
    assert live.recv(10) == b"one"
    serials = {c["identity"]: c["serial"] for c in mesh.a.get_json("/config_dump")["certificates"]}
    cfg = mesh.config("node-a", forwards={"demo/client": [(9085, "demo/api:8080")]})
    mesh.write_config("node-a", cfg)
    mesh.a.signal(signal.SIGHUP)
    mesh.wait_log(mesh.a, lambda r: r.get("message", "").startswith("reloaded"))
    assert mesh.a.get_json("/config_dump")["config"]["generation"] == 2
    # SIGHUP also fetches the certificates again (the embedded CA issues new ones)
    deadline = time.monotonic() + 10
    while True:
        dump = mesh.a.get_json("/config_dump")["certificates"]
        now = {c["identity"]: c["serial"] for c in dump}
        if now.keys() == serials.keys() and all(now[k] != serials[k] for k in now):
            break
        assert time.monotonic() < deadline, (serials, now)
        time.sleep(0.1)
    with mesh.client.connect(("127.0.0.1", 9085)) as s:
        assert echo_roundtrip(s, b"new") == b"new"
    with pytest.raises(ConnectionRefusedError):
        mesh.client.connect(("127.0.0.1", 9080)).close()
    live.sendall(b"two")
    assert live.recv(10) == b"two"
    live.shutdown(socket.SHUT_WR)
    assert live.recv(10) == b""
    live.close()
    rec = access(mesh, mesh.a, **{"direction": "outbound", "bytes_sent": 6})
    assert "error" not in rec


@pytest.mark.timeout(120)
def test_sighup_policy_denies_new_and_closes_newly_denied_live(mesh: Mesh) -> None:
    mesh.start()
    allowed = mesh.client.connect(("127.0.0.1", 9081))  # client -> db
    doomed = mesh.api.connect(("127.0.0.1", 9082))  # api -> db
    for s in (allowed, doomed):
        s.sendall(b"hi")
        assert s.recv(10) == b"hi"
    policies = str(mesh.policy_dir())  # once: node-a may be reading it while node-b reloads
    for node in ("node-a", "node-b"):
        mesh.write_config(node, mesh.config(node, policies=[policies]))
        mesh.daemons[node].signal(signal.SIGHUP)
    for d in mesh.daemons.values():
        mesh.wait_log(d, lambda r: r.get("message", "").startswith("reloaded"))
    # the live api -> db connection is closed by the new policy...
    doomed.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        assert doomed.recv(10) == b""
    rec = access(mesh, mesh.a, **{"direction": "inbound", "src.workload": "api"})
    assert rec["decision"] == "deny"
    assert rec["policy"] == "demo/deny-api-to-db"
    # ... the allowed one goes on, new ones follow the policy
    allowed.sendall(b"still")
    assert allowed.recv(10) == b"still"
    with mesh.client.connect(("127.0.0.1", 9081)) as s:
        assert echo_roundtrip(s, b"ok") == b"ok"
    assert refused_roundtrip(mesh.api, ("127.0.0.1", 9082)) == b""
    # The daemon counts a close when its event arrives: give the second one a moment.
    deadline = time.monotonic() + 10
    while True:
        text = mesh.a.metrics_text()
        denied = value(text, "istio_tcp_connections_closed_total", reporter="destination",
                       source_workload="api", response_flags="DENY")  # fmt: skip
        if denied >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert denied >= 2, text
    allowed.close()
    doomed.close()


@pytest.mark.timeout(240)
def test_sigterm_lets_an_inflight_gib_finish(mesh: Mesh) -> None:
    size = 1 << 30
    drain = 90
    sink = Sink(mesh.api.listen(9000))
    mesh.servers.append(sink)
    fw = {**DEFAULT_FORWARDS, "demo/client": [(9083, "demo/api:9000"), (9080, "demo/api:8080")]}
    for node in ("node-a", "node-b"):
        mesh.write_config(node, mesh.config(node, forwards=fw, drain_timeout=f"{drain}s"))
    mesh.start()
    sock = mesh.client.connect(("127.0.0.1", 9083))
    sock.settimeout(120)
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    want = hashlib.sha256()
    progress = {"sent": 0}
    result: dict[str, Any] = {}

    def send() -> None:
        try:
            for _ in range(size // len(block)):
                sock.sendall(block)
                want.update(block)
                progress["sent"] += len(block)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < Sink.REPLY.size:
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
            result["reply"] = reply
        except OSError as e:
            result["error"] = e

    th = threading.Thread(target=send, daemon=True)
    t0 = time.monotonic()
    th.start()
    while progress["sent"] < 64 << 20:
        assert th.is_alive(), result
        time.sleep(0.01)
    for d in mesh.daemons.values():
        d.signal(signal.SIGTERM)
    t_term = time.monotonic()
    at_term = progress["sent"]
    assert at_term < size // 2  # well in flight
    # draining: not ready, and no new connection is accepted
    deadline = time.monotonic() + 10
    while True:
        ok, text = mesh.a.ready()
        if not ok and "draining" in text:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    # Readiness turns first, the listeners close right after it (forwards, then SOCKS5,
    # then HBONE inbound). Probe SOCKS5 until it refuses, as connecting there opens no
    # HBONE stream beside the transfer; then the forwards refuse too.
    deadline = time.monotonic() + 10
    while True:
        try:
            mesh.client.connect(("127.0.0.1", 15080)).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "still accepting new connections while draining"
        time.sleep(0.05)
    with pytest.raises(ConnectionRefusedError):
        mesh.client.connect(("127.0.0.1", 9080)).close()
    th.join(drain)
    assert not th.is_alive(), f"transfer did not finish; sent {progress['sent']}"
    assert "error" not in result, result
    count, digest = Sink.REPLY.unpack(result["reply"])
    assert count == size and digest == want.digest()
    codes = {n: d.wait(drain + 20) for n, d in mesh.daemons.items()}
    assert codes == {"node-a": 0, "node-b": 0}
    elapsed = time.monotonic() - t_term
    assert elapsed < drain + 10
    print(f"1 GiB in {time.monotonic() - t0:.1f}s; SIGTERM at {at_term >> 20} MiB; "
          f"exits {elapsed:.1f}s after SIGTERM")  # fmt: skip
    mesh.daemons.clear()


@pytest.mark.timeout(120)
def test_rotation_reaches_inbound_listener(mesh: Mesh) -> None:
    # Certificates of 6 s renew every 3 s; node-a starts after node-b's first certificate
    # expired, so its handshakes need the rotated one on api's HBONE port.
    for node in ("node-a", "node-b"):
        cfg = mesh.config(node)
        cfg["identity"]["ca"]["certTtl"] = "6s"
        mesh.write_config(node, cfg)
    mesh.start("node-b")
    first = mesh.b.get_json("/config_dump")["certificates"][0]
    expires = dt.datetime.strptime(first["notAfter"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 1.5)
    assert mesh.b.get_json("/config_dump")["certificates"][0]["serial"] != first["serial"]
    mesh.start("node-a")
    with mesh.client.connect(("127.0.0.1", 9080)) as s:
        assert echo_roundtrip(s, b"fresh") == b"fresh"


@pytest.mark.timeout(120)
def test_inbound_is_dual_stack_for_workloads_with_ipv6(mesh: Mesh) -> None:
    # api gets an IPv6 address too: its namespace's ::1, so the test traffic stays on
    # loopback inside api's namespace
    for node in ("node-a", "node-b"):
        cfg = mesh.config(node)
        for w in cfg["workloads"]:
            if w["name"] == "api":
                w["workloadIps"] = [*w["workloadIps"], "::1"]
        mesh.write_config(node, cfg)
    mesh.start()

    def inbound(daemon: Ztund, name: str) -> list[str]:
        w = next(w for w in daemon.get_json("/config_dump")["workloads"] if w["name"] == name)
        return [li["address"] for li in w["listeners"] if li["kind"] == "hbone_inbound"]

    assert inbound(mesh.b, "api") == ["0.0.0.0:15008", "[::]:15008"]
    assert inbound(mesh.a, "client") == ["0.0.0.0:15008"]  # IPv4 only: one listener
    # HBONE over IPv6 to api: a client with demo/client's certificate, its engine
    # started inside api's namespace, tunnels to [::1]:8080 via [::1]:15008.
    mesh.servers.append(EchoServer(mesh.api.listen(8080, "::1")))
    ca = CertificateAuthority(mesh.root / "ca", "cluster.local")
    client_id = "spiffe://cluster.local/ns/demo/sa/client"
    tunnel = Tunnel(identity=ca.issue(client_id), trust=ca.bundle, access_log=False)
    mesh.api.run(tunnel.start)
    try:
        with tunnel.connect(
            ("::1", 8080), expect=["spiffe://cluster.local/ns/demo/sa/api"], via=("::1", 15008)
        ) as s:
            assert echo_roundtrip(s, b"over IPv6") == b"over IPv6"
    finally:
        tunnel.close()
    rec = access(mesh, mesh.b, **{"direction": "inbound", "dst.hbone_addr": "[::1]:8080"})
    assert rec["src.identity"] == client_id
    assert rec["dst.workload"] == "api" and rec["bytes_sent"] == len(b"over IPv6")


@pytest.mark.timeout(60)
def test_mesh_fixture_paths(mesh: Mesh) -> None:
    # the generated configs pass check-config as they are
    from ztun import config

    for node in ("node-a", "node-b"):
        mesh.write_config(node, mesh.config(node, policies=[str(mesh.policy_dir())]))
        loaded = config.load(Path(mesh.config_path(node)))
        assert len(loaded.config.local_workloads()) == (2 if node == "node-a" else 1)
        assert len(loaded.policies) == 3


@pytest.mark.timeout(120)
def test_sighup_replacing_a_workloads_engine_keeps_its_connections(mesh: Mesh) -> None:
    # New labels (or identity, addresses, namespace) need a new engine for the workload:
    # the old one stops accepting and keeps its live connections until they end.
    mesh.start()
    live = mesh.client.connect(("127.0.0.1", 9080))
    live.sendall(b"old")
    assert live.recv(10) == b"old"
    cfg = mesh.config("node-a")
    for w in cfg["workloads"]:
        if w["name"] == "client":
            w["labels"] = {"app": "client", "version": "v2"}
    mesh.write_config("node-a", cfg)
    mesh.a.signal(signal.SIGHUP)
    mesh.wait_log(mesh.a, lambda r: r.get("message", "").startswith("reloaded"))
    with mesh.client.connect(("127.0.0.1", 9080)) as s:  # served by the new engine
        assert echo_roundtrip(s, b"new") == b"new"
    live.sendall(b"still")
    assert live.recv(10) == b"still"
    live.close()
    dump = mesh.a.get_json("/config_dump")
    client = next(w for w in dump["workloads"] if w["name"] == "client")
    assert client["labels"] == {"app": "client", "version": "v2"} and client["running"]
    assert mesh.a.ready()[0]
