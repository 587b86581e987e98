"""The policy model: matchers, builder API, scope, the explain API, and yamlpos."""

from __future__ import annotations

import ipaddress

import pydantic
import pytest

from ztun.errors import ConfigError, PolicyError
from ztun.policy import (
    Action,
    AuthorizationPolicy,
    ConnectionFacts,
    Match,
    PolicySet,
    Reason,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    Workload,
    clause,
    rule,
)
from ztun.yamlpos import format_path, load_documents

WEB = Workload("web", "prod", "web", {"app": "web"}, ("10.1.0.5",))
PEER = "spiffe://cluster.local/ns/prod/sa/frontend"


def facts(port: int = 8080, peer: str | None = PEER, wl: Workload | None = WEB) -> ConnectionFacts:
    return ConnectionFacts.of("10.0.0.1", "10.1.0.5", port, peer, wl)


@pytest.mark.parametrize(
    ("pattern", "kind", "value", "yes", "no"),
    [
        ("abc", "exact", "abc", "abc", "abcd"),
        ("abc*", "prefix", "abc", "abcd", "xabc"),
        ("*abc", "suffix", "abc", "xabc", "abcx"),
        ("*", "presence", "", "x", ""),
    ],
)
def test_string_match(pattern: str, kind: str, value: str, yes: str, no: str) -> None:
    m = StringMatch.parse(pattern)
    assert (m.kind, m.value, str(m)) == (kind, value, pattern)
    assert m.matches(yes)
    assert not m.matches(no)


@pytest.mark.parametrize("bad", ["", "a*b", "**", "*a*", "a**", 3])
def test_string_match_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        StringMatch.parse(bad)  # type: ignore[arg-type]


def test_service_account_parse() -> None:
    assert ServiceAccountMatch.parse("sa", "prod") == ServiceAccountMatch("prod", "sa")
    assert ServiceAccountMatch.parse("ns/sa", "prod") == ServiceAccountMatch("ns", "sa")
    for bad in ("", "a/b/c", "/sa", "ns/", "ns/*"):
        with pytest.raises(ValueError):
            ServiceAccountMatch.parse(bad, "prod")


def test_match_of_converts_and_names_the_bad_field() -> None:
    m = Match.of(
        principals=["td/ns/a/sa/*"],
        service_accounts=["b"],
        source_ips=["10.0.0.1"],
        not_destination_ports=["22", 23],
        namespace="a",
    )
    assert m.principals == (StringMatch("prefix", "td/ns/a/sa/"),)
    assert m.service_accounts == (ServiceAccountMatch("a", "b"),)
    assert m.source_ips == (ipaddress.ip_network("10.0.0.1/32"),)
    assert m.not_destination_ports == (22, 23)
    with pytest.raises(PolicyError) as ei:
        Match.of(destination_ips=["10.0.0.0/8", "nope"])
    assert ei.value.field == "destination_ips[1]"
    with pytest.raises(PolicyError, match="got a string"):
        Match.of(principals="a")  # a string is not a list of patterns
    with pytest.raises(PolicyError):
        Match.of(destination_ports=[True])
    assert Match().is_empty() and not m.is_empty()


def test_builder() -> None:
    p = AuthorizationPolicy.allow(
        "web",
        "prod",
        rule(
            Match.of(namespaces=["prod"]),
            [Match.of(destination_ports=[80]), Match.of(destination_ports=[8080])],
        ),
        selector={"app": "web"},
    )  # fmt: skip
    assert p.key == "prod/web"
    assert p.rules[0][1] == clause(
        Match.of(destination_ports=[80]), Match.of(destination_ports=[8080])
    )
    ps = PolicySet([p])
    assert ps.scope(p) is Scope.WORKLOAD_SELECTOR
    d = ps.evaluate(facts())
    assert (d.allowed, d.policy, d.rule, d.reason) == (
        True,
        "prod/web",
        0,
        Reason.ALLOWED_BY_POLICY,
    )
    assert str(d) == "ALLOW: allowed by policy prod/web rule 0"
    assert not ps.evaluate(facts(port=81)).allowed


def test_policy_validation() -> None:
    with pytest.raises(PolicyError, match="name"):
        AuthorizationPolicy("", "prod", Action.ALLOW)
    with pytest.raises(PolicyError, match="namespace"):
        AuthorizationPolicy("a", "x/y", Action.ALLOW)
    with pytest.raises(PolicyError, match="expected a Match"):
        AuthorizationPolicy("a", "b", Action.ALLOW, rules=((("not a match",),),))  # type: ignore[arg-type]
    p = AuthorizationPolicy.allow("a", "prod")
    with pytest.raises(PolicyError, match="duplicate policy prod/a"):
        PolicySet([p, AuthorizationPolicy.deny("a", "prod", rule())])


def test_scope_and_applicable() -> None:
    mesh = AuthorizationPolicy.deny("m", "istio-system", rule())
    ns = AuthorizationPolicy.deny("n", "prod", rule())
    sel = AuthorizationPolicy.deny("s", "prod", rule(), selector={"app": "web"})
    other = AuthorizationPolicy.deny("o", "dev", rule())
    ps = PolicySet([sel, other, ns, mesh])
    assert [ps.scope(p) for p in (mesh, ns, sel)] == [
        Scope.GLOBAL,
        Scope.NAMESPACE,
        Scope.WORKLOAD_SELECTOR,
    ]
    assert ps.applicable(WEB) == (ns, mesh, sel)
    assert ps.applicable(None) == (mesh,)
    assert [p.key for p in ps] == ["dev/o", "istio-system/m", "prod/n", "prod/s"]
    assert PolicySet([mesh], root_namespace="elsewhere").scope(mesh) is Scope.NAMESPACE


def test_dry_run_explain() -> None:
    ps = PolicySet([AuthorizationPolicy.deny("d", "prod", rule(), dry_run=True)])
    d = ps.evaluate(facts())
    assert d.allowed and d.dry_run is not None
    assert (d.dry_run.allowed, d.dry_run.policy, d.dry_run.matched) == (
        False,
        "prod/d",
        ("prod/d",),
    )
    assert str(d) == (
        "ALLOW: allowed: no ALLOW policy applies; dry-run matched prod/d and would deny"
    )


def test_facts_canonicalize_addresses() -> None:
    f = ConnectionFacts.of("::ffff:10.0.0.1", "10.1.0.5", 1)
    assert f.src_ip == ipaddress.ip_address("10.0.0.1")
    with pytest.raises(ValueError):
        ConnectionFacts.of("10.0.0.1", "10.0.0.2", 70000)


def test_policy_set_is_immutable_and_sorted() -> None:
    ps = PolicySet([AuthorizationPolicy.allow("b", "x"), AuthorizationPolicy.allow("a", "x")])
    assert [p.name for p in ps.policies] == ["a", "b"]
    assert len(ps) == 2 and ps["x/a"].name == "a"


# ---- yamlpos ------------------------------------------------------------------------------


def test_yamlpos_marks_and_paths() -> None:
    (doc,) = load_documents("a:\n  b:\n    - 1\n    - {c: x}\n", file="f.yaml")
    assert doc.data == {"a": {"b": [1, {"c": "x"}]}}
    assert doc.line(("a", "b", 1, "c")) == 4
    assert doc.line(("a", "b", 0)) == 3
    assert doc.line(("a", "missing", 7)) == 2  # nearest ancestor that exists
    assert doc.key_mark(("a",)).line == 1
    assert format_path(("a", "b", 1, "c")) == "a.b[1].c"
    err = doc.error(("a", "b", 1, "c"), "bad")
    assert str(err) == "f.yaml:4: a.b[1].c: bad"


def test_yamlpos_pydantic_errors() -> None:
    class Inner(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        port: int

    class Outer(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        listeners: list[Inner]

    (doc,) = load_documents("listeners:\n  - port: 1\n  - port: x\n", file="c.yaml")
    with pytest.raises(pydantic.ValidationError) as ei:
        Outer.model_validate(doc.data)
    err = doc.pydantic_error(ei.value)
    assert (err.file, err.line, err.field) == ("c.yaml", 3, "listeners[1].port")
    assert type(err) is ConfigError

    (doc,) = load_documents("listeners: []\nextra: 1\n", file="c.yaml")
    with pytest.raises(pydantic.ValidationError) as ei:
        Outer.model_validate(doc.data)
    err = doc.pydantic_error(ei.value, cls=PolicyError)
    assert (err.line, err.field, type(err)) == (2, "extra", PolicyError)


def test_yamlpos_rejects_deep_nesting() -> None:
    with pytest.raises(ConfigError, match="nested deeper"):
        load_documents("[" * 100 + "]" * 100)
