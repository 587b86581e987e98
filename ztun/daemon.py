"""ztund: the reference node daemon.

One process secures the workloads of one node, each with its own identity, the way
Istio ambient's ztunnel does in its in-pod mode:

* for every local workload (``node`` equal to this node's name) ztund starts an engine
  from a thread inside the workload's network namespace (:mod:`ztun.netns`), so the
  workload gets its own HBONE port 15008 there, with its own certificate, and the
  connections the engine dials leave from the workload's address;
* explicit outbound entry points (``forwards``) are opened in the same namespace: the
  app connects to ``127.0.0.1:<port>`` and ztund carries the connection over HBONE to
  the destination workload, verifying its SPIFFE ID;
* identities come from the embedded CA (default), files or a SPIRE agent and are
  renewed at half their lifetime (:class:`ztun.rotation.IdentityManager`);
* Istio AuthorizationPolicy files decide who may connect;
* an admin server (:mod:`ztun.admin`) serves readiness, the config dump, log levels and
  Prometheus metrics (:mod:`ztun.metrics`); an access log line is written per connection.

Signals: SIGTERM (and SIGINT) drain — stop accepting, send GOAWAY, let connections finish
until ``drainTimeout``, then close; SIGHUP reloads the file, the policies and the
certificates without dropping a live connection, and a reload that fails anywhere is
rejected whole (the running config stays).

CLI: ``ztund run --config FILE``, ``ztund check-config FILE``, ``ztund version``,
``ztund bpf cleanup``; ``python -m ztun`` is the same program. docs/daemon.md has the
details.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import inspect
import ipaddress
import json
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from ztun import config as cfgmod
from ztun._version import __version__
from ztun.admin import AdminServer
from ztun.config import Config, ConfigErrors, LoadedConfig, Protocol, Workload
from ztun.errors import ConfigError, IdentityError, ZtunError
from ztun.events import ConnectionEvent
from ztun.identity import IdentitySource, SpiffeId, Svid, TrustBundle
from ztun.mesh import Destination
from ztun.metrics import (
    OK_REASONS,
    ConnectionRecord,
    EngineSample,
    MeshCollector,
    TrafficLabels,
    TrafficMetrics,
    response_flags,
)
from ztun.netns import run_in_netns
from ztun.rotation import IdentityManager
from ztun.tunnel import Forward, Tunnel

if TYPE_CHECKING:
    from ztun.mesh import HboneServer
    from ztun.policy import PolicySet

__all__ = ["Daemon", "JsonFormatter", "TextFormatter", "main", "setup_logging"]

log = logging.getLogger("ztun.daemon")
access_log = logging.getLogger("ztun.access")

# How long a reload waits for the certificate of a new identity before it gives up on
# starting that workload now (it is then started as soon as the certificate arrives).
IDENTITY_WAIT = 10.0
# How often the main loop retries workloads that could not start (identity not there
# yet, namespace gone): often enough to be ready soon after the cause goes away.
RECONCILE_INTERVAL = 1.0
RETRY_BACKOFF = 5.0
# Distinct label sets remembered for the event path; beyond this the cache starts over
# (a scan of many source addresses must not grow memory without bound).
LABEL_CACHE_MAX = 4096
MUTUAL_TLS = "mutual_tls"

_MODE_FORWARD, _MODE_TLS_OUT, _MODE_HBONE_IN, _MODE_HBONE_OUT, _MODE_SOCKS5 = 1, 2, 4, 5, 6


def _tunnel_accepts(method: Callable[..., Any], name: str) -> bool:
    """Whether this build's Tunnel API has a parameter (features land independently)."""
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def policy_supported() -> bool:
    """Can Tunnel enforce policy on the HBONE inbound listeners ztund opens?"""
    return (
        _tunnel_accepts(Tunnel.__init__, "policies")
        and hasattr(Tunnel, "set_policy")
        and _tunnel_accepts(Tunnel.serve, "policy")
    )


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _addr(a: tuple[str, int] | None) -> str:
    if a is None:
        return "-"
    host, port = a[0], a[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------
# Per-workload runtime


@dataclasses.dataclass(frozen=True)
class ResolvedForward:
    """A forward with its destination resolved against the workload directory."""

    bind: str
    port: int
    target: tuple[str, int]  # the destination workload's ip:port (the HBONE authority)
    expect: tuple[str, ...]  # its SPIFFE ID; empty: plain TCP (not in the mesh)
    via: tuple[str, int] | None  # its HBONE listener
    destination: str | None  # "namespace/name" of the destination workload, if known
    text: str  # the config's "to" as written


@dataclasses.dataclass
class ListenerInfo:
    kind: str  # "inbound" or "forward"
    forward: ResolvedForward | None = None


class WorkloadRuntime:
    """A local workload served by its own engine, started inside its network namespace."""

    def __init__(self, spec: Workload, spiffe_id: SpiffeId, name: str) -> None:
        self.spec = spec
        self.spiffe_id = spiffe_id
        self.name = name  # unique engine name (metrics keys): "ns/name#generation"
        self.tunnel: Tunnel | None = None
        self.inbounds: list[HboneServer] = []  # one per IP family (dual stack)
        self.socks5: Forward | None = None
        self.forwards: dict[tuple[str, int], tuple[ResolvedForward, Forward]] = {}
        self.listeners: dict[int, ListenerInfo] = {}
        self.error: str | None = None
        self.next_try = 0.0
        self.unsubscribe: Callable[[], None] | None = None
        self.capture: Any = None  # ztun.capture.Capture (docs/capture.md)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def inbound(self) -> HboneServer | None:
        return self.inbounds[0] if self.inbounds else None

    @property
    def running(self) -> bool:
        return self.tunnel is not None and bool(self.inbounds)

    def open_inbound(self, listen: Sequence[tuple[str, int]], **serve_kw: Any) -> None:
        """HBONE listeners on ``listen`` (called inside the namespace)."""
        assert self.tunnel is not None
        servers = []
        try:
            for addr in listen:
                servers.append(self.tunnel.serve(addr, **serve_kw))
        except BaseException:
            for h in servers:
                h.close()
            raise
        self.inbounds = servers
        for h in servers:
            self.listeners[h.id] = ListenerInfo("inbound")

    def in_netns(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        assert self.spec.netns is not None
        return run_in_netns(self.spec.netns, fn, *args, name=f"ztund-{self.spec.name}", **kw)

    def open_forward(self, f: ResolvedForward) -> None:
        assert self.tunnel is not None
        t = self.tunnel
        if f.expect:
            h = self.in_netns(
                t.forward,
                (f.bind, f.port),
                f.target,
                expect=list(f.expect),
                via=f.via,
                protocol="hbone",
            )
        else:
            h = self.in_netns(t.forward, (f.bind, f.port), f.target, plaintext=True)
        self.forwards[(f.bind, f.port)] = (f, h)
        self.listeners[h.id] = ListenerInfo("forward", f)

    def close_forward(self, key: tuple[str, int]) -> None:
        entry = self.forwards.pop(key, None)
        if entry is not None:
            entry[1].close()  # stops accepting; its live connections go on

    def close_listeners(self) -> None:
        for key in list(self.forwards):
            self.close_forward(key)
        if self.socks5 is not None:
            self.socks5.close()
            self.socks5 = None
        for h in self.inbounds:
            h.close()
        _release_capture(self)

    def describe(self) -> dict[str, Any]:
        listeners: list[dict[str, Any]] = []
        for server in self.inbounds:
            listeners.append({"kind": "hbone_inbound", "address": _addr(server.address)})
        if self.socks5 is not None:
            listeners.append({"kind": "socks5", "address": _addr(self.socks5.address)})
        for f, h in self.forwards.values():
            d: dict[str, Any] = {
                "kind": "forward",
                "address": _addr(h.address),
                "to": f.text,
                "target": _addr(f.target),
            }
            if f.expect:
                d.update(protocol="HBONE", via=_addr(f.via), expect=list(f.expect))
            else:
                d["protocol"] = "TCP"
            listeners.append(d)
        if self.capture is not None and not self.capture.closed:
            listeners.append({"kind": "capture", "name": self.capture.name})
        return {"running": self.running, "error": self.error, "listeners": listeners}


# ---------------------------------------------------------------------------------------
# Logging


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z  info  ztun.access  connection complete ...``."""

    def format(self, record: logging.LogRecord) -> str:
        t = dt.datetime.fromtimestamp(record.created, dt.UTC)
        ts = t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
        msg = record.getMessage()
        fields = getattr(record, "fields", None)
        if fields:
            msg += " " + " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items() if v is not None)
        line = f"{ts}\t{record.levelname.lower()}\t{record.name}\t{msg}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _logfmt(v: object) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\t'):
        return json.dumps(s)
    return s


class JsonFormatter(logging.Formatter):
    """One JSON object per line; structured fields (access log) at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        t = dt.datetime.fromtimestamp(record.created, dt.UTC)
        obj: dict[str, Any] = {
            "time": t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "scope": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            obj.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    """Route ztun's loggers to stderr in the given format (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("ztun").setLevel(level.upper())


# ---------------------------------------------------------------------------------------
# The daemon


@dataclasses.dataclass
class ReloadStatus:
    generation: int = 1
    loaded_at: str | None = None
    last_attempt: str | None = None
    last_ok: bool = True
    last_error: str | None = None
    ok: int = 0
    failed: int = 0


class _Identity:
    """One SPIFFE ID's certificate manager and the source it owns (if not shared)."""

    def __init__(self, manager: IdentityManager, owned: IdentitySource | None) -> None:
        self.manager = manager
        self.owned = owned

    def close(self) -> None:
        if self.owned is not None:
            self.manager.close()  # closes its own source too
        else:
            self.manager.stop()


class Daemon:
    """A running ztund: see the module docstring. ``run()`` blocks until drained."""

    def __init__(self, config_path: str | os.PathLike[str]) -> None:
        self.config_path = os.fspath(config_path)
        self.loaded: LoadedConfig = cfgmod.load(self.config_path)
        # The eBPF sockmap accelerator (engine.accelerate): one for every engine of this
        # ztund; None when off or unavailable (self._acc_note says why).
        self._acc: Any = None
        self._acc_note = "off (engine.accelerate: false)"
        self._acc_addrs: set[str] = set()  # same-node app addresses registered with it
        self._index(self.loaded.config)
        self.reload_status = ReloadStatus(loaded_at=_iso(dt.datetime.now(dt.UTC)))
        self.traffic = TrafficMetrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            MeshCollector(
                self.traffic,
                self._engine_samples,
                live=self._live_bytes,
                extra=self._extra_metrics,
            )
        )
        self._lock = threading.RLock()
        self._events: queue.Queue[tuple[str, str]] = queue.Queue()
        self._identities: dict[SpiffeId, _Identity] = {}
        self._shared_source: IdentitySource | None = None
        self._runtimes: dict[str, WorkloadRuntime] = {}
        self._draining_tunnels: list[threading.Thread] = []
        # engines that stopped accepting and let their connections finish (replaced or
        # removed workloads): their live bytes still count at scrape time
        self._draining_rts: dict[str, WorkloadRuntime] = {}
        self._engine_seq = 0
        self._state = "starting"
        self._policy_ok = policy_supported()
        self._admin: AdminServer | None = None
        self._metrics_server: AdminServer | None = None
        self._started = time.monotonic()

    def _index(self, cfg: Config) -> None:
        """Look-up tables for the event path (rebuilt on load and reload)."""
        self._by_ip = cfg.by_ip()
        self._ids = {w.key: str(w.spiffe_id(cfg.trust_domain)) for w in cfg.workloads}
        self._label_cache: dict[tuple[Any, ...], TrafficLabels] = {}
        # Destinations of same-node routes (the sockmap shortcut): address -> SPIFFE ID.
        self._local_route_ips = {
            ip: self._ids[w.key] for w in self._local_routes(cfg) for ip in w.workload_ips
        }

    # -- properties ----------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.loaded.config

    @property
    def policies(self) -> PolicySet | None:
        return _nonempty(self.loaded.policies)

    @property
    def admin_address(self) -> tuple[str, int] | None:
        return self._admin.address if self._admin is not None else None

    # -- identity --------------------------------------------------------------------------

    def _make_source(self, cfg: Config, workload: Workload | None) -> tuple[IdentitySource, bool]:
        """The identity source for a workload, and whether it is shared by all of them."""
        ident = cfg.identity
        if ident.source == "ca":
            if self._shared_source is None:
                from ztun.ca import CaIdentitySource, CertificateAuthority

                d = ident.ca.dir or os.path.join(cfg.state_dir, "ca")
                d = str(Path(self.config_path).resolve().parent / d)
                ca = CertificateAuthority(
                    d, cfg.trust_domain, validity=dt.timedelta(seconds=ident.ca.cert_ttl)
                )
                self._shared_source = CaIdentitySource(ca)
            return self._shared_source, True
        if ident.source == "spire":
            if self._shared_source is None:
                from ztun.spire import WorkloadApiSource

                self._shared_source = WorkloadApiSource(ident.spire.socket)
            return self._shared_source, True
        from ztun.identity import FileIdentitySource

        assert ident.files is not None and workload is not None
        base = Path(self.config_path).resolve().parent / ident.files.dir
        wdir = base / workload.namespace / workload.service_account
        src = FileIdentitySource(
            wdir / "cert-chain.pem",
            wdir / "key.pem",
            wdir / "root-cert.pem",
            trust_domain=cfg.trust_domain,
        )
        return src, False

    def _ensure_identity(self, cfg: Config, w: Workload) -> _Identity:
        sid = w.spiffe_id(cfg.trust_domain)
        ident = self._identities.get(sid)
        if ident is None:
            source, shared = self._make_source(cfg, w)
            mgr = IdentityManager(
                source, [sid], on_update=functools.partial(self._on_identity, sid)
            )
            ident = _Identity(mgr, None if shared else source)
            self._identities[sid] = ident
            mgr.start()
        return ident

    def _on_identity(self, sid: SpiffeId, _sid: SpiffeId, svid: Svid, bundle: TrustBundle) -> None:
        # The rotation thread: new handshakes of every engine with this identity use it.
        with self._lock:
            tunnels = [rt.tunnel for rt in self._runtimes.values() if rt.spiffe_id == sid]
        for t in tunnels:
            if t is not None:
                t.set_identity(svid, bundle)
        log.info(
            "identity %s: certificate serial %s valid until %s",
            sid,
            svid.serial,
            _iso(svid.not_after),
        )

    # -- workload lifecycle -----------------------------------------------------------------

    def _resolve_forwards(self, cfg: Config, w: Workload) -> list[ResolvedForward]:
        out = []
        for f in w.forwards:
            dst, ip = cfg.resolve(w, f.to)
            target = (ip, f.to.port)
            if dst is not None and dst.protocol is Protocol.HBONE:
                expect: tuple[str, ...] = (str(dst.spiffe_id(cfg.trust_domain)),)
                via: tuple[str, int] | None = (ip, cfg.listeners.inbound)
            else:
                expect, via = (), None
            out.append(
                ResolvedForward(
                    f.bind,
                    f.port,
                    target,
                    expect,
                    via,
                    dst.key if dst is not None else None,
                    str(f.to),
                )
            )
        return out

    def _policy_workload(self, w: Workload) -> Any:
        from ztun.policy import Workload as PolicyWorkload

        return PolicyWorkload(
            name=w.name,
            namespace=w.namespace,
            service_account=w.service_account,
            labels=dict(w.labels),
            ips=tuple(w.workload_ips),  # type: ignore[arg-type]
        )

    def _start_runtime(self, loaded: LoadedConfig, w: Workload) -> WorkloadRuntime:
        """Start a workload's engine and listeners in its namespace; raise on failure."""
        cfg = loaded.config
        ident = self._ensure_identity(cfg, w)
        sid = w.spiffe_id(cfg.trust_domain)
        svid = ident.manager.current(sid)  # IdentityError while pending
        bundle = ident.manager.bundle()
        self._engine_seq += 1
        rt = WorkloadRuntime(w, sid, f"{w.key}#{self._engine_seq}")
        kw: dict[str, Any] = {
            "identity": svid,
            "trust": bundle,
            "workers": cfg.engine.workers,
            "connect_timeout": cfg.engine.connect_timeout,
            "handshake_timeout": cfg.engine.handshake_timeout,
            "idle_timeout": cfg.engine.idle_timeout,
            "access_log": False,  # ztund writes its own, with workload names
        }
        serve_kw: dict[str, Any] = {"workloads": list(w.workload_ips), "deliver": False}
        if self._acc is not None:
            kw["accelerate"] = self._acc
        if self._policy_ok:
            kw["policies"] = _nonempty(loaded.policies)
            kw["workload"] = self._policy_workload(w)
            kw["workloads"] = self._route_policy_workloads(cfg, w)
            serve_kw["policy"] = True
        forwards = self._resolve_forwards(cfg, w)
        listen = _inbound_addresses(cfg, w)
        directory = _directory(cfg, self._local_routes(cfg))
        li = cfg.listeners
        socks = (li.socks5_bind, li.socks5) if li.socks5 is not None else None

        def start() -> Tunnel:
            # On a thread inside the workload's namespace: the engine's worker threads
            # are created here and inherit it; so are the listening sockets.
            t = Tunnel(**kw)
            try:
                t.start()
                rt.tunnel = t
                rt.unsubscribe = t.subscribe(functools.partial(self._on_event, rt))
                rt.open_inbound(listen, **serve_kw)
                t.set_directory(directory)
                if socks is not None:
                    rt.socks5 = t.socks5(socks)
                    rt.listeners[rt.socks5.id] = ListenerInfo("socks5")
                for f in forwards:
                    rt.open_forward(f)
                _start_capture(rt, cfg)
            except BaseException:
                rt.tunnel = None
                rt.inbounds = []
                _release_capture(rt)
                t.close()
                raise
            return t

        rt.in_netns(start)
        log.info(
            "workload %s (%s) serving in %s: HBONE on %s, %d forward(s)",
            w.key,
            sid,
            w.netns,
            ", ".join(_addr(h.address) for h in rt.inbounds),
            len(rt.forwards),
        )
        return rt

    # -- the same-node shortcut (engine.accelerate; docs/daemon.md) --------------------------

    def _local_routes(self, cfg: Config) -> list[Workload]:
        """The workloads reached by a same-node route (policy decided by the source's
        engine, payload app to app by sk_msg redirect) instead of HBONE: with the
        accelerator, this node's HBONE workloads, except captured ones (their inbound
        sk_lookup steers plaintext connects to 15006: they keep HBONE)."""
        if self._acc is None:
            return []
        return [
            w
            for w in cfg.local_workloads()
            if w.protocol is Protocol.HBONE and not w.capture and w.netns is not None
        ]

    def _route_policy_workloads(self, cfg: Config, w: Workload) -> list[Any]:
        """What a workload's engine must know to judge its same-node routes: their
        destinations (their selectors and namespaces decide, as at an HBONE inbound)."""
        return [self._policy_workload(d) for d in self._local_routes(cfg) if d.key != w.key]

    def _open_accelerator(self, cfg: Config) -> None:
        """One SockmapAccelerator for every engine; ``auto`` runs without it when it cannot
        be had (logged once), ``true`` refuses to start."""
        mode = cfg.engine.accelerate
        if mode is False:
            return
        from ztun import bpf

        try:
            ok, why = bpf.available()
            if not ok:
                raise ZtunError(f"eBPF sockmap unavailable: {why}")
            own = bpf.own_cgroup()
            where = Path(cfg.engine.accelerate_cgroup or own)
            root = bpf.cgroup2_root()
            if os.path.realpath(where) == os.path.realpath(root):
                raise ConfigError(
                    f"the accelerator would attach to the cgroup2 root {root} (every process "
                    "of the host): run ztund in a cgroup of its own, or set "
                    "engine.accelerateCgroup to a cgroup that holds ztund and the apps",
                    file=self.config_path,
                    field="engine.accelerateCgroup",
                )
            real_own, real_where = Path(os.path.realpath(own)), Path(os.path.realpath(where))
            if real_own != real_where and real_where not in real_own.parents:
                raise ConfigError(
                    f"ztund runs in {own}, outside {where}: the accelerator would not see "
                    "its sockets",
                    file=self.config_path,
                    field="engine.accelerateCgroup",
                )
            self._acc = bpf.SockmapAccelerator(where)
        except (ZtunError, OSError) as e:
            self._acc_note = f"unavailable: {e}"
            if mode is True:
                raise ZtunError(f"engine.accelerate is true, but {self._acc_note}") from None
            log.warning("eBPF acceleration off (engine.accelerate: auto): %s", e)
            return
        self._acc_note = f"on (cgroup {self._acc.cgroup}, mark {self._acc.mark:#x})"
        log.info("eBPF acceleration %s: same-node routes take the sockmap shortcut", self._acc_note)
        self._sync_acc_addresses(cfg)

    def _sync_acc_addresses(self, cfg: Config, *, drop: bool = True) -> None:
        """Register the same-node routes' addresses with the accelerator (each workload
        has its own network namespace: the kernel must know these are apps of this host);
        ``drop``: also forget those no longer routed so."""
        if self._acc is None:
            return
        want = {ip for w in self._local_routes(cfg) for ip in w.workload_ips}
        for ip in sorted(want - self._acc_addrs):
            self._acc.add_local_address(ip)
            self._acc_addrs.add(ip)
        if drop:
            for ip in sorted(self._acc_addrs - want):
                with contextlib.suppress(ZtunError):
                    self._acc.del_local_address(ip)
                self._acc_addrs.discard(ip)

    def _close_accelerator(self, engines_stopped: bool) -> None:
        acc, self._acc = self._acc, None
        if acc is None:
            return
        if not engines_stopped:
            # An engine still draining calls into it: the kernel detaches it at exit.
            log.warning("eBPF accelerator left to process exit: an engine is still stopping")
            return
        acc.close()
        self._acc_note = "closed"

    def _stop_runtime(self, rt: WorkloadRuntime, drain: float) -> threading.Thread | None:
        """Close a workload's listeners now; let its connections drain in the background."""
        if rt.tunnel is None:
            return None
        rt.close_listeners()
        return self._drain_later(rt, drain)

    def _reconcile(self) -> None:
        """Start local workloads that are not running yet (identity pending, errors)."""
        now = time.monotonic()
        with self._lock:
            if self._state not in ("starting", "running"):
                return
            loaded = self.loaded
            for w in loaded.config.local_workloads():
                if w.protocol is not Protocol.HBONE:
                    continue
                rt = self._runtimes.get(w.key)
                if rt is not None and (rt.running or now < rt.next_try):
                    continue
                try:
                    new = self._start_runtime(loaded, w)
                except (ZtunError, OSError) as e:
                    msg = str(e)
                    # a pending certificate is normal at start (readiness shows it); an
                    # identity source that cannot be made (SPIRE agent down) is retried
                    # like any other error
                    pending = isinstance(e, IdentityError) and (
                        w.spiffe_id(loaded.config.trust_domain) in self._identities
                    )
                    if rt is None or rt.error != msg:
                        lvl = logging.DEBUG if pending else logging.ERROR
                        log.log(lvl, "workload %s not started: %s", w.key, msg)
                    if rt is None:
                        rt = WorkloadRuntime(w, w.spiffe_id(loaded.config.trust_domain), w.key)
                        self._runtimes[w.key] = rt
                    rt.error = msg
                    rt.next_try = now + (RECONCILE_INTERVAL if pending else RETRY_BACKOFF)
                    continue
                self._runtimes[w.key] = new
            if self._state == "starting" and not self.readiness():
                self._state = "running"
                log.info(
                    "ready: %d local workload(s), %d policies",
                    len(self._runtimes),
                    len(self.policies or ()),
                )

    # -- reload (SIGHUP) -----------------------------------------------------------------------

    def reload(self) -> bool:
        """Apply the file again; all or nothing. Returns whether it was applied."""
        now = _iso(dt.datetime.now(dt.UTC))
        self.reload_status.last_attempt = now
        try:
            new = cfgmod.load(self.config_path)
            self._apply(new)
        except (ZtunError, OSError) as e:
            self.reload_status.last_ok = False
            self.reload_status.last_error = str(e)
            self.reload_status.failed += 1
            log.error("reload rejected, the running configuration stays: %s", e)
            return False
        _sync_captures(new.config)
        self.reload_status.generation += 1
        self.reload_status.loaded_at = now
        self.reload_status.last_ok = True
        self.reload_status.last_error = None
        self.reload_status.ok += 1
        log.info(
            "reloaded %s (generation %d): %d workloads, %d policies",
            self.config_path,
            self.reload_status.generation,
            len(new.config.workloads),
            len(new.policies or ()),
        )
        return True

    def _apply(self, new: LoadedConfig) -> None:
        old = self.loaded
        oc, nc = old.config, new.config
        fixed = {
            "node": (oc.node, nc.node),
            "trustDomain": (oc.trust_domain, nc.trust_domain),
            "identity": (oc.identity, nc.identity),
            "listeners": (oc.listeners, nc.listeners),
            "engine": (oc.engine, nc.engine),
            "stateDir": (oc.state_dir, nc.state_dir),
        }
        changed = [k for k, (a, b) in fixed.items() if a != b]
        if changed:
            raise ConfigError(f"changing {', '.join(changed)} needs a restart", file=new.file)
        with self._lock:
            if self._state not in ("starting", "running"):
                raise ZtunError(f"not reloading while {self._state}")
            self._apply_locked(old, new)

    def _apply_locked(self, old: LoadedConfig, new: LoadedConfig) -> None:
        nc = new.config
        want = {w.key: w for w in nc.local_workloads() if w.protocol is Protocol.HBONE}
        # 1. Acquire everything new; on any failure undo it and leave the old state.
        started: dict[str, WorkloadRuntime] = {}
        replaced: dict[str, WorkloadRuntime] = {}
        forward_ops: list[tuple[WorkloadRuntime, list[tuple[str, int]], list[ResolvedForward]]] = []
        undo: list[Callable[[], None]] = []
        # Addresses of new same-node routes first (harmless before they are routed).
        self._sync_acc_addresses(nc, drop=False)
        try:
            for key, w in want.items():
                rt = self._runtimes.get(key)
                same_engine = (
                    rt is not None and rt.running and _engine_fields(rt.spec) == _engine_fields(w)
                )
                if same_engine:
                    assert rt is not None
                    undo.append(functools.partial(setattr, rt, "spec", rt.spec))
                    forward_ops.append(self._plan_forwards(rt, nc, w))
                    continue
                if rt is not None and rt.running:
                    # Identity, addresses, labels or namespace changed: a new engine. The
                    # old one stops accepting now (so the new one can bind the same ports)
                    # and keeps its connections.
                    rt.close_listeners()
                    undo.append(functools.partial(self._reopen, rt))
                    replaced[key] = rt
                sid = w.spiffe_id(nc.trust_domain)
                if sid not in self._identities:
                    undo.append(functools.partial(self._drop_identity, sid))
                ident = self._ensure_identity(nc, w)
                with contextlib.suppress(IdentityError):
                    ident.manager.wait_ready(IDENTITY_WAIT)
                started[key] = self._start_runtime(new, w)
                undo.append(functools.partial(self._discard, started[key]))
            for rt, drop, add in forward_ops:
                self._change_forwards(rt, drop, add, undo)
        except BaseException:
            for fn in reversed(undo):
                with contextlib.suppress(Exception):
                    fn()
            raise
        # 2. Commit: directory, policies, new and replaced engines, removed workloads,
        # certificates.
        self.loaded = new
        self._index(nc)
        directory = _directory(nc, self._local_routes(nc))
        for key, rt in self._runtimes.items():
            if key in want and key not in started and rt.tunnel is not None:
                rt.tunnel.set_directory(directory)
        if self._policy_ok:
            for key, rt in self._runtimes.items():
                if key in want and key not in started and rt.tunnel is not None:
                    if self._acc is not None:
                        rt.tunnel.set_workloads(self._route_policy_workloads(nc, want[key]))
                    rt.tunnel.set_policy(_nonempty(new.policies))
        self._sync_acc_addresses(nc)
        for rt in replaced.values():
            self._draining_tunnels.append(self._drain_later(rt, nc.drain_timeout))
        for key, rt in list(self._runtimes.items()):
            if key not in want:
                del self._runtimes[key]
                th = self._stop_runtime(rt, nc.drain_timeout)
                if th is not None:
                    self._draining_tunnels.append(th)
                log.info("workload %s removed; its connections drain", key)
        self._runtimes.update(started)
        used = {w.spiffe_id(nc.trust_domain) for w in want.values()}
        for sid in list(self._identities):
            if sid not in used:
                self._identities.pop(sid).close()
        for ident in self._identities.values():
            ident.manager.renew_now()  # SIGHUP also re-reads / re-issues certificates

    def _drop_identity(self, sid: SpiffeId) -> None:
        ident = self._identities.pop(sid, None)
        if ident is not None:
            ident.close()

    def _plan_forwards(
        self, rt: WorkloadRuntime, cfg: Config, w: Workload
    ) -> tuple[WorkloadRuntime, list[tuple[str, int]], list[ResolvedForward]]:
        new = {(f.bind, f.port): f for f in self._resolve_forwards(cfg, w)}
        drop = [k for k, (f, _) in rt.forwards.items() if new.get(k) != f]
        add = [f for k, f in new.items() if k not in rt.forwards or rt.forwards[k][0] != f]
        rt.spec = w
        return rt, drop, add

    def _change_forwards(
        self,
        rt: WorkloadRuntime,
        drop: list[tuple[str, int]],
        add: list[ResolvedForward],
        undo: list[Callable[[], None]],
    ) -> None:
        for key in drop:
            f, _ = rt.forwards[key]
            rt.close_forward(key)
            undo.append(functools.partial(rt.open_forward, f))
        for f in add:
            rt.open_forward(f)
            undo.append(functools.partial(rt.close_forward, (f.bind, f.port)))

    def _reopen(self, rt: WorkloadRuntime) -> None:
        """Undo close_listeners() of a running workload (a failed reload)."""
        assert rt.tunnel is not None
        cfg = self.loaded.config
        serve_kw: dict[str, Any] = {"workloads": list(rt.spec.workload_ips), "deliver": False}
        if self._policy_ok:
            serve_kw["policy"] = True
        rt.in_netns(rt.open_inbound, _inbound_addresses(cfg, rt.spec), **serve_kw)
        li = cfg.listeners
        if li.socks5 is not None:
            rt.socks5 = rt.in_netns(rt.tunnel.socks5, (li.socks5_bind, li.socks5))
            rt.listeners[rt.socks5.id] = ListenerInfo("socks5")
        for f in self._resolve_forwards(cfg, rt.spec):
            rt.open_forward(f)
        _start_capture(rt, cfg)

    def _discard(self, rt: WorkloadRuntime) -> None:
        if rt.tunnel is not None:
            rt.close_listeners()
            rt.tunnel.close()

    def _drain_later(self, rt: WorkloadRuntime, drain: float) -> threading.Thread:
        t = rt.tunnel
        assert t is not None

        with self._lock:
            self._draining_rts[rt.name] = rt

        def finish() -> None:
            try:
                t.close(drain=drain)
            finally:
                with self._lock:
                    self._draining_rts.pop(rt.name, None)
                self.traffic.forget_engine(rt.name)

        th = threading.Thread(target=finish, name=f"ztund-drain-{rt.spec.name}", daemon=True)
        th.start()
        return th

    # -- events: metrics and the access log ---------------------------------------------------

    def _labels(
        self, rt: WorkloadRuntime, ev: ConnectionEvent
    ) -> tuple[TrafficLabels, dict[str, Any]]:
        """The metric labels and the access-log fields of one connection event."""
        # SOCKS5 routes per connection: mTLS when the directory sent it over HBONE
        mtls = ev.mode in (_MODE_TLS_OUT, _MODE_HBONE_IN, _MODE_HBONE_OUT) or (
            ev.mode == _MODE_SOCKS5 and bool(ev.peer_id)
        )
        inbound = ev.mode == _MODE_HBONE_IN
        same_node = False
        if inbound:
            target = ev.target
        else:
            info = rt.listeners.get(ev.listener_id)
            fwd = info.forward if info is not None else None
            target = ev.target if ev.target else (fwd.target if fwd else ev.dst)
            # A routed connection (SOCKS5, capture) to a same-node route: judged here and
            # carried app to app in the kernel, in plaintext: no mTLS to claim.
            same_node = (
                fwd is None
                and target is not None
                and ev.peer_id is not None
                and self._local_route_ips.get(target[0]) == ev.peer_id
            )
            if same_node:
                mtls = False
        # Labels depend on a handful of values; computing them parses SPIFFE IDs, so they
        # are cached (the cache is dropped on reload, when the directory changes).
        key = (
            rt.name, inbound, mtls, ev.src[0] if inbound and ev.src else None, ev.peer_id,
            target[0] if target else None,
        )  # fmt: skip
        labels = self._label_cache.get(key)
        if labels is None:
            labels = self._make_labels(
                rt, inbound=inbound, mtls=mtls, src_ip=key[3], peer=ev.peer_id, target_ip=key[5]
            )
            if len(self._label_cache) > LABEL_CACHE_MAX:
                self._label_cache.clear()
            self._label_cache[key] = labels
        if inbound:
            fields = {
                "src.addr": _addr(ev.src),
                "src.workload": labels.source_workload,
                "src.namespace": labels.source_workload_namespace,
                "src.identity": ev.peer_id,
                "dst.addr": _addr(ev.dst),
                "dst.hbone_addr": _addr(ev.target),
                "dst.workload": labels.destination_workload,
                "dst.namespace": labels.destination_workload_namespace,
                "dst.identity": labels.destination_principal,
                "direction": "inbound",
            }
        elif same_node:
            # Both identities come from this node's configuration (no certificate was
            # exchanged); the destination's ztund never sees this connection.
            fields = {
                "src.addr": _addr(ev.src),
                "src.workload": labels.source_workload,
                "src.namespace": labels.source_workload_namespace,
                "src.identity": labels.source_principal,
                "dst.addr": _addr(ev.dst),
                "dst.workload": labels.destination_workload,
                "dst.namespace": labels.destination_workload_namespace,
                "dst.identity": ev.peer_id,
                "direction": "outbound",
                "route": "same_node",
            }
        else:
            fields = {
                "src.addr": _addr(ev.src),
                "src.workload": labels.source_workload,
                "src.namespace": labels.source_workload_namespace,
                "src.identity": labels.source_principal if mtls else None,
                "dst.addr": _addr(ev.dst),
                "dst.hbone_addr": _addr(target) if mtls and ev.mode != _MODE_TLS_OUT else None,
                "dst.workload": labels.destination_workload,
                "dst.namespace": labels.destination_workload_namespace,
                "dst.identity": (ev.peer_id or labels.destination_principal) if mtls else None,
                "direction": "outbound",
            }
        return labels, fields

    def _make_labels(
        self,
        rt: WorkloadRuntime,
        *,
        inbound: bool,
        mtls: bool,
        src_ip: str | None,
        peer: str | None,
        target_ip: str | None,
    ) -> TrafficLabels:
        by_ip = self._by_ip
        ids = self._ids
        me = rt.spec
        security = MUTUAL_TLS if mtls else "unknown"
        if inbound:
            src_w = by_ip.get(src_ip) if src_ip else None
            if src_w is not None and peer and ids[src_w.key] != peer:
                src_w = None  # the address says one workload, the certificate another
            src_ns = src_w.namespace if src_w else _ns_of(peer)
            dst_w = (by_ip.get(target_ip) if target_ip else None) or me
            return TrafficLabels(
                reporter="destination",
                source_workload=src_w.name if src_w else "unknown",
                source_workload_namespace=src_ns or "unknown",
                source_principal=peer or "unknown",
                destination_workload=dst_w.name,
                destination_workload_namespace=dst_w.namespace,
                destination_principal=ids.get(dst_w.key, "unknown"),
                connection_security_policy=security,
            )
        out_w = by_ip.get(target_ip) if target_ip else None
        dst_id = ids[out_w.key] if out_w is not None and out_w.protocol is Protocol.HBONE else peer
        return TrafficLabels(
            reporter="source",
            source_workload=me.name,
            source_workload_namespace=me.namespace,
            source_principal=str(rt.spiffe_id),
            destination_workload=out_w.name if out_w else "unknown",
            destination_workload_namespace=out_w.namespace if out_w else "unknown",
            destination_principal=dst_id or "unknown",
            connection_security_policy=security,
        )

    def _on_event(self, rt: WorkloadRuntime, ev: ConnectionEvent) -> None:
        if ev.kind not in ("open", "close"):
            return
        labels, fields = self._labels(rt, ev)
        self.traffic.record(
            ConnectionRecord(
                key=(rt.name, ev.conn_id),
                kind=ev.kind,
                labels=labels,
                reason=ev.reason,
                http_status=ev.http_status,
                bytes_request=ev.bytes_sent,
                bytes_response=ev.bytes_received,
            )
        )
        if ev.kind != "close" or not self.loaded.config.access_log:
            return
        fields["bytes_sent"] = ev.bytes_sent
        fields["bytes_recv"] = ev.bytes_received
        fields["duration"] = f"{ev.duration_ns // 1_000_000}ms"
        policy = getattr(ev, "policy_name", None)
        decision = getattr(ev, "policy_reason", None)
        if decision:
            fields["decision"] = "allow" if decision.startswith("allowed") else "deny"
            fields["policy"] = policy or f"({decision.replace('_', ' ')})"
        elif ev.reason in ("policy_denied", "policy_changed") or ev.http_status == 401:
            fields["decision"] = "deny"
        flags = response_flags(ev.reason, ev.http_status)
        if flags != "-":
            fields["response_flags"] = flags
        if ev.http_status:
            fields["status"] = ev.http_status
        if ev.trace:
            fields["trace"] = ev.trace
        ok = ev.reason in OK_REASONS
        if not ok:
            fields["error"] = ev.reason + (f": {ev.detail}" if ev.detail else "")
        access_log.log(
            logging.INFO if ok else logging.WARNING,
            "connection complete",
            extra={"fields": fields},
        )

    # -- admin target ------------------------------------------------------------------------

    def readiness(self) -> list[str]:
        pending: list[str] = []
        with self._lock:
            if self._state == "draining":
                return ["draining: shutting down"]
            if self._state == "stopped":
                return ["stopped"]
            cfg = self.loaded.config
            for ident in self._identities.values():
                for st in ident.manager.status():
                    if st.serial is None:
                        pending.append(
                            f"identity {st.spiffe_id}: {st.last_error or st.state.value}"
                        )
            for w in cfg.local_workloads():
                if w.protocol is not Protocol.HBONE:
                    continue
                rt = self._runtimes.get(w.key)
                if rt is None or not rt.running:
                    why = rt.error if rt is not None and rt.error else "starting"
                    pending.append(f"workload {w.key}: listeners not open ({why})")
            if self.policies is not None and not self._policy_ok:
                pending.append(
                    "policies: this build cannot enforce them on HBONE inbound "
                    "(Tunnel(policies=...) and serve(policy=True) are missing)"
                )
        return pending

    def request_shutdown(self, reason: str) -> None:
        self._events.put(("term", reason))

    def request_reload(self, reason: str) -> None:
        self._events.put(("hup", reason))

    def config_dump(self) -> dict[str, Any]:
        with self._lock:
            cfg = self.loaded.config
            td = cfg.trust_domain
            workloads = []
            for w in cfg.workloads:
                d: dict[str, Any] = {
                    "uid": w.uid,
                    "name": w.name,
                    "namespace": w.namespace,
                    "serviceAccount": w.service_account,
                    "identity": str(w.spiffe_id(td)),
                    "workloadIps": list(w.workload_ips),
                    "protocol": w.protocol.value,
                    "node": w.node,
                    "labels": dict(w.labels),
                    "local": w.node == cfg.node,
                }
                if w.node == cfg.node:
                    d["netns"] = w.netns
                    rt = self._runtimes.get(w.key)
                    if rt is not None:
                        d.update(rt.describe())
                workloads.append(d)
            ps = self.loaded.policies
            policies = [
                {
                    "name": p.name,
                    "namespace": p.namespace,
                    "action": p.action.value,
                    "scope": ps.scope(p).value,
                    "dryRun": p.dry_run,
                    "selector": dict(p.selector) if p.selector is not None else None,
                    "rules": len(p.rules),
                    "source": p.source,
                }
                for p in (ps or ())
            ]
            certificates = []
            for sid, ident in self._identities.items():
                for st in ident.manager.status():
                    entry: dict[str, Any] = {
                        "identity": str(st.spiffe_id),
                        "state": st.state.value,
                        "serial": st.serial,
                        "notBefore": _iso(st.not_before),
                        "notAfter": _iso(st.not_after),
                        "renewAt": _iso(st.renew_at),
                        "failures": st.failures,
                        "lastError": st.last_error,
                    }
                    with contextlib.suppress(IdentityError):
                        svid = ident.manager.current(sid)
                        entry["chain"] = [_cert_info(c) for c in svid.chain]
                    with contextlib.suppress(IdentityError):
                        bundle = ident.manager.bundle()
                        entry["trustDomains"] = {
                            t: [_cert_info(c) for c in bundle.roots(t)]
                            for t in bundle.trust_domains
                        }
                    certificates.append(entry)
            rs = self.reload_status
            return {
                "version": __version__,
                "node": cfg.node,
                "trustDomain": td,
                "state": self._state,
                "configFile": self.config_path,
                "config": {
                    "generation": rs.generation,
                    "loadedAt": rs.loaded_at,
                    "lastReload": rs.last_attempt,
                    "lastReloadOk": rs.last_ok,
                    "lastReloadError": rs.last_error,
                },
                "identitySource": cfg.identity.source,
                "accelerator": {
                    "mode": cfg.engine.accelerate,
                    "state": self._acc_note,
                    "sameNodeRoutes": sorted(w.key for w in self._local_routes(cfg)),
                    "localAddresses": sorted(self._acc_addrs),
                },
                "policyEnforcement": self._policy_ok,
                "policyFiles": list(self.loaded.policy_paths),
                "workloads": workloads,
                "policies": policies,
                "policyWarnings": list(self.loaded.warnings),
                "certificates": certificates,
                "pending": self.readiness(),
            }

    def _engine_samples(self) -> list[EngineSample]:
        with self._lock:
            rts = [rt for rt in self._runtimes.values() if rt.tunnel is not None]
        out = []
        for rt in rts:
            t = rt.tunnel
            if t is None:
                continue
            with contextlib.suppress(ZtunError):
                out.append(EngineSample(rt.key, t.stats()))
        return out

    def _live_bytes(self) -> dict[tuple[str, int], tuple[int, int]]:
        """Every engine's live connections: (engine name, conn id) -> (client -> server,
        server -> client) bytes so far, for the istio_tcp_*_bytes_total of open ones."""
        with self._lock:
            rts = [*self._runtimes.values(), *self._draining_rts.values()]
        out: dict[tuple[str, int], tuple[int, int]] = {}
        for rt in rts:
            t = rt.tunnel
            if t is None:
                continue
            with contextlib.suppress(ZtunError):  # closed meanwhile: its closes are folded
                for conn in _live_connections(t):
                    out[(rt.name, conn[0])] = (conn[4], conn[5])
        return out

    def _extra_metrics(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "ztun_certificate_expiration_timestamp_seconds",
            "When the certificate in use for an identity expires (Unix time)",
            labels=["identity"],
        )
        with self._lock:
            idents = list(self._identities.values())
        for ident in idents:
            for st in ident.manager.status():
                if st.not_after is not None:
                    expiry.add_metric([str(st.spiffe_id)], st.not_after.timestamp())
        yield expiry
        reloads = CounterMetricFamily(
            "ztun_config_reloads", "Configuration reloads (SIGHUP)", labels=["result"]
        )
        reloads.add_metric(["ok"], self.reload_status.ok)
        reloads.add_metric(["rejected"], self.reload_status.failed)
        yield reloads
        ready = GaugeMetricFamily("ztun_ready", "1 when /healthz/ready answers 200")
        ready.add_metric([], 0 if self.readiness() else 1)
        yield ready
        yield from self._accelerator_metrics()

    def _accelerator_metrics(self) -> Iterator[Metric]:
        acc = self._acc
        on = GaugeMetricFamily(
            "ztun_bpf_accelerator_active",
            "1 when the eBPF sockmap accelerator is attached (engine.accelerate)",
        )
        on.add_metric([], 0 if acc is None or acc.closed else 1)
        yield on
        if acc is None or acc.closed:
            return
        with contextlib.suppress(ZtunError):
            stats = acc.stats()
            fam = CounterMetricFamily(
                "ztun_bpf_events", "The sockmap programs' counters", labels=["event"]
            )
            for name, value in sorted(stats.items()):
                fam.add_metric([name], value)
            yield fam
        pairs = CounterMetricFamily(
            "ztun_bpf_pairs", "Same-node pairs an engine made (sockmap)", labels=["workload"]
        )
        direct = CounterMetricFamily(
            "ztun_bpf_direct_bytes",
            "Bytes of paired connections carried app to app by the kernel",
            labels=["workload"],
        )
        with self._lock:
            rts = [rt for rt in self._runtimes.values() if rt.tunnel is not None]
        for rt in rts:
            t = rt.tunnel
            if t is None:
                continue
            with contextlib.suppress(ZtunError):
                st = t.stats()
                pairs.add_metric([rt.key], st.bpf_pairs)
                direct.add_metric([rt.key], st.bpf_direct_bytes)
        yield pairs
        yield direct

    # -- running -------------------------------------------------------------------------------

    def start(self) -> None:
        """Admin server first (so readiness is observable), then identities and workloads."""
        cfg = self.config
        self._admin = AdminServer(cfg.listeners.admin, self).start()
        log.info("admin on http://%s", _addr(self._admin.address))
        if cfg.listeners.metrics is not None:
            self._metrics_server = AdminServer(
                cfg.listeners.metrics, self, metrics_only=True
            ).start()
            log.info("metrics on http://%s/metrics", _addr(self._metrics_server.address))
        if self.policies is not None and not self._policy_ok:
            log.error("policies are configured but this build cannot enforce them: not ready")
        for warning in self.loaded.warnings:
            log.warning("policy: %s", warning)
        with self._lock:
            for w in cfg.local_workloads():
                if w.protocol is Protocol.HBONE:
                    try:
                        self._ensure_identity(cfg, w)
                    except (ZtunError, OSError) as e:  # retried by _reconcile
                        log.error("identity for %s: %s", w.key, e)
        _prepare_capture(cfg)
        with self._lock:
            self._open_accelerator(cfg)
            self._index(cfg)  # same-node routes are known now
        self._reconcile()
        _sync_captures(cfg)

    def run(self, *, install_signals: bool = True) -> int:
        if install_signals:
            self._install_signals()
        self.start()
        while True:
            try:
                kind, why = self._events.get(timeout=RECONCILE_INTERVAL)
            except queue.Empty:
                self._reconcile()
                continue
            if kind == "hup":
                log.info("reload requested (%s)", why)
                self.reload()
                self._reconcile()
            elif kind == "term":
                log.info(
                    "shutdown requested (%s): draining for up to %gs",
                    why,
                    self.config.drain_timeout,
                )
                self.drain()
                return 0

    def _install_signals(self) -> None:
        def on_term(signum: int, _frame: object) -> None:
            self.request_shutdown(signal.Signals(signum).name)

        def on_hup(signum: int, _frame: object) -> None:
            self.request_reload("SIGHUP")

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)

    def drain(self) -> None:
        """Stop accepting everywhere, GOAWAY, let connections finish until the deadline."""
        deadline = self.config.drain_timeout
        with self._lock:
            self._state = "draining"
            rts = list(self._runtimes.values())
        t0 = time.monotonic()
        threads = [th for th in (self._stop_runtime(rt, deadline) for rt in rts) if th]
        threads += self._draining_tunnels
        for th in threads:
            th.join(max(0.0, deadline + 10 - (time.monotonic() - t0)))
        with self._lock:
            self._state = "stopped"
            self._close_accelerator(not any(th.is_alive() for th in threads))
            for ident in self._identities.values():
                ident.close()
            self._identities.clear()
            if self._shared_source is not None:
                with contextlib.suppress(Exception):
                    self._shared_source.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._admin is not None:
            self._admin.close()
        log.info("drained in %.1fs; bye", time.monotonic() - t0)


def _inbound_addresses(cfg: Config, w: Workload) -> list[tuple[str, int]]:
    """Where a workload's HBONE listeners bind: ``inboundBind``, and when that is a
    wildcard and the workload has addresses of the other IP family, that family's
    wildcard too (dual stack: the engine binds IPv6 sockets IPV6_V6ONLY, one family
    per socket)."""
    li = cfg.listeners
    out = [(li.inbound_bind, li.inbound)]
    wildcard = {4: "0.0.0.0", 6: "::"}
    family = ipaddress.ip_address(li.inbound_bind).version
    if li.inbound_bind == wildcard[family]:
        other = 6 if family == 4 else 4
        if any(ipaddress.ip_address(ip).version == other for ip in w.workload_ips):
            out.append((wildcard[other], li.inbound))
    return out


def _live_connections(t: Tunnel) -> list[tuple[Any, ...]]:
    """``(conn_id, listener_id, mode, relaying, bytes_down_up, bytes_up_down, start_ns)``
    of the tunnel's live connections."""
    return list(t.connections())


def _directory(cfg: Config, local: Sequence[Workload] = ()) -> list[Destination]:
    """Every workload's addresses for the engines' routed outbound (SOCKS5, capture):
    HBONE workloads with their identity and HBONE port, the others as passthrough;
    ``local``: same-node routes (the sockmap shortcut, docs/daemon.md)."""
    same = {w.key for w in local}
    out = []
    for w in cfg.workloads:
        hbone = w.protocol is Protocol.HBONE
        sid = str(w.spiffe_id(cfg.trust_domain)) if hbone else None
        for ip in w.workload_ips:
            via = (ip, cfg.listeners.inbound) if hbone else None
            out.append(Destination(ip, sid, via, local=w.key in same))
    return out


def _nonempty(policies: PolicySet | None) -> PolicySet | None:
    """None for no policies: the engine then skips evaluation entirely."""
    return policies if policies is not None and len(policies) else None


def _engine_fields(w: Workload) -> tuple[Any, ...]:
    """What a workload's engine is built from; a change needs a new engine."""
    return (
        w.netns,
        w.namespace,
        w.service_account,
        tuple(w.workload_ips),
        tuple(sorted(w.labels.items())),
        w.protocol,
        w.capture,
        w.cgroup,
    )


# ---------------------------------------------------------------------------------------
# Transparent capture (docs/capture.md): programs pinned under ztun's pin root, so that a
# captured workload gets no plaintext path while ztund is stopped or restarting (its
# connects are refused) and a restarted ztund takes them over without a gap. A workload
# removed from the config, or no longer captured, is released for good.


def _prepare_capture(cfg: Config) -> None:
    """Put ztund in a cgroup of its own when it runs in the cgroup2 root: the program that
    answers SO_ORIGINAL_DST hooks ztund's cgroup, and the root would be every process."""
    if not any(w.capture for w in cfg.local_workloads()):
        return
    from ztun import bpf

    with contextlib.suppress(ZtunError, OSError):
        root = bpf.cgroup2_root()
        if bpf.own_cgroup() == root:
            own = root / "ztund"
            own.mkdir(exist_ok=True)
            (own / "cgroup.procs").write_text(str(os.getpid()))
            log.info("moved ztund into cgroup %s (capture hooks ztund's own cgroup)", own)


def _start_capture(rt: WorkloadRuntime, cfg: Config) -> None:
    w = rt.spec
    if not w.capture or rt.tunnel is None or w.netns is None or w.cgroup is None:
        return
    from ztun import capture
    from ztun.capture import Capture

    li = cfg.listeners
    rt.capture = Capture(
        rt.tunnel,
        cgroup=w.cgroup,
        netns=w.netns,
        name=w.key,
        addresses=list(w.workload_ips),
        pin_dir=_capture_pin_dir(cfg),
        outbound_port=li.outbound or capture.OUTBOUND_PORT,
        inbound_port=li.inbound_plaintext or capture.INBOUND_PORT,
        hbone_port=li.inbound,
    )


def _release_capture(rt: WorkloadRuntime) -> None:
    """ztund lets go of a workload's capture; the pinned programs stay (fail closed)."""
    if rt.capture is not None:
        with contextlib.suppress(ZtunError, OSError):
            rt.capture.release()
        rt.capture = None


def _capture_pin_dir(cfg: Config) -> str:
    """Per node (bpffs names may not hold dots): two ztunds on one host keep apart."""
    from ztun import capture

    return f"{capture.DEFAULT_PIN_DIR}/{re.sub(r'[^A-Za-z0-9_-]', '_', cfg.node)}"


def _sync_captures(cfg: Config) -> None:
    """Release for good the pinned captures of workloads no longer captured here."""
    want = {w.key for w in cfg.local_workloads() if w.capture}
    try:
        from ztun import capture

        pin_dir = _capture_pin_dir(cfg)
        pinned = capture.captured(pin_dir) if Path(pin_dir).exists() else []
        stale = [n for n in pinned if n not in want]
        if stale:
            capture.uncapture(stale, pin_dir=pin_dir)
            log.info("capture released (direct connections again): %s", ", ".join(stale))
    except (ZtunError, OSError) as e:
        log.error("capture: cannot release stale captures: %s", e)


def _ns_of(spiffe_id: str | None) -> str | None:
    if not spiffe_id:
        return None
    with contextlib.suppress(ValueError):
        return SpiffeId.parse(spiffe_id).namespace
    return None


def _cert_info(cert: Any) -> dict[str, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    uris: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    return {
        "serial": format(cert.serial_number, "x"),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "uris": uris,
        "notBefore": _iso(cert.not_valid_before_utc),
        "notAfter": _iso(cert.not_valid_after_utc),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


# ---------------------------------------------------------------------------------------
# CLI


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """ztund: the ztun node daemon (SPIFFE mTLS + HBONE + L4 policy for local workloads)."""


@cli.command()
@click.option(
    "--config",
    "-c",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="the YAML configuration file",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="ZTUND_LOG_FORMAT",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    envvar="ZTUND_LOG_LEVEL",
)
def run(config_path: str, log_format: str, log_level: str) -> None:
    """Serve the node's workloads until SIGTERM (SIGHUP reloads)."""
    setup_logging(log_format, log_level)
    try:
        daemon = Daemon(config_path)
    except ConfigErrors as e:
        for err in e:
            log.error("%s", err)
        raise SystemExit(2) from None
    except (ZtunError, OSError) as e:
        log.error("cannot start: %s", e)
        raise SystemExit(1) from None
    log.info("ztund %s starting: node %s, config %s", __version__, daemon.config.node, config_path)
    try:
        code = daemon.run()
    except (ZtunError, OSError) as e:
        log.error("fatal: %s", e)
        with contextlib.suppress(Exception):
            daemon.drain()
        raise SystemExit(1) from None
    raise SystemExit(code)


@cli.command("check-config")
@click.argument("config_path", metavar="FILE", type=click.Path(dir_okay=False))
@click.option(
    "--offline",
    is_flag=True,
    help="skip checks against this machine (network namespaces, certificate files)",
)
def check_config(config_path: str, offline: bool) -> None:
    """Validate FILE and its policies; print every error as file:line: field: message."""
    try:
        loaded = cfgmod.load(config_path, runtime=not offline)
    except ConfigErrors as e:
        for err in e:
            click.echo(str(err), err=True)
        click.echo(f"{len(e.errors)} error(s)", err=True)
        raise SystemExit(1) from None
    except ConfigError as e:
        click.echo(str(e), err=True)
        raise SystemExit(1) from None
    cfg = loaded.config
    for w in loaded.warnings:
        click.echo(f"warning: {w}", err=True)
    n_pol = len(loaded.policies) if loaded.policies is not None else 0
    click.echo(
        f"{config_path}: ok (node {cfg.node}, {len(cfg.workloads)} workloads, "
        f"{len(cfg.local_workloads())} local, {n_pol} policies)"
    )


@cli.command()
def version() -> None:
    """Print the versions of ztun and its C core."""
    from ztun._core import _engine

    click.echo(
        f"ztund {__version__} (core {_engine.core_version()}, Python {sys.version.split()[0]})"
    )


@cli.group()
def bpf() -> None:
    """eBPF maintenance."""


@bpf.command("cleanup")
@click.option(
    "--cgroup-root",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Only detach programs on cgroups under this path (default: the whole host).",
)
@click.option(
    "--pin-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Pin directory to remove (default: ztun's, /sys/fs/bpf/ztun; none with --cgroup-root).",
)
def bpf_cleanup(cgroup_root: str | None, pin_root: str | None) -> None:
    """Detach and unpin every ztun eBPF program and map (restores direct connectivity).

    Without --cgroup-root it detaches the programs of every ztun on the host, running
    ones included."""
    try:
        import importlib

        zbpf = importlib.import_module("ztun.bpf")
    except ImportError as e:
        click.echo(f"eBPF support is not available in this build: {e}", err=True)
        raise SystemExit(1) from None
    fn = getattr(zbpf, "cleanup", None)
    if fn is None:
        click.echo("this build's ztun.bpf has no cleanup()", err=True)
        raise SystemExit(1)
    try:
        kw: dict[str, Any] = {"cgroup_root": cgroup_root}
        if pin_root is not None or cgroup_root is not None:
            kw["pin_root"] = pin_root  # scoped: pins only when named
        result = fn(**kw)
    except ZtunError as e:
        click.echo(f"cleanup failed: {e}", err=True)
        raise SystemExit(1) from None
    for line in result or []:
        click.echo(line)
    click.echo(f"cleaned up: {len(result or [])} object(s) removed")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``ztund`` console script and ``python -m ztun``."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="ztund")
