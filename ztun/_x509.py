"""Small X.509 helpers shared by the embedded CA and the test CA (private module).

Everything here is a thin, typed layer over ``cryptography``: key generation, the signing
hash for a key type, certificate building with the extensions an SVID or a signing
certificate carries, atomic private file writes, and UTC time handling.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

# Keys an SVID (or a CA) may hold. ECDSA P-256 is the default everywhere (ztunnel's choice);
# the others exist for interop tests.
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
KeyType: TypeAlias = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "ed25519"]
KEY_TYPES: tuple[KeyType, ...] = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "ed25519")

UTC = dt.UTC


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


def new_private_key(key_type: KeyType = "ec-p256") -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def signing_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The digest to sign with ``key``: none for Ed25519, SHA-384 for P-384, else SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def public_key_der(key: PrivateKey | PublicKey) -> bytes:
    pub = key.public_key() if not isinstance(key, PublicKey) else key
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def as_private_key(key: object) -> PrivateKey:
    """Narrow a loaded key to the types an SVID may hold, or raise TypeError."""
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return key
    raise TypeError(f"unsupported private key type {type(key).__name__}")


def key_pem(key: PrivateKey) -> bytes:
    """PKCS#8, unencrypted: what OpenSSL, SPIRE and cert-manager all read."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def leaf_key_usage(key: PrivateKey | PublicKey) -> x509.KeyUsage:
    """digitalSignature, plus keyEncipherment for RSA keys (as Istio's CA does)."""
    is_rsa = isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey)
    return key_usage(digital_signature=True, key_encipherment=is_rsa)


CA_KEY_USAGE = key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True)
MTLS_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def build_certificate(
    *,
    subject: x509.Name,
    public_key: PublicKey,
    issuer: x509.Certificate | None,
    issuer_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    is_ca: bool,
    path_length: int | None = None,
    usage: x509.KeyUsage | None = None,
    sans: Sequence[x509.GeneralName] = (),
    eku: x509.ExtendedKeyUsage | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """Build and sign one certificate; ``issuer=None`` makes it self-signed.

    The subject alternative name extension is critical when the subject is empty (RFC 5280
    4.2.1.6), which is the SVID shape: empty subject, identity only in the URI SAN.
    """
    issuer_name = subject if issuer is None else issuer.subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(sans)), critical=len(subject) == 0
        )
    if eku is not None:
        builder = builder.add_extension(eku, critical=False)
    aki_key = issuer_key.public_key() if issuer is None else issuer.public_key()
    if isinstance(aki_key, PublicKey):
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(aki_key), critical=False
        )
    return builder.sign(issuer_key, signing_hash(issuer_key))


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically, never readable by others at any moment.

    The temporary file is created with ``mode`` (O_EXCL, so no stale file is reused), synced,
    renamed over ``path``, and the directory is synced so the rename survives a crash.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed a public file's mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
