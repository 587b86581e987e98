"""Transparent capture: unmodified programs secured by eBPF, without iptables.

A captured workload is a cgroup v2 (its processes) and a network namespace (where ztun
listens for it), as ztunnel's in-pod mode, with eBPF where ztunnel needs iptables rules:

* **outbound**: the workload's TCP connects are rewritten (``cgroup/connect4``,
  ``cgroup/connect6``) to ztun's outbound port in the namespace (127.0.0.1 / ::1, port
  15001); ztun's listener asks ``getsockopt(SO_ORIGINAL_DST)`` as it would behind iptables
  REDIRECT, answered by a ``cgroup/getsockopt`` program, and routes the connection through
  the tunnel's directory: HBONE to mesh workloads, a plain connection to anything else
  (passthrough). ``getpeername()`` shows the app the peer it dialled. Loopback
  destinations and UDP are left alone.
* **inbound**: an ``sk_lookup`` program on the namespace hands every new TCP connection to
  port 15008 to ztun's HBONE listener and every other one (not from loopback) to ztun's
  plaintext listener (ztunnel's 15006), where policy decides: the accepted socket keeps the
  original destination (``getsockname``) and source (``getpeername``). While ztun does
  not listen, such connections are refused.

Typical use, with an identity and a directory on the tunnel::

    with Tunnel(identity=svid, trust=bundle, workload=me) as t:
        t.set_directory([Destination(ip, spiffe_id), ...])
        with capture.Capture(t, cgroup="/sys/fs/cgroup/unified/app", netns="/run/netns/app"):
            ...  # programs in that cgroup and namespace are now in the mesh
        # capture disabled: direct connections again, no program attached

``pin_dir`` makes the capture outlive the process (ztund does this): while nothing
listens, the workload's connects and inbound connections are refused (fail closed, as
ambient mesh), and a new :class:`Capture` of the same name takes the pinned programs over
without a gap. :func:`cleanup` (``ztund bpf cleanup``) removes everything.
docs/capture.md has the design, the costs and the figures.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import platform
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ztun import bpf
from ztun.errors import BpfError, ConfigError
from ztun.netns import run_in_netns

if TYPE_CHECKING:
    from ztun.policy import Workload
    from ztun.tunnel import Tunnel

__all__ = [
    "DEFAULT_PIN_DIR",
    "HBONE_PORT",
    "INBOUND_PORT",
    "MIN_KERNEL",
    "OUTBOUND_PORT",
    "Capture",
    "CaptureProgram",
    "Listeners",
    "available",
    "captured",
    "cleanup",
    "netns_cookie",
    "uncapture",
]

log = logging.getLogger(__name__)

OUTBOUND_PORT = 15001  # ztunnel's outbound capture port
INBOUND_PORT = 15006  # ztunnel's plaintext inbound port
HBONE_PORT = 15008
#: Where ztund pins capture (under ztun's pin root, so ``ztund bpf cleanup`` removes it).
DEFAULT_PIN_DIR = f"{bpf.DEFAULT_PIN_ROOT}/capture"
#: sk_lookup's ingress_ifindex (5.17) is the newest feature the programs use.
MIN_KERNEL = (5, 17)
NAME_MAX = 63

# ZTUN_CAPTURE_* of ztun/bpf.h (checked against the binding when it loads).
_OUT4, _OUT6, _IN = 0x1, 0x2, 0x4

_SO_NETNS_COOKIE = 71
_CAP_NET_ADMIN, _CAP_SYS_ADMIN, _CAP_BPF = 12, 21, 39


# --------------------------------------------------------------------------- binding


def _lib() -> tuple[Any, Any]:
    ffi, lib = bpf._load()
    if (lib.ZTUN_CAPTURE_OUT4, lib.ZTUN_CAPTURE_OUT6, lib.ZTUN_CAPTURE_IN) != (_OUT4, _OUT6, _IN):
        raise BpfError("ztun._bpf does not match ztun.capture (rebuild ztun)")
    return ffi, lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        ffi, lib = _lib()
        detail = ffi.string(lib.ztun_capture_last_error()).decode(errors="replace")
        bpf._drain_log()
        raise BpfError(f"{what}: {detail or ffi.string(lib.ztun_bpf_strerror(rc)).decode()}")
    return rc


def available() -> tuple[bool, str]:
    """Whether transparent capture can run here, and if not, why (one line)."""
    if platform.system() != "Linux":
        return False, f"capture needs Linux (this is {platform.system()})"
    try:
        _lib()
    except BpfError as e:
        return False, str(e)
    if os.geteuid() != 0:
        try:
            with open("/proc/self/status") as f:
                eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
        except (OSError, StopIteration, ValueError):
            return False, "cannot read capabilities"
        if not eff & (1 << _CAP_SYS_ADMIN) and not (
            eff & (1 << _CAP_BPF) and eff & (1 << _CAP_NET_ADMIN)
        ):
            return False, "not root and missing CAP_BPF + CAP_NET_ADMIN"
    release = platform.release()
    if bpf._kernel_tuple(release) < MIN_KERNEL:
        return False, f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return False, f"kernel {release} has no BTF (/sys/kernel/btf/vmlinux)"
    if bpf.find_mount("cgroup2") is None:
        return False, "no cgroup2 file system is mounted"
    return True, f"ok: kernel {release}"


def netns_cookie(netns: str | os.PathLike[str]) -> int:
    """The cookie the kernel gives a network namespace (what the programs key it by)."""
    ffi, lib = _lib()
    out = ffi.new("uint64_t *")
    _check(lib.ztun_capture_netns_cookie(os.fsencode(netns), out), "netns cookie")
    return int(out[0])


# --------------------------------------------------------------------------- the programs


class CaptureProgram:
    """The capture programs and maps of this process (one per pin directory).

    ``pin_dir``: pin everything there so it outlives the process (fail closed); a later
    process opening the same directory takes over what it finds. None: everything is
    detached when this object is closed or the process ends.
    ``engine_cgroup``: the cgroup v2 of the process whose listeners ask SO_ORIGINAL_DST
    (default: this process's); a captured cgroup may not contain it.
    ``mark``: SO_MARK of sockets that are never captured (ztun's own; default 0x7a74).

    Most code uses :class:`Capture`, which shares one instance per ``pin_dir``.
    """

    def __init__(
        self,
        *,
        pin_dir: str | os.PathLike[str] | None = None,
        engine_cgroup: str | os.PathLike[str] | None = None,
        mark: int = 0,
        max_conns: int = 0,
        max_workloads: int = 0,
    ) -> None:
        self._ffi, self._lib = _lib()
        self.pin_dir = Path(pin_dir) if pin_dir is not None else None
        self.engine_cgroup = Path(engine_cgroup) if engine_cgroup is not None else bpf.own_cgroup()
        if self.pin_dir is not None:
            bpf.bpffs_root(mount=True)
        cfg = self._ffi.new("struct ztun_capture_config *")
        keep = [
            self._ffi.new("char[]", os.fsencode(self.engine_cgroup)),
            self._ffi.new("char[]", os.fsencode(self.pin_dir)) if self.pin_dir else None,
        ]
        cfg.engine_cgroup = keep[0]
        cfg.pin_dir = keep[1] if keep[1] is not None else self._ffi.NULL
        cfg.mark = mark
        cfg.max_conns = max_conns
        cfg.max_workloads = max_workloads
        hp = self._ffi.new("ztun_capture **")
        try:
            _check(self._lib.ztun_capture_open(cfg, hp), "load capture programs")
        finally:
            bpf._drain_log()
        self._h: Any = hp[0]
        self._lock = threading.Lock()
        log.debug(
            "capture programs loaded (pins: %s, engine cgroup %s)",
            self.pin_dir or "none",
            self.engine_cgroup,
        )

    @property
    def closed(self) -> bool:
        return bool(self._h == self._ffi.NULL)

    def _handle(self) -> Any:
        if self.closed:
            raise BpfError("the capture programs are closed")
        return self._h

    def add(
        self,
        name: str,
        *,
        cgroup: str | os.PathLike[str],
        netns: str | os.PathLike[str],
        listeners: Listeners,
        ipv4: bool = True,
        ipv6: bool = True,
        inbound: bool = True,
        outbound_port: int = OUTBOUND_PORT,
        hbone_port: int = HBONE_PORT,
        exclude_outbound_ports: Iterable[int] = (),
        exclude_inbound_ports: Iterable[int] = (),
    ) -> None:
        """Capture a workload (or take over its pinned capture). ``listeners`` must be
        listening already: from here on connects are rewritten to them."""
        _check_name(name)
        out_ports = _ports(exclude_outbound_ports, "exclude_outbound_ports")
        in_ports = _ports(exclude_inbound_ports, "exclude_inbound_ports")
        ffi = self._ffi
        w = ffi.new("struct ztun_capture_workload *")
        keep = [
            ffi.new("char[]", name.encode()),
            ffi.new("char[]", os.fsencode(cgroup)),
            ffi.new("char[]", os.fsencode(netns)),
            ffi.new("uint16_t[]", out_ports or [0]),
            ffi.new("uint16_t[]", in_ports or [0]),
        ]
        w.name, w.cgroup, w.netns = keep[0], keep[1], keep[2]
        w.flags = (_OUT4 if ipv4 else 0) | (_OUT6 if ipv6 else 0) | (_IN if inbound else 0)
        w.outbound_port = outbound_port
        w.hbone_port = hbone_port
        w.skip_out, w.nskip_out = keep[3], len(out_ports)
        w.skip_in, w.nskip_in = keep[4], len(in_ports)
        for i, fd in enumerate(listeners.fds()):
            w.listen_fds[i] = fd
        with self._lock:
            try:
                _check(self._lib.ztun_capture_add(self._handle(), w), f"capture {name}")
            finally:
                bpf._drain_log()

    def set_listener(self, name: str, which: int, sock: socket.socket | int | None) -> None:
        fd = -1 if sock is None else (sock if isinstance(sock, int) else sock.fileno())
        with self._lock:
            _check(
                self._lib.ztun_capture_set_listener(self._handle(), name.encode(), which, fd),
                f"listener of {name}",
            )

    def remove(self, name: str) -> None:
        """Stop capturing ``name`` (also one pinned by an earlier process); the last one
        removes the shared hook and the pins: nothing of capture is left."""
        with self._lock:
            _check(
                self._lib.ztun_capture_remove(self._handle(), name.encode()), f"uncapture {name}"
            )

    def names(self) -> list[str]:
        """Captured workloads, including those pinned by an earlier process."""
        buf = self._ffi.new("char[]", 1 << 16)
        with self._lock:
            _check(self._lib.ztun_capture_list(self._handle(), buf, 1 << 16), "list captures")
        return [n for n in self._ffi.string(buf).decode().splitlines() if n]

    def stats(self) -> dict[str, int]:
        n = int(self._lib.ZTUN_CAPTURE_NSTATS)
        vals = self._ffi.new("uint64_t[]", n)
        _check(self._lib.ztun_capture_stats(self._handle(), vals, n), "capture stats")
        return {
            self._ffi.string(self._lib.ztun_capture_stat_name(i)).decode(): int(vals[i])
            for i in range(n)
        }

    def close(self) -> None:
        """Let go: pinned captures stay (fail closed), unpinned ones are detached."""
        with self._lock:
            if self.closed:
                return
            self._lib.ztun_capture_close(self._h)
            self._h = self._ffi.NULL
        bpf._drain_log()

    def __enter__(self) -> CaptureProgram:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name.encode()) > NAME_MAX or "\0" in name:
        raise ConfigError(f"capture name: 1 to {NAME_MAX} bytes, got {name!r}", field="name")


def _ports(ports: Iterable[int], what: str) -> list[int]:
    out = []
    for p in ports:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise ConfigError(f"{what}: expected ports 1..65535, got {p!r}", field=what)
        out.append(p)
    return sorted(set(out))


# One CaptureProgram per (pin_dir, engine cgroup) in a process, shared by its Captures.
_shared_lock = threading.Lock()
_shared: dict[tuple[str | None, str], tuple[CaptureProgram, int]] = {}


def _acquire(pin_dir: Path | None, engine_cgroup: Path | None) -> CaptureProgram:
    cg = engine_cgroup or bpf.own_cgroup()
    key = (str(pin_dir) if pin_dir else None, str(cg))
    with _shared_lock:
        prog, refs = _shared.get(key, (None, 0))
        if prog is None or prog.closed:
            prog, refs = CaptureProgram(pin_dir=pin_dir, engine_cgroup=cg), 0
        _shared[key] = (prog, refs + 1)
        return prog


def _release(prog: CaptureProgram) -> None:
    with _shared_lock:
        for key, (p, refs) in list(_shared.items()):
            if p is prog:
                if refs > 1:
                    _shared[key] = (p, refs - 1)
                    return
                del _shared[key]
                break
    prog.close()


# --------------------------------------------------------------------------- a workload


@dataclass
class Listeners:
    """ztun's listening sockets for one captured namespace (None: not served)."""

    outbound4: socket.socket | None = None
    outbound6: socket.socket | None = None
    hbone4: socket.socket | None = None
    hbone6: socket.socket | None = None
    plain4: socket.socket | None = None
    plain6: socket.socket | None = None

    def fds(self) -> list[int]:
        """The sk_lookup slots' fds, in ZTUN_CAPTURE_LSN_* order (-1: none)."""
        return [
            s.fileno() if s is not None else -1
            for s in (self.hbone4, self.hbone6, self.plain4, self.plain6)
        ]

    def all(self) -> list[socket.socket]:
        return [
            s
            for s in (
                self.outbound4,
                self.outbound6,
                self.hbone4,
                self.hbone6,
                self.plain4,
                self.plain6,
            )
            if s is not None
        ]

    def close(self) -> None:
        for s in self.all():
            s.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(socket.SOMAXCONN)
    except BaseException:
        s.close()
        raise
    return s


def _netns_addresses() -> list[str]:
    """Global unicast addresses of the calling thread's network namespace."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped,unused-ignore]

    out = []
    with IPRoute() as ipr:
        for a in ipr.get_addr():
            ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
            if not (ip.is_loopback or ip.is_link_local or ip.is_multicast):
                out.append(str(ip))
    return out


class Capture:
    """Capture one workload for ``tunnel``: ztun's listeners in ``netns`` plus the programs
    on ``cgroup`` and ``netns``. A context manager; :meth:`close` disables the capture
    (direct connections again, nothing of it left attached).

    Parameters:
        tunnel: a :class:`~ztun.Tunnel` with an identity (started inside ``netns`` if it
            is not started yet: its workers dial from where they start); its
            directory (``set_directory``) decides what goes over HBONE and what passes
            through; its policy judges inbound connections.
        cgroup: cgroup v2 directory of the workload's processes (descendants included).
        netns: the workload's network namespace (``/run/netns/<name>``,
            ``/proc/<pid>/ns/net``).
        name: unique key of this capture (pins, :meth:`CaptureProgram.names`); default
            ``netns-<inode>``.
        workload: the :class:`ztun.policy.Workload` inbound plaintext connections are
            judged as (default: the tunnel's).
        addresses: the workload's IPs an HBONE CONNECT may name (default: the workload's,
            else the namespace's global addresses).
        ipv4 / ipv6: capture that family (outbound connects, and listeners for inbound).
        inbound: steer inbound connections to ztun (else only outbound is captured).
        policy: authorize inbound plaintext connections with the tunnel's policy.
        exclude_outbound_ports / exclude_inbound_ports: never captured.
        pin_dir: pin the programs (fail closed while ztun is away; ztund's mode).
        outbound_port / inbound_port: ztun's ports in the namespace (15001 / 15006, on
            loopback); hbone_port: the inbound port that carries HBONE (15008).
    """

    def __init__(
        self,
        tunnel: Tunnel,
        *,
        cgroup: str | os.PathLike[str],
        netns: str | os.PathLike[str],
        name: str | None = None,
        workload: Workload | None = None,
        addresses: Sequence[str] | None = None,
        ipv4: bool = True,
        ipv6: bool = True,
        inbound: bool = True,
        policy: bool = True,
        exclude_outbound_ports: Iterable[int] = (),
        exclude_inbound_ports: Iterable[int] = (),
        pin_dir: str | os.PathLike[str] | None = None,
        engine_cgroup: str | os.PathLike[str] | None = None,
        outbound_port: int = OUTBOUND_PORT,
        inbound_port: int = INBOUND_PORT,
        hbone_port: int = HBONE_PORT,
    ) -> None:
        from ztun._core import _engine

        if not ipv4 and not ipv6:
            raise ConfigError("capture needs ipv4 or ipv6", field="ipv4")
        self.tunnel = tunnel
        self.cgroup = Path(cgroup)
        self.netns = Path(netns)
        self.name = name or f"netns-{os.stat(self.netns).st_ino}"
        _check_name(self.name)
        if not getattr(tunnel, "_has_identity", False):
            raise ConfigError("capture needs a Tunnel with an identity (HBONE)", field="tunnel")
        if addresses is None:
            wl = workload or getattr(tunnel, "workload", None)
            ips = [str(ip) for ip in wl.ips] if wl is not None and wl.ips else []
            addresses = ips or run_in_netns(self.netns, _netns_addresses, name="ztun-capture")
        if inbound and not addresses:
            raise ConfigError(f"{self.netns}: no address to serve HBONE for", field="addresses")
        self.addresses = list(addresses)
        self.pin_dir = Path(pin_dir) if pin_dir is not None else None
        self._closed = False
        self._listener_ids: list[int] = []
        if not tunnel.started:
            # Its workers dial from the namespace they are started in: the workload's.
            run_in_netns(self.netns, tunnel.start, name="ztun-capture")
        self._prog = _acquire(self.pin_dir, Path(engine_cgroup) if engine_cgroup else None)
        self.listeners = Listeners()
        try:
            self.listeners = run_in_netns(
                self.netns,
                self._make_listeners,
                ipv4,
                ipv6,
                inbound,
                outbound_port,
                inbound_port,
                name="ztun-capture",
            )
            if ipv6 and self.listeners.outbound6 is None:
                log.warning("%s: no IPv6 in the namespace: capturing IPv4 only", self.netns)
                ipv6 = False
            engine = tunnel._require_engine()
            tls = tunnel._tls
            with tunnel._lock:
                key = tunnel._prepare_workload(engine, workload)
                ls = self.listeners
                for s in (ls.outbound4, ls.outbound6):
                    if s is not None:
                        lid, _ = engine.add_listener(
                            _engine.MODE_HBONE_OUT,
                            None,
                            None,
                            fd=s.fileno(),
                            tls=tls,
                            flags=_engine.LISTENER_ORIGINAL_DST,
                        )
                        self._listener_ids.append(lid)
                for s in (ls.hbone4, ls.hbone6):
                    if s is not None:
                        lid, _ = engine.add_listener(
                            _engine.MODE_HBONE_IN,
                            None,
                            None,
                            fd=s.fileno(),
                            tls=tls,
                            workload_ips=self.addresses,
                        )
                        self._listener_ids.append(lid)
                flags = _engine.LISTENER_ORIGINAL_DST | (_engine.LISTENER_POLICY if policy else 0)
                for s in (ls.plain4, ls.plain6):
                    if s is not None:
                        lid, _ = engine.add_listener(
                            _engine.MODE_FORWARD,
                            None,
                            None,
                            fd=s.fileno(),
                            flags=flags,
                            workload_key=key,
                        )
                        self._listener_ids.append(lid)
            tunnel._ensure_pump()
            self._prog.add(
                self.name,
                cgroup=self.cgroup,
                netns=self.netns,
                listeners=self.listeners,
                ipv4=ipv4,
                ipv6=ipv6,
                inbound=inbound,
                outbound_port=outbound_port,
                hbone_port=hbone_port,
                exclude_outbound_ports=exclude_outbound_ports,
                exclude_inbound_ports=exclude_inbound_ports,
            )
        except BaseException:
            self._remove_listeners()
            self.listeners.close()
            _release(self._prog)
            raise
        # The engine holds its own copies of the listening sockets; the outbound ones stay
        # open here too, to name the hop's port to a sockmap accelerator (accelerate()).
        for sock in self.listeners.all():
            if sock not in (self.listeners.outbound4, self.listeners.outbound6):
                sock.close()
        log.info(
            "capturing %s: cgroup %s, netns %s (%s%s%s)",
            self.name,
            self.cgroup,
            self.netns,
            "+".join(f for f, on in (("ipv4", ipv4), ("ipv6", ipv6)) if on),
            ", inbound" if inbound else "",
            f", pinned in {self.pin_dir}" if self.pin_dir else "",
        )

    @staticmethod
    def _make_listeners(
        ipv4: bool, ipv6: bool, inbound: bool, out_port: int, in_port: int
    ) -> Listeners:
        # Inside the namespace. sk_lookup ignores the address a listener is bound to: the
        # HBONE listeners take any free loopback port (a node-mode 0.0.0.0:15008 listener of
        # the same namespace keeps its port); the plaintext ones take ztunnel's 15006.
        ls = Listeners()
        try:
            if ipv6:
                try:
                    ls.outbound6 = _listen("::1", out_port)
                except OSError as e:
                    if e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        raise
                    ipv6 = False  # IPv6 is off in this namespace: nothing to capture there
            if ipv4:
                ls.outbound4 = _listen("127.0.0.1", out_port)
            if inbound and ipv4:
                ls.hbone4 = _listen("127.0.0.1", 0)
                ls.plain4 = _listen("127.0.0.1", in_port)
            if inbound and ipv6:
                ls.hbone6 = _listen("::1", 0)
                ls.plain6 = _listen("::1", in_port)
        except OSError as e:
            ls.close()
            if e.errno == errno.EADDRINUSE:
                raise BpfError(
                    f"capture listeners: port in use in the workload's namespace ({e}): "
                    "is it captured by another process?"
                ) from None
            raise
        return ls

    def _remove_listeners(self) -> None:
        engine = self.tunnel._engine
        for lid in self._listener_ids:
            if engine is not None:
                with contextlib.suppress(Exception):
                    engine.remove_listener(lid)
        self._listener_ids = []

    @property
    def closed(self) -> bool:
        return self._closed

    def accelerate(self, acc: bpf.SockmapAccelerator) -> None:
        """Let ``acc`` (its cgroup must hold the workload's and ztun's processes) carry the
        loopback hop from the workload's apps to ztun's outbound listener socket to socket
        (docs/sockmap.md), for a Tunnel that does not use ``acc`` itself. For the same-node
        shortcut, give the accelerator to the Tunnel instead (``Tunnel(accelerate=acc)``):
        its engine then registers the listeners itself, and pairs a captured connection to
        a local directory entry (``Destination(ip, id, local=True)``) app to app."""
        for s in (self.listeners.outbound4, self.listeners.outbound6):
            if s is not None and s.fileno() >= 0:
                acc.add_listener(s)

    def stats(self) -> dict[str, int]:
        """Counters of the capture programs (all workloads of this process's programs)."""
        return self._prog.stats()

    def close(self) -> None:
        """Disable: the programs go first (connects go direct again, inbound reaches the
        app), then ztun's listeners. Connections already relayed keep going."""
        if self._closed:
            return
        self._closed = True
        try:
            self._prog.remove(self.name)
        finally:
            self._remove_listeners()
            self.listeners.close()
            _release(self._prog)
        log.info("capture of %s disabled", self.name)

    def release(self) -> None:
        """Stop serving but leave pinned programs in place: while nothing listens the
        workload's connects are refused (fail closed); a new Capture of the same name
        takes over. Without ``pin_dir`` this is :meth:`close`."""
        if self._closed:
            return
        if self.pin_dir is None:
            self.close()
            return
        self._closed = True
        self._remove_listeners()
        self.listeners.close()
        _release(self._prog)
        log.info("capture of %s left pinned (fail closed) until ztun is back", self.name)

    def __enter__(self) -> Capture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "capturing"
        return f"<Capture {self.name} {state} cgroup={self.cgroup} netns={self.netns}>"


# --------------------------------------------------------------------------- cleanup


def captured(pin_dir: str | os.PathLike[str] = DEFAULT_PIN_DIR) -> list[str]:
    """Names of the workloads pinned under ``pin_dir`` (empty when nothing is)."""
    if not Path(pin_dir).exists():
        return []
    with CaptureProgram(pin_dir=pin_dir) as prog:
        return prog.names()


def uncapture(
    names: Iterable[str] | None = None, *, pin_dir: str | os.PathLike[str] = DEFAULT_PIN_DIR
) -> list[str]:
    """Stop capturing pinned workloads (default: all of them); returns their names.
    When none is left, the shared programs and the pinned maps go too."""
    if not Path(pin_dir).exists():
        return []
    done = []
    with CaptureProgram(pin_dir=pin_dir) as prog:
        for n in list(names) if names is not None else prog.names():
            prog.remove(n)
            done.append(n)
    return done


def cleanup() -> list[str]:
    """Remove every ztun eBPF object, capture included (``ztund bpf cleanup``)."""
    return bpf.cleanup()
