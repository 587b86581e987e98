"""The C policy evaluator against the Python model: corpus, random sets, hostile blobs."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztun._core._policy import CompiledPolicy
from ztun.errors import EngineError
from ztun.policy import (
    Action,
    AuthorizationPolicy,
    ConnectionFacts,
    Match,
    PolicySet,
    Reason,
    ServiceAccountMatch,
    StringMatch,
    Workload,
)

CORPUS = Path(__file__).parents[1] / "policy_corpus.yaml"

WORKLOADS = {
    "web": Workload("web", "prod", "web", {"app": "web", "tier": "front"}, ("10.1.0.5", "fd00::5")),
    "db": Workload("db", "prod", "db", {"app": "db"}, ("10.1.0.6",)),
    "api": Workload("api", "staging", "api", {"app": "web"}, ("10.2.0.5",)),
    "sys": Workload("sys", "istio-system", "sys", {"app": "sys"}, ("10.9.0.1",)),
}
DEFAULT_CONN: dict[str, Any] = {
    "src": "10.0.0.1",
    "dst": "10.1.0.5",
    "port": 8080,
    "peer": "spiffe://cluster.local/ns/prod/sa/frontend",
    "workload": "web",
}


# ---- corpus -----------------------------------------------------------------------------


def _clause(raw: Any, ns: str) -> tuple[Match, ...]:
    if isinstance(raw, dict):
        return (Match.of(**raw, namespace=ns),)
    return tuple(Match.of(**m, namespace=ns) for m in raw)


def _rule(raw: Any, ns: str) -> tuple[tuple[Match, ...], ...]:
    if isinstance(raw, dict):
        return (_clause(raw, ns),)
    return tuple(_clause(c, ns) for c in raw)


def corpus_set(entry: dict[str, Any]) -> PolicySet:
    root = entry.get("root", "istio-system")
    if "istio" in entry:
        return PolicySet.from_yaml(entry["istio"], file=entry["name"], root_namespace=root)
    policies = [
        AuthorizationPolicy(
            name=p["name"],
            namespace=p["namespace"],
            action=Action(p["action"]),
            rules=tuple(_rule(r, p["namespace"]) for r in p.get("rules", [])),
            selector=p.get("selector"),
            dry_run=p.get("dry_run", False),
        )
        for p in entry["policies"]
    ]
    return PolicySet(policies, root_namespace=root)


def corpus_facts(overrides: dict[str, Any] | None) -> ConnectionFacts:
    c = {**DEFAULT_CONN, **(overrides or {})}
    wl = WORKLOADS[c["workload"]] if c["workload"] is not None else None
    return ConnectionFacts.of(c["src"], c["dst"], c["port"], c["peer"], wl)


def load_corpus() -> list[Any]:
    entries = yaml.safe_load(CORPUS.read_text())
    return [
        pytest.param(entry, check, id=f"{entry['name']}[{i}]")
        for entry in entries
        for i, check in enumerate(entry["checks"])
    ]


CASES = load_corpus()


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 80


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One engine's answer in a shape both engines share."""

    allowed: bool
    reason: Reason
    policy: str | None
    rule: int | None
    dry: tuple[bool, str | None, int | None, int] | None  # allowed, policy, rule, n matched


def python_outcome(pset: PolicySet, facts: ConnectionFacts) -> tuple[Outcome, Any]:
    d = pset.evaluate(facts)
    dry = None
    if d.dry_run is not None:
        dry = (d.dry_run.allowed, d.dry_run.policy, d.dry_run.rule, len(d.dry_run.matched))
    return Outcome(d.allowed, d.reason, d.policy, d.rule, dry), d


def c_outcome(cp: CompiledPolicy, facts: ConnectionFacts) -> tuple[Outcome, Any]:
    v = cp.evaluate(facts)
    dry = None
    if v.dry_run_evaluated:
        dry = (v.dry_run_allowed, v.dry_run_policy, v.dry_run_rule, v.dry_run_matched)
    return Outcome(v.allowed, v.reason, v.policy, v.rule, dry), v


@pytest.fixture(params=["python", "c"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize(("entry", "check"), CASES)
def test_corpus(engine: str, entry: dict[str, Any], check: dict[str, Any]) -> None:
    pset = corpus_set(entry)
    facts = corpus_facts(check.get("conn"))
    if engine == "python":
        out, raw = python_outcome(pset, facts)
    else:
        out, raw = c_outcome(CompiledPolicy(pset.compile(WORKLOADS.values())), facts)
    exp = check["expect"]
    assert out.allowed is exp["allow"], raw
    if "policy" in exp:
        assert out.policy == exp["policy"], raw
    if "rule" in exp:
        assert out.rule == exp["rule"], raw
    if "reason" in exp:
        assert out.reason is Reason[exp["reason"]], raw
    if "dry_run" in exp:
        want = exp["dry_run"]
        if want == "none":
            assert out.dry is None, raw
        else:
            assert out.dry is not None, raw
            assert out.dry[0] is want["allowed"], raw
            if "policy" in want:
                assert out.dry[1] == want["policy"], raw
            if "rule" in want:
                assert out.dry[2] == want["rule"], raw
            assert out.dry[3] == len(want["matched"]), raw
            if engine == "python":
                assert list(raw.dry_run.matched) == want["matched"]


# ---- differential: random policy sets -----------------------------------------------------

NAMESPACES = ["prod", "dev", "istio-system"]
PRINCIPALS = [
    f"{td}/ns/{ns}/sa/{sa}" for td in ("cluster.local", "td2") for ns in NAMESPACES for sa in "ab"
]
PEERS = [None, "spiffe://td2/x", "nospiffe/ns/prod/sa/a", "spiffe://", "spiffe://a/ns//sa/"]
PEERS += ["spiffe://cluster.local/ns/prod/sa/a/b"] + [f"spiffe://{p}" for p in PRINCIPALS]
V4 = [f"10.0.0.{i}" for i in (0, 1, 2, 3, 128, 255)] + ["10.0.1.0", "192.0.2.1"]
V6 = ["2001:db8::", "2001:db8::1", "2001:db8::ff", "2001:db8:0:1::", "fe80::1"]
ADDRS = V4 + V6 + ["::ffff:10.0.0.1"]
PORTS = [0, 80, 443, 8080, 65535]
LABELS = [{}, {"app": "a"}, {"app": "b"}, {"app": "a", "v": "1"}]
HYPO_WORKLOADS = [
    Workload(f"w{i}", ns, labels=lab, ips=(f"10.3.{i}.1",))
    for i, (ns, lab) in enumerate((ns, lab) for ns in NAMESPACES for lab in LABELS)
]

st_string_match = st.one_of(
    st.just(StringMatch("presence")),
    st.builds(lambda s: StringMatch("exact", s), st.sampled_from(PRINCIPALS + NAMESPACES)),
    st.builds(
        lambda s, n: StringMatch("prefix", s[: max(1, n)]),
        st.sampled_from(PRINCIPALS + NAMESPACES), st.integers(1, 30),
    ),
    st.builds(
        lambda s, n: StringMatch("suffix", s[-max(1, n):]),
        st.sampled_from(PRINCIPALS + NAMESPACES), st.integers(1, 30),
    ),
)  # fmt: skip
st_sa = st.builds(ServiceAccountMatch, st.sampled_from(NAMESPACES), st.sampled_from("ab"))
st_net = st.one_of(
    st.builds(
        lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False),
        st.sampled_from(V4), st.integers(0, 32),
    ),
    st.builds(
        lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False),
        st.sampled_from(V6), st.integers(0, 128),
    ),
    st.builds(
        lambda p: ipaddress.ip_network(f"::ffff:10.0.0.0/{p}", strict=False), st.integers(96, 128)
    ),
)  # fmt: skip


def _lst(s: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(st.just(()), st.lists(s, min_size=1, max_size=3).map(tuple))


st_match = st.builds(
    Match,
    principals=_lst(st_string_match), not_principals=_lst(st_string_match),
    namespaces=_lst(st_string_match), not_namespaces=_lst(st_string_match),
    service_accounts=_lst(st_sa), not_service_accounts=_lst(st_sa),
    source_ips=_lst(st_net), not_source_ips=_lst(st_net),
    destination_ips=_lst(st_net), not_destination_ips=_lst(st_net),
    destination_ports=_lst(st.sampled_from(PORTS)),
    not_destination_ports=_lst(st.sampled_from(PORTS)),
)  # fmt: skip
st_rule = st.lists(st.lists(st_match, max_size=3).map(tuple), max_size=3).map(tuple)


@st.composite
def st_policy_set(draw: st.DrawFn) -> PolicySet:
    n = draw(st.integers(0, 8))
    policies = []
    for i in range(n):
        policies.append(
            AuthorizationPolicy(
                name=f"p{i}",
                namespace=draw(st.sampled_from(NAMESPACES)),
                action=draw(st.sampled_from(Action)),
                rules=draw(st.lists(st_rule, max_size=3).map(tuple)),
                selector=draw(st.one_of(st.none(), st.sampled_from(LABELS))),
                dry_run=draw(st.booleans()),
            )
        )
    return PolicySet(policies)


st_facts = st.builds(
    ConnectionFacts.of,
    st.sampled_from(ADDRS), st.sampled_from(ADDRS), st.sampled_from(PORTS),
    st.sampled_from(PEERS), st.one_of(st.none(), st.sampled_from(HYPO_WORKLOADS)),
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st_policy_set(), st.lists(st_facts, min_size=1, max_size=8))
def test_python_and_c_agree(pset: PolicySet, conns: list[ConnectionFacts]) -> None:
    cp = CompiledPolicy(pset.compile(HYPO_WORKLOADS))
    for facts in conns:
        py, d = python_outcome(pset, facts)
        c, v = c_outcome(cp, facts)
        assert py == c, (facts, d, v)


# ---- counters, names, lookup -------------------------------------------------------------


def _two_policy_set() -> PolicySet:
    return PolicySet(
        [
            AuthorizationPolicy.allow("a", "prod", ((Match.of(destination_ports=[80]),),)),
            AuthorizationPolicy.deny("d", "prod", ((Match.of(destination_ports=[22]),),)),
            AuthorizationPolicy.deny("dry", "prod", ((),), dry_run=True),
        ]
    )


def test_counters_and_carry() -> None:
    pset = _two_policy_set()
    web = WORKLOADS["web"]
    cp = CompiledPolicy(pset.compile([web]))
    for port, times in ((80, 3), (22, 2), (9, 1)):
        for _ in range(times):
            cp.evaluate(ConnectionFacts.of("10.0.0.1", "10.1.0.5", port, None, web), count=True)
    cp.evaluate(ConnectionFacts.of("10.0.0.1", "10.1.0.5", 80, None, web))  # not counted
    assert cp.counters() == {"prod/a": (3, 0, 0), "prod/d": (0, 2, 0), "prod/dry": (0, 0, 6)}
    assert cp.default_counters() == (0, 1)

    # a swap: "prod/a" survives, "prod/d" goes, "prod/new" comes
    new = PolicySet([pset["prod/a"], AuthorizationPolicy.allow("new", "prod")])
    cp2 = CompiledPolicy(new.compile([web]))
    cp2.carry_counters_from(cp)
    assert cp2.counters() == {"prod/a": (3, 0, 0), "prod/new": (0, 0, 0)}
    assert cp2.default_counters() == (0, 1)


def test_names_and_find_workload() -> None:
    cp = CompiledPolicy(_two_policy_set().compile(WORKLOADS.values()))
    assert cp.policy_names == ("prod/a", "prod/d", "prod/dry")
    assert cp.workload_names[:-1] == ("prod/web", "prod/db", "staging/api", "istio-system/sys")
    assert cp.workload_names[-1] == ""
    assert cp.find_workload("10.1.0.5") == "prod/web"
    assert cp.find_workload("fd00::5") == "prod/web"
    assert cp.find_workload("::ffff:10.2.0.5") == "staging/api"
    assert cp.find_workload("10.1.0.7") is None
    assert cp.find_workload("::") is None
    assert cp.workload_index("staging/api") == 2
    assert cp.workload_index("") is None  # the default is reached with -1, not by name
    assert cp.workload_index("staging/nope") is None


def test_default_workload_is_used_for_unknown_destinations() -> None:
    pset = PolicySet(
        [AuthorizationPolicy.allow("only-80", "app", ((Match.of(destination_ports=[80]),),))]
    )
    me = Workload("me", "app")
    unknown = ConnectionFacts.of("10.0.0.1", "127.0.0.1", 81)
    assert CompiledPolicy(pset.compile()).evaluate(unknown).allowed  # mesh-wide only
    cp = CompiledPolicy(pset.compile(default=me))
    assert not cp.evaluate(unknown).allowed
    assert cp.evaluate(ConnectionFacts.of("10.0.0.1", "127.0.0.1", 80)).policy == "app/only-80"


def test_compile_rejects_conflicting_workloads() -> None:
    from ztun.errors import PolicyError

    a = Workload("a", "ns", ips=("10.0.0.1",))
    with pytest.raises(PolicyError, match="belongs to both"):
        PolicySet().compile([a, Workload("b", "ns", ips=("10.0.0.1",))])
    with pytest.raises(PolicyError, match="given twice"):
        PolicySet().compile([a, a])


def test_bench_runs_in_c() -> None:
    cp = CompiledPolicy(_two_policy_set().compile([WORKLOADS["web"]]))
    ns = cp.bench(ConnectionFacts.of("10.0.0.1", "10.1.0.5", 80, None, WORKLOADS["web"]), 1000)
    assert ns > 0
    assert cp.counters()["prod/a"][0] == 1000


# ---- hostile blobs ------------------------------------------------------------------------


def _probe(blob: bytes) -> None:
    """Load; if accepted, exercise it. Rejection must be an EngineError, never a crash."""
    try:
        cp = CompiledPolicy(blob)
    except EngineError as e:
        assert e.code < 0
        return
    for wl in (None, WORKLOADS["web"]):
        for peer in (None, "spiffe://cluster.local/ns/prod/sa/a"):
            cp.evaluate(ConnectionFacts.of("10.0.0.1", "10.1.0.5", 80, peer, wl), count=True)
    cp.find_workload("10.1.0.5")
    cp.counters()


def _rich_blob() -> bytes:
    text = (Path(__file__).parents[1] / "policy_corpus.yaml").read_text()
    entries = yaml.safe_load(text)
    policies = [p for e in entries if "istio" not in e for p in corpus_set(e).policies]
    unique = {p.key: p for p in policies}
    return PolicySet(unique.values()).compile(WORKLOADS.values())


def test_valid_blob_loads() -> None:
    blob = _rich_blob()
    assert CompiledPolicy(blob).policy_names


def test_garbage_is_rejected() -> None:
    rng = random.Random(1)
    for n in (0, 1, 15, 16, 17, 100, 172, 4096):
        for _ in range(20):
            with pytest.raises(EngineError):
                CompiledPolicy(bytes(rng.getrandbits(8) for _ in range(n)))


def test_truncated_blobs_are_rejected() -> None:
    blob = _rich_blob()
    for n in range(len(blob)):
        with pytest.raises(EngineError):
            CompiledPolicy(blob[:n])
    with pytest.raises(EngineError):
        CompiledPolicy(blob + b"\0")


def test_bit_flips_never_crash() -> None:
    blob = PolicySet(
        [
            AuthorizationPolicy.allow(
                "a", "prod",
                ((Match.of(principals=["x*"], source_ips=["10.0.0.0/8"], destination_ports=[80],
                           service_accounts=["prod/a"]),),),
                selector={"app": "web"},
            ),
            AuthorizationPolicy.deny("d", "prod", ((), ), dry_run=True),
        ]
    ).compile(WORKLOADS.values())  # fmt: skip
    for bit in range(len(blob) * 8):
        b = bytearray(blob)
        b[bit // 8] ^= 1 << (bit % 8)
        _probe(bytes(b))


def test_random_mutations_never_crash() -> None:
    blob = _rich_blob()
    rng = random.Random(42)
    for _ in range(3000):
        b = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            kind = rng.random()
            if kind < 0.5:
                b[i] = rng.getrandbits(8)
            elif kind < 0.8 and i + 4 <= len(b):
                # interesting u32s: boundaries that catch off-by-one and overflow checks
                struct.pack_into("<I", b, i, rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, len(b)]))
            else:
                del b[i]
        _probe(bytes(b))


def test_concurrent_readers_count_exactly() -> None:
    """Threads evaluate one table at once (GIL released in bench): no lost counter update."""
    import threading

    cp = CompiledPolicy(_two_policy_set().compile([WORKLOADS["web"]]))
    facts = ConnectionFacts.of("10.0.0.1", "10.1.0.5", 80, None, WORKLOADS["web"])
    threads = [threading.Thread(target=cp.bench, args=(facts, 200_000)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cp.counters()["prod/a"] == (800_000, 0, 0)
    assert cp.counters()["prod/dry"] == (0, 0, 800_000)
