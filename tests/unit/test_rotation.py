"""Rotation: the sans-I/O schedule under a fake clock, and IdentityManager's thread."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ztun import (
    CaIdentitySource,
    CertificateAuthority,
    FileIdentitySource,
    IdentityManager,
    IdentityState,
    SpiffeId,
    Svid,
    TrustBundle,
)
from ztun.errors import IdentityError
from ztun.rotation import MAX_BACKOFF, RotationSchedule
from ztun.testing import SpiffeCA, write_svid_files

TD = "example.org"
WEB = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
DB = SpiffeId.parse("spiffe://example.org/ns/prod/sa/db")
T0 = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(hours=24)
S = dt.timedelta(seconds=1)


class FakeClock:
    def __init__(self, t: dt.datetime = T0) -> None:
        self.t = t

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, delta: dt.timedelta) -> None:
        self.t += delta


class ScriptedSource:
    """An IdentitySource issuing real SVIDs from a SpiffeCA, at fake-clock times, that
    fails while ``down`` is set. A test double of the interface, not of ztun's sources."""

    def __init__(self, ca: SpiffeCA, clock: FakeClock, lifetime: dt.timedelta = DAY) -> None:
        self.ca, self.clock, self.lifetime = ca, clock, lifetime
        self.down = False
        self.changed = False
        self.fetches = 0
        self.closed = False
        self._bundle = ca.bundle

    def fetch(self, spiffe_id: SpiffeId) -> Svid:
        self.fetches += 1
        if self.down:
            raise IdentityError("CA unreachable")
        nb = self.clock()
        return self.ca.issue_svid(spiffe_id, not_before=nb, not_after=nb + self.lifetime)

    def bundle(self) -> TrustBundle:
        return self._bundle

    def set_bundle(self, bundle: TrustBundle) -> None:
        self._bundle = bundle

    def poll(self) -> bool:
        changed, self.changed = self.changed, False
        return changed

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def ca() -> SpiffeCA:
    return SpiffeCA(TD)


def svid_at(
    ca: SpiffeCA, nb: dt.datetime, lifetime: dt.timedelta = DAY, sid: SpiffeId = WEB
) -> Svid:
    return ca.issue_svid(sid, not_before=nb, not_after=nb + lifetime)


# ------------------------------------------------------------------------------------------
# RotationSchedule


def test_backoff_doubles_and_caps_at_150s() -> None:
    sched = RotationSchedule([WEB], T0)
    delays = [sched.backoff(n).total_seconds() for n in range(1, 12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 150, 150, 150]
    assert dt.timedelta(seconds=150) == MAX_BACKOFF
    assert sched.backoff(0) == dt.timedelta(0)
    assert sched.backoff(10**9) == MAX_BACKOFF  # no overflow on long outages


def test_renews_at_half_lifetime(ca: SpiffeCA) -> None:
    sched = RotationSchedule([WEB], T0)
    assert sched.state(WEB, T0) is IdentityState.PENDING
    assert sched.due(T0) == [WEB]
    assert sched.succeeded(WEB, svid_at(ca, T0), T0) is True
    assert sched.state(WEB, T0) is IdentityState.VALID
    assert sched.due(T0 + dt.timedelta(hours=11, minutes=59)) == []
    assert sched.next_deadline() == T0 + dt.timedelta(hours=12)
    assert sched.due(T0 + dt.timedelta(hours=12)) == [WEB]
    assert sched.state(WEB, T0 + dt.timedelta(hours=12)) is IdentityState.RENEWING
    # Short certificates too: 10 s lifetime renews after 5 s.
    t = T0 + dt.timedelta(hours=12)
    sched.succeeded(WEB, svid_at(ca, t, dt.timedelta(seconds=10)), t)
    assert sched.next_deadline() == t + 5 * S


def test_failures_back_off_keep_serving_then_expire(ca: SpiffeCA) -> None:
    sched = RotationSchedule([WEB], T0)
    first = svid_at(ca, T0)
    sched.succeeded(WEB, first, T0)
    t = first.renew_at
    delays = []
    while t <= first.not_after:
        assert sched.due(t) == [WEB]
        assert sched.current(WEB) is first  # still serving the valid certificate
        assert sched.state(WEB, t) is IdentityState.RENEWING
        delay = sched.failed(WEB, "CA unreachable", t)
        delays.append(delay.total_seconds())
        assert sched.due(t + delay - S) == []
        t += delay
    assert delays[:9] == [1, 2, 4, 8, 16, 32, 64, 128, 150]
    assert set(delays[8:]) == {150}
    # Past notAfter: expired, reported exactly once.
    assert sched.state(WEB, t) is IdentityState.EXPIRED
    assert sched.newly_expired(t) == [(WEB, first)]
    assert sched.newly_expired(t + S) == []
    st = sched.status(t)[0]
    assert st.state is IdentityState.EXPIRED and st.failures == len(delays)
    assert st.last_error == "CA unreachable" and st.serial == first.serial
    # Recovery resets everything.
    fresh = svid_at(ca, t)
    assert sched.succeeded(WEB, fresh, t) is True
    st = sched.status(t)[0]
    assert (st.state, st.failures, st.last_error) == (IdentityState.VALID, 0, None)
    assert st.next_attempt == fresh.renew_at


def test_never_obtained_is_unavailable() -> None:
    sched = RotationSchedule([WEB, DB], T0)
    sched.failed(WEB, "boom", T0)
    assert sched.state(WEB, T0) is IdentityState.UNAVAILABLE
    assert sched.state(DB, T0) is IdentityState.PENDING
    assert sched.due(T0) == [DB]
    assert sched.due(T0 + S) == [WEB, DB]


def test_refuses_unusable_and_backs_off_on_stale(ca: SpiffeCA) -> None:
    sched = RotationSchedule([WEB], T0)
    expired = svid_at(ca, T0 - 2 * DAY)
    assert "valid only from" in (sched.accepts(WEB, expired, T0) or "")
    assert "not spiffe://example.org/ns/prod/sa/web" in (
        sched.accepts(WEB, svid_at(ca, T0, sid=DB), T0) or ""
    )
    with pytest.raises(ValueError, match=r"valid only from"):
        sched.succeeded(WEB, expired, T0)
    # Valid but past its renewal point (stale files): used, next look backed off.
    stale = svid_at(ca, T0 - dt.timedelta(hours=20))
    assert sched.succeeded(WEB, stale, T0) is True
    assert sched.current(WEB) is stale
    assert sched.status(T0)[0].next_attempt == T0 + S
    assert sched.succeeded(WEB, stale, T0 + S) is False  # same certificate: not "new"
    assert sched.status(T0 + S)[0].next_attempt == T0 + 3 * S
    with pytest.raises(IdentityError, match=r"not managed here"):
        sched.failed(DB, "x", T0)


def test_force_and_deadlines(ca: SpiffeCA) -> None:
    sched = RotationSchedule([WEB, DB], T0)
    for sid in (WEB, DB):
        sched.succeeded(sid, svid_at(ca, T0, sid=sid), T0)
    assert sched.due(T0 + S) == []
    sched.force(T0 + S, DB)
    assert sched.due(T0 + S) == [DB]
    sched.force(T0 + S)
    assert sched.due(T0 + S) == [WEB, DB]
    d = sched.status(T0)[0].to_dict()
    assert d["spiffe_id"] == str(WEB) and d["state"] == "valid"
    assert d["not_after"] == "2030-06-02T12:00:00Z" and d["renew_at"] == "2030-06-02T00:00:00Z"


# ------------------------------------------------------------------------------------------
# IdentityManager driven by tick() with a fake clock


def test_manager_tick_lifecycle(ca: SpiffeCA, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    src = ScriptedSource(ca, clock)
    updates: list[tuple[SpiffeId, str, TrustBundle]] = []
    expired: list[tuple[SpiffeId, str]] = []
    mgr = IdentityManager(
        src,
        [str(WEB)],
        on_update=lambda sid, svid, b: updates.append((sid, svid.serial, b)),
        on_expired=lambda sid, svid: expired.append((sid, svid.serial)),
        clock=clock,
        poll_interval=1.0,
    )
    with pytest.raises(IdentityError, match=r"no certificate yet for .*pending"):
        mgr.current(WEB)
    assert mgr.tick() == 1.0  # sleeps at most poll_interval
    first = mgr.current(WEB)
    assert updates == [(WEB, first.serial, ca.bundle)]
    assert mgr.bundle() == ca.bundle
    clock.advance(dt.timedelta(hours=11))
    mgr.tick()
    assert src.fetches == 1 and len(updates) == 1
    clock.advance(dt.timedelta(hours=1))
    mgr.tick()
    second = mgr.current(WEB)
    assert second.serial != first.serial and updates[-1][1] == second.serial
    # Outage: retries back off to 150 s, the current certificate stays in use.
    src.down = True
    caplog.set_level(logging.WARNING, logger="ztun.rotation")
    clock.t = second.renew_at
    gaps = []
    while clock() <= second.not_after:
        before = src.fetches
        mgr.tick()
        assert src.fetches == before + 1
        assert mgr.current(WEB) is second
        nxt = mgr.status()[0].next_attempt
        gaps.append((nxt - clock()).total_seconds())
        clock.t = nxt
    assert gaps[:9] == [1, 2, 4, 8, 16, 32, 64, 128, 150] and max(gaps) == 150
    assert "still serving the current certificate" in caplog.records[0].getMessage()
    mgr.tick()
    assert mgr.status()[0].state is IdentityState.EXPIRED
    assert expired == [(WEB, second.serial)]
    assert any("expired at" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    mgr.tick()
    assert len(expired) == 1
    # Recovery.
    src.down = False
    clock.t = mgr.status()[0].next_attempt
    mgr.tick()
    assert mgr.status()[0].state is IdentityState.VALID
    assert updates[-1][1] == mgr.current(WEB).serial != second.serial
    mgr.close()
    assert src.closed


def test_manager_on_update_failure_is_retried(ca: SpiffeCA) -> None:
    clock = FakeClock()
    src = ScriptedSource(ca, clock)
    calls: list[str] = []

    def on_update(sid: SpiffeId, svid: Svid, bundle: TrustBundle) -> None:
        calls.append(svid.serial)
        if len(calls) == 1:
            raise RuntimeError("engine refused the PEM")

    mgr = IdentityManager(src, [WEB], on_update=on_update, clock=clock)
    mgr.tick()
    st = mgr.status()[0]
    assert st.state is IdentityState.UNAVAILABLE and "engine refused" in (st.last_error or "")
    clock.advance(S)
    mgr.tick()
    assert mgr.current(WEB).serial == calls[-1] and len(calls) == 2
    mgr.close()


def test_manager_bundle_change_and_forcing(ca: SpiffeCA) -> None:
    clock = FakeClock()
    src = ScriptedSource(ca, clock)
    updates: list[tuple[SpiffeId, str, TrustBundle]] = []
    mgr = IdentityManager(
        src, [WEB, DB], on_update=lambda s, v, b: updates.append((s, v.serial, b)), clock=clock
    )
    mgr.tick()
    assert {u[0] for u in updates} == {WEB, DB}
    serials = {s: mgr.current(s).serial for s in (WEB, DB)}
    # The trust bundle alone changes (a new root added): pushed with the current SVIDs.
    other = SpiffeCA("other.test")
    src.set_bundle(ca.bundle.merge(other.bundle))
    updates.clear()
    mgr.tick()
    assert sorted((u[0], u[1]) for u in updates) == sorted(serials.items())
    assert all(u[2].trust_domains == ["example.org", "other.test"] for u in updates)
    # The source says something changed: everything is fetched now.
    src.changed = True
    before = src.fetches
    mgr.tick()
    assert src.fetches == before + 2
    # renew_now (SIGHUP) for one identity.
    before = src.fetches
    mgr.renew_now(DB)
    mgr.tick()
    assert src.fetches == before + 1
    mgr.close()


# ------------------------------------------------------------------------------------------
# IdentityManager's thread, with real time and real sources


def wait_for(pred: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_thread_rotates_short_lived_certificates(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", TD, validity=dt.timedelta(seconds=2))
    serials: list[str] = []
    lock = threading.Lock()

    def on_update(sid: SpiffeId, svid: Svid, bundle: TrustBundle) -> None:
        with lock:
            serials.append(svid.serial)

    src = CaIdentitySource(ca)
    with IdentityManager(src, [WEB], on_update=on_update, poll_interval=0.05) as mgr:
        assert mgr.current(WEB).serial == serials[0]
        assert wait_for(lambda: len(serials) >= 4, timeout=8), serials  # initial + 3 rotations
        assert len(set(serials)) == len(serials)
        st = mgr.status()[0]
        assert st.state in (IdentityState.VALID, IdentityState.RENEWING)
        assert mgr.current(WEB).serial == serials[-1] == st.serial
    n = len(serials)
    time.sleep(0.3)
    assert len(serials) == n  # stopped


def test_thread_sighup_forces_renewal(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", TD)
    serials: list[str] = []
    old = signal.getsignal(signal.SIGHUP)
    try:
        with IdentityManager(
            CaIdentitySource(ca), [WEB], on_update=lambda s, v, b: serials.append(v.serial)
        ) as mgr:
            mgr.install_signal_handler()
            os.kill(os.getpid(), signal.SIGHUP)
            assert wait_for(lambda: len(serials) == 2), serials
    finally:
        signal.signal(signal.SIGHUP, old)


def test_thread_reloads_files(tmp_path: Path) -> None:
    ca = SpiffeCA(TD)
    chain, key = write_svid_files(ca.issue_svid(WEB), tmp_path)
    bundle = ca.write_files(tmp_path)
    serials: list[str] = []
    src = FileIdentitySource(chain, key, bundle)
    with IdentityManager(
        src, [WEB], on_update=lambda s, v, b: serials.append(v.serial), poll_interval=0.05
    ):
        assert len(serials) == 1
        new = ca.issue_svid(WEB)
        (tmp_path / "next").mkdir()
        nchain, nkey = write_svid_files(new, tmp_path / "next")
        os.replace(nkey, key)
        os.replace(nchain, chain)
        assert wait_for(lambda: serials[-1] == new.serial), serials


def test_wait_ready_names_what_is_missing(tmp_path: Path) -> None:
    clock = FakeClock(dt.datetime.now(dt.UTC))
    src = ScriptedSource(SpiffeCA(TD), clock)
    src.down = True
    mgr = IdentityManager(src, [WEB], poll_interval=0.05)
    with pytest.raises(
        IdentityError, match=r"no certificate after 0.3 s for: .*web \(CA unreachable\)"
    ):
        mgr.start()
        mgr.wait_ready(0.3)
    mgr.close()
    with pytest.raises(IdentityError, match=r"closed"):
        mgr.start()


def test_renew_now_refuses_unknown_ids(ca: SpiffeCA) -> None:
    mgr = IdentityManager(ScriptedSource(ca, FakeClock()), [WEB])
    with pytest.raises(IdentityError, match=r"not managed here"):
        mgr.renew_now(DB)
    mgr.close()
