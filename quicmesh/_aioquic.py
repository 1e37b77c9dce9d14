"""The one place quicmesh reaches into aioquic's internals.

aioquic 1.7 is driven through its public API everywhere else. What it lacks,
quicmesh adds here, on connection instances (never by patching aioquic's
classes or modules), each hook documented with the limit it works around and
covered by a test in ``tests/test_aioquic_layer.py``:

* **Client certificates** (:func:`require_client_certificate`): an aioquic server
  asks for a client certificate only through the private
  ``tls.Context._request_client_certificate`` flag, accepts an empty certificate
  and never verifies the chain. We set the flag on every full handshake; the
  caller verifies the chain and SPIFFE ID itself (:func:`peer_certificate`)
  before any stream is served. On a resumed (PSK) handshake the flag is cleared,
  because aioquic would otherwise wait for a certificate that never comes.
* **Flow control from the read path** (:class:`ReadDrivenFlowControl`): aioquic
  raises MAX_STREAM_DATA / MAX_DATA when data *arrives*, so a reader that stops
  reading does not stop its peer. For the streams we track, windows are instead
  raised from what the application has consumed.
* **QPACK blocked streams** (:class:`MeshH3Connection`): aioquic announces
  SETTINGS_QPACK_BLOCKED_STREAMS = 16; we announce 0 so that no request stream
  ever waits for another stream's encoder instructions.
* **Decoded header-section limit** (:class:`MeshH3Connection`): aioquic announces
  no SETTINGS_MAX_FIELD_SECTION_SIZE and pylsqpack decodes whatever a block
  expands to (a "QPACK bomb": 60 KB referring 60,000 times to a 3.9 KB table
  entry decodes to 234 MB). We announce the limit and bound each block's decoded
  size from its wire bytes before pylsqpack sees it; a block over the limit
  raises :class:`FieldSectionTooLarge`, and only its stream is refused.
* **Packet-writer cost** (:class:`ActiveStreamScheduler`): aioquic's
  ``_write_application`` visits every stream for every packet it builds, so the
  cost of sending grows with the number of open streams. The scheduler shows the
  writer only the streams that have something to send (data, FIN, reset,
  STOP_SENDING, a window update, or a finished stream to discard), keeping
  aioquic's own round-robin order among them.
* **Sender and limit state** (:func:`unsent_bytes`, :func:`can_open_bidi_stream`,
  :func:`connection_stats`): read-only views aioquic keeps private.
* **Session tickets and 0-RTT on the server** (:func:`configure_server_tls`):
  aioquic's ticket fetcher and handler are set once per server; we set them per
  connection so that each ticket is tied to the connection (and the identity)
  that issued or redeemed it. aioquic accepts 0-RTT whenever it accepts the
  ticket and has no switch to refuse it: with ``accept_early_data=False`` the
  0-RTT read key is never installed and EncryptedExtensions omits ``early_data``,
  so the client learns of the rejection and the server drops its 0-RTT packets.
* **Rejected 0-RTT** (:func:`reschedule_early_data`): aioquic does nothing
  special when the server rejects 0-RTT; the 0-RTT packets would only be declared
  lost by the usual loss detection, a round trip or more later. We declare them
  lost (not a congestion event) as soon as the handshake says so, so their stream
  data goes again at once in 1-RTT packets with the same stream offsets.
* **Liveness** (:func:`pto_count`, :func:`awaiting_ack`): aioquic counts probe
  timeouts but never gives up on a silent peer before its idle timeout; the
  transport reads both to fail a dead connection within seconds
  (:mod:`quicmesh.transport.liveness`).
* **Paths** (:class:`PathMonitor`, :func:`active_path`,
  :func:`spare_connection_ids`): aioquic validates a client's new address and
  reverts to the last validated path on failure (since 1.7.0) but reports none of
  it; the monitor calls back on validation success and failure.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pylsqpack
from aioquic import tls
from aioquic._buffer import Buffer
from aioquic._crypto import CryptoError
from aioquic.h3.connection import H3Connection, Setting
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.crypto import CryptoPair, KeyUnavailableError
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType, pull_quic_header
from cryptography import x509

from .tunnel.connect import MAX_FIELD_SECTION_SIZE
from .tunnel.qpack import FieldSectionBound, QpackFormatError


class FieldSectionTooLarge(Exception):
    """A header block would decode to more than the field-section limit.

    Raised out of :meth:`MeshH3Connection.handle_event` before pylsqpack decodes
    the block; the caller refuses (resets) that one stream and calls
    :meth:`MeshH3Connection.abandon_stream`. The connection carries on.
    """

    def __init__(self, stream_id: int, size: int, limit: int) -> None:
        super().__init__(
            f"stream {stream_id}: header section would decode to at least {size} bytes, "
            f"more than {limit}"
        )
        self.stream_id = stream_id
        self.size = size
        self.limit = limit


class _BoundedDecoder:
    """pylsqpack's decoder behind a size check: each header block's decoded size is
    bounded from its wire bytes (:class:`~quicmesh.tunnel.qpack.FieldSectionBound`)
    and refused, undecoded, when the bound passes ``limit``."""

    def __init__(self, decoder: pylsqpack.Decoder, max_table_capacity: int, limit: int) -> None:
        self._decoder = decoder
        self.bound = FieldSectionBound(max_table_capacity)
        self.limit = limit

    def feed_encoder(self, data: bytes) -> list[int]:
        result: list[int] = self._decoder.feed_encoder(data)
        self.bound.feed_encoder(data)
        return result

    def feed_header(self, stream_id: int, data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        try:
            size = self.bound.section_size(data, stop_above=self.limit)
        except QpackFormatError:
            size = 0  # malformed: pylsqpack says so (a connection error, RFC 9204 2.2)
        if size > self.limit:
            raise FieldSectionTooLarge(stream_id, size, self.limit)
        return self._decoder.feed_header(stream_id, data)

    def resume_header(self, stream_id: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        return self._decoder.resume_header(stream_id)

    def cancel_stream(self, stream_id: int) -> bytes:
        return self._decoder.cancel_stream(stream_id)


class MeshH3Connection(H3Connection):
    """aioquic's HTTP/3 connection announcing no QPACK blocked streams, with a limit
    on decoded header sections.

    With SETTINGS_QPACK_BLOCKED_STREAMS = 0 the peer's encoder only references
    dynamic-table entries we have acknowledged, so a HEADERS frame never waits
    on the encoder stream and streams never wait on each other (RFC 9204 2.1.2).

    aioquic announces no SETTINGS_MAX_FIELD_SECTION_SIZE and pylsqpack decodes a
    header block whatever it expands to. We announce ``max_field_section_size``
    and check every block *before* decoding it: a block that could decode to
    more raises :class:`FieldSectionTooLarge` (RFC 9114 4.2.2, RFC 9204 7.3).

    :param max_field_section_size: decoded bytes (names, values, 32 per field);
        Envoy's default when not given (aioquic's servers, as in the interop endpoint,
        construct the class with the QUIC connection alone).
    """

    def __init__(
        self, quic: QuicConnection, max_field_section_size: int = MAX_FIELD_SECTION_SIZE
    ) -> None:
        self.max_field_section_size = max_field_section_size
        super().__init__(quic)

    def _init_connection(self) -> None:
        self._blocked_streams = 0
        self._decoder = _BoundedDecoder(  # type: ignore[assignment]
            pylsqpack.Decoder(self._max_table_capacity, self._blocked_streams),
            self._max_table_capacity,
            self.max_field_section_size,
        )
        super()._init_connection()

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[Setting.MAX_FIELD_SECTION_SIZE] = self.max_field_section_size
        return settings

    def abandon_stream(self, stream_id: int) -> None:
        """Forget a request stream refused mid-frame; tell the peer's encoder that its
        header block will not be decoded (Stream Cancellation, RFC 9204 4.4.2)."""
        self._stream.pop(stream_id, None)
        if self._local_decoder_stream_id is not None:
            cancel = self._decoder.cancel_stream(stream_id)
            self._quic.send_stream_data(self._local_decoder_stream_id, cancel)


# -- TLS -----------------------------------------------------------------------


def require_client_certificate(quic: QuicConnection) -> None:
    """Make a server connection ask the client for its certificate (mutual TLS).

    Must be called before the first datagram is received. The chain is *not*
    verified by aioquic: call :func:`peer_certificate` once the handshake
    completes and verify it.
    """
    configure_server_tls(quic)


def configure_server_tls(
    quic: QuicConnection,
    *,
    fetch_ticket: Callable[[bytes], tls.SessionTicket | None] | None = None,
    on_ticket_issued: Callable[[tls.SessionTicket], None] | None = None,
    accept_early_data: bool = True,
) -> None:
    """Set up a server connection's TLS: client certificate, tickets, 0-RTT policy.

    :param fetch_ticket: looks up the ticket a ClientHello offers (``None``: no
        resumption). On a hit the client-certificate request is withdrawn.
    :param on_ticket_issued: called with each ticket this connection issues (after
        the client's Finished, before the handshake-completed event): no handler,
        no tickets.
    :param accept_early_data: False refuses 0-RTT even when the ticket is accepted.

    Must be called before the first datagram is received.
    """
    original_initialize = quic._initialize

    def _initialize(self: QuicConnection, peer_cid: bytes) -> None:
        original_initialize(peer_cid)
        context = self.tls
        context._request_client_certificate = True
        if fetch_ticket is not None:
            context.get_session_ticket_cb = fetch_ticket
        if on_ticket_issued is not None:
            context.new_session_ticket_cb = on_ticket_issued
        if not accept_early_data:
            install_key = context.update_traffic_key_cb

            def refuse_early_key(
                direction: tls.Direction,
                epoch: tls.Epoch,
                cipher_suite: tls.CipherSuite,
                secret: bytes,
            ) -> None:
                if direction == tls.Direction.DECRYPT and epoch == tls.Epoch.ZERO_RTT:
                    # Called right after the flag is set and before EncryptedExtensions
                    # is written: clearing it tells the client 0-RTT was rejected.
                    context.early_data_accepted = False
                    return
                install_key(direction, epoch, cipher_suite, secret)

            context.update_traffic_key_cb = refuse_early_key
        fetch = context.get_session_ticket_cb
        if fetch is not None:

            def fetch_and_skip_certificate(label: bytes) -> tls.SessionTicket | None:
                ticket = fetch(label)
                if ticket is not None:
                    # A resumed handshake carries no client certificate: the identity
                    # is the one the ticket recorded when it was issued.
                    context._request_client_certificate = False
                return ticket

            context.get_session_ticket_cb = fetch_and_skip_certificate

    quic._initialize = types.MethodType(_initialize, quic)  # type: ignore[method-assign]


def peer_certificate(
    quic: QuicConnection,
) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    """The certificate and chain the peer presented in a full handshake."""
    context = quic.tls
    return context._peer_certificate, list(context._peer_certificate_chain)


def session_resumed(quic: QuicConnection) -> bool:
    """True when the handshake resumed a session (PSK): no certificate was exchanged."""
    return bool(quic.tls.session_resumed)


# -- flow control --------------------------------------------------------------


@dataclass
class _StreamCredit:
    delivered: int = 0
    """QUIC stream bytes delivered to the HTTP/3 layer (framing included)."""
    buffered: int = 0
    """Payload bytes handed to the application and not yet read."""


class ReadDrivenFlowControl:
    """Raise a connection's receive windows from the read path, not on arrival.

    For each tracked stream the window is ``consumed + stream_window``, where
    ``consumed`` counts every stream byte except payload the application has not
    read yet. The connection window is likewise ``consumed + connection_window``.
    Untracked streams (HTTP/3 control and QPACK streams, read at once) keep
    aioquic's behaviour. Installed on one connection instance.
    """

    def __init__(self, quic: QuicConnection, stream_window: int, connection_window: int) -> None:
        self.stream_window = stream_window
        self.connection_window = connection_window
        self._quic = quic
        self._streams: dict[int, _StreamCredit] = {}
        self._buffered_total = 0
        write_stream_limits = quic._write_stream_limits
        write_connection_limits = quic._write_connection_limits

        def _write_stream_limits(
            self_: QuicConnection, builder: Any, space: Any, stream: Any
        ) -> None:
            credit = self._streams.get(stream.stream_id)
            if credit is None:
                write_stream_limits(builder=builder, space=space, stream=stream)
                return
            self._raise_stream_window(stream, credit)
            # aioquic doubles the window when half of it has *arrived*; hide the
            # arrivals from that check so only the line above moves the window.
            highest = stream.receiver.highest_offset
            stream.receiver.highest_offset = 0
            try:
                write_stream_limits(builder=builder, space=space, stream=stream)
            finally:
                stream.receiver.highest_offset = highest

        def _write_connection_limits(self_: QuicConnection, builder: Any, space: Any) -> None:
            max_data = self_._local_max_data
            target = max_data.used - self._buffered_total + self.connection_window
            if target - max_data.value >= self.connection_window // 4:
                max_data.value = target
            used = max_data.used
            max_data.used = 0
            try:
                write_connection_limits(builder=builder, space=space)
            finally:
                max_data.used = used

        quic._write_stream_limits = types.MethodType(_write_stream_limits, quic)  # type: ignore[method-assign]
        quic._write_connection_limits = types.MethodType(_write_connection_limits, quic)  # type: ignore[method-assign]

    def _raise_stream_window(self, stream: Any, credit: _StreamCredit) -> None:
        target = credit.delivered - credit.buffered + self.stream_window
        if target - stream.max_stream_data_local >= self.stream_window // 4:
            stream.max_stream_data_local = target

    def _update(self, stream_id: int, credit: _StreamCredit) -> None:
        # Raise the window here, not only in the packet writer: the scheduler shows
        # the writer a stream with nothing to send only if its window changed.
        stream = self._quic._streams.get(stream_id)
        if stream is not None:
            self._raise_stream_window(stream, credit)

    def track(self, stream_id: int) -> None:
        """Drive this stream's window from the read path from now on."""
        self._streams.setdefault(stream_id, _StreamCredit())

    def delivered(self, stream_id: int, stream_bytes: int, payload_bytes: int) -> None:
        """``stream_bytes`` arrived, of which ``payload_bytes`` now wait for the application."""
        credit = self._streams.get(stream_id)
        if credit is not None:
            credit.delivered += stream_bytes
            credit.buffered += payload_bytes
            self._buffered_total += payload_bytes
            self._update(stream_id, credit)

    def consumed(self, stream_id: int, payload_bytes: int) -> bool:
        """The application read ``payload_bytes`` of the stream.

        Returns True when a window update (MAX_STREAM_DATA or MAX_DATA) is now due,
        i.e. when the caller should send packets; most reads make none due.
        """
        credit = self._streams.get(stream_id)
        if credit is None:
            return False
        amount = min(payload_bytes, credit.buffered)
        credit.buffered -= amount
        self._buffered_total -= amount
        self._update(stream_id, credit)
        stream = self._quic._streams.get(stream_id)
        stream_due = stream is not None and (
            stream.max_stream_data_local != stream.max_stream_data_local_sent
        )
        max_data = self._quic._local_max_data
        target = max_data.used - self._buffered_total + self.connection_window
        return stream_due or target - max_data.value >= self.connection_window // 4

    def forget(self, stream_id: int) -> None:
        """The stream is finished: its unread payload no longer holds credit back."""
        credit = self._streams.pop(stream_id, None)
        if credit is not None:
            self._buffered_total -= credit.buffered

    def delivered_bytes(self, stream_id: int) -> int:
        """QUIC stream bytes of the stream delivered so far."""
        credit = self._streams.get(stream_id)
        return credit.delivered if credit is not None else 0

    def buffered(self, stream_id: int) -> int:
        """Payload bytes of the stream waiting for the application."""
        credit = self._streams.get(stream_id)
        return credit.buffered if credit is not None else 0


# -- packet-writer cost -------------------------------------------------------------


def _has_data_to_send(stream: Any) -> bool:
    return not stream.sender.buffer_is_empty and not stream.sender.reset_pending


def _needs_service(stream: Any) -> bool:
    return bool(
        stream.stream_id & 2  # unidirectional (HTTP/3 control and QPACK): always
        or stream.is_finished
        or stream.receiver.stop_pending
        or stream.sender.reset_pending
        or not stream.sender.buffer_is_empty
        or stream.max_stream_data_local_sent != stream.max_stream_data_local
    )


class ActiveStreamScheduler:
    """Show aioquic's packet writer only the streams with something to send.

    aioquic's writer visits every stream in ``_streams_queue`` for every packet
    and round-robins between them. During ``datagrams_to_send`` the connection's
    ``_streams`` and ``_streams_queue`` are swapped for a small view, then
    restored; streams aioquic discarded meanwhile are removed from the real
    table. The view holds every stream that needs a control frame (reset,
    STOP_SENDING, window update, discard) and the next ``data_streams_per_call``
    streams with data, taken in rotation from a round-robin queue, so the
    per-packet cost is bounded while every stream still gets its turn in order.

    A stream enters the scheduler when the application acts on it
    (:meth:`activate`), when aioquic creates it, and when a frame of it is
    acknowledged or lost (its delivery handlers are wrapped).
    """

    def __init__(
        self,
        quic: QuicConnection,
        data_streams_per_call: int = 16,
        on_discard: Callable[[int], None] | None = None,
    ) -> None:
        self._quic = quic
        self._on_discard = on_discard
        self._limit = data_streams_per_call
        self._queue: dict[int, Any] = {}
        """Round-robin order of the streams that may need service."""
        self._known: set[int] = set()
        original_datagrams_to_send = quic.datagrams_to_send
        original_on_max_stream_data_delivery = quic._on_max_stream_data_delivery

        def datagrams_to_send(self_: QuicConnection, now: float) -> list[tuple[bytes, Any]]:
            for stream in self_._streams_queue:
                self._adopt(stream)
            view = self._view()
            all_streams = self_._streams
            self_._streams = {s.stream_id: s for s in view}
            self_._streams_queue = view
            try:
                return original_datagrams_to_send(now)
            finally:
                remaining = self_._streams
                order = self_._streams_queue
                for stream in view:
                    if stream.stream_id not in remaining:
                        all_streams.pop(stream.stream_id, None)
                        self._known.discard(stream.stream_id)
                        self._queue.pop(stream.stream_id, None)
                        if self._on_discard is not None:
                            self._on_discard(stream.stream_id)
                self_._streams = all_streams
                self_._streams_queue = []
                # Served streams go to the back of the rotation, in aioquic's order.
                for stream in order:
                    stream_id: int = stream.stream_id  # type: ignore[assignment]
                    self._queue.pop(stream_id, None)
                    if stream.stream_id in remaining and _needs_service(stream):
                        self._queue[stream.stream_id] = stream

        def on_max_stream_data_delivery(self_: QuicConnection, delivery: Any, stream: Any) -> None:
            original_on_max_stream_data_delivery(delivery, stream)
            self._queue.setdefault(stream.stream_id, stream)

        quic.datagrams_to_send = types.MethodType(datagrams_to_send, quic)  # type: ignore[method-assign]
        quic._on_max_stream_data_delivery = types.MethodType(  # type: ignore[method-assign]
            on_max_stream_data_delivery, quic
        )

    def _view(self) -> list[Any]:
        view = []
        data_streams = 0
        idle = []
        for stream in self._queue.values():
            if _has_data_to_send(stream) and not (
                stream.stream_id & 2 or stream.receiver.stop_pending or stream.is_finished
            ):
                if data_streams < self._limit:
                    view.append(stream)
                    data_streams += 1
                elif stream.max_stream_data_local_sent != stream.max_stream_data_local:
                    view.append(stream)
            elif _needs_service(stream):
                view.append(stream)
            else:
                idle.append(stream.stream_id)
        for stream_id in idle:
            del self._queue[stream_id]
        return view

    def activate(self, stream_id: int) -> None:
        """The application changed the stream (wrote, reset, read): let the writer see it."""
        stream = self._quic._streams.get(stream_id)
        if stream is not None:
            self._adopt(stream)

    def _adopt(self, stream: Any) -> None:
        self._queue.setdefault(stream.stream_id, stream)
        if stream.stream_id in self._known:
            return
        self._known.add(stream.stream_id)
        for part, name in (
            (stream.sender, "on_data_delivery"),
            (stream.sender, "on_reset_delivery"),
            (stream.receiver, "on_stop_sending_delivery"),
        ):
            setattr(part, name, self._wrap_delivery(stream, getattr(part, name)))

    def _wrap_delivery(self, stream: Any, handler: Callable[..., None]) -> Callable[..., None]:
        def on_delivery(*args: Any) -> None:
            handler(*args)
            # Acked or lost: the stream may have data to resend or be finished.
            self._queue.setdefault(stream.stream_id, stream)

        return on_delivery


# -- read-only views ---------------------------------------------------------------


def unsent_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to the stream that aioquic has not yet put in a packet."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    return int(sender._buffer_stop - sender.highest_offset)


def can_open_bidi_stream(quic: QuicConnection) -> bool:
    """Whether the peer's MAX_STREAMS allows one more bidirectional stream now."""
    return bool(quic.get_next_available_stream_id() // 4 < quic._remote_max_streams_bidi)


def closing_reason(quic: QuicConnection) -> str | None:
    """Why the connection is closing, as soon as it is, or None while it is open.

    aioquic raises ``ConnectionTerminated`` only when the closing or draining
    period (3 PTO) ends; until then the connection looks open, and a stream
    opened meanwhile would be lost.
    """
    event = quic._close_event
    if event is None:
        return None
    return event.reason_phrase or f"error code {event.error_code:#x}"


def is_draining(quic: QuicConnection) -> bool:
    """True once the peer's CONNECTION_CLOSE arrived: nothing may be sent any more."""
    return bool(quic._state == QuicConnectionState.DRAINING)


def has_request_streams(quic: QuicConnection) -> bool:
    """Whether aioquic still holds a bidirectional stream (data unacked or unread)."""
    return any(not stream_id & 2 for stream_id in quic._streams)


def stream_is_open(quic: QuicConnection, stream_id: int) -> bool:
    """Whether aioquic still holds state for the stream."""
    return stream_id in quic._streams


def tolerate_initial_without_crypto(quic: QuicConnection) -> None:
    """Keep a server connection whose first Initial carries no CRYPTO frame.

    When a client's first Initial (its ClientHello) is lost, its probe may carry
    only PING or ACK (RFC 9002 6.2.4); aioquic then closes with PROTOCOL_VIOLATION
    instead of waiting for the retransmitted ClientHello (found by the interop
    runner against qh3 under handshake loss, docs/interop.md). Any valid, padded
    Initial already creates server state, so accepting this one exposes nothing new.
    """
    original = quic._payload_received

    def _payload_received(
        self_: QuicConnection, context: Any, plain: bytes, crypto_frame_required: bool = False
    ) -> tuple[bool, bool]:
        return original(context, plain, crypto_frame_required=False)

    quic._payload_received = types.MethodType(_payload_received, quic)  # type: ignore[method-assign]


def repeat_acks_in_probes(quic: QuicConnection) -> None:
    """Make a handshake probe carry the ACK ranges of its packet number space again.

    aioquic writes an Initial or Handshake ACK frame once, when packets arrive,
    and its probe timeout (PTO) sends a bare PING. If that one ACK is lost, the
    peer never learns which of its handshake packets arrived: it keeps
    retransmitting those, and the ones really lost wait for its own, ever longer,
    PTOs. Seen with ngtcp2's server at 30 % loss (interop ``handshakeloss``): the
    client got the first half of the server's flight, its one ACK was lost, its
    four PING probes reached the server without ACK ranges, and the server resent
    the half the client already had, 7 s later, then gave up. ACK frames may be
    sent in any packet and repeated (RFC 9000, section 13.2); so, whenever a probe
    is due before the handshake completes, the Initial and Handshake spaces that
    have received packets schedule their ACK frame again.
    """
    original = quic.datagrams_to_send

    def datagrams_to_send(self_: QuicConnection, now: float) -> list[tuple[bytes, Any]]:
        if self_._probe_pending and not self_._handshake_complete:
            for epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE):
                space = self_._spaces.get(epoch)
                if (
                    space is not None
                    and len(space.ack_queue) > 0
                    and space.ack_at is None
                    and self_._cryptos[epoch].send.is_valid()
                ):
                    space.ack_at = now
        return original(now=now)

    quic.datagrams_to_send = types.MethodType(datagrams_to_send, quic)  # type: ignore[method-assign]


def fix_handshake_recovery(quic: QuicConnection) -> None:
    """Install the handshake fixes every quicmesh connection needs, before its first
    datagram: :func:`repeat_acks_in_probes`, and on a server
    :func:`tolerate_initial_without_crypto`. One place, so that the transport and the
    interop endpoint (which drives aioquic itself) cannot drift apart."""
    repeat_acks_in_probes(quic)
    if not quic.configuration.is_client:
        tolerate_initial_without_crypto(quic)


def limit_peer_streams(quic: QuicConnection, max_streams: int) -> None:
    """Let the peer open at most ``max_streams`` concurrent bidirectional streams.

    aioquic fixes the initial MAX_STREAMS at 128; this sets it before the
    transport parameters are sent.
    """
    limit = quic._local_max_streams_bidi
    limit.value = limit.sent = max_streams


def count_lost_packets(quic: QuicConnection, on_lost: Callable[[int], None]) -> None:
    """Call ``on_lost(n)`` whenever the loss detector declares ``n`` packets lost."""
    recovery = quic._loss
    original = recovery._on_packets_lost

    def _on_packets_lost(self_: Any, *, packets: Any, **kwargs: Any) -> None:
        on_lost(len(packets))
        original(packets=packets, **kwargs)

    recovery._on_packets_lost = types.MethodType(_on_packets_lost, recovery)  # type: ignore[method-assign]


def connection_stats(quic: QuicConnection) -> dict[str, Any]:
    """RTT, congestion window and bytes in flight from aioquic's loss recovery."""
    recovery = quic._loss
    return {
        "rtt": recovery._rtt_smoothed if recovery._rtt_initialized else None,
        "rtt_min": recovery._rtt_min if recovery._rtt_initialized else None,
        "cwnd": recovery.congestion_window,
        "bytes_in_flight": recovery.bytes_in_flight,
        "congestion_control": quic.configuration.congestion_control_algorithm,
    }


# -- 0-RTT -------------------------------------------------------------------------


def reschedule_early_data(quic: QuicConnection, now: float) -> int:
    """Declare every 0-RTT packet still in flight lost; return how many there were.

    Call on a client whose handshake completed with 0-RTT rejected: the server
    could not read those packets, so their frames are queued again and go out in
    1-RTT packets. Not reported to congestion control (nothing was dropped by
    the network).
    """
    space = quic._spaces[tls.Epoch.ONE_RTT]
    packets = [
        packet
        for packet in space.sent_packets.values()
        if packet.packet_type == QuicPacketType.ZERO_RTT
    ]
    if packets:
        quic._loss._on_packets_lost(congestion_event=False, now=now, packets=packets, space=space)
    return len(packets)


def count_sent_packets(quic: QuicConnection, on_sent: Callable[[QuicPacketType], None]) -> None:
    """Call ``on_sent(packet_type)`` for every packet the connection sends."""
    recovery = quic._loss
    original = recovery.on_packet_sent

    def on_packet_sent(self_: Any, *, packet: Any, space: Any) -> None:
        on_sent(packet.packet_type)
        original(packet=packet, space=space)

    recovery.on_packet_sent = types.MethodType(on_packet_sent, recovery)  # type: ignore[method-assign]


# -- paths -------------------------------------------------------------------------


def active_path(quic: QuicConnection) -> tuple[Any, bool] | None:
    """The peer address packets go to now, and whether that path is validated."""
    paths = quic._network_paths
    if not paths:
        return None
    return paths[0].addr, bool(paths[0].is_validated)


def pto_count(quic: QuicConnection) -> int:
    """Consecutive probe timeouts without an acknowledgement (RFC 9002 section 6.2)."""
    return int(quic._loss._pto_count)


def awaiting_ack(quic: QuicConnection) -> bool:
    """Whether ack-eliciting packets are in flight, unacknowledged (any space)."""
    return any(space.ack_eliciting_in_flight for space in quic._loss.spaces)


def spare_connection_ids(quic: QuicConnection) -> int:
    """Connection IDs the peer issued that we have not used yet."""
    return len(quic._peer_cid_available)


class PathMonitor:
    """Report aioquic's path validations on one connection.

    ``on_validated(addr)`` runs when a PATH_RESPONSE validates a path (after a
    peer address change on a server, or a probe); ``on_abandoned(addr)`` when
    validation of the active path times out and aioquic reverts to the last
    validated path (RFC 9000 section 9.3.2).
    """

    def __init__(
        self,
        quic: QuicConnection,
        on_validated: Callable[[Any], None],
        on_abandoned: Callable[[Any], None],
    ) -> None:
        original_response = quic._handle_path_response_frame
        original_abandon = quic._abandon_path_validation

        def handle_path_response(
            self_: QuicConnection, context: Any, frame_type: int, buf: Any
        ) -> None:
            before = {id(path): path.is_validated for path in self_._network_paths}
            original_response(context, frame_type, buf)
            for path in self_._network_paths:
                if path.is_validated and not before.get(id(path), True):
                    on_validated(path.addr)

        def abandon(self_: QuicConnection) -> None:
            addr = self_._network_paths[0].addr if self_._network_paths else None
            original_abandon()
            on_abandoned(addr)

        # Frame handlers are bound into a table when the connection is created.
        handlers = quic._QuicConnection__frame_handlers  # type: ignore[attr-defined]
        frame_type = QuicFrameType.PATH_RESPONSE
        handlers[frame_type] = (
            types.MethodType(handle_path_response, quic),
            handlers[frame_type][1],
        )
        quic._abandon_path_validation = types.MethodType(abandon, quic)  # type: ignore[method-assign]


# -- admission ---------------------------------------------------------------------


def received_valid_packet(quic: QuicConnection) -> bool:
    """Whether a server connection has decrypted a packet yet.

    aioquic creates a server connection for any Initial-shaped datagram and keeps
    it until the idle timeout even when nothing decrypts; the listener asks this
    after the first datagram and drops the connection at once when it is False.
    """
    return bool(quic._state != QuicConnectionState.FIRSTFLIGHT)


def initial_decrypts(data: bytes, cid_length: int) -> bool:
    """Whether the first packet of ``data`` (a client Initial) decrypts with the
    Initial keys its destination connection ID derives (RFC 9001 5.2).

    A few microseconds of HKDF and AES-GCM, where creating the aioquic connection
    that would find out (TLS context, certificate, key) costs a millisecond: a
    listener checks this before it keeps anything for a new connection.
    """
    buf = Buffer(data=data)
    try:
        header = pull_quic_header(buf, host_cid_length=cid_length)
        if header.version is None:
            return False
        crypto = CryptoPair()
        crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
        crypto.decrypt_packet(data[: header.packet_length], buf.tell(), 0)
    except (ValueError, CryptoError, KeyUnavailableError):
        return False
    return True


def new_connection_initial(
    data: bytes, configuration: Any, known: Callable[[bytes], bool]
) -> Any | None:
    """The header of a datagram that would make aioquic's server create a connection
    (an Initial of a supported version, at least 1200 bytes, for an unknown
    connection ID), or None for any other datagram."""
    if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
        return None
    try:
        header = pull_quic_header(
            Buffer(data=data), host_cid_length=configuration.connection_id_length
        )
    except ValueError:
        return None
    if (
        header.packet_type != QuicPacketType.INITIAL
        or header.version not in configuration.supported_versions
        or known(header.destination_cid)
    ):
        return None
    return header


# -- stateless reset ---------------------------------------------------------------

STATELESS_RESET_TOKEN_SIZE = 16
MIN_STATELESS_RESET_SIZE = 21
"""RFC 9000 10.3: 5 unpredictable bytes (the first with the fixed bit) and the token."""


def stateless_reset_token(key: bytes, cid: bytes) -> bytes:
    """The reset token of connection ID ``cid`` under ``key`` (RFC 9000 10.3.2: a
    keyed hash of the connection ID, so a restarted server knows it without state)."""
    return hmac.new(key, cid, hashlib.sha256).digest()[:STATELESS_RESET_TOKEN_SIZE]


def derive_stateless_reset_tokens(quic: QuicConnection, key: bytes) -> None:
    """Make a server connection's reset tokens :func:`stateless_reset_token` of its
    connection IDs, instead of aioquic's random ones (which die with the process).

    Call before the first datagram: the first token goes in the transport
    parameters, later ones in NEW_CONNECTION_ID frames.
    """
    for connection_id in quic._host_cids:
        connection_id.stateless_reset_token = stateless_reset_token(key, connection_id.cid)
    original = quic._replenish_connection_ids

    def _replenish_connection_ids(self_: QuicConnection) -> None:
        original()
        for connection_id in self_._host_cids:
            if not connection_id.was_sent:
                connection_id.stateless_reset_token = stateless_reset_token(key, connection_id.cid)

    quic._replenish_connection_ids = types.MethodType(_replenish_connection_ids, quic)  # type: ignore[method-assign]


def unknown_short_header_cid(data: bytes, cid_length: int) -> bytes | None:
    """The destination connection ID of a short-header (1-RTT) datagram, or None for
    a long-header one or one too short to be answered with a stateless reset."""
    if len(data) <= MIN_STATELESS_RESET_SIZE or data[0] & 0x80 or not data[0] & 0x40:
        return None
    return data[1 : 1 + cid_length]


def stateless_reset(key: bytes, cid: bytes, received: int) -> bytes:
    """A stateless reset for connection ID ``cid``, shorter than the ``received``
    datagram that provoked it (so two endpoints cannot loop), looking like a
    short-header packet."""
    size = min(received - 1, 43)
    prefix = bytearray(os.urandom(size - STATELESS_RESET_TOKEN_SIZE))
    prefix[0] = (prefix[0] & 0x3F) | 0x40
    return bytes(prefix) + stateless_reset_token(key, cid)


def is_stateless_reset(quic: QuicConnection, data: bytes) -> bool:
    """Whether ``data`` ends with a reset token the peer gave for one of its
    connection IDs (RFC 9000 10.3.1). aioquic stores the tokens but never checks."""
    if len(data) < MIN_STATELESS_RESET_SIZE or data[0] & 0x80:
        return False
    tail = data[-STATELESS_RESET_TOKEN_SIZE:]
    tokens = [quic._peer_cid.stateless_reset_token]
    tokens += [c.stateless_reset_token for c in quic._peer_cid_available]
    return any(token and hmac.compare_digest(token, tail) for token in tokens)


def terminate_after_stateless_reset(quic: QuicConnection) -> None:
    """End the connection at once, sending nothing more (RFC 9000 10.3.1): aioquic
    then reports ``ConnectionTerminated`` as for any other end."""
    if quic._state in (QuicConnectionState.TERMINATED,):
        return
    quic._close_event = quic_events.ConnectionTerminated(
        error_code=QuicErrorCode.NO_ERROR,
        frame_type=None,
        reason_phrase="the peer sent a stateless reset (it restarted or lost the connection)",
    )
    quic._close_end()


def pending_issued_connection_ids(quic: QuicConnection) -> list[bytes]:
    """Connection IDs issued (NEW_CONNECTION_ID written) whose event is still queued.

    aioquic's server learns of them only when it next processes this connection's
    events; a peer quick to use one would meanwhile meet a listener that does not
    know it (and, with stateless resets, is told the connection is gone).
    """
    return [
        event.connection_id
        for event in quic._events
        if isinstance(event, quic_events.ConnectionIdIssued)
    ]
