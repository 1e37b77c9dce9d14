"""Verifying a peer's certificate chain and reading its SPIFFE ID.

:func:`verify_peer` is what the QUIC server side uses on client certificates,
since aioquic does not verify them. It drives ``cryptography.x509.verification``
(RFC 5280 path building, in Rust, with the verification time injectable)
rather than ``aioquic.tls.verify_certificate``: the latter goes through
pyOpenSSL's X509Store, falls back to certifi's web roots when given no CA
data, and does not check that the leaf is allowed to authenticate a client.
"""

from __future__ import annotations

import datetime
import ssl

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from quicmesh.errors import PeerVerificationError
from quicmesh.tls.identity import TrustBundle
from quicmesh.tls.spiffe import (
    names_a_trust_domain,
    spiffe_id_of,
    trust_domain_of,
    uri_sans_of,
    validate_spiffe_id,
)


def verify_peer(
    certificate: x509.Certificate,
    chain: list[x509.Certificate],
    trust: TrustBundle,
    *,
    now: datetime.datetime | None = None,
) -> str:
    """Verify a peer's certificate chain against ``trust`` and return its SPIFFE ID.

    Checks, in order: the leaf's validity dates, the chain up to a root in
    ``trust`` (signatures, CA constraints, dates of every certificate, the
    clientAuth extended key usage), then that the leaf carries exactly one URI
    SAN and that it is a valid SPIFFE ID (the X509-SVID rules).

    :param certificate: the peer's leaf certificate.
    :param chain: the intermediates the peer sent (may be empty).
    :param trust: the roots the chain must lead to.
    :param now: the verification time (default: the current time); for tests.
    :returns: the peer's SPIFFE ID.
    :raises PeerVerificationError: with a one-line reason.
    """
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    if now > certificate.not_valid_after_utc:
        raise PeerVerificationError(
            f"peer certificate has expired (not valid after {certificate.not_valid_after_utc})"
        )
    if now < certificate.not_valid_before_utc:
        raise PeerVerificationError(
            "peer certificate is not yet valid "
            f"(not valid before {certificate.not_valid_before_utc})"
        )
    verifier = PolicyBuilder().store(Store(trust.certificates)).time(now).build_client_verifier()
    try:
        verified = verifier.verify(certificate, chain)
    except VerificationError as exc:
        raise PeerVerificationError(f"peer certificate not signed by a trusted CA: {exc}") from exc
    spiffe_id = spiffe_id_of_leaf(certificate)
    check_trust_domain(spiffe_id, verified.chain[-1], trust)
    return spiffe_id


def check_trust_domain(spiffe_id: str, top: x509.Certificate, trust: TrustBundle) -> None:
    """Refuse a SPIFFE ID whose trust domain the CA that vouched for it does not serve.

    A trust bundle is per trust domain (SPIFFE): a root whose own URI SAN is
    ``spiffe://mesh.local`` signs only for ``mesh.local``. ``top`` is the root the
    chain was verified to, or the top certificate of the chain the peer sent (its
    signer is looked up in ``trust``: :meth:`TrustBundle.trust_domains_for`). A
    root that names no trust domain vouches for any.

    :raises PeerVerificationError: naming both trust domains.
    """
    domains = trust.trust_domains_for(top)
    if None in domains:
        return
    try:
        domain = trust_domain_of(spiffe_id)
    except ValueError as exc:
        raise PeerVerificationError(f"peer certificate carries an {exc}") from None
    if domain not in domains:
        allowed = ", ".join(sorted(d for d in domains if d is not None))
        raise PeerVerificationError(
            f"peer identity {spiffe_id} is in trust domain {domain!r}, but its CA "
            f"vouches only for {allowed}"
        )


def check_server_certificate(
    certificate: x509.Certificate, chain: list[x509.Certificate], trust: TrustBundle
) -> str:
    """The rules of a server certificate whose chain a TLS library verified already (for
    a client that cannot hand the whole check to :func:`verify_peer`): an extended key
    usage, where there is one, that allows serverAuth, the leaf rules
    (:func:`spiffe_id_of_leaf`), and the trust domain of the root that vouched for it.
    Returns the SPIFFE ID.

    :raises PeerVerificationError: with a one-line reason.
    """
    check_server_usage(certificate)
    spiffe_id = spiffe_id_of_leaf(certificate)
    check_trust_domain(spiffe_id, chain[-1] if chain else certificate, trust)
    return spiffe_id


def check_server_usage(certificate: x509.Certificate) -> None:
    """Refuse a leaf whose extended key usage, where it has one, does not allow
    serverAuth: what a client checks of its server.

    :raises PeerVerificationError: with a one-line reason.
    """
    _check_usage(certificate, ExtendedKeyUsageOID.SERVER_AUTH, "servers (no serverAuth usage)")


def check_client_usage(certificate: x509.Certificate) -> None:
    """Refuse a leaf whose extended key usage, where it has one, does not allow
    clientAuth: what a server checks of its client (:func:`verify_peer`'s client
    verifier refuses it too, in its own words).

    :raises PeerVerificationError: with a one-line reason.
    """
    _check_usage(certificate, ExtendedKeyUsageOID.CLIENT_AUTH, "clients (no clientAuth usage)")


def _check_usage(certificate: x509.Certificate, needed: x509.ObjectIdentifier, for_: str) -> None:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if needed not in usage:
        raise PeerVerificationError(f"peer certificate is not for {for_}")


def _check_leaf_key_usage(certificate: x509.Certificate) -> None:
    """X509-SVID 4.3: a leaf's key signs handshakes, never certificates or CRLs.
    A leaf that names no key usage at all is taken (RFC 5280 4.2.1.3 makes the
    extension optional; quicmesh's CA always writes it)."""
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if usage.key_cert_sign or usage.crl_sign:
        signs = "keyCertSign" if usage.key_cert_sign else "cRLSign"
        raise PeerVerificationError(
            f"peer certificate's key usage is a CA's (keyUsage {signs}), not a workload's"
        )
    if not usage.digital_signature:
        raise PeerVerificationError(
            "peer certificate's keyUsage lacks digitalSignature: its key may not sign a handshake"
        )


def spiffe_id_of_leaf(certificate: x509.Certificate) -> str:
    """Return the SPIFFE ID of a peer leaf, by the X509-SVID leaf rules (its sections
    4.3 and 5.2): not a CA certificate, no key usage a CA's (``keyCertSign``,
    ``cRLSign``) and ``digitalSignature`` where it names its key usages, exactly one
    URI SAN, a valid SPIFFE ID with a path (a trust domain's own ID names its CA, no
    workload); PeerVerificationError otherwise.

    OpenSSL and aioquic take a CA:true leaf that its issuer signed (and aioquic the
    CA's own certificate, as a server's); rustls and ``cryptography``'s verifier do not.
    None of them looks at a leaf's ``keyCertSign``.
    """
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        pass
    else:
        if constraints.value.ca:
            raise PeerVerificationError(
                "peer certificate is a CA certificate (basicConstraints CA:true), not a workload's"
            )
    _check_leaf_key_usage(certificate)
    spiffe_id = spiffe_id_of(certificate)
    if spiffe_id is None:
        raise PeerVerificationError("peer certificate carries no SPIFFE ID")
    if len(uri_sans_of(certificate)) != 1:
        raise PeerVerificationError("peer certificate carries more than one URI SAN")
    try:
        validate_spiffe_id(spiffe_id)
    except ValueError as exc:
        raise PeerVerificationError(f"peer certificate carries an {exc}") from exc
    if names_a_trust_domain(spiffe_id):
        raise PeerVerificationError(
            f"peer certificate carries {spiffe_id}, a trust domain's ID with no path, "
            "not a workload's"
        )
    return spiffe_id


def peer_identity_from_ssl(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, trust: TrustBundle | None = None
) -> str:
    """Return the SPIFFE ID of the peer of a completed ``ssl`` handshake.

    The chain itself was verified by ``ssl`` (the contexts from
    :mod:`quicmesh.tls.context` require it); this reads the SPIFFE ID. With
    asyncio streams, pass ``writer.get_extra_info("ssl_object")``.

    :param trust: the bundle the chain was verified with, to check the trust
        domain (:func:`check_trust_domain`); by default the CA certificates loaded
        in the SSL context.
    :raises PeerVerificationError: if the peer sent no certificate, it breaks a leaf
        rule (:func:`spiffe_id_of_leaf`: a CA's, no or an invalid SPIFFE ID), or its ID is
        of a trust domain its CA does not serve.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        raise PeerVerificationError("peer presented no certificate")
    certificate = x509.load_der_x509_certificate(der)
    spiffe_id = spiffe_id_of_leaf(certificate)
    context = getattr(ssl_object, "context", None)
    if trust is None and context is not None:
        roots = context.get_ca_certs(binary_form=True)
        if roots:
            trust = TrustBundle(x509.load_der_x509_certificate(root) for root in roots)
    if trust is not None:
        check_trust_domain(spiffe_id, _top_of_verified_chain(ssl_object, certificate), trust)
    return spiffe_id


def _top_of_verified_chain(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, leaf: x509.Certificate
) -> x509.Certificate:
    """The certificate of the chain ``ssl`` verified that a root of the bundle signed:
    the leaf, or the last intermediate. With an intermediate, the leaf's own issuer is
    no root, and :meth:`TrustBundle.trust_domains_for` would have to vouch with every
    root's domain (an intermediate under one trust domain's root could issue an ID of
    another's). The verified chain (OpenSSL's, root last) says which root it was.

    :raises PeerVerificationError: the chain cannot be read (then the check cannot be
        made, and a peer with intermediates is refused rather than let through).
    """
    chain = _verified_chain(ssl_object)
    if chain is None:
        raise PeerVerificationError(
            "the verified certificate chain cannot be read here: cannot check the trust "
            "domain of a peer certificate issued by an intermediate"
        )
    if len(chain) < 2:
        return leaf
    return chain[-2]


def presented_chain_of(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[x509.Certificate]:
    """The certificates the peer of a completed ``ssl`` handshake sent, leaf first (what
    :func:`verify_peer` takes to verify them again, with another bundle): Python 3.13's
    ``get_unverified_chain``, or the ``_ssl`` method under it since 3.10; the leaf alone
    if neither is there; empty if the peer sent none."""
    method = getattr(ssl_object, "get_unverified_chain", None)
    if method is None:
        method = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if method is None:
        der = ssl_object.getpeercert(binary_form=True)
        return [x509.load_der_x509_certificate(der)] if der else []
    return [_loaded(item) for item in method() or ()]


def _loaded(item: object) -> x509.Certificate:
    """A certificate ``ssl`` gave (DER bytes, or an ``_ssl.Certificate``)."""
    der = item if isinstance(item, bytes) else item.public_bytes(_ENCODING_DER)  # type: ignore[attr-defined]
    return x509.load_der_x509_certificate(der)


def _verified_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[x509.Certificate] | None:
    """The chain ``ssl`` verified, leaf first and root last (Python 3.13's
    ``get_verified_chain``, or the ``_ssl`` method under it since 3.10); None if neither
    is there."""
    method = getattr(ssl_object, "get_verified_chain", None)
    if method is None:
        method = getattr(getattr(ssl_object, "_sslobj", None), "get_verified_chain", None)
    if method is None:
        return None
    return [_loaded(item) for item in method() or ()]


_ENCODING_DER = 2
"""``_ssl.ENCODING_DER``: what ``_ssl.Certificate.public_bytes`` takes for DER."""
