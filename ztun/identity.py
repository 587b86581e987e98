"""Workload identity: SPIFFE IDs, trust bundles, X.509-SVIDs, their verification, sources.

Pure Python on ``cryptography``. The C engine does the TLS handshakes; this module decides
what it is given (certificates, keys, roots) and holds the reference verifier
(:func:`verify_svid`) that applies the same rules the engine applies, so the daemon can
check files before loading them and tests can use it as an oracle.

Rules followed:

* SPIFFE ID: the SPIFFE-ID standard (``spiffe://<trust domain>[/<path>]``, lowercase trust
  domain of ``[a-z0-9.-_]``, path segments of ``[A-Za-z0-9.-_]``, no empty / ``.`` / ``..``
  segments, no trailing slash, no query, fragment, port or userinfo, 2048 bytes at most,
  trust domain 255 at most).
* X.509-SVID (leaf): exactly one URI SAN holding a SPIFFE ID with a path, CA:FALSE, a key
  usage extension with digitalSignature and without keyCertSign / cRLSign (as go-spiffe).
* Chain: leads, through the intermediates sent with it, to a certificate of the trust
  bundle of the *leaf's* trust domain (any bundle certificate is an anchor: OpenSSL's
  ``X509_V_FLAG_PARTIAL_CHAIN``); every certificate on the path is inside its validity
  window; signing certificates are CA:TRUE (with keyCertSign when key usage is present),
  path length and URI name constraints are honoured, and unknown critical extensions are
  refused, as OpenSSL does.

Failure reasons (``SvidError.reason``; the engine's log lines and counters use the same):
``expired``, ``not_yet_valid``, ``unknown_ca``, ``other_trust_domain``, ``no_uri_san``,
``multiple_uri_sans``, ``non_spiffe_uri``, ``unexpected_spiffe_id``, ``leaf_is_ca``,
``bad_key_usage``, plus ``malformed`` and ``key_mismatch`` for unusable input.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import string
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from ztun import _x509
from ztun._x509 import PrivateKey
from ztun.errors import (
    CertificateExpiredError,
    CertificateNotYetValidError,
    IdentityError,
    KeyMismatchError,
    KeyUsageError,
    LeafIsCaError,
    MalformedCertificateError,
    MultipleUriSansError,
    NonSpiffeUriError,
    NoUriSanError,
    SpiffeIdError,
    TrustDomainMismatchError,
    UnexpectedSpiffeIdError,
    UnknownCaError,
)

__all__ = [
    "MAX_SPIFFE_ID_LENGTH",
    "MAX_TRUST_DOMAIN_LENGTH",
    "FileIdentitySource",
    "IdentitySource",
    "PrivateKey",
    "SpiffeId",
    "Svid",
    "TrustBundle",
    "TrustDomain",
    "verify_svid",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SCHEME = "spiffe://"
# SPIFFE-ID standard, section 2.3: implementations must support IDs up to 2048 bytes and
# trust domain names up to 255 bytes; we refuse anything longer rather than truncate.
MAX_SPIFFE_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255
# A chain deeper than this is a misconfiguration or an attack, not a PKI (OpenSSL: 100).
MAX_CHAIN_DEPTH = 10

_TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


# --------------------------------------------------------------------------------------------
# SPIFFE IDs


def _show(s: str) -> str:
    return repr(s if len(s) <= 120 else s[:100] + "...")


def _id_error(s: str, rule: str, pos: int | None = None) -> SpiffeIdError:
    where = f" (position {pos})" if pos is not None else ""
    return SpiffeIdError(f"invalid SPIFFE ID {_show(s)}: {rule}{where}")


def _check_trust_domain(s: str, td: str, offset: int) -> None:
    """Validate trust domain ``td`` found at ``s[offset:]``; positions refer to ``s``."""
    if not td:
        raise _id_error(s, "the trust domain is missing", offset)
    for i, ch in enumerate(td):
        pos = offset + i
        if ch == "@":
            raise _id_error(s, "userinfo ('user@') is not allowed", pos)
        if ch == ":":
            raise _id_error(s, "a port is not allowed", pos)
        if ch not in _TD_CHARS:
            if ch in string.ascii_uppercase:
                raise _id_error(
                    s,
                    f"trust domain character {ch!r} is uppercase; trust domains are lowercase",
                    pos,
                )
            raise _id_error(
                s,
                f"trust domain character {ch!r} is not allowed "
                "(only lowercase letters, digits, '.', '-', '_')",
                pos,
            )
    if len(td) > MAX_TRUST_DOMAIN_LENGTH:
        raise _id_error(
            s,
            f"the trust domain is {len(td)} characters long; "
            f"the limit is {MAX_TRUST_DOMAIN_LENGTH}",
        )


def _check_path(s: str, path: str, offset: int) -> None:
    """Validate ``path`` (empty, or starting with '/') found at ``s[offset:]``."""
    if not path:
        return
    if path == "/" or path.endswith("/"):
        raise _id_error(s, "the path must not end with '/'", offset + len(path) - 1)
    pos = offset + 1
    for seg in path[1:].split("/"):
        if not seg:
            raise _id_error(s, "the path has an empty segment ('//')", pos - 1)
        if seg in (".", ".."):
            raise _id_error(s, f"the path has a dot segment {seg!r}", pos)
        for i, ch in enumerate(seg):
            if ch not in _PATH_CHARS:
                raise _id_error(
                    s,
                    f"path character {ch!r} is not allowed "
                    "(only letters, digits, '.', '-', '_' in a segment)",
                    pos + i,
                )
        pos += len(seg) + 1


def _split(s: str) -> tuple[str, str]:
    """Validate a SPIFFE ID string, return (trust domain, path)."""
    if not isinstance(s, str):
        raise SpiffeIdError(f"a SPIFFE ID must be a string, not {type(s).__name__}")
    if not s:
        raise SpiffeIdError("invalid SPIFFE ID '': it is empty")
    size = len(s.encode("utf-8", "surrogatepass"))
    if size > MAX_SPIFFE_ID_LENGTH:
        raise _id_error(s, f"it is {size} bytes long; the limit is {MAX_SPIFFE_ID_LENGTH}")
    if not s.startswith(SCHEME):
        if s[: len(SCHEME)].lower() == SCHEME:
            raise _id_error(s, "the scheme must be lowercase 'spiffe://'", 0)
        sep = s.find("://")
        if sep > 0:
            raise _id_error(s, f"the scheme is {s[:sep]!r}, not 'spiffe'", 0)
        raise _id_error(s, "the 'spiffe://' scheme is missing", 0)
    for ch, what in (("?", "a query"), ("#", "a fragment")):
        pos = s.find(ch)
        if pos >= 0:
            raise _id_error(s, f"{what} ({ch!r}) is not allowed", pos)
    rest = s[len(SCHEME) :]
    slash = rest.find("/")
    td, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    _check_trust_domain(s, td, len(SCHEME))
    _check_path(s, path, len(SCHEME) + len(td))
    return td, path


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A SPIFFE trust domain name, e.g. ``cluster.local``; ``str()`` gives the name."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(SCHEME + self.name, self.name, len(SCHEME))

    @classmethod
    def parse(cls, value: str | TrustDomain | SpiffeId) -> TrustDomain:
        """Accept ``example.org``, ``spiffe://example.org`` or any SPIFFE ID of the domain."""
        if isinstance(value, TrustDomain):
            return value
        if isinstance(value, SpiffeId):
            return cls(value.trust_domain)
        if isinstance(value, str) and "://" in value:
            return cls(_split(value)[0])
        if not isinstance(value, str):
            raise SpiffeIdError(f"a trust domain must be a string, not {type(value).__name__}")
        return cls(value)

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>`` (no path)."""
        return SpiffeId(self.name, "")

    def __str__(self) -> str:
        return self.name


def _td_name(value: str | TrustDomain | SpiffeId) -> str:
    return TrustDomain.parse(value).name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID. Build one with :meth:`parse` or :meth:`for_workload`.

    Frozen and hashable; ``str()`` gives the canonical ``spiffe://td/path`` form. Direct
    construction (``SpiffeId(trust_domain, path)``) validates too.
    """

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        s = SCHEME + self.trust_domain + self.path
        if self.path and not self.path.startswith("/"):
            raise _id_error(s, "the path must start with '/'", len(SCHEME) + len(self.trust_domain))
        _split(s)

    @classmethod
    def parse(cls, value: str | SpiffeId) -> SpiffeId:
        """Parse and validate; raise :class:`~ztun.errors.SpiffeIdError` saying which rule broke."""
        if isinstance(value, SpiffeId):
            return value
        td, path = _split(value)
        return cls(td, path)

    @classmethod
    def for_workload(
        cls, trust_domain: str | TrustDomain, namespace: str, service_account: str
    ) -> SpiffeId:
        """``spiffe://<td>/ns/<namespace>/sa/<service_account>`` (Istio's identity shape)."""
        for what, seg in (("namespace", namespace), ("service account", service_account)):
            if not isinstance(seg, str) or not seg or "/" in seg:
                raise SpiffeIdError(f"invalid {what} {seg!r}: must be one non-empty path segment")
        return cls.parse(f"{SCHEME}{_td_name(trust_domain)}/ns/{namespace}/sa/{service_account}")

    @property
    def td(self) -> TrustDomain:
        return TrustDomain(self.trust_domain)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    @property
    def namespace(self) -> str | None:
        """The namespace of a ``/ns/<ns>/sa/<sa>`` ID, else None."""
        seg = self.segments
        return seg[1] if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" else None

    @property
    def service_account(self) -> str | None:
        """The service account of a ``/ns/<ns>/sa/<sa>`` ID, else None."""
        seg = self.segments
        return seg[3] if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" else None

    @property
    def principal(self) -> str:
        """The ID without ``spiffe://``: what Istio policy principals are matched against."""
        return self.trust_domain + self.path

    def member_of(self, trust_domain: str | TrustDomain) -> bool:
        return self.trust_domain == _td_name(trust_domain)

    def __str__(self) -> str:
        return SCHEME + self.trust_domain + self.path

    def __repr__(self) -> str:
        return f"SpiffeId({str(self)!r})"


# --------------------------------------------------------------------------------------------
# Certificates: small readers


def _describe(cert: x509.Certificate) -> str:
    """A short human name for a certificate: its URI SAN, else its subject, plus serial."""
    name = cert.subject.rfc4514_string() or "<empty subject>"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if uris:
            name = ", ".join(uris)
    except x509.ExtensionNotFound:
        pass
    return f"{name!r} (serial {cert.serial_number:x})"


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    bc = _basic_constraints(cert)
    return bc is not None and bc.ca


def _check_signing_cert(cert: x509.Certificate, role: str) -> str | None:
    """Why ``cert`` cannot sign certificates, or None when it can."""
    if not _is_ca(cert):
        return f"{role} {_describe(cert)} is not a CA (basicConstraints CA:TRUE missing)"
    ku = _key_usage(cert)
    if ku is not None and not ku.key_cert_sign:
        return f"{role} {_describe(cert)} has a key usage without keyCertSign"
    return None


def _load_certs(data: bytes, what: str) -> list[x509.Certificate]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedCertificateError(f"{what}: expected PEM bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise MalformedCertificateError(f"{what}: not a valid certificate PEM: {e}") from None
    if not certs:
        raise MalformedCertificateError(f"{what}: no certificate found")
    return certs


def _load_key(data: bytes, what: str) -> PrivateKey:
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(bytes(data), password=None)
        else:
            key = serialization.load_der_private_key(bytes(data), password=None)
        return _x509.as_private_key(key)
    except TypeError as e:
        # Raised both for encrypted keys (password=None) and for unsupported key types.
        raise MalformedCertificateError(f"{what}: unusable private key: {e}") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        # Never include the input in the message: it is key material.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MalformedCertificateError(f"{what}: not a valid private key: {reason}") from None


def _leaf_spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    """Exactly one URI SAN, a SPIFFE ID with a path; otherwise the matching SvidError."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise NoUriSanError(
            f"no URI SAN: leaf {_describe(leaf)} has no subjectAltName extension; "
            "an X.509-SVID carries its SPIFFE ID as exactly one URI SAN"
        ) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        others = ", ".join(str(n.value) for n in san) or "nothing"
        raise NoUriSanError(
            f"no URI SAN: leaf {_describe(leaf)} names only {others}; "
            "an X.509-SVID carries its SPIFFE ID as exactly one URI SAN"
        )
    if len(uris) > 1:
        raise MultipleUriSansError(
            f"multiple URI SANs: leaf has {len(uris)} ({', '.join(uris)}); "
            "an X.509-SVID has exactly one"
        )
    try:
        sid = SpiffeId.parse(uris[0])
    except SpiffeIdError as e:
        raise NonSpiffeUriError(f"non-SPIFFE URI SAN: {e}") from None
    if not sid.path:
        raise NonSpiffeUriError(
            f"non-SPIFFE URI SAN: {sid} names a trust domain, not a workload (no path)"
        )
    return sid


def _check_leaf(leaf: x509.Certificate) -> SpiffeId:
    """The per-leaf SVID rules: URI SAN, CA:FALSE, key usage. Returns the leaf's ID."""
    sid = _leaf_spiffe_id(leaf)
    if _is_ca(leaf):
        raise LeafIsCaError(f"leaf is a CA: {sid} (serial {leaf.serial_number:x}) says CA:TRUE")
    ku = _key_usage(leaf)
    if ku is None:
        raise KeyUsageError(
            f"wrong key usage: leaf {sid} has no keyUsage extension (digitalSignature required)"
        )
    if not ku.digital_signature:
        raise KeyUsageError(f"wrong key usage: leaf {sid} lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise KeyUsageError(f"wrong key usage: leaf {sid} allows keyCertSign/cRLSign")
    return sid


def _utc(t: dt.datetime | None) -> dt.datetime:
    if t is None:
        return _x509.utcnow()
    if t.tzinfo is None:
        return t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# Trust bundles


class TrustBundle:
    """CA certificates trusted per trust domain. Immutable: :meth:`add` and :meth:`merge`
    return new bundles, so a bundle can be shared between threads without locks.

    Only CA certificates (basicConstraints CA:TRUE, keyCertSign when key usage is present)
    are accepted. Each is an anchor for SVIDs of its own trust domain only.
    """

    __slots__ = ("_roots",)

    def __init__(
        self,
        roots: Mapping[str, Iterable[x509.Certificate]]
        | Mapping[TrustDomain, Iterable[x509.Certificate]]
        | None = None,
    ) -> None:
        self._roots: dict[str, tuple[x509.Certificate, ...]] = {}
        for td, certs in (roots or {}).items():
            self._roots = self._with(self._roots, td, certs)

    @staticmethod
    def _with(
        current: Mapping[str, tuple[x509.Certificate, ...]],
        td: str | TrustDomain,
        certs: Iterable[x509.Certificate],
    ) -> dict[str, tuple[x509.Certificate, ...]]:
        name = _td_name(td)
        merged = list(current.get(name, ()))
        seen = {c.fingerprint(hashes.SHA256()) for c in merged}
        for cert in certs:
            if not isinstance(cert, x509.Certificate):
                raise IdentityError(
                    f"trust bundle for {name!r}: expected x509.Certificate, "
                    f"got {type(cert).__name__}"
                )
            why = _check_signing_cert(cert, "root")
            if why is not None:
                raise IdentityError(
                    f"trust bundle for {name!r}: {why}; a bundle holds CA certificates"
                )
            fp = cert.fingerprint(hashes.SHA256())
            if fp not in seen:
                seen.add(fp)
                merged.append(cert)
        out = dict(current)
        if merged:
            out[name] = tuple(merged)
        return out

    @classmethod
    def from_pem(cls, trust_domain: str | TrustDomain, pem: bytes) -> TrustBundle:
        certs = _load_certs(pem, f"trust bundle for {_td_name(trust_domain)!r}")
        return cls().add(trust_domain, certs)

    @classmethod
    def from_file(
        cls, trust_domain: str | TrustDomain, path: str | os.PathLike[str]
    ) -> TrustBundle:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise IdentityError(f"{os.fspath(path)}: cannot read: {e.strerror}") from None
        try:
            return cls.from_pem(trust_domain, data)
        except IdentityError as e:
            raise type(e)(f"{os.fspath(path)}: {e}") from None

    def add(
        self, trust_domain: str | TrustDomain, certs: Iterable[x509.Certificate]
    ) -> TrustBundle:
        """A new bundle with ``certs`` added to ``trust_domain``'s roots."""
        new = TrustBundle()
        new._roots = self._with(self._roots, trust_domain, certs)
        return new

    def merge(self, other: TrustBundle) -> TrustBundle:
        """A new bundle holding the roots of both (deduplicated)."""
        new = TrustBundle()
        roots = dict(self._roots)
        for td, certs in other._roots.items():
            roots = self._with(roots, td, certs)
        new._roots = roots
        return new

    @property
    def trust_domains(self) -> list[str]:
        return sorted(self._roots)

    def roots(self, trust_domain: str | TrustDomain) -> list[x509.Certificate]:
        """The roots of ``trust_domain``; empty when the domain is not trusted."""
        return list(self._roots.get(_td_name(trust_domain), ()))

    def pem(self, trust_domain: str | TrustDomain) -> bytes:
        name = _td_name(trust_domain)
        if name not in self._roots:
            raise IdentityError(
                f"no trust bundle for trust domain {name!r} "
                f"(have: {', '.join(self.trust_domains) or 'none'})"
            )
        return _x509.certs_pem(self._roots[name])

    def all_pem(self) -> bytes:
        """Every root of every trust domain, for an OpenSSL store (sorted by trust domain)."""
        return b"".join(_x509.certs_pem(self._roots[td]) for td in self.trust_domains)

    def __contains__(self, trust_domain: object) -> bool:
        if not isinstance(trust_domain, str | TrustDomain):
            return False
        return TrustDomain.parse(trust_domain).name in self._roots

    def __len__(self) -> int:
        return sum(len(v) for v in self._roots.values())

    def __bool__(self) -> bool:
        return bool(self._roots)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustBundle):
            return NotImplemented
        return self._fingerprints() == other._fingerprints()

    def __hash__(self) -> int:
        return hash(
            tuple(sorted((td, tuple(sorted(fps))) for td, fps in self._fingerprints().items()))
        )

    def _fingerprints(self) -> dict[str, frozenset[bytes]]:
        return {
            td: frozenset(c.fingerprint(hashes.SHA256()) for c in certs)
            for td, certs in self._roots.items()
        }

    def __repr__(self) -> str:
        parts = ", ".join(f"{td}: {len(self._roots[td])}" for td in self.trust_domains)
        return f"TrustBundle({{{parts}}})"


# --------------------------------------------------------------------------------------------
# SVIDs


class Svid:
    """An X.509-SVID: a certificate chain (leaf first) and the leaf's private key.

    Construction validates the SVID rules (one SPIFFE URI SAN, CA:FALSE, digitalSignature,
    chain order, key matches the leaf) but not time or trust: that is :func:`verify_svid`.
    ``repr()``/``str()`` never show key material; :meth:`key_pem` returns it in memory only.
    """

    __slots__ = ("_chain", "_key", "_spiffe_id")

    def __init__(self, chain: Sequence[x509.Certificate], private_key: PrivateKey) -> None:
        chain = list(chain)
        if not chain:
            raise MalformedCertificateError("an SVID needs at least one certificate (the leaf)")
        for cert in chain:
            if not isinstance(cert, x509.Certificate):
                raise MalformedCertificateError(
                    f"SVID chain: expected x509.Certificate, got {type(cert).__name__}"
                )
        try:
            key = _x509.as_private_key(private_key)
        except TypeError as e:
            raise MalformedCertificateError(f"SVID key: {e}") from None
        self._spiffe_id = _check_leaf(chain[0])
        for i in range(len(chain) - 1):
            child, parent = chain[i], chain[i + 1]
            if child.issuer != parent.subject:
                raise MalformedCertificateError(
                    f"SVID chain out of order: certificate {i} was issued by "
                    f"{child.issuer.rfc4514_string()!r}, but certificate {i + 1} is "
                    f"{parent.subject.rfc4514_string()!r}"
                )
            why = _check_signing_cert(parent, f"certificate {i + 1}")
            if why is not None:
                raise MalformedCertificateError(f"SVID chain: {why}")
        if _x509.public_key_der(key) != _x509.public_key_der(_pub(chain[0])):
            raise KeyMismatchError(
                f"the private key does not belong to the leaf certificate of {self._spiffe_id}"
            )
        self._chain = tuple(chain)
        self._key = key

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes) -> Svid:
        chain = _load_certs(chain_pem, "SVID chain")
        key = _load_key(key_pem, "SVID key")
        return cls(chain, key)

    @classmethod
    def from_files(
        cls, chain_path: str | os.PathLike[str], key_path: str | os.PathLike[str]
    ) -> Svid:
        chain_data = _read(chain_path, "certificate chain")
        key_data = _read(key_path, "private key")
        chain = _prefixed(lambda: _load_certs(chain_data, "SVID chain"), chain_path)
        key = _prefixed(lambda: _load_key(key_data, "SVID key"), key_path)
        return _prefixed(lambda: cls(chain, key), chain_path)

    @property
    def spiffe_id(self) -> SpiffeId:
        return self._spiffe_id

    @property
    def chain(self) -> list[x509.Certificate]:
        return list(self._chain)

    @property
    def leaf(self) -> x509.Certificate:
        return self._chain[0]

    @property
    def private_key(self) -> PrivateKey:
        return self._key

    def chain_pem(self) -> bytes:
        return _x509.certs_pem(self._chain)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM. Keep it in memory; never log it."""
        return _x509.key_pem(self._key)

    @property
    def not_before(self) -> dt.datetime:
        return self._chain[0].not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self._chain[0].not_valid_after_utc

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    @property
    def renew_at(self) -> dt.datetime:
        """Half-way through the lifetime (ztunnel's and Istio's refresh point)."""
        return self.not_before + self.lifetime / 2

    @property
    def serial(self) -> str:
        return f"{self._chain[0].serial_number:x}"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf (hex), for logs and config dumps."""
        return self._chain[0].fingerprint(hashes.SHA256()).hex()

    def is_valid_at(self, now: dt.datetime | None = None) -> bool:
        t = _utc(now)
        return self.not_before <= t <= self.not_after

    def __repr__(self) -> str:
        return (
            f"Svid({self._spiffe_id}, serial={self.serial}, "
            f"not_before={_iso(self.not_before)}, not_after={_iso(self.not_after)})"
        )

    __str__ = __repr__


def _pub(cert: x509.Certificate) -> _x509.PublicKey:
    key = cert.public_key()
    if not isinstance(key, _x509.PublicKey):
        raise MalformedCertificateError(
            f"certificate {_describe(cert)} has an unsupported key type {type(key).__name__}"
        )
    return key


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise IdentityError(f"{os.fspath(path)}: cannot read {what}: {e.strerror}") from None


def _prefixed(fn: Callable[[], _T], path: str | os.PathLike[str]) -> _T:
    """Run ``fn``; an IdentityError it raises gets ``path`` in front of its message."""
    try:
        return fn()
    except IdentityError as e:
        raise type(e)(f"{os.fspath(path)}: {e}") from None


# --------------------------------------------------------------------------------------------
# Verification


def _check_time(cert: x509.Certificate, now: dt.datetime, role: str) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateNotYetValidError(
            f"certificate not yet valid: {role} {_describe(cert)} is valid from "
            f"{_iso(cert.not_valid_before_utc)}, now is {_iso(now)}"
        )
    if now > cert.not_valid_after_utc:
        raise CertificateExpiredError(
            f"certificate expired: {role} {_describe(cert)} expired at "
            f"{_iso(cert.not_valid_after_utc)}, now is {_iso(now)}"
        )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _check_critical_extensions(cert: x509.Certificate, role: str) -> None:
    for ext in cert.extensions:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            raise MalformedCertificateError(
                f"{role} {_describe(cert)} has an unsupported critical extension "
                f"{ext.oid.dotted_string}"
            )


def _uri_host_matches(host: str, constraint: str) -> bool:
    # RFC 5280 4.2.1.10: a constraint starting with '.' matches any subdomain; otherwise the
    # host must equal it. Trust domains are lowercase, so compare lowercase.
    constraint = constraint.lower()
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint


def _check_name_constraints(ca: x509.Certificate, sid: SpiffeId) -> None:
    try:
        nc = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return
    host = sid.trust_domain
    permitted = [
        n.value
        for n in nc.permitted_subtrees or ()
        if isinstance(n, x509.UniformResourceIdentifier)
    ]
    excluded = [
        n.value for n in nc.excluded_subtrees or () if isinstance(n, x509.UniformResourceIdentifier)
    ]
    if permitted and not any(_uri_host_matches(host, c) for c in permitted):
        raise UnknownCaError(
            f"unknown CA: {_describe(ca)} may only sign URIs under "
            f"{', '.join(permitted)}, not {sid}"
        )
    if any(_uri_host_matches(host, c) for c in excluded):
        raise UnknownCaError(f"unknown CA: {_describe(ca)} may not sign URIs like {sid}")


def _build_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    td: str,
) -> list[x509.Certificate]:
    """leaf -> ... -> anchor (an element of ``roots``), or raise UnknownCaError."""
    path = [leaf]
    pool = list(intermediates)
    current = leaf
    for _ in range(MAX_CHAIN_DEPTH):
        anchor = next((r for r in roots if _issued_by(current, r)), None)
        if anchor is not None:
            path.append(anchor)
            return path
        parent = next((c for c in pool if _issued_by(current, c)), None)
        if parent is None:
            issuer = current.issuer.rfc4514_string() or "<empty name>"
            raise UnknownCaError(
                f"unknown CA: no certificate in the trust bundle of {td!r} issued "
                f"{_describe(current)} (issuer {issuer!r})"
            )
        why = _check_signing_cert(parent, "intermediate")
        if why is not None:
            raise UnknownCaError(f"unknown CA: {why}")
        pool.remove(parent)
        path.append(parent)
        current = parent
    raise UnknownCaError(f"unknown CA: chain longer than {MAX_CHAIN_DEPTH} certificates")


def _as_chain(chain: Sequence[x509.Certificate] | bytes | Svid) -> list[x509.Certificate]:
    if isinstance(chain, Svid):
        return chain.chain
    if isinstance(chain, bytes | bytearray | memoryview):
        return _load_certs(bytes(chain), "peer chain")
    certs = list(chain)
    if not certs:
        raise MalformedCertificateError("no certificate: the peer chain is empty")
    return certs


def verify_svid(
    chain: Sequence[x509.Certificate] | bytes | Svid,
    bundle: TrustBundle,
    *,
    expect: Iterable[SpiffeId | str] | None = None,
    trust_domain: str | TrustDomain | None = None,
    now: dt.datetime | None = None,
) -> SpiffeId:
    """Verify an X.509-SVID chain (leaf first; PEM bytes accepted) and return its SPIFFE ID.

    ``expect``: the peer must be one of these IDs (client side; an empty list accepts no
    one). ``trust_domain``: the peer must be in this trust domain (server side). ``now``
    defaults to the current time. Raises a :class:`~ztun.errors.SvidError` subclass whose
    ``reason`` names the broken rule, checked in this order: leaf shape (URI SAN, CA flag,
    key usage), trust domain, chain to the bundle of the leaf's trust domain, validity of
    every certificate on the path (leaf first), expected IDs.
    """
    certs = _as_chain(chain)
    if not isinstance(bundle, TrustBundle):
        raise TypeError(f"bundle must be a TrustBundle, not {type(bundle).__name__}")
    t = _utc(now)
    leaf = certs[0]
    sid = _check_leaf(leaf)
    _check_critical_extensions(leaf, "leaf")

    if trust_domain is not None:
        want = _td_name(trust_domain)
        if sid.trust_domain != want:
            raise TrustDomainMismatchError(
                f"other trust domain: peer {sid} is in trust domain {sid.trust_domain!r}, "
                f"not {want!r}"
            )
    roots = bundle.roots(sid.trust_domain)
    if not roots:
        raise TrustDomainMismatchError(
            f"other trust domain: no trust bundle for trust domain {sid.trust_domain!r} of "
            f"{sid} (trusted: {', '.join(bundle.trust_domains) or 'none'})"
        )

    path = _build_path(leaf, certs[1:], roots, sid.trust_domain)
    for depth, ca in enumerate(path[1:], start=1):
        _check_critical_extensions(ca, "CA")
        _check_name_constraints(ca, sid)
        bc = _basic_constraints(ca)
        # path_length counts the intermediates below this CA (leaf excluded).
        below = depth - 1
        if bc is not None and bc.path_length is not None and below > bc.path_length:
            raise UnknownCaError(
                f"unknown CA: {_describe(ca)} allows {bc.path_length} intermediate(s) below it, "
                f"the chain has {below}"
            )
    for i, cert in enumerate(path):
        role = "leaf" if i == 0 else ("root" if i == len(path) - 1 else "intermediate")
        _check_time(cert, t, role)

    if expect is not None:
        wanted = [SpiffeId.parse(e) for e in expect]
        if sid not in wanted:
            shown = ", ".join(str(w) for w in wanted) or "none"
            raise UnexpectedSpiffeIdError(f"unexpected SPIFFE ID: peer is {sid}, expected {shown}")
    return sid


# --------------------------------------------------------------------------------------------
# Identity sources


@runtime_checkable
class IdentitySource(Protocol):
    """Where certificates come from (ztunnel's ``CaClient``); the rotation driver calls it.

    ``fetch`` returns a current SVID for ``spiffe_id`` (a CA issues a fresh one; files and the
    Workload API return what they hold) or raises IdentityError. ``bundle`` returns the roots
    to verify peers with. ``poll`` is a cheap check, called about once a second by
    :class:`~ztun.rotation.IdentityManager`: True when ``fetch``/``bundle`` would now return
    something new (files changed on disk, the Workload API pushed an update); sources whose
    material only changes when fetched return False. ``close`` releases what the source
    holds (threads, sockets).
    """

    def fetch(self, spiffe_id: SpiffeId) -> Svid: ...

    def bundle(self) -> TrustBundle: ...

    def poll(self) -> bool: ...

    def close(self) -> None: ...


_FileSig = tuple[tuple[int, int, int, int] | None, ...]


def _stat_sig(paths: Sequence[Path]) -> _FileSig:
    out: list[tuple[int, int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)  # follows symlinks: kubelet's ..data swap changes the target inode
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass
class _FileState:
    svid: Svid
    bundle: TrustBundle
    sig: _FileSig
    rejected: _FileSig | None = field(default=None)


class FileIdentitySource:
    """An SVID and its trust bundle from PEM files, reloaded when they change on disk.

    Changes are noticed by comparing (device, inode, size, mtime) of the three files, so
    both in-place writes and atomic renames (cert-manager, spiffe-helper, kubelet's
    ``..data`` symlink swap) are seen. A new set is used only when it is complete and
    consistent: the chain parses, the key matches the leaf, and the chain verifies against
    the bundle (and ``trust_domain``) now. Otherwise the previous identity is kept and one
    warning naming the file is logged for that version of the files.

    ``trust_domain`` is the trust domain the bundle file holds roots for; by default the
    trust domain of the SVID in ``chain_path``.
    """

    def __init__(
        self,
        chain_path: str | os.PathLike[str],
        key_path: str | os.PathLike[str],
        bundle_path: str | os.PathLike[str],
        *,
        trust_domain: str | TrustDomain | None = None,
    ) -> None:
        self.chain_path = Path(chain_path)
        self.key_path = Path(key_path)
        self.bundle_path = Path(bundle_path)
        self._td = None if trust_domain is None else _td_name(trust_domain)
        self._lock = threading.Lock()
        sig = _stat_sig(self._paths)
        svid, bundle = self._load()
        self._state = _FileState(svid, bundle, sig)
        log.info(
            "loaded identity %s from %s (serial %s, not after %s)",
            svid.spiffe_id,
            self.chain_path,
            svid.serial,
            _iso(svid.not_after),
        )

    @property
    def _paths(self) -> tuple[Path, Path, Path]:
        return (self.chain_path, self.key_path, self.bundle_path)

    def _load(self) -> tuple[Svid, TrustBundle]:
        chain_data = _read(self.chain_path, "certificate chain")
        key_data = _read(self.key_path, "private key")
        bundle_data = _read(self.bundle_path, "trust bundle")
        chain = _prefixed(lambda: _load_certs(chain_data, "certificate chain"), self.chain_path)
        key = _prefixed(lambda: _load_key(key_data, "private key"), self.key_path)
        try:
            svid = Svid(chain, key)
        except KeyMismatchError as e:
            raise KeyMismatchError(f"{self.key_path}: {e} in {self.chain_path}") from None
        except IdentityError as e:
            raise type(e)(f"{self.chain_path}: {e}") from None
        td = self._td or svid.spiffe_id.trust_domain
        bundle = _prefixed(lambda: TrustBundle.from_pem(td, bundle_data), self.bundle_path)
        try:
            verify_svid(svid, bundle, trust_domain=td)
        except IdentityError as e:
            raise type(e)(
                f"{self.chain_path}: does not verify against {self.bundle_path}: {e}"
            ) from None
        return svid, bundle

    def poll(self) -> bool:
        """Reload if a file changed; True when a new SVID or bundle is now in use."""
        sig = _stat_sig(self._paths)
        with self._lock:
            state = self._state
            if sig in (state.sig, state.rejected):
                return False
        try:
            svid, bundle = self._load()
        except IdentityError as e:
            if _stat_sig(self._paths) != sig:
                return False  # still being written: look again on the next poll
            with self._lock:
                self._state.rejected = sig
            log.warning(
                "ignoring changed identity files: %s; keeping %s (serial %s, not after %s)",
                e,
                state.svid.spiffe_id,
                state.svid.serial,
                _iso(state.svid.not_after),
            )
            return False
        if _stat_sig(self._paths) != sig:
            return False
        with self._lock:
            changed = svid.leaf != self._state.svid.leaf or bundle != self._state.bundle
            self._state = _FileState(svid, bundle, sig)
        if changed:
            log.info(
                "reloaded identity %s from %s (serial %s, not after %s)",
                svid.spiffe_id,
                self.chain_path,
                svid.serial,
                _iso(svid.not_after),
            )
        return changed

    def fetch(self, spiffe_id: SpiffeId | str) -> Svid:
        want = SpiffeId.parse(spiffe_id)
        self.poll()
        with self._lock:
            svid = self._state.svid
        if svid.spiffe_id != want:
            raise IdentityError(f"{self.chain_path} holds {svid.spiffe_id}, not {want}")
        return svid

    def bundle(self) -> TrustBundle:
        with self._lock:
            return self._state.bundle

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"FileIdentitySource({os.fspath(self.chain_path)!r})"
