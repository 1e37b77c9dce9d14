"""Is our own certificate usable, when to renew it, and why a handshake failed.

Sans-IO helpers (the time is a parameter):

- :func:`own_certificate_problem` says in one line why a sidecar must not
  report ready with an identity: expired, not yet valid, or not trusted by its
  own trust bundle (a peer would then refuse it too).
- :func:`renewal_time` is when a certificate should be replaced: at two thirds
  of its lifetime, as SPIRE and istio-agent do.
- :func:`handshake_failure_reason` maps a handshake error to a short reason
  label for ``/metrics`` and tells whose certificate was at fault.
"""

from __future__ import annotations

import datetime

from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from quicmesh.errors import ConfigError
from quicmesh.tls.identity import Identity, TrustBundle
from quicmesh.tls.spiffe import spiffe_id_of

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
    verifier = PolicyBuilder().store(Store(trust.certificates)).time(now).build_client_verifier()
    try:
        verifier.verify(certificate, identity.chain)
    except VerificationError as exc:
        return f"our certificate ({name}) is not trusted by our own trust bundle: {exc}"
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
