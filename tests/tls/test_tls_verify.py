"""Tests for verify_peer and peer_identity_from_ssl (quicmesh.tls.verify)."""

from __future__ import annotations

import datetime
import ssl
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from quicmesh.errors import PeerVerificationError
from quicmesh.tls import DevCA, TrustBundle, peer_identity_from_ssl, verify_peer
from quicmesh.tls.verify import check_server_certificate

REVIEWS = "spiffe://mesh.local/ns/default/sa/reviews"
DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA()


def _leaf(
    ca: DevCA,
    names: list[x509.GeneralName],
    usages: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    *,
    ca_flag: bool = False,
) -> x509.Certificate:
    """Sign an unusual leaf with ``ca``'s key (DevCA.issue only makes well-formed SVIDs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("O=quicmesh"))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - DAY)
        .not_valid_after(now + DAY)
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False,
        )
        .sign(ca.private_key, hashes.SHA256())
    )


def test_accepts_an_issued_identity(ca: DevCA) -> None:
    identity = ca.issue(REVIEWS)
    assert verify_peer(identity.certificate, identity.chain, ca.trust_bundle) == REVIEWS


def test_accepts_when_any_root_in_the_bundle_matches(ca: DevCA) -> None:
    bundle = TrustBundle([DevCA().certificate, ca.certificate])
    assert verify_peer(ca.issue(REVIEWS).certificate, [], bundle) == REVIEWS


def test_rejects_a_certificate_from_another_ca(ca: DevCA) -> None:
    stranger = DevCA().issue(REVIEWS)
    with pytest.raises(
        PeerVerificationError, match=r"^peer certificate not signed by a trusted CA: "
    ):
        verify_peer(stranger.certificate, [], ca.trust_bundle)


def test_rejects_an_expired_certificate(ca: DevCA) -> None:
    now = datetime.datetime.now(datetime.UTC)
    expired = ca.issue(REVIEWS, not_before=now - 2 * DAY, not_after=now - DAY)
    with pytest.raises(PeerVerificationError, match=r"^peer certificate has expired"):
        verify_peer(expired.certificate, [], ca.trust_bundle)


def test_verification_time_is_injectable(ca: DevCA) -> None:
    identity = ca.issue(REVIEWS, validity=DAY)
    now = datetime.datetime.now(datetime.UTC)
    with pytest.raises(PeerVerificationError, match="has expired"):
        verify_peer(identity.certificate, [], ca.trust_bundle, now=now + 2 * DAY)
    with pytest.raises(PeerVerificationError, match="is not yet valid"):
        verify_peer(identity.certificate, [], ca.trust_bundle, now=now - DAY)


def test_rejects_a_certificate_without_spiffe_id(ca: DevCA) -> None:
    leaf = _leaf(ca, [x509.DNSName("reviews.default.svc")])
    with pytest.raises(PeerVerificationError, match=r"^peer certificate carries no SPIFFE ID$"):
        verify_peer(leaf, [], ca.trust_bundle)


def test_rejects_more_than_one_uri_san(ca: DevCA) -> None:
    leaf = _leaf(
        ca,
        [x509.UniformResourceIdentifier(REVIEWS), x509.UniformResourceIdentifier("https://x")],
    )
    with pytest.raises(PeerVerificationError, match="more than one URI SAN"):
        verify_peer(leaf, [], ca.trust_bundle)


def test_rejects_an_invalid_spiffe_id(ca: DevCA) -> None:
    leaf = _leaf(ca, [x509.UniformResourceIdentifier("spiffe://mesh.local/a/../b")])
    with pytest.raises(PeerVerificationError, match="invalid SPIFFE ID"):
        verify_peer(leaf, [], ca.trust_bundle)


def test_rejects_a_leaf_not_allowed_for_client_auth(ca: DevCA) -> None:
    leaf = _leaf(
        ca, [x509.UniformResourceIdentifier(REVIEWS)], usages=(ExtendedKeyUsageOID.CODE_SIGNING,)
    )
    with pytest.raises(PeerVerificationError, match="not signed by a trusted CA"):
        verify_peer(leaf, [], ca.trust_bundle)


class _FakeSSLObject:
    """Stands in for ssl.SSLObject after a handshake: only getpeercert is used."""

    def __init__(self, der: bytes | None) -> None:
        self._der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self._der


def test_peer_identity_from_ssl_reads_the_spiffe_id(ca: DevCA) -> None:
    der = ca.issue(REVIEWS).certificate.public_bytes(serialization.Encoding.DER)
    assert peer_identity_from_ssl(cast(ssl.SSLObject, _FakeSSLObject(der))) == REVIEWS


def test_peer_identity_from_ssl_errors(ca: DevCA) -> None:
    with pytest.raises(PeerVerificationError, match="no certificate"):
        peer_identity_from_ssl(cast(ssl.SSLObject, _FakeSSLObject(None)))
    der = _leaf(ca, [x509.DNSName("x")]).public_bytes(serialization.Encoding.DER)
    with pytest.raises(PeerVerificationError, match="no SPIFFE ID"):
        peer_identity_from_ssl(cast(ssl.SSLObject, _FakeSSLObject(der)))


_CA_WORDS = r"^peer certificate is a CA certificate \(basicConstraints CA:true\), not a workload's$"
_NO_PATH_WORDS = (
    r"^peer certificate carries spiffe://mesh.local, a trust domain's ID with no path, "
    r"not a workload's$"
)


def _not_a_workload(ca: DevCA) -> list[tuple[x509.Certificate, str]]:
    """Leaves the X509-SVID rules refuse (its section 5.2) that OpenSSL's and aioquic's
    chain checks take, with the words of the refusal."""
    both = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    return [
        (_leaf(ca, [x509.UniformResourceIdentifier(REVIEWS)], both, ca_flag=True), _CA_WORDS),
        (ca.certificate, _CA_WORDS),
        (_leaf(ca, [x509.UniformResourceIdentifier("spiffe://mesh.local")], both), _NO_PATH_WORDS),
    ]


def test_a_server_certificate_must_be_a_workloads(ca: DevCA) -> None:
    """(aioquic's client; until 2026-12-07 it took all three, the CA's own certificate
    as a server with the identity spiffe://mesh.local)"""
    for certificate, words in _not_a_workload(ca):
        with pytest.raises(PeerVerificationError, match=words):
            check_server_certificate(certificate, [], ca.trust_bundle)


def test_a_peer_of_a_tls_handshake_must_be_a_workload(ca: DevCA) -> None:
    """(h2 and tcp, both sides; until 2026-12-07 they took the CA:true leaf and the
    trust domain's ID)"""
    for certificate, words in _not_a_workload(ca):
        der = certificate.public_bytes(serialization.Encoding.DER)
        with pytest.raises(PeerVerificationError, match=words):
            peer_identity_from_ssl(cast(ssl.SSLObject, _FakeSSLObject(der)))


def test_verify_peer_refuses_a_trust_domains_id(ca: DevCA) -> None:
    """(aioquic's server; CA:true leaves its chain verifier refuses already)"""
    leaf = _leaf(ca, [x509.UniformResourceIdentifier("spiffe://mesh.local")])
    with pytest.raises(PeerVerificationError, match=_NO_PATH_WORDS):
        verify_peer(leaf, [], ca.trust_bundle)
