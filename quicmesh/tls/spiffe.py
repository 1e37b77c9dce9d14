"""SPIFFE IDs: validating them and finding them in X.509 certificates.

A SPIFFE ID names a workload: ``spiffe://<trust domain>/<path>``. The rules
enforced here are those of the SPIFFE-ID specification
(https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md).
"""

from __future__ import annotations

import string

from cryptography import x509

SPIFFE_SCHEME_PREFIX = "spiffe://"
"""The prefix every SPIFFE ID starts with (the scheme must be lowercase)."""

MAX_SPIFFE_ID_BYTES = 2048
"""The longest SPIFFE ID, in bytes of its UTF-8 encoding, the specification allows."""

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


def validate_spiffe_id(value: str) -> str:
    """Check that ``value`` is a valid SPIFFE ID and return it.

    A valid SPIFFE ID has exactly one spelling (lowercase scheme and trust
    domain, no percent-encoding), so the value returned is the value given.

    :param value: the candidate, e.g. ``"spiffe://mesh.local/ns/default/sa/reviews"``.
    :returns: ``value``, known to be a valid SPIFFE ID.
    :raises ValueError: ``invalid SPIFFE ID '<value>': <why>`` (the value cut at 100
        characters).
    """
    reason = _spiffe_id_problem(value)
    if reason is not None:
        shown = repr(value)
        shown = shown if len(shown) <= 100 else f"{shown[:100]}..."
        raise ValueError(f"invalid SPIFFE ID {shown}: {reason}")
    return value


def _spiffe_id_problem(value: str) -> str | None:
    """Return why ``value`` is not a valid SPIFFE ID, or ``None`` if it is."""
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not value:
        return "it is empty"
    if len(value.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
        return f"it is longer than {MAX_SPIFFE_ID_BYTES} bytes"
    if not value.startswith(SPIFFE_SCHEME_PREFIX):
        return f"it must start with {SPIFFE_SCHEME_PREFIX!r} (lowercase scheme)"
    if "?" in value or "#" in value:
        return "a query or fragment is not allowed"
    trust_domain, slash, path = value[len(SPIFFE_SCHEME_PREFIX) :].partition("/")
    if not trust_domain:
        return "the trust domain is empty"
    if "@" in trust_domain:
        return "userinfo is not allowed"
    if ":" in trust_domain:
        return "a port is not allowed"
    if not _TRUST_DOMAIN_CHARS.issuperset(trust_domain):
        return "the trust domain may only contain lowercase letters, digits, '.', '-' and '_'"
    if not slash:
        return None
    for segment in path.split("/"):
        if not segment:
            return "the path has an empty segment (a '//' or a trailing '/')"
        if segment in (".", ".."):
            return "the path may not contain '.' or '..' segments"
        if not _PATH_SEGMENT_CHARS.issuperset(segment):
            return "path segments may only contain letters, digits, '.', '-' and '_'"
    return None


def trust_domain_of(spiffe_id: str) -> str:
    """Return the trust domain of a valid SPIFFE ID (``"mesh.local"`` for ``"spiffe://mesh.local/x"``).

    :raises ValueError: if ``spiffe_id`` is not a valid SPIFFE ID.
    """
    validate_spiffe_id(spiffe_id)
    return spiffe_id[len(SPIFFE_SCHEME_PREFIX) :].partition("/")[0]


def names_a_trust_domain(spiffe_id: str) -> bool:
    """Whether a valid SPIFFE ID has no path (``spiffe://mesh.local``): it names a trust
    domain (its CA), never a workload, and no leaf may carry it (X509-SVID 5.2)."""
    return "/" not in spiffe_id.removeprefix(SPIFFE_SCHEME_PREFIX)


def uri_sans_of(certificate: x509.Certificate) -> list[str]:
    """Return every URI subject alternative name of ``certificate``, in order."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(extension.value.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(certificate: x509.Certificate) -> str | None:
    """Return the first ``spiffe://`` URI subject alternative name of ``certificate``.

    The value is returned as found; use :func:`validate_spiffe_id` (or
    :func:`quicmesh.tls.verify_peer`, which does) before trusting it.

    :returns: the SPIFFE ID, or ``None`` if the certificate carries none.
    """
    for uri in uri_sans_of(certificate):
        if uri.startswith(SPIFFE_SCHEME_PREFIX):
            return uri
    return None
