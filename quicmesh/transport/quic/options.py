"""Settings of one QUIC connection (:class:`QuicOptions`) and the constants they use."""

from __future__ import annotations

from dataclasses import dataclass

from ...tls import TrustBundle
from .._stream_rate import StreamRates
from ..base import ACK_ELICITING_THRESHOLD_MAX, DEFAULT_ACK_ELICITING_THRESHOLD
from ..liveness import LivenessConfig
from ..tickets import TicketCache, TicketStore

CRYPTO_ERROR_BAD_CERTIFICATE = 0x100 + 42
"""QUIC CRYPTO_ERROR carrying TLS alert bad_certificate (RFC 9001 section 4.8)."""

DEFAULT_MAX_EARLY_DATA = 16 * 1024
"""Payload bytes a client sends as 0-RTT, over all streams, before the handshake completes."""

EARLY_DATA_OVERHEAD = 4 * 1024
"""Stream bytes (HTTP/3 framing, control streams) a server allows in 0-RTT on top of
``max_early_data`` before it closes the connection."""

OLD_SOCKET_GRACE = 2.0
"""Seconds a migrated client keeps receiving on its previous socket (packets in flight),
on either engine."""

COUNTERS = (
    "zero_rtt_attempted",
    "zero_rtt_accepted",
    "zero_rtt_rejected",
    "tickets_received",
    "tickets_issued",
    "tickets_redeemed",
    "tickets_refused",
    "migrations_active",
    "migrations_auto_rebind",
    "migrations_peer_address_change",
    "path_validations_ok",
    "path_validations_failed",
    "peer_violations_quic",
    "peer_violations_http3",
)
"""Keys of :attr:`QuicTransport.counters` (and of the per-connection ``stats()``)."""

__all__ = [
    "ACK_ELICITING_THRESHOLD_MAX",
    "COUNTERS",
    "CRYPTO_ERROR_BAD_CERTIFICATE",
    "DEFAULT_ACK_ELICITING_THRESHOLD",
    "DEFAULT_MAX_EARLY_DATA",
    "EARLY_DATA_OVERHEAD",
    "QuicOptions",
]


@dataclass(frozen=True)
class QuicOptions:
    """What one QUIC connection driver needs from its transport, as one value.

    :class:`~quicmesh.transport.quic.QuicTransport` builds it from its
    parameters (documented there) for each new connection; the driver keeps no
    reference to the transport.

    :param trust: CAs the peer's chain must reach (and its SPIFFE trust domain).
    :param high_water: unsent bytes per stream above which ``drain()`` waits.
    :param stream_window: receive window per stream, bytes.
    :param connection_window: receive window per connection, bytes.
    :param max_early_data: (client) 0-RTT payload budget; (server) 0-RTT stream
        bytes accepted, plus :data:`EARLY_DATA_OVERHEAD`.
    :param rebind_after_ptos: (client) rebind after this many probe timeouts.
    :param receive_batch: datagrams read per readiness event (new sockets).
    :param liveness: keepalive and dead-peer bounds.
    :param ticket_cache: (client) where received tickets go.
    :param own_identity: the SPIFFE ID this side presents: a ticket it receives is kept
        for it only (a ticket resumes as the client identity it was issued to).
    :param ticket_store: (server) where issued tickets go, and are redeemed from.
    :param stream_rates: (server) one new-stream token bucket per peer identity,
        shared by the transport's connections (:mod:`quicmesh.transport._stream_rate`).
    """

    trust: TrustBundle
    high_water: int
    stream_window: int
    connection_window: int
    max_early_data: int
    rebind_after_ptos: int | None
    receive_batch: int
    liveness: LivenessConfig
    ticket_cache: TicketCache
    ticket_store: TicketStore
    stream_rates: StreamRates
    own_identity: str = ""
