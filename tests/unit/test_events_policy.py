"""Connection events name the deciding policy by table generation; the access log line."""

from __future__ import annotations

from typing import Any

from ztun.events import ConnectionEvent, access_log_line, parse_event

NAMES = {3: ("prod/allow-a", "prod/audit-b")}


def _names(gen: int, idx: int) -> str | None:
    names = NAMES.get(gen)
    return names[idx] if names and idx < len(names) else None


def _raw(**kw: Any) -> dict[str, Any]:
    raw = {
        "type": "close", "worker": 0, "conn_id": 7, "listener_id": 1, "reason": "ok",
        "mode": 3, "policy": 0, "policy_rule": 0, "http_status": 0, "errno": 0,
        "start_ns": 0, "duration_ns": 2_000_000, "bytes_down_up": 10, "bytes_up_down": 20,
        "src": ("10.0.0.1", 5000), "dst": ("127.0.0.1", 80), "target": None,
        "request_id": 0, "trace": None, "baggage": None,
        "peer_id": "spiffe://td/ns/prod/sa/b", "local_id": "spiffe://td/ns/prod/sa/srv",
        "detail": None, "policy_gen": 3, "policy_reason": 2, "policy_flags": 0,
        "dry_run_policy": -1, "dry_run_rule": -1,
    }  # fmt: skip
    raw.update(kw)
    return raw


def test_policy_named_by_generation_and_dry_run_in_the_line() -> None:
    ev = parse_event(_raw(policy_flags=1 | 2, dry_run_policy=1), _names)
    assert isinstance(ev, ConnectionEvent)
    assert ev.policy_name == "prod/allow-a" and ev.policy_reason == "allowed_by_policy"
    assert ev.dry_run_policy == "prod/audit-b" and ev.dry_run_allowed is False
    assert not ev.policy_rechecked
    line = access_log_line(ev)
    assert "policy=prod/allow-a" in line and "dry_run=deny:prod/audit-b" in line


def test_no_table_no_names_and_dry_run_agreeing_is_not_logged() -> None:
    ev = parse_event(_raw(policy_gen=0, policy=-1, policy_reason=0), _names)
    assert isinstance(ev, ConnectionEvent)
    assert ev.policy_name is None and ev.policy_reason is None and ev.dry_run_allowed is None
    assert "policy=" not in access_log_line(ev)
    ev = parse_event(_raw(policy_flags=1 | 4), _names)  # dry run applied, would allow too
    assert isinstance(ev, ConnectionEvent)
    assert ev.dry_run_allowed is True and ev.policy_rechecked
    assert "dry_run" not in access_log_line(ev)


def test_denied_by_default_and_changed() -> None:
    ev = parse_event(
        _raw(
            reason="policy_changed", policy=-1, policy_reason=4, detail="denied by a policy change"
        ),
        _names,
    )
    assert isinstance(ev, ConnectionEvent)
    assert ev.policy_name is None and ev.policy_reason == "denied_no_match"
    assert 'error="policy_changed: denied by a policy change"' in access_log_line(ev)
    # an explicit name wins (callers that resolve names themselves)
    assert "policy=ns/x" in access_log_line(ev, policy_name="ns/x")
