"""Test certificates for SPIFFE mTLS: good SVIDs and each kind of deliberately bad one.

:class:`SpiffeCA` follows trustme's shape (``CA`` -> ``issue_cert``, ``cert_pem``,
``configure_trust``), which cannot issue URI SANs and so cannot make SVIDs::

    ca = SpiffeCA("example.org")
    svid = ca.issue_svid("spiffe://example.org/ns/default/sa/client")
    bad = ca.issue_bad("expired")            # or any BadKind
    chain_path, key_path = bad.write_files(tmp_path)
    bundle_path = ca.write_files(tmp_path)

Every bad certificate has exactly one defect, so every verifier (OpenSSL, the C engine,
:func:`ztun.identity.verify_svid`) must name the same reason whatever order it checks in.
``BadKind`` values are the ``reason`` codes of the matching :mod:`ztun.errors` classes.
Everything is in memory and ephemeral; nothing here is for production use.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from ztun import _x509
from ztun._x509 import KEY_TYPES, KeyType, PrivateKey
from ztun.errors import (
    CertificateExpiredError,
    CertificateNotYetValidError,
    KeyUsageError,
    LeafIsCaError,
    MultipleUriSansError,
    NonSpiffeUriError,
    NoUriSanError,
    SvidError,
    TrustDomainMismatchError,
    UnexpectedSpiffeIdError,
    UnknownCaError,
)
from ztun.identity import SpiffeId, Svid, TrustBundle, TrustDomain

__all__ = [
    "BAD_KIND_ERRORS",
    "KEY_TYPES",
    "BadKind",
    "IssuedCert",
    "KeyType",
    "SpiffeCA",
    "write_svid_files",
]


class BadKind(enum.StrEnum):
    """The ways an SVID can be wrong; each value is the verifier's ``reason`` code."""

    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    UNKNOWN_CA = "unknown_ca"
    OTHER_TRUST_DOMAIN = "other_trust_domain"
    NO_URI_SAN = "no_uri_san"
    MULTIPLE_URI_SANS = "multiple_uri_sans"
    NON_SPIFFE_URI = "non_spiffe_uri"
    UNEXPECTED_SPIFFE_ID = "unexpected_spiffe_id"
    LEAF_IS_CA = "leaf_is_ca"
    BAD_KEY_USAGE = "bad_key_usage"


BAD_KIND_ERRORS: dict[BadKind, type[SvidError]] = {
    BadKind.EXPIRED: CertificateExpiredError,
    BadKind.NOT_YET_VALID: CertificateNotYetValidError,
    BadKind.UNKNOWN_CA: UnknownCaError,
    BadKind.OTHER_TRUST_DOMAIN: TrustDomainMismatchError,
    BadKind.NO_URI_SAN: NoUriSanError,
    BadKind.MULTIPLE_URI_SANS: MultipleUriSansError,
    BadKind.NON_SPIFFE_URI: NonSpiffeUriError,
    BadKind.UNEXPECTED_SPIFFE_ID: UnexpectedSpiffeIdError,
    BadKind.LEAF_IS_CA: LeafIsCaError,
    BadKind.BAD_KEY_USAGE: KeyUsageError,
}


class _Default(enum.Enum):
    """Sentinel: "use the SVID default" for key usage / extended key usage."""

    DEFAULT = enum.auto()


_DEFAULT = _Default.DEFAULT
_MINUTE = dt.timedelta(minutes=1)
_HOUR = dt.timedelta(hours=1)
_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class IssuedCert:
    """A certificate chain (leaf first, no root) and its private key, good or bad.

    ``kind`` is the defect (None for a good certificate); ``expected`` is the SPIFFE ID
    the verifier should be told to expect (what the test asked for), which differs from
    the certificate's own for :attr:`BadKind.UNEXPECTED_SPIFFE_ID`.
    """

    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey = field(repr=False)
    kind: BadKind | None = None
    expected: SpiffeId | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def chain_pem(self) -> bytes:
        return _x509.certs_pem(self.chain)

    def cert_pem(self) -> bytes:
        """The leaf alone."""
        return _x509.certs_pem(self.chain[:1])

    def key_pem(self) -> bytes:
        return _x509.key_pem(self.private_key)

    def private_key_and_cert_chain_pem(self) -> bytes:
        """Key then chain in one PEM blob (trustme's name; what stunnel and haproxy read)."""
        return self.key_pem() + self.chain_pem()

    def to_svid(self) -> Svid:
        """As an :class:`~ztun.identity.Svid` (raises for kinds an Svid refuses)."""
        return Svid(self.chain, self.private_key)

    def write_files(
        self, directory: str | os.PathLike[str], stem: str | None = None
    ) -> tuple[Path, Path]:
        """Write ``<stem>-chain.pem`` and ``<stem>-key.pem`` (0600); return both paths."""
        return _write_pair(Path(directory), stem or (self.kind or "svid"), self)

    def configure_cert(self, ctx: ssl.SSLContext) -> None:
        """Load this chain and key into an ``ssl.SSLContext`` (trustme's method)."""
        with tempfile.TemporaryDirectory(prefix="ztun-cert-") as d:
            chain_path, key_path = self.write_files(d, "cert")
            ctx.load_cert_chain(chain_path, key_path)


def _write_pair(directory: Path, stem: str, item: IssuedCert | Svid) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    chain_path = directory / f"{stem}-chain.pem"
    key_path = directory / f"{stem}-key.pem"
    _x509.write_private(chain_path, item.chain_pem(), 0o644)
    _x509.write_private(key_path, item.key_pem(), 0o600)
    return chain_path, key_path


def write_svid_files(
    svid: Svid | IssuedCert, directory: str | os.PathLike[str], stem: str = "svid"
) -> tuple[Path, Path]:
    """Write an SVID's ``<stem>-chain.pem`` and ``<stem>-key.pem`` (0600), atomically."""
    return _write_pair(Path(directory), stem, svid)


def _other_trust_domain(td: str) -> str:
    return "other.test" if td != "other.test" else "another.test"


def _impostor(sid: SpiffeId) -> SpiffeId:
    if sid.namespace is not None:
        return SpiffeId.for_workload(sid.trust_domain, sid.namespace, "impostor")
    return SpiffeId(sid.trust_domain, "/impostor")


class SpiffeCA:
    """An in-memory SPIFFE CA for tests: a root (and optionally an intermediate).

    ``key_type`` is the CA's key type. With ``intermediate=True`` leaves are signed by an
    intermediate CA and their chains carry it, which exercises chain building.
    """

    def __init__(
        self,
        trust_domain: str | TrustDomain = "example.org",
        *,
        key_type: KeyType = "ec-p256",
        intermediate: bool = False,
        _root_name: str = "ztun test root CA",
    ) -> None:
        self.trust_domain = TrustDomain.parse(trust_domain).name
        self.key_type: KeyType = key_type
        now = _x509.utcnow()
        # Wide root window: a leaf that is expired or not yet valid must be the only thing
        # wrong with its chain.
        root_nb, root_na = now - dt.timedelta(days=30), now + dt.timedelta(days=3650)
        self._root_key = _x509.new_private_key(key_type)
        self.root = _x509.build_certificate(
            subject=x509.Name(
                [
                    x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, self.trust_domain),
                    x509.NameAttribute(x509.NameOID.COMMON_NAME, _root_name),
                ]
            ),
            public_key=self._root_key.public_key(),
            issuer=None,
            issuer_key=self._root_key,
            not_before=root_nb,
            not_after=root_na,
            is_ca=True,
            usage=_x509.CA_KEY_USAGE,
            sans=[x509.UniformResourceIdentifier(str(TrustDomain(self.trust_domain).id))],
        )
        self._signer: tuple[x509.Certificate, PrivateKey] = (self.root, self._root_key)
        self.intermediates: tuple[x509.Certificate, ...] = ()
        if intermediate:
            ikey = _x509.new_private_key(key_type)
            icert = _x509.build_certificate(
                subject=x509.Name(
                    [
                        x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, self.trust_domain),
                        x509.NameAttribute(x509.NameOID.COMMON_NAME, "ztun test intermediate CA"),
                    ]
                ),
                public_key=ikey.public_key(),
                issuer=self.root,
                issuer_key=self._root_key,
                not_before=root_nb,
                not_after=root_na - dt.timedelta(days=1),
                is_ca=True,
                path_length=0,
                usage=_x509.CA_KEY_USAGE,
            )
            self._signer = (icert, ikey)
            self.intermediates = (icert,)
        self._stranger: SpiffeCA | None = None

    # -- trust ----------------------------------------------------------------------------

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle({self.trust_domain: [self.root]})

    @property
    def cert_pem(self) -> bytes:
        """The root certificate PEM (trustme's name)."""
        return _x509.certs_pem([self.root])

    def write_files(self, directory: str | os.PathLike[str], name: str = "bundle.pem") -> Path:
        """Write the trust bundle (the root) to ``directory/name``; return its path."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        _x509.write_private(path / name, self.cert_pem, 0o644)
        return path / name

    def configure_trust(self, ctx: ssl.SSLContext) -> None:
        ctx.load_verify_locations(cadata=self.cert_pem.decode("ascii"))

    # -- issuing --------------------------------------------------------------------------

    def default_id(self) -> SpiffeId:
        return SpiffeId.for_workload(self.trust_domain, "default", "default")

    def issue_svid(
        self,
        spiffe_id: SpiffeId | str | None = None,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        validity: dt.timedelta = dt.timedelta(hours=24),
        key_type: KeyType = "ec-p256",
    ) -> Svid:
        """A good SVID for ``spiffe_id`` (default ``/ns/default/sa/default``).

        The validity window defaults to [now - 1 min, not_before + ``validity``]; give
        ``not_before``/``not_after`` (aware or UTC-naive datetimes) to place it anywhere.
        """
        sid = SpiffeId.parse(spiffe_id) if spiffe_id is not None else self.default_id()
        issued = self.issue_cert(
            uris=[str(sid)],
            not_before=not_before,
            not_after=not_after,
            validity=validity,
            key_type=key_type,
        )
        return issued.to_svid()

    def issue_cert(
        self,
        *,
        uris: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        validity: dt.timedelta = dt.timedelta(hours=24),
        key_type: KeyType = "ec-p256",
        is_ca: bool = False,
        key_usage: x509.KeyUsage | _Default | None = _DEFAULT,
        extended_key_usage: x509.ExtendedKeyUsage | _Default | None = _DEFAULT,
        kind: BadKind | None = None,
        expected: SpiffeId | None = None,
    ) -> IssuedCert:
        """The general builder: any SANs (URIs unvalidated), window, key, CA flag, usages.

        ``key_usage``/``extended_key_usage`` default to an SVID's (digitalSignature [+
        keyEncipherment for RSA]; serverAuth + clientAuth); None leaves the extension out.
        """
        key = _x509.new_private_key(key_type)
        nb = _aware(not_before) if not_before is not None else _x509.utcnow() - _MINUTE
        na = _aware(not_after) if not_after is not None else nb + validity
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        usage = _x509.leaf_key_usage(key) if key_usage is _DEFAULT else key_usage
        eku = _x509.MTLS_EKU if extended_key_usage is _DEFAULT else extended_key_usage
        signer, signer_key = self._signer
        cert = _x509.build_certificate(
            subject=x509.Name([]),
            public_key=key.public_key(),
            issuer=signer,
            issuer_key=signer_key,
            not_before=nb,
            not_after=na,
            is_ca=is_ca,
            usage=usage,
            sans=sans,
            eku=eku,
        )
        return IssuedCert((cert, *self.intermediates), key, kind, expected)

    def issue_tls_cert(
        self, *hostnames: str, key_type: KeyType = "ec-p256", validity: dt.timedelta = _DAY
    ) -> IssuedCert:
        """A plain (non-SPIFFE) TLS server certificate for DNS names / IP addresses,
        signed by this CA, for interop tests (default: ``localhost``, ``127.0.0.1``)."""
        names = hostnames or ("localhost", "127.0.0.1")
        dns, ips = [], []
        for name in names:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                dns.append(name)
            else:
                ips.append(name)
        return self.issue_cert(
            dns_names=dns, ip_addresses=ips, key_type=key_type, validity=validity
        )

    def issue_bad(
        self,
        kind: BadKind | str,
        spiffe_id: SpiffeId | str | None = None,
        *,
        key_type: KeyType = "ec-p256",
    ) -> IssuedCert:
        """A certificate with exactly one defect ``kind``, meant to be presented as
        ``spiffe_id`` (its ``expected`` field); the peer's verifier should be told to
        expect that ID and this CA's trust domain."""
        kind = BadKind(kind)
        sid = SpiffeId.parse(spiffe_id) if spiffe_id is not None else self.default_id()
        now = _x509.utcnow()
        issuer: SpiffeCA = self
        uris: list[str] = [str(sid)]
        dns: list[str] = []
        not_before: dt.datetime | None = None
        not_after: dt.datetime | None = None
        is_ca = False
        usage: x509.KeyUsage | _Default | None = _DEFAULT
        if kind is BadKind.EXPIRED:
            not_before, not_after = now - 2 * _HOUR, now - _HOUR
        elif kind is BadKind.NOT_YET_VALID:
            not_before, not_after = now + _HOUR, now + 2 * _HOUR
        elif kind is BadKind.UNKNOWN_CA:
            # Same trust domain, same shape, but a root nobody trusts.
            if self._stranger is None:
                self._stranger = SpiffeCA(
                    self.trust_domain, key_type=self.key_type, _root_name="untrusted test root CA"
                )
            issuer = self._stranger
        elif kind is BadKind.OTHER_TRUST_DOMAIN:
            # Signed by this CA: only the trust domain is wrong.
            uris = [str(SpiffeId(_other_trust_domain(sid.trust_domain), sid.path or "/workload"))]
        elif kind is BadKind.NO_URI_SAN:
            uris, dns = [], [f"{sid.service_account or 'workload'}.{sid.trust_domain}"]
        elif kind is BadKind.MULTIPLE_URI_SANS:
            uris.append(str(SpiffeId(sid.trust_domain, sid.path + "-second")))
        elif kind is BadKind.NON_SPIFFE_URI:
            uris = [f"https://{sid.trust_domain}{sid.path}"]
        elif kind is BadKind.UNEXPECTED_SPIFFE_ID:
            uris = [str(_impostor(sid))]
        elif kind is BadKind.LEAF_IS_CA:
            is_ca, usage = True, _x509.key_usage(digital_signature=True)
        elif kind is BadKind.BAD_KEY_USAGE:
            usage = _x509.key_usage(key_cert_sign=True)
        return issuer.issue_cert(
            uris=uris,
            dns_names=dns,
            not_before=not_before,
            not_after=not_after,
            key_type=key_type,
            is_ca=is_ca,
            key_usage=usage,
            kind=kind,
            expected=sid,
        )

    def issue_all_bad(self, spiffe_id: SpiffeId | str | None = None) -> dict[BadKind, IssuedCert]:
        """One certificate of every :class:`BadKind`."""
        return {kind: self.issue_bad(kind, spiffe_id) for kind in BadKind}

    def __repr__(self) -> str:
        return f"SpiffeCA({self.trust_domain!r}, serial={self.root.serial_number:x})"


def _aware(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t
