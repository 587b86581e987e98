"""ztun.testing.SpiffeCA: every deliberately bad certificate has exactly its one defect.

Three independent judges look at each one: ztun's verifier (the oracle the engine tests
use), ``openssl verify`` (chain and time only, SPIFFE-blind), and a real TLS 1.3 handshake
through Python's ssl module (OpenSSL's X509 purpose checks). A SPIFFE-level defect must
pass the two OpenSSL judges (so the engine's own checks are what catches it), a
chain-level defect must fail them with OpenSSL's matching reason.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from ztun import SpiffeId, Svid, verify_svid
from ztun.errors import NoUriSanError, SvidError
from ztun.testing import BAD_KIND_ERRORS, KEY_TYPES, BadKind, IssuedCert, KeyType, SpiffeCA

TD = "example.org"
CLIENT = "spiffe://example.org/ns/default/sa/client"

# What OpenSSL says about each kind (None: chain is fine for OpenSSL; a SPIFFE rule is broken).
OPENSSL_VERIFY: dict[BadKind, str | None] = {
    BadKind.EXPIRED: "certificate has expired",
    BadKind.NOT_YET_VALID: "certificate is not yet valid",
    BadKind.UNKNOWN_CA: "unable to get local issuer certificate",
    BadKind.OTHER_TRUST_DOMAIN: None,
    BadKind.NO_URI_SAN: None,
    BadKind.MULTIPLE_URI_SANS: None,
    BadKind.NON_SPIFFE_URI: None,
    BadKind.UNEXPECTED_SPIFFE_ID: None,
    BadKind.LEAF_IS_CA: None,
    BadKind.BAD_KEY_USAGE: None,  # with -purpose any; sslserver/sslclient purposes refuse it
}


# Every verifier message starts by naming the reason in words (what logs show).
MESSAGE_PREFIX: dict[BadKind, str] = {
    BadKind.EXPIRED: "certificate expired: leaf",
    BadKind.NOT_YET_VALID: "certificate not yet valid: leaf",
    BadKind.UNKNOWN_CA: "unknown CA:",
    BadKind.OTHER_TRUST_DOMAIN: "other trust domain:",
    BadKind.NO_URI_SAN: "no URI SAN:",
    BadKind.MULTIPLE_URI_SANS: "multiple URI SANs:",
    BadKind.NON_SPIFFE_URI: "non-SPIFFE URI SAN:",
    BadKind.UNEXPECTED_SPIFFE_ID: "unexpected SPIFFE ID:",
    BadKind.LEAF_IS_CA: "leaf is a CA:",
    BadKind.BAD_KEY_USAGE: "wrong key usage:",
}


@pytest.fixture(scope="module", params=[False, True], ids=["root", "intermediate"])
def ca(request: pytest.FixtureRequest) -> SpiffeCA:
    return SpiffeCA(TD, intermediate=request.param)


@pytest.fixture(scope="module")
def bad(ca: SpiffeCA) -> dict[BadKind, IssuedCert]:
    return ca.issue_all_bad(CLIENT)


def openssl_verify(
    tmp_path: Path, ca: SpiffeCA, cert: IssuedCert | Svid, purpose: str = "any"
) -> tuple[bool, str]:
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(cert.chain_pem()[: len(x509_pem(cert.chain[0]))])
    bundle = ca.write_files(tmp_path)
    cmd = ["openssl", "verify", "-purpose", purpose, "-partial_chain", "-CAfile", str(bundle)]
    if len(cert.chain) > 1:
        inter = tmp_path / "untrusted.pem"
        inter.write_bytes(cert.chain_pem()[len(x509_pem(cert.chain[0])) :])
        cmd += ["-untrusted", str(inter)]
    out = subprocess.run([*cmd, str(leaf)], capture_output=True, text=True, check=False)
    return out.returncode == 0, out.stdout + out.stderr


def x509_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM)


def tls13_handshake(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full TLS handshake in memory (no sockets); raises the client's or server's error."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(20):
        if not c_done:
            try:
                c.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                s.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if c_done and s_done:
            return c, s
    raise AssertionError("handshake did not finish")


def server_ctx(cert: IssuedCert | Svid) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if isinstance(cert, Svid):
        IssuedCert(tuple(cert.chain), cert.private_key).configure_cert(ctx)
    else:
        cert.configure_cert(ctx)
    return ctx


def client_ctx(ca: SpiffeCA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE has no hostnames; the URI SAN is checked by ztun
    ca.configure_trust(ctx)
    return ctx


# ------------------------------------------------------------------------------------------


def test_kinds_match_error_reasons() -> None:
    assert set(BAD_KIND_ERRORS) == set(BadKind)
    for kind, err in BAD_KIND_ERRORS.items():
        assert err.reason == kind.value
    assert len({e.reason for e in BAD_KIND_ERRORS.values()}) == len(BadKind)


def test_good_svid_passes_all_judges(ca: SpiffeCA, tmp_path: Path) -> None:
    svid = ca.issue_svid(CLIENT)
    assert verify_svid(svid, ca.bundle, trust_domain=TD, expect=[CLIENT]) == SpiffeId.parse(CLIENT)
    for purpose in ("any", "sslclient", "sslserver"):
        ok, text = openssl_verify(tmp_path, ca, svid, purpose)
        assert ok, text
    c, _ = tls13_handshake(server_ctx(svid), client_ctx(ca))
    assert c.version() == "TLSv1.3"
    peer = c.getpeercert(binary_form=True)
    assert peer is not None
    assert (
        verify_svid([x509.load_der_x509_certificate(peer), *svid.chain[1:]], ca.bundle)
        == svid.spiffe_id
    )


@pytest.mark.parametrize("kind", list(BadKind))
def test_bad_kind_has_exactly_its_defect(
    ca: SpiffeCA, bad: dict[BadKind, IssuedCert], kind: BadKind, tmp_path: Path
) -> None:
    cert = bad[kind]
    assert cert.kind is kind and cert.expected == SpiffeId.parse(CLIENT)
    # ztun's verifier, with server-side (trust domain) and client-side (expected ID) rules.
    with pytest.raises(SvidError) as info:
        verify_svid(cert.chain, ca.bundle, trust_domain=TD, expect=[cert.expected])
    assert type(info.value) is BAD_KIND_ERRORS[kind]
    assert info.value.reason == kind.value
    assert str(info.value).startswith(MESSAGE_PREFIX[kind]), str(info.value)
    # The same file bytes give the same answer.
    with pytest.raises(BAD_KIND_ERRORS[kind]):
        verify_svid(cert.chain_pem(), ca.bundle, trust_domain=TD, expect=[cert.expected])
    # OpenSSL, chain and time only.
    ok, text = openssl_verify(tmp_path, ca, cert)
    expected = OPENSSL_VERIFY[kind]
    if expected is None:
        assert ok, f"{kind}: openssl should accept the chain:\n{text}"
    else:
        assert not ok and expected in text, text


def test_bad_key_usage_refused_by_openssl_purpose(
    ca: SpiffeCA, bad: dict[BadKind, IssuedCert], tmp_path: Path
) -> None:
    for purpose in ("sslclient", "sslserver"):
        ok, text = openssl_verify(tmp_path, ca, bad[BadKind.BAD_KEY_USAGE], purpose)
        assert not ok and "unsuitable certificate purpose" in text, text


# In a real TLS 1.3 handshake, OpenSSL's own checks catch these; the rest reach the
# application, which is why the engine applies the SPIFFE rules itself.
HANDSHAKE_ERRORS: dict[BadKind, str] = {
    BadKind.EXPIRED: "certificate has expired",
    BadKind.NOT_YET_VALID: "certificate is not yet valid",
    BadKind.UNKNOWN_CA: "unable to get local issuer certificate",
    BadKind.BAD_KEY_USAGE: "unsuitable certificate purpose",
}


@pytest.mark.parametrize("kind", list(BadKind))
def test_bad_kind_in_a_tls13_handshake(
    ca: SpiffeCA, bad: dict[BadKind, IssuedCert], kind: BadKind
) -> None:
    cert = bad[kind]
    if kind in HANDSHAKE_ERRORS:
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            tls13_handshake(server_ctx(cert), client_ctx(ca))
        assert HANDSHAKE_ERRORS[kind] in info.value.verify_message
        return
    c, _ = tls13_handshake(server_ctx(cert), client_ctx(ca))
    der = c.getpeercert(binary_form=True)
    assert der is not None
    chain = [x509.load_der_x509_certificate(der), *cert.chain[1:]]
    with pytest.raises(BAD_KIND_ERRORS[kind]):
        verify_svid(chain, ca.bundle, trust_domain=TD, expect=[cert.expected])


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_key_types(key_type: KeyType, tmp_path: Path) -> None:
    ca = SpiffeCA(TD, key_type="ec-p256" if key_type == "rsa-3072" else key_type)
    svid = ca.issue_svid(CLIENT, key_type=key_type)
    assert verify_svid(svid, ca.bundle) == svid.spiffe_id
    ok, text = openssl_verify(tmp_path, ca, svid, "sslserver")
    assert ok, text
    if key_type.startswith("rsa"):
        ku = svid.leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.digital_signature and ku.key_encipherment
    c, _ = tls13_handshake(server_ctx(svid), client_ctx(ca))
    assert c.version() == "TLSv1.3"
    # The chain and key round-trip through PEM.
    assert Svid.from_pem(svid.chain_pem(), svid.key_pem()).serial == svid.serial


def test_plain_tls_server_cert(ca: SpiffeCA) -> None:
    cert = ca.issue_tls_cert()
    san = cert.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    client = client_ctx(ca)
    client.check_hostname = True
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    # Hostname verification against the DNS SAN works for a plain TLS client.
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server_ctx(cert).wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
            peer_in.write(out.read())
    assert c.version() == "TLSv1.3"
    with pytest.raises(NoUriSanError):
        verify_svid(cert.chain, ca.bundle)


def test_issue_svid_window_and_files(tmp_path: Path) -> None:
    ca = SpiffeCA("files.test")
    nb = dt.datetime(2031, 5, 1, 12, 0)  # naive = UTC
    svid = ca.issue_svid("spiffe://files.test/w", not_before=nb, validity=dt.timedelta(hours=2))
    assert svid.not_before == nb.replace(tzinfo=dt.UTC)
    assert svid.not_after == svid.not_before + dt.timedelta(hours=2)
    assert ca.issue_svid().spiffe_id == SpiffeId.parse("spiffe://files.test/ns/default/sa/default")
    bad = ca.issue_bad("leaf_is_ca")
    chain_path, key_path = bad.write_files(tmp_path)
    assert chain_path.name == "leaf_is_ca-chain.pem" and key_path.name == "leaf_is_ca-key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert chain_path.read_bytes() == bad.chain_pem()
    assert bad.private_key_and_cert_chain_pem() == bad.key_pem() + bad.chain_pem()
    bundle = ca.write_files(tmp_path)
    assert bundle.read_bytes() == ca.cert_pem
    with pytest.raises(SvidError):
        bad.to_svid()
    with pytest.raises(ValueError, match=r"bogus"):
        ca.issue_bad("bogus")
