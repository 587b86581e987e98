"""eBPF sockmap acceleration: local hops and the same-node shortcut.

The kernel side (``ebpf/ztun.bpf.c``) and its loader (``libztun_bpf.so``, bound here through
the cffi module ``ztun._bpf``) are optional: without them, or on a kernel that cannot run
them, ztun relays every byte in user space and :func:`available` says why, once, in the log.

Two accelerations, both decided per ``sendmsg()`` by an ``sk_msg`` program:

* **hop**: the loopback hop between a local app and ztun's own socket (connections to a
  port registered with :meth:`SockmapAccelerator.add_listener`, and connections ztun makes
  from sockets marked with :attr:`SockmapAccelerator.mark`) goes socket to socket;
* **pair** (the same-node shortcut): once the engine has decided a connection from local
  app A to local app B (identity, policy), :meth:`SockmapAccelerator.pair_add` lets A's
  bytes go straight into B's receive queue and back, while ztun keeps its two sockets for
  FIN, RST and teardown. ``docs/sockmap.md`` has the protocol and why it keeps order.

Typical use (the daemon does this; the engine gets :meth:`SockmapAccelerator.engine_handle`)::

    ok, why = ztun.bpf.available()
    if ok:
        with ztun.bpf.SockmapAccelerator(cgroup="/sys/fs/cgroup/unified") as acc:
            acc.add_listener(listen_sock)
            ...
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from ztun.errors import BpfError

__all__ = [
    "DEFAULT_MARK",
    "DEFAULT_PIN_ROOT",
    "MARK_LOCK_DIR",
    "MIN_KERNEL",
    "Accelerator",
    "BpfStatus",
    "Cgroup",
    "Features",
    "PairStats",
    "SockmapAccelerator",
    "available",
    "bpffs_root",
    "cgroup2_root",
    "cleanup",
    "features",
    "find_mount",
    "log_unavailable_once",
    "own_cgroup",
    "release_shared",
    "shared_accelerator",
    "status",
]

log = logging.getLogger(__name__)

#: SO_MARK ztun sets on its own outgoing sockets unless configured otherwise ("zt").
DEFAULT_MARK = 0x7A74
#: Lock files that hand out distinct marks to this host's accelerators (see _MarkLease).
MARK_LOCK_DIR = "/run/ztun/sockmap-marks"
#: Marks other than the default: DEFAULT_MARK in the low 16 bits, a slot 1..n above.
_MARK_SLOTS = 255
#: Where pinned objects live (one directory per accelerator below it).
DEFAULT_PIN_ROOT = "/sys/fs/bpf/ztun"
#: bpf_rdonly_cast (6.2) lets the programs read the peer sockets' state; older kernels are
#: refused. Sockmap bpf_links need 6.10 (else legacy attach); a bound on redirected bytes
#: needs 6.13 (exact with psock->msg_tot_len, 6.18).
MIN_KERNEL = (6, 2)

_BOUND_NAMES = {0: "none", 1: "rmem", 2: "exact"}
# Capabilities (linux/capability.h): loading needs BPF + NET_ADMIN (sock_ops, sockmap) +
# PERFMON (reading kernel memory through bpf_rdonly_cast); SYS_ADMIN implies all.
_CAP_NET_ADMIN, _CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 12, 21, 38, 39


class _Sock(Protocol):
    def fileno(self) -> int: ...


# --------------------------------------------------------------------------- binding


class _Module:
    """Process-wide state: the binding, and what the metrics and the log need."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.binding: tuple[Any, Any] | None = None
        self.binding_error: str | None = None
        self.active = 0  # open accelerators
        self.logged_unavailable = False


_mod = _Module()


def _load() -> tuple[Any, Any]:
    """(ffi, lib) of ztun._bpf, or BpfError saying why it is not there."""
    with _mod.lock:
        if _mod.binding is None and _mod.binding_error is None:
            try:
                from ztun import _bpf

                _mod.binding = (_bpf.ffi, _bpf.lib)
            except ImportError as e:
                _mod.binding_error = (
                    "ztun was built without its eBPF loader (ZTUN_BPF=OFF, or clang, bpftool, "
                    f"libbpf-dev or kernel BTF were missing at build time): {e}"
                )
        binding = _mod.binding
    if binding is None:
        raise BpfError(_mod.binding_error or "ztun._bpf unavailable")
    return binding


def _drain_log() -> None:
    """Forward the loader's buffered messages (libbpf included) to logging."""
    if _mod.binding is None:
        return
    ffi, lib = _mod.binding
    buf = ffi.new("char[]", 16384)
    while lib.ztun_bpf_log_read(buf, 16384):
        for line in ffi.string(buf).decode(errors="replace").splitlines():
            level, _, msg = line.partition(" ")
            log.log(logging.WARNING if level in ("E", "W") else logging.DEBUG, "%s", msg)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        ffi, lib = _load()
        detail = ffi.string(lib.ztun_bpf_last_error()).decode(errors="replace")
        _drain_log()
        raise BpfError(f"{what}: {detail or ffi.string(lib.ztun_bpf_strerror(rc)).decode()}")
    return rc


# --------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class Features:
    """What the running kernel offers the programs."""

    kernel: str
    bound: str  # "exact", "rmem" or "none": how redirected bytes can be bounded
    sockmap_link: bool
    rdonly_cast: bool
    btf: bool


@functools.cache
def features() -> Features:
    """Kernel facts (parsed from its BTF once per process: about 50 ms)."""
    ffi, lib = _load()
    f = ffi.new("struct ztun_bpf_features *")
    _check(lib.ztun_bpf_features(f), "probe kernel features")
    return Features(
        kernel=ffi.string(f.kernel).decode(),
        bound=_BOUND_NAMES.get(f.bound, "none"),
        sockmap_link=bool(f.sockmap_link),
        rdonly_cast=bool(f.rdonly_cast),
        btf=bool(f.btf),
    )


def _unescape_mount(path: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 3 < len(path) and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def find_mount(fstype: str) -> Path | None:
    """The first mount point of a file system type, from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, sep, post = line.partition(" - ")
                if sep and post.split(" ", 1)[0] == fstype:
                    return Path(_unescape_mount(pre.split(" ")[4]))
    except OSError:
        return None
    return None


def cgroup2_root() -> Path:
    """The cgroup v2 mount (``/sys/fs/cgroup`` or, on hybrid hosts, e.g. ``.../unified``)."""
    root = find_mount("cgroup2")
    if root is None:
        raise BpfError("no cgroup2 file system is mounted (sock_ops needs cgroup v2)")
    return root


def own_cgroup() -> Path:
    """This process's cgroup v2 directory."""
    root = cgroup2_root()
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return root / line[3:].strip().lstrip("/")
    raise BpfError("this process has no cgroup v2 membership (hybrid host without 0:: line)")


def bpffs_root(*, mount: bool = False) -> Path:
    """The bpffs mount; with ``mount=True`` mount one at /sys/fs/bpf if there is none."""
    root = find_mount("bpf")
    if root is not None:
        return root
    if not mount:
        raise BpfError("no bpffs is mounted (needed only to pin objects)")
    target = Path("/sys/fs/bpf")
    target.mkdir(parents=True, exist_ok=True)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", str(target).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise BpfError(f"mount bpffs on {target}: {os.strerror(err)}")
    log.info("mounted bpffs on %s", target)
    return target


def _has_caps() -> tuple[bool, str]:
    if os.geteuid() == 0:
        return True, ""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False, "cannot read capabilities"
    if eff & (1 << _CAP_SYS_ADMIN):
        return True, ""
    need = {"CAP_BPF": _CAP_BPF, "CAP_NET_ADMIN": _CAP_NET_ADMIN, "CAP_PERFMON": _CAP_PERFMON}
    missing = [name for name, bit in need.items() if not eff & (1 << bit)]
    if missing:
        return False, f"not root and missing {', '.join(missing)}"
    return True, ""


def _kernel_tuple(release: str) -> tuple[int, int]:
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


def available() -> tuple[bool, str]:
    """Whether the sockmap acceleration can run here, and if not, why (one line)."""
    if platform.system() != "Linux":
        return False, f"eBPF sockmap needs Linux (this is {platform.system()})"
    try:
        _load()
    except BpfError as e:
        return False, str(e)
    ok, why = _has_caps()
    if not ok:
        return False, why
    release = platform.release()
    if _kernel_tuple(release) < MIN_KERNEL:
        return False, f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}"
    try:
        feat = features()
    except BpfError as e:
        return False, str(e)
    if not feat.btf:
        return False, f"kernel {release} has no BTF (/sys/kernel/btf/vmlinux)"
    if not feat.rdonly_cast:
        return False, f"kernel {release} lacks the bpf_rdonly_cast kfunc"
    if find_mount("cgroup2") is None:
        return False, "no cgroup2 file system is mounted"
    notes = [f"kernel {feat.kernel}", f"bound={feat.bound}"]
    if not feat.sockmap_link:
        notes.append("legacy sockmap attach")
    if find_mount("bpf") is None:
        notes.append("bpffs not mounted (pinning will mount it)")
    if feat.bound == "none":
        return False, (
            f"kernel {release} cannot bound bytes queued by sk_msg redirects "
            "(needs 6.13+); use SockmapAccelerator(unbounded=True) to accept that"
        )
    return True, "ok: " + ", ".join(notes)


@dataclass(frozen=True)
class BpfStatus:
    """For the metrics collector: ``available`` (0/1 gauge), ``active`` accelerators."""

    available: bool
    reason: str
    active: int


def status() -> BpfStatus:
    ok, why = available()
    with _mod.lock:
        return BpfStatus(available=ok, reason=why, active=_mod.active)


def log_unavailable_once(logger: logging.Logger | None = None) -> bool:
    """Log, once per process, that ztun runs on its user-space paths and why.

    Returns whether BPF is available (the caller's flag for "user-space only")."""
    ok, why = available()
    with _mod.lock:
        if not ok and not _mod.logged_unavailable:
            _mod.logged_unavailable = True
            (logger or log).warning("eBPF acceleration off, relaying in user space: %s", why)
    return ok


# --------------------------------------------------------------------------- cgroups


class Cgroup:
    """A child cgroup v2 that ztun creates (and removes): ``with Cgroup("ztun-x") as cg``.

    Processes moved in with :meth:`add` are moved back to the parent on :meth:`remove`,
    which then removes the directory (cgroup directories can only go when empty)."""

    def __init__(self, name: str, parent: str | os.PathLike[str] | None = None) -> None:
        base = Path(parent) if parent is not None else cgroup2_root()
        if "/" in name or name in ("", ".", ".."):
            raise BpfError(f"bad cgroup name {name!r}")
        self.parent = base
        self.path = base / name
        self.path.mkdir()

    def add(self, pid: int = 0) -> None:
        (self.path / "cgroup.procs").write_text(str(pid or os.getpid()))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        if not self.path.exists():
            return
        for pid in self.pids():
            with contextlib.suppress(OSError):  # gone meanwhile
                (self.parent / "cgroup.procs").write_text(str(pid))
        self.path.rmdir()

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __fspath__(self) -> str:
        return str(self.path)


# --------------------------------------------------------------------------- accelerator


@dataclass(frozen=True)
class PairStats:
    """Bytes the kernel moved app to app for one pair; index 0 is A->B, 1 is B->A."""

    direct_bytes: tuple[int, int]
    direct_msgs: tuple[int, int]
    fallback_msgs: tuple[int, int]


def _pair_stats(st: Any) -> PairStats:
    return PairStats(
        direct_bytes=(int(st.direct_bytes[0]), int(st.direct_bytes[1])),
        direct_msgs=(int(st.direct_msgs[0]), int(st.direct_msgs[1])),
        fallback_msgs=(int(st.fallback_msgs[0]), int(st.fallback_msgs[1])),
    )


def _fd(sock: _Sock | int) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


class _MarkLease:
    """A mark no other live accelerator on this host uses, held as a flock.

    Every accelerator's sock_ops takes the marked sockets of its own mark, and a socket can
    join one sockhash only: two accelerators whose cgroups overlap (the same cgroup, or one
    inside the other) must mark differently, or one takes the other's sockets and the
    other never pairs. Slot 0 is DEFAULT_MARK (what Capture skips by default); slot k is
    ``k << 16 | DEFAULT_MARK``. The lock is an flock on ``MARK_LOCK_DIR/<k>``: it goes
    with the process (also when killed), is held per open file (a forked child does not
    take its parent's slot) and needs no daemon. Accelerators in another mount namespace
    see other lock files; they must pass distinct marks themselves."""

    def __init__(self) -> None:
        self.mark = DEFAULT_MARK
        self._fd = -1
        try:
            os.makedirs(MARK_LOCK_DIR, mode=0o700, exist_ok=True)
        except OSError as e:
            log.warning(
                "cannot create %s (%s): eBPF mark %#x unchecked", MARK_LOCK_DIR, e, DEFAULT_MARK
            )
            return
        for k in range(_MARK_SLOTS + 1):
            path = os.path.join(MARK_LOCK_DIR, str(k))
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.mark = (k << 16) | DEFAULT_MARK
            self._fd = fd
            return
        raise BpfError(f"no free eBPF mark: {_MARK_SLOTS + 1} accelerators on this host")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SockmapAccelerator:
    """ztun's sockmap programs, attached to one cgroup v2 for as long as this object lives.

    ``cgroup``: where sock_ops watches connections (apps *and* ztun must be inside it; the
    cgroup2 root covers everything). Default: this process's own cgroup.
    ``ingress_cap``: bytes a receiver may hold that were redirected to it and not yet read
    (0: the host's net.ipv4.tcp_rmem[2]; never less than its SO_RCVBUF, and only that
    under TCP memory pressure);
    beyond that senders fall back to TCP, which has backpressure.
    ``mark``: SO_MARK of ztun's outgoing sockets; 0 (default): one no other live
    accelerator of this host uses (:data:`DEFAULT_MARK` when it is free, else
    ``k << 16 | DEFAULT_MARK``), so that accelerators on overlapping cgroups never take
    each other's sockets. Within one process, prefer :func:`shared_accelerator`.
    ``pin_dir``: pin maps and links there (they then survive this process: for a restart
    that keeps connections; :func:`cleanup` removes them).

    Use as a context manager or call :meth:`close`; closing ends every pair (their bytes
    return to the relay, in order) and detaches; sockets already accelerated keep their
    hop acceleration until they close.
    """

    def __init__(
        self,
        cgroup: str | os.PathLike[str] | None = None,
        *,
        mark: int = 0,
        ingress_cap: int = 0,
        max_sockets: int = 0,
        max_pairs: int = 0,
        hop: bool = True,
        pairs: bool = True,
        unbounded: bool = False,
        legacy_attach: bool = False,
        pin_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._ffi, self._lib = _load()
        self._h: Any = self._ffi.NULL
        self.cgroup = Path(cgroup) if cgroup is not None else own_cgroup()
        self._lease: _MarkLease | None = None
        if not mark:
            self._lease = _MarkLease()
            mark = self._lease.mark
        cfg = self._ffi.new("struct ztun_bpf_config *")
        cfg.flags = (
            (0 if hop else self._lib.ZTUN_BPF_F_NO_HOP)
            | (0 if pairs else self._lib.ZTUN_BPF_F_NO_PAIRS)
            | (self._lib.ZTUN_BPF_F_UNBOUNDED if unbounded else 0)
            | (self._lib.ZTUN_BPF_F_LEGACY_ATTACH if legacy_attach else 0)
        )
        cfg.mark = mark
        cfg.ingress_cap = ingress_cap
        cfg.max_sockets = max_sockets
        cfg.max_pairs = max_pairs
        hp = self._ffi.new("ztun_bpf **")
        try:
            _check(self._lib.ztun_bpf_open(cfg, hp), "load eBPF programs")
        except BaseException:
            self._release_mark()
            raise
        self._h = hp[0]
        try:
            _check(
                self._lib.ztun_bpf_attach_cgroup(self._h, os.fsencode(self.cgroup)),
                f"attach to cgroup {self.cgroup}",
            )
            self.pin_dir = Path(pin_dir) if pin_dir is not None else None
            if self.pin_dir is not None:
                bpffs_root(mount=True)
                _check(self._lib.ztun_bpf_pin(self._h, os.fsencode(self.pin_dir)), "pin")
        except BaseException:
            self._lib.ztun_bpf_close(self._h)
            self._h = self._ffi.NULL
            self._release_mark()
            _drain_log()
            raise
        with _mod.lock:
            _mod.active += 1
        _drain_log()
        log.info(
            "eBPF sockmap attached to %s (hop=%s, pairs=%s, mark=%#x)",
            self.cgroup,
            hop,
            pairs,
            self.mark,
        )

    # -- lifecycle

    @property
    def closed(self) -> bool:
        return bool(self._h == self._ffi.NULL)

    def _handle(self) -> Any:
        if self.closed:
            raise BpfError("the accelerator is closed")
        return self._h

    def close(self) -> None:
        if self.closed:
            return
        self._lib.ztun_bpf_close(self._h)
        self._h = self._ffi.NULL
        self._release_mark()  # only now: the programs that used it are detached
        with _mod.lock:
            _mod.active -= 1
        _drain_log()
        log.info("eBPF sockmap detached from %s", self.cgroup)

    def _release_mark(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self) -> SockmapAccelerator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Only a safety net: the links would go with the process anyway.
        with contextlib.suppress(Exception):
            self.close()

    # -- ztun's sockets

    @property
    def mark(self) -> int:
        """SO_MARK ztun must set on its outgoing sockets (before connect) to be a hop."""
        return int(self._lib.ztun_bpf_mark(self._h if not self.closed else self._ffi.NULL))

    def add_listener(self, sock: _Sock | int) -> None:
        """Connections to this listening socket's port are accelerated hops."""
        _check(self._lib.ztun_bpf_add_listener(self._handle(), _fd(sock)), "add listener")

    def del_listener(self, sock: _Sock | int) -> None:
        _check(self._lib.ztun_bpf_del_listener(self._handle(), _fd(sock)), "remove listener")

    # -- pairs (normally driven by the engine in C; these are for tests and tools)

    def add_local_address(self, ip: str) -> None:
        """``ip`` belongs to a same-node app in another network namespace of this host
        (ztund: one netns per workload): ztun's marked connects to it pair as over
        loopback, and the app's accepted socket is found in its own namespace."""
        _check(
            self._lib.ztun_bpf_add_local_addr(self._handle(), str(ip).encode()),
            "add local address",
        )

    def del_local_address(self, ip: str) -> None:
        _check(
            self._lib.ztun_bpf_del_local_addr(self._handle(), str(ip).encode()),
            "remove local address",
        )

    def pair_add(
        self, ztun_a: _Sock | int, ztun_b: _Sock | int, *, keep_linger: bool = False
    ) -> int:
        pid = self._ffi.new("uint64_t *")
        flags = self._lib.ZTUN_BPF_PAIR_KEEP_LINGER if keep_linger else 0
        _check(
            self._lib.ztun_bpf_pair_add(self._handle(), _fd(ztun_a), _fd(ztun_b), flags, pid),
            "pair_add",
        )
        return int(pid[0])

    def pair_del(self, pair_id: int) -> PairStats:
        """End the pair; returns its final counters (exact: no verdict of it runs after)."""
        st = self._ffi.new("struct ztun_bpf_pair_stats *")
        _check(self._lib.ztun_bpf_pair_del(self._handle(), pair_id, st), "pair_del")
        return _pair_stats(st)

    def pair_stats(self, pair_id: int) -> PairStats:
        st = self._ffi.new("struct ztun_bpf_pair_stats *")
        _check(self._lib.ztun_bpf_pair_stats(self._handle(), pair_id, st), "pair_stats")
        return _pair_stats(st)

    def relay_busy(self, pair_id: int, direction: int, busy: bool) -> None:
        _check(
            self._lib.ztun_bpf_relay_busy(self._handle(), pair_id, direction, int(busy)),
            "relay_busy",
        )

    # -- observation

    def stats(self) -> dict[str, int]:
        n = int(self._lib.ZTUN_BPF_NSTATS)
        vals = self._ffi.new("uint64_t[]", n)
        _check(self._lib.ztun_bpf_stats(self._handle(), vals, n), "stats")
        return {
            self._ffi.string(self._lib.ztun_bpf_stat_name(i)).decode(): int(vals[i])
            for i in range(n)
        }

    def socket_count(self) -> int:
        return _check(self._lib.ztun_bpf_socket_count(self._handle()), "socket count")

    def engine_handle(self) -> tuple[int, int]:
        """(address of the ztun_bpf handle, address of its struct ztun_bpf_api) for the C
        engine. Valid until :meth:`close`, which must come after the engine stopped."""
        h = self._handle()
        return (
            int(self._ffi.cast("uintptr_t", h)),
            int(self._ffi.cast("uintptr_t", self._lib.ztun_bpf_api())),
        )


Accelerator = SockmapAccelerator


# --------------------------------------------------------------------------- shared


@dataclass
class _Shared:
    acc: SockmapAccelerator
    pid: int
    refs: int


_shared: dict[Path, _Shared] = {}
_shared_lock = threading.Lock()


def shared_accelerator(cgroup: str | os.PathLike[str] | None = None) -> SockmapAccelerator:
    """This process's accelerator on ``cgroup`` (default: its own), opened on first use and
    shared by every caller until each has called :func:`release_shared`.

    Accelerated Tunnels of one process share it: one set of programs sees all their
    sockets, so each engine's ``pair_add`` finds its own (pairs are per engine: their ids
    and busy flags are separate). A forked child never reuses its parent's: pair slots are
    allocated in process memory."""
    path = Path(cgroup) if cgroup is not None else own_cgroup()
    with _shared_lock:
        s = _shared.get(path)
        if s is not None and s.pid == os.getpid() and not s.acc.closed:
            s.refs += 1
            return s.acc
        acc = SockmapAccelerator(path)
        _shared[path] = _Shared(acc, os.getpid(), 1)
        return acc


def release_shared(acc: SockmapAccelerator) -> None:
    """Drop one reference taken with :func:`shared_accelerator`; the last one closes it.
    Call it only once the engine that used it has stopped."""
    with _shared_lock:
        s = _shared.get(acc.cgroup)
        if s is None or s.acc is not acc:
            acc.close()  # not (or no longer) the shared one: it was the caller's alone
            return
        s.refs -= 1
        if s.refs > 0:
            return
        del _shared[acc.cgroup]
    acc.close()


# --------------------------------------------------------------------------- cleanup


def cleanup(
    pin_root: str | os.PathLike[str] | None = DEFAULT_PIN_ROOT,
    *,
    cgroup_root: str | os.PathLike[str] | None = None,
    links: bool = True,
    legacy: bool = True,
) -> list[str]:
    """Remove what ztun left behind: pins under ``pin_root``, bpf_links and legacy cgroup
    attachments of programs named ``ztun_*`` (on cgroups under ``cgroup_root``, default
    everywhere — which also detaches a *running* ztun's programs). ``ztund bpf cleanup``.

    Returns one line per object removed."""
    ffi, lib = _load()
    flags = (
        (lib.ZTUN_BPF_CLEAN_PINS if pin_root is not None else 0)
        | (lib.ZTUN_BPF_CLEAN_LINKS if links else 0)
        | (lib.ZTUN_BPF_CLEAN_LEGACY if legacy else 0)
    )
    buf = ffi.new("char[]", 65536)
    rc = lib.ztun_bpf_cleanup(
        os.fsencode(pin_root) if pin_root is not None else ffi.NULL,
        os.fsencode(cgroup_root) if cgroup_root is not None else ffi.NULL,
        flags,
        buf,
        65536,
    )
    _check(rc, "cleanup")
    lines: list[str] = ffi.string(buf).decode(errors="replace").splitlines()
    for line in lines:
        log.info("bpf cleanup: %s", line)
    return lines
