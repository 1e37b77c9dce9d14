"""Tests for DevCA, Identity and TrustBundle: issuing, saving and loading (quicmesh.tls)."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from quicmesh.errors import ConfigError, PeerVerificationError
from quicmesh.tls import DevCA, Identity, TrustBundle, verify_peer

REVIEWS = "spiffe://mesh.local/ns/default/sa/reviews"


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA()


def test_root_certificate_profile(ca: DevCA) -> None:
    cert = ca.certificate
    assert ca.trust_domain == "mesh.local"
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=quicmesh development CA"
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= validity <= datetime.timedelta(days=3651)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ca.trust_bundle.certificates == [cert]


def test_issued_leaf_profile(ca: DevCA) -> None:
    before = datetime.datetime.now(datetime.UTC)
    identity = ca.issue(REVIEWS, validity=datetime.timedelta(days=1))
    cert = identity.certificate
    assert identity.spiffe_id == REVIEWS
    assert identity.chain == []
    assert isinstance(identity.private_key, ec.EllipticCurvePrivateKey)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(REVIEWS)]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    skew = before - cert.not_valid_before_utc  # certificate times have one-second resolution
    assert abs(skew - datetime.timedelta(minutes=5)) < datetime.timedelta(seconds=2)
    assert cert.not_valid_after_utc - before <= datetime.timedelta(days=1)
    assert verify_peer(cert, identity.chain, ca.trust_bundle) == REVIEWS


@pytest.mark.parametrize(
    "spiffe_id", ["reviews", "spiffe://mesh.local/a/../b", "spiffe://other.domain/a"]
)
def test_issue_rejects_bad_or_foreign_ids(ca: DevCA, spiffe_id: str) -> None:
    with pytest.raises(ValueError, match=r"SPIFFE ID '.*'"):
        ca.issue(spiffe_id)


def test_issue_rejects_empty_validity(ca: DevCA) -> None:
    now = datetime.datetime.now(datetime.UTC)
    with pytest.raises(ValueError, match="before it starts"):
        ca.issue(REVIEWS, not_before=now, not_after=now)


def test_invalid_trust_domain_is_rejected() -> None:
    with pytest.raises(ValueError, match="invalid SPIFFE"):
        DevCA(trust_domain="Mesh.Local")
    with pytest.raises(ValueError, match="may not contain '/'"):
        DevCA(trust_domain="mesh.local/x")


def test_save_load_round_trip(tmp_path: Path) -> None:
    ca = DevCA(trust_domain="prod.example")
    directory = tmp_path / "new" / "ca-dir"
    ca.save(directory)
    assert stat.S_IMODE((directory / "ca-key.pem").stat().st_mode) == 0o600
    loaded = DevCA.load(directory)
    assert loaded.certificate == ca.certificate
    assert loaded.trust_domain == "prod.example"
    identity = loaded.issue("spiffe://prod.example/web")
    assert verify_peer(identity.certificate, [], ca.trust_bundle) == "spiffe://prod.example/web"


def test_load_missing_files_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ca\.pem: cannot read"):
        DevCA.load(tmp_path)
    DevCA().save(tmp_path)
    (tmp_path / "ca-key.pem").unlink()
    with pytest.raises(ConfigError, match=r"ca-key\.pem: cannot read"):
        DevCA.load(tmp_path)


def test_load_non_pem_names_the_file(tmp_path: Path) -> None:
    DevCA().save(tmp_path)
    (tmp_path / "ca.pem").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"ca\.pem: not a PEM certificate") as info:
        DevCA.load(tmp_path)
    assert "\n" not in str(info.value)
    DevCA().save(tmp_path)
    (tmp_path / "ca-key.pem").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"ca-key\.pem: not a PEM private key"):
        DevCA.load(tmp_path)


def test_load_mismatched_key_names_the_file(tmp_path: Path) -> None:
    DevCA().save(tmp_path / "a")
    DevCA().save(tmp_path / "b")
    (tmp_path / "a" / "ca-key.pem").write_bytes((tmp_path / "b" / "ca-key.pem").read_bytes())
    with pytest.raises(ConfigError, match=r"ca-key\.pem: private key does not match"):
        DevCA.load(tmp_path / "a")


def test_load_rejects_a_leaf_as_ca(tmp_path: Path, ca: DevCA) -> None:
    ca.issue(REVIEWS).save(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    with pytest.raises(ConfigError, match=r"ca\.pem: not a CA certificate"):
        DevCA.load(tmp_path)


def test_identity_pem_round_trip(ca: DevCA) -> None:
    identity = ca.issue(REVIEWS)
    again = Identity.from_pem(identity.cert_chain_pem(), identity.private_key_pem())
    assert again.certificate == identity.certificate
    assert again.spiffe_id == REVIEWS
    assert identity.private_key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_identity_from_files_with_chain(tmp_path: Path, ca: DevCA) -> None:
    # root -> intermediate -> leaf, where the intermediate is another DevCA's key certified by
    # the root (a cross-signature), so the leaf only verifies against the root with the chain.
    intermediate_ca = DevCA()
    intermediate_cert = (
        x509.CertificateBuilder()
        .subject_name(intermediate_ca.certificate.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(intermediate_ca.certificate.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(intermediate_ca.certificate.not_valid_before_utc)
        .not_valid_after(intermediate_ca.certificate.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            intermediate_ca.certificate.extensions.get_extension_for_class(x509.KeyUsage).value,
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(intermediate_ca.certificate.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
        .sign(ca.private_key, hashes.SHA256())
    )
    leaf = intermediate_ca.issue(REVIEWS)
    chained = Identity(leaf.certificate, leaf.private_key, [intermediate_cert])
    chained.save(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600

    loaded = Identity.from_files(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert loaded.certificate == leaf.certificate
    assert loaded.chain == [intermediate_cert]
    assert loaded.spiffe_id == REVIEWS
    assert verify_peer(loaded.certificate, loaded.chain, ca.trust_bundle) == REVIEWS
    with pytest.raises(PeerVerificationError, match="not signed by a trusted CA"):
        verify_peer(loaded.certificate, [], ca.trust_bundle)


def test_identity_from_files_errors_name_the_file(tmp_path: Path, ca: DevCA) -> None:
    ca.issue(REVIEWS).save(tmp_path / "cert.pem", tmp_path / "key.pem")
    ca.issue(REVIEWS).save(tmp_path / "other-cert.pem", tmp_path / "other-key.pem")
    (tmp_path / "junk.pem").write_bytes(b"not pem at all")
    cases = [
        ("missing.pem", "key.pem", r"missing\.pem: cannot read"),
        ("junk.pem", "key.pem", r"junk\.pem: not a PEM certificate"),
        ("cert.pem", "junk.pem", r"junk\.pem: not a PEM private key"),
        ("cert.pem", "other-key.pem", r"other-key\.pem: private key does not match .*cert\.pem"),
    ]
    for cert_name, key_name, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            Identity.from_files(tmp_path / cert_name, tmp_path / key_name)
        assert "\n" not in str(info.value)


def test_identity_without_spiffe_id(ca: DevCA) -> None:
    identity = Identity(ca.certificate, ca.private_key)
    assert identity.spiffe_id == "spiffe://mesh.local"
    other = DevCA()
    with pytest.raises(ConfigError, match="private key does not match"):
        Identity(ca.certificate, other.private_key)


def test_trust_bundle_from_file_and_pem(tmp_path: Path) -> None:
    first, second = DevCA(), DevCA()
    (tmp_path / "roots.pem").write_bytes(first.trust_bundle.pem + second.trust_bundle.pem)
    bundle = TrustBundle.from_file(tmp_path / "roots.pem")
    assert bundle.certificates == [first.certificate, second.certificate]
    assert TrustBundle.from_pem(bundle.pem).certificates == bundle.certificates
    with pytest.raises(ConfigError, match=r"nothing\.pem: cannot read"):
        TrustBundle.from_file(tmp_path / "nothing.pem")
    with pytest.raises(ConfigError, match="no certificates"):
        TrustBundle([])
