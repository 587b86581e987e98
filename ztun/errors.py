"""The exceptions ztun raises: one base class, one subclass per layer.

Errors about user input say *where* the input was wrong (file, line, field) so that a
config or policy mistake can be fixed without reading ztun's code.
"""

from __future__ import annotations

__all__ = [
    "BpfError",
    "CertificateExpiredError",
    "CertificateNotYetValidError",
    "ConfigError",
    "ConnectError",
    "EngineError",
    "IdentityError",
    "KeyMismatchError",
    "KeyUsageError",
    "LeafIsCaError",
    "MalformedCertificateError",
    "MultipleUriSansError",
    "NoUriSanError",
    "NonSpiffeUriError",
    "PolicyError",
    "SpiffeIdError",
    "SvidError",
    "TrustDomainMismatchError",
    "UnexpectedSpiffeIdError",
    "UnknownCaError",
    "ZtunError",
    "invalid_argument",
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


def invalid_argument(name: str, message: str) -> ConfigError:
    """The error for a bad argument of ztun's API: a ConfigError (so also a ValueError)
    whose message starts with the argument's name."""
    return ConfigError(message, field=name)


class PolicyError(ConfigError):
    """An authorization policy that cannot be accepted."""


class IdentityError(ZtunError):
    """A certificate, key, trust bundle or identity source problem."""


class SpiffeIdError(IdentityError, ValueError):
    """A string that is not a valid SPIFFE ID (the message says which rule it breaks)."""


class SvidError(IdentityError):
    """A certificate (chain) that is not an acceptable X.509-SVID.

    ``reason`` is a short stable code naming the broken rule; the C engine uses the same
    codes in its log lines and failure counters, so tests can compare the two.
    """

    reason = "bad_certificate"


class MalformedCertificateError(SvidError):
    """Bytes that are not a PEM/DER certificate or key, or a chain that does not link up."""

    reason = "malformed"


class CertificateExpiredError(SvidError):
    """A certificate of the chain is past its notAfter."""

    reason = "expired"


class CertificateNotYetValidError(SvidError):
    """A certificate of the chain is before its notBefore."""

    reason = "not_yet_valid"


class UnknownCaError(SvidError):
    """The chain does not lead to a root of the trust bundle of the leaf's trust domain."""

    reason = "unknown_ca"


class TrustDomainMismatchError(SvidError):
    """The leaf's SPIFFE ID is in a trust domain other than the one required (or trusted)."""

    reason = "other_trust_domain"


class NoUriSanError(SvidError):
    """The leaf has no URI subject alternative name."""

    reason = "no_uri_san"


class MultipleUriSansError(SvidError):
    """The leaf has more than one URI subject alternative name."""

    reason = "multiple_uri_sans"


class NonSpiffeUriError(SvidError):
    """The leaf's URI SAN is not a valid SPIFFE ID."""

    reason = "non_spiffe_uri"


class UnexpectedSpiffeIdError(SvidError):
    """The leaf's SPIFFE ID is valid but not one of the identities expected for the peer."""

    reason = "unexpected_spiffe_id"


class LeafIsCaError(SvidError):
    """The leaf certificate says CA:TRUE."""

    reason = "leaf_is_ca"


class KeyUsageError(SvidError):
    """The leaf's key usage lacks digitalSignature, or allows keyCertSign / cRLSign."""

    reason = "bad_key_usage"


class KeyMismatchError(SvidError):
    """The private key does not belong to the leaf certificate."""

    reason = "key_mismatch"


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
