# cython: language_level=3, embedsignature=True
"""Typed boundary over the C engine (internal: use :class:`ztun.Tunnel`).

This module only converts: Python values to C structs, C error codes to
:class:`ztun.errors.EngineError`, event records to dicts. It holds no policy or
identity logic, and it releases the GIL around every call that can block.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from ztun._core cimport cpolicy, cztun
from ztun._core.cztun cimport sockaddr_storage, socklen_t

import ipaddress
import socket

from ztun.errors import EngineError


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    unsigned short htons(unsigned short)
    unsigned short ntohs(unsigned short)

cdef extern from "<netinet/in.h>" nogil:
    cdef struct in_addr:
        pass
    cdef struct in6_addr:
        pass
    cdef struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    cdef struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    int AF_INET
    int AF_INET6


MODE_FORWARD = cztun.ZTUN_MODE_FORWARD
MODE_TLS_OUT = cztun.ZTUN_MODE_TLS_OUT
MODE_TLS_IN = cztun.ZTUN_MODE_TLS_IN
MODE_HBONE_IN = cztun.ZTUN_MODE_HBONE_IN
MODE_HBONE_OUT = cztun.ZTUN_MODE_HBONE_OUT
MODE_SOCKS5 = cztun.ZTUN_MODE_SOCKS5
LISTENER_POLICY = cztun.ZTUN_LISTENER_POLICY
LISTENER_ORIGINAL_DST = cztun.ZTUN_LISTENER_ORIGINAL_DST
LISTENER_VIRTUAL = cztun.ZTUN_LISTENER_VIRTUAL
LISTENER_DELIVER = cztun.ZTUN_LISTENER_DELIVER
TLS_CHACHA20 = cztun.ZTUN_TLS_CHACHA20
TLS_RESUMPTION = cztun.ZTUN_TLS_RESUMPTION
TLS_ANY_TRUST_DOMAIN = cztun.ZTUN_TLS_ANY_TRUST_DOMAIN
EV_CONN_OPEN = cztun.ZTUN_EV_CONN_OPEN
EV_CONN_CLOSE = cztun.ZTUN_EV_CONN_CLOSE
EV_LOG = cztun.ZTUN_EV_LOG
EV_CONNECT_DONE = cztun.ZTUN_EV_CONNECT_DONE
EVMASK_OPEN = cztun.ZTUN_EVMASK_OPEN
EVMASK_CLOSE = cztun.ZTUN_EVMASK_CLOSE
EVMASK_LOG = cztun.ZTUN_EVMASK_LOG
EVPOL_DRY_RUN = cztun.ZTUN_EVPOL_DRY_RUN
EVPOL_DRY_RUN_DENY = cztun.ZTUN_EVPOL_DRY_RUN_DENY
EVPOL_RECHECKED = cztun.ZTUN_EVPOL_RECHECKED

_EV_NAMES = {
    cztun.ZTUN_EV_CONN_OPEN: "open",
    cztun.ZTUN_EV_CONN_CLOSE: "close",
    cztun.ZTUN_EV_CONNECT_DONE: "connect_done",
    cztun.ZTUN_EV_ACCEPT: "accept",
}

TLS_REASONS = tuple(
    cztun.ztun_tls_reason_name(i).decode() for i in range(cztun.ZTUN_TLSR__COUNT)
)

CLOSE_REASONS = tuple(
    cztun.ztun_close_reason_name(i).decode() for i in range(cztun.ZTUN_CLOSE__COUNT)
)


def core_version() -> str:
    """Version string compiled into the C core."""
    return cztun.ztun_version().decode()


def strerror(int code) -> str:
    return cztun.ztun_strerror(code).decode()


cdef int _check(int rc, str what) except -1:
    if rc < 0:
        raise EngineError(rc, f"{what}: {cztun.ztun_strerror(rc).decode()}")
    return 0


cdef socklen_t _to_sockaddr(object addr, sockaddr_storage *ss, str argname) except 0:
    """(host, port) -> sockaddr; host must be an IP literal (no DNS on this path)."""
    cdef sockaddr_in *sin
    cdef sockaddr_in6 *sin6
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError, KeyError):
        raise ValueError(f"{argname}: expected a (host, port) tuple, got {addr!r}") from None
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{argname}: port must be an integer in 0..65535, got {port!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{argname}: host must be an IP address literal, got {host!r}") from None
    memset(ss, 0, sizeof(sockaddr_storage))
    packed = ip.packed
    if ip.version == 4:
        sin = <sockaddr_in *>ss
        sin.sin_family = AF_INET
        sin.sin_port = htons(port)
        memcpy(&sin.sin_addr, <const char *>packed, 4)
        return sizeof(sockaddr_in)
    sin6 = <sockaddr_in6 *>ss
    sin6.sin6_family = AF_INET6
    sin6.sin6_port = htons(port)
    memcpy(&sin6.sin6_addr, <const char *>packed, 16)
    if len(addr) >= 4:
        sin6.sin6_scope_id = addr[3]
    return sizeof(sockaddr_in6)


cdef object _from_sockaddr(const sockaddr_storage *ss):
    cdef char buf[64]
    cdef const sockaddr_in *sin
    cdef const sockaddr_in6 *sin6
    if ss.ss_family == AF_INET:
        sin = <const sockaddr_in *>ss
        inet_ntop(AF_INET, &sin.sin_addr, buf, sizeof(buf))
        return (buf.decode(), ntohs(sin.sin_port))
    if ss.ss_family == AF_INET6:
        sin6 = <const sockaddr_in6 *>ss
        inet_ntop(AF_INET6, &sin6.sin6_addr, buf, sizeof(buf))
        return (buf.decode(), ntohs(sin6.sin6_port))
    return None


cdef class TlsContext:
    """An immutable TLS 1.3 context for one identity (certificate chain, key, trust)."""

    cdef cztun.ztun_tls_ctx *_ctx

    def __cinit__(self):
        self._ctx = NULL

    def __init__(self, bytes chain_pem, bytes key_pem, dict trust, uint32_t flags=0,
                 uint32_t session_lifetime_s=0):
        cdef cztun.ztun_tls_config cfg
        cdef char err[512]
        cdef int rc, n = len(trust), i
        cdef const char **tds = NULL
        cdef const char **pems = NULL
        cdef size_t *lens = NULL
        if n == 0:
            raise ValueError("trust: at least one trust domain with its roots is required")
        keep = [(td.encode() if isinstance(td, str) else bytes(td), bytes(pem))
                for td, pem in trust.items()]
        tds = <const char **>malloc(n * sizeof(char *))
        pems = <const char **>malloc(n * sizeof(char *))
        lens = <size_t *>malloc(n * sizeof(size_t))
        try:
            if tds == NULL or pems == NULL or lens == NULL:
                raise MemoryError()
            for i in range(n):
                tds[i] = keep[i][0]
                pems[i] = keep[i][1]
                lens[i] = len(keep[i][1])
            memset(&cfg, 0, sizeof(cfg))
            cfg.chain_pem = chain_pem
            cfg.chain_len = len(chain_pem)
            cfg.key_pem = key_pem
            cfg.key_len = len(key_pem)
            cfg.ntrust = n
            cfg.trust_domains = tds
            cfg.trust_pems = pems
            cfg.trust_lens = lens
            cfg.flags = flags
            cfg.session_lifetime_s = session_lifetime_s
            err[0] = 0
            with nogil:
                rc = cztun.ztun_tls_ctx_new(&cfg, &self._ctx, err, sizeof(err))
            if rc < 0:
                detail = err.decode(errors="replace") or cztun.ztun_strerror(rc).decode()
                raise EngineError(rc, f"TLS context: {detail}")
        finally:
            free(tds)
            free(pems)
            free(lens)

    def __dealloc__(self):
        if self._ctx != NULL:
            cztun.ztun_tls_ctx_free(self._ctx)
            self._ctx = NULL

    @property
    def identity(self) -> str:
        return cztun.ztun_tls_ctx_identity(self._ctx).decode()


cdef dict _stats_dict(const cztun.ztun_stats *s):
    reasons = {}
    for i in range(cztun.ZTUN_CLOSE__COUNT):
        reasons[CLOSE_REASONS[i]] = s.close_reason[i]
    return {
        "bytes_down_up": s.bytes_down_up,
        "bytes_up_down": s.bytes_up_down,
        "connections_opened": s.conns_opened,
        "connections_closed": s.conns_closed,
        "connections_active": s.conns_active,
        "connections_failed": s.conns_failed,
        "close_reasons": reasons,
        "handshakes": s.handshakes,
        "handshakes_resumed": s.handshakes_resumed,
        "policy_allowed": s.policy_allowed,
        "policy_denied": s.policy_denied,
        "policy_dry_run": s.policy_dry_run,
        "events_dropped": s.events_dropped,
        "buffers_in_use": s.buffers_in_use,
        "buffer_bytes": s.buffer_bytes,
        "hbone_status": {
            200: s.hbone_status[0], 400: s.hbone_status[1], 401: s.hbone_status[2],
            503: s.hbone_status[3], "other": s.hbone_status[4],
        },
        "hbone_protocol_errors": s.hbone_protocol_errors,
        "bpf_pairs": s.bpf_pairs,
        "bpf_direct_bytes": s.bpf_direct_bytes,
        "tls_failures": {
            TLS_REASONS[i]: s.tls_failures[i] for i in range(1, cztun.ZTUN_TLSR__COUNT)
        },
        "hbone_connections_opened": s.h2_opened,
        "hbone_connections_closed": s.h2_closed,
        "hbone_connections_active": s.h2_active,
        "hbone_close_reasons": {
            CLOSE_REASONS[i]: s.h2_close_reason[i] for i in range(cztun.ZTUN_CLOSE__COUNT)
        },
    }


cdef object _parse_event(const char *p):
    cdef const cztun.ztun_event_hdr *h = <const cztun.ztun_event_hdr *>p
    cdef const cztun.ztun_event_conn *c
    cdef const cztun.ztun_event_log *lg
    cdef const char *tail
    if h.type in (cztun.ZTUN_EV_CONN_OPEN, cztun.ZTUN_EV_CONN_CLOSE, cztun.ZTUN_EV_CONNECT_DONE,
                  cztun.ZTUN_EV_ACCEPT):
        c = <const cztun.ztun_event_conn *>p
        tail = p + sizeof(cztun.ztun_event_conn)
        off = 0
        strs = []
        for n in (c.peer_id_len, c.detail_len, c.local_id_len, c.trace_len, c.baggage_len):
            strs.append(tail[off:off + n].decode(errors="replace") if n else "")
            off += n
        peer, detail, local, trace, baggage = strs
        return {
            "type": _EV_NAMES[h.type],
            "fd": c.fd,
            "worker": h.worker,
            "conn_id": c.conn_id,
            "listener_id": c.listener_id,
            "reason": CLOSE_REASONS[c.reason] if c.reason < len(CLOSE_REASONS) else "unknown",
            "mode": c.mode,
            "policy": c.policy,
            "policy_rule": c.policy_rule,
            "policy_gen": c.policy_gen,
            "policy_reason": c.policy_reason,
            "policy_flags": c.policy_flags,
            "dry_run_policy": c.dry_run_policy,
            "dry_run_rule": c.dry_run_rule,
            "http_status": c.http_status,
            "errno": c.sys_errno,
            "start_ns": c.start_ns,
            "duration_ns": c.duration_ns,
            "bytes_down_up": c.bytes_down_up,
            "bytes_up_down": c.bytes_up_down,
            "src": _from_sockaddr(&c.src),
            "dst": _from_sockaddr(&c.dst),
            "target": _from_sockaddr(&c.target),
            "request_id": c.request_id,
            "tls_reason": TLS_REASONS[c.tls_reason] if c.tls_reason else None,
            "trace": trace or None,
            "baggage": baggage or None,
            "peer_id": peer or None,
            "local_id": local or None,
            "detail": detail or None,
        }
    if h.type == cztun.ZTUN_EV_LOG:
        lg = <const cztun.ztun_event_log *>p
        tail = p + sizeof(cztun.ztun_event_log)
        return {
            "type": "log",
            "worker": h.worker,
            "level": lg.level,
            "message": tail[:lg.msg_len].decode(errors="replace"),
        }
    return {"type": "unknown", "code": h.type}


cdef class Engine:
    """One C engine: worker threads, listeners, counters and the event ring."""

    cdef cztun.ztun_engine *_e
    cdef object _tls_keep   # listener id -> TlsContext, so contexts outlive their use
    cdef bytearray _evbuf
    cdef bint _closed

    def __cinit__(self):
        self._e = NULL
        self._closed = False

    def __init__(self, int workers=0, uint32_t connect_timeout_ms=0,
                 uint32_t handshake_timeout_ms=0, uint32_t idle_timeout_ms=0,
                 uint32_t event_ring_bytes=0, uint32_t buf_small=0, uint32_t buf_large=0,
                 uint32_t events=cztun.ZTUN_EVMASK_ALL, uint32_t splice_pipe=0,
                 uint32_t spin_us=0):
        cdef cztun.ztun_engine_config cfg
        cdef int rc
        if workers < 0 or workers > 256:
            raise ValueError(f"workers: must be 0 (one per CPU) to 256, got {workers}")
        memset(&cfg, 0, sizeof(cfg))
        cfg.workers = workers
        cfg.connect_timeout_ms = connect_timeout_ms
        cfg.handshake_timeout_ms = handshake_timeout_ms
        cfg.idle_timeout_ms = idle_timeout_ms
        cfg.event_ring_bytes = event_ring_bytes
        cfg.buf_small = buf_small
        cfg.buf_large = buf_large
        cfg.events = events
        cfg.splice_pipe = splice_pipe
        cfg.spin_us = spin_us
        with nogil:
            rc = cztun.ztun_engine_new(&cfg, &self._e)
        _check(rc, "engine")
        self._tls_keep = {}
        self._evbuf = bytearray(256 * 1024)

    def __dealloc__(self):
        if self._e != NULL:
            with nogil:
                cztun.ztun_engine_free(self._e)
            self._e = NULL

    cdef int _alive(self) except -1:
        if self._e == NULL or self._closed:
            raise EngineError(-10008, "engine is closed")
        return 0

    @property
    def workers(self) -> int:
        self._alive()
        return cztun.ztun_engine_workers(self._e)

    @property
    def event_fd(self) -> int:
        self._alive()
        return cztun.ztun_engine_event_fd(self._e)

    def start(self) -> None:
        cdef int rc
        self._alive()
        with nogil:
            rc = cztun.ztun_engine_start(self._e)
        _check(rc, "start")

    def stop(self, uint32_t drain_ms=0) -> None:
        if self._e == NULL:
            return
        with nogil:
            cztun.ztun_engine_stop(self._e, drain_ms)

    def close(self) -> None:
        """Stop the workers and close the listening sockets. The memory is released
        when the object goes away, so a call racing with close() on another thread
        fails cleanly instead of touching freed memory."""
        if self._e == NULL or self._closed:
            return
        self._closed = True
        with nogil:
            cztun.ztun_engine_stop(self._e, 0)
        self._tls_keep = {}

    def add_listener(self, int mode, object bind=None, object upstream=None, *,
                     TlsContext tls=None, int fd=-1, object expect=(), uint32_t flags=0,
                     int32_t workload=-1, object target=None, int backlog=0,
                     object baggage=None, object workload_ips=(), object workload_key=None):
        """Open a listener; returns (listener id, bound (host, port)).

        ``workload_key`` ("namespace/name"): the destination workload policy judges this
        listener's connections as, looked up again in every table set later.
        """
        cdef cztun.ztun_listener_spec spec
        cdef uint32_t lid = 0
        cdef sockaddr_storage bound
        cdef socklen_t bound_len = sizeof(sockaddr_storage)
        cdef int rc, i, n
        cdef const char **ids = NULL
        cdef bytes bag
        cdef bytes wkey
        cdef bytes ips16 = b"".join(
            ipaddress.IPv6Address(f"::ffff:{ip}").packed if ipaddress.ip_address(ip).version == 4
            else ipaddress.ip_address(ip).packed for ip in workload_ips)
        self._alive()
        memset(&spec, 0, sizeof(spec))
        spec.mode = mode
        spec.fd = fd
        spec.backlog = backlog
        spec.workload = workload
        spec.flags = flags
        if fd < 0 and not (flags & cztun.ZTUN_LISTENER_VIRTUAL):
            if bind is None:
                raise ValueError("listen: an address or a listening socket is required")
            spec.bind_len = _to_sockaddr(bind, &spec.bind, "listen")
        if upstream is not None:
            spec.upstream_len = _to_sockaddr(upstream, &spec.upstream, "to")
        if target is not None:
            spec.target_len = _to_sockaddr(target, &spec.target, "target")
        if tls is not None:
            spec.tls = tls._ctx
        encoded = [s.encode() for s in expect]
        n = len(encoded)
        if n:
            ids = <const char **>malloc(n * sizeof(char *))
            if ids == NULL:
                raise MemoryError()
            for i in range(n):
                ids[i] = encoded[i]
        spec.expect = ids
        spec.nexpect = n
        if baggage is not None:
            bag = baggage.encode()
            spec.baggage = bag
        if workload_key is not None:
            wkey = workload_key.encode()
            if b"\0" in wkey:
                raise ValueError("workload_key: must not contain NUL")
            spec.workload_key = wkey
        if ips16:
            spec.workload_ips = <const unsigned char (*)[16]><const char *>ips16
            spec.nworkload_ips = len(ips16) // 16
        try:
            with nogil:
                rc = cztun.ztun_engine_add_listener(self._e, &spec, &lid, &bound, &bound_len)
        finally:
            free(ids)
        if rc < 0:
            where = "listen" if rc > -4096 else "listener"
            raise EngineError(rc, f"{where} {bind!r}: {cztun.ztun_strerror(rc).decode()}")
        if tls is not None:
            self._tls_keep[lid] = tls
        return lid, _from_sockaddr(&bound)

    def remove_listener(self, uint32_t listener_id) -> None:
        cdef int rc
        self._alive()
        with nogil:
            rc = cztun.ztun_engine_remove_listener(self._e, listener_id)
        _check(rc, f"listener {listener_id}")
        self._tls_keep.pop(listener_id, None)

    def set_listener_tls(self, uint32_t listener_id, TlsContext tls not None) -> None:
        cdef int rc
        self._alive()
        with nogil:
            rc = cztun.ztun_engine_set_listener_tls(self._e, listener_id, tls._ctx)
        _check(rc, f"listener {listener_id}")
        self._tls_keep[listener_id] = tls

    def adopt(self, uint32_t listener_id, int fd, object target=None,
              uint64_t request_id=0) -> None:
        """Hand a connected stream socket (the engine owns fd afterwards) to a virtual
        listener; a "connect_done" event with request_id reports the outcome."""
        cdef sockaddr_storage ss
        cdef sockaddr_storage *ptarget = NULL
        cdef int rc
        self._alive()
        if target is not None:
            _to_sockaddr(target, &ss, "target")
            ptarget = &ss
        with nogil:
            rc = cztun.ztun_engine_adopt(self._e, listener_id, fd, ptarget, request_id)
        _check(rc, f"listener {listener_id}")

    def set_directory(self, entries) -> None:
        """Replace the directory of mesh destinations: (ip, spiffe_id or None, via or None)."""
        cdef list rows = list(entries)
        cdef int n = len(rows), i, rc
        cdef cztun.ztun_dir_entry *v = NULL
        self._alive()
        keep = []
        v = <cztun.ztun_dir_entry *>malloc((n if n else 1) * sizeof(cztun.ztun_dir_entry))
        if v == NULL:
            raise MemoryError()
        try:
            memset(v, 0, (n if n else 1) * sizeof(cztun.ztun_dir_entry))
            for i in range(n):
                ip, ident, via = rows[i][:3]
                if len(rows[i]) > 3 and rows[i][3]:
                    v[i].flags = cztun.ZTUN_DIR_LOCAL
                addr = ipaddress.ip_address(ip)
                packed = (ipaddress.IPv6Address(f"::ffff:{addr}").packed if addr.version == 4
                          else addr.packed)
                memcpy(v[i].ip, <const char *>packed, 16)
                if ident is not None:
                    b = ident.encode()
                    keep.append(b)
                    v[i].identity = b
                if via is not None:
                    _to_sockaddr(via, &v[i].via, "via")
            with nogil:
                rc = cztun.ztun_engine_set_directory(self._e, v, n)
        finally:
            free(v)
        _check(rc, "directory")

    def set_bpf(self, uintptr_t handle, uintptr_t api) -> None:
        """Hand the eBPF accelerator (ztun.bpf) to the engine, before start(); the
        accelerator must stay open until the engine is closed."""
        cdef int rc
        self._alive()
        rc = cztun.ztun_engine_set_bpf(self._e, <void *>handle, <const void *>api)
        _check(rc, "bpf")

    def tls_listeners(self) -> list:
        """Ids of the listeners that hold a TLS context (to swap on rotation)."""
        return list(self._tls_keep)

    def pause_accept(self) -> None:
        cdef int rc
        self._alive()
        with nogil:
            rc = cztun.ztun_engine_pause_accept(self._e)
        _check(rc, "pause")

    def set_policy(self, object blob) -> int:
        """Swap in a compiled policy table (``PolicySet.compile()`` bytes; None removes
        policy). Returns the table's generation (named in connection events). The blob is
        validated first: a malformed one raises and changes nothing."""
        cdef const unsigned char[::1] view
        cdef const void *ptr = NULL
        cdef size_t n = 0
        cdef cpolicy.ztun_policy *t = NULL
        cdef uint32_t gen = 0
        cdef int rc
        self._alive()
        if blob is not None:
            view = blob
            n = view.shape[0]
            if n:
                ptr = &view[0]
            with nogil:
                rc = cpolicy.ztun_policy_load(ptr, n, &t)
            _check(rc, "policy table")
        with nogil:
            rc = cztun.ztun_engine_swap_policy(self._e, <cztun.ztun_policy *>t, &gen)
        _check(rc, "set policy")
        return gen

    def policy_counters(self) -> tuple:
        """``(generation, [(allowed, denied, dry_run), ...])`` of the table in force:
        entry 0 is the defaults, entry 1 + i policy i (empty without a table)."""
        cdef uint32_t count = 0, gen = 0, n
        cdef cztun.ztun_policy_counters *buf = NULL
        self._alive()
        while True:
            with nogil:
                cztun.ztun_engine_policy_counters(self._e, NULL, 0, &count, &gen)
            if count == 0:
                return gen, []
            n = count
            buf = <cztun.ztun_policy_counters *>malloc(n * sizeof(cztun.ztun_policy_counters))
            if buf == NULL:
                raise MemoryError()
            try:
                with nogil:
                    cztun.ztun_engine_policy_counters(self._e, buf, n, &count, &gen)
                if count == n:  # else a swap changed the table size meanwhile: again
                    return gen, [(buf[i].allowed, buf[i].denied, buf[i].dry_run)
                                 for i in range(n)]
            finally:
                free(buf)

    def stats(self) -> dict:
        cdef cztun.ztun_stats s
        self._alive()
        with nogil:
            cztun.ztun_engine_stats(self._e, &s)
        return _stats_dict(&s)

    def connections(self) -> list:
        """Live connections: (conn_id, listener_id, mode, relaying, bytes_down_up,
        bytes_up_down, start_ns) tuples, read from every worker."""
        cdef size_t cap = 1024, n = 0
        cdef cztun.ztun_conn_info *v = NULL
        cdef int rc
        self._alive()
        while True:
            v = <cztun.ztun_conn_info *>malloc(cap * sizeof(cztun.ztun_conn_info))
            if v == NULL:
                raise MemoryError()
            with nogil:
                rc = cztun.ztun_engine_connections(self._e, v, cap, &n)
            if rc < 0 or n <= cap:
                break
            free(v)
            cap = n + n // 4 + 16
        try:
            _check(rc, "connections")
            return [(v[i].conn_id, v[i].listener_id, v[i].mode, bool(v[i].state),
                     v[i].bytes_down_up, v[i].bytes_up_down, v[i].start_ns) for i in range(n)]
        finally:
            free(v)

    def read_events(self) -> list:
        """Drain pending events (a batch); empty list when none."""
        cdef size_t used = 0, off = 0
        cdef size_t cap = len(self._evbuf)
        cdef char *buf
        cdef const cztun.ztun_event_hdr *h
        self._alive()
        buf = self._evbuf
        with nogil:
            cztun.ztun_engine_read_events(self._e, buf, cap, &used)
        out = []
        while off < used:
            h = <const cztun.ztun_event_hdr *>(buf + off)
            out.append(_parse_event(buf + off))
            off += h.len
        return out

    def set_events(self, uint32_t mask) -> None:
        """Which events the engine emits from now on (EVMASK_* bits)."""
        self._alive()
        cztun.ztun_engine_set_events(self._e, mask)

    def arm_events(self) -> bool:
        """Arm the event fd; True if events are already pending (drain again)."""
        self._alive()
        return cztun.ztun_engine_arm_events(self._e) != 0
