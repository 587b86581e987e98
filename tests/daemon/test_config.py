"""ztund's configuration: schema, cross-references, policy files, and ``check-config``
reporting every error at once as file:line: field: message."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ztun import config
from ztun.config import ConfigErrors, ForwardTarget, parse_address

GOOD = """\
node: node-a
trustDomain: example.org
listeners:
  admin: 127.0.0.1:15000
  metrics: 0.0.0.0:15020
drainTimeout: 45s
engine: {workers: 2, idleTimeout: 5m}
policies: [policies]
workloads:
- uid: c1//v1/Pod/demo/client
  name: client
  namespace: demo
  serviceAccount: client
  labels: {app: client}
  workloadIps: [198.18.1.11]
  protocol: HBONE
  node: node-a
  netns: /run/netns/whatever
  forwards:
  - port: 9080
    to: demo/api:8080
  - port: 9081
    to: api:8080
  - port: 9082
    to: 198.18.9.9:80
- name: api
  namespace: demo
  serviceAccount: api
  workloadIps: [198.18.2.11]
  node: node-b
- name: legacy
  namespace: demo
  workloadIps: [198.18.2.99]
  protocol: TCP
  node: node-b
"""

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["example.org/ns/demo/sa/client"]}}]
"""

BAD = """\
node: node-a
drainTimeout: 3 fortnights
listeners:
  admin: 127.0.0.1:99999
  bogus: 1
workloads:
- name: client
  namespace: demo
  workloadIps: [198.18.1.11]
  node: node-a
  netns: /run/netns/ztun-test-does-not-exist
  forwards:
  - port: 9080
    to: demo/api:8080
  - port: 9080
    to: demo/nowhere:80
  - port: 15008
    to: demo/api:8080
- name: api
  namespace: demo
  workloadIps: [198.18.1.11, 300.1.2.3]
  node: node-b
- name: db
  namespace: demo
  workloadIps: [198.18.1.12]
  node: node-a
  capture: true
policies: [policies, missing.yaml]
"""

BAD_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: demo}
spec:
  action: ALLOWED
"""


def write(tmp_path: Path, text: str, policy: str = POLICY) -> Path:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "p.yaml").write_text(policy)
    p = tmp_path / "ztund.yaml"
    p.write_text(text)
    return p


def test_good_config_loads(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, GOOD), runtime=False)
    cfg = loaded.config
    assert cfg.node == "node-a" and cfg.trust_domain == "example.org"
    assert cfg.drain_timeout == 45.0
    assert cfg.engine.idle_timeout == 300.0
    assert cfg.listeners.admin == ("127.0.0.1", 15000)
    assert cfg.listeners.metrics == ("0.0.0.0", 15020)
    assert cfg.listeners.inbound == 15008 and cfg.listeners.socks5 == 15080
    assert [w.key for w in cfg.local_workloads()] == ["demo/client"]
    client = cfg.workloads[0]
    assert str(client.spiffe_id(cfg.trust_domain)) == "spiffe://example.org/ns/demo/sa/client"
    assert cfg.identity.source == "ca" and cfg.identity.ca.cert_ttl == 24 * 3600
    targets = [cfg.resolve(client, f.to) for f in client.forwards]
    assert [(w.key if w else None, ip) for w, ip in targets] == [
        ("demo/api", "198.18.2.11"),
        ("demo/api", "198.18.2.11"),
        (None, "198.18.9.9"),
    ]
    assert len(loaded.policies) == 1
    assert loaded.policy_paths == (str(tmp_path / "policies"),)


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, BAD, BAD_POLICY)
    with pytest.raises(ConfigErrors) as ei:
        config.load(path)
    got = [str(e) for e in ei.value.errors]
    f = str(path)
    expected = [
        f"{f}:2: drainTimeout: expected a duration such as 30s, 500ms, 2m or 24h",
        f"{f}:4: listeners.admin: port must be 0..65535, got '99999'",
        f"{f}:5: listeners.bogus: unknown field",
        f"{f}:11: workloads[0].netns: /run/netns/ztun-test-does-not-exist: "
        "no such network namespace",
        f"{f}:15: workloads[0].forwards[1].port: port 9080 already used by forwards[0]",
        f"{f}:16: workloads[0].forwards[1].to: no workload demo/nowhere in this config",
        f"{f}:17: workloads[0].forwards[2].port: port 15008 is reserved for ztund's own listener",
        f"{f}:21: workloads[1].workloadIps[1]: not an IP address: '300.1.2.3'",
        f"{f}:27: workloads[2].capture: capture needs the workload's cgroup (cgroup:)",
        f"{f}:23: workloads[2].netns: a local HBONE workload needs its network namespace path",
        f"{f}:28: policies[1]: {tmp_path / 'missing.yaml'}: no such file or folder",
        f"{tmp_path / 'policies' / 'p.yaml'}:5: spec.action: unknown action 'ALLOWED' "
        "(expected ALLOW or DENY)",
    ]
    assert sorted(got) == sorted(expected)


def test_cross_field_errors_survive_schema_errors(tmp_path: Path) -> None:
    # workloads[1] has a schema error; the duplicate address of workloads[2] is still found
    text = textwrap.dedent("""\
        node: n
        workloads:
        - {name: a, namespace: x, workloadIps: [10.0.0.1], node: m}
        - {name: b, namespace: x, workloadIps: [10.0.0.2], node: m, color: red}
        - {name: c, namespace: x, workloadIps: [10.0.0.1], node: m}
        """)
    with pytest.raises(ConfigErrors) as ei:
        config.load_text(text, file="f.yaml")
    assert [str(e) for e in ei.value.errors] == [
        "f.yaml:4: workloads[1].color: unknown field",
        "f.yaml:5: workloads[2].workloadIps[0]: address 10.0.0.1 also belongs to workloads[0]",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty configuration"),
        ("- 1\n", "expected a mapping at the top level"),
        ("node: a\n---\nnode: b\n", "one YAML document expected"),
        ("node: a\nnode: b\n", "duplicate key"),
        ("node: [\n", "malformed YAML"),
        ("trustDomain: x\n", "node: Field required"),
        ("node: a\ntrustDomain: Not/Valid\n", "trustDomain:"),
        ("node: a\nidentity: {source: files}\n", "identity.files: identity source 'files'"),
    ],
)
def test_malformed_files(text: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as ei:
        config.load_text(text, file="f.yaml")
    assert message in str(ei.value)


def test_parsers() -> None:
    assert parse_address("[::1]:15000") == ("::1", 15000)
    with pytest.raises(ValueError, match="IP address literal"):
        parse_address("localhost:15000")
    assert ForwardTarget.parse("demo/api:80") == ForwardTarget(80, "demo", "api")
    assert ForwardTarget.parse("api:80") == ForwardTarget(80, None, "api")
    assert ForwardTarget.parse("[fd00::1]:80") == ForwardTarget(80, ip="fd00::1")
    assert str(ForwardTarget.parse("[fd00::1]:80")) == "[fd00::1]:80"
    for bad in ("api", "api:0", "/api:80", "Bad_Name:80"):
        with pytest.raises(ValueError):
            ForwardTarget.parse(bad)


def ztund(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ztun", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_cli_lists_all_errors(tmp_path: Path) -> None:
    path = write(tmp_path, BAD, BAD_POLICY)
    r = ztund("check-config", str(path))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[-1] == "12 error(s)"
    assert f"{path}:4: listeners.admin: port must be 0..65535, got '99999'" in lines
    assert (
        f"{path}:16: workloads[0].forwards[1].to: no workload demo/nowhere in this config" in lines
    )
    assert any(
        line.startswith(f"{tmp_path / 'policies' / 'p.yaml'}:5: spec.action:") for line in lines
    )
    assert r.stdout == ""


def test_check_config_cli_ok(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    r = ztund("check-config", "--offline", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{path}: ok (node node-a, 3 workloads, 1 local, 1 policies)"
    # without --offline the missing namespace of the local workload is an error
    r = ztund("check-config", str(path))
    assert r.returncode == 1
    assert "workloads[0].netns: /run/netns/whatever: no such network namespace" in r.stderr


def test_version_and_run_with_a_bad_file(tmp_path: Path) -> None:
    r = ztund("version")
    assert r.returncode == 0 and r.stdout.startswith("ztund ")
    path = write(tmp_path, BAD, BAD_POLICY)
    r = ztund("run", "--config", str(path))
    assert r.returncode == 2
    assert "listeners.admin: port must be 0..65535" in r.stderr


def test_bpf_cleanup_rejects_a_missing_cgroup_root(tmp_path: Path) -> None:
    r = ztund("bpf", "cleanup", "--cgroup-root", str(tmp_path / "nope"))
    assert r.returncode == 2, r
    assert "--cgroup-root" in r.stderr and "does not exist" in r.stderr, r.stderr


def test_log_formats() -> None:
    import json
    import logging

    from ztun.daemon import JsonFormatter, TextFormatter

    rec = logging.LogRecord("ztun.access", logging.INFO, __file__, 1, "connection complete",
                            None, None)  # fmt: skip
    rec.fields = {"src.addr": "198.18.1.11:4000", "dst.identity": "spiffe://td/ns/a/sa/b",
                  "error": "policy_denied: no", "bytes_sent": 5, "skipped": None}  # fmt: skip
    text = TextFormatter().format(rec)
    assert text.split("\t")[1:3] == ["info", "ztun.access"]
    assert text.endswith(
        "connection complete src.addr=198.18.1.11:4000 dst.identity=spiffe://td/ns/a/sa/b "
        'error="policy_denied: no" bytes_sent=5'
    )
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["scope"] == "ztun.access" and obj["level"] == "info"
    assert obj["message"] == "connection complete"
    assert obj["src.addr"] == "198.18.1.11:4000" and obj["bytes_sent"] == 5
    assert "skipped" not in obj


@pytest.mark.parametrize(
    ("bind", "ips", "want"),
    [
        ("0.0.0.0", ["198.18.1.11"], ["0.0.0.0"]),
        ("0.0.0.0", ["198.18.1.11", "::1"], ["0.0.0.0", "::"]),
        ("::", ["198.18.1.11"], ["::", "0.0.0.0"]),
        ("::", ["::1"], ["::"]),
        ("198.18.1.11", ["198.18.1.11", "::1"], ["198.18.1.11"]),  # an address: just it
    ],
)
def test_inbound_listeners_per_ip_family(
    tmp_path: Path, bind: str, ips: list[str], want: list[str]
) -> None:
    from ztun.daemon import _inbound_addresses

    text = GOOD.replace(
        "  metrics: 0.0.0.0:15020\n", f"  metrics: 0.0.0.0:15020\n  inboundBind: '{bind}'\n"
    )
    text = text.replace("workloadIps: [198.18.1.11]", f"workloadIps: {ips}")
    cfg = config.load(write(tmp_path, text), runtime=False).config
    client = cfg.local_workloads()[0]
    assert _inbound_addresses(cfg, client) == [(ip, 15008) for ip in want]
