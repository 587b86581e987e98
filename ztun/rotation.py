"""Certificate rotation: a sans-I/O schedule, and a thread that drives it.

Rules (ztunnel's SecretManager, Istio's defaults):

1. Renew at half of the certificate's lifetime (:attr:`~ztun.identity.Svid.renew_at`).
2. On failure retry with exponential backoff, 1 s doubling, capped at 150 s, and keep
   serving the current certificate while it is valid.
3. A certificate from the source that is not valid now is a failure, not an update.
   One that is valid but already past its renewal point (files nobody renewed yet) is
   used, and the next look is backed off like a failure so a stale source is not polled
   in a loop.
4. A certificate that reaches notAfter without a replacement makes its identity
   ``expired``; that is reported once (log line + ``on_expired``) and retries go on.

:class:`RotationSchedule` holds rules 1-4 and nothing else: time is passed in, it does no
I/O, so it is unit-tested with a fake clock. :class:`IdentityManager` runs it in a daemon
thread against an :class:`~ztun.identity.IdentitySource`.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import enum
import logging
import os
import select
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType, TracebackType

from ztun import _x509
from ztun.errors import IdentityError
from ztun.identity import IdentitySource, SpiffeId, Svid, TrustBundle

__all__ = [
    "INITIAL_BACKOFF",
    "MAX_BACKOFF",
    "IdentityManager",
    "IdentityState",
    "IdentityStatus",
    "RotationSchedule",
]

log = logging.getLogger(__name__)

INITIAL_BACKOFF = dt.timedelta(seconds=1)
MAX_BACKOFF = dt.timedelta(seconds=150)  # ztunnel's cap: retry at least every 2.5 min
BACKOFF_MULTIPLIER = 2


class IdentityState(enum.StrEnum):
    PENDING = "pending"  # no certificate yet, first fetch not attempted
    VALID = "valid"  # certificate valid, renewal not due
    RENEWING = "renewing"  # renewal due or failing; the current certificate is still valid
    EXPIRED = "expired"  # the certificate expired and nothing replaced it
    UNAVAILABLE = "unavailable"  # never obtained a certificate; retrying


@dataclass(frozen=True)
class IdentityStatus:
    """A snapshot of one identity, for /healthz and config_dump."""

    spiffe_id: SpiffeId
    state: IdentityState
    serial: str | None
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    renew_at: dt.datetime | None
    next_attempt: dt.datetime
    failures: int
    last_error: str | None

    def to_dict(self) -> dict[str, str | int | None]:
        """JSON-ready: times as ISO 8601 UTC strings."""

        def iso(t: dt.datetime | None) -> str | None:
            return None if t is None else t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        return {
            "spiffe_id": str(self.spiffe_id),
            "state": self.state.value,
            "serial": self.serial,
            "not_before": iso(self.not_before),
            "not_after": iso(self.not_after),
            "renew_at": iso(self.renew_at),
            "next_attempt": iso(self.next_attempt),
            "failures": self.failures,
            "last_error": self.last_error,
        }


class _Entry:
    __slots__ = ("expiry_reported", "failures", "last_error", "next_attempt", "svid")

    def __init__(self, now: dt.datetime) -> None:
        self.svid: Svid | None = None
        self.next_attempt = now
        self.failures = 0
        self.last_error: str | None = None
        self.expiry_reported = False


class RotationSchedule:
    """When to fetch which identity, and what state each is in. Sans-I/O: every method
    takes ``now`` (an aware UTC datetime); nothing here sleeps, reads files or logs.
    """

    def __init__(
        self,
        ids: Iterable[SpiffeId | str],
        now: dt.datetime,
        *,
        initial_backoff: dt.timedelta = INITIAL_BACKOFF,
        max_backoff: dt.timedelta = MAX_BACKOFF,
    ) -> None:
        if initial_backoff <= dt.timedelta(0) or max_backoff < initial_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._entries: dict[SpiffeId, _Entry] = {}
        for i in ids:
            self._entries.setdefault(SpiffeId.parse(i), _Entry(now))
        if not self._entries:
            raise ValueError("RotationSchedule needs at least one SPIFFE ID")

    @property
    def ids(self) -> list[SpiffeId]:
        return list(self._entries)

    def _entry(self, spiffe_id: SpiffeId) -> _Entry:
        try:
            return self._entries[spiffe_id]
        except KeyError:
            raise IdentityError(f"{spiffe_id} is not managed here") from None

    def backoff(self, failures: int) -> dt.timedelta:
        """Delay after ``failures`` consecutive failures (1 -> initial, doubling, capped)."""
        if failures <= 0:
            return dt.timedelta(0)
        # Stop multiplying once past the cap, so huge failure counts cannot overflow.
        delay = self.initial_backoff
        for _ in range(failures - 1):
            delay *= BACKOFF_MULTIPLIER
            if delay >= self.max_backoff:
                return self.max_backoff
        return min(delay, self.max_backoff)

    # -- inputs ---------------------------------------------------------------------------

    def due(self, now: dt.datetime) -> list[SpiffeId]:
        """Identities whose fetch is due at ``now``."""
        return [sid for sid, e in self._entries.items() if e.next_attempt <= now]

    def accepts(self, spiffe_id: SpiffeId, svid: Svid, now: dt.datetime) -> str | None:
        """Why ``svid`` cannot replace the current certificate, or None if it can."""
        if svid.spiffe_id != spiffe_id:
            return f"the source returned a certificate for {svid.spiffe_id}, not {spiffe_id}"
        if not svid.is_valid_at(now):
            return (
                f"the source returned a certificate valid only from {svid.not_before} "
                f"to {svid.not_after} (serial {svid.serial})"
            )
        return None

    def succeeded(self, spiffe_id: SpiffeId, svid: Svid, now: dt.datetime) -> bool:
        """Record a fetched certificate; True when it differs from the current one.

        Raises ValueError when :meth:`accepts` refuses it (call that first).
        """
        e = self._entry(spiffe_id)
        why = self.accepts(spiffe_id, svid, now)
        if why is not None:
            raise ValueError(why)
        new = e.svid is None or e.svid.leaf != svid.leaf
        e.svid = svid
        e.expiry_reported = False
        if svid.renew_at > now:
            e.failures = 0
            e.last_error = None
            e.next_attempt = svid.renew_at
        else:
            # Valid but already due: a stale source. Use it, look again later, backed off.
            e.failures += 1
            e.last_error = f"certificate serial {svid.serial} is past its renewal time"
            e.next_attempt = now + self.backoff(e.failures)
        return new

    def failed(self, spiffe_id: SpiffeId, error: str, now: dt.datetime) -> dt.timedelta:
        """Record a failed fetch; return the delay before the next attempt."""
        e = self._entry(spiffe_id)
        e.failures += 1
        e.last_error = error
        delay = self.backoff(e.failures)
        e.next_attempt = now + delay
        return delay

    def force(self, now: dt.datetime, spiffe_id: SpiffeId | None = None) -> None:
        """Make ``spiffe_id`` (default: all) due now (SIGHUP, files changed on disk)."""
        for sid in [spiffe_id] if spiffe_id is not None else list(self._entries):
            self._entry(sid).next_attempt = now

    # -- outputs --------------------------------------------------------------------------

    def current(self, spiffe_id: SpiffeId) -> Svid | None:
        return self._entry(spiffe_id).svid

    def newly_expired(self, now: dt.datetime) -> list[tuple[SpiffeId, Svid]]:
        """Identities whose current certificate expired since the last call (each once)."""
        out = []
        for sid, e in self._entries.items():
            if e.svid is not None and not e.expiry_reported and now > e.svid.not_after:
                e.expiry_reported = True
                out.append((sid, e.svid))
        return out

    def next_deadline(self) -> dt.datetime:
        """The earliest moment something is due: a fetch, or an expiry to report."""
        times = [e.next_attempt for e in self._entries.values()]
        times += [
            e.svid.not_after + dt.timedelta(seconds=1)
            for e in self._entries.values()
            if e.svid is not None and not e.expiry_reported
        ]
        return min(times)

    def state(self, spiffe_id: SpiffeId, now: dt.datetime) -> IdentityState:
        e = self._entry(spiffe_id)
        if e.svid is None:
            return IdentityState.UNAVAILABLE if e.failures else IdentityState.PENDING
        if now > e.svid.not_after:
            return IdentityState.EXPIRED
        if now >= e.svid.renew_at or e.failures:
            return IdentityState.RENEWING
        return IdentityState.VALID

    def status(self, now: dt.datetime) -> list[IdentityStatus]:
        out = []
        for sid, e in self._entries.items():
            s = e.svid
            out.append(
                IdentityStatus(
                    spiffe_id=sid,
                    state=self.state(sid, now),
                    serial=s.serial if s else None,
                    not_before=s.not_before if s else None,
                    not_after=s.not_after if s else None,
                    renew_at=s.renew_at if s else None,
                    next_attempt=e.next_attempt,
                    failures=e.failures,
                    last_error=e.last_error,
                )
            )
        return out


UpdateCallback = Callable[[SpiffeId, Svid, TrustBundle], None]
ExpiredCallback = Callable[[SpiffeId, Svid], None]


class IdentityManager:
    """Keeps certificates for ``ids`` fresh from ``source``, in a daemon thread.

    ``on_update(spiffe_id, svid, bundle)`` is called (from the manager's thread) for every
    new certificate and, with the current certificates, whenever the trust bundle alone
    changes; it should hand the PEMs to the engine. If it raises, the certificate is not
    taken and the renewal is retried with backoff. ``on_expired(spiffe_id, svid)`` is
    called once when a certificate expires without a replacement.

    The manager owns ``source``: :meth:`close` closes it. Use as a context manager
    (``with IdentityManager(...) as m:`` starts it and waits for the first certificates).
    :meth:`renew_now` is safe to call from a signal handler (SIGHUP).
    """

    def __init__(
        self,
        source: IdentitySource,
        ids: Iterable[SpiffeId | str],
        *,
        on_update: UpdateCallback | None = None,
        on_expired: ExpiredCallback | None = None,
        poll_interval: float = 1.0,
        initial_backoff: dt.timedelta = INITIAL_BACKOFF,
        max_backoff: dt.timedelta = MAX_BACKOFF,
        clock: Callable[[], dt.datetime] = _x509.utcnow,
    ) -> None:
        self.source = source
        self._clock = clock
        self._on_update = on_update
        self._on_expired = on_expired
        self.poll_interval = poll_interval
        self._schedule = RotationSchedule(
            ids, clock(), initial_backoff=initial_backoff, max_backoff=max_backoff
        )
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._bundle: TrustBundle | None = None
        self._forced: collections.deque[SpiffeId | None] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._closed:
            raise IdentityError("IdentityManager is closed")
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ztun-identity", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("identity manager thread did not stop within %.1f s", timeout)
        self._thread = None

    def close(self) -> None:
        if self._closed:
            return
        self.stop()
        self._closed = True
        try:
            self.source.close()
        finally:
            os.close(self._rfd)
            os.close(self._wfd)

    def __enter__(self) -> IdentityManager:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every identity has a certificate; IdentityError after ``timeout``."""
        with self._ready:
            ok = self._ready.wait_for(
                lambda: all(self._schedule.current(i) is not None for i in self._schedule.ids),
                timeout,
            )
            if ok:
                return
            missing = [
                f"{s.spiffe_id} ({s.last_error or s.state.value})"
                for s in self._schedule.status(self._clock())
                if s.serial is None
            ]
        raise IdentityError(f"no certificate after {timeout:g} s for: {', '.join(missing)}")

    # -- queries --------------------------------------------------------------------------

    def current(self, spiffe_id: SpiffeId | str) -> Svid:
        """The certificate in use for ``spiffe_id`` (possibly expired: see :meth:`status`)."""
        sid = SpiffeId.parse(spiffe_id)
        with self._lock:
            svid = self._schedule.current(sid)
            if svid is None:
                st = next(s for s in self._schedule.status(self._clock()) if s.spiffe_id == sid)
                raise IdentityError(
                    f"no certificate yet for {sid} ({st.last_error or st.state.value})"
                )
            return svid

    def bundle(self) -> TrustBundle:
        with self._lock:
            if self._bundle is None:
                raise IdentityError("no trust bundle yet")
            return self._bundle

    def status(self) -> list[IdentityStatus]:
        with self._lock:
            return self._schedule.status(self._clock())

    @property
    def ids(self) -> list[SpiffeId]:
        return self._schedule.ids

    # -- forcing --------------------------------------------------------------------------

    def renew_now(self, spiffe_id: SpiffeId | str | None = None) -> None:
        """Fetch ``spiffe_id`` (default: all) now. Lock-free and async-signal-safe."""
        sid = None if spiffe_id is None else SpiffeId.parse(spiffe_id)
        if sid is not None and sid not in self._schedule.ids:
            raise IdentityError(f"{sid} is not managed here")
        self._forced.append(sid)
        self._wake()

    def install_signal_handler(self, signum: int = signal.SIGHUP) -> None:
        """Make ``signum`` force a renewal of every identity (main thread only)."""

        def handler(_signum: int, _frame: FrameType | None) -> None:
            self.renew_now()

        signal.signal(signum, handler)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wfd, b"\0")

    # -- the work ---------------------------------------------------------------------------

    def tick(self, now: dt.datetime | None = None) -> float:
        """Do whatever is due at ``now``; return seconds until the next deadline.

        The thread calls this in a loop; tests (with ``now`` from a fake clock) and
        programs that run their own loop may call it directly instead of :meth:`start`.
        """
        now = self._clock() if now is None else now
        try:
            changed = self.source.poll()
        except Exception as e:
            log.warning("identity source %r: poll failed: %s", self.source, e)
            changed = False
        with self._lock:
            if changed:
                self._schedule.force(now)
            while self._forced:
                sid = self._forced.popleft()
                self._schedule.force(now, sid)
            due = self._schedule.due(now)

        bundle_changed = self._refresh_bundle()
        updated: set[SpiffeId] = set()
        for sid in due:
            if self._renew(sid, now):
                updated.add(sid)
        if bundle_changed:
            self._push_bundle(skip=updated)

        with self._lock:
            expired = self._schedule.newly_expired(now)
            deadline = self._schedule.next_deadline()
        for sid, svid in expired:
            log.error(
                "identity %s expired at %s without renewal (serial %s); new handshakes "
                "with it will fail until a certificate is obtained",
                sid,
                svid.not_after.isoformat(),
                svid.serial,
            )
            if self._on_expired is not None:
                try:
                    self._on_expired(sid, svid)
                except Exception:
                    log.exception("on_expired callback failed for %s", sid)
        return max(0.0, min((deadline - now).total_seconds(), self.poll_interval))

    def _refresh_bundle(self) -> bool:
        try:
            bundle = self.source.bundle()
        except Exception as e:
            log.warning("identity source %r: no trust bundle: %s", self.source, e)
            return False
        with self._lock:
            old = self._bundle
            if old is bundle or (old is not None and old == bundle):
                return False
            self._bundle = bundle
            return old is not None

    def _renew(self, sid: SpiffeId, now: dt.datetime) -> bool:
        """Fetch ``sid`` and install it; True when a new certificate was delivered."""
        try:
            svid = self.source.fetch(sid)
            why = self._schedule.accepts(sid, svid, now)
            if why is not None:
                raise IdentityError(why)
            with self._lock:
                current = self._schedule.current(sid)
                bundle = self._bundle
            if bundle is None:
                raise IdentityError("the source has no trust bundle yet")
        except Exception as e:
            with self._lock:
                delay = self._schedule.failed(sid, str(e), now)
                has_cert = self._schedule.current(sid) is not None
                self._ready.notify_all()
            log.warning(
                "renewing %s failed: %s; retrying in %.0f s%s",
                sid,
                e,
                delay.total_seconds(),
                "; still serving the current certificate" if has_cert else "",
            )
            return False
        is_new = current is None or current.leaf != svid.leaf
        if is_new and self._on_update is not None:
            try:
                self._on_update(sid, svid, bundle)
            except Exception as e:
                log.exception("on_update failed for %s (serial %s)", sid, svid.serial)
                with self._lock:
                    self._schedule.failed(sid, f"on_update failed: {e}", now)
                return False
        with self._lock:
            self._schedule.succeeded(sid, svid, now)
            self._ready.notify_all()
        if is_new:
            log.info(
                "identity %s: new certificate serial %s, valid %s .. %s, renew at %s",
                sid,
                svid.serial,
                svid.not_before.isoformat(),
                svid.not_after.isoformat(),
                svid.renew_at.isoformat(),
            )
        return is_new

    def _push_bundle(self, skip: set[SpiffeId]) -> None:
        with self._lock:
            bundle = self._bundle
            targets = [
                (sid, svid)
                for sid in self._schedule.ids
                if sid not in skip and (svid := self._schedule.current(sid)) is not None
            ]
        log.info("trust bundle changed: %r", bundle)
        if self._on_update is None or bundle is None:
            return
        for sid, svid in targets:
            try:
                self._on_update(sid, svid, bundle)
            except Exception:
                log.exception("on_update failed for %s on a trust bundle change", sid)

    def _run(self) -> None:
        while not self._stopping:
            try:
                timeout = self.tick()
            except Exception:
                log.exception("identity manager tick failed")
                timeout = self.poll_interval
            if self._stopping:
                break
            try:
                readable, _, _ = select.select([self._rfd], [], [], timeout)
            except InterruptedError:
                continue
            if readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._rfd, 512)

    def __repr__(self) -> str:
        ids = ", ".join(str(i) for i in self._schedule.ids)
        return f"IdentityManager({self.source!r}, [{ids}])"
