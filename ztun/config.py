"""ztund's configuration: one YAML file, validated as a whole.

The shape follows ztunnel's local config (``examples/localhost.yaml`` in istio/ztunnel:
``workloads`` with ``name``, ``namespace``, ``serviceAccount``, ``workloadIps``,
``protocol``, ``node``; camelCase keys) and adds what a node daemon without a control
plane needs: which node this is, where identities come from, the listeners, the
network namespace of each local workload, explicit outbound forwards, and Istio
AuthorizationPolicy files. docs/daemon.md has the reference; a minimal file::

    node: node-a
    trustDomain: cluster.local
    workloads:
    - name: client
      namespace: demo
      serviceAccount: client
      workloadIps: [198.18.1.11]
      node: node-a
      netns: /run/netns/client
      forwards:
      - port: 9080
        to: demo/api:8080
    - name: api
      namespace: demo
      serviceAccount: api
      workloadIps: [198.18.2.11]
      node: node-b
    policies: [policies/]

:func:`load` reports every problem it finds at once, each as ``file:line: field:
message`` (the line of the offending value, from :mod:`ztun.yamlpos`): schema errors
(pydantic), cross-references (unknown forward targets, duplicate names and addresses),
what must exist on this machine (network namespaces, certificate folders), and the
policy files (parsed with :meth:`ztun.policy.PolicySet.load`, all or nothing).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from ztun.errors import ConfigError
from ztun.identity import SpiffeId, TrustDomain
from ztun.netns import check_netns
from ztun.yamlpos import YamlDocument, format_path, load_file

__all__ = [
    "DEFAULT_ADMIN",
    "DEFAULT_STATE_DIR",
    "HBONE_PORT",
    "Config",
    "ConfigErrors",
    "Forward",
    "ForwardTarget",
    "IdentityConfig",
    "LoadedConfig",
    "Workload",
    "load",
    "load_text",
]

HBONE_PORT = 15008  # ztunnel's inbound HBONE port, inside each workload's namespace
SOCKS5_PORT = 15080  # ztunnel's SOCKS5 outbound port
DEFAULT_ADMIN = "127.0.0.1:15000"  # ztunnel's admin port; localhost only unless configured
DEFAULT_STATE_DIR = "/var/lib/ztun"
# Kubernetes' default terminationGracePeriodSeconds: what a pod gets to drain by default.
DEFAULT_DRAIN = 30.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def _duration(value: object) -> object:
    """``"30s"``, ``"500ms"``, ``"2m"``, ``"24h"`` or a number of seconds -> float seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 500ms, 2m or 24h")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError("expected a duration such as 30s, 500ms, 2m or 24h")


Duration = Annotated[float, BeforeValidator(_duration), Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]


def parse_address(value: str, *, default_host: str | None = None) -> tuple[str, int]:
    """``"127.0.0.1:15000"``, ``"[::1]:15000"`` (or ``":15000"`` with a default host)."""
    if not isinstance(value, str):
        raise ValueError("expected an address host:port")
    host, sep, port_s = value.rpartition(":")
    if not sep:
        raise ValueError(f"expected host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        if default_host is None:
            raise ValueError(f"expected host:port, got {value!r}")
        host = default_host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be an IP address literal, got {host!r}") from None
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"port must be 0..65535, got {port_s!r}")
    return host, int(port_s)


def _address(value: object) -> object:
    if isinstance(value, str):
        return parse_address(value)
    raise ValueError("expected an address host:port")


Address = Annotated[tuple[str, int], BeforeValidator(_address)]


def _ip(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError("expected an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None


IpAddress = Annotated[str, BeforeValidator(_ip)]


def _name(value: object) -> object:
    if not isinstance(value, str) or not _NAME.match(value) or len(value) > 253:
        raise ValueError(
            "expected a DNS-style name (lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit)"
        )
    return value


Name = Annotated[str, BeforeValidator(_name)]


class _Model(BaseModel):
    # camelCase keys (ztunnel's), unknown keys rejected so a typo is an error.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        alias_generator=to_camel,
        str_strip_whitespace=True,
    )


class Protocol(StrEnum):
    """How a workload is reached (ztunnel's ``protocol``)."""

    HBONE = "HBONE"  # in the mesh: HBONE to its address on 15008
    TCP = "TCP"  # not in the mesh: plain TCP (passthrough)


@dataclasses.dataclass(frozen=True)
class ForwardTarget:
    """Where a forward goes: a workload (``namespace/name:port``) or an address."""

    port: int
    namespace: str | None = None
    name: str | None = None
    ip: str | None = None

    @classmethod
    def parse(cls, value: str) -> ForwardTarget:
        head, sep, port_s = value.rpartition(":")
        if not sep or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
            raise ValueError("expected namespace/name:port, name:port (same namespace) or ip:port")
        port = int(port_s)
        host = head[1:-1] if head.startswith("[") and head.endswith("]") else head
        try:
            return cls(port, ip=str(ipaddress.ip_address(host)))
        except ValueError:
            pass
        ns, slash, name = head.rpartition("/")
        if slash and not ns:
            raise ValueError(f"empty namespace in {value!r}")
        for part in (ns, name) if slash else (name,):
            _name(part)
        return cls(port, namespace=ns or None, name=name)

    def __str__(self) -> str:
        if self.ip is not None:
            host = f"[{self.ip}]" if ":" in self.ip else self.ip
            return f"{host}:{self.port}"
        ref = f"{self.namespace}/{self.name}" if self.namespace else str(self.name)
        return f"{ref}:{self.port}"


def _target(value: object) -> object:
    if isinstance(value, ForwardTarget):
        return value
    if not isinstance(value, str):
        raise ValueError("expected namespace/name:port, name:port or ip:port")
    return ForwardTarget.parse(value)


class Forward(_Model):
    """An explicit outbound entry point inside a local workload's namespace.

    The app connects to ``bind:port``; ztund carries the connection to ``to`` over HBONE
    (expecting the destination workload's SPIFFE ID), or as plain TCP when the
    destination is not in the mesh.
    """

    port: Port
    bind: IpAddress = "127.0.0.1"
    to: Annotated[ForwardTarget, BeforeValidator(_target)]


class Workload(_Model):
    """A workload of the mesh (ztunnel's ``workloads[]`` entry, plus local details)."""

    uid: str | None = None
    name: Name
    namespace: Name
    service_account: Name = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    workload_ips: list[IpAddress] = Field(min_length=1)
    protocol: Protocol = Protocol.HBONE
    node: str
    # Local workloads (node == this node): their network namespace (a path such as
    # /run/netns/<name> or /proc/<pid>/ns/net); ztund opens their listeners there.
    netns: str | None = None
    forwards: list[Forward] = Field(default_factory=list)
    # Transparent capture (docs/capture.md): the cgroup v2 directory of the workload's
    # processes, and whether ztund captures its TCP traffic (connects in that cgroup,
    # inbound connections in its netns) with eBPF.
    cgroup: str | None = None
    capture: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def spiffe_id(self, trust_domain: str) -> SpiffeId:
        return SpiffeId.for_workload(trust_domain, self.namespace, self.service_account)


class CaSource(_Model):
    dir: str | None = None  # default: <stateDir>/ca
    cert_ttl: Duration = 24 * 3600.0  # ztunnel / Istio default workload certificate TTL


class FilesSource(_Model):
    # <dir>/<namespace>/<serviceAccount>/{cert-chain.pem,key.pem,root-cert.pem}
    # (the names Istio uses for file-mounted certificates)
    dir: str


class SpireSource(_Model):
    socket: str | None = None  # default: $SPIFFE_ENDPOINT_SOCKET


class IdentityConfig(_Model):
    """Where local workloads' certificates come from (one source for the node)."""

    source: Literal["ca", "files", "spire"] = "ca"
    ca: CaSource = Field(default_factory=CaSource)
    files: FilesSource | None = None
    spire: SpireSource = Field(default_factory=SpireSource)


class Listeners(_Model):
    admin: Address = Field(default_factory=lambda: parse_address(DEFAULT_ADMIN))
    # An extra address serving only /metrics (and /stats/prometheus), e.g. 0.0.0.0:15020.
    metrics: Address | None = None
    # Inside each local workload's namespace.
    inbound: Port = HBONE_PORT
    inbound_bind: IpAddress = "0.0.0.0"
    # SOCKS5 outbound entry point (ztunnel's 15080) inside each local workload's
    # namespace, on socks5Bind; null: none.
    socks5: Port | None = SOCKS5_PORT
    socks5_bind: IpAddress = "127.0.0.1"
    # Transparent capture: ztund's outbound and plaintext-inbound ports on loopback inside
    # each captured workload's namespace; null: 15001 / 15006 (ztunnel's).
    outbound: Port | None = None
    inbound_plaintext: Port | None = None


class EngineConfig(_Model):
    workers: Annotated[int, Field(ge=0, le=256)] = 1  # per local workload; 0: one per CPU
    connect_timeout: Duration = 10.0
    handshake_timeout: Duration = 10.0
    idle_timeout: Duration | None = None
    # The eBPF sockmap accelerator (docs/daemon.md "Same-node shortcut"): false (default),
    # true (required: ztund does not start without it) or auto (when available). One per
    # ztund, on accelerateCgroup (default: ztund's own cgroup; never the cgroup2 root),
    # which must hold ztund and the local apps.
    accelerate: bool | Literal["auto"] = False
    accelerate_cgroup: str | None = None

    @field_validator("accelerate", mode="before")
    @classmethod
    def _accelerate(cls, v: object) -> object:
        if isinstance(v, bool) or v == "auto":
            return v
        raise ValueError(f"expected false, true or auto, got {v!r}")


class Config(_Model):
    """The whole file (see the module docstring and docs/daemon.md)."""

    node: str
    trust_domain: str = "cluster.local"
    state_dir: str = DEFAULT_STATE_DIR
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    listeners: Listeners = Field(default_factory=Listeners)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    drain_timeout: Duration = DEFAULT_DRAIN
    access_log: bool = True
    root_namespace: Name = "istio-system"
    policies: list[str] = Field(default_factory=list)
    workloads: list[Workload] = Field(default_factory=list)

    @field_validator("trust_domain")
    @classmethod
    def _td(cls, v: str) -> str:
        try:
            return TrustDomain.parse(v).name
        except ValueError as e:
            raise ValueError(str(e)) from None

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        if not v:
            raise ValueError("the node name must not be empty")
        return v

    # -- views ---------------------------------------------------------------------------

    def local_workloads(self) -> list[Workload]:
        return [w for w in self.workloads if w.node == self.node]

    def workload(self, key: str) -> Workload | None:
        return next((w for w in self.workloads if w.key == key), None)

    def by_ip(self) -> dict[str, Workload]:
        return {ip: w for w in self.workloads for ip in w.workload_ips}

    def resolve(self, source: Workload, target: ForwardTarget) -> tuple[Workload | None, str]:
        """The destination workload (None: not a known workload) and the IP to dial."""
        if target.ip is not None:
            return self.by_ip().get(target.ip), target.ip
        key = f"{target.namespace or source.namespace}/{target.name}"
        w = self.workload(key)
        if w is None:
            raise KeyError(key)
        return w, w.workload_ips[0]


@dataclasses.dataclass(frozen=True)
class LoadedConfig:
    """A validated config, where it came from, and its compiled policies."""

    config: Config
    file: str
    policy_paths: tuple[str, ...]
    policies: Any  # ztun.policy.PolicySet (imported lazily)
    warnings: tuple[str, ...] = ()

    @property
    def base_dir(self) -> Path:
        return Path(self.file).resolve().parent


class ConfigErrors(ConfigError):  # noqa: N818 - a ConfigError holding several
    """Several configuration errors at once; ``errors`` are the located ones, in order."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = list(errors)
        first = self.errors[0] if self.errors else ConfigError("invalid configuration")
        super().__init__(first.reason, file=first.file, line=first.line, field=first.field)

    def _render(self) -> str:
        errors = getattr(self, "errors", None)
        if not errors:
            return super()._render()
        head = f"{len(errors)} error{'s' if len(errors) != 1 else ''} in the configuration:"
        return "\n".join([head, *(f"  {e}" for e in errors)])

    def __iter__(self) -> Iterator[ConfigError]:
        return iter(self.errors)


def _loc(loc: Sequence[int | str]) -> tuple[str | int, ...]:
    # pydantic puts validator names ("function-before[...]") and union tags in loc
    return tuple(p for p in loc if isinstance(p, int) or not ("[" in p or p in ("tagged-union",)))


def _schema_errors(doc: YamlDocument, exc: pydantic.ValidationError) -> list[ConfigError]:
    out = []
    for e in exc.errors(include_url=False):
        loc = _loc(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(doc.error(loc, msg, at_key=e["type"] == "extra_forbidden"))
    return out


def _semantic_errors(
    doc: YamlDocument, cfg: Config, index: Sequence[int], base: Path, *, runtime: bool
) -> list[ConfigError]:
    """Cross-field checks; ``index[j]`` is the file's index of ``cfg.workloads[j]``.

    Workloads left out for their own errors still count as forward targets (by name),
    so one mistake is not reported twice.
    """
    raw = doc.data.get("workloads") if isinstance(doc.data, dict) else None
    named = {
        f"{w.get('namespace')}/{w.get('name')}"
        for w in (raw if isinstance(raw, list) else [])
        if isinstance(w, dict)
    }
    errors: list[ConfigError] = []

    def err(path: Sequence[str | int], message: str) -> None:
        errors.append(doc.error(path, message))

    seen_keys: dict[str, int] = {}
    seen_ips: dict[str, tuple[int, int]] = {}
    for j, w in enumerate(cfg.workloads):
        i = index[j]
        if w.key in seen_keys:
            err(
                ("workloads", i, "name"),
                f"duplicate workload {w.key} (also workloads[{seen_keys[w.key]}])",
            )
        seen_keys.setdefault(w.key, i)
        for k, ip in enumerate(w.workload_ips):
            if ip in seen_ips:
                err(
                    ("workloads", i, "workloadIps", k),
                    f"address {ip} also belongs to workloads[{seen_ips[ip][0]}]",
                )
            seen_ips.setdefault(ip, (i, k))
        local = w.node == cfg.node
        if not local:
            if w.netns is not None:
                err(
                    ("workloads", i, "netns"),
                    f"only local workloads (node {cfg.node}) have a netns here",
                )
            if w.forwards:
                err(
                    ("workloads", i, "forwards"),
                    f"only local workloads (node {cfg.node}) have forwards here",
                )
            if w.capture:
                err(
                    ("workloads", i, "capture"),
                    f"only local workloads (node {cfg.node}) are captured here",
                )
            continue
        if w.protocol is Protocol.HBONE and w.netns is None:
            err(
                ("workloads", i, "netns"), "a local HBONE workload needs its network namespace path"
            )
        elif w.netns is not None and runtime:
            why = check_netns(w.netns)
            if why:
                err(("workloads", i, "netns"), f"{w.netns}: {why}")
        if w.capture:
            if w.protocol is not Protocol.HBONE:
                err(("workloads", i, "capture"), "only HBONE (in-mesh) workloads are captured")
            if w.cgroup is None:
                err(("workloads", i, "capture"), "capture needs the workload's cgroup (cgroup:)")
            elif runtime and not os.path.isdir(w.cgroup):
                err(("workloads", i, "cgroup"), f"{w.cgroup}: no such cgroup directory")
        if w.forwards and w.protocol is not Protocol.HBONE:
            err(("workloads", i, "forwards"), "forwards need an HBONE (in-mesh) workload")
        ports: dict[tuple[str, int], int] = {}
        li = cfg.listeners
        reserved = {li.inbound, li.socks5, li.outbound, li.inbound_plaintext} - {None}
        if w.capture:
            reserved |= {li.outbound or 15001, li.inbound_plaintext or 15006}
        for k, f in enumerate(w.forwards):
            path = ("workloads", i, "forwards", k)
            if (f.bind, f.port) in ports:
                err(
                    (*path, "port"),
                    f"port {f.port} already used by forwards[{ports[(f.bind, f.port)]}]",
                )
            ports.setdefault((f.bind, f.port), k)
            if f.port in reserved:
                err((*path, "port"), f"port {f.port} is reserved for ztund's own listener")
            try:
                dst, _ = cfg.resolve(w, f.to)
            except KeyError as e:
                if e.args[0] not in named:
                    err((*path, "to"), f"no workload {e.args[0]} in this config")
                continue
            if dst is not None and dst.key == w.key:
                err((*path, "to"), "a forward to the workload itself")
    ident = cfg.identity
    if ident.source == "files":
        if ident.files is None:
            err(("identity", "files"), "identity source 'files' needs files.dir")
        elif runtime:
            d = base / ident.files.dir
            for j, w in enumerate(cfg.workloads):
                i = index[j]
                if w.node != cfg.node or w.protocol is not Protocol.HBONE:
                    continue
                for name in ("cert-chain.pem", "key.pem", "root-cert.pem"):
                    p = d / w.namespace / w.service_account / name
                    if not p.is_file():
                        err(
                            ("identity", "files", "dir"),
                            f"{p}: missing (for workloads[{i}] {w.key})",
                        )
    eng = cfg.engine
    if eng.accelerate_cgroup is not None:
        where = ("engine", "accelerateCgroup")
        if not eng.accelerate:
            err(where, "set, but engine.accelerate is false")
        elif not os.path.isabs(eng.accelerate_cgroup):
            err(where, f"{eng.accelerate_cgroup}: expected an absolute cgroup v2 directory")
        elif runtime and not os.path.isdir(eng.accelerate_cgroup):
            err(where, f"{eng.accelerate_cgroup}: no such cgroup directory")
        elif runtime and _is_cgroup2_root(eng.accelerate_cgroup):
            err(
                where,
                f"{eng.accelerate_cgroup} is the cgroup2 root: the accelerator would watch "
                "every process of the host; name a cgroup holding ztund and the apps",
            )
    admin = cfg.listeners.admin
    if cfg.listeners.metrics is not None and cfg.listeners.metrics == admin:
        err(("listeners", "metrics"), "the metrics address is the admin address")
    return errors


def _is_cgroup2_root(path: str) -> bool:
    from ztun.bpf import find_mount

    root = find_mount("cgroup2")
    return root is not None and os.path.realpath(path) == os.path.realpath(root)


def _policy_paths(doc: YamlDocument, base: Path) -> tuple[list[str], list[ConfigError]]:
    raw = doc.data.get("policies") if isinstance(doc.data, dict) else None
    if not isinstance(raw, list):
        return [], []
    paths, errors = [], []
    for i, p in enumerate(raw):
        if not isinstance(p, str):
            continue  # the schema reports it
        full = base / p
        if not full.exists():
            errors.append(doc.error(("policies", i), f"{full}: no such file or folder"))
            continue
        paths.append(str(full))
    return paths, errors


def _load_policies(
    paths: Sequence[str], root_namespace: str
) -> tuple[Any, list[ConfigError], list[str]]:
    from ztun.policy import PolicySet

    errors: list[ConfigError] = []
    # Each path on its own first, so that every broken file is named, not just the first.
    for p in paths:
        try:
            PolicySet.load(p, root_namespace=root_namespace)
        except ConfigError as e:
            errors.append(e)
    if errors:
        return None, errors, []
    try:
        ps = PolicySet.load(*paths, root_namespace=root_namespace)
    except ConfigError as e:  # duplicates across files
        return None, [e], []
    return ps, [], list(ps.warnings)


def _lenient(
    data: dict[str, Any], exc: pydantic.ValidationError
) -> tuple[Config, list[int]] | None:
    """The valid part of a config that failed validation, so that the cross-field checks
    can still run and every error is reported at once: top-level fields with errors are
    dropped (defaults apply), workloads with errors are left out. None when even that
    does not validate (e.g. no node name)."""
    bad_top = {e["loc"][0] for e in exc.errors() if e["loc"] and e["loc"][0] != "workloads"}
    bad_wl = {
        e["loc"][1]
        for e in exc.errors()
        if len(e["loc"]) >= 2 and e["loc"][0] == "workloads" and isinstance(e["loc"][1], int)
    }
    if "node" in bad_top or "node" not in data:
        return None
    top = {k: v for k, v in data.items() if k not in bad_top and k != "workloads"}
    raw = data.get("workloads")
    index = [i for i in range(len(raw)) if i not in bad_wl] if isinstance(raw, list) else []
    if isinstance(raw, list) and "workloads" not in bad_top:
        top["workloads"] = [raw[i] for i in index]
    else:
        index = []
    try:
        return Config.model_validate(top), index
    except pydantic.ValidationError:
        return None


def load_text(text: str | bytes, *, file: str = "<string>", runtime: bool = True) -> LoadedConfig:
    """Validate a config given as text (see :func:`load`)."""
    from ztun.yamlpos import load_documents

    try:
        docs = load_documents(text, file=file)
    except ConfigError as e:  # unreadable, not YAML, duplicate keys
        raise ConfigErrors([e]) from None
    return _validate(docs, file, runtime=runtime)


def load(path: str | os.PathLike[str], *, runtime: bool = True) -> LoadedConfig:
    """Read and validate a config file; raise :class:`ConfigErrors` listing every problem.

    ``runtime`` also checks what must exist on this machine (network namespaces of local
    workloads, certificate files); relative paths are relative to the file's folder.
    """
    try:
        docs = load_file(path)
    except ConfigError as e:  # unreadable, not YAML, duplicate keys
        raise ConfigErrors([e]) from None
    return _validate(docs, os.fspath(path), runtime=runtime)


def _validate(docs: list[YamlDocument], file: str, *, runtime: bool) -> LoadedConfig:
    docs = [d for d in docs if d.data is not None]
    if not docs:
        raise ConfigErrors([ConfigError("empty configuration", file=file)])
    if len(docs) > 1:
        raise ConfigErrors(
            [ConfigError("one YAML document expected", file=file, line=docs[1].start.line)]
        )
    doc = docs[0]
    if not isinstance(doc.data, dict):
        raise ConfigErrors([doc.error((), "expected a mapping at the top level")])
    base = Path(file).resolve().parent
    errors: list[ConfigError] = []
    cfg: Config | None = None
    try:
        cfg = Config.model_validate(doc.data)
        index: list[int] = list(range(len(cfg.workloads)))
    except pydantic.ValidationError as e:
        errors += _schema_errors(doc, e)
        lenient = _lenient(doc.data, e)
    else:
        lenient = (cfg, index)
    if lenient is not None:
        errors += _semantic_errors(doc, lenient[0], lenient[1], base, runtime=runtime)
    paths, perrs = _policy_paths(doc, base)
    errors += perrs
    root = cfg.root_namespace if cfg is not None else "istio-system"
    policies, polerrs, warnings = _load_policies(paths, root)
    errors += polerrs
    if errors:
        errors.sort(key=lambda e: (e.file != file, e.file or "", e.line or 0))
        raise ConfigErrors(errors)
    assert cfg is not None
    return LoadedConfig(cfg, file, tuple(paths), policies, tuple(warnings))


def describe_field(path: Sequence[str | int]) -> str:
    return format_path(path)
