"""SpiffeId / TrustDomain rules, TrustBundle, Svid, verify_svid and FileIdentitySource."""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztun import _x509
from ztun.errors import (
    CertificateExpiredError,
    CertificateNotYetValidError,
    IdentityError,
    KeyMismatchError,
    MalformedCertificateError,
    SpiffeIdError,
    SvidError,
    TrustDomainMismatchError,
    UnexpectedSpiffeIdError,
    UnknownCaError,
)
from ztun.identity import (
    FileIdentitySource,
    IdentitySource,
    SpiffeId,
    Svid,
    TrustBundle,
    TrustDomain,
    verify_svid,
)
from ztun.testing import SpiffeCA, write_svid_files

TD = "example.org"
CLIENT = "spiffe://example.org/ns/default/sa/client"

# ------------------------------------------------------------------------------------------
# SPIFFE IDs: every rule, with the message it gives and where


@pytest.mark.parametrize(
    ("value", "message", "position"),
    [
        ("", "it is empty", None),
        ("example.org/ns/a", "the 'spiffe://' scheme is missing", 0),
        ("https://example.org/a", "the scheme is 'https', not 'spiffe'", 0),
        ("SPIFFE://example.org/a", "the scheme must be lowercase", 0),
        ("spiffe:/example.org/a", "the 'spiffe://' scheme is missing", 0),
        ("spiffe:///a", "the trust domain is missing", 9),
        ("spiffe://", "the trust domain is missing", 9),
        ("spiffe://Example.org/a", "trust domain character 'E' is uppercase", 9),
        ("spiffe://exa mple.org/a", "trust domain character ' ' is not allowed", 12),
        ("spiffe://ex%41mple.org/a", "trust domain character '%' is not allowed", 11),
        ("spiffe://example.org:8443/a", "a port is not allowed", 20),
        ("spiffe://user@example.org/a", "userinfo ('user@') is not allowed", 13),
        ("spiffe://example.org/a?x=1", "a query ('?') is not allowed", 22),
        ("spiffe://example.org/a#frag", "a fragment ('#') is not allowed", 22),
        ("spiffe://example.org/", "the path must not end with '/'", 20),
        ("spiffe://example.org/ns/a/", "the path must not end with '/'", 25),
        ("spiffe://example.org//a", "the path has an empty segment ('//')", 20),
        ("spiffe://example.org/a//b", "the path has an empty segment ('//')", 22),
        ("spiffe://example.org/./a", "the path has a dot segment '.'", 21),
        ("spiffe://example.org/a/..", "the path has a dot segment '..'", 23),
        ("spiffe://example.org/a b", "path character ' ' is not allowed", 22),
        ("spiffe://example.org/a%20b", "path character '%' is not allowed", 22),
        ("spiffe://example.org/caf\u00e9", "path character '\u00e9' is not allowed", 24),
        ("spiffe://" + "a" * 256 + "/x", "the trust domain is 256 characters long", None),
        ("spiffe://example.org/" + "a" * 2040, "bytes long; the limit is 2048", None),
    ],
)
def test_spiffe_id_rules(value: str, message: str, position: int | None) -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(value)
    text = str(info.value)
    assert message in text
    if position is not None:
        assert text.endswith(f"(position {position})"), text
    assert text.startswith("invalid SPIFFE ID")
    assert isinstance(info.value, ValueError)  # SpiffeIdError is also a ValueError


@pytest.mark.parametrize(
    "value",
    [
        "spiffe://example.org",
        "spiffe://example.org/a",
        "spiffe://cluster.local/ns/default/sa/default",
        "spiffe://a-b_c.9/A.b-C_d/x",
        "spiffe://example.org/..a/a..",  # dots are fine inside a segment
        "spiffe://" + "a" * 255 + "/x",
        "spiffe://example.org/" + "a" * (2048 - len("spiffe://example.org/")),
    ],
)
def test_spiffe_id_valid(value: str) -> None:
    sid = SpiffeId.parse(value)
    assert str(sid) == value
    assert SpiffeId.parse(str(sid)) == sid


def test_spiffe_id_parts_and_shape() -> None:
    sid = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/web")
    assert sid.trust_domain == "cluster.local"
    assert sid.path == "/ns/prod/sa/web"
    assert (sid.namespace, sid.service_account) == ("prod", "web")
    assert sid.principal == "cluster.local/ns/prod/sa/web"
    assert sid.td == TrustDomain("cluster.local")
    assert sid.member_of("cluster.local") and not sid.member_of("other.test")
    assert repr(sid) == "SpiffeId('spiffe://cluster.local/ns/prod/sa/web')"
    for other in (
        "spiffe://td/ns/a",
        "spiffe://td/ns/a/sa/b/c",
        "spiffe://td/x/a/sa/b",
        "spiffe://td",
    ):
        s = SpiffeId.parse(other)
        assert s.namespace is None and s.service_account is None


def test_spiffe_id_value_semantics() -> None:
    a = SpiffeId.parse(CLIENT)
    b = SpiffeId.for_workload("example.org", "default", "client")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert SpiffeId.parse(a) is a
    with pytest.raises(AttributeError):
        a.path = "/x"  # type: ignore[misc]
    assert SpiffeId("example.org", "/x") == SpiffeId.parse("spiffe://example.org/x")
    with pytest.raises(SpiffeIdError, match=r"must start with '/'"):
        SpiffeId("example.org", "x")
    with pytest.raises(SpiffeIdError, match=r"trust domain character 'A'"):
        SpiffeId("A", "/x")
    with pytest.raises(
        SpiffeIdError, match=r"invalid namespace .a/b.: must be one non-empty path segment"
    ):
        SpiffeId.for_workload("example.org", "a/b", "c")
    with pytest.raises(SpiffeIdError, match=r"must be a string"):
        SpiffeId.parse(42)  # type: ignore[arg-type]
    assert (
        sorted([SpiffeId.parse("spiffe://b/x"), SpiffeId.parse("spiffe://a/y")])[0].trust_domain
        == "a"
    )


def test_trust_domain() -> None:
    assert TrustDomain.parse("example.org") == TrustDomain("example.org")
    assert TrustDomain.parse("spiffe://example.org") == TrustDomain("example.org")
    assert TrustDomain.parse("spiffe://example.org/ns/a/sa/b").name == "example.org"
    assert str(TrustDomain("example.org").id) == "spiffe://example.org"
    with pytest.raises(SpiffeIdError, match=r"uppercase"):
        TrustDomain("Example.org")
    with pytest.raises(SpiffeIdError, match=r"trust domain is missing"):
        TrustDomain("")


# ------------------------------------------------------------------------------------------
# Trust bundles


@pytest.fixture(scope="module")
def ca() -> SpiffeCA:
    return SpiffeCA(TD)


@pytest.fixture(scope="module")
def ica() -> SpiffeCA:
    return SpiffeCA("inter.test", intermediate=True)


def test_bundle_from_pem_and_accessors(ca: SpiffeCA, ica: SpiffeCA) -> None:
    b = TrustBundle.from_pem(TD, ca.cert_pem)
    assert b.trust_domains == [TD]
    assert b.roots(TD) == [ca.root]
    assert b.roots("nowhere.test") == []
    assert b.pem(TD) == ca.cert_pem
    assert TD in b and "nowhere.test" not in b and len(b) == 1
    with pytest.raises(IdentityError, match=r"no trust bundle for trust domain 'nowhere.test'"):
        b.pem("nowhere.test")
    both = b.merge(ica.bundle)
    assert both.trust_domains == ["example.org", "inter.test"]
    assert both.all_pem() == ca.cert_pem + ica.cert_pem  # sorted by trust domain
    # Immutable: add/merge return new bundles.
    assert b.trust_domains == [TD]
    added = b.add("inter.test", [ica.root])
    assert added == both and b != both
    # Deduplicated.
    assert len(b.add(TD, [ca.root]).roots(TD)) == 1
    assert len(TrustBundle.from_pem(TD, ca.cert_pem + ca.cert_pem)) == 1
    assert "example.org: 1" in repr(both)


def test_bundle_rejects_non_ca_and_garbage(ca: SpiffeCA) -> None:
    leaf = ca.issue_svid(CLIENT)
    with pytest.raises(IdentityError, match=r"is not a CA .*a bundle holds CA certificates"):
        TrustBundle.from_pem(TD, leaf.chain_pem())
    no_sign = ca.issue_cert(
        uris=["spiffe://example.org/ca"],
        is_ca=True,
        key_usage=_x509.key_usage(digital_signature=True),
    )
    with pytest.raises(IdentityError, match=r"without keyCertSign"):
        TrustBundle.from_pem(TD, no_sign.chain_pem())
    with pytest.raises(MalformedCertificateError, match=r"no certificate found|not a valid"):
        TrustBundle.from_pem(TD, b"hello")
    with pytest.raises(MalformedCertificateError):
        TrustBundle.from_pem(TD, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(SpiffeIdError):
        TrustBundle.from_pem("Bad TD", ca.cert_pem)


def test_bundle_from_file(ca: SpiffeCA, tmp_path: Path) -> None:
    path = ca.write_files(tmp_path)
    assert TrustBundle.from_file(TD, path) == ca.bundle
    with pytest.raises(IdentityError, match=r"missing\.pem: cannot read"):
        TrustBundle.from_file(TD, tmp_path / "missing.pem")


# ------------------------------------------------------------------------------------------
# SVIDs


def test_svid_properties(ca: SpiffeCA) -> None:
    nb = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    svid = ca.issue_svid(CLIENT, not_before=nb, not_after=nb + dt.timedelta(hours=24))
    assert svid.spiffe_id == SpiffeId.parse(CLIENT)
    assert svid.not_before == nb
    assert svid.lifetime == dt.timedelta(hours=24)
    assert svid.renew_at == nb + dt.timedelta(hours=12)
    assert int(svid.serial, 16) == svid.leaf.serial_number
    assert len(svid.fingerprint) == 64
    assert not svid.is_valid_at() and svid.is_valid_at(nb + dt.timedelta(hours=1))
    key_pem = svid.key_pem()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    again = Svid.from_pem(svid.chain_pem(), key_pem)
    assert again.leaf == svid.leaf
    for text in (repr(svid), str(svid)):
        assert "PRIVATE" not in text and key_pem.decode() not in text
        assert CLIENT in text and svid.serial in text


def test_svid_from_pem_accepts_sec1_keys(ca: SpiffeCA) -> None:
    svid = ca.issue_svid(CLIENT)
    key = svid.private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert b"EC PRIVATE KEY" in sec1
    assert Svid.from_pem(svid.chain_pem(), sec1).serial == svid.serial


def test_svid_validation(ca: SpiffeCA, ica: SpiffeCA) -> None:
    good = ca.issue_svid(CLIENT)
    other = ca.issue_svid(CLIENT)
    with pytest.raises(KeyMismatchError, match=r"does not belong to the leaf"):
        Svid.from_pem(good.chain_pem(), other.key_pem())
    with pytest.raises(MalformedCertificateError, match=r"at least one certificate"):
        Svid([], good.private_key)
    with pytest.raises(MalformedCertificateError, match=r"not a valid private key"):
        Svid.from_pem(
            good.chain_pem(), b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
    encrypted = good.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(MalformedCertificateError, match=r"unusable private key"):
        Svid.from_pem(good.chain_pem(), encrypted)
    # Chain order is checked: intermediate first is refused.
    isvid = ica.issue_svid("spiffe://inter.test/w")
    assert len(isvid.chain) == 2
    with pytest.raises(SvidError):
        Svid(list(reversed(isvid.chain)), isvid.private_key)
    with pytest.raises(MalformedCertificateError, match=r"out of order"):
        Svid([isvid.chain[0], ca.root], isvid.private_key)
    # Every leaf-shape defect is refused by Svid as it is by the verifier.
    for kind in (
        "no_uri_san",
        "multiple_uri_sans",
        "non_spiffe_uri",
        "leaf_is_ca",
        "bad_key_usage",
    ):
        bad = ca.issue_bad(kind, CLIENT)
        with pytest.raises(SvidError) as info:
            Svid.from_pem(bad.chain_pem(), bad.key_pem())
        assert info.value.reason == kind


def test_svid_refuses_trust_domain_id_and_missing_key_usage(ca: SpiffeCA) -> None:
    td_only = ca.issue_cert(uris=["spiffe://example.org"])
    with pytest.raises(SvidError, match=r"names a trust domain, not a workload") as info:
        td_only.to_svid()
    assert info.value.reason == "non_spiffe_uri"
    no_ku = ca.issue_cert(uris=[CLIENT], key_usage=None)
    with pytest.raises(SvidError, match=r"no keyUsage extension") as info:
        no_ku.to_svid()
    assert info.value.reason == "bad_key_usage"
    crl = ca.issue_cert(
        uris=[CLIENT], key_usage=_x509.key_usage(digital_signature=True, crl_sign=True)
    )
    with pytest.raises(SvidError, match=r"keyCertSign/cRLSign"):
        crl.to_svid()


def test_svid_from_files(ca: SpiffeCA, tmp_path: Path) -> None:
    svid = ca.issue_svid(CLIENT)
    chain, key = write_svid_files(svid, tmp_path)
    assert Svid.from_files(chain, key).serial == svid.serial
    key.write_bytes(ca.issue_svid(CLIENT).key_pem())
    with pytest.raises(KeyMismatchError, match=str(chain)):
        Svid.from_files(chain, key)
    with pytest.raises(IdentityError, match=r"nope.pem: cannot read"):
        Svid.from_files(tmp_path / "nope.pem", key)


# ------------------------------------------------------------------------------------------
# verify_svid


def test_verify_good(ca: SpiffeCA, ica: SpiffeCA) -> None:
    svid = ca.issue_svid(CLIENT)
    sid = SpiffeId.parse(CLIENT)
    assert verify_svid(svid.chain, ca.bundle) == sid
    assert (
        verify_svid(svid, ca.bundle, trust_domain=TD, expect=[CLIENT, "spiffe://example.org/x"])
        == sid
    )
    assert verify_svid(svid.chain_pem(), ca.bundle, expect=[sid]) == sid
    # With an intermediate sent along; bundles for several trust domains.
    isvid = ica.issue_svid("spiffe://inter.test/ns/a/sa/b")
    both = ca.bundle.merge(ica.bundle)
    assert verify_svid(isvid.chain, both, trust_domain="inter.test").trust_domain == "inter.test"
    # The root may be sent too; the intermediate may also be the anchor (partial chain).
    assert verify_svid([*isvid.chain, ica.root], ica.bundle)
    assert verify_svid(isvid.chain[:1], TrustBundle({"inter.test": [isvid.chain[1]]}))
    with pytest.raises(UnknownCaError, match=r"no certificate in the trust bundle of 'inter.test'"):
        verify_svid(isvid.chain[:1], ica.bundle)  # intermediate missing


def test_verify_time_window(ca: SpiffeCA) -> None:
    nb = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    svid = ca.issue_svid(CLIENT, not_before=nb, not_after=nb + dt.timedelta(hours=1))
    assert verify_svid(svid, ca.bundle, now=nb)
    assert verify_svid(svid, ca.bundle, now=nb + dt.timedelta(hours=1))  # notAfter inclusive
    assert verify_svid(svid, ca.bundle, now=dt.datetime(2030, 1, 1, 0, 30))  # naive = UTC
    with pytest.raises(
        CertificateNotYetValidError, match=r"leaf .* is valid from 2030-01-01T00:00:00Z"
    ):
        verify_svid(svid, ca.bundle, now=nb - dt.timedelta(seconds=1))
    with pytest.raises(CertificateExpiredError, match=r"leaf .* expired at 2030-01-01T01:00:00Z"):
        verify_svid(svid, ca.bundle, now=nb + dt.timedelta(hours=1, seconds=1))


def test_verify_trust_domain_and_expect(ca: SpiffeCA) -> None:
    svid = ca.issue_svid(CLIENT)
    with pytest.raises(
        TrustDomainMismatchError, match=r"is in trust domain 'example.org', not 'other.test'"
    ):
        verify_svid(svid, ca.bundle, trust_domain="other.test")
    with pytest.raises(
        TrustDomainMismatchError, match=r"no trust bundle for trust domain 'example.org'"
    ):
        verify_svid(svid, TrustBundle())
    with pytest.raises(UnexpectedSpiffeIdError, match=r"peer is .*client, expected .*server"):
        verify_svid(svid, ca.bundle, expect=["spiffe://example.org/ns/default/sa/server"])
    with pytest.raises(UnexpectedSpiffeIdError, match=r"expected none"):
        verify_svid(svid, ca.bundle, expect=[])
    # Roots of one trust domain never vouch for another's IDs.
    other = SpiffeCA("other.test")
    foreign = other.issue_svid("spiffe://other.test/x")
    mixed = TrustBundle({TD: [other.root]})
    with pytest.raises(TrustDomainMismatchError):
        verify_svid(foreign, mixed)
    wrong = other.issue_svid("spiffe://example.org/x")
    with pytest.raises(UnknownCaError):
        verify_svid(wrong, ca.bundle.add("other.test", [other.root]))


def test_verify_chain_rules(ca: SpiffeCA) -> None:
    now = _x509.utcnow()
    key = _x509.new_private_key()

    def intermediate(**kw: object) -> tuple[x509.Certificate, _x509.PrivateKey]:
        ikey = _x509.new_private_key()
        args: dict[str, object] = {
            "subject": x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "inter")]),
            "public_key": ikey.public_key(),
            "issuer": ca.root,
            "issuer_key": ca._root_key,
            "not_before": now - dt.timedelta(hours=1),
            "not_after": now + dt.timedelta(hours=1),
            "is_ca": True,
            "usage": _x509.CA_KEY_USAGE,
        }
        args.update(kw)
        return _x509.build_certificate(**args), ikey  # type: ignore[arg-type]

    def leaf_under(
        parent: x509.Certificate, pkey: _x509.PrivateKey, uri: str = CLIENT
    ) -> x509.Certificate:
        return _x509.build_certificate(
            subject=x509.Name([]),
            public_key=key.public_key(),
            issuer=parent,
            issuer_key=pkey,
            not_before=now - dt.timedelta(minutes=1),
            not_after=now + dt.timedelta(minutes=30),
            is_ca=False,
            usage=_x509.leaf_key_usage(key),
            sans=[x509.UniformResourceIdentifier(uri)],
        )

    # Intermediate that is not a CA.
    not_ca, k1 = intermediate(is_ca=False, usage=_x509.key_usage(digital_signature=True))
    with pytest.raises(UnknownCaError, match=r"is not a CA"):
        verify_svid([leaf_under(not_ca, k1), not_ca], ca.bundle)
    # Expired intermediate: named as such.
    old, k2 = intermediate(
        not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1)
    )
    with pytest.raises(CertificateExpiredError, match=r"intermediate"):
        verify_svid([leaf_under(old, k2), old], ca.bundle)
    # pathLen 0 on the intermediate allows no intermediate below it.
    top, k3 = intermediate(path_length=0)
    below, k4 = intermediate(
        issuer=top,
        issuer_key=k3,
        subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "below")]),
    )
    with pytest.raises(UnknownCaError, match=r"allows 0 intermediate"):
        verify_svid([leaf_under(below, k4), below, top], ca.bundle)
    # URI name constraints on a CA are honoured.
    nkey = _x509.new_private_key()
    nc = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "nc")]))
        .issuer_name(ca.root.subject)
        .public_key(nkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_x509.CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier("sub.example.org")],
                excluded_subtrees=None,
            ),
            critical=True,
        )
        .sign(ca._root_key, _x509.signing_hash(ca._root_key))
    )
    with pytest.raises(UnknownCaError, match=r"may only sign URIs under sub.example.org"):
        verify_svid([leaf_under(nc, nkey), nc], ca.bundle)
    # Unknown critical extension on the leaf.
    odd = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(minutes=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_x509.leaf_key_usage(key), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(CLIENT)]), critical=True
        )
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
            critical=True,
        )
        .sign(ca._root_key, _x509.signing_hash(ca._root_key))
    )
    with pytest.raises(
        MalformedCertificateError, match=r"unsupported critical extension 1.3.6.1.4.1.99999.1"
    ):
        verify_svid([odd], ca.bundle)
    with pytest.raises(MalformedCertificateError, match=r"peer chain is empty"):
        verify_svid([], ca.bundle)


# ------------------------------------------------------------------------------------------
# FileIdentitySource


def _files(tmp_path: Path, ca: SpiffeCA, svid: Svid) -> tuple[Path, Path, Path]:
    chain, key = write_svid_files(svid, tmp_path)
    return chain, key, ca.write_files(tmp_path)


def test_file_source_loads_and_reloads_on_rename(ca: SpiffeCA, tmp_path: Path) -> None:
    first = ca.issue_svid(CLIENT)
    chain, key, bundle = _files(tmp_path, ca, first)
    src = FileIdentitySource(chain, key, bundle)
    assert isinstance(src, IdentitySource)
    assert src.fetch(CLIENT).serial == first.serial
    assert src.bundle() == ca.bundle
    assert src.poll() is False
    # Atomic renames (cert-manager style): key first, then chain.
    second = ca.issue_svid(CLIENT)
    (tmp_path / "new").mkdir()
    nchain, nkey = write_svid_files(second, tmp_path / "new")
    os.replace(nkey, key)
    assert src.poll() is False  # key no longer matches the chain: refused, old one kept
    assert src.fetch(CLIENT).serial == first.serial
    os.replace(nchain, chain)
    assert src.poll() is True
    assert src.fetch(CLIENT).serial == second.serial
    assert src.poll() is False
    with pytest.raises(
        IdentityError, match=r"holds spiffe://example.org/ns/default/sa/client, not"
    ):
        src.fetch("spiffe://example.org/other")


def test_file_source_refuses_bad_files_keeps_identity(
    ca: SpiffeCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = ca.issue_svid(CLIENT)
    chain, key, bundle = _files(tmp_path, ca, first)
    src = FileIdentitySource(chain, key, bundle)
    caplog.set_level(logging.WARNING, logger="ztun.identity")
    # Half-written chain (in place, truncated).
    pem = ca.issue_svid(CLIENT).chain_pem()
    chain.write_bytes(pem[: len(pem) // 2])
    assert src.poll() is False
    assert src.fetch(CLIENT).serial == first.serial
    assert any(str(chain) in r.getMessage() and "keeping" in r.getMessage() for r in caplog.records)
    # Logged once per version of the files, not every poll.
    n = len(caplog.records)
    assert src.poll() is False and len(caplog.records) == n
    # An expired certificate is refused too, naming the reason.
    expired = ca.issue_bad("expired", CLIENT)
    write_svid_files(expired, tmp_path)
    assert src.poll() is False
    assert "certificate expired" in caplog.records[-1].getMessage()
    # A bundle that does not hold the issuer.
    good = ca.issue_svid(CLIENT)
    write_svid_files(good, tmp_path)
    SpiffeCA(TD).write_files(tmp_path)
    assert src.poll() is False
    assert "unknown CA" in caplog.records[-1].getMessage()
    assert str(bundle) in caplog.records[-1].getMessage()
    for r in caplog.records:
        assert "PRIVATE KEY" not in r.getMessage()
    # Fixed: picked up.
    ca.write_files(tmp_path)
    assert src.poll() is True
    assert src.fetch(CLIENT).serial == good.serial


def test_file_source_kubelet_symlink_swap(ca: SpiffeCA, tmp_path: Path) -> None:
    # kubelet: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>; the swap renames ..data.
    def version(name: str, svid: Svid) -> None:
        d = tmp_path / name
        write_svid_files(svid, d)
        ca.write_files(d)

    first, second = ca.issue_svid(CLIENT), ca.issue_svid(CLIENT)
    version("..v1", first)
    (tmp_path / "..data").symlink_to("..v1")
    for name in ("svid-chain.pem", "svid-key.pem", "bundle.pem"):
        (tmp_path / name).symlink_to(f"..data/{name}")
    src = FileIdentitySource(
        tmp_path / "svid-chain.pem",
        tmp_path / "svid-key.pem",
        tmp_path / "bundle.pem",
        trust_domain=TD,
    )
    assert src.fetch(CLIENT).serial == first.serial
    version("..v2", second)
    (tmp_path / "..tmp").symlink_to("..v2")
    os.replace(tmp_path / "..tmp", tmp_path / "..data")
    assert src.poll() is True
    assert src.fetch(CLIENT).serial == second.serial


def test_file_source_initial_errors_name_the_file(ca: SpiffeCA, tmp_path: Path) -> None:
    chain, key, bundle = _files(tmp_path, ca, ca.issue_svid(CLIENT))
    with pytest.raises(IdentityError, match=r"missing-key\.pem: cannot read private key"):
        FileIdentitySource(chain, tmp_path / "missing-key.pem", bundle)
    key.write_bytes(b"garbage")
    with pytest.raises(MalformedCertificateError, match=rf"{key}: private key: not a valid"):
        FileIdentitySource(chain, key, bundle)
    write_svid_files(ca.issue_svid(CLIENT), tmp_path)
    with pytest.raises(TrustDomainMismatchError, match=r"not 'other.test'"):
        FileIdentitySource(chain, key, bundle, trust_domain="other.test")
