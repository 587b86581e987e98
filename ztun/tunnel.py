"""``Tunnel``: the engine behind a small, safe Python API.

A Tunnel owns one C engine (worker threads that move bytes without the GIL). Python
only sets things up — listeners, identities, policy — and receives events in
batches; it never runs per byte or per accepted connection.

    with Tunnel() as t:
        fwd = t.forward(listen=("127.0.0.1", 0), to=("127.0.0.1", 8080))
        ...  # connect to fwd.address

With an identity (a SPIFFE SVID) and a trust bundle, ``forward(..., expect=[ids])``
carries the connections over mutual TLS 1.3 and ``listen(...)`` terminates mutual
TLS in front of a local service.

With ``policies`` (Istio ``AuthorizationPolicy``, see :mod:`ztun.policy`), every
connection a ``listen()`` port accepts is authorized in C before a byte reaches the
target; ``set_policy()`` swaps the table while traffic flows and closes the live
connections the new one denies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import select
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from ztun._core import _engine
from ztun.errors import BpfError, EngineError, IdentityError, ZtunError
from ztun.errors import invalid_argument as _bad
from ztun.events import (
    ConnectionEvent,
    EngineLog,
    access_log_line,
    access_logger,
    engine_logger,
    parse_event,
)
from ztun.identity import IdentitySource, SpiffeId, Svid, TrustBundle
from ztun.mesh import HBONE_PORT, HboneServer, MeshMixin
from ztun.policy import ConnectionFacts, Decision, PolicySet, Reason, Workload

if TYPE_CHECKING:
    from types import TracebackType

    from ztun.bpf import SockmapAccelerator
    from ztun.rotation import IdentityManager

__all__ = [
    "Forward",
    "Listener",
    "LiveConnection",
    "PolicyCounters",
    "PolicyInput",
    "Tunnel",
    "TunnelStats",
]

log = logging.getLogger(__name__)

Address = tuple[str, int]
EventCallback = Callable[[ConnectionEvent], None]
#: A PolicySet; YAML text (str or bytes); a YAML file or folder (a path object); or a list
#: of those paths.
PolicyInput: TypeAlias = (
    "PolicySet | str | bytes | os.PathLike[str] | Sequence[str | os.PathLike[str]]"
)
# Policy names of this many past table generations stay resolvable for late events.
_POLICY_GENERATIONS_KEPT = 64


@dataclass(frozen=True, slots=True)
class PolicyCounters:
    """Connections one policy decided (carried across policy swaps by name)."""

    allowed: int = 0  # ALLOW policy: connections it allowed (defaults: default allows)
    denied: int = 0  # DENY policy: connections it denied (defaults: default denies)
    dry_run: int = 0  # dry-run policy: connections it matched


@dataclass(frozen=True, slots=True)
class TunnelStats:
    """Counters summed over the engine's workers at the time of the call."""

    bytes_sent: int  # read from clients (downstream), written upstream
    bytes_received: int  # read from upstream, written to clients
    connections_opened: int
    connections_closed: int
    connections_active: int
    connections_failed: int
    close_reasons: dict[str, int] = field(default_factory=dict)
    handshakes: int = 0
    handshakes_resumed: int = 0
    policy_allowed: int = 0
    policy_denied: int = 0
    policy_dry_run: int = 0
    events_dropped: int = 0
    buffers_in_use: int = 0
    buffer_bytes: int = 0
    # per policy ("namespace/name") of the table in force, and the defaults (no policy
    # decided: allowed because no ALLOW policy applies / denied because none matched)
    policies: dict[str, PolicyCounters] = field(default_factory=dict)
    policy_defaults: PolicyCounters = field(default_factory=PolicyCounters)
    policy_generation: int = 0  # 0: no policy table
    # refused TLS handshakes by reason ("expired", "unknown_ca", "unexpected_spiffe_id", ...)
    tls_failures: dict[str, int] = field(default_factory=dict)
    # HBONE: CONNECT responses by status (200, 400, 401, 503, "other"), HTTP/2 connections
    hbone_status: dict[int | str, int] = field(default_factory=dict)
    hbone_connections_opened: int = 0
    hbone_connections_active: int = 0
    hbone_protocol_errors: int = 0
    # the eBPF shortcut: connections paired app to app, and the bytes the kernel moved
    bpf_pairs: int = 0
    bpf_direct_bytes: int = 0

    @property
    def failures(self) -> dict[str, int]:
        """Close reasons that are failures, with their counts (zero counts left out)."""
        benign = {"ok", "reset_by_downstream", "reset_by_upstream"}
        return {k: v for k, v in self.close_reasons.items() if v and k not in benign}


class LiveConnection(NamedTuple):
    """A connection in the engine now (``Tunnel.connections()``)."""

    conn_id: int
    listener_id: int
    mode: int
    relaying: bool  # False while it is still being set up (handshake, connect)
    bytes_sent: int  # downstream -> upstream so far
    bytes_received: int  # upstream -> downstream so far
    start_ns: int  # CLOCK_REALTIME


def _check_address(value: object, name: str, *, allow_port_zero: bool) -> Address:
    if not isinstance(value, tuple) or len(value) != 2:
        raise _bad(name, f"expected a (host, port) tuple, got {value!r}")
    host, port = value
    if not isinstance(host, str):
        raise _bad(name, f"host must be a string IP address, got {host!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _bad(name, f"host must be an IP address literal, got {host!r}") from None
    if isinstance(port, bool) or not isinstance(port, int):
        raise _bad(name, f"port must be an integer, got {port!r}")
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise _bad(name, f"port must be in {low}..65535, got {port}")
    return (host, port)


def _same_endpoint(bound: Address, to: Address) -> bool:
    """Would connecting to ``to`` land on the listener bound at ``bound``?"""
    if bound[1] != to[1]:
        return False
    if bound[0] == to[0]:
        return True
    wild = ipaddress.ip_address(bound[0]).is_unspecified
    return wild and (ipaddress.ip_address(to[0]).is_loopback or to[0] == bound[0])


# The engine counts milliseconds in 32 bits: about 49 days.
_MAX_SECONDS = (2**32 - 1) / 1000


def _seconds(value: float | None, name: str, *, none_means_never: bool) -> int:
    """Seconds -> milliseconds for the engine (0: never)."""
    if value is None:
        if none_means_never:
            return 0
        raise _bad(name, "expected a positive number of seconds, got None")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"expected a positive number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0 or value > _MAX_SECONDS:
        raise _bad(name, f"expected a positive number of seconds up to 49 days, got {value!r}")
    return max(1, round(value * 1000))


class _Endpoint:
    """Common part of Forward and Listener handles."""

    def __init__(self, tunnel: Tunnel, listener_id: int, address: Address) -> None:
        self._tunnel = tunnel
        self.id = listener_id
        self.address: Address = address
        self._closed = False

    def close(self) -> None:
        """Stop accepting; connections already relayed keep going."""
        if self._closed:
            return
        self._closed = True
        self._tunnel._remove_listener(self)

    def __enter__(self) -> _Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address[0]}:{self.address[1]} id={self.id}>"


class Forward(_Endpoint):
    """A local port whose connections are carried to ``to`` (plaintext or mTLS)."""

    def __init__(
        self,
        tunnel: Tunnel,
        listener_id: int,
        address: Address,
        to: Address,
        expect: tuple[str, ...],
    ) -> None:
        super().__init__(tunnel, listener_id, address)
        self.to = to
        self.expect = expect
        self.policy = False  # plaintext forwards only: policy authorizes each connection
        self.workload: Workload | None = None

    @property
    def secure(self) -> bool:
        return bool(self.expect)


class Listener(_Endpoint):
    """An mTLS port whose authenticated connections are forwarded to a local target."""

    def __init__(
        self,
        tunnel: Tunnel,
        listener_id: int,
        address: Address,
        to: Address,
        workload: Workload | None = None,
    ) -> None:
        super().__init__(tunnel, listener_id, address)
        self.to = to
        self.workload = workload  # None: the tunnel's workload


class Tunnel(MeshMixin):
    """An embeddable zero-trust tunnel.

    Parameters (all keyword-only):
        identity: this tunnel's identity, for mutual TLS. Either an :class:`~ztun.Svid`
            (certificate chain and key, used as is) with ``trust``, or an
            :class:`~ztun.IdentitySource` (the embedded CA, files, the SPIFFE Workload
            API) with ``spiffe_id``: the tunnel then renews the certificate at half its
            lifetime and new handshakes use the new one. Without an identity only
            plaintext forwards are possible.
        trust: the trust bundle peers are verified against (with an ``Svid``; a source
            brings its own).
        spiffe_id: which identity to fetch from an ``IdentitySource``.
        workers: engine threads; 0 means one per CPU.
        connect_timeout / handshake_timeout / idle_timeout: seconds (idle: None = never).
        resumption: let TLS 1.3 clients resume sessions (saves the certificate work of
            a full handshake; see docs/performance.md for the figures).
        chacha20: also offer TLS_CHACHA20_POLY1305_SHA256.
        access_log: log one line per finished connection on the ``ztun.access`` logger.
        accelerate: the eBPF sockmap shortcut (docs/sockmap.md §7). True: on, attached
            to this process's cgroup (one accelerator per process and cgroup, shared by
            its Tunnels); None: on when available; or a
            :class:`~ztun.bpf.SockmapAccelerator` of the caller's, on a cgroup that holds
            the apps and this process (captured workloads: docs/capture.md), which must
            stay open until this Tunnel is closed.
        policies: authorization policy for the connections ``listen()`` ports (and
            ``forward(..., policy=True)`` ports) accept: a :class:`~ztun.policy.PolicySet`,
            Istio AuthorizationPolicy YAML text, or YAML files/folders as path objects.
            None: every authenticated connection is allowed. See :meth:`set_policy`.
        workload: the workload this process is, for policy: selectors match its labels
            and namespace policies its namespace. Without it a connection is judged by
            the mesh-wide (root namespace) policies only.
        workloads: the workloads an HBONE server of this tunnel (``serve()``) answers
            for, as a node proxy does: a CONNECT to one of their IPs is judged as that
            workload. See :meth:`set_workloads`.
    """

    def __init__(
        self,
        *,
        identity: Svid | IdentitySource | None = None,
        trust: TrustBundle | None = None,
        spiffe_id: str | SpiffeId | None = None,
        workers: int = 0,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        idle_timeout: float | None = None,
        resumption: bool = True,
        chacha20: bool = False,
        access_log: bool = True,
        accelerate: bool | SockmapAccelerator | None = False,
        policies: PolicyInput | None = None,
        workload: Workload | None = None,
        workloads: Sequence[Workload] = (),
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= 256:
            raise _bad("workers", f"expected 0 (one per CPU) to 256, got {workers!r}")
        self._source: IdentitySource | None = None
        self._spiffe_id: SpiffeId | None = None
        self._manager: IdentityManager | None = None
        if isinstance(identity, Svid):
            if trust is None:
                raise _bad("trust", "an Svid identity needs a TrustBundle to verify peers")
            if spiffe_id is not None and SpiffeId.parse(spiffe_id) != identity.spiffe_id:
                raise _bad("spiffe_id", f"{spiffe_id} is not the Svid's {identity.spiffe_id}")
        elif identity is not None:
            if not all(hasattr(identity, m) for m in ("fetch", "bundle", "poll")):
                kind = type(identity).__name__
                raise _bad("identity", f"expected an Svid or an IdentitySource, got {kind}")
            if spiffe_id is None:
                raise _bad("spiffe_id", "required to fetch an identity from a source")
            self._source = identity
            self._spiffe_id = SpiffeId.parse(spiffe_id)
            identity = None
        elif trust is not None:
            raise _bad("identity", "a trust bundle was given without an identity")
        self._connect_ms = _seconds(connect_timeout, "connect_timeout", none_means_never=False)
        self._handshake_ms = _seconds(
            handshake_timeout, "handshake_timeout", none_means_never=False
        )
        self._idle_ms = _seconds(idle_timeout, "idle_timeout", none_means_never=True)
        self._workers = workers
        self._identity = identity
        self._trust = trust
        self._tls_flags = (_engine.TLS_RESUMPTION if resumption else 0) | (
            _engine.TLS_CHACHA20 if chacha20 else 0
        )
        self._access_log = access_log
        if accelerate not in (None, True, False):
            from ztun import bpf

            if not isinstance(accelerate, bpf.SockmapAccelerator):
                raise _bad(
                    "accelerate",
                    f"expected True, False, None (auto) or a SockmapAccelerator: {accelerate!r}",
                )
        self._accelerate = accelerate
        self._accelerator: Any = None
        if workload is not None and not isinstance(workload, Workload):
            raise _bad("workload", f"expected a ztun.policy.Workload, got {workload!r}")
        self._workload = workload
        self._served = _check_workloads(workloads)
        self._listener_workloads: dict[int, Workload] = {}
        self._policy_set: PolicySet | None = None
        self._policy_blob: bytes | None = None
        self._policy_gen = 0
        self._policy_names: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        if policies is not None:
            self._policy_set = _as_policy_set(policies)
            self._policy_blob = self._compile(self._policy_set, self._all_workloads())
        self._engine: _engine.Engine | None = None
        self._tls: _engine.TlsContext | None = None
        self._endpoints: dict[int, _Endpoint] = {}
        self._subscribers: list[EventCallback] = []
        self._lock = threading.RLock()
        self._pump: threading.Thread | None = None
        self._pump_stop: int | None = None  # write end of a pipe that wakes the pump
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._mesh_init()

    # ---- lifecycle -------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._engine is not None

    def start(self) -> Tunnel:
        """Start the engine's workers (and the event thread). Idempotent.

        With an identity source, waits until the first certificate is there.
        """
        with self._lock:
            if self._closed:
                raise ZtunError("this Tunnel is closed; create a new one")
            if self._engine is not None:
                return self
            need_manager = self._source is not None and self._manager is None
        # Outside the lock: the rotation thread delivers the first certificate
        # through set_identity(), which takes it.
        if need_manager:
            self._start_manager()
        with self._lock:
            if self._engine is not None:
                return self
            if self._tls is None and self._identity is not None:
                self._tls = self._make_tls(self._identity, self._trust)
            engine = _engine.Engine(
                workers=self._workers,
                connect_timeout_ms=self._connect_ms,
                handshake_timeout_ms=self._handshake_ms,
                idle_timeout_ms=self._idle_ms,
            )
            if self._policy_blob is not None:
                self._install(engine, self._policy_set, self._policy_blob)
            self._attach_accelerator(engine)
            engine.start()
            self._engine = engine
            self._update_event_mask()
            log.debug("tunnel started with %d workers", engine.workers)
        return self

    def _attach_accelerator(self, engine: _engine.Engine) -> None:
        """The eBPF sockmap shortcut (docs/sockmap.md): app<->ztun hops socket to socket,
        and same-node pairs app to app in the kernel. Opt-in: sockets in a sockmap can
        see a spurious EAGAIN on a blocking recv (a kernel quirk), which blocking
        full-duplex apps may not expect."""
        if self._accelerate is False:
            return
        from ztun import bpf

        if isinstance(self._accelerate, bpf.SockmapAccelerator):
            # The caller's (e.g. on the parent cgroup of captured workloads): not ours to close.
            handle, api = self._accelerate.engine_handle()
            engine.set_bpf(handle, api)
            self._accelerator = self._accelerate
            log.info("eBPF acceleration on (the caller's, cgroup %s)", self._accelerate.cgroup)
            return
        ok, why = bpf.available()
        if not ok:
            if self._accelerate:
                raise BpfError(f"accelerate: eBPF acceleration is not available: {why}")
            bpf.log_unavailable_once(log)
            return
        # One accelerator per process and cgroup, shared by its accelerated Tunnels: two
        # accelerators on one cgroup would each claim the sockets of the other's mark
        # (and across processes, SockmapAccelerator gives each its own mark).
        acc = bpf.shared_accelerator()
        try:
            handle, api = acc.engine_handle()
            engine.set_bpf(handle, api)
        except BaseException:
            bpf.release_shared(acc)
            raise
        self._accelerator = acc
        log.info("eBPF acceleration on (cgroup %s)", acc.cgroup)

    @property
    def accelerated(self) -> bool:
        """Whether the eBPF sockmap shortcut is active."""
        return self._accelerator is not None

    def close(self, drain: float = 0.0) -> None:
        """Stop accepting, let connections finish for up to ``drain`` seconds, stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            engine = self._engine
        if engine is None:
            return
        if self._manager is not None:
            self._manager.stop()
        engine.stop(round(drain * 1000) if drain > 0 else 0)
        self._stop_pump()
        self._drain_events()
        self._mesh_close()
        engine.close()
        if self._accelerator is not None:
            # Only now: the engine's workers no longer call into it.
            from ztun import bpf

            if self._accelerator is not self._accelerate:
                bpf.release_shared(self._accelerator)
            self._accelerator = None
        with self._lock:
            self._engine = None
            self._endpoints.clear()

    def __enter__(self) -> Tunnel:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Tunnel:
        self._loop = asyncio.get_running_loop()
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Stopping joins the workers: keep the event loop responsive meanwhile.
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __del__(self) -> None:
        if getattr(self, "_engine", None) is not None and not self._closed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._engine else "new")
        return f"<Tunnel {state} listeners={len(self._endpoints)}>"

    def _require_engine(self) -> _engine.Engine:
        if self._closed:
            raise ZtunError("this Tunnel is closed")
        if self._engine is None:
            self.start()
        assert self._engine is not None
        return self._engine

    # ---- TLS -------------------------------------------------------------

    def _make_tls(self, identity: Svid, trust: TrustBundle | None) -> _engine.TlsContext:
        assert trust is not None
        roots = {td: trust.pem(td) for td in trust.trust_domains}
        try:
            return _engine.TlsContext(
                identity.chain_pem(), identity.key_pem(), roots, flags=self._tls_flags
            )
        except EngineError as e:
            raise IdentityError(f"identity {identity.spiffe_id}: {e}") from None

    def _start_manager(self) -> None:
        from ztun.rotation import IdentityManager

        assert self._source is not None and self._spiffe_id is not None
        self._manager = IdentityManager(
            self._source, [self._spiffe_id], on_update=self._on_identity_update
        )
        self._manager.start()
        try:
            self._manager.wait_ready()
        except BaseException:
            self._manager.stop()
            raise

    def _on_identity_update(self, spiffe_id: SpiffeId, svid: Svid, bundle: TrustBundle) -> None:
        # Runs on the rotation thread; raising makes the manager retry with backoff.
        self.set_identity(svid, bundle)

    @property
    def identity(self) -> str | None:
        """This tunnel's own SPIFFE ID, when it has an identity."""
        if self._tls is not None:
            return self._tls.identity
        return str(self._spiffe_id) if self._spiffe_id is not None else None

    @property
    def certificate(self) -> Svid | None:
        """The certificate new handshakes use."""
        return self._identity

    def set_identity(self, identity: Svid, trust: TrustBundle | None = None) -> None:
        """Use a new certificate (and bundle) for new handshakes; live connections keep theirs."""
        tls = self._make_tls(identity, trust or self._trust)
        with self._lock:
            if trust is not None:
                self._trust = trust
            self._tls = tls
            engine = self._engine
            if engine is not None:
                # Every listener with a TLS context: forwards, listen(), serve(), SOCKS5
                # and the virtual listeners behind connect().
                for lid in engine.tls_listeners():
                    with contextlib.suppress(EngineError):
                        engine.set_listener_tls(lid, tls)
            # Published last: `certificate` names what new handshakes use.
            self._identity = identity

    # ---- listeners -------------------------------------------------------

    def forward(
        self,
        listen: Address,
        to: Address,
        *,
        expect: Sequence[str] | None = None,
        plaintext: bool = False,
        via: Address | None = None,
        protocol: str | None = None,
        policy: bool = False,
        workload: Workload | None = None,
    ) -> Forward:
        """Accept on ``listen``; carry each connection to ``to``.

        With ``expect`` (the SPIFFE IDs the server at ``to`` may present), the
        connection to ``to`` is mutual TLS 1.3 and the server's identity is verified.
        Without it the forward is plaintext, which needs ``plaintext=True`` when this
        tunnel has an identity (so a forgotten ``expect`` never silently downgrades).

        ``protocol`` is ``"tls"`` (default: one mTLS connection per connection, to
        ``to``) or ``"hbone"`` (HTTP/2 CONNECT streams over pooled mTLS connections to
        ``via``, default ``to``'s IP on port 15008, with ``to`` as the authority).

        ``policy=True`` (plaintext forwards only) authorizes each accepted connection
        with the tunnel's policy before connecting to ``to``: the peer has no identity,
        so only address and port rules can allow it; a denied client gets a reset.
        ``workload`` is the destination workload it is judged as (default: the tunnel's).
        """
        if protocol is None:
            protocol = "hbone" if via is not None else "tls"
        if protocol not in ("tls", "hbone"):
            raise _bad("protocol", f"expected 'tls' or 'hbone', got {protocol!r}")
        listen = _check_address(listen, "listen", allow_port_zero=True)
        to = _check_address(to, "to", allow_port_zero=False)
        ids: tuple[str, ...] = ()
        if expect is not None:
            if isinstance(expect, str):
                raise _bad("expect", "expected a list of SPIFFE IDs, got a single string")
            ids = tuple(self._check_spiffe(s, "expect") for s in expect)
            if not ids:
                raise _bad("expect", "at least one SPIFFE ID is required for mTLS")
            if not self._has_identity:
                raise _bad("expect", "mutual TLS needs Tunnel(identity=..., trust=...)")
            if plaintext:
                raise _bad("plaintext", "cannot be combined with expect")
        elif self._has_identity and not plaintext:
            raise _bad(
                "expect",
                "this tunnel has an identity, so forwards use mTLS: pass the server's "
                "SPIFFE IDs in expect=[...] (or plaintext=True for a plaintext forward)",
            )
        if ids and (policy or workload is not None):
            raise _bad(
                "policy",
                "an mTLS forward is authorized by the server it connects to; "
                "policy=True is for plaintext forwards",
            )
        if workload is not None and not policy:
            raise _bad("workload", "only meaningful with policy=True")
        if protocol == "hbone" and not ids:
            raise _bad("expect", "HBONE needs the SPIFFE IDs the server may present")
        engine = self._require_engine()
        with self._lock:
            if ids and protocol == "hbone":
                hop = (
                    _check_address(via, "via", allow_port_zero=False)
                    if via
                    else (to[0], HBONE_PORT)
                )
                lid, bound = engine.add_listener(
                    _engine.MODE_HBONE_OUT, listen, hop, target=to, tls=self._tls, expect=ids
                )
            elif ids:
                lid, bound = engine.add_listener(
                    _engine.MODE_TLS_OUT, listen, to, tls=self._tls, expect=ids
                )
            else:
                key = self._prepare_workload(engine, workload)
                flags = _engine.LISTENER_POLICY if policy else 0
                lid, bound = engine.add_listener(
                    _engine.MODE_FORWARD, listen, to, flags=flags, workload_key=key
                )
            if _same_endpoint(bound, to):
                engine.remove_listener(lid)
                raise _bad("to", f"{to[0]}:{to[1]} is this forward's own address (a loop)")
            handle = Forward(self, lid, bound, to, ids)
            handle.policy = policy
            handle.workload = workload
            self._endpoints[lid] = handle
            if workload is not None:
                self._listener_workloads[lid] = workload
        self._ensure_pump()
        return handle

    def listen(self, listen: Address, to: Address, *, workload: Workload | None = None) -> Listener:
        """Terminate mutual TLS on ``listen`` and forward to the local target ``to``.

        Clients must present an SVID of this tunnel's trust domain; the peer's SPIFFE
        ID of each connection is reported in events and the access log. With policies,
        each connection is authorized after the handshake (peer identity, source
        address, ``to`` as destination address and port), judged as destination
        ``workload`` (default: the tunnel's); a denied one is closed with close_notify
        and never reaches ``to``.
        """
        listen = _check_address(listen, "listen", allow_port_zero=True)
        to = _check_address(to, "to", allow_port_zero=False)
        if not self._has_identity:
            raise _bad("identity", "listen() terminates mTLS and needs Tunnel(identity=...)")
        engine = self._require_engine()
        with self._lock:
            key = self._prepare_workload(engine, workload)
            lid, bound = engine.add_listener(
                _engine.MODE_TLS_IN, listen, to, tls=self._tls, workload_key=key
            )
            handle = Listener(self, lid, bound, to, workload)
            self._endpoints[lid] = handle
            if workload is not None:
                self._listener_workloads[lid] = workload
        self._ensure_pump()
        return handle

    def serve(
        self,
        listen: Address = ("0.0.0.0", HBONE_PORT),
        *,
        workloads: Sequence[str] | None = None,
        deliver: bool = True,
        policy: bool = True,
    ) -> HboneServer:
        """Accept HBONE (mTLS + HTTP/2 CONNECT) on ``listen`` (see
        :meth:`ztun.mesh.MeshMixin.serve`), authorized by this tunnel's policy.

        Each CONNECT is judged, before the engine dials the authority or delivers the
        stream, as the workload that owns the authority's IP (``Tunnel(workload=,
        workloads=)``), else as this tunnel's workload; a denied one is answered 401.
        ``workloads`` (the IPs answered for) defaults to those workloads' IPs when they
        have any. ``policy`` must stay True: HBONE inbound is always subject to the
        policy in force (a tunnel without policies allows everything).
        """
        if not policy:
            raise _bad(
                "policy",
                "HBONE inbound connections are always authorized by the tunnel's "
                "policy; use a Tunnel without policies to allow every authenticated peer",
            )
        if workloads is None:
            ips = [
                str(ip) for w in (self._workload, *self._served) if w is not None for ip in w.ips
            ]
            if ips:
                workloads = list(dict.fromkeys(ips))
        return super().serve(listen, workloads=workloads, deliver=deliver)

    def _remove_listener(self, ep: _Endpoint) -> None:
        with self._lock:
            self._endpoints.pop(ep.id, None)
            self._listener_workloads.pop(ep.id, None)
            engine = self._engine
        if engine is not None:
            with contextlib.suppress(EngineError):
                engine.remove_listener(ep.id)

    @property
    def _has_identity(self) -> bool:
        return self._identity is not None or self._source is not None

    @staticmethod
    def _check_spiffe(value: object, name: str) -> str:
        if isinstance(value, SpiffeId):
            return str(value)
        if not isinstance(value, str):
            raise _bad(name, f"expected SPIFFE ID strings, got {value!r}")
        try:
            return str(SpiffeId.parse(value))
        except ValueError as e:
            raise _bad(name, f"{e}") from None

    # ---- policy ------------------------------------------------------------

    @property
    def policies(self) -> PolicySet | None:
        """The policy set in force (None: no policy, everything authenticated is allowed)."""
        return self._policy_set

    @property
    def workload(self) -> Workload | None:
        return self._workload

    def set_policy(self, policies: PolicyInput | None) -> None:
        """Replace the policy set, atomically, while traffic flows.

        ``policies`` is parsed and compiled first: malformed YAML, an unknown field, a bad
        CIDR, port or principal raises :class:`~ztun.errors.PolicyError` (with file,
        line and field) and the policy in force stays. Then every engine worker switches
        to the new table; live connections it denies are reset (close reason
        ``policy_changed``, logged per connection on ``ztun.engine``); connections it
        still allows are untouched. Decision counters carry over by policy name.
        ``None`` removes policy.
        """
        pset = None if policies is None else _as_policy_set(policies)
        with self._lock:
            if self._closed:
                raise ZtunError("this Tunnel is closed")
            blob = None if pset is None else self._compile(pset, self._all_workloads())
            if self._engine is not None:
                self._install(self._engine, pset, blob)
            self._policy_set, self._policy_blob = pset, blob

    def set_workloads(self, workloads: Sequence[Workload]) -> None:
        """Replace the workloads HBONE servers answer for (see ``Tunnel(workloads=)``):
        the policy table is recompiled and swapped (live connections re-checked)."""
        served = _check_workloads(workloads)
        with self._lock:
            old, self._served = self._served, served
            try:
                if self._policy_set is not None:
                    blob = self._compile(self._policy_set, self._all_workloads())
                    if self._engine is not None:
                        self._install(self._engine, self._policy_set, blob)
                    self._policy_blob = blob
            except BaseException:
                self._served = old
                raise

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return self._served

    def explain(self, facts: ConnectionFacts, *, listener: object | None = None) -> Decision:
        """The decision the policy in force makes for ``facts``, with the policy and rule
        that made it and the dry-run matches (:meth:`ztun.policy.PolicySet.evaluate`).

        ``facts.workload`` None means what the engine would use for a connection of
        ``listener``: for a ``serve()`` (HBONE) server, the served workload that owns
        ``facts.dst_ip``; for a ``listen()``/``forward()`` port, its workload; then this
        tunnel's workload.
        """
        pset = self._policy_set
        if pset is None:
            return Decision(True, Reason.ALLOWED_NO_ALLOW_POLICY)
        if facts.workload is None:
            wl = getattr(listener, "workload", None)
            if wl is None and listener is not None and not isinstance(listener, _Endpoint):
                wl = next((w for w in self._all_workloads() if facts.dst_ip in w.ips), None)
            wl = wl or self._workload
            if wl is not None:
                facts = dataclasses.replace(facts, workload=wl)
        return pset.evaluate(facts)

    def _all_workloads(self, extra: Workload | None = None) -> list[Workload]:
        """The workloads the table must know: ours, the served, the listeners', ``extra``."""
        out: dict[str, Workload] = {}
        for w in (self._workload, *self._served, *self._listener_workloads.values(), extra):
            if w is None:
                continue
            if w.key in out and out[w.key] != w:
                raise _bad("workload", f"two different definitions of {w.key}")
            out[w.key] = w
        return list(out.values())

    def _compile(self, pset: PolicySet, workloads: list[Workload]) -> bytes:
        blob = pset.compile(workloads, default=self._workload)
        for warning in pset.warnings:
            log.warning("policy: %s", warning)
        return blob

    def _prepare_workload(self, engine: _engine.Engine, workload: Workload | None) -> str | None:
        """Caller holds the lock. Make sure the table in force knows ``workload``."""
        if workload is None:
            return None
        if not isinstance(workload, Workload):
            raise _bad("workload", f"expected a ztun.policy.Workload, got {workload!r}")
        known = {w.key: w for w in self._all_workloads()}
        if known.get(workload.key) not in (None, workload):
            raise _bad("workload", f"two different definitions of {workload.key}")
        if workload.key not in known and self._policy_set is not None:
            blob = self._compile(self._policy_set, self._all_workloads(workload))
            self._install(engine, self._policy_set, blob)
            self._policy_blob = blob
        return workload.key

    def _install(self, engine: _engine.Engine, pset: PolicySet | None, blob: bytes | None) -> None:
        """Caller holds the lock (so swaps are serialized and generations predictable)."""
        names = tuple(p.key for p in pset.policies) if pset is not None else ()
        # Events of the new table can be dispatched before set_policy() returns (the
        # re-check closes connections meanwhile): name its generation beforehand.
        expected = self._policy_gen + 1
        self._policy_names[expected] = names
        try:
            gen = engine.set_policy(blob)
        except BaseException:
            del self._policy_names[expected]
            raise
        if gen != expected:  # pragma: no cover - only this Tunnel swaps its engine's table
            self._policy_names[gen] = self._policy_names.pop(expected)
        self._policy_gen = gen
        while len(self._policy_names) > _POLICY_GENERATIONS_KEPT:
            self._policy_names.popitem(last=False)
        if pset is not None:
            log.info("policy table %d in force: %d policies", gen, len(pset))
        else:
            log.info("policy removed (table %d)", gen)

    def _policy_name(self, gen: int, index: int) -> str | None:
        names = self._policy_names.get(gen)
        if names is None or not 0 <= index < len(names):
            return f"#{index}@{gen}"  # a table generation too old to remember
        return names[index]

    # ---- counters and events --------------------------------------------

    def stats(self) -> TunnelStats:
        """The engine's counters, summed over workers, and the per-policy decisions."""
        engine = self._require_engine()
        s = engine.stats()
        gen, counters = engine.policy_counters()
        per_policy: dict[str, PolicyCounters] = {}
        defaults = PolicyCounters()
        if counters:
            defaults = PolicyCounters(*counters[0])
            per_policy = {
                str(self._policy_name(gen, i)): PolicyCounters(*c)
                for i, c in enumerate(counters[1:])
            }
        return TunnelStats(
            bytes_sent=s["bytes_down_up"],
            bytes_received=s["bytes_up_down"],
            connections_opened=s["connections_opened"],
            connections_closed=s["connections_closed"],
            connections_active=s["connections_active"],
            connections_failed=s["connections_failed"],
            close_reasons=dict(s["close_reasons"]),
            handshakes=s["handshakes"],
            handshakes_resumed=s["handshakes_resumed"],
            policy_allowed=s["policy_allowed"],
            policy_denied=s["policy_denied"],
            policy_dry_run=s["policy_dry_run"],
            events_dropped=s["events_dropped"],
            buffers_in_use=s["buffers_in_use"],
            buffer_bytes=s["buffer_bytes"],
            policies=per_policy,
            policy_defaults=defaults,
            policy_generation=gen,
            tls_failures=dict(s["tls_failures"]),
            hbone_status=dict(s["hbone_status"]),
            hbone_connections_opened=s["hbone_connections_opened"],
            hbone_connections_active=s["hbone_connections_active"],
            hbone_protocol_errors=s["hbone_protocol_errors"],
            bpf_pairs=s["bpf_pairs"],
            bpf_direct_bytes=s["bpf_direct_bytes"],
        )

    def connections(self) -> list[LiveConnection]:
        """The connections the engine carries right now, with their byte counts so far."""
        rows = self._require_engine().connections()
        return [LiveConnection(*row) for row in rows]

    @property
    def workers(self) -> int:
        return self._require_engine().workers

    def subscribe(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback(event)`` for each connection event; returns an unsubscribe."""
        with self._lock:
            self._subscribers.append(callback)
        self._ensure_pump()

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subscribers.remove(callback)
            self._update_event_mask()

        return unsubscribe

    def _update_event_mask(self) -> None:
        """Ask the engine only for the per-connection records somebody uses: with no
        subscriber and the access log off (or its logger not enabled for INFO when the
        last listener or subscriber was added), the engine writes none and Python
        handles none."""
        with self._lock:
            engine = self._engine
            mask = _engine.EVMASK_LOG
            if self._subscribers:
                mask |= _engine.EVMASK_OPEN | _engine.EVMASK_CLOSE
            elif self._access_log and access_logger.isEnabledFor(logging.INFO):
                mask |= _engine.EVMASK_CLOSE
        if engine is not None:
            with contextlib.suppress(EngineError):
                engine.set_events(mask)

    def _ensure_pump(self) -> None:
        """Start delivering events: on the asyncio loop if we run in one, else a thread."""
        # Every new listener and subscriber passes here: a good moment to notice that
        # the access log was turned on (or off) since.
        self._update_event_mask()
        with self._lock:
            if self._engine is None or self._pump is not None or self._pump_stop is not None:
                return
            engine = self._engine
            if self._loop is not None:
                ref = weakref.ref(self)

                def readable() -> None:
                    t = ref()
                    if t is not None:
                        t._on_events_readable()

                self._loop.add_reader(engine.event_fd, readable)
                self._pump_stop = -1
                self._drain_events()
                return
            import os

            r, w = os.pipe()
            self._pump_stop = w
            # The thread holds the Tunnel only weakly: an unclosed, forgotten Tunnel can
            # still be collected (and warns, and stops its engine).
            self._pump = threading.Thread(
                target=_pump_main,
                args=(weakref.ref(self), engine, r),
                name="ztun-events",
                daemon=True,
            )
            self._pump.start()

    def _stop_pump(self) -> None:
        with self._lock:
            pump, stop = self._pump, self._pump_stop
            self._pump, self._pump_stop = None, None
            engine = self._engine
        if stop == -1 and self._loop is not None and engine is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(engine.event_fd)
        elif stop is not None and stop >= 0:
            os.write(stop, b"x")
            # close() may run on the pump thread itself (a subscriber, or the last
            # reference dropped there): never join yourself.
            if pump is not None and pump is not threading.current_thread():
                pump.join()
            os.close(stop)

    def _on_events_readable(self) -> None:
        self._drain_events()
        engine = self._engine
        while engine is not None and engine.arm_events():
            self._drain_events()

    def _drain_events(self) -> None:
        engine = self._engine
        if engine is None:
            return
        while True:
            batch = engine.read_events()
            if not batch:
                return
            for raw in batch:
                self._dispatch(parse_event(raw, self._policy_name))

    def _dispatch(self, ev: ConnectionEvent | EngineLog | None) -> None:
        if isinstance(ev, EngineLog):
            engine_logger.log(ev.level, "%s", ev.message)
            return
        if ev is None:
            return
        if ev.kind == "connect_done":
            self._on_connect_done(ev)
            return
        if ev.kind == "accept":
            if self._closed:
                os.close(ev.fd) if ev.fd is not None and ev.fd >= 0 else None
            else:
                self._on_accept(ev)
            return
        if ev.kind == "close" and self._access_log and access_logger.isEnabledFor(logging.INFO):
            access_logger.info("%s", access_log_line(ev))
        for cb in list(self._subscribers):
            try:
                cb(ev)
            except Exception:
                log.exception("event subscriber %r failed", cb)


def _as_policy_set(value: object) -> PolicySet:
    """A PolicySet from any PolicyInput; PolicyError (file, line, field) when invalid."""
    if isinstance(value, PolicySet):
        return value
    if isinstance(value, str | bytes):
        return PolicySet.from_yaml(value)
    if isinstance(value, os.PathLike):
        return PolicySet.load(value)
    if (
        isinstance(value, Sequence)
        and value
        and all(isinstance(v, os.PathLike | str) for v in value)
    ):
        return PolicySet.load(*value)
    raise _bad(
        "policies",
        f"expected a PolicySet, YAML text, or YAML file/folder paths, got {type(value).__name__}",
    )


def _check_workloads(workloads: object) -> tuple[Workload, ...]:
    if isinstance(workloads, Workload) or not isinstance(workloads, Sequence | set | frozenset):
        raise _bad("workloads", f"expected a sequence of Workloads, got {workloads!r}")
    out = tuple(workloads)
    for w in out:
        if not isinstance(w, Workload):
            raise _bad("workloads", f"expected ztun.policy.Workload items, got {w!r}")
    return out


def _pump_main(ref: weakref.ReferenceType[Tunnel], engine: _engine.Engine, stop_fd: int) -> None:
    """The event thread: drain the engine's events whenever its fd becomes readable."""
    poller = select.poll()
    poller.register(engine.event_fd, select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    try:
        while True:
            t = ref()
            if t is None:
                return
            if engine.arm_events():
                t._drain_events()
                del t
                continue
            del t  # never sleep holding the Tunnel
            # A timeout, so a forgotten Tunnel's thread notices it is gone.
            ready = poller.poll(1000)  # releases the GIL while it waits
            if any(fd == stop_fd for fd, _ in ready):
                return
            t = ref()
            if t is None:
                return
            t._drain_events()
            del t
    except EngineError:
        return  # the engine was closed under us
    finally:
        os.close(stop_fd)
