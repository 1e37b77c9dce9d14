"""QuicTransport: flows as HTTP/3 CONNECT streams over aioquic.

The asyncio adaptor is thin: :class:`_TunnelProtocol` is an aioquic
:class:`QuicConnectionProtocol` that hands QUIC events to a sans-IO
:class:`~quicmesh.tunnel.h3.H3TunnelSession` and the resulting tunnel events to
the shared :class:`~quicmesh.transport._session.SessionConnection`. Servers use
aioquic's own :class:`~aioquic.asyncio.server.QuicServer` (connection-ID routing,
version negotiation). Every socket reads the datagrams waiting on it in batches
and each connection transmits once per batch (:mod:`quicmesh.transport._udp`).

Mutual TLS: the client verifies the server's chain through aioquic (``cadata``)
and its SPIFFE ID here; the server asks for a client certificate through
:class:`quicmesh._aioquic.MeshQuicConnection` and verifies its chain and
SPIFFE ID with :func:`quicmesh.tls.verify_peer` when the handshake completes,
before any stream is served.

0-RTT resumption (:meth:`QuicTransport.connect` with ``early_data=True``): a
resumed handshake carries no certificate, so each session ticket is stored with
the identity verified when it was issued (:mod:`quicmesh.transport.tickets`).
The client returns a connection at once, with the identity its ticket recorded;
streams opened with ``wait_response=False`` send their CONNECT and first bytes
(up to ``max_early_data``) as 0-RTT; when the handshake completes the identity is
confirmed (or every stream fails with :class:`PeerVerificationError`) and, if the
server rejected 0-RTT, that data is sent again in 1-RTT packets at once. The
server serves 0-RTT streams as soon as a single-use ticket is redeemed, with the
identity the ticket was issued to; a replayed first flight finds no ticket.

Connection migration (:meth:`QuicPeerConnection.migrate`): the client moves to a
new UDP socket and the next connection ID; the server (aioquic) validates the
new path and limits what it sends there to three times what it received until
then. Migrations and path validations are counted per connection and per
transport (:attr:`QuicTransport.counters`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
import weakref
from collections import Counter
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from aioquic.tls import SessionTicket
from cryptography import x509

from ... import _aioquic
from ..._aioquic import MeshQuicConnection
from ...errors import (
    ConfigError,
    ConnectError,
    ConnectionLost,
    PeerUnresponsive,
    PeerVerificationError,
    QuicmeshError,
    TunnelError,
)
from ...tls import Identity, TrustBundle, spiffe_id_of, verify_peer
from ...tls.check import handshake_failure_reason
from ...tls.verify import check_trust_domain
from ...tunnel.h3 import DEFAULT_CONNECTION_WINDOW, DEFAULT_STREAM_WINDOW, H3TunnelSession
from ...tunnel.session import ResetReason
from .. import _udp
from .._admission import ADMISSION_COUNTERS, Admission, AdmissionConfig, Decision, RateLimitedLog
from .._session import SessionConnection
from .._stream_rate import DEFAULT_STREAM_RATE, StreamRates
from ..base import Address, Authorizer, Listener, StreamHandler, Transport, host_port
from ..liveness import UNRESPONSIVE, Liveness, LivenessConfig, Verdict
from ..stream import MeshStream
from ..tickets import TicketCache, TicketStore
from . import aioquic_engine, engine
from .engine import EngineLimits, EngineTls, get_engine
from .server import MeshQuicServer

logger = logging.getLogger("quicmesh.transport.quic")

CRYPTO_ERROR_BAD_CERTIFICATE = 0x100 + 42
"""QUIC CRYPTO_ERROR carrying TLS alert bad_certificate (RFC 9001 section 4.8)."""

DEFAULT_MAX_EARLY_DATA = 16 * 1024
"""Payload bytes a client sends as 0-RTT, over all streams, before the handshake completes."""

EARLY_DATA_OVERHEAD = 4 * 1024
"""Stream bytes (HTTP/3 framing, control streams) a server allows in 0-RTT on top of
``max_early_data`` before it closes the connection."""

EARLY_STREAM_COST = 64
"""What a CONNECT costs from the client's 0-RTT budget besides its target and headers."""

RECEIVE_BATCH = _udp.DEFAULT_MAX_DATAGRAMS
"""Datagrams a QUIC socket reads per readiness event by default (``receive_batch``)."""

OLD_SOCKET_GRACE = 2.0
"""Seconds a migrated client keeps receiving on its previous socket (packets in flight)."""

UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
)
"""Socket errors that report an ICMP destination unreachable (port, host, network)."""

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
)
"""Keys of :attr:`QuicTransport.counters` (and of the per-connection ``stats()``)."""


class QuicPeerConnection(SessionConnection):
    """A QUIC connection to one peer sidecar; each flow is one HTTP/3 CONNECT stream.

    On a client connected with ``early_data=True`` the connection exists before
    the handshake completes: :attr:`early_data` is ``"attempted"`` until then,
    and stream payload beyond ``max_early_data`` waits for the handshake.
    """

    transport_name = "quic"

    def __init__(
        self,
        protocol: _TunnelProtocol,
        *,
        early_data: str = "none",
        max_early_data: int = DEFAULT_MAX_EARLY_DATA,
        **kwargs: Any,
    ) -> None:
        super().__init__(protocol.session, **kwargs)
        self.protocol = protocol
        self.lost_before = 0
        """Packets lost before this connection object existed (not counted)."""
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self._early_data = early_data
        self._early_budget: int | None = max_early_data if early_data == "attempted" else None
        self._deferred: list[tuple[MeshStream, bytes, bool]] = []
        self._deferred_bytes: dict[int, int] = {}
        self._handshake_waiter: asyncio.Future[None] = self._loop.create_future()

    @property
    def early_data(self) -> str:
        return self._early_data

    @property
    def supports_migration(self) -> bool:
        """A client connection can :meth:`migrate`; a server's follows its peer."""
        return bool(self.protocol.is_client)

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's certificate (None on a resumed session, which presents none)."""
        quic = self.protocol._quic
        if quic.tls is None:
            return None
        certificate, _ = _aioquic.peer_certificate(quic)
        return certificate

    def _transmit(self) -> None:
        self.protocol.transmit()

    def _close_transport(self) -> None:
        self.protocol.close_socket_when_done()

    @property
    def peer_address(self) -> str:
        path = _aioquic.active_path(self.protocol._quic)
        return host_port(path[0]) if path is not None else ""

    def stats(self) -> dict[str, Any]:
        """Counters of :class:`~quicmesh.PeerConnection` plus QUIC's: ``early_data``,
        ``zero_rtt_packets_sent``, ``path`` (peer address in use), ``migrations_*``,
        ``path_validations_*`` and the 0-RTT and ticket counts of this connection."""
        quic = self.protocol._quic
        result = super().stats()
        result.update(_aioquic.connection_stats(quic))
        path = _aioquic.active_path(quic)
        result.update(
            transport="quic",
            peer_identity=self.peer_identity,
            bytes_sent=self.protocol.bytes_sent,
            bytes_received=self.protocol.bytes_received,
            packets_sent=self.protocol.datagrams_sent,
            packets_received=self.protocol.datagrams_received,
            packets_lost=self.protocol._quic.packets_lost - self.lost_before,
            zero_rtt_packets_sent=self.protocol._quic.zero_rtt_packets_sent,
            early_data=self._early_data,
            path=path[0] if path is not None else None,
            path_validated=path[1] if path is not None else None,
        )
        result.update(self.counters)
        return result

    async def wait_closed(self) -> None:
        await self.protocol.wait_closed()
        self.protocol.close_socket_when_done()
        await super().wait_closed()

    async def migrate(self, local_address: Address | None = None) -> None:
        """Move this (client) connection to a new UDP socket, mid-transfer.

        :param local_address: where to bind the new socket; by default the same
            host as now with a new port. The next connection ID the server issued
            is used, so the two paths cannot be linked by an observer (when the
            server has issued none, the current one is kept). Streams carry on:
            packets lost on the way are retransmitted. Raises
            :class:`~quicmesh.errors.ConnectError` if the socket cannot be opened.
        """
        self._raise_if_lost()
        await self.protocol.migrate(local_address, cause="active")

    # -- 0-RTT budget ----------------------------------------------------------

    async def open_stream(
        self,
        target: str,
        headers: dict[str, str] | None = None,
        *,
        wait_response: bool = True,
    ) -> MeshStream:
        if self._early_budget is not None:
            cost = EARLY_STREAM_COST + len(target)
            cost += sum(len(k) + len(v) for k, v in (headers or {}).items())
            if cost > self._early_budget:
                # No 0-RTT budget left for the CONNECT: open it after the handshake.
                await asyncio.shield(self._handshake_waiter)
            else:
                self._early_budget -= cost
        return await super().open_stream(target, headers, wait_response=wait_response)

    def send_stream_data(self, stream: MeshStream, data: bytes, end_stream: bool) -> None:
        budget = self._early_budget
        if budget is not None:
            self._raise_if_lost()
            if stream.stream_id in self._deferred_bytes or len(data) > budget:
                # Beyond the 0-RTT budget: wait for the handshake, in order.
                self._deferred.append((stream, data, end_stream))
                self._deferred_bytes[stream.stream_id] = self._deferred_bytes.get(
                    stream.stream_id, 0
                ) + len(data)
                return
            self._early_budget = budget - len(data)
        super().send_stream_data(stream, data, end_stream)

    def stream_unsent_bytes(self, stream: MeshStream) -> int:
        deferred = self._deferred_bytes.get(stream.stream_id, 0)
        return super().stream_unsent_bytes(stream) + deferred

    def reset_stream(self, stream: MeshStream, reason: ResetReason) -> None:
        if self._deferred_bytes.pop(stream.stream_id, None) is not None:
            self._deferred = [item for item in self._deferred if item[0] is not stream]
        super().reset_stream(stream, reason)

    def _handshake_completed(self, early_data_accepted: bool) -> None:
        """The handshake is done: settle the 0-RTT outcome and send deferred bytes."""
        self._early_budget = None
        if self._early_data == "attempted":
            self._early_data = "accepted" if early_data_accepted else "rejected"
        deferred, self._deferred = self._deferred, []
        self._deferred_bytes.clear()
        for stream, data, end_stream in deferred:
            if self._lost is None:
                super().send_stream_data(stream, data, end_stream)
        if not self._handshake_waiter.done():
            self._handshake_waiter.set_result(None)

    def _connection_lost(self, error: TunnelError) -> None:
        super()._connection_lost(error)
        self._early_budget = None
        self._deferred.clear()
        self._deferred_bytes.clear()
        if not self._handshake_waiter.done():
            self._handshake_waiter.set_result(None)


class _SocketReceiver(asyncio.DatagramProtocol):
    """The asyncio protocol of a client's UDP socket (the first one, and each one
    the connection migrated to): reads datagrams in batches into its connection."""

    def __init__(self, protocol: _TunnelProtocol, max_datagrams: int) -> None:
        self._protocol = protocol
        self._max_datagrams = max_datagrams
        self.reader: _udp.BatchReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.reader = _udp.BatchReader(
            cast(asyncio.DatagramTransport, transport),
            self._protocol.datagram_received,
            max_datagrams=self._max_datagrams,
            on_error=self._protocol.socket_error,
        )

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.reader is not None
        self.reader.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self._protocol.socket_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader is not None:
            self.reader.close()


class _BatchingQuicServer(MeshQuicServer):
    """aioquic's server (connection-ID routing, version negotiation, new
    connections, Retry), fed in batches: each connection transmits once per batch.

    New connections pass :class:`~quicmesh.transport._admission.Admission` first
    (half-open caps, Retry when configured or under load, handshake timeout); a
    connection whose first datagram does not decrypt is dropped at once.
    """

    def __init__(
        self,
        *,
        max_datagrams: int,
        admission: AdmissionConfig,
        counters: Counter[str],
        reset_key: bytes,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._reset_key = reset_key
        self._resets_window = (0.0, 0)
        self._max_datagrams = max_datagrams
        self.admission = Admission(admission)
        self._counters = counters
        self._refusals = RateLimitedLog(logger)
        self.reader: _udp.BatchReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self._transport is not None
        self.reader = _udp.BatchReader(
            self._transport, self._admit_datagram, max_datagrams=self._max_datagrams
        )

    def _admit_datagram(self, data: bytes, addr: Any) -> None:
        header = _aioquic.new_connection_initial(
            data, self._configuration, known=self._protocols.__contains__
        )
        if header is None:
            cid = _aioquic.unknown_short_header_cid(data, self._configuration.connection_id_length)
            if cid is not None and cid not in self._protocols:
                self._send_stateless_reset(cid, len(data), addr)
                return
            super().datagram_received(data, addr)
            return
        source = str(addr[0])
        if not _aioquic.initial_decrypts(data, self._configuration.connection_id_length):
            # Forged (or corrupted): no connection is created, nothing is kept.
            self._counters["initials_undecryptable"] += 1
            return
        decision = self.admission.decide(source, bool(header.token))
        if decision is Decision.REFUSE:
            self._counters["initials_refused_half_open"] += 1
            self._refusals.log(
                logging.WARNING,
                "half-open",
                "dropped an Initial from %s: %d connections half-open (%d from that address)",
                source,
                self.admission.half_open,
                self.admission.config.max_half_open_per_source,
            )
            return
        self._new_connection(data, addr, header, retry=decision is Decision.RETRY)
        protocol = self._protocols.get(header.destination_cid)
        if protocol is None:
            if decision is Decision.RETRY and not header.token:
                self._counters["retries_sent"] += 1
            elif header.token:
                self._counters["retry_tokens_invalid"] += 1
                self._refusals.log(
                    logging.INFO, "token", "refused an invalid Retry token from %s", source
                )
            return
        if not _aioquic.received_valid_packet(protocol._quic):
            # Nothing decrypted: keep no state for it (a forged Initial costs us nothing).
            self._counters["initials_undecryptable"] += 1
            self._drop(protocol)
            return
        self.admission.opened(protocol, source)
        cast(_TunnelProtocol, protocol).on_handshake_done = self._handshake_done
        self._loop.call_later(
            self.admission.config.handshake_timeout, self._handshake_deadline, protocol
        )

    def _send_stateless_reset(self, cid: bytes, received: int, addr: Any) -> None:
        """A 1-RTT packet for a connection we do not know (we restarted, or dropped
        it): tell the peer at once (RFC 9000 10.3), at most
        :data:`STATELESS_RESETS_PER_SECOND` a second."""
        now = self._loop.time()
        start, sent = self._resets_window
        if now - start >= 1.0:
            start, sent = now, 0
        if sent >= STATELESS_RESETS_PER_SECOND:
            return
        self._resets_window = (start, sent + 1)
        assert self._transport is not None
        self._transport.sendto(_aioquic.stateless_reset(self._reset_key, cid, received), addr)
        self._counters["stateless_resets_sent"] += 1

    def _handshake_done(self, protocol: QuicConnectionProtocol) -> None:
        self.admission.closed(protocol)

    def _handshake_deadline(self, protocol: QuicConnectionProtocol) -> None:
        if not self.admission.is_half_open(protocol):
            return
        self._counters["handshakes_timed_out"] += 1
        self._refusals.log(
            logging.INFO,
            "handshake-timeout",
            "dropped a connection whose handshake took more than %gs",
            self.admission.config.handshake_timeout,
        )
        self._drop(protocol, close=True)

    def _drop(self, protocol: QuicConnectionProtocol, close: bool = False) -> None:
        self._connection_terminated(protocol)
        cast(_TunnelProtocol, protocol).discard(close=close)

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        self.admission.closed(protocol)
        super()._connection_terminated(protocol)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        assert self.reader is not None
        self.reader.datagram_received(cast(bytes, data), addr)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader is not None:
            self.reader.close()


class _TunnelProtocol(QuicConnectionProtocol):
    """aioquic protocol feeding an H3TunnelSession; one per QUIC connection."""

    def __init__(
        self,
        quic: MeshQuicConnection,
        stream_handler: Any = None,
        *,
        transport: QuicTransport,
        handler: StreamHandler | None = None,
        authorize: Authorizer | None = None,
        owns_socket: bool = False,
        peer_address: Address | None = None,
        ticket_identity: str | None = None,
        accept_early_data: bool = True,
    ) -> None:
        super().__init__(quic)
        self._quic: MeshQuicConnection = quic
        self._owner = transport
        self._handler = handler
        self._authorize = authorize
        self._owns_socket = owns_socket
        self._close_socket = False
        self._peer_address = peer_address
        self.is_client = quic.configuration.is_client
        self._resumed_identity = ticket_identity
        """The identity the session ticket recorded (client: the one offered;
        server: the one redeemed)."""
        self._issued_tickets: list[SessionTicket] = []
        self._handshake_done = False
        self.handshake_finished: asyncio.Future[None] = self._loop.create_future()
        """Done once the handshake completed or the connection ended, never with an
        exception (aioquic's ``wait_connected`` future, abandoned by a timed-out
        connect, logged "Future exception was never retrieved" when the connection
        then closed)."""
        self._early_bytes = 0
        self._max_early_bytes = transport.max_early_data + EARLY_DATA_OVERHEAD
        self._old_sockets: list[asyncio.DatagramTransport] = []
        self._rebound_this_streak = False
        self._migrating = False
        if not self.is_client:
            quic.configure_tickets(
                fetch_ticket=self._redeem_ticket,
                on_ticket_issued=self._issued_tickets.append,
                accept_early_data=accept_early_data,
            )
        self.session = H3TunnelSession(
            quic,
            stream_window=transport.stream_window,
            connection_window=transport.connection_window,
        )
        self.connection: QuicPeerConnection | None = None
        self.failure: QuicmeshError | None = None
        self.on_handshake_done: Any = None
        """(server) Called with this protocol when the handshake completes."""
        self._discarded = False
        self._pending: list[quic_events.QuicEvent] = []
        self.bytes_sent = self.bytes_received = 0
        self.datagrams_sent = self.datagrams_received = 0
        self.log_id = quic.host_cid.hex()
        self.connected_socket: asyncio.DatagramTransport | None = None
        """(client) The UDP socket connected to the peer: datagrams go to it without
        an address, and it reports ICMP errors."""
        self._liveness: Liveness | None = None
        self._liveness_timer: asyncio.TimerHandle | None = None
        self._liveness_at: float | None = None

    # -- I/O -------------------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        """Process one datagram; the transmit waits for the end of the batch being
        read (:mod:`quicmesh.transport._udp`), if any."""
        self.bytes_received += len(data)
        self.datagrams_received += 1
        if self.is_client and _aioquic.is_stateless_reset(self._quic, cast(bytes, data)):
            logger.info("[%s] the server sent a stateless reset: connection gone", self.log_id)
            _aioquic.terminate_after_stateless_reset(self._quic)
            self._process_events()
            self._close_own_socket()
            return
        now = self._loop.time()
        if self._liveness is not None:
            self._liveness.received(now)
        self._quic.receive_datagram(cast(bytes, data), addr, now=now)
        self._process_events()
        if not _udp.defer_transmit(self.transmit):
            self.transmit()
        if self.connection is not None and not self.connection.is_closed:
            reason = _aioquic.closing_reason(self._quic)
            if reason is not None:
                # The peer closed: say so now, not when aioquic's draining period ends.
                lost: ConnectionLost = ConnectionLost(f"QUIC connection closed: {reason}")
                if UNRESPONSIVE in reason:
                    # Its liveness checks failed the connection: what it sent reached
                    # us, what we sent did not (a path dropping packets one way).
                    lost = PeerUnresponsive(
                        f"QUIC connection closed by the peer, which heard nothing from here: "
                        f"{reason}"
                    )
                self.connection._connection_lost(lost)
                if _aioquic.is_draining(self._quic):
                    # A draining endpoint sends nothing more (RFC 9000 10.2.2).
                    self._close_own_socket()
        if self.connection is not None and self.connection._credit is not None:
            # MAX_STREAMS raises no QUIC event: wake open_stream() calls waiting for credit.
            self.connection._handle_events([])

    def discard(self, *, close: bool = False) -> None:
        """(server) Forget this connection now, before its handshake completed: no
        timer, nothing more sent (but a CONNECTION_CLOSE when ``close``)."""
        if close:
            self._quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED)
            self.transmit()
        self._discarded = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def transmit(self) -> None:
        self._transmit_task = None
        if self._discarded:
            return
        assert self._transport is not None
        now = self._loop.time()
        connected = self._transport is self.connected_socket
        for data, addr in self._quic.datagrams_to_send(now=now):
            self.bytes_sent += len(data)
            self.datagrams_sent += 1
            self._transport.sendto(data, None if connected else addr)
        if not self.is_client:
            # Route the connection IDs just issued now, not at the next event: a
            # packet using one must not be answered with a stateless reset.
            for cid in _aioquic.pending_issued_connection_ids(self._quic):
                self._connection_id_issued_handler(cid)
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at
        if self.connection is not None:
            self.connection._transmitted()
        if self.is_client and self._owner.rebind_after_ptos is not None:
            self._maybe_rebind(self._owner.rebind_after_ptos)
        if self._liveness is not None:
            self._watch_liveness(now)

    # -- liveness ----------------------------------------------------------------

    def socket_error(self, exc: OSError) -> None:
        """The UDP socket reported an error: an ICMP port or host unreachable on a
        connected client socket fails the handshake at once and, once established,
        counts towards :attr:`LivenessConfig.unreachable_limit`."""
        if exc.errno not in UNREACHABLE_ERRNOS:
            logger.debug("[%s] UDP socket error ignored: %s", self.log_id, exc)
            return
        address = self._peer_address
        where = f"{address[0]}:{address[1]}" if address is not None else "peer"
        why = exc.strerror or type(exc).__name__
        if not self._handshake_done:
            error = ConnectError(f"QUIC endpoint {where} unreachable: {why}")
            if self.failure is None:
                self.failure = error
            if self.connection is not None:
                self._fail(error)  # 0-RTT: the streams learn it
            else:
                self._quic.close()  # nothing to tell a closed port
            self._finish_handshake_wait()
            return
        if self._liveness is None:
            return
        verdict = self._liveness.unreachable(self._loop.time())
        if verdict is Verdict.UNREACHABLE:
            self._fail(ConnectionLost(f"QUIC {where}: {self._liveness.reason} ({why})"))
        else:
            self._quic.send_ping(0)
            self._transmit_soon()

    def _watch_liveness(self, now: float) -> None:
        liveness = self._liveness
        assert liveness is not None
        if self.connection is None or self.connection.is_closed:
            self._stop_liveness()
            return
        awaiting = _aioquic.awaiting_ack(self._quic)
        verdict = liveness.check(
            now, probe_timeouts=_aioquic.pto_count(self._quic), awaiting_ack=awaiting
        )
        if verdict is Verdict.UNRESPONSIVE:
            self._fail(PeerUnresponsive(f"QUIC connection failed: {liveness.reason}"))
            return
        if verdict is Verdict.PING:
            self._quic.send_ping(0)
            self._transmit_soon()
        deadline = liveness.deadline(now, awaiting_ack=awaiting)
        if deadline is None:
            return
        if self._liveness_timer is not None:
            if self._liveness_at is not None and self._liveness_at <= deadline:
                return  # fires first; it re-arms for the later deadline
            self._liveness_timer.cancel()
        self._liveness_at = deadline
        self._liveness_timer = self._loop.call_at(deadline, self._liveness_timer_fired)

    def _liveness_timer_fired(self) -> None:
        self._liveness_timer = self._liveness_at = None
        if self._liveness is not None:
            self._watch_liveness(self._loop.time())

    def _stop_liveness(self) -> None:
        self._liveness = None
        if self._liveness_timer is not None:
            self._liveness_timer.cancel()
            self._liveness_timer = self._liveness_at = None

    def _fail(self, error: TunnelError) -> None:
        """Fail the connection now: every stream is reset at once, a
        CONNECTION_CLOSE goes out (a hung peer that wakes up learns of it)."""
        logger.warning("[%s] %s", self.log_id, error)
        self._stop_liveness()
        self._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=str(error)[:200])
        self.transmit()
        if self.connection is not None:
            self.connection._connection_lost(error)
        self._close_own_socket()

    def close_socket_when_done(self) -> None:
        self._close_socket = True
        if self._closed.is_set():
            self._close_own_socket()

    def _close_own_socket(self) -> None:
        if self._owns_socket and self._transport is not None:
            self._transport.close()
            for old in self._old_sockets:
                old.close()
            self._old_sockets.clear()

    # -- migration -------------------------------------------------------------

    async def migrate(self, local_address: Address | None, *, cause: str) -> None:
        """Move to a new UDP socket (client): see :meth:`QuicPeerConnection.migrate`."""
        assert self.is_client and self._transport is not None
        if local_address is None:
            current = self._transport.get_extra_info("sockname")
            local_address = (current[0], 0)
        try:
            udp, _ = await self._loop.create_datagram_endpoint(
                lambda: _SocketReceiver(self, self._owner.receive_batch),
                local_addr=local_address,
            )
        except OSError as exc:
            raise ConnectError(
                f"cannot open a UDP socket on {local_address[0]}:{local_address[1]}: {exc.strerror}"
            ) from None
        _tune_udp_socket(udp)
        old, self._transport = self._transport, udp
        # Packets already on their way to the old port are still read for a while.
        self._old_sockets.append(old)
        self._loop.call_later(OLD_SOCKET_GRACE, self._retire_socket, old)
        if _aioquic.spare_connection_ids(self._quic):
            self._quic.change_connection_id()
        # An ack-eliciting packet goes out on the new path now, even when idle.
        self._quic.send_ping(0)
        self._count(f"migrations_{cause}")
        logger.info("[%s] migrated (%s) to %s", self.log_id, cause, udp.get_extra_info("sockname"))
        self.transmit()

    def _retire_socket(self, old: asyncio.DatagramTransport) -> None:
        if old in self._old_sockets:
            self._old_sockets.remove(old)
            old.close()

    def _maybe_rebind(self, after_ptos: int) -> None:
        count = _aioquic.pto_count(self._quic)
        if count == 0:
            self._rebound_this_streak = False
        elif (
            count >= after_ptos
            and not self._rebound_this_streak
            and not self._migrating
            and self._handshake_done
            and self.connection is not None
            and not self.connection.is_closed
        ):
            self._rebound_this_streak = True
            self._migrating = True
            task = self._loop.create_task(self.migrate(None, cause="auto_rebind"))
            task.add_done_callback(self._rebind_done)

    def _rebind_done(self, task: asyncio.Task[None]) -> None:
        self._migrating = False
        if not task.cancelled() and task.exception() is not None:
            logger.warning("[%s] automatic rebinding failed: %s", self.log_id, task.exception())

    def _peer_address_changed(self, addr: Any) -> None:
        logger.info("[%s] peer address changed to %s", self.log_id, addr)
        self._count("migrations_peer_address_change")

    def _path_validated(self, addr: Any) -> None:
        self._count("path_validations_ok")

    def _path_abandoned(self, addr: Any) -> None:
        logger.info("[%s] path validation to %s failed", self.log_id, addr)
        self._count("path_validations_failed")

    def _count(self, name: str) -> None:
        self._owner.counters[name] += 1
        if self.connection is not None:
            self.connection.counters[name] += 1

    # -- session tickets ---------------------------------------------------------

    def _redeem_ticket(self, label: bytes) -> SessionTicket | None:
        record = self._owner.ticket_store.redeem(label)
        if record is None:
            self._count("tickets_refused")
            return None
        self._count("tickets_redeemed")
        self._resumed_identity = record.identity
        return record.ticket

    def on_ticket_received(self, ticket: SessionTicket) -> None:
        """(client) A NewSessionTicket arrived: cache it with the server's identity."""
        self._issued_tickets.append(ticket)
        if self._handshake_done and self.connection is not None:
            self._commit_tickets(self.connection.peer_identity)

    def _commit_tickets(self, identity: str) -> None:
        tickets, self._issued_tickets = self._issued_tickets, []
        for ticket in tickets:
            if self.is_client:
                assert self._peer_address is not None
                self._owner.ticket_cache.store(self._peer_address, ticket, identity)
                self._count("tickets_received")
            else:
                self._owner.ticket_store.add(ticket, identity)
                self._count("tickets_issued")

    # -- events ----------------------------------------------------------------

    def quic_event_received(self, event: quic_events.QuicEvent) -> None:
        if isinstance(event, engine.PathValidated):
            self._path_validated(event.addr)
            return
        if isinstance(event, engine.PathAbandoned):
            self._path_abandoned(event.addr)
            return
        if isinstance(event, engine.PeerAddressChanged):
            self._peer_address_changed(event.addr)
            return
        if isinstance(event, quic_events.HandshakeCompleted):
            self._on_handshake_completed(event)
            self._finish_handshake_wait()
        elif isinstance(event, quic_events.ConnectionTerminated):
            self._on_terminated(event)
            self._finish_handshake_wait()
            return
        elif (
            isinstance(event, quic_events.StreamDataReceived)
            and not self._handshake_done
            and not self._on_early_stream_data(event)
        ):
            return
        if self.connection is None:
            if self.failure is None:
                self._pending.append(event)
            return
        self.connection._handle_events(self.session.handle_quic_event(event))

    def _on_early_stream_data(self, event: quic_events.StreamDataReceived) -> bool:
        """(server) Stream data before the handshake completed: 0-RTT, accepted with a
        redeemed ticket. Serve it at once, within the 0-RTT budget."""
        if self.is_client or self._resumed_identity is None:
            return True
        self._early_bytes += len(event.data)
        if self._early_bytes > self._max_early_bytes:
            reason = f"more than {self._max_early_bytes} bytes of 0-RTT data"
            logger.warning("[%s] closing: %s", self.log_id, reason)
            self._quic.close(
                error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                frame_type=QuicFrameType.STREAM_BASE,
                reason_phrase=reason,
            )
            self.transmit()
            return False
        if self.connection is None and self.failure is None:
            self._create_connection(self._resumed_identity, early_data="accepted")
        return True

    def start_early(self, identity: str) -> QuicPeerConnection:
        """(client) The ClientHello offered a ticket allowing 0-RTT: the connection
        is usable now, with the identity the ticket recorded."""
        self._owner.counters["zero_rtt_attempted"] += 1
        connection = self._create_connection(identity, early_data="attempted")
        connection.counters["zero_rtt_attempted"] += 1
        return connection

    def _create_connection(self, identity: str, early_data: str = "none") -> QuicPeerConnection:
        self.connection = QuicPeerConnection(
            self,
            peer_identity=identity,
            handler=self._handler,
            authorize=self._authorize,
            high_water=self._owner.high_water,
            log_id=self.log_id,
            early_data=early_data,
            max_early_data=self._owner.max_early_data,
        )
        self.connection.lost_before = self._quic.packets_lost
        pending, self._pending = self._pending, []
        for event in pending:
            self.connection._handle_events(self.session.handle_quic_event(event))
        return self.connection

    def _on_handshake_completed(self, event: quic_events.HandshakeCompleted) -> None:
        self._handshake_done = True
        if self.on_handshake_done is not None:
            self.on_handshake_done(self)
        try:
            identity = self._verify_peer(event.session_resumed)
            if self.connection is not None and identity != self.connection.peer_identity:
                raise PeerVerificationError(
                    f"peer is {identity}, but the session ticket was issued by "
                    f"{self.connection.peer_identity}"
                )
        except PeerVerificationError as exc:
            self._refuse(exc)
            return
        if self.connection is None:
            self._create_connection(identity)
        assert self.connection is not None
        if not self.is_client:
            bucket = self._owner.stream_rates.for_identity(identity, time.monotonic())
            if bucket is not None:
                self._quic.attach_stream_rate(bucket)
        self._liveness = Liveness(self._owner.liveness, self._loop.time())
        self._commit_tickets(identity)
        if self.is_client and self.connection.early_data == "attempted":
            outcome = "accepted" if event.early_data_accepted else "rejected"
            self._count(f"zero_rtt_{outcome}")
            if not event.early_data_accepted:
                resent = _aioquic.reschedule_early_data(self._quic, self._loop.time())
                logger.info(
                    "[%s] 0-RTT rejected: resending %d packets in 1-RTT", self.log_id, resent
                )
        self.connection._handshake_completed(event.early_data_accepted)

    def _refuse(self, exc: PeerVerificationError) -> None:
        self.failure = exc
        self._pending.clear()
        self._issued_tickets.clear()
        side = "server" if self.is_client else "client"
        logger.warning("[%s] refused %s: %s", self.log_id, side, exc)
        if not self.is_client:
            self._owner.handshake_failures[handshake_failure_reason(exc)[0]] += 1
        self._quic.close(error_code=CRYPTO_ERROR_BAD_CERTIFICATE, reason_phrase=str(exc))
        if self.connection is not None:
            self.connection._connection_lost(exc)

    def _verify_peer(self, resumed: bool) -> str:
        if resumed:
            # No certificate in a resumed handshake: the ticket vouches for the identity
            # verified when it was issued.
            if self._resumed_identity is None:
                raise PeerVerificationError("resumed session with no recorded peer identity")
            return self._resumed_identity
        certificate, chain = _aioquic.peer_certificate(self._quic)
        if certificate is None:
            raise PeerVerificationError("peer presented no certificate")
        if self.is_client:
            # aioquic verified the chain against our trust bundle already.
            identity = spiffe_id_of(certificate)
            if identity is None:
                raise PeerVerificationError("peer certificate carries no SPIFFE ID")
            check_trust_domain(identity, chain[-1] if chain else certificate, self._owner.trust)
            return identity
        return verify_peer(certificate, chain, self._owner.trust)

    def handshake_timed_out(self, timeout: float) -> None:
        """(client, early data) The handshake did not complete in time."""
        if self._handshake_done or self.connection is None:
            return
        self._quic.close()
        self.transmit()
        self.connection._connection_lost(
            ConnectError(f"QUIC handshake timed out after {timeout:g}s")
        )

    def _finish_handshake_wait(self) -> None:
        if not self.handshake_finished.done():
            self.handshake_finished.set_result(None)

    def _on_terminated(self, event: quic_events.ConnectionTerminated) -> None:
        self._stop_liveness()
        reason = event.reason_phrase or f"error code {event.error_code:#x}"
        if self.connection is not None:
            if self._handshake_done:
                self.connection._connection_lost(
                    ConnectionLost(f"QUIC connection closed: {reason}")
                )
            else:
                self.connection._connection_lost(
                    ConnectError(f"QUIC connection closed during handshake: {reason}")
                )
        elif self.failure is None:
            if (
                event.error_code == CRYPTO_ERROR_BAD_CERTIFICATE
                or 0x100 <= event.error_code < 0x200
            ):
                self.failure = PeerVerificationError(f"handshake refused: {reason}")
            else:
                self.failure = ConnectError(f"QUIC connection closed during handshake: {reason}")
        if self._close_socket:
            self._close_own_socket()


class QuicListener(Listener):
    """A UDP socket accepting QUIC connections from peer sidecars."""

    def __init__(
        self, server: QuicServer, protocols: weakref.WeakSet[_TunnelProtocol] | None = None
    ) -> None:
        self._server = server
        self._protocols: weakref.WeakSet[_TunnelProtocol] = (
            protocols if protocols is not None else weakref.WeakSet()
        )
        assert server._transport is not None
        sockname = server._transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        self._closed = asyncio.get_running_loop().create_future()

    def close(self) -> None:
        if not self._closed.done():
            self._server.close()
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    @property
    def connections(self) -> list[QuicPeerConnection]:
        """The accepted peer connections still open (a read-only snapshot).

        For a graceful shutdown: :meth:`~QuicPeerConnection.aclose` each of them,
        so the bytes of streams that just finished are acknowledged, before
        :meth:`close` (which closes whatever is left at once).
        """
        return [
            p.connection
            for p in list(self._protocols)
            if p.connection is not None and not p.connection.is_closed
        ]


class QuicTransport(Transport):
    """Flows as HTTP/3 CONNECT streams, many per QUIC connection.

    :param identity: this sidecar's certificate and key.
    :param trust: the CAs peers' certificates must chain to.
    :param congestion_control: ``"reno"``, ``"cubic"`` (aioquic's) or ``"bbr"``; by
        default the host's TCP algorithm
        (:func:`~quicmesh.congestion.default_congestion_control`).
    :param idle_timeout: seconds of silence before a connection is dropped.
    :param stream_window: receive window per stream, in bytes.
    :param connection_window: receive window per connection, in bytes.
    :param high_water: unsent bytes per stream above which ``drain()`` waits.
    :param max_streams: concurrent streams a peer may open towards us.
    :param qlog_dir: write a qlog file per connection there.
    :param ticket_cache: (client) session tickets per peer, for ``connect(...,
        early_data=True)``; by default in memory only. Pass
        ``TicketCache(path)`` to resume after a restart.
    :param ticket_store: (server) the tickets this transport's listeners issued:
        single use, expiring. Replicas behind one address must share one.
    :param max_early_data: (client) payload bytes sent as 0-RTT before the
        handshake completes, over all streams; further bytes wait for the
        handshake. (server) 0-RTT stream bytes accepted, plus
        ``EARLY_DATA_OVERHEAD`` for headers and framing; more closes the connection.
    :param rebind_after_ptos: (client) move to a new UDP port after this many
        consecutive probe timeouts, as when a NAT mapping died (off by default).
    :param receive_batch: datagrams read from a socket per readiness event, each
        connection then transmitting once (:mod:`quicmesh.transport._udp`); 1
        reads one at a time, as plain asyncio does. By default
        :data:`RECEIVE_BATCH`, or the ``QUICMESH_RECEIVE_BATCH`` environment
        variable when set (for A/B benchmarks, whose servers run in child processes).
    :param max_datagram_size: largest UDP payload sent, 1200 (aioquic's default and
        QUIC's minimum, safe on any path) to 1452 (the most a 1500-byte MTU carries
        over IPv6). aioquic does no path MTU discovery: raise it only on paths known
        to carry it; larger datagrams cost fewer packets (and less CPU) per byte.
    :param admission: (server) half-open connection caps, Retry policy and
        handshake timeout (:mod:`quicmesh.transport._admission`); protective
        defaults. Its counters (:data:`ADMISSION_COUNTERS`) join :attr:`counters`.
    :param stateless_reset_key: (server) secret from which the stateless reset
        token of every connection ID is derived (at least 16 bytes). Give the same
        key after a restart (:func:`load_stateless_reset_key`) and a peer whose
        connection the restart lost learns it from its next packet (RFC 9000
        10.3) instead of waiting for its idle timeout. Random by default.
    :param keepalive_interval: seconds of silence after which an idle connection
        PINGs its peer (None: never), so a dead peer is noticed while no flow sends.
    :param max_probe_timeouts: consecutive probe timeouts without an acknowledgement
        after which the connection fails with :class:`~quicmesh.errors.PeerUnresponsive`
        and every stream on it is reset (None: only the idle timeout ends it).
    :param dead_after: seconds with packets unacknowledged and nothing received
        after which the connection fails the same way (None: no bound).
        :mod:`quicmesh.transport.liveness` has the rules, ICMP unreachable included.
    :param max_stream_rate: (server) new streams per second one peer identity may
        open, over all its connections, through the stream credit (MAX_STREAMS) it
        is granted (:mod:`quicmesh.transport._stream_rate`; None: as fast as its
        streams end). Churn and rapid reset cost the listener no more than this.
    :param engine: the QUIC implementation, by name (:func:`.engine.get_engine`;
        ``"aioquic"``, the default, is the only one built in). An unknown name
        raises :class:`ValueError` naming the valid ones.

    A client's UDP socket is connected to its peer, so the kernel reports ICMP
    port and host unreachable: :meth:`connect` then fails at once with
    :class:`~quicmesh.errors.ConnectError` instead of waiting for its timeout.

    :attr:`counters` adds up, over every connection of this transport, the keys
    in :data:`COUNTERS`: 0-RTT attempted / accepted / rejected, tickets received
    (client) and issued / redeemed / refused (server), migrations by cause
    (``active``: :meth:`QuicPeerConnection.migrate`; ``auto_rebind``; and, on a
    server, ``peer_address_change``), and path validations ok / failed.
    """

    name = "quic"

    def __init__(
        self,
        *,
        identity: Identity,
        trust: TrustBundle,
        congestion_control: str | None = None,
        idle_timeout: float = 60.0,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        high_water: int = 64 * 1024,
        max_streams: int = 128,
        qlog_dir: str | None = None,
        ticket_cache: TicketCache | None = None,
        ticket_store: TicketStore | None = None,
        max_early_data: int = DEFAULT_MAX_EARLY_DATA,
        rebind_after_ptos: int | None = None,
        receive_batch: int | None = None,
        max_datagram_size: int = 1200,
        admission: AdmissionConfig | None = None,
        stateless_reset_key: bytes | None = None,
        keepalive_interval: float | None = 1.0,
        max_probe_timeouts: int | None = 6,
        dead_after: float | None = 10.0,
        engine: str = "aioquic",
        max_stream_rate: float | None = DEFAULT_STREAM_RATE,
    ) -> None:
        super().__init__(identity=identity, trust=trust)
        found = get_engine(engine)
        if not isinstance(found, aioquic_engine.AioquicEngine):
            raise ConfigError(
                f"QUIC engine {engine!r} owns its sockets: the asyncio driver runs "
                "datagram engines only so far"
            )
        self.engine = found
        """The QUIC engine connections are built with (:mod:`.engine`)."""
        if congestion_control is None:
            from ...congestion.host import default_congestion_control

            congestion_control = default_congestion_control()
        if congestion_control == "bbr":
            from ... import congestion

            congestion.ensure_registered()
        self.congestion_control = congestion_control
        self.idle_timeout = idle_timeout
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.high_water = high_water
        self.max_streams = max_streams
        if max_stream_rate is not None and not max_stream_rate > 0:
            raise ConfigError(f"max_stream_rate must be positive, not {max_stream_rate}")
        self.stream_rates = StreamRates(max_stream_rate, burst=max_streams)
        """(server) One new-stream token bucket per peer identity (:mod:`.._stream_rate`)."""
        self.qlog_dir = qlog_dir
        self.ticket_cache = ticket_cache if ticket_cache is not None else TicketCache()
        self.ticket_store = ticket_store if ticket_store is not None else TicketStore()
        self.max_early_data = max_early_data
        self.rebind_after_ptos = rebind_after_ptos
        if receive_batch is None:
            setting = os.environ.get("QUICMESH_RECEIVE_BATCH", str(RECEIVE_BATCH))
            receive_batch = int(setting) if setting.isdigit() else 0
        if receive_batch < 1:
            raise ConfigError(f"receive_batch must be a whole number >= 1, not {receive_batch}")
        self.receive_batch = receive_batch
        if not 1200 <= max_datagram_size <= 1452:
            raise ConfigError(f"max_datagram_size must be 1200 to 1452, not {max_datagram_size}")
        self.max_datagram_size = max_datagram_size
        if not idle_timeout > 0:
            raise ConfigError(f"idle_timeout must be positive seconds, not {idle_timeout}")
        self.liveness = LivenessConfig(
            keepalive_interval=keepalive_interval,
            max_probe_timeouts=max_probe_timeouts,
            dead_after=dead_after,
        )
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self.counters.update({name: 0 for name in ADMISSION_COUNTERS})
        self.admission = admission if admission is not None else AdmissionConfig()
        if stateless_reset_key is not None and len(stateless_reset_key) < 16:
            raise ConfigError("stateless_reset_key must be at least 16 bytes")
        self.stateless_reset_key = stateless_reset_key or os.urandom(32)
        self._server_configurations: list[QuicConfiguration] = []

    def set_identity(self, identity: Identity, trust: TrustBundle) -> None:
        """Present ``identity`` from the next handshake on, on listeners too."""
        super().set_identity(identity, trust)
        for config in self._server_configurations:
            config.certificate = identity.certificate
            config.certificate_chain = identity.chain
            config.private_key = identity.private_key
            config.cadata = trust.pem

    def engine_limits(self) -> EngineLimits:
        """The transport settings every connection's engine gets."""
        return EngineLimits(
            idle_timeout=self.idle_timeout,
            stream_window=self.stream_window,
            connection_window=self.connection_window,
            max_streams=self.max_streams,
            congestion_control=self.congestion_control,
            max_datagram_size=self.max_datagram_size,
            qlog_dir=self.qlog_dir,
            stateless_reset_key=self.stateless_reset_key,
            alpn=tuple(H3_ALPN),
        )

    def configuration(self, *, is_client: bool) -> QuicConfiguration:
        """The aioquic configuration for one side of a connection."""
        return aioquic_engine.configuration(
            self.engine_limits(),
            EngineTls(identity=self.identity, trust=self.trust),
            is_client=is_client,
        )

    async def listen(
        self,
        address: Address,
        handler: StreamHandler,
        authorize: Authorizer | None = None,
        *,
        early_data: bool = True,
    ) -> QuicListener:
        """Accept peer connections (see :meth:`Transport.listen`).

        :param early_data: accept 0-RTT from clients resuming with a ticket. False
            still resumes sessions (no certificates) but rejects their 0-RTT, which
            the clients then send again in 1-RTT.
        """
        config = self.configuration(is_client=False)
        self._server_configurations.append(config)

        accepted: weakref.WeakSet[_TunnelProtocol] = weakref.WeakSet()

        limits = self.engine_limits()
        tls = EngineTls(identity=self.identity, trust=self.trust)

        def accept(
            original_cid: bytes | None, retry_source_cid: bytes | None
        ) -> MeshQuicConnection:
            return self.engine.accept(
                limits,
                tls,
                original_destination_connection_id=original_cid,
                retry_source_connection_id=retry_source_cid,
                config=config,
            )

        def create_protocol(
            quic: MeshQuicConnection, stream_handler: Any = None
        ) -> _TunnelProtocol:
            protocol = _TunnelProtocol(
                quic,
                transport=self,
                handler=handler,
                authorize=authorize,
                accept_early_data=early_data,
            )
            accepted.add(protocol)
            return protocol

        try:
            _, server = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _BatchingQuicServer(
                    configuration=config,
                    create_protocol=create_protocol,
                    max_datagrams=self.receive_batch,
                    admission=self.admission,
                    counters=self.counters,
                    reset_key=self.stateless_reset_key,
                    accept=accept,
                ),
                local_addr=(address[0], address[1]),
            )
        except OSError as exc:
            raise ConnectError(
                f"cannot listen on UDP {address[0]}:{address[1]}: {exc.strerror}"
            ) from None
        assert server._transport is not None
        _tune_udp_socket(server._transport)
        return QuicListener(server, accepted)

    async def connect(
        self, address: Address, *, timeout: float = 10.0, early_data: bool = False
    ) -> QuicPeerConnection:
        """Connect to the peer sidecar at ``address`` (see :meth:`Transport.connect`).

        :param early_data: resume with a ticket cached for ``address`` and return
            before the handshake completes, so that streams opened with
            ``open_stream(..., wait_response=False)`` send their CONNECT and first
            bytes as 0-RTT. Only for flows whose first bytes are safe to replay
            (0-RTT data can be replayed by an attacker unless the server's tickets
            are single use, as quicmesh's are). Without a cached ticket this is
            an ordinary connect (:attr:`QuicPeerConnection.early_data` ``"none"``).
            A handshake failure then surfaces on the streams, not here.
        """
        loop = asyncio.get_running_loop()
        config = self.configuration(is_client=True)
        cached = self.ticket_cache.take(address) if early_data else None
        if cached is not None:
            config.session_ticket = cached.ticket
        holder: list[_TunnelProtocol] = []
        quic = self.engine.connect(
            self.engine_limits(),
            EngineTls(identity=self.identity, trust=self.trust),
            address,
            session_ticket_handler=lambda ticket: holder[0].on_ticket_received(ticket),
            config=config,
        )
        protocol = _TunnelProtocol(
            quic,
            transport=self,
            owns_socket=True,
            peer_address=address,
            ticket_identity=cached.identity if cached is not None else None,
        )
        holder.append(protocol)
        try:
            # Connected: the kernel then reports ICMP unreachable errors to the socket.
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _SocketReceiver(protocol, self.receive_batch), remote_addr=address
            )
        except OSError as exc:
            raise ConnectError(
                f"cannot open a UDP socket to {address[0]}:{address[1]}: {exc.strerror or exc}"
            ) from None
        protocol.connected_socket = udp
        protocol.connection_made(udp)
        _tune_udp_socket(udp)
        protocol.close_socket_when_done()
        if cached is not None and cached.ticket.max_early_data_size is not None:
            try:
                protocol.connect(address)
            except OSError as exc:
                protocol._close_own_socket()
                raise ConnectError(
                    f"QUIC connection to {address[0]}:{address[1]} failed: {exc}"
                ) from None
            connection = protocol.start_early(cached.identity)
            loop.call_later(timeout, protocol.handshake_timed_out, timeout)
            return connection
        try:
            protocol.connect(address)
            await asyncio.wait_for(asyncio.shield(protocol.handshake_finished), timeout)
        except (TimeoutError, ConnectionError, OSError) as exc:
            quic.close()
            protocol.transmit()
            protocol._close_own_socket()
            if protocol.failure is not None:
                raise protocol.failure from None
            if isinstance(exc, asyncio.TimeoutError):
                raise ConnectError(
                    f"QUIC handshake with {address[0]}:{address[1]} timed out after {timeout:g}s"
                ) from None
            raise ConnectError(
                f"QUIC connection to {address[0]}:{address[1]} failed: {exc}"
            ) from None
        except asyncio.CancelledError:
            # Abandoned (e.g. the other side of an AutoTransport race won): no socket left.
            quic.close()
            protocol.transmit()
            protocol._close_own_socket()
            raise
        if protocol.connection is None:
            protocol._close_own_socket()
            raise protocol.failure or ConnectError("QUIC handshake failed")
        return protocol.connection


STATELESS_RESETS_PER_SECOND = 100
"""Stateless resets a listener sends per second at most (each answers a 1-RTT
packet for an unknown connection, which anyone can send)."""


def load_stateless_reset_key(path: str | os.PathLike[str]) -> bytes:
    """The stateless reset key kept in ``path``, created (32 random bytes, mode 0600)
    if missing, so that it survives restarts.

    :raises ConfigError: the file cannot be read or created, or is too short.
    """
    try:
        with open(path, "rb") as existing:
            key = existing.read()
    except FileNotFoundError:
        key = os.urandom(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as created:
                created.write(key)
        except OSError as exc:
            raise ConfigError(f"cannot create stateless reset key {path}: {exc.strerror}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read stateless reset key {path}: {exc.strerror}") from None
    if len(key) < 16:
        raise ConfigError(f"stateless reset key {path} is shorter than 16 bytes")
    return key


UDP_SOCKET_BUFFER = 4 * 1024 * 1024
"""SO_RCVBUF / SO_SNDBUF asked for on QUIC sockets (the kernel caps it at rmem_max/wmem_max)."""


def _tune_udp_socket(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER)
