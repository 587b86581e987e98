"""Policy evaluation cost per connection: the C evaluator (GIL released, loop in C) against
the Python reference model, with 1, 100 and 10,000 policies.

common: policies spread over namespaces (4 per namespace: namespace ALLOW, namespace
        DENY, two selector policies), the connection's destination sees 3 of them.
worst:  every policy is mesh-wide and none matches, so all of them are evaluated.

``extra_info["ns_per_eval"]`` is the figure to read; for C it is the mean time of one
``bench()`` call divided by its iterations (no Python in the loop).
"""

from __future__ import annotations

import ipaddress
from functools import cache

import pytest
from conftest import KNOBS, interleaved, zload_client

from ztun import Tunnel
from ztun._core._policy import CompiledPolicy
from ztun.policy import AuthorizationPolicy, ConnectionFacts, Match, PolicySet, Workload, rule

SIZES = [1, 100, 10_000]
GATEWAY = "cluster.local/ns/gw/sa/in"
OTHER = "cluster.local/ns/other/sa"


def _ip(n: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + n))


@cache
def common(n: int) -> tuple[PolicySet, CompiledPolicy, ConnectionFacts]:
    k = max(1, n // 4)
    policies: list[AuthorizationPolicy] = []
    workloads: list[Workload] = []
    for i in range(k):
        ns = f"ns-{i}"
        policies += [
            AuthorizationPolicy.allow(
                "allow", ns,
                rule(
                    Match.of(principals=[f"cluster.local/ns/{ns}/sa/*", GATEWAY]),
                    Match.of(destination_ports=[8080, 8443]),
                ),
            ),
            AuthorizationPolicy.deny("deny-ssh", ns, rule(Match.of(destination_ports=[22]))),
            AuthorizationPolicy.deny(
                "db", ns, rule(Match.of(not_namespaces=[ns])), selector={"app": "db"}
            ),
            AuthorizationPolicy.allow(
                "web", ns, rule(Match.of(namespaces=["frontend"], destination_ports=[8080])),
                selector={"app": "web"},
            ),
        ]  # fmt: skip
        workloads += [
            Workload("web", ns, labels={"app": "web"}, ips=(_ip(2 * i),)),
            Workload("db", ns, labels={"app": "db"}, ips=(_ip(2 * i + 1),)),
        ]
    pset = PolicySet(policies[:n])
    cp = CompiledPolicy(pset.compile(workloads))
    facts = ConnectionFacts.of(
        "10.200.0.1", _ip(0), 8080, "spiffe://cluster.local/ns/ns-0/sa/client", workloads[0]
    )
    return pset, cp, facts


@cache
def worst(n: int) -> tuple[PolicySet, CompiledPolicy, ConnectionFacts]:
    policies = [
        AuthorizationPolicy.allow(
            f"p{j:05d}", "istio-system",
            rule(Match.of(principals=[f"{OTHER}/sa-{j}"], destination_ports=[8080])),
        )
        for j in range(n)
    ]  # fmt: skip
    web = Workload("web", "prod", labels={"app": "web"}, ips=("10.1.0.5",))
    pset = PolicySet(policies)
    cp = CompiledPolicy(pset.compile([web]))
    facts = ConnectionFacts.of(
        "10.200.0.1", "10.1.0.5", 8080, "spiffe://cluster.local/ns/prod/sa/x", web
    )
    return pset, cp, facts


def _iterations(n: int, kind: str) -> int:
    return 2_000 if kind == "worst" and n >= 10_000 else 200_000


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["common", "worst"])
def test_policy_eval_c(benchmark: pytest.FixtureRequest, kind: str, n: int) -> None:
    _, cp, facts = (common if kind == "common" else worst)(n)
    iters = _iterations(n, kind)
    v = cp.evaluate(facts)
    assert v.allowed is (kind == "common")
    benchmark.group = f"policy-{kind}"  # type: ignore[attr-defined]
    benchmark.pedantic(cp.bench, args=(facts, iters), rounds=10, warmup_rounds=1)  # type: ignore[attr-defined]
    if benchmark.stats is None:  # type: ignore[attr-defined]  # --benchmark-disable
        return
    ns = benchmark.stats.stats.mean * 1e9 / iters  # type: ignore[attr-defined]
    benchmark.extra_info.update(  # type: ignore[attr-defined]
        {"engine": "c", "policies": n, "ns_per_eval": round(ns, 1)}
    )


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["common", "worst"])
def test_policy_eval_python(benchmark: pytest.FixtureRequest, kind: str, n: int) -> None:
    pset, _, facts = (common if kind == "common" else worst)(n)
    assert pset.evaluate(facts).allowed is (kind == "common")
    benchmark.group = f"policy-{kind}"  # type: ignore[attr-defined]
    rounds = 5 if n >= 10_000 else 200
    benchmark.pedantic(pset.evaluate, args=(facts,), rounds=rounds, warmup_rounds=1)  # type: ignore[attr-defined]
    if benchmark.stats is None:  # type: ignore[attr-defined]  # --benchmark-disable
        return
    ns = benchmark.stats.stats.mean * 1e9  # type: ignore[attr-defined]
    benchmark.extra_info.update(  # type: ignore[attr-defined]
        {"engine": "python", "policies": n, "ns_per_eval": round(ns, 1)}
    )


@pytest.mark.parametrize("n", [10_000])
def test_policy_compile(benchmark: pytest.FixtureRequest, n: int) -> None:
    """Compile + load time for 10,000 policies (what a policy update costs)."""
    pset, _, _ = common(n)
    workloads = [Workload("web", f"ns-{i}", labels={"app": "web"}) for i in range(n // 4)]

    def compile_and_load() -> CompiledPolicy:
        return CompiledPolicy(pset.compile(workloads))

    benchmark.pedantic(compile_and_load, rounds=3, warmup_rounds=0)  # type: ignore[attr-defined]
    benchmark.extra_info["policies"] = n  # type: ignore[attr-defined]


# ---- in the engine: connection setup through a policy-checked forward --------------------
#
# What a policy costs a new connection end to end: zload's sequential connect + 1-byte
# exchange + close through an in-process Tunnel plaintext forward, interleaved rounds over
#   forward         no policy flag (the engine never calls the evaluator)
#   policy-none     forward(policy=True), no table (authorize returns at once)
#   common-10000    10,000 policies over 2,500 namespaces; the forward's workload sees 3
#   worst-10000     10,000 mesh-wide DENY policies, none matching: all are evaluated
# The evaluator itself costs ns (test_policy_eval_c); a connection costs tens of µs, so
# these should agree within noise — the point is to show it, not to time the evaluator.

CONN_VARIANTS = ("forward", "policy-none", "common-10000", "worst-10000")
CONN_PAIRS = interleaved(CONN_VARIANTS, KNOBS.rounds)
LOCAL_WL = Workload("web", "ns-0", labels={"app": "web"})


def _common_local(n: int) -> PolicySet:
    policies: list[AuthorizationPolicy] = []
    for i in range(max(1, n // 4)):
        ns = f"ns-{i}"
        policies += [
            AuthorizationPolicy.allow(
                "allow-local", ns, rule(Match.of(source_ips=["127.0.0.0/8"]))
            ),
            AuthorizationPolicy.deny("deny-ssh", ns, rule(Match.of(destination_ports=[22]))),
            AuthorizationPolicy.deny(
                "db", ns, rule(Match.of(not_namespaces=[ns])), selector={"app": "db"}
            ),
            AuthorizationPolicy.allow(
                "web", ns, rule(Match.of(namespaces=["frontend"])), selector={"app": "web"}
            ),
        ]  # fmt: skip
    return PolicySet(policies[:n])


def _worst_local(n: int) -> PolicySet:
    return PolicySet(
        AuthorizationPolicy.deny(
            f"p{j:05d}", "istio-system", rule(Match.of(principals=[f"{OTHER}/sa-{j}"]))
        )
        for j in range(n)
    )


@pytest.fixture(scope="module")
def policy_forwards(dest_server: tuple[str, int]):
    tunnels: list[Tunnel] = []
    dials: dict[str, tuple[str, int]] = {}
    try:
        for name, pset, flag in (
            ("forward", None, False),
            ("policy-none", None, True),
            ("common-10000", _common_local(10_000), True),
            ("worst-10000", _worst_local(10_000), True),
        ):
            t = Tunnel(workers=1, policies=pset, workload=LOCAL_WL, access_log=False).start()
            tunnels.append(t)
            dials[name] = t.forward(("127.0.0.1", 0), dest_server, policy=flag).address
        yield dials, dict(zip(CONN_VARIANTS, tunnels, strict=True))
    finally:
        for t in tunnels:
            t.close()


@pytest.mark.parametrize("rnd,variant", CONN_PAIRS, ids=[f"r{r}-{v}" for r, v in CONN_PAIRS])
def test_policy_connrate(benchmark, policy_forwards, rnd: int, variant: str) -> None:
    dials, tunnels = policy_forwards
    samples: list[dict[str, float]] = []

    def run() -> None:
        r = zload_client(dials[variant], "conns", KNOBS.conns_secs)
        samples.append({"conns_per_s": r["conns_per_s"], "conn_p50_us": r["p50_us"]})

    benchmark.group = "policy-connrate"
    benchmark.pedantic(run, rounds=KNOBS.inner, iterations=1)
    st = tunnels[variant].stats()
    if variant not in {"forward", "policy-none"}:
        assert st.policy_allowed == st.connections_opened and st.policy_denied == 0
    benchmark.extra_info.update(
        {"variant": variant, "round": rnd, "samples": samples, **samples[-1]}
    )
