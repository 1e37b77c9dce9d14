"""Is our own certificate usable, when to renew it, and why a handshake failed.

Sans-IO helpers (the time is a parameter):

- :func:`own_certificate_problem` says in one line why a sidecar must not
  report ready with an identity: expired, not yet valid, not trusted by its
  own trust bundle, or breaking another rule every peer applies to it (one URI
  SAN, serverAuth and clientAuth where it names usages, the trust domain its CA
  serves): peers would refuse it.
- :func:`renewal_time` is when a certificate should be replaced: at two thirds
  of its lifetime, as SPIRE and istio-agent do.
- :func:`handshake_failure_reason` maps a handshake error to a short reason
  label for ``/metrics`` and tells whose certificate was at fault.
- :func:`key_refusal` says which key types and sizes a TLS library or QUIC engine
  takes, when its own error ("failed to parse private key as RSA, ECDSA, or
  EdDSA") does not.
"""

from __future__ import annotations

import datetime

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from quicmesh.errors import ConfigError, PeerVerificationError
from quicmesh.tls.identity import Identity, TrustBundle
from quicmesh.tls.spiffe import spiffe_id_of
from quicmesh.tls.verify import (
    check_client_usage,
    check_server_usage,
    check_trust_domain,
    spiffe_id_of_leaf,
)

RENEW_FRACTION = 2 / 3
"""Fraction of a certificate's lifetime after which it is renewed."""

HANDSHAKE_FAILURE_REASONS = (
    "peer_certificate_expired",
    "peer_certificate_not_yet_valid",
    "peer_certificate_untrusted",
    "peer_certificate_invalid",
    "our_certificate_refused",
    "timeout",
    "other",
)
"""Values of the ``reason`` label of ``quicmesh_handshake_failures_total``."""


def own_certificate_problem(
    identity: Identity, trust: TrustBundle, now: datetime.datetime | None = None
) -> str | None:
    """Why ``identity`` cannot be presented to peers now, or None if it can.

    The rules are the ones peers apply to it (:mod:`quicmesh.tls.verify`, its
    functions, not a copy): a sidecar is a server to some peers and a client to
    others, so its certificate must pass both sides' checks. A certificate that
    breaks one would be taken, and then every handshake would fail.

    :returns: one line, saying it is *our* certificate, e.g. ``"our certificate
        (spiffe://mesh.local/a) expired at 2026-01-01 00:00:00+00:00"``.
    """
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    certificate = identity.certificate
    name = spiffe_id_of(certificate) or certificate.subject.rfc4514_string()
    if now > certificate.not_valid_after_utc:
        return f"our certificate ({name}) expired at {certificate.not_valid_after_utc}"
    if now < certificate.not_valid_before_utc:
        return f"our certificate ({name}) is not valid before {certificate.not_valid_before_utc}"
    try:
        check_server_usage(certificate)
        check_client_usage(certificate)
        spiffe_id = spiffe_id_of_leaf(certificate)
    except PeerVerificationError as exc:
        return f"our certificate ({name}) would be refused by peers: {_as_ours(exc)}"
    verifier = PolicyBuilder().store(Store(trust.certificates)).time(now).build_client_verifier()
    try:
        verified = verifier.verify(certificate, identity.chain)
    except VerificationError as exc:
        return f"our certificate ({name}) is not trusted by our own trust bundle: {exc}"
    try:
        check_trust_domain(spiffe_id, verified.chain[-1], trust)
    except PeerVerificationError as exc:
        return f"our certificate ({name}) would be refused by peers: {_as_ours(exc)}"
    return None


def _as_ours(error: PeerVerificationError) -> str:
    """A peer's reason for refusing a certificate, said of ours: "it carries ..."
    rather than "peer certificate carries ..." (which reads as the peer's)."""
    text = str(error)
    for peers, ours in (
        ("peer certificate's ", "its "),
        ("peer certificate ", "it "),
        ("peer identity ", "its identity "),
    ):
        if text.startswith(peers):
            return ours + text[len(peers) :]
    return text


RING_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
"""The ECDSA curves rustls (ring) signs with, by ``cryptography``'s name: not P-521."""

RING_RSA_BITS = (2048, 8192)
"""The RSA key sizes rustls (ring) accepts."""

OPENSSL_MIN_RSA_BITS = 2048
"""RSA keys under this size OpenSSL refuses at its default security level
(``EE_KEY_TOO_SMALL``)."""


def describe_key(identity: Identity) -> str:
    """The key's type and size in a few words: ``"ECDSA P-521"``, ``"RSA-1024"``, ``"Ed448"``."""
    key = identity.private_key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curve = key.curve.name
        return "ECDSA " + {"secp521r1": "P-521", **RING_CURVES}.get(curve, curve)
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PrivateKey):
        return "Ed448"
    return type(key).__name__


def key_refusal(identity: Identity, library: str) -> str | None:
    """Why ``library`` (``"rustls"``: the native QUIC engine; ``"openssl"``: h2, tcp)
    refuses our key, in words an operator can act on; None if its type and size are
    ones it takes (then whatever it said is the reason). The engines' own texts say
    only "failed to parse private key as RSA, ECDSA, or EdDSA" or "EE_KEY_TOO_SMALL"."""
    key = identity.private_key
    described = describe_key(identity)
    if library == "rustls":
        supported = "ECDSA P-256/P-384, Ed25519, RSA of 2048 to 8192 bits (rustls/ring)"
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in RING_CURVES:
            return f"{described} keys are not supported: only {supported}"
        if isinstance(key, rsa.RSAPrivateKey) and not (
            RING_RSA_BITS[0] <= key.key_size <= RING_RSA_BITS[1]
        ):
            return f"{described} keys are not supported: only {supported}"
        if not isinstance(
            key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
        ):
            return f"{described} keys are not supported: only {supported}"
        return None
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < OPENSSL_MIN_RSA_BITS:
        return (
            f"{described} keys are too small: RSA keys under {OPENSSL_MIN_RSA_BITS} bits are "
            "refused (OpenSSL security level)"
        )
    return None


def check_own_certificate(
    identity: Identity, trust: TrustBundle, source: str, now: datetime.datetime | None = None
) -> None:
    """Raise :class:`ConfigError` (``<source>: <problem>``) if :func:`own_certificate_problem`."""
    problem = own_certificate_problem(identity, trust, now)
    if problem is not None:
        raise ConfigError(f"{source}: {problem}")


def renewal_time(identity: Identity) -> datetime.datetime:
    """When ``identity`` should be replaced: two thirds into its validity period."""
    certificate = identity.certificate
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return start + (end - start) * RENEW_FRACTION


def refused_by_peer(whose: str, reason: str) -> str:
    """The text of a handshake the peer (``"server"`` or ``"client"``) closed with a TLS
    alert giving ``reason``: when it is about a certificate, ours (the peer's reason says
    "peer certificate" of us), which the text says, not to be read as the peer's."""
    if "certificate" in reason.lower():
        return f"handshake refused: the {whose} refused our certificate: {reason}"
    return f"handshake refused by the {whose}: {reason}"


def handshake_failure_reason(error: BaseException) -> tuple[str, str]:
    """A reason label (one of :data:`HANDSHAKE_FAILURE_REASONS`) and the side at fault.

    The side is ``"peer"`` (we refused the peer's certificate), ``"ours"`` (the
    peer refused our certificate: its alert, or a quicmesh peer's close reason
    about *its* peer, says so), or ``"unknown"``.
    A "handshake refused: ..." error is the peer's refusal (the QUIC transports'
    text for a handshake the peer closed with a TLS alert): whatever its reason
    says about a certificate, it says of ours.
    """
    text = str(error).lower()
    if isinstance(error, TimeoutError) or "timed out" in text or "not done in" in text:
        return "timeout", "unknown"
    about_a_certificate = "certificate" in text or "issuer" in text or "signature" in text
    remote = "handshake refused" in text or "connection closed" in text
    if (
        "our certificate" in text
        or (remote and "peer certificate" in text)
        or ("handshake refused" in text and about_a_certificate)
    ):
        # A quicmesh peer closes with "peer certificate ...": we are its peer.
        return "our_certificate_refused", "ours"
    if not about_a_certificate:
        return "other", "unknown"
    if "expired" in text:
        return "peer_certificate_expired", "peer"
    if "not yet valid" in text:
        return "peer_certificate_not_yet_valid", "peer"
    if any(
        phrase in text
        for phrase in ("not trusted", "issuer", "self-signed", "self signed", "trusted ca")
    ):
        return "peer_certificate_untrusted", "peer"
    return "peer_certificate_invalid", "peer"
