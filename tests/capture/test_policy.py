"""Policy on captured traffic: a denied client sees its connection reset at once, never a
hang, and never reaches the server. HBONE (captured on both sides) is judged on the peer's
identity; plaintext (a client outside the mesh, steered to ztun's 15006 by sk_lookup) has
no identity, so only address and port rules can allow it."""

from __future__ import annotations

import pytest
from capture_rig import EngineFeatures, Mesh, need_engine_inbound

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_bpf]

DENIED = ("ECONNRESET", "ECONNREFUSED", "EPIPE")


def allow_from(principal: str | None = None, ip: str | None = None, port: int | None = None) -> str:
    source = f'principals: ["{principal}"]' if principal else f'ipBlocks: ["{ip}"]'
    to = f'\n    to: [{{operation: {{ports: ["{port}"]}}}}]' if port else ""
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: server-allow, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{{source}}}}}]{to}
"""


def test_hbone_denied_client_is_reset_not_hung(mesh: Mesh) -> None:
    mesh.start(mesh.a)
    mesh.start(mesh.b, policies=allow_from("cluster.local/ns/demo/sa/someone-else"))
    mesh.b.server("sha-server", "9000")
    for family in (4, 6):
        res = mesh.a.app("probe", mesh.b.addr(family), "9000", "secret")
        assert not res["ok"] and res["error"] in DENIED, res
        assert res["seconds"] < 5, res
    denied = mesh.wait_close(mesh.b, lambda e: e.mode == 4 and e.http_status == 401)
    assert denied.peer_id == mesh.a.spiffe_id and denied.reason == "policy_denied"
    assert all(e.bytes_sent == 0 for e in mesh.closes(mesh.b))  # nothing reached the app


def test_hbone_allowed_by_identity(mesh: Mesh) -> None:
    mesh.start(mesh.a)
    mesh.start(mesh.b, policies=allow_from("cluster.local/ns/demo/sa/client"))
    mesh.b.server("sha-server", "9000")
    res = mesh.a.app("sha-client", mesh.b.node.ip4, "9000", str(1 << 20))
    assert res["ok"], res


def test_plaintext_without_identity_is_denied_by_principal_rules(
    mesh: Mesh, engine: EngineFeatures
) -> None:
    mesh.start(mesh.b, policies=allow_from("cluster.local/ns/demo/sa/client"))
    mesh.b.server("sha-server", "9000")
    # A is not in the mesh: its plaintext connect is steered to B's ztun (sk_lookup).
    res = mesh.a.app("probe", mesh.b.node.ip4, "9000", "secret", captured=False)
    need_engine_inbound(engine)
    assert not res["ok"] and res["error"] in DENIED and res["seconds"] < 5, res
    ev = mesh.wait_close(mesh.b, lambda e: e.mode == 1)
    assert ev.reason == "policy_denied" and ev.peer_id is None
    assert ev.src is not None and ev.src[0] == mesh.a.node.ip4  # the original source
    assert ev.dst == (mesh.b.node.ip4, 9000)  # the original destination


@pytest.mark.parametrize("family", [4, 6])
def test_plaintext_allowed_by_address_and_port(
    mesh: Mesh, engine: EngineFeatures, family: int
) -> None:
    src = mesh.a.addr(family)
    mesh.start(mesh.b, policies=allow_from(ip=src, port=9000))
    mesh.b.server("sha-server", "9000")
    mesh.b.server("sha-server", "9001")
    ok = mesh.a.app("sha-client", mesh.b.addr(family), "9000", str(1 << 20), captured=False)
    need_engine_inbound(engine)
    assert ok["ok"], ok
    other_port = mesh.a.app("probe", mesh.b.addr(family), "9001", "x", captured=False)
    assert not other_port["ok"] and other_port["error"] in DENIED, other_port
    st = mesh.b.capture.stats() if mesh.b.capture else {}
    assert st["in_plaintext"] >= 2
