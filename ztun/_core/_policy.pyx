# cython: language_level=3, embedsignature=True
"""Typed boundary over the compiled policy evaluator (internal).

``CompiledPolicy(blob)`` loads what ``ztun.policy.PolicySet.compile()`` produced and
evaluates connections in C; tests use it as the differential oracle against the Python
model, the benchmark times it, the engine uses the same C table directly.
"""

from libc.stdint cimport uint8_t, uint16_t
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from ztun._core cimport cpolicy, cztun

import ipaddress

from ztun.errors import EngineError
from ztun.policy import Reason

_REASONS = {
    1: Reason.DENIED_BY_POLICY,
    2: Reason.ALLOWED_BY_POLICY,
    3: Reason.ALLOWED_NO_ALLOW_POLICY,
    4: Reason.DENIED_NO_MATCH,
}
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


cdef bytes _ip16(object ip):
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip)
    if ip.version == 4:
        return _V4_MAPPED + ip.packed
    return ip.packed


cdef void _check(int rc) except *:
    if rc < 0:
        raise EngineError(rc, cztun.ztun_strerror(rc).decode())


cdef class Verdict:
    """The C evaluator's answer; ``policy`` names are ``namespace/name`` (None: a default)."""

    cdef readonly bint allowed
    cdef readonly object reason
    cdef readonly object policy
    cdef readonly object rule
    cdef readonly int policy_index
    cdef readonly int dry_run_evaluated
    cdef readonly int dry_run_matched
    cdef readonly bint dry_run_allowed
    cdef readonly object dry_run_policy
    cdef readonly object dry_run_rule

    def __repr__(self):
        return (
            f"Verdict(allowed={self.allowed}, reason={self.reason}, policy={self.policy!r}, "
            f"rule={self.rule}, dry_run_evaluated={self.dry_run_evaluated}, "
            f"dry_run_matched={self.dry_run_matched}, dry_run_allowed={self.dry_run_allowed}, "
            f"dry_run_policy={self.dry_run_policy!r}, dry_run_rule={self.dry_run_rule})"
        )


cdef class CompiledPolicy:
    """A loaded policy table (immutable; counters aside)."""

    cdef cpolicy.ztun_policy *_t
    cdef readonly tuple policy_names
    cdef readonly tuple workload_names
    cdef dict _workload_index

    def __cinit__(self, blob):
        cdef const uint8_t[::1] view = blob
        cdef const void *ptr = NULL
        cdef size_t n = view.shape[0]
        cdef int rc
        cdef cpolicy.ztun_policy *t = NULL
        if n:
            ptr = &view[0]
        with nogil:
            rc = cpolicy.ztun_policy_load(ptr, n, &t)
        _check(rc)
        self._t = t
        self.policy_names = tuple(
            cpolicy.ztun_policy_name(t, i).decode("utf-8", "backslashreplace")
            for i in range(cpolicy.ztun_policy_count(t))
        )
        self.workload_names = tuple(
            cpolicy.ztun_policy_workload_name(t, i).decode("utf-8", "backslashreplace")
            for i in range(cpolicy.ztun_policy_workload_count(t))
        )
        # the last workload is the default one; it is reached with -1, never by name
        self._workload_index = {
            name: i for i, name in enumerate(self.workload_names[:-1])
        }

    def __dealloc__(self):
        if self._t is not NULL:
            cpolicy.ztun_policy_free(self._t)
            self._t = NULL

    cdef int _conn(self, object facts, cpolicy.ztun_policy_conn *c, bint count) except -1:
        memset(c, 0, sizeof(c[0]))
        src = _ip16(facts.src_ip)
        dst = _ip16(facts.dst_ip)
        memcpy(c.src_ip, <const char *>src, 16)
        memcpy(c.dst_ip, <const char *>dst, 16)
        c.dst_port = <uint16_t>facts.dst_port
        c.flags = 0 if count else cpolicy.ZTUN_POLICY_F_NOCOUNT
        wl = facts.workload
        if wl is None:
            c.dst_workload = cpolicy.ZTUN_POLICY_WORKLOAD_DEFAULT
        else:
            c.dst_workload = self._workload_index.get(wl.key, cpolicy.ZTUN_POLICY_WORKLOAD_DEFAULT)
        return 0

    def evaluate(self, facts, *, bint count=False):
        """Decide ``facts`` (a ztun.policy.ConnectionFacts) in C. ``count``: bump counters."""
        cdef cpolicy.ztun_policy_conn c
        cdef cpolicy.ztun_policy_verdict v
        cdef int rc
        cdef bytes peer = None
        self._conn(facts, &c, count)
        if facts.peer_id is not None:
            peer = facts.peer_id.encode("utf-8", "surrogatepass")
            c.peer_id = peer
            c.peer_id_len = len(peer)
        with nogil:
            rc = cpolicy.ztun_policy_eval(self._t, &c, &v)
        _check(rc)
        cdef Verdict out = Verdict.__new__(Verdict)
        out.allowed = v.allow != 0
        out.reason = _REASONS[v.reason]
        out.policy_index = v.policy
        out.policy = self.policy_names[v.policy] if v.policy >= 0 else None
        out.rule = v.rule if v.rule >= 0 else None
        out.dry_run_evaluated = v.dry_run_evaluated
        out.dry_run_matched = v.dry_run_matched
        out.dry_run_allowed = v.dry_run_allow != 0
        out.dry_run_policy = self.policy_names[v.dry_run_policy] if v.dry_run_policy >= 0 else None
        out.dry_run_rule = v.dry_run_rule if v.dry_run_rule >= 0 else None
        return out

    def find_workload(self, ip):
        """``namespace/name`` of the workload that owns ``ip``, or None."""
        b = _ip16(ip)
        cdef const uint8_t *p = b
        cdef int rc
        with nogil:
            rc = cpolicy.ztun_policy_find_workload(self._t, p)
        if rc == cpolicy.ZTUN_ENOTFOUND:
            return None
        _check(rc)
        return self.workload_names[rc]

    def workload_index(self, name):
        """Index of workload ``"namespace/name"`` in this table (C lookup), or None."""
        key = name.encode("utf-8", "surrogatepass")
        cdef int rc = cpolicy.ztun_policy_find_workload_by_name(self._t, key, len(key))
        if rc == cpolicy.ZTUN_ENOTFOUND:
            return None
        _check(rc)
        return rc

    def counters(self):
        """``{"namespace/name": (allowed, denied, dry_run)}`` for every policy."""
        cdef cpolicy.ztun_policy_counters_t c
        out = {}
        for i, name in enumerate(self.policy_names):
            _check(cpolicy.ztun_policy_counters(self._t, i, &c))
            out[name] = (c.allowed, c.denied, c.dry_run)
        return out

    def default_counters(self):
        """``(allowed, denied)`` decided by the defaults (no policy named)."""
        cdef cpolicy.ztun_policy_counters_t c
        _check(cpolicy.ztun_policy_counters(self._t, -1, &c))
        return (c.allowed, c.denied)

    def carry_counters_from(self, CompiledPolicy old not None):
        """Add ``old``'s counters to the same-named policies here (as on a table swap)."""
        cpolicy.ztun_policy_counters_carry(self._t, old._t)

    def bench(self, facts, Py_ssize_t iterations, *, bint count=True):
        """Evaluate ``facts`` ``iterations`` times in C without the GIL; ns per evaluation."""
        cdef cpolicy.ztun_policy_conn c
        cdef cpolicy.ztun_policy_verdict v
        cdef timespec t0, t1
        cdef Py_ssize_t _i
        cdef int rc = 0
        cdef bytes peer = None
        if iterations <= 0:
            raise ValueError("iterations must be positive")
        self._conn(facts, &c, count)
        if facts.peer_id is not None:
            peer = facts.peer_id.encode("utf-8", "surrogatepass")
            c.peer_id = peer
            c.peer_id_len = len(peer)
        with nogil:
            clock_gettime(CLOCK_MONOTONIC, &t0)
            for _i in range(iterations):
                rc |= cpolicy.ztun_policy_eval(self._t, &c, &v)
            clock_gettime(CLOCK_MONOTONIC, &t1)
        _check(rc)
        elapsed = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)
        return elapsed / iterations
