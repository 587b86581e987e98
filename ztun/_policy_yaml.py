"""Istio ``AuthorizationPolicy`` YAML -> ztun.policy model, the way istiod feeds ztunnel.

Conversion (istiod ``pilot/.../ambient/authorization.go: handleRule``): each Istio rule
becomes one rule whose clauses are: the ``to`` list (one match per operation: ports and
notPorts), the ``from`` list (one match per source: principals, namespaces, service
accounts, ipBlocks and their ``not`` twins), and one clause per ``when`` condition on an
L4 key (source.ip, source.namespace, source.principal, destination.ip,
destination.port).

Fields only an L7 proxy can enforce (hosts, methods, paths and their ``not`` twins,
requestPrincipals, remoteIpBlocks and theirs, any other ``when`` key):

* ALLOW: the whole rule is dropped (the policy gets narrower: fail closed);
* DENY: the fields are dropped and the rule still applies (the policy gets broader). A
  ``from``/``to`` entry left empty by that means "any source/operation". Deviation: with
  istiod + ztunnel such an entry becomes an empty match, which ztunnel never matches, so
  the DENY silently stops denying; we follow the documented intent instead.

Both cases log a warning naming the policy, the rule and the fields. Other deviations,
all istiod's: AUDIT and CUSTOM policies and policies with ``targetRef(s)`` are not for
ztunnel and are skipped with a warning. Validation follows Istio's admission checks
(empty values, empty ``from``/``to``/sources, serviceAccounts with principals or
namespaces, DENY without rules, bad CIDRs and ports, unknown ``when`` keys) plus what
Istio leaves unchecked but cannot mean anything sensible: ``*`` in the middle of a
principal or namespace pattern, unknown fields, wrong types.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

from ztun.errors import ConfigError, PolicyError
from ztun.policy import (
    Action,
    AuthorizationPolicy,
    Match,
    Rule,
    ServiceAccountMatch,
    StringMatch,
    parse_ip_block,
    parse_port,
)
from ztun.yamlpos import Path, YamlDocument, load_documents, load_file

log = logging.getLogger("ztun.policy")

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
KIND = "AuthorizationPolicy"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
DEFAULT_NAMESPACE = "default"  # what kubectl uses when metadata.namespace is absent

TOP_KEYS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
METADATA_KEYS = frozenset(
    {
        "name", "namespace", "annotations", "labels", "uid", "resourceVersion", "generation",
        "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields",
        "ownerReferences", "finalizers", "generateName", "selfLink",
    }
)  # fmt: skip
SPEC_KEYS = frozenset({"selector", "targetRef", "targetRefs", "action", "provider", "rules"})
RULE_KEYS = frozenset({"from", "to", "when"})
SOURCE_L4 = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
    "ipBlocks": "source_ips",
    "notIpBlocks": "not_source_ips",
}
SOURCE_L7 = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
OPERATION_L4 = {"ports": "destination_ports", "notPorts": "not_destination_ports"}
OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
CONDITION_KEYS = frozenset({"key", "values", "notValues"})
# when-keys ztunnel enforces, and the Match fields they fill
WHEN_L4 = {
    "source.ip": "source_ips",
    "source.namespace": "namespaces",
    "source.principal": "principals",
    "destination.ip": "destination_ips",
    "destination.port": "destination_ports",
}
# valid Istio keys that need HTTP (or are not enforced by ztunnel)
WHEN_L7_EXACT = frozenset(
    {"remote.ip", "request.auth.principal", "request.auth.audiences", "request.auth.presenter",
     "connection.sni"}
)  # fmt: skip
WHEN_L7_MAPS = ("request.headers", "request.auth.claims", "experimental.envoy.filters.")
WHEN_REJECTED = {
    "destination.namespace": "is replaced by the policy's metadata.namespace",
    "destination.name": "is deprecated (only supported in v1alpha1)",
    "destination.user": "is deprecated (only supported in v1alpha1)",
}
# Go's strconv.ParseBool, which istiod uses for the dry-run annotation
_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


def _type_name(v: object) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)  # fmt: skip


class _Doc:
    """Validation helpers bound to one YAML document."""

    def __init__(self, doc: YamlDocument) -> None:
        self.doc = doc
        self.warnings: list[str] = []

    def error(self, path: Path, message: str, *, at_key: bool = False) -> PolicyError:
        err = self.doc.error(path, message, cls=PolicyError, at_key=at_key)
        assert isinstance(err, PolicyError)
        return err

    def where(self, path: Path) -> str:
        return f"{self.doc.file}:{self.doc.line(path)}"

    def mapping(self, value: Any, path: Path, allowed: frozenset[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping, got {_type_name(value)}")
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                raise self.error(
                    (*path, k if isinstance(k, str | int) else str(k)),
                    f"unknown field {k!r} (allowed: {', '.join(sorted(allowed))})",
                    at_key=True,
                )
        return value

    def string(self, value: Any, path: Path) -> str:
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, bool | int | float) else ""
            raise self.error(path, f"expected a string, got {_type_name(value)}{hint}")
        return value

    def strings(self, value: Any, path: Path) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(path, f"expected a list of strings, got {_type_name(value)}")
        out = []
        for i, v in enumerate(value):
            s = self.string(v, (*path, i))
            if s == "":
                raise self.error((*path, i), "empty value not allowed")
            out.append(s)
        return out

    def parse_each(self, values: list[str], path: Path, fn: Any) -> tuple[Any, ...]:
        out = []
        for i, v in enumerate(values):
            try:
                out.append(fn(v))
            except ValueError as e:
                raise self.error((*path, i), str(e)) from None
        return tuple(out)

    def ip_blocks(self, values: list[str], path: Path) -> tuple[Any, ...]:
        nets = self.parse_each(values, path, parse_ip_block)
        for i, n in enumerate(nets):
            if isinstance(n, ipaddress.IPv6Network) and n.network_address.ipv4_mapped:
                self.warn(
                    f"{self.where((*path, i))}: {values[i]!r} is an IPv4-mapped IPv6 block, "
                    "which never matches (peers are canonical IPv4); write it as IPv4"
                )
        return nets

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)


def _convert_rule(
    d: _Doc, raw: Any, path: Path, *, action: Action, namespace: str, key: str
) -> tuple[Rule | None, list[str]]:
    """One Istio rule -> (rule or None when dropped, the L7-only fields it used)."""
    if raw is None:
        raise d.error(path, "a rule must not be null (use {} to match everything)")
    r = d.mapping(raw, path, RULE_KEYS)
    l7: list[str] = []
    clauses: list[tuple[Match, ...]] = []
    deny = action is Action.DENY

    to_raw = r.get("to")
    if to_raw is not None:
        if not isinstance(to_raw, list):
            raise d.error((*path, "to"), f"expected a list, got {_type_name(to_raw)}")
        if not to_raw:
            raise d.error((*path, "to"), "`to` must not be empty")
        matches, any_entry = [], False
        for i, entry in enumerate(to_raw):
            ep: Path = (*path, "to", i)
            if entry is None:
                raise d.error(ep, "`to` entries must not be null")
            e = d.mapping(entry, ep, frozenset({"operation"}))
            op_raw = e.get("operation")
            op_path: Path = (*ep, "operation")
            if op_raw is None:
                raise d.error(op_path if "operation" in e else ep, "`to.operation` must be set")
            op = d.mapping(op_raw, op_path, frozenset(OPERATION_L4) | frozenset(OPERATION_L7))
            fields: dict[str, Any] = {}
            for name in OPERATION_L7:
                if d.strings(op.get(name), (*op_path, name)):
                    l7.append(name)
            for name, target in OPERATION_L4.items():
                vals = d.strings(op.get(name), (*op_path, name))
                fields[target] = d.parse_each(vals, (*op_path, name), parse_port)
            if not any(d.strings(op.get(n), (*op_path, n)) for n in (*OPERATION_L4, *OPERATION_L7)):
                raise d.error(op_path, "`to.operation` must not be empty")
            m = Match(**fields)
            if m.is_empty():
                any_entry = True  # only L7 fields: for a DENY, any operation
            else:
                matches.append(m)
        if not (deny and any_entry):
            clauses.append(tuple(matches))

    from_raw = r.get("from")
    if from_raw is not None:
        if not isinstance(from_raw, list):
            raise d.error((*path, "from"), f"expected a list, got {_type_name(from_raw)}")
        if not from_raw:
            raise d.error((*path, "from"), "`from` must not be empty")
        matches, any_entry = [], False
        for i, entry in enumerate(from_raw):
            ep = (*path, "from", i)
            if entry is None:
                raise d.error(ep, "`from` entries must not be null")
            e = d.mapping(entry, ep, frozenset({"source"}))
            src_raw = e.get("source")
            src_path: Path = (*ep, "source")
            if src_raw is None:
                raise d.error(src_path if "source" in e else ep, "`from.source` must be set")
            src = d.mapping(src_raw, src_path, frozenset(SOURCE_L4) | frozenset(SOURCE_L7))
            present = {n for n in (*SOURCE_L4, *SOURCE_L7) if d.strings(src.get(n), (*src_path, n))}
            if not present:
                raise d.error(src_path, "`from.source` must not be empty")
            if present & {"serviceAccounts", "notServiceAccounts"} and present & {
                "principals",
                "notPrincipals",
                "namespaces",
                "notNamespaces",
            }:
                raise d.error(
                    (
                        *src_path,
                        "serviceAccounts" if "serviceAccounts" in present else "notServiceAccounts",
                    ),
                    "cannot set serviceAccounts with namespaces or principals",
                )
            for name in SOURCE_L7:
                if name in present:
                    l7.append(name)
                    if name in ("remoteIpBlocks", "notRemoteIpBlocks"):
                        d.ip_blocks(d.strings(src.get(name), (*src_path, name)), (*src_path, name))
            fields = {}
            for name, target in SOURCE_L4.items():
                fp: Path = (*src_path, name)
                vals = d.strings(src.get(name), fp)
                if target.endswith("principals") or target.endswith("namespaces"):
                    fields[target] = d.parse_each(vals, fp, StringMatch.parse)
                elif target.endswith("service_accounts"):
                    fields[target] = d.parse_each(
                        vals, fp, lambda v: ServiceAccountMatch.parse(v, namespace)
                    )
                else:
                    fields[target] = d.ip_blocks(vals, fp)
            m = Match(**fields)
            if m.is_empty():
                any_entry = True  # only L7 fields: for a DENY, any source
            else:
                matches.append(m)
        if not (deny and any_entry):
            clauses.append(tuple(matches))

    when_raw = r.get("when")
    if when_raw is not None:
        if not isinstance(when_raw, list):
            raise d.error((*path, "when"), f"expected a list, got {_type_name(when_raw)}")
        for i, cond_raw in enumerate(when_raw):
            cp: Path = (*path, "when", i)
            if cond_raw is None:
                raise d.error(cp, "a condition must not be null")
            cond = d.mapping(cond_raw, cp, CONDITION_KEYS)
            if "key" not in cond:
                raise d.error(cp, "`key` must be set")
            k = d.string(cond["key"], (*cp, "key"))
            if not k:
                raise d.error((*cp, "key"), "`key` must not be empty")
            values = d.strings(cond.get("values"), (*cp, "values"))
            not_values = d.strings(cond.get("notValues"), (*cp, "notValues"))
            if not values and not not_values:
                raise d.error(
                    cp, f"at least one of `values` or `notValues` must be set for key {k}"
                )
            cm = _convert_condition(d, k, values, not_values, cp)
            if cm is None:
                l7.append(k)  # for a DENY the condition is dropped: broader
            else:
                clauses.append((cm,))

    if l7:
        fields_txt = ", ".join(dict.fromkeys(l7))
        rule_no = path[-1]
        if not deny:
            d.warn(
                f"{d.where(path)}: policy {key} rule {rule_no} uses {fields_txt}, which only "
                "an L7 proxy can enforce: this ALLOW rule is dropped and allows nothing "
                "(more restrictive than written)"
            )
            return None, l7
        d.warn(
            f"{d.where(path)}: policy {key} rule {rule_no} uses {fields_txt}, which only an "
            "L7 proxy can enforce: this DENY rule is applied without them and denies more "
            "than written"
        )
    return tuple(clauses), l7


def _convert_condition(
    d: _Doc, key: str, values: list[str], not_values: list[str], path: Path
) -> Match | None:
    """A ``when`` condition -> a Match (L4 key), None (L7-only key), or PolicyError."""
    target = WHEN_L4.get(key)
    vp: Path = (*path, "values")
    nvp: Path = (*path, "notValues")
    if target is not None:
        if target in ("source_ips", "destination_ips"):
            pos, neg = d.ip_blocks(values, vp), d.ip_blocks(not_values, nvp)
        elif target == "destination_ports":
            pos, neg = (
                d.parse_each(values, vp, parse_port),
                d.parse_each(not_values, nvp, parse_port),
            )
        else:
            pos = d.parse_each(values, vp, StringMatch.parse)
            neg = d.parse_each(not_values, nvp, StringMatch.parse)
        return Match(**{target: pos, f"not_{target}": neg})
    if key in WHEN_REJECTED:
        raise d.error((*path, "key"), f"attribute {key} {WHEN_REJECTED[key]}")
    if key.startswith("destination.labels"):
        raise d.error((*path, "key"), f"attribute {key} is replaced by the workload selector")
    if key in WHEN_L7_EXACT:
        if key == "remote.ip":
            d.ip_blocks(values, vp)
            d.ip_blocks(not_values, nvp)
        return None
    for prefix in WHEN_L7_MAPS:
        if key.startswith(prefix):
            if prefix.endswith(".") and len(key) > len(prefix):
                bracket_ok = True
            else:
                rest = key[len(prefix) :]
                bracket_ok = rest.startswith("[") and rest.endswith("]") and len(rest) > 2
            if not bracket_ok:
                raise d.error((*path, "key"), f"bad key {key!r}: should have the form a[b]")
            return None
    raise d.error((*path, "key"), f"unknown attribute {key!r}")


def _parse_policy(d: _Doc, raw: Any, base: Path) -> AuthorizationPolicy | None:
    top = d.mapping(raw, base, TOP_KEYS)
    api = top.get("apiVersion")
    if api is None:
        raise d.error(base, "apiVersion must be set")
    if d.string(api, (*base, "apiVersion")) not in API_VERSIONS:
        raise d.error(
            (*base, "apiVersion"),
            f"unsupported apiVersion {api!r} (expected {' or '.join(API_VERSIONS)})",
        )
    kind = top.get("kind")
    if kind is None:
        raise d.error(base, "kind must be set")
    if d.string(kind, (*base, "kind")) != KIND:
        raise d.error((*base, "kind"), f"unsupported kind {kind!r} (expected {KIND})")

    mp: Path = (*base, "metadata")
    if top.get("metadata") is None:
        raise d.error(mp if "metadata" in top else base, "metadata.name must be set")
    meta = d.mapping(top["metadata"], mp, METADATA_KEYS)
    if meta.get("name") is None:
        raise d.error(mp, "metadata.name must be set")
    name = d.string(meta["name"], (*mp, "name"))
    namespace = d.string(meta.get("namespace", DEFAULT_NAMESPACE), (*mp, "namespace"))
    for what, v in (("name", name), ("namespace", namespace)):
        if not v or "/" in v or "\0" in v or v != v.strip():
            raise d.error((*mp, what), f"invalid {what} {v!r}")
    key = f"{namespace}/{name}"

    dry_run = False
    ann_raw = meta.get("annotations")
    if ann_raw is not None:
        if not isinstance(ann_raw, dict):
            raise d.error((*mp, "annotations"), f"expected a mapping, got {_type_name(ann_raw)}")
        if DRY_RUN_ANNOTATION in ann_raw:
            ap: Path = (*mp, "annotations", DRY_RUN_ANNOTATION)
            v = d.string(ann_raw[DRY_RUN_ANNOTATION], ap)
            if v not in _BOOLS:
                raise d.error(ap, f'expected "true" or "false", got {v!r}')
            dry_run = _BOOLS[v]

    sp: Path = (*base, "spec")
    spec = d.mapping(top.get("spec") or {}, sp, SPEC_KEYS)

    selector = None
    if "selector" in spec:
        sel = d.mapping(spec["selector"] or {}, (*sp, "selector"), frozenset({"matchLabels"}))
        labels_raw = sel.get("matchLabels") or {}
        lp: Path = (*sp, "selector", "matchLabels")
        if not isinstance(labels_raw, dict):
            raise d.error(lp, f"expected a mapping, got {_type_name(labels_raw)}")
        selector = {}
        for k, v in labels_raw.items():
            kp: Path = (*lp, str(k))
            ks = d.string(k, kp)
            vs = d.string(v, kp)
            if not ks:
                raise d.error(kp, "empty label key in selector")
            if "*" in ks or "*" in vs:
                raise d.error(kp, f"wildcard is not supported in selector: {ks}={vs}")
            selector[ks] = vs
    if ("targetRef" in spec or "targetRefs" in spec) and "selector" in spec:
        raise d.error(sp, "only one of targetRefs or selector can be set")

    action_raw = spec.get("action", "ALLOW")
    action_s = d.string(action_raw, (*sp, "action"))
    if "provider" in spec and action_s != "CUSTOM":
        raise d.error((*sp, "provider"), f"`provider` must not be used with action {action_s}")
    if action_s in ("AUDIT", "CUSTOM"):
        d.warn(
            f"{d.where(base)}: policy {key}: ztunnel does not support the {action_s} "
            "action; the policy is skipped"
        )
        return None
    if action_s not in ("ALLOW", "DENY"):
        raise d.error((*sp, "action"), f"unknown action {action_s!r} (expected ALLOW or DENY)")
    action = Action(action_s)
    if "targetRef" in spec or "targetRefs" in spec:
        d.warn(
            f"{d.where(base)}: policy {key}: targetRef(s) address a waypoint, not ztunnel; "
            "the policy is skipped"
        )
        return None

    rules_raw = spec.get("rules")
    rp: Path = (*sp, "rules")
    if rules_raw is not None and not isinstance(rules_raw, list):
        raise d.error(rp, f"expected a list, got {_type_name(rules_raw)}")
    if action is Action.DENY and not rules_raw:
        raise d.error(
            rp if "rules" in spec else sp,
            "DENY action without `rules` is meaningless as it will never be triggered, add "
            "an empty rule `{}` if you want it to be triggered for every connection",
        )
    rules: list[Rule] = []
    sources: list[str] = []
    for i, rr in enumerate(rules_raw or []):
        converted, _ = _convert_rule(d, rr, (*rp, i), action=action, namespace=namespace, key=key)
        if converted is not None:
            rules.append(converted)
            sources.append(d.where((*rp, i)))
    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        action=action,
        rules=tuple(rules),
        selector=selector,
        dry_run=dry_run,
        source=d.where((*mp, "name")),
        rule_sources=tuple(sources),
    )


def _parse_documents(docs: Iterable[YamlDocument]) -> tuple[list[AuthorizationPolicy], list[str]]:
    policies: list[AuthorizationPolicy] = []
    warnings: list[str] = []
    for doc in docs:
        if doc.data is None:
            continue
        d = _Doc(doc)
        data = doc.data
        if isinstance(data, dict) and data.get("kind") == "List" and data.get("apiVersion") == "v1":
            lst = d.mapping(data, (), frozenset({"apiVersion", "kind", "items", "metadata"}))
            items = lst.get("items") or []
            if not isinstance(items, list):
                raise d.error(("items",), f"expected a list, got {_type_name(items)}")
            entries: list[tuple[Any, Path]] = [(it, ("items", i)) for i, it in enumerate(items)]
        else:
            entries = [(data, ())]
        for raw, base in entries:
            try:
                p = _parse_policy(d, raw, base)
            except ValueError as e:  # a model check the YAML checks did not anticipate
                if isinstance(e, ConfigError):
                    raise
                raise d.error(base, str(e)) from None
            if p is not None:
                policies.append(p)
        warnings += d.warnings
    return policies, warnings


def parse_text(text: str | bytes, *, file: str) -> tuple[list[AuthorizationPolicy], list[str]]:
    return _parse_documents(load_documents(text, file=file, error_cls=PolicyError))


def _yaml_files(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    files: list[str] = []
    for p in paths:
        name = os.fspath(p)
        if os.path.isdir(name):
            found = []
            for root, dirs, names in os.walk(name):
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                found += [
                    os.path.join(root, n)
                    for n in names
                    if n.endswith((".yaml", ".yml")) and not n.startswith(".")
                ]
            files += sorted(found)
        elif os.path.exists(name):
            files.append(name)
        else:
            raise PolicyError("no such file or directory", file=name)
    return files


def load_paths(
    paths: Sequence[str | os.PathLike[str]],
) -> tuple[list[AuthorizationPolicy], list[str]]:
    policies: list[AuthorizationPolicy] = []
    warnings: list[str] = []
    for f in _yaml_files(paths):
        ps, ws = _parse_documents(load_file(f, error_cls=PolicyError))
        policies += ps
        warnings += ws
    return policies, warnings
