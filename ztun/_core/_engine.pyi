"""Stubs for the C engine boundary (internal)."""

from collections.abc import Iterable
from typing import Any

MODE_FORWARD: int
MODE_TLS_OUT: int
MODE_TLS_IN: int
MODE_HBONE_IN: int
MODE_HBONE_OUT: int
MODE_SOCKS5: int
LISTENER_POLICY: int
LISTENER_ORIGINAL_DST: int
LISTENER_VIRTUAL: int
LISTENER_DELIVER: int
TLS_CHACHA20: int
TLS_RESUMPTION: int
TLS_ANY_TRUST_DOMAIN: int
EV_CONN_OPEN: int
EV_CONN_CLOSE: int
EV_LOG: int
EV_CONNECT_DONE: int
EVMASK_OPEN: int
EVMASK_CLOSE: int
EVMASK_LOG: int
EVPOL_DRY_RUN: int
EVPOL_DRY_RUN_DENY: int
EVPOL_RECHECKED: int
CLOSE_REASONS: tuple[str, ...]
TLS_REASONS: tuple[str, ...]

def core_version() -> str: ...
def strerror(code: int) -> str: ...

class TlsContext:
    def __init__(
        self,
        chain_pem: bytes,
        key_pem: bytes,
        trust: dict[str, bytes],
        flags: int = 0,
        session_lifetime_s: int = 0,
    ) -> None: ...
    @property
    def identity(self) -> str: ...

class Engine:
    def __init__(
        self,
        workers: int = 0,
        connect_timeout_ms: int = 0,
        handshake_timeout_ms: int = 0,
        idle_timeout_ms: int = 0,
        event_ring_bytes: int = 0,
        buf_small: int = 0,
        buf_large: int = 0,
        events: int = ...,
        splice_pipe: int = 0,
    ) -> None: ...
    @property
    def workers(self) -> int: ...
    @property
    def event_fd(self) -> int: ...
    def start(self) -> None: ...
    def stop(self, drain_ms: int = 0) -> None: ...
    def close(self) -> None: ...
    def add_listener(
        self,
        mode: int,
        bind: tuple[Any, ...] | None = None,
        upstream: tuple[Any, ...] | None = None,
        *,
        tls: TlsContext | None = None,
        fd: int = -1,
        expect: Iterable[str] = (),
        flags: int = 0,
        workload: int = -1,
        target: tuple[Any, ...] | None = None,
        backlog: int = 0,
        baggage: str | None = None,
        workload_ips: Iterable[str] = (),
        workload_key: str | None = None,
    ) -> tuple[int, tuple[str, int]]: ...
    def remove_listener(self, listener_id: int) -> None: ...
    def set_listener_tls(self, listener_id: int, tls: TlsContext) -> None: ...
    def adopt(
        self,
        listener_id: int,
        fd: int,
        target: tuple[Any, ...] | None = None,
        request_id: int = 0,
    ) -> None: ...
    def set_directory(self, entries: Iterable[tuple[Any, ...]]) -> None: ...
    def set_bpf(self, handle: int, api: int) -> None: ...
    def tls_listeners(self) -> list[int]: ...
    def pause_accept(self) -> None: ...
    def set_policy(self, blob: bytes | None) -> int: ...
    def policy_counters(self) -> tuple[int, list[tuple[int, int, int]]]: ...
    def stats(self) -> dict[str, Any]: ...
    def connections(self) -> list[tuple[int, int, int, bool, int, int, int]]: ...
    def read_events(self) -> list[dict[str, Any]]: ...
    def set_events(self, mask: int) -> None: ...
    def arm_events(self) -> bool: ...
