"""The embedded CertificateAuthority: persistence, file modes, issued SVIDs, CSR policy."""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztun import CaIdentitySource, CertificateAuthority, IdentitySource, SpiffeId, verify_svid
from ztun.errors import IdentityError

TD = "cluster.local"
WEB = "spiffe://cluster.local/ns/prod/sa/web"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_create_persist_reload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    state = tmp_path / "state" / "ca"
    ca = CertificateAuthority(state, TD)
    assert mode(state) == 0o700
    assert mode(state / "ca-key.pem") == 0o600
    assert mode(state / "ca-cert.pem") == 0o644
    assert sorted(os.listdir(state)) == [".lock", "ca-cert.pem", "ca-key.pem"]  # no temp left
    root = ca.root
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local"]
    assert ca.bundle.roots(TD) == [root]
    svid = ca.issue(WEB)

    again = CertificateAuthority(state, TD)
    assert again.root == root
    # An SVID from the first instance verifies with the reloaded one's bundle.
    assert verify_svid(svid, again.bundle, trust_domain=TD) == SpiffeId.parse(WEB)
    # Nothing secret in the logs.
    key_pem = (state / "ca-key.pem").read_bytes().decode()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "created CA root" in text and "loaded CA root" in text
    assert "PRIVATE KEY" not in text and key_pem.splitlines()[1] not in text
    assert svid.key_pem().decode().splitlines()[1] not in text


def test_root_key_is_never_world_readable(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask must not leak into the key file
    try:
        CertificateAuthority(tmp_path / "ca", TD)
    finally:
        os.umask(old)
    assert mode(tmp_path / "ca" / "ca-key.pem") == 0o600
    assert mode(tmp_path / "ca") == 0o700


def test_loose_modes_are_tightened(tmp_path: Path) -> None:
    state = tmp_path / "ca"
    CertificateAuthority(state, TD)
    os.chmod(state, 0o755)
    os.chmod(state / "ca-key.pem", 0o644)
    CertificateAuthority(state, TD)
    assert mode(state) == 0o700
    assert mode(state / "ca-key.pem") == 0o600


def test_refuses_other_trust_domain_partial_or_mismatched_state(tmp_path: Path) -> None:
    state = tmp_path / "ca"
    CertificateAuthority(state, TD)
    with pytest.raises(
        IdentityError, match=r"is for trust domain 'cluster.local', not 'other.test'"
    ):
        CertificateAuthority(state, "other.test")
    # Key of another CA: refused, never overwritten.
    other = tmp_path / "other"
    CertificateAuthority(other, TD)
    original = (state / "ca-key.pem").read_bytes()
    (state / "ca-key.pem").write_bytes((other / "ca-key.pem").read_bytes())
    with pytest.raises(IdentityError, match=r"the CA key does not match"):
        CertificateAuthority(state, TD)
    (state / "ca-key.pem").write_bytes(original)
    # Half a CA: refused, not replaced by a new root.
    (state / "ca-cert.pem").unlink()
    with pytest.raises(IdentityError, match=r"ca-cert.pem: missing"):
        CertificateAuthority(state, TD)
    assert (state / "ca-key.pem").read_bytes() == original
    (state / "ca-key.pem").write_bytes(b"junk")
    (state / "ca-cert.pem").write_bytes((other / "ca-cert.pem").read_bytes())
    with pytest.raises(IdentityError, match=r"CA key: not a valid private key"):
        CertificateAuthority(state, TD)


def test_concurrent_starts_agree_on_one_root(tmp_path: Path) -> None:
    state = tmp_path / "ca"
    roots: list[bytes] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            roots.append(CertificateAuthority(state, TD).root.fingerprint(hashes.SHA256()))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(roots)) == 1


def test_issued_svid_shape(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", TD)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    svid = ca.issue(WEB)
    leaf = svid.leaf
    assert len(svid.chain) == 1
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # empty subject -> SAN critical (RFC 5280)
    assert list(san.value) == [x509.UniformResourceIdentifier(WEB)]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.key_encipherment
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    key = svid.private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    # 24 h by default, backdated at most 10 s.
    assert before - dt.timedelta(seconds=11) <= svid.not_before <= before
    assert svid.not_after - svid.not_before <= dt.timedelta(hours=24, seconds=11)
    assert svid.not_after - before >= dt.timedelta(hours=24) - dt.timedelta(seconds=2)
    short = ca.issue(WEB, validity=dt.timedelta(seconds=20))
    assert short.lifetime <= dt.timedelta(seconds=23)
    assert short.not_before >= before - dt.timedelta(seconds=3)  # backdate <= 10 % of lifetime
    # Each issue makes a new key and serial.
    assert svid.serial != short.serial
    assert svid.key_pem() != short.key_pem()


def test_issued_svid_verified_by_openssl(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", TD)
    svid = ca.issue(WEB)
    (tmp_path / "leaf.pem").write_bytes(svid.chain_pem())
    for purpose in ("sslclient", "sslserver"):
        out = subprocess.run(
            [
                "openssl", "verify", "-purpose", purpose,
                "-CAfile", str(tmp_path / "ca" / "ca-cert.pem"), str(tmp_path / "leaf.pem"),
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip().endswith(": OK")


def _csr(*names: x509.GeneralName, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ignored")])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ((), "no subjectAltName"),
        ((x509.DNSName("web.prod.svc"),), "exactly one SPIFFE URI, got DNSName:web.prod.svc"),
        (
            (x509.UniformResourceIdentifier(WEB), x509.DNSName("web")),
            "exactly one SPIFFE URI",
        ),
        (
            (
                x509.UniformResourceIdentifier(WEB),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/prod/sa/db"),
            ),
            "exactly one SPIFFE URI",
        ),
        ((x509.UniformResourceIdentifier("https://cluster.local/x"),), "the scheme is 'https'"),
        (
            (x509.UniformResourceIdentifier("spiffe://other.test/ns/a/sa/b"),),
            "in trust domain 'other.test'; this CA signs only 'cluster.local'",
        ),
        ((x509.UniformResourceIdentifier("spiffe://cluster.local"),), "names the trust domain"),
    ],
)
def test_sign_csr_refuses(
    tmp_path: Path, names: tuple[x509.GeneralName, ...], message: str
) -> None:
    ca = CertificateAuthority(tmp_path / "ca", TD)
    with pytest.raises(IdentityError) as info:
        ca.sign_csr(_csr(*names))
    assert message in str(info.value)
    assert str(info.value).startswith("CSR: ")


def test_sign_csr_accepts_and_ignores_subject(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", TD, validity=dt.timedelta(hours=1))
    chain = ca.sign_csr(_csr(x509.UniformResourceIdentifier(WEB)))
    assert chain[0].subject == x509.Name([])
    assert chain[0].not_valid_after_utc - chain[0].not_valid_before_utc <= dt.timedelta(
        hours=1, seconds=10
    )
    with pytest.raises(IdentityError, match=r"not a valid PEM certificate request"):
        ca.sign_csr(b"junk")


def test_sign_csr_refuses_bad_signature(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", TD)
    pem = _csr(x509.UniformResourceIdentifier(WEB))
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match=r"signature does not verify"):
        ca.sign_csr(tampered)


def test_validity_capped_by_root(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", TD, root_validity=dt.timedelta(hours=2))
    svid = ca.issue(WEB, validity=dt.timedelta(days=30))
    assert svid.not_after == ca.root.not_valid_after_utc
    with pytest.raises(ValueError, match=r"validity must be positive"):
        ca.issue(WEB, validity=dt.timedelta(0))


def test_ca_identity_source(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", TD)
    src = CaIdentitySource(ca, validity=dt.timedelta(minutes=5))
    assert isinstance(src, IdentitySource)
    a, b = src.fetch(WEB), src.fetch(SpiffeId.parse(WEB))
    assert a.serial != b.serial and a.lifetime <= dt.timedelta(minutes=5, seconds=10)
    assert src.bundle() == ca.bundle
    assert src.poll() is False
    with pytest.raises(IdentityError, match=r"not in the embedded CA's trust domain"):
        src.fetch("spiffe://other.test/x")
    src.close()
