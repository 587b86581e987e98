"""The exceptions ztun raises: one base class, one subclass per layer.

Errors about user input say *where* the input was wrong (file, line, field) so that a
config or policy mistake can be fixed without reading ztun's code.
"""

from __future__ import annotations

__all__ = [
    "BpfError",
    "ConfigError",
    "ConnectError",
    "EngineError",
    "IdentityError",
    "PolicyError",
    "SpiffeIdError",
    "ZtunError",
]


class ZtunError(Exception):
    """Base class of every error ztun raises on purpose."""


class ConfigError(ZtunError, ValueError):
    """Invalid configuration; ``file``, ``line`` and ``field`` say where, when known."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = message
        self.file = file
        self.line = line
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        if self.field:
            where += f"{self.field}: "
        return where + self.reason


class PolicyError(ConfigError):
    """An authorization policy that cannot be accepted."""


class IdentityError(ZtunError):
    """A certificate, key, trust bundle or identity source problem."""


class SpiffeIdError(IdentityError, ValueError):
    """A string that is not a valid SPIFFE ID (the message says which rule it breaks)."""


class EngineError(ZtunError):
    """The C engine refused an operation; ``code`` is the engine's (negative) error code."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


class ConnectError(ZtunError, ConnectionError):
    """A tunnelled connection could not be opened.

    ``status`` is the HBONE (HTTP) status when the peer answered (401 policy denial, 503
    upstream unreachable, ...), ``reason`` the engine's failure reason otherwise.
    """

    def __init__(self, message: str, *, status: int | None = None, reason: str = "") -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)


class BpfError(ZtunError):
    """Loading, attaching or detaching ztun's eBPF programs failed."""
