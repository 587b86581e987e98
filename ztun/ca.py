"""The embedded certificate authority: ztun's standalone identity source.

Like ztunnel's local mode, a node (or an embedding program) that has no SPIRE or Istio CA
runs its own: a self-signed ECDSA P-256 root kept in a state directory, which signs
workload SVIDs from CSRs (empty subject, exactly one SPIFFE URI SAN of its trust domain).

State directory layout (mode 0700)::

    ca-cert.pem   the root certificate (0644)
    ca-key.pem    its private key, PKCS#8 (0600, written atomically)
    .lock         flock'ed while loading or creating, so two processes agree on one root
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ztun import _x509
from ztun.errors import IdentityError, MalformedCertificateError
from ztun.identity import (
    SpiffeId,
    Svid,
    TrustBundle,
    TrustDomain,
    _check_signing_cert,
    _load_certs,
    _load_key,
    _pub,
)

__all__ = [
    "DEFAULT_ROOT_VALIDITY",
    "DEFAULT_SVID_VALIDITY",
    "CaIdentitySource",
    "CertificateAuthority",
]

log = logging.getLogger(__name__)

DEFAULT_SVID_VALIDITY = dt.timedelta(hours=24)  # ztunnel / Istio default workload cert TTL
DEFAULT_ROOT_VALIDITY = dt.timedelta(days=3650)  # Istio's self-signed root: 10 years
# New SVIDs start a little in the past so that a peer whose clock lags slightly does not
# see them as not yet valid (SPIRE backdates by 10 s). Never more than a tenth of the
# lifetime, so short test certificates keep most of theirs.
MAX_BACKDATE = dt.timedelta(seconds=10)
CERT_FILE = "ca-cert.pem"
KEY_FILE = "ca-key.pem"
LOCK_FILE = ".lock"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class CertificateAuthority:
    """A persistent SPIFFE CA for one trust domain.

    The root is created on first use in ``state_dir`` and reloaded on the next start;
    an existing root for another trust domain, or a key that does not match the
    certificate, is refused rather than replaced. ``validity`` is the default lifetime of
    issued SVIDs (24 h); it is capped by the root's own expiry.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        trust_domain: str | TrustDomain,
        *,
        validity: dt.timedelta = DEFAULT_SVID_VALIDITY,
        root_validity: dt.timedelta = DEFAULT_ROOT_VALIDITY,
    ) -> None:
        if validity <= dt.timedelta(0):
            raise ValueError(f"validity must be positive, not {validity}")
        self.trust_domain = TrustDomain.parse(trust_domain).name
        self.state_dir = Path(state_dir)
        self.validity = validity
        self._prepare_dir()
        with _locked(self.state_dir / LOCK_FILE):
            if (self.state_dir / KEY_FILE).exists() or (self.state_dir / CERT_FILE).exists():
                self._cert, self._key = self._load()
                log.info(
                    "loaded CA root for trust domain %s from %s (serial %x, sha256 %s, "
                    "not after %s)",
                    self.trust_domain, self.state_dir, self._cert.serial_number,
                    self._cert.fingerprint(hashes.SHA256()).hex(),
                    self._cert.not_valid_after_utc.isoformat(),
                )  # fmt: skip
            else:
                self._cert, self._key = self._create(root_validity)
        self._bundle = TrustBundle({self.trust_domain: [self._cert]})

    # -- state directory ------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.state_dir.stat()
        if stat.S_IMODE(st.st_mode) != 0o700:
            if st.st_uid != os.geteuid():
                raise IdentityError(
                    f"{self.state_dir}: CA state directory has mode "
                    f"{stat.S_IMODE(st.st_mode):o} and is not ours to tighten to 0700"
                )
            log.warning(
                "%s: tightening CA state directory mode %o to 0700",
                self.state_dir,
                stat.S_IMODE(st.st_mode),
            )
            os.chmod(self.state_dir, 0o700)

    def _create(self, root_validity: dt.timedelta) -> tuple[x509.Certificate, _x509.PrivateKey]:
        key = _x509.new_private_key("ec-p256")
        now = _x509.utcnow()
        cert = _x509.build_certificate(
            subject=x509.Name(
                [
                    x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, self.trust_domain),
                    x509.NameAttribute(x509.NameOID.COMMON_NAME, "ztun root CA"),
                ]
            ),
            public_key=key.public_key(),
            issuer=None,
            issuer_key=key,
            not_before=now - dt.timedelta(minutes=1),
            not_after=now + root_validity,
            is_ca=True,
            usage=_x509.CA_KEY_USAGE,
            sans=[x509.UniformResourceIdentifier(str(TrustDomain(self.trust_domain).id))],
        )
        # Key first: a directory with a certificate but no key is refused on the next start,
        # one with a key but no certificate too, but the key is never half-written.
        _x509.write_private(self.state_dir / KEY_FILE, _x509.key_pem(key), 0o600)
        _x509.write_private(self.state_dir / CERT_FILE, _x509.certs_pem([cert]), 0o644)
        log.info(
            "created CA root for trust domain %s in %s (serial %x, sha256 %s)",
            self.trust_domain,
            self.state_dir,
            cert.serial_number,
            cert.fingerprint(hashes.SHA256()).hex(),
        )
        return cert, key

    def _load(self) -> tuple[x509.Certificate, _x509.PrivateKey]:
        cert_path, key_path = self.state_dir / CERT_FILE, self.state_dir / KEY_FILE
        for p in (cert_path, key_path):
            if not p.exists():
                raise IdentityError(
                    f"{p}: missing, but {self.state_dir} holds part of a CA; "
                    "restore it or empty the directory to create a new root"
                )
        key_mode = stat.S_IMODE(key_path.stat().st_mode)
        if key_mode & 0o077:
            log.warning("%s: CA key mode %o, tightening to 0600", key_path, key_mode)
            os.chmod(key_path, 0o600)
        try:
            certs = _load_certs(cert_path.read_bytes(), "CA certificate")
            key = _load_key(key_path.read_bytes(), "CA key")
        except MalformedCertificateError as e:
            raise IdentityError(f"{self.state_dir}: {e}") from None
        cert = certs[0]
        why = _check_signing_cert(cert, "CA certificate")
        if why is not None:
            raise IdentityError(f"{cert_path}: {why}")
        if _x509.public_key_der(key) != _x509.public_key_der(_pub(cert)):
            raise IdentityError(f"{key_path}: the CA key does not match {cert_path}")
        td = _root_trust_domain(cert)
        if td != self.trust_domain:
            raise IdentityError(
                f"{cert_path}: the CA in {self.state_dir} is for trust domain {td!r}, "
                f"not {self.trust_domain!r}; use another state directory"
            )
        if cert.not_valid_after_utc <= _x509.utcnow():
            raise IdentityError(
                f"{cert_path}: the CA root expired at {cert.not_valid_after_utc.isoformat()}; "
                "move the state directory away to create a new root"
            )
        return cert, key

    # -- issuing --------------------------------------------------------------------------

    @property
    def root(self) -> x509.Certificate:
        return self._cert

    @property
    def bundle(self) -> TrustBundle:
        return self._bundle

    def issue(self, spiffe_id: SpiffeId | str, *, validity: dt.timedelta | None = None) -> Svid:
        """A fresh SVID: a new ECDSA P-256 key, a CSR for ``spiffe_id``, signed here."""
        sid = SpiffeId.parse(spiffe_id)
        key = _x509.new_private_key("ec-p256")
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))]),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        chain = self.sign_csr(csr.public_bytes(_PEM), validity=validity)
        return Svid(chain, key)

    def sign_csr(
        self, csr_pem: bytes, *, validity: dt.timedelta | None = None
    ) -> list[x509.Certificate]:
        """Sign a CSR whose only name is one SPIFFE URI SAN of this trust domain.

        Returns the chain, leaf first, without the root (the peer has it in its bundle).
        The subject of the CSR is not copied: SVIDs carry an empty subject, as Istio's.
        """
        try:
            csr = x509.load_pem_x509_csr(bytes(csr_pem))
        except (ValueError, TypeError) as e:
            raise IdentityError(f"CSR: not a valid PEM certificate request: {e}") from None
        if not csr.is_signature_valid:
            raise IdentityError("CSR: its signature does not verify (proof of key possession)")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise IdentityError("CSR: no subjectAltName; need exactly one SPIFFE URI") from None
        names = list(san)
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(names) != 1 or len(uris) != 1:
            shown = ", ".join(f"{type(n).__name__}:{n.value}" for n in names)
            raise IdentityError(f"CSR: SAN must be exactly one SPIFFE URI, got {shown}")
        try:
            sid = SpiffeId.parse(uris[0])
        except IdentityError as e:
            raise IdentityError(f"CSR: {e}") from None
        if sid.trust_domain != self.trust_domain:
            raise IdentityError(
                f"CSR: {sid} is in trust domain {sid.trust_domain!r}; this CA signs only "
                f"{self.trust_domain!r}"
            )
        if not sid.path:
            raise IdentityError(f"CSR: {sid} names the trust domain itself, not a workload")
        public_key = csr.public_key()
        if not isinstance(public_key, _x509.PublicKey):
            raise IdentityError(f"CSR: unsupported key type {type(public_key).__name__}")
        lifetime = self.validity if validity is None else validity
        if lifetime <= dt.timedelta(0):
            raise ValueError(f"validity must be positive, not {lifetime}")
        now = _x509.utcnow()
        backdate = min(MAX_BACKDATE, lifetime / 10)
        not_after = min(now + lifetime, self._cert.not_valid_after_utc)
        cert = _x509.build_certificate(
            subject=x509.Name([]),
            public_key=public_key,
            issuer=self._cert,
            issuer_key=self._key,
            not_before=now - backdate,
            not_after=not_after,
            is_ca=False,
            usage=_x509.leaf_key_usage(public_key),
            sans=[x509.UniformResourceIdentifier(str(sid))],
            eku=_x509.MTLS_EKU,
        )
        log.debug("issued %s (serial %x, not after %s)", sid, cert.serial_number, not_after)
        return [cert]

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority({self.trust_domain!r}, {os.fspath(self.state_dir)!r}, "
            f"serial={self._cert.serial_number:x})"
        )


_PEM = serialization.Encoding.PEM


def _root_trust_domain(cert: x509.Certificate) -> str:
    """The trust domain a root was made for: its ``spiffe://<td>`` URI SAN, else its O=."""
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            with contextlib.suppress(IdentityError):
                return SpiffeId.parse(uri).trust_domain
    orgs = cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
    return str(orgs[0].value) if orgs else ""


class CaIdentitySource:
    """The embedded CA as an :class:`~ztun.identity.IdentitySource`: each fetch issues anew."""

    def __init__(self, ca: CertificateAuthority, *, validity: dt.timedelta | None = None) -> None:
        self.ca = ca
        self.validity = validity

    def fetch(self, spiffe_id: SpiffeId | str) -> Svid:
        sid = SpiffeId.parse(spiffe_id)
        if sid.trust_domain != self.ca.trust_domain:
            raise IdentityError(
                f"{sid} is not in the embedded CA's trust domain {self.ca.trust_domain!r}"
            )
        return self.ca.issue(sid, validity=self.validity)

    def bundle(self) -> TrustBundle:
        return self.ca.bundle

    def poll(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"CaIdentitySource({self.ca!r})"
