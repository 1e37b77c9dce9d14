"""quicmesh: service-mesh traffic between sidecars over QUIC.

The public API (see docs/api.md)::

    ca = quicmesh.DevCA(); ident = ca.issue("spiffe://mesh.local/ns/default/sa/reviews")
    t = quicmesh.QuicTransport(identity=ident, trust=ca.trust_bundle)  # or AutoTransport...
    listener = await t.listen(("127.0.0.1", 0), handler, authorize=None)
    conn = await t.connect(listener.address)
    stream = await conn.open_stream("reviews.default.svc:9080")

Everything not exported here is internal, but for what docs/api.md names by its
module (``quicmesh.transport.tickets.TicketCache``,
``quicmesh.transport.base.transport_registry``, ``quicmesh.splice.SpliceResult`` and
``moved_so_far``, ``quicmesh.transport.stream.LINGER_TIMEOUT``).
"""

from __future__ import annotations

from .errors import (
    ConfigError,
    ConnectError,
    ConnectionLost,
    InvalidHeader,
    InvalidTarget,
    PeerUnresponsive,
    PeerVerificationError,
    QuicmeshError,
    StreamRefused,
    StreamReset,
    TunnelError,
    TunnelUsageError,
)
from .splice import splice
from .tls import DevCA, Identity, TrustBundle
from .transport.auto import AutoTransport
from .transport.base import Authorizer, Listener, PeerConnection, StreamHandler, Transport
from .transport.h2 import H2Transport
from .transport.quic import QuicTransport
from .transport.stream import MeshStream
from .transport.tcp import TcpTransport
from .tunnel.session import ResetReason

__version__ = "0.1.0"

TRANSPORTS: dict[str, type[Transport]] = {
    "quic": QuicTransport,
    "h2": H2Transport,
    "tcp": TcpTransport,
    "auto": AutoTransport,
}
"""Transport implementations by configuration name."""

__all__ = [
    "TRANSPORTS",
    "Authorizer",
    "AutoTransport",
    "ConfigError",
    "ConnectError",
    "ConnectionLost",
    "DevCA",
    "H2Transport",
    "Identity",
    "InvalidHeader",
    "InvalidTarget",
    "Listener",
    "MeshStream",
    "PeerConnection",
    "PeerUnresponsive",
    "PeerVerificationError",
    "QuicTransport",
    "QuicmeshError",
    "ResetReason",
    "StreamHandler",
    "StreamRefused",
    "StreamReset",
    "TcpTransport",
    "Transport",
    "TrustBundle",
    "TunnelError",
    "TunnelUsageError",
    "splice",
]
