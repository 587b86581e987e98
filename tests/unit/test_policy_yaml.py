"""Istio AuthorizationPolicy YAML: conversion, warnings, and located errors."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from ztun.errors import PolicyError
from ztun.policy import Action, ConnectionFacts, Match, PolicySet, StringMatch, Workload

HEAD = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: prod}
spec:
"""  # the spec body starts on line 5
SRC = HEAD + "  rules:\n  - from:\n    - source:\n"  # source fields on line 8
OP = HEAD + "  rules:\n  - to:\n    - operation:\n"  # operation fields on line 8
WHEN = HEAD + "  rules:\n  - when:\n"  # the first condition on line 7


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    f = tmp_path / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(textwrap.dedent(text))
    return f


def load_error(tmp_path: Path, text: str) -> tuple[PolicyError, Path]:
    f = write(tmp_path, text)
    with pytest.raises(PolicyError) as ei:
        PolicySet.load(f)
    return ei.value, f


# ---- errors: file, line and field -------------------------------------------------------

ERRORS = [
    # (id, yaml, line, field, message fragment)
    ("malformed", HEAD + "  rules: [\n  - {}\n", 6, None, "malformed YAML"),
    ("bad indentation", HEAD + "  action: ALLOW\n rules: []\n", 6, None, "malformed YAML"),
    ("duplicate key", HEAD + "  action: ALLOW\n  action: DENY\n", 6, "spec.action", "duplicate"),
    ("unknown spec field", HEAD + "  rulez: []\n", 5, "spec.rulez", "unknown field 'rulez'"),
    ("unknown source field",
     SRC + "        principal: [a]\n",
     8, "spec.rules[0].from[0].source.principal", "unknown field 'principal'"),
    ("unknown top-level field", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
     "metadata: {name: p}\nspecs: {}\n", 4, "specs", "unknown field"),
    ("unknown metadata field", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
     "metadata:\n  name: p\n  nmespace: x\n", 5, "metadata.nmespace", "unknown field"),
    ("list expected",
     SRC + "        principals: cluster.local/ns/a/sa/b\n",
     8, "spec.rules[0].from[0].source.principals", "expected a list of strings"),
    ("port as number",
     OP + "        ports: [8080]\n",
     8, "spec.rules[0].to[0].operation.ports[0]", "expected a string, got a number (quote it)"),
    ("yes is a boolean",
     SRC + "        namespaces: [yes]\n",
     8, "spec.rules[0].from[0].source.namespaces[0]", "got a boolean"),
    ("rule not a mapping", HEAD + "  rules:\n  - [a]\n", 6, "spec.rules[0]", "expected a mapping"),
    ("bad CIDR prefix",
     SRC + "        ipBlocks: [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
     8, "spec.rules[0].from[0].source.ipBlocks[1]", "bad CIDR '10.0.0.0/33'"),
    ("bad IP",
     SRC + "        notIpBlocks:\n        - 10.0.0.256\n",
     9, "spec.rules[0].from[0].source.notIpBlocks[0]", "bad IP address '10.0.0.256'"),
    ("bad IPv6 CIDR",
     SRC + "        ipBlocks: [\"2001:db8::/129\"]\n",
     8, "spec.rules[0].from[0].source.ipBlocks[0]", "bad CIDR"),
    ("bad port name",
     OP + "        ports: [\"http\"]\n",
     8, "spec.rules[0].to[0].operation.ports[0]", "bad port 'http'"),
    ("port out of range",
     OP + "        notPorts:\n        - \"80\"\n        - \"70000\"\n",
     10, "spec.rules[0].to[0].operation.notPorts[1]", "out of range"),
    ("negative port",
     WHEN + "    - key: destination.port\n      values: [\"-1\"]\n",
     8, "spec.rules[0].when[0].values[0]", "bad port '-1'"),
    ("star in the middle",
     SRC + "        principals: [\"cluster.local/*/sa/x\"]\n",
     8, "spec.rules[0].from[0].source.principals[0]", "'*' is only allowed"),
    ("two stars",
     SRC + "        notPrincipals: [\"**\"]\n",
     8, "spec.rules[0].from[0].source.notPrincipals[0]", "'*' is only allowed"),
    ("star both ends",
     SRC + "        namespaces: [\"*prod*\"]\n",
     8, "spec.rules[0].from[0].source.namespaces[0]", "'*' is only allowed"),
    ("bad when pattern",
     WHEN + "    - key: source.principal\n      notValues: [\"a*b\"]\n",
     8, "spec.rules[0].when[0].notValues[0]", "'*' is only allowed"),
    ("empty value",
     SRC + "        principals: [\"\"]\n",
     8, "spec.rules[0].from[0].source.principals[0]", "empty value"),
    ("wrong kind",
     "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n",
     2, "kind", "unsupported kind 'PeerAuthentication'"),
    ("wrong apiVersion", "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\n"
     "metadata: {name: p}\n", 1, "apiVersion", "unsupported apiVersion"),
    ("missing apiVersion", "kind: AuthorizationPolicy\nmetadata: {name: p}\n", 1, None,
     "apiVersion must be set"),
    ("missing name", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
     "metadata: {namespace: x}\n", 3, "metadata", "metadata.name must be set"),
    ("name with slash", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
     "metadata: {name: a/b}\n", 3, "metadata.name", "invalid name"),
    ("not a mapping", "- apiVersion: security.istio.io/v1\n", 1, None, "expected a mapping"),
    ("unknown action", HEAD + "  action: REJECT\n", 5, "spec.action", "unknown action 'REJECT'"),
    ("deny without rules", HEAD + "  action: DENY\n", 5, "spec", "DENY action without `rules`"),
    ("deny with empty rules", HEAD + "  action: DENY\n  rules: []\n", 6, "spec.rules",
     "DENY action without `rules`"),
    ("provider without CUSTOM", HEAD + "  provider: {name: x}\n", 5, "spec.provider", "provider"),
    ("dry-run not a bool", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
     "metadata:\n  name: p\n  annotations:\n    istio.io/dry-run: \"yes\"\n", 6,
     "metadata.annotations.istio.io/dry-run", "expected \"true\" or \"false\""),
    ("empty from", HEAD + "  rules:\n  - from: []\n", 6, "spec.rules[0].from", "must not be empty"),
    ("null source", SRC + "", 7, "spec.rules[0].from[0].source",
     "must be set"),
    ("empty source", HEAD + "  rules:\n  - from:\n    - source: {}\n", 7,
     "spec.rules[0].from[0].source", "must not be empty"),
    ("empty operation", HEAD + "  rules:\n  - to:\n    - operation: {ports: []}\n", 7,
     "spec.rules[0].to[0].operation", "must not be empty"),
    ("serviceAccounts with principals",
     SRC + "        principals: [a]\n        serviceAccounts: [b]\n",
     9, "spec.rules[0].from[0].source.serviceAccounts", "cannot set serviceAccounts"),
    ("bad service account",
     SRC + "        serviceAccounts: [\"a/b/c\"]\n",
     8, "spec.rules[0].from[0].source.serviceAccounts[0]", "invalid service account"),
    ("wildcard service account",
     SRC + "        notServiceAccounts: [\"ns/*\"]\n",
     8, "spec.rules[0].from[0].source.notServiceAccounts[0]", "invalid service account"),
    ("unknown when key", WHEN + "    - key: source.ipaddr\n      values: [a]\n",
     7, "spec.rules[0].when[0].key", "unknown attribute 'source.ipaddr'"),
    ("rejected when key",
     WHEN + "    - key: destination.namespace\n      values: [a]\n",
     7, "spec.rules[0].when[0].key", "replaced by the policy's metadata.namespace"),
    ("bad header key", WHEN + "    - key: request.headers\n      values: [a]\n",
     7, "spec.rules[0].when[0].key", "should have the form a[b]"),
    ("when without values", WHEN + "    - key: source.ip\n", 7,
     "spec.rules[0].when[0]", "at least one of `values` or `notValues`"),
    ("when bad CIDR", WHEN + "    - key: destination.ip\n      values: [\"1.2.3.4/40\"]\n",
     8, "spec.rules[0].when[0].values[0]", "bad CIDR"),
    ("selector wildcard", HEAD + "  selector:\n    matchLabels: {app: \"web*\"}\n", 6,
     "spec.selector.matchLabels.app", "wildcard is not supported"),
    ("selector label not a string", HEAD + "  selector:\n    matchLabels:\n      version: 2\n", 7,
     "spec.selector.matchLabels.version", "expected a string"),
    ("unknown YAML tag", HEAD + "  action: !foo ALLOW\n", 5, "spec.action", "invalid value"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [pytest.param(t, ln, f, m, id=i) for i, t, ln, f, m in ERRORS],
)
def test_errors_name_file_line_field(
    tmp_path: Path, text: str, line: int, field: str | None, fragment: str
) -> None:
    err, f = load_error(tmp_path, text)
    assert err.file == str(f)
    assert err.line == line, str(err)
    assert err.field == field, str(err)
    assert fragment in err.reason, str(err)
    # one line a human can act on: "file:line: field: reason"
    prefix = f"{f}:{line}: " + (f"{field}: " if field else "")
    assert str(err).startswith(prefix)


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_bytes(HEAD.encode() + b"  action: \xff\n")
    with pytest.raises(PolicyError, match="not UTF-8") as ei:
        PolicySet.load(f)
    assert ei.value.file == str(f)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file") as ei:
        PolicySet.load(tmp_path / "nope.yaml")
    assert ei.value.file == str(tmp_path / "nope.yaml")


def test_error_in_second_document_has_its_line(tmp_path: Path) -> None:
    text = HEAD + "  rules: [{}]\n---\n" + HEAD.replace("name: p", "name: q") + "  action: NOPE\n"
    err, _ = load_error(tmp_path, text)
    assert err.line == 11
    assert err.field == "spec.action"


def test_folder_error_names_the_bad_file_and_nothing_is_applied(tmp_path: Path) -> None:
    write(tmp_path, HEAD + "  rules: [{}]\n", "a/good.yaml")
    bad = write(
        tmp_path, HEAD.replace("name: p", "name: q") + "  rules: [{from: []}]\n", "b/bad.yml"
    )
    with pytest.raises(PolicyError) as ei:
        PolicySet.load(tmp_path)
    assert ei.value.file == str(bad)
    assert ei.value.line == 5


def test_duplicate_policy_across_files(tmp_path: Path) -> None:
    write(tmp_path, HEAD + "  rules: [{}]\n", "1.yaml")
    second = write(tmp_path, "# comment\n" + HEAD + "  rules: []\n", "2.yaml")
    with pytest.raises(PolicyError, match="duplicate policy prod/p") as ei:
        PolicySet.load(tmp_path)
    assert ei.value.file == str(second)
    assert ei.value.line == 4


def test_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    err, _ = load_error(tmp_path, "\n".join(lines) + "\n")
    assert "too large" in err.reason


# ---- conversion ---------------------------------------------------------------------------


def test_folder_multidoc_and_versions(tmp_path: Path) -> None:
    write(tmp_path, HEAD + "  rules: [{}]\n---\n# empty\n---\n"
          + HEAD.replace("v1\n", "v1beta1\n", 1).replace("name: p", "name: q") + "  rules: []\n",
          "x/one.yaml")  # fmt: skip
    write(
        tmp_path, HEAD.replace("namespace: prod", "namespace: dev") + "  rules: [{}]\n", "two.yml"
    )
    write(tmp_path, "not: yaml: at all:\n", ".hidden.yaml")
    write(tmp_path, "ignored", "notes.txt")
    ps = PolicySet.load(tmp_path)
    assert [p.key for p in ps] == ["dev/p", "prod/p", "prod/q"]
    assert ps["prod/p"].source == f"{tmp_path / 'x/one.yaml'}:3"
    assert ps["prod/p"].rule_sources == (f"{tmp_path / 'x/one.yaml'}:5",)


def test_defaults_namespace_and_action() -> None:
    ps = PolicySet.from_yaml(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
    )
    (p,) = ps
    assert (p.namespace, p.action, p.rules, p.selector) == ("default", Action.ALLOW, (), None)


def test_rule_conversion_shape() -> None:
    (p,) = PolicySet.from_yaml(
        HEAD
        + """\
  rules:
  - from:
    - source: {principals: ["a*"], notNamespaces: [x]}
    - source: {ipBlocks: ["10.0.0.0/8"], serviceAccounts: [sa]}
    to:
    - operation: {ports: ["80"], notPorts: ["81"]}
    when:
    - {key: source.ip, values: ["1.2.3.4"], notValues: ["::1"]}
    - {key: destination.port, notValues: ["22"]}
"""
    )
    (rule,) = p.rules
    to, frm, when_ip, when_port = rule
    assert to == (Match.of(destination_ports=[80], not_destination_ports=[81]),)
    assert frm == (
        Match(
            principals=(StringMatch("prefix", "a"),), not_namespaces=(StringMatch("exact", "x"),)
        ),
        Match.of(source_ips=["10.0.0.0/8"], service_accounts=["prod/sa"]),
    )
    assert when_ip == (Match.of(source_ips=["1.2.3.4/32"], not_source_ips=["::1/128"]),)
    assert when_port == (Match.of(not_destination_ports=[22]),)


def test_l7_warnings_name_policy_and_field(caplog: pytest.LogCaptureFixture) -> None:
    text = (
        HEAD
        + "  rules:\n  - to:\n    - operation: {methods: [GET], paths: [/x]}\n"
        + "---\n"
        + HEAD.replace("name: p", "name: d")
        + "  action: DENY\n  rules:\n  - from:\n    - source: {remoteIpBlocks: [1.2.3.4]}\n"
        + "    when:\n    - {key: request.auth.principal, values: [x]}\n"
    )
    with caplog.at_level(logging.WARNING, logger="ztun.policy"):
        ps = PolicySet.from_yaml(text, file="f.yaml")
    assert ps["prod/p"].rules == ()
    assert ps["prod/d"].rules == ((),)  # DENY everything, regardless of the L7 parts
    msgs = [r.getMessage() for r in caplog.records]
    assert any("f.yaml:6: policy prod/p rule 0 uses methods, paths" in m and "dropped" in m
               for m in msgs), msgs  # fmt: skip
    assert any("policy prod/d rule 0 uses remoteIpBlocks, request.auth.principal" in m
               and "denies more" in m for m in msgs), msgs  # fmt: skip
    assert len(ps.warnings) == 2


def test_skipped_policies_warn(caplog: pytest.LogCaptureFixture) -> None:
    text = (
        HEAD + "  action: CUSTOM\n  provider: {name: ext}\n  rules: [{}]\n---\n"
        + HEAD.replace("name: p", "name: q") + "  action: AUDIT\n  rules: [{}]\n---\n"
        + HEAD.replace("name: p", "name: r") + "  targetRefs: [{kind: Service, name: s}]\n"
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="ztun.policy"):
        ps = PolicySet.from_yaml(text)
    assert len(ps) == 0
    assert len(ps.warnings) == 3
    assert "CUSTOM" in ps.warnings[0] and "targetRef" in ps.warnings[2]


def test_ipv4_mapped_block_warns() -> None:
    ps = PolicySet.from_yaml(
        HEAD + '  rules:\n  - from:\n    - source: {ipBlocks: ["::ffff:10.0.0.0/104"]}\n'
    )
    assert any("IPv4-mapped" in w for w in ps.warnings)


def test_dry_run_values() -> None:
    def meta(v: str) -> str:
        return (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f'metadata:\n  name: p\n  annotations: {{istio.io/dry-run: "{v}", other: x}}\n'
        )

    assert next(iter(PolicySet.from_yaml(meta("True")))).dry_run
    assert next(iter(PolicySet.from_yaml(meta("1")))).dry_run
    assert not next(iter(PolicySet.from_yaml(meta("false")))).dry_run


def test_yaml_policy_explains_with_line() -> None:
    ps = PolicySet.from_yaml(
        HEAD + '  rules:\n  - to:\n    - operation: {ports: ["1"]}\n  - from:\n'
        '    - source: {principals: ["*"]}\n',
        file="pol.yaml",
    )
    d = ps.evaluate(ConnectionFacts.of("10.0.0.1", "10.0.0.2", 80, "spiffe://td/ns/a/sa/b",
                                       Workload("w", "prod")))  # fmt: skip
    assert (d.allowed, d.policy, d.rule, d.where) == (True, "prod/p", 1, "pol.yaml:8")
    assert str(d) == "ALLOW: allowed by policy prod/p rule 1 (pol.yaml:8)"
