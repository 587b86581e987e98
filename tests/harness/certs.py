"""ztun-independent test certificates: a CA and leaf certificates with SPIFFE URI SANs
(ECDSA P-256, like mesh workload certificates), written as PEM files."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Leaf:
    spiffe_id: str
    cert: str  # PEM file: leaf certificate
    key: str  # PEM file: PKCS#8 private key
    chain: str  # PEM file: leaf + CA (what servers usually present)


class TestCA:
    """A CA in ``directory``: ``ca.pem``; ``issue(name, spiffe_id)`` writes leaf files."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: str, trust_domain: str = "cluster.local") -> None:
        self.dir = directory
        self.trust_domain = trust_domain
        os.makedirs(directory, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztun test CA")])
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_pem = self._cert.public_bytes(serialization.Encoding.PEM)
        self.ca = os.path.join(directory, "ca.pem")
        with open(self.ca, "wb") as f:
            f.write(self.ca_pem)

    def spiffe(self, ns: str, sa: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/{ns}/sa/{sa}"

    def issue(self, name: str, spiffe_id: str | None = None, dns: list[str] | None = None) -> Leaf:
        spiffe_id = spiffe_id or self.spiffe("default", name)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        sans += [x509.DNSName(d) for d in dns or []]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, True, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        paths = {k: os.path.join(self.dir, f"{name}{k}") for k in (".pem", ".key", "-chain.pem")}
        for suffix, data in (
            (".pem", cert_pem),
            (".key", key_pem),
            ("-chain.pem", cert_pem + self.ca_pem),
        ):
            fd = os.open(paths[suffix], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return Leaf(spiffe_id, paths[".pem"], paths[".key"], paths["-chain.pem"])
