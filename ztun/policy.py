"""L4 authorization policy: the model, its evaluation, and the explain API (sans-I/O).

This is the reference for what ztun enforces. It follows Istio ambient's ztunnel
(``src/rbac.rs``, ``src/state.rs::assert_rbac``) and istiod's conversion of an Istio
``AuthorizationPolicy`` into ztunnel's rules (``pilot/.../ambient/authorization.go``):

* A policy has an action (ALLOW or DENY), ``rules`` (OR) of clauses (AND) of matches (OR).
  A match tests the peer and the connection with positive lists (ANY must match) and
  ``not_`` lists (NONE may match); the lists present in a match are ANDed. An empty match
  never matches, an empty clause always does, a rule without clauses always does, and a
  policy without rules never does (an ALLOW policy without rules is "allow nothing").
* Principals are matched against the peer's SPIFFE ID without ``spiffe://`` (exact,
  ``prefix*``, ``*suffix``, presence ``*``); namespaces and service accounts come from an
  ID of the form ``spiffe://<td>/ns/<ns>/sa/<sa>``. A plaintext peer has no identity: every
  positive principal, namespace and service-account match fails for it, and (as in
  ztunnel) every ``not_`` one succeeds.
* Source and destination IPs are canonical (an IPv4-mapped IPv6 address is IPv4); an IPv4
  CIDR only contains IPv4 addresses and an IPv6 CIDR only IPv6 ones, so ``::/0`` does not
  match an IPv4 peer (this is ztunnel's behaviour).
* Scope: a policy with a ``selector`` applies to the workloads whose labels it matches,
  in its namespace, or in every namespace if it lives in the root namespace; without a
  selector it applies to its whole namespace, or to the whole mesh from the root
  namespace (default ``istio-system``).
* Decision: a matching DENY denies; else no ALLOW policy applies -> allow; else a matching
  ALLOW allows; else deny. Dry-run policies are evaluated and reported, never enforced.
  Policies are tried namespace group first, then mesh-wide, then selector (ztunnel's
  order), each group in ``namespace/name`` order; the first match decides and is named.

``PolicySet.compile()`` turns the set into the flat table the C engine evaluates
(``src/core/policy.c``), which must agree with :meth:`PolicySet.evaluate` exactly.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeAlias, TypeVar

from ztun.errors import PolicyError

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "Action",
    "AuthorizationPolicy",
    "Clause",
    "ConnectionFacts",
    "Decision",
    "DryRunResult",
    "IPNetwork",
    "Match",
    "PolicySet",
    "Reason",
    "Rule",
    "Scope",
    "ServiceAccountMatch",
    "StringMatch",
    "Workload",
    "clause",
    "rule",
]

DEFAULT_ROOT_NAMESPACE = "istio-system"
SPIFFE_PREFIX = "spiffe://"
_T = TypeVar("_T")

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class Scope(enum.Enum):
    """Which workloads a policy applies to (derived from namespace, root namespace, selector)."""

    GLOBAL = "global"  # root namespace, no selector: every workload in the mesh
    NAMESPACE = "namespace"  # no selector: every workload of the policy's namespace
    WORKLOAD_SELECTOR = "workload_selector"  # workloads whose labels match the selector


class Reason(enum.Enum):
    DENIED_BY_POLICY = "denied by policy"
    ALLOWED_BY_POLICY = "allowed by policy"
    ALLOWED_NO_ALLOW_POLICY = "allowed: no ALLOW policy applies"
    DENIED_NO_MATCH = "denied: ALLOW policies apply but none matched"


def _field_error(field: str, message: str) -> PolicyError:
    return PolicyError(message, field=field)


# ---------------------------------------------------------------------------------------
# Matchers


@dataclasses.dataclass(frozen=True)
class StringMatch:
    """Istio string match: ``"a"`` exact, ``"a*"`` prefix, ``"*a"`` suffix, ``"*"`` presence."""

    kind: str  # "exact" | "prefix" | "suffix" | "presence"
    value: str = ""

    KINDS = ("exact", "prefix", "suffix", "presence")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown string match kind {self.kind!r}")
        if self.kind == "presence":
            if self.value:
                raise ValueError("a presence match has no value")
        elif not self.value:
            raise ValueError("empty value (use '*' to match any non-empty value)")

    @classmethod
    def parse(cls, pattern: str) -> StringMatch:
        """Parse Istio's pattern syntax; ``*`` is only allowed alone, first or last."""
        if not isinstance(pattern, str):
            raise ValueError(f"expected a string, got {type(pattern).__name__}")
        if pattern == "":
            raise ValueError("empty value not allowed")
        if pattern == "*":
            return cls("presence")
        if pattern.startswith("*"):
            kind, value = "suffix", pattern[1:]
        elif pattern.endswith("*"):
            kind, value = "prefix", pattern[:-1]
        else:
            kind, value = "exact", pattern
        if "*" in value:
            raise ValueError(
                f"invalid pattern {pattern!r}: '*' is only allowed alone, as the first or "
                "as the last character"
            )
        return cls(kind, value)

    def matches(self, s: str) -> bool:
        if self.kind == "exact":
            return s == self.value
        if self.kind == "prefix":
            return s.startswith(self.value)
        if self.kind == "suffix":
            return s.endswith(self.value)
        return s != ""

    def __str__(self) -> str:
        if self.kind == "presence":
            return "*"
        if self.kind == "prefix":
            return self.value + "*"
        if self.kind == "suffix":
            return "*" + self.value
        return self.value


@dataclasses.dataclass(frozen=True)
class ServiceAccountMatch:
    """A peer whose SPIFFE ID is ``…/ns/<namespace>/sa/<service_account>``."""

    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        for what, v in (("namespace", self.namespace), ("service account", self.service_account)):
            if not v or "/" in v or "*" in v:
                raise ValueError(f"invalid {what} {v!r} (non-empty, no '/' and no '*')")

    @classmethod
    def parse(cls, value: str, default_namespace: str) -> ServiceAccountMatch:
        """``"ns/sa"``, or ``"sa"`` in ``default_namespace`` (the policy's), as istiod does."""
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        if value.count("/") > 1:
            raise ValueError(f"invalid service account {value!r}: expected 'sa' or 'ns/sa'")
        ns, sep, sa = value.partition("/")
        if not sep:
            ns, sa = default_namespace, value
        return cls(ns, sa)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def parse_ip_block(value: str) -> IPNetwork:
    """``"10.0.0.1"`` (a /32 or /128) or ``"10.0.0.0/8"``; host bits may be set (as in Istio)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if not value or value != value.strip() or "%" in value:
        raise ValueError(f"bad IP address or CIDR {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        pass
    kind = "CIDR" if "/" in value else "IP address"
    raise ValueError(f"bad {kind} {value!r}")


def parse_port(value: str | int) -> int:
    """A port 0..65535 given as a decimal string (Istio's form) or an int (the Python API)."""
    if isinstance(value, bool):
        raise ValueError(f"bad port {value!r}")
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        port = int(value)
    else:
        raise ValueError(f"bad port {value!r}: expected a number 0..65535")
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port {value!r}: out of range 0..65535")
    return port


MATCH_FIELDS = (
    "principals",
    "not_principals",
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
    "source_ips",
    "not_source_ips",
    "destination_ips",
    "not_destination_ips",
    "destination_ports",
    "not_destination_ports",
)


@dataclasses.dataclass(frozen=True)
class Match:
    """One alternative of a clause: every non-empty field must hold (see the module doc)."""

    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    @classmethod
    def of(
        cls,
        *,
        principals: Iterable[str | StringMatch] = (),
        not_principals: Iterable[str | StringMatch] = (),
        namespaces: Iterable[str | StringMatch] = (),
        not_namespaces: Iterable[str | StringMatch] = (),
        service_accounts: Iterable[str | ServiceAccountMatch | tuple[str, str]] = (),
        not_service_accounts: Iterable[str | ServiceAccountMatch | tuple[str, str]] = (),
        source_ips: Iterable[str | IPNetwork] = (),
        not_source_ips: Iterable[str | IPNetwork] = (),
        destination_ips: Iterable[str | IPNetwork] = (),
        not_destination_ips: Iterable[str | IPNetwork] = (),
        destination_ports: Iterable[int | str] = (),
        not_destination_ports: Iterable[int | str] = (),
        namespace: str = "default",
    ) -> Match:
        """Build a match from Istio-style strings (raises PolicyError naming the field).

        ``namespace`` is the namespace a bare service account name (``"sa"``) belongs to.
        """
        raw: dict[str, Iterable[object]] = {
            "principals": principals,
            "not_principals": not_principals,
            "namespaces": namespaces,
            "not_namespaces": not_namespaces,
            "service_accounts": service_accounts,
            "not_service_accounts": not_service_accounts,
            "source_ips": source_ips,
            "not_source_ips": not_source_ips,
            "destination_ips": destination_ips,
            "not_destination_ips": not_destination_ips,
            "destination_ports": destination_ports,
            "not_destination_ports": not_destination_ports,
        }
        values: dict[str, tuple[object, ...]] = {}
        for field, items in raw.items():
            if isinstance(items, str):
                raise _field_error(field, "expected a list of values, got a string")
            out: list[object] = []
            for i, item in enumerate(items):
                try:
                    out.append(_convert(field, item, namespace))
                except ValueError as e:
                    raise _field_error(f"{field}[{i}]", str(e)) from None
            values[field] = tuple(out)
        return cls(**values)  # type: ignore[arg-type]

    def is_empty(self) -> bool:
        return not any(getattr(self, f) for f in MATCH_FIELDS)


def _convert(field: str, item: object, namespace: str) -> object:
    base = field.removeprefix("not_")
    if base in ("principals", "namespaces"):
        if isinstance(item, StringMatch):
            return item
        return StringMatch.parse(item)  # type: ignore[arg-type]
    if base == "service_accounts":
        if isinstance(item, ServiceAccountMatch):
            return item
        if isinstance(item, tuple) and len(item) == 2:
            return ServiceAccountMatch(str(item[0]), str(item[1]))
        return ServiceAccountMatch.parse(item, namespace)  # type: ignore[arg-type]
    if base in ("source_ips", "destination_ips"):
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return item
        return parse_ip_block(item)  # type: ignore[arg-type]
    return parse_port(item)  # type: ignore[arg-type]


Clause: TypeAlias = tuple[Match, ...]  # ANY of its matches
Rule: TypeAlias = tuple[Clause, ...]  # ALL of its clauses


def clause(*matches: Match) -> Clause:
    """A clause: matches ANY of ``matches`` (an empty clause always matches)."""
    return tuple(matches)


def rule(*clauses: Match | Sequence[Match]) -> Rule:
    """A rule: ALL clauses must match; a bare Match is a clause of one match."""
    return tuple((c,) if isinstance(c, Match) else tuple(c) for c in clauses)


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{what} must be a non-empty string", field=what)
    if "/" in value or "\0" in value or value != value.strip():
        raise PolicyError(f"invalid {what} {value!r}", field=what)
    return value


@dataclasses.dataclass(frozen=True)
class AuthorizationPolicy:
    """An L4 authorization policy, as ztunnel models it.

    ``selector`` None: namespace-wide (mesh-wide in the root namespace); a mapping, even
    an empty one: the workloads whose labels contain every selector label.
    ``source`` (``"file:line"``) and ``rule_sources`` (a line per rule) point back at YAML.
    """

    name: str
    namespace: str
    action: Action
    rules: tuple[Rule, ...] = ()
    selector: Mapping[str, str] | None = None
    dry_run: bool = False
    source: str | None = dataclasses.field(default=None, compare=False)
    rule_sources: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        _check_name("namespace", self.namespace)
        if not isinstance(self.action, Action):
            raise PolicyError(f"action must be an Action, got {self.action!r}", field="action")
        rules = tuple(tuple(tuple(c) for c in r) for r in self.rules)
        for r in rules:
            for c in r:
                for m in c:
                    if not isinstance(m, Match):
                        raise PolicyError(f"expected a Match, got {m!r}", field="rules")
        object.__setattr__(self, "rules", rules)
        if self.selector is not None:
            object.__setattr__(self, "selector", dict(self.selector))

    @property
    def key(self) -> str:
        """``namespace/name``: unique in a set, the name used in logs and counters."""
        return f"{self.namespace}/{self.name}"

    @classmethod
    def allow(
        cls,
        name: str,
        namespace: str,
        *rules: Rule,
        selector: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> AuthorizationPolicy:
        return cls(name, namespace, Action.ALLOW, tuple(rules), selector, dry_run)

    @classmethod
    def deny(
        cls,
        name: str,
        namespace: str,
        *rules: Rule,
        selector: Mapping[str, str] | None = None,
        dry_run: bool = False,
    ) -> AuthorizationPolicy:
        return cls(name, namespace, Action.DENY, tuple(rules), selector, dry_run)

    def where(self, rule_index: int) -> str | None:
        """Where rule ``rule_index`` came from (``file:line``), if it came from a file."""
        if rule_index < len(self.rule_sources):
            return self.rule_sources[rule_index]
        return self.source


# ---------------------------------------------------------------------------------------
# Connections and workloads


def _ip(value: str | IPAddress) -> IPAddress:
    ip = ipaddress.ip_address(value) if isinstance(value, str) else value
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # canonical, as ztunnel's to_canonical()
    return ip


@dataclasses.dataclass(frozen=True)
class Workload:
    """A destination workload: policies select it by namespace and labels."""

    name: str
    namespace: str
    service_account: str = "default"
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ips: tuple[IPAddress, ...] = ()

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        _check_name("namespace", self.namespace)
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "ips", tuple(_ip(i) for i in self.ips))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclasses.dataclass(frozen=True)
class ConnectionFacts:
    """What policy may look at: addresses, port, authenticated peer, destination workload.

    ``peer_id`` is the peer's full SPIFFE ID (``spiffe://td/ns/N/sa/S``) or None for a
    plaintext peer. ``workload`` None means the destination is not a known workload: only
    mesh-wide policies apply (the compiled table's default workload, see compile()).
    """

    src_ip: IPAddress
    dst_ip: IPAddress
    dst_port: int
    peer_id: str | None = None
    workload: Workload | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "src_ip", _ip(self.src_ip))
        object.__setattr__(self, "dst_ip", _ip(self.dst_ip))
        if not 0 <= self.dst_port <= 65535:
            raise ValueError(f"bad port {self.dst_port}")

    @classmethod
    def of(
        cls,
        src: str,
        dst: str,
        port: int,
        peer: str | None = None,
        workload: Workload | None = None,
    ) -> ConnectionFacts:
        return cls(_ip(src), _ip(dst), port, peer, workload)


@dataclasses.dataclass(frozen=True)
class _Peer:
    principal: str | None  # SPIFFE ID without the scheme; None: none (plaintext or not SPIFFE)
    namespace: str  # "" unless the ID is td/ns/<ns>/sa/<sa>
    service_account: str | None

    @classmethod
    def of(cls, peer_id: str | None) -> _Peer:
        if peer_id is None or not peer_id.startswith(SPIFFE_PREFIX):
            return cls(None, "", None)
        principal = peer_id[len(SPIFFE_PREFIX) :]
        parts = principal.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return cls(principal, parts[2], parts[4])
        return cls(principal, "", None)


def _match_holds(m: Match, peer: _Peer, f: ConnectionFacts) -> bool:
    if m.is_empty():
        return False  # ztunnel skips empty matches

    def sm_principal(s: StringMatch) -> bool:
        return peer.principal is not None and s.matches(peer.principal)

    def sm_namespace(s: StringMatch) -> bool:
        return s.matches(peer.namespace)

    def sa(s: ServiceAccountMatch) -> bool:
        return (
            peer.service_account is not None
            and s.namespace == peer.namespace
            and s.service_account == peer.service_account
        )

    def src(n: IPNetwork) -> bool:
        return f.src_ip in n

    def dst(n: IPNetwork) -> bool:
        return f.dst_ip in n

    def port(p: int) -> bool:
        return p == f.dst_port

    return (
        _holds(m.principals, m.not_principals, sm_principal)
        and _holds(m.namespaces, m.not_namespaces, sm_namespace)
        and _holds(m.service_accounts, m.not_service_accounts, sa)
        and _holds(m.source_ips, m.not_source_ips, src)
        and _holds(m.destination_ips, m.not_destination_ips, dst)
        and _holds(m.destination_ports, m.not_destination_ports, port)
    )


def _holds(pos: Sequence[_T], neg: Sequence[_T], pred: Callable[[_T], bool]) -> bool:
    """Positive list: ANY must hold (if given); negative list: NONE may hold."""
    if pos and not any(pred(x) for x in pos):
        return False
    return not (neg and any(pred(x) for x in neg))


def _first_matching_rule(p: AuthorizationPolicy, peer: _Peer, f: ConnectionFacts) -> int | None:
    for i, r in enumerate(p.rules):
        # an empty clause always matches; a rule without clauses always matches
        if all(not c or any(_match_holds(m, peer, f) for m in c) for c in r):
            return i
    return None


# ---------------------------------------------------------------------------------------
# Decisions


@dataclasses.dataclass(frozen=True)
class DryRunResult:
    """What dry-run policies say: every one that matched, and the would-be verdict."""

    allowed: bool  # the verdict if dry-run policies were enforced too
    policy: str | None  # the dry-run policy that would have decided, if any
    rule: int | None
    matched: tuple[str, ...]  # every dry-run policy that matched, in evaluation order


@dataclasses.dataclass(frozen=True)
class Decision:
    """The verdict for one connection and why (the explain API)."""

    allowed: bool
    reason: Reason
    policy: str | None = None  # "namespace/name" of the deciding policy; None: a default
    rule: int | None = None  # index of its matching rule
    where: str | None = None  # file:line of that rule when it came from YAML
    dry_run: DryRunResult | None = None  # None when no dry-run policy applies

    def __str__(self) -> str:
        verdict = "ALLOW" if self.allowed else "DENY"
        text = f"{verdict}: {self.reason.value}"
        if self.policy is not None:
            text += f" {self.policy} rule {self.rule}"
            if self.where:
                text += f" ({self.where})"
        if self.dry_run is not None and self.dry_run.matched:
            text += f"; dry-run matched {', '.join(self.dry_run.matched)}"
            if self.dry_run.allowed != self.allowed:
                would = "allow" if self.dry_run.allowed else "deny"
                text += f" and would {would}"
        return text


# ---------------------------------------------------------------------------------------
# Policy sets


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclasses.dataclass(frozen=True)
class _Groups:
    """The policies that apply to one destination, in ztunnel's order."""

    namespace: tuple[AuthorizationPolicy, ...]
    mesh: tuple[AuthorizationPolicy, ...]
    selector: tuple[AuthorizationPolicy, ...]

    def all(self) -> tuple[AuthorizationPolicy, ...]:
        return self.namespace + self.mesh + self.selector


def _sort_key(p: AuthorizationPolicy) -> bytes:
    return p.key.encode("utf-8", "surrogatepass")


class PolicySet:
    """An immutable set of policies plus the root namespace; evaluates and compiles."""

    def __init__(
        self,
        policies: Iterable[AuthorizationPolicy] = (),
        *,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        warnings: Iterable[str] = (),
    ) -> None:
        self.root_namespace = _check_name("root_namespace", root_namespace)
        seen: dict[str, AuthorizationPolicy] = {}
        for p in policies:
            if not isinstance(p, AuthorizationPolicy):
                raise PolicyError(f"expected an AuthorizationPolicy, got {p!r}")
            if p.key in seen:
                other = seen[p.key].source or "<python>"
                here = p.source or "<python>"
                raise PolicyError(
                    f"duplicate policy {p.key} (also defined at {other})",
                    file=here.rsplit(":", 1)[0] if p.source else None,
                    line=_line_of(p.source),
                )
            seen[p.key] = p
        self._policies = tuple(sorted(seen.values(), key=_sort_key))
        self._by_key = {p.key: p for p in self._policies}
        self.warnings: tuple[str, ...] = tuple(warnings)
        # scope indexes (each list stays in key order): evaluation and compilation look a
        # destination's policies up instead of scanning the whole set
        self._mesh = tuple(p for p in self._policies if self.scope(p) is Scope.GLOBAL)
        by_ns: dict[str, list[AuthorizationPolicy]] = {}
        sel_by_ns: dict[str, list[AuthorizationPolicy]] = {}
        for p in self._policies:
            scope = self.scope(p)
            if scope is Scope.NAMESPACE:
                by_ns.setdefault(p.namespace, []).append(p)
            elif scope is Scope.WORKLOAD_SELECTOR:
                sel_by_ns.setdefault(p.namespace, []).append(p)
        self._by_ns = {k: tuple(v) for k, v in by_ns.items()}
        self._sel_by_ns = {k: tuple(v) for k, v in sel_by_ns.items()}

    # -- loading --

    @classmethod
    def from_yaml(
        cls,
        text: str | bytes,
        *,
        file: str = "<string>",
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> PolicySet:
        """Parse Istio AuthorizationPolicy YAML (one or more documents)."""
        from ztun import _policy_yaml

        policies, warnings = _policy_yaml.parse_text(text, file=file)
        return cls(policies, root_namespace=root_namespace, warnings=warnings)

    @classmethod
    def load(
        cls,
        *paths: str | os.PathLike[str],
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> PolicySet:
        """Load YAML files and folders (``*.yaml``/``*.yml``, recursively, sorted).

        All or nothing: any error raises PolicyError and no partial set is returned.
        """
        from ztun import _policy_yaml

        policies, warnings = _policy_yaml.load_paths(paths)
        return cls(policies, root_namespace=root_namespace, warnings=warnings)

    # -- access --

    @property
    def policies(self) -> tuple[AuthorizationPolicy, ...]:
        """All policies, sorted by ``namespace/name``."""
        return self._policies

    def __len__(self) -> int:
        return len(self._policies)

    def __iter__(self) -> Iterator[AuthorizationPolicy]:
        return iter(self._policies)

    def __getitem__(self, key: str) -> AuthorizationPolicy:
        return self._by_key[key]

    def scope(self, policy: AuthorizationPolicy) -> Scope:
        if policy.selector is not None:
            return Scope.WORKLOAD_SELECTOR
        if policy.namespace == self.root_namespace:
            return Scope.GLOBAL
        return Scope.NAMESPACE

    def _groups(self, workload: Workload | None) -> _Groups:
        if workload is None:
            return _Groups((), self._mesh, ())
        ns = self._by_ns.get(workload.namespace, ())
        candidates = self._sel_by_ns.get(workload.namespace, ())
        if workload.namespace != self.root_namespace:
            root = self._sel_by_ns.get(self.root_namespace, ())
            candidates = tuple(sorted(candidates + root, key=_sort_key)) if root else candidates
        sel = tuple(
            p
            for p in candidates
            if p.selector is not None and _labels_match(p.selector, workload.labels)
        )
        return _Groups(ns, self._mesh, sel)

    def applicable(self, workload: Workload | None) -> tuple[AuthorizationPolicy, ...]:
        """The policies that apply to ``workload``, in evaluation order."""
        return self._groups(workload).all()

    # -- evaluation --

    def evaluate(self, facts: ConnectionFacts) -> Decision:
        """Decide one connection and say why (the reference the C evaluator must equal)."""
        groups = self._groups(facts.workload).all()
        peer = _Peer.of(facts.peer_id)
        deny = [p for p in groups if p.action is Action.DENY and not p.dry_run]
        allow = [p for p in groups if p.action is Action.ALLOW and not p.dry_run]
        dry = [p for p in groups if p.dry_run]

        decision: Decision | None = None
        for p in deny:
            r = _first_matching_rule(p, peer, facts)
            if r is not None:
                decision = Decision(False, Reason.DENIED_BY_POLICY, p.key, r, p.where(r))
                break
        if decision is None:
            if not allow:
                decision = Decision(True, Reason.ALLOWED_NO_ALLOW_POLICY)
            else:
                decision = Decision(False, Reason.DENIED_NO_MATCH)
                for p in allow:
                    r = _first_matching_rule(p, peer, facts)
                    if r is not None:
                        decision = Decision(True, Reason.ALLOWED_BY_POLICY, p.key, r, p.where(r))
                        break
        if not dry:
            return decision

        matched: list[str] = []
        first: dict[Action, tuple[str, int]] = {}
        for p in dry:
            r = _first_matching_rule(p, peer, facts)
            if r is not None:
                matched.append(p.key)
                first.setdefault(p.action, (p.key, r))
        shadow_policy: tuple[str, int] | None = None
        if decision.reason is Reason.DENIED_BY_POLICY:
            shadow = False  # an enforced DENY still wins
        elif Action.DENY in first:
            shadow, shadow_policy = False, first[Action.DENY]
        elif decision.reason is Reason.ALLOWED_BY_POLICY:
            shadow = True
        elif Action.ALLOW in first:
            shadow, shadow_policy = True, first[Action.ALLOW]
        else:
            shadow = not allow and not any(p.action is Action.ALLOW for p in dry)
        dry_result = DryRunResult(
            allowed=shadow,
            policy=shadow_policy[0] if shadow_policy else None,
            rule=shadow_policy[1] if shadow_policy else None,
            matched=tuple(matched),
        )
        return dataclasses.replace(decision, dry_run=dry_result)

    # -- compilation --

    def compile(
        self, workloads: Iterable[Workload] = (), *, default: Workload | None = None
    ) -> bytes:
        """The flat table for the C evaluator (format: ztun/_policy_compile.py).

        ``workloads`` are the destinations this node serves; their IPs make the table that
        maps an HBONE authority / original destination to a workload. ``default`` is the
        workload a connection to an unknown destination is judged as (the embedded
        ``Tunnel`` case: the process itself); without it, such a connection gets only the
        mesh-wide policies, like ``evaluate()`` with ``workload=None``.
        """
        from ztun import _policy_compile

        return _policy_compile.compile_set(self, tuple(workloads), default)


def _line_of(source: str | None) -> int | None:
    if not source or ":" not in source:
        return None
    tail = source.rsplit(":", 1)[1]
    return int(tail) if tail.isdigit() else None
