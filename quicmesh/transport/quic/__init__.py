"""QUIC: flows as HTTP/3 CONNECT streams, many per QUIC connection.

The package, by layer (docs/design.md, "QUIC connection anatomy"):

* :mod:`.transport`: :class:`QuicTransport` (settings, tickets, counters;
  ``connect`` / ``listen``);
* :mod:`.listener`: :class:`QuicListener` and the batching, admission-controlled
  server socket;
* :mod:`.connection`: :class:`QuicPeerConnection`, the one asyncio object per
  QUIC connection (engine connection, H3 tunnel session, streams, one timer),
  configured by :class:`~.options.QuicOptions`;
* :mod:`.policy`: the sans-IO 0-RTT budget and rebind rule;
* :mod:`.engine`: the QUIC engine interface; :mod:`.aioquic_engine` its aioquic
  implementation (over :class:`quicmesh._aioquic.MeshQuicConnection`) and
  :mod:`.server` the server socket that builds its connections.
"""

from __future__ import annotations

from .connection import (
    UDP_SOCKET_BUFFER,
    UNREACHABLE_ERRNOS,
    QuicPeerConnection,
)
from .listener import STATELESS_RESETS_PER_SECOND, QuicListener
from .options import (
    COUNTERS,
    CRYPTO_ERROR_BAD_CERTIFICATE,
    DEFAULT_MAX_EARLY_DATA,
    EARLY_DATA_OVERHEAD,
    OLD_SOCKET_GRACE,
    QuicOptions,
)
from .policy import EARLY_STREAM_COST
from .transport import RECEIVE_BATCH, QuicTransport, load_stateless_reset_key

__all__ = [
    "COUNTERS",
    "CRYPTO_ERROR_BAD_CERTIFICATE",
    "DEFAULT_MAX_EARLY_DATA",
    "EARLY_DATA_OVERHEAD",
    "EARLY_STREAM_COST",
    "OLD_SOCKET_GRACE",
    "RECEIVE_BATCH",
    "STATELESS_RESETS_PER_SECOND",
    "UDP_SOCKET_BUFFER",
    "UNREACHABLE_ERRNOS",
    "QuicListener",
    "QuicOptions",
    "QuicPeerConnection",
    "QuicTransport",
    "load_stateless_reset_key",
]
