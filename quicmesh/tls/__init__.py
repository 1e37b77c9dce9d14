"""TLS for quicmesh: a development CA, SPIFFE identities, peer verification, ssl contexts.

Sidecars authenticate each other with X.509 SVIDs: leaf certificates whose
only subject alternative name is a SPIFFE ID (``spiffe://mesh.local/ns/default/sa/reviews``).

- :mod:`quicmesh.tls.spiffe`: :func:`validate_spiffe_id`, :func:`spiffe_id_of`.
- :mod:`quicmesh.tls.identity`: :class:`Identity` (chain + key), :class:`TrustBundle` (roots).
- :mod:`quicmesh.tls.ca`: :class:`DevCA`, which issues identities for tests and local meshes.
- :mod:`quicmesh.tls.verify`: :func:`verify_peer` (for QUIC, where aioquic does not verify
  client certificates) and :func:`peer_identity_from_ssl`.
- :mod:`quicmesh.tls.context`: :func:`server_ssl_context`, :func:`client_ssl_context` (TCP).
"""

from __future__ import annotations

from quicmesh.tls.ca import DevCA
from quicmesh.tls.context import client_ssl_context, server_ssl_context
from quicmesh.tls.identity import Identity, TrustBundle
from quicmesh.tls.spiffe import spiffe_id_of, validate_spiffe_id
from quicmesh.tls.verify import peer_identity_from_ssl, verify_peer

__all__ = [
    "DevCA",
    "Identity",
    "TrustBundle",
    "client_ssl_context",
    "peer_identity_from_ssl",
    "server_ssl_context",
    "spiffe_id_of",
    "validate_spiffe_id",
    "verify_peer",
]
