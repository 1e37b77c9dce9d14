"""The one place quicmesh reaches into aioquic's internals.

aioquic 1.7 is driven through its public API everywhere else. What it lacks,
quicmesh adds here: every change of behaviour is an override in one subclass,
:class:`MeshQuicConnection` (its docstring states the order), never a method
swapped on a live object or a patch of aioquic's classes or modules; the rest
are read-only views. Each point is documented with the limit it works around
and covered by a test in ``tests/test_aioquic_layer.py``; every private aioquic
name relied on is listed in ``tests/test_aioquic_canary.py``:

* **Client certificates** (``request_client_certificate=True``): an aioquic server
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
* **Session tickets and 0-RTT on the server** (``fetch_ticket``, ``on_ticket_issued``):
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
* **Paths** (path events of :class:`MeshQuicConnection`, :func:`active_path`,
  :func:`spare_connection_ids`): aioquic validates a client's new address and
  reverts to the last validated path on failure (since 1.7.0) but reports none of
  it; the connection raises ``PathValidated`` / ``PathAbandoned`` events.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import pylsqpack
from aioquic import tls
from aioquic._buffer import Buffer, BufferReadError
from aioquic._crypto import CryptoError
from aioquic.asyncio.server import _encode_invalid_token_close
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import (
    CONNECTION_SPECIFIC_HEADERS,
    ClosedCriticalStream,
    ErrorCode,
    FrameError,
    FrameType,
    H3Connection,
    H3Stream,
    IdError,
    MessageError,
    ProtocolError,
    Setting,
    StreamType,
    encode_frame,
    validate_request_headers,
)
from aioquic.h3.events import H3Event
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    Limit,
    QuicConnection,
    QuicConnectionAdapter,
    QuicConnectionError,
    QuicConnectionState,
)
from aioquic.quic.crypto import (
    INITIAL_CIPHER_SUITE,
    INITIAL_SALT_VERSION_1,
    INITIAL_SALT_VERSION_2,
    CryptoContext,
    KeyUnavailableError,
)
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, QuicProtocolVersion, pull_quic_header
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import QuicPacketRecovery, QuicPacketSpace
from cryptography import x509

from .errors import peer_text
from .transport._stream_rate import StreamRate
from .transport.quic import engine as engine_events
from .tunnel.connect import (
    HEADER_NAME_PATTERN,
    HEADER_VALUE_PATTERN,
    MAX_FIELD_SECTION_SIZE,
    read_connect_response,
    response_fields,
)
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
        allowed = self.bound.encoder_allowance(ENCODER_STREAM_EXCESS)
        if self.bound.encoder_bytes > allowed:
            raise ExcessiveLoad(f"a QPACK encoder stream of more than {allowed} bytes")
        return result

    def feed_header(self, stream_id: int, data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        try:
            size = self.bound.section_size(data, stop_above=self.limit)
        except QpackFormatError:
            # Not read by the bound: pylsqpack judges what is malformed (a connection
            # error, RFC 9204 2.2), but only a section too short to decode past the
            # limit whatever its lines refer to is let through to it.
            size = self.bound.length_bound(len(data))
        if size > self.limit:
            raise FieldSectionTooLarge(stream_id, size, self.limit)
        return self._decoder.feed_header(stream_id, data)

    def resume_header(self, stream_id: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        return self._decoder.resume_header(stream_id)

    def cancel_stream(self, stream_id: int) -> bytes:
        return self._decoder.cancel_stream(stream_id)


@dataclass
class MessageRejected(H3Event):
    """(quicmesh's) A request or response stream this side reset both ways with
    H3_MESSAGE_ERROR for a malformed message (RFC 9114 4.1.2): ``reason`` says what."""

    stream_id: int
    reason: str


@dataclass
class GoawayReceived(H3Event):
    """(quicmesh's) The peer sent GOAWAY (RFC 9114 5.2). From a server: it processes no
    request on a stream whose ID is ``stream_id`` or above, so new requests go on another
    connection. From a client, ``stream_id`` is a push ID (quicmesh does not push)."""

    stream_id: int


class _GoawayReader:
    """Reads the GOAWAY frames of the peer's control stream, which aioquic parses and
    skips (it validates the stream and its frames and applies SETTINGS itself): the frame
    headers are read alongside it and every other payload skipped by its length, so
    nothing is held but a frame header in pieces or a GOAWAY's payload (one variable-length
    integer, at most 8 bytes)."""

    def __init__(self) -> None:
        self._held = b""
        self._skip = 0

    def feed(self, data: bytes) -> list[int]:
        """The IDs of the GOAWAY frames completed by ``data``, in order.

        :raises FrameError: a GOAWAY frame whose payload is not one integer."""
        data, position, ids = self._held + data, 0, []
        while position < len(data):
            if self._skip:
                taken = min(self._skip, len(data) - position)
                position += taken
                self._skip -= taken
                continue
            header = Buffer(data=data[position : position + 16])  # two integers at most
            try:
                frame_type, length = header.pull_uint_var(), header.pull_uint_var()
            except BufferReadError:
                break
            if frame_type != FrameType.GOAWAY:
                position += header.tell()
                self._skip = length
                continue
            if length > 8:
                raise FrameError(f"GOAWAY frame of {length} bytes (one integer is at most 8)")
            start = position + header.tell()
            if len(data) - start < length:
                break
            payload = Buffer(data=data[start : start + length])
            try:
                ids.append(payload.pull_uint_var())
            except BufferReadError:
                raise FrameError("GOAWAY frame shorter than its integer") from None
            if payload.tell() != length:
                raise FrameError("GOAWAY frame longer than its integer")
            position = start + length
        self._held = data[position:]
        return ids


_QPACK_STREAM_TYPES = (StreamType.QPACK_ENCODER, StreamType.QPACK_DECODER)
_KNOWN_UNI_TYPES = (StreamType.CONTROL, *_QPACK_STREAM_TYPES)

MAX_CONTROL_FRAME = 16 * 1024
"""Bytes of one frame aioquic may hold on the peer's control stream while it waits for
the rest (a SETTINGS or MAX_PUSH_ID frame is read whole; a SETTINGS frame is tens of
bytes). aioquic copies and parses what it holds again for every packet, with no bound:
a frame announcing 2^40 bytes held a core (RFC 9114 10.5: H3_EXCESSIVE_LOAD)."""


ENCODER_STREAM_EXCESS = 16
"""An encoder stream this many times the bytes the field-section bound follows
(:meth:`~quicmesh.tunnel.qpack.FieldSectionBound.encoder_allowance`: 1 MiB, and 16 KiB a
header section) ends the connection: a legitimate encoder sends a few hundred bytes a
section, and an encoder stream has no flow control that reading holds back (its bytes
are consumed as they come), so a flood of instructions costs the loop their packets."""


MAX_OTHER_UNI_STREAMS = 1000
"""Unidirectional streams of a type other than control and QPACK (reserved types for
greasing, types not negotiated) a peer may open on one connection: their bytes are
dropped (RFC 9114 6.2), but their credit comes back as each ends, so a peer opening
one-byte streams with FIN as fast as it could held most of a core (15,000-27,000 a
second). A legitimate peer opens a few (greasing). Past it: H3_EXCESSIVE_LOAD."""


class ExcessiveLoad(ProtocolError):
    """The peer's control stream holds a frame past :data:`MAX_CONTROL_FRAME`, or its
    QPACK encoder stream runs past :data:`ENCODER_STREAM_EXCESS` times what is followed."""

    error_code = ErrorCode.H3_EXCESSIVE_LOAD


class MeshH3Connection(H3Connection):
    """aioquic's HTTP/3 connection announcing no QPACK blocked streams, with a limit
    on decoded header sections.

    With SETTINGS_QPACK_BLOCKED_STREAMS = 0 the peer's encoder only references
    dynamic-table entries we have acknowledged, so a HEADERS frame never waits
    on the encoder stream and streams never wait on each other (RFC 9204 2.1.2).
    A client also announces no dynamic table (SETTINGS_QPACK_MAX_TABLE_CAPACITY = 0):
    the answers to its CONNECTs are a status and at most a reason, and with no table
    every answer refers to the static table only, so one read outside the connection's
    decoder reads it whole (:func:`read_static_response`: an engine flow's refusal).

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
        self._malformed: set[int] = set()
        """Request streams reset for a malformed message: their later data is dropped."""
        self.goaway_received: int | None = None
        """The ID of the peer's last GOAWAY frame, or None."""
        self._goaway_reader = _GoawayReader()
        self._other_uni_streams = 0
        """Peer unidirectional streams of other types than control and QPACK."""
        self._blocked_streams = 0
        if self._is_client:
            self._max_table_capacity = 0
        self._decoder = _BoundedDecoder(  # type: ignore[assignment]
            pylsqpack.Decoder(self._max_table_capacity, self._blocked_streams),
            self._max_table_capacity,
            self.max_field_section_size,
        )
        super()._init_connection()

    def _receive_stream_data_uni(
        self, stream: H3Stream, data: bytes, stream_ended: bool
    ) -> list[H3Event]:
        """aioquic's, where a QPACK encoder or decoder stream the peer closes is a
        connection error, as its control stream is (RFC 9204 4.2: H3_CLOSED_CRITICAL_STREAM;
        aioquic let the stream end), the control stream's GOAWAY frames, which aioquic
        skips, are read (:class:`_GoawayReader`, :meth:`_on_goaway`), and a control frame
        aioquic holds past :data:`MAX_CONTROL_FRAME` ends the connection."""
        typed = stream.stream_type is not None
        unread = bytes(stream.buffer)  # before its type: aioquic has not consumed them
        result = super()._receive_stream_data_uni(stream, data, stream_ended)
        if not typed and stream.stream_type not in (None, *_KNOWN_UNI_TYPES):
            self._other_uni_streams += 1
            if self._other_uni_streams > MAX_OTHER_UNI_STREAMS:
                raise ExcessiveLoad(
                    f"more than {MAX_OTHER_UNI_STREAMS} unidirectional streams of "
                    "unknown or reserved types"
                )
        if stream_ended and stream.stream_type in _QPACK_STREAM_TYPES:
            raise ClosedCriticalStream("Closing a QPACK encoder or decoder stream is not allowed")
        if stream.stream_type == StreamType.CONTROL:
            if len(stream.buffer) > MAX_CONTROL_FRAME:
                raise ExcessiveLoad(
                    f"a control-stream frame of more than {MAX_CONTROL_FRAME} bytes"
                )
            if not typed:
                data = unread + data
                buffer = Buffer(data=data)
                buffer.pull_uint_var()  # the stream type, read by aioquic
                data = data[buffer.tell() :]
            for stream_id in self._goaway_reader.feed(data):
                result.append(self._on_goaway(stream_id))
        return result

    def send_goaway(self, stream_id: int) -> None:
        """Send a GOAWAY frame naming ``stream_id`` on our control stream (RFC 9114 5.2;
        aioquic has no call for it)."""
        control = self._local_control_stream_id
        assert control is not None  # opened with the connection
        self._quic.send_stream_data(
            control, encode_frame(FrameType.GOAWAY, encode_uint_var(stream_id))
        )

    def _on_goaway(self, stream_id: int) -> GoawayReceived:
        """RFC 9114 5.2: a server's GOAWAY names a client-initiated bidirectional stream,
        and no GOAWAY may name a higher ID than an earlier one (H3_ID_ERROR otherwise)."""
        if self._is_client and stream_id % 4 != 0:
            raise IdError(
                f"GOAWAY names stream {stream_id}, not a client-initiated bidirectional one"
            )
        if self.goaway_received is not None and stream_id > self.goaway_received:
            raise IdError(f"GOAWAY raised its ID from {self.goaway_received} to {stream_id}")
        self.goaway_received = stream_id
        return GoawayReceived(stream_id)

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[Setting.MAX_FIELD_SECTION_SIZE] = self.max_field_section_size
        # aioquic announces extended CONNECT (RFC 9220), which quicmesh refuses (400):
        # not announced, so that no peer takes it as offered.
        settings.pop(Setting.ENABLE_CONNECT_PROTOCOL, None)
        return settings

    def _receive_request_or_push_data(
        self, stream: Any, data: bytes, stream_ended: bool
    ) -> list[H3Event]:
        """aioquic's, where a malformed message (``MessageError``: a pseudo-header given
        twice or after a regular one, a missing ``:authority``, a name or value HTTP does
        not allow...) is a stream error, as RFC 9114 4.1.2 has it: that stream is reset
        both ways with H3_MESSAGE_ERROR (reported as :class:`MessageRejected`) and what
        else arrives on it is dropped. aioquic made it a connection error: every other
        flow of the connection died with it."""
        if stream.stream_id in self._malformed:
            return []
        try:
            return super()._receive_request_or_push_data(stream, data, stream_ended)
        except MessageError as exc:
            self._malformed.add(stream.stream_id)
            stream.buffer = b""
            stream.frame_type = stream.frame_size = None
            self._quic.reset_stream(stream.stream_id, ErrorCode.H3_MESSAGE_ERROR)
            self._quic.stop_stream(stream.stream_id, ErrorCode.H3_MESSAGE_ERROR)
            return [MessageRejected(stream.stream_id, exc.reason_phrase)]

    def hand_over_stream(self, stream_id: int) -> tuple[int | None, int, bytes]:
        """Forget a request stream whose input another parser takes over (splicing) and
        return where aioquic's parser stood: the type of the frame it is inside (``None``
        at a frame boundary), the bytes of that frame still to come counted from the
        start of the unparsed bytes, and those unparsed bytes."""
        stream = self._stream.pop(stream_id, None)
        if stream is None:
            return None, 0, b""
        return stream.frame_type, stream.frame_size or 0, bytes(stream.buffer)

    def forget_stream(self, stream_id: int) -> None:
        """The QUIC layer dropped the finished request stream: drop its parser state
        (aioquic keeps a reset stream's for the connection's lifetime)."""
        self._stream.pop(stream_id, None)
        self._malformed.discard(stream_id)

    def abandon_stream(self, stream_id: int) -> None:
        """Forget a request stream refused mid-frame; tell the peer's encoder that its
        header block will not be decoded (Stream Cancellation, RFC 9204 4.4.2)."""
        self.forget_stream(stream_id)
        if self._local_decoder_stream_id is not None:
            cancel = self._decoder.cancel_stream(stream_id)
            self._quic.send_stream_data(self._local_decoder_stream_id, cancel)


@functools.cache
def connect_accepted_frame() -> bytes:
    """The HEADERS frame answering a CONNECT with 200, for an engine that sends it itself
    once the destination is connected (the native engine's ``connect_splice``). Encoded
    once by a QPACK encoder with no dynamic table: a field section with Required Insert
    Count 0 that refers to the static table only (``:status: 200`` is its entry 25), valid
    on any connection whatever its dynamic table holds (RFC 9204 4.5.1)."""
    _, block = pylsqpack.Encoder().encode(0, response_fields(200))
    return bytes(encode_frame(FrameType.HEADERS, block))


_STATIC_ENCODER = pylsqpack.Encoder()
"""A QPACK encoder never given a dynamic table: what it encodes refers to the static
table only (as :func:`connect_accepted_frame`)."""


def connect_response_frame(status: int, reason: str) -> bytes:
    """The HEADERS frame answering a CONNECT with ``status`` (and the reason's
    ``proxy-status``), static table only as :func:`connect_accepted_frame`, for a stream
    the connection's HTTP/3 layer never saw (an inbound engine flow refused late)."""
    _, block = _STATIC_ENCODER.encode(0, response_fields(status, reason))
    return bytes(encode_frame(FrameType.HEADERS, block))


def connect_request_frame(fields: list[tuple[bytes, bytes]]) -> bytes:
    """The HEADERS frame of a CONNECT with ``fields``, for an engine that sends it itself
    (the native engine's outbound flows): encoded with the static table only, so valid
    on any connection and needing no encoder-stream instruction (RFC 9204 4.5.1)."""
    _, block = _STATIC_ENCODER.encode(0, fields)
    return bytes(encode_frame(FrameType.HEADERS, block))


_STATIC_DECODER = pylsqpack.Decoder(0, 0)
"""A QPACK decoder with no dynamic table: decodes field sections that refer to the
static table only (Required Insert Count 0), the same for every connection."""

_STATIC_BOUND = FieldSectionBound(0)

_PLAIN_NAME = re.compile(HEADER_NAME_PATTERN.encode())
"""A header name as quicmesh's CONNECT headers go: stricter than aioquic's check."""
_PLAIN_VALUE = re.compile(HEADER_VALUE_PATTERN.encode())
"""A header value as quicmesh's CONNECT headers go: stricter than aioquic's check (no
NUL, CR or LF; no white space first or last)."""
_SPECIAL_HEADERS = CONNECTION_SPECIFIC_HEADERS | {b"content-length"}


def _is_plain_connect(fields: list[tuple[bytes, bytes]]) -> bool:
    """Whether ``fields`` is a CONNECT as quicmesh sends one (``:method``, then
    ``:authority``, then plain headers) that aioquic's ``validate_request_headers``
    accepts: a stricter check than aioquic's, which walks every byte in Python. False
    says nothing: the caller asks aioquic."""
    if len(fields) < 2 or fields[0] != (b":method", b"CONNECT"):
        return False
    name, authority = fields[1]
    if name != b":authority" or not authority or not _PLAIN_VALUE.fullmatch(authority):
        return False
    for name, value in fields[2:]:
        if (
            not _PLAIN_NAME.fullmatch(name)
            or name in _SPECIAL_HEADERS
            or not _PLAIN_VALUE.fullmatch(value)
        ):
            return False
    return True


def read_static_request(
    data: bytes, limit: int = MAX_FIELD_SECTION_SIZE
) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
    """A request stream's first bytes, when they begin with a whole HEADERS frame whose
    field section refers to the static QPACK table only (Required Insert Count 0, as
    quicmesh's engine flows encode their CONNECT): its decoded fields, valid as aioquic
    requires of a request, and the bytes after the frame. None for anything else (the
    frame cut short, another frame first, dynamic-table references, more than ``limit``
    decoded bytes, malformed or invalid): the connection's HTTP/3 layer then reads the
    stream as usual. Decoding such a section needs no per-connection state, and no
    Section Acknowledgment follows one (RFC 9204 4.4.1)."""
    section = _static_headers_frame(data)
    if section is None:
        return None
    start, end = section
    try:
        fields = _decode_static_section(data[start:end], limit)
        if fields is None:
            return None
        if not _is_plain_connect(fields):
            validate_request_headers(fields)
    except Exception:  # pylsqpack's and aioquic's refusals: the usual path says why
        return None
    return fields, data[end:]


def _static_headers_frame(data: bytes) -> tuple[int, int] | None:
    """Where the field section of the whole HEADERS frame ``data`` begins with starts and
    ends, when its Required Insert Count is 0 (static table only); else None."""
    buffer = Buffer(data=data)
    try:
        frame_type = buffer.pull_uint_var()
        length = buffer.pull_uint_var()
    except Exception:  # cut short (aioquic's BufferReadError)
        return None
    start = buffer.tell()
    end = start + length
    if frame_type != FrameType.HEADERS or end > len(data) or length < 2 or data[start] != 0:
        return None
    return start, end


def _decode_static_section(block: bytes, limit: int) -> list[tuple[bytes, bytes]] | None:
    """A field section that refers to the static table only, decoded; None past ``limit``
    decoded bytes. pylsqpack raises on anything else (dynamic-table references, malformed)."""
    # (A section too short to decode past the limit needs no walk.)
    if _STATIC_BOUND.length_bound(len(block)) > limit and (
        _STATIC_BOUND.section_size(block, stop_above=limit) > limit
    ):
        return None
    return _STATIC_DECODER.feed_header(0, block)[1]


def read_static_response(
    frame: bytes, limit: int = MAX_FIELD_SECTION_SIZE
) -> tuple[int, str] | None:
    """A CONNECT's answer, given as its whole HEADERS frame (what the native engine hands
    back from an engine flow that was not answered with the plain 200), when its field
    section refers to the static QPACK table only, as every answer to a quicmesh client
    does (:class:`MeshH3Connection`): its status and reason
    (:func:`~quicmesh.tunnel.connect.read_connect_response`). None for anything else (not
    one whole HEADERS frame, dynamic-table references, more than ``limit`` decoded bytes,
    malformed, an interim answer): the caller asks again its usual way. No Section
    Acknowledgment follows such a section (RFC 9204 4.4.1)."""
    section = _static_headers_frame(frame)
    if section is None or section[1] != len(frame):
        return None
    try:
        fields = _decode_static_section(frame[section[0] :], limit)
    except Exception:  # pylsqpack's refusals
        return None
    return None if fields is None else read_connect_response(fields)


# -- TLS -----------------------------------------------------------------------


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
    aioquic's behaviour. Attached to one :class:`MeshQuicConnection`, whose
    packet writer consults it.
    """

    def __init__(self, quic: QuicConnection, stream_window: int, connection_window: int) -> None:
        if not isinstance(quic, MeshQuicConnection):
            raise TypeError("read-driven flow control needs a MeshQuicConnection")
        self.stream_window = stream_window
        self.connection_window = connection_window
        self._quic = quic
        self._streams: dict[int, _StreamCredit] = {}
        self._buffered_total = 0
        quic.attach_flow_control(self)

    def credit(self, stream_id: int) -> _StreamCredit | None:
        """The credit record of a tracked stream, or None."""
        return self._streams.get(stream_id)

    def connection_target(self, used: int) -> int:
        """The connection window the read path allows when ``used`` bytes arrived."""
        return used - self._buffered_total + self.connection_window

    def raise_stream_window(self, stream: Any, credit: _StreamCredit) -> None:
        """Move the stream's window to what the application's reads allow."""
        target = credit.delivered - credit.buffered + self.stream_window
        if target - stream.max_stream_data_local >= self.stream_window // 4:
            stream.max_stream_data_local = target

    def _update(self, stream_id: int, credit: _StreamCredit) -> None:
        # Raise the window here, not only in the packet writer: the scheduler shows
        # the writer a stream with nothing to send only if its window changed.
        stream = self._quic._streams.get(stream_id)
        if stream is not None:
            self.raise_stream_window(stream, credit)

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
        if not isinstance(quic, MeshQuicConnection):
            raise TypeError("the stream scheduler needs a MeshQuicConnection")
        self._quic = quic
        self._on_discard = on_discard
        self._limit = data_streams_per_call
        self._queue: dict[int, Any] = {}
        """Round-robin order of the streams that may need service."""
        self._known: set[int] = set()
        quic.attach_scheduler(self)

    def send(
        self, quic: QuicConnection, send: Callable[[], list[tuple[bytes, Any]]]
    ) -> list[tuple[bytes, Any]]:
        """Run aioquic's ``datagrams_to_send`` (``send``) with the view swapped in."""
        for stream in quic._streams_queue:
            self._adopt(stream)
        view = self._view()
        all_streams = quic._streams
        quic._streams = {s.stream_id: s for s in view}
        quic._streams_queue = view
        try:
            return send()
        finally:
            remaining = quic._streams
            order = quic._streams_queue
            for stream in view:
                if stream.stream_id not in remaining:
                    all_streams.pop(stream.stream_id, None)
                    self._known.discard(stream.stream_id)
                    self._queue.pop(stream.stream_id, None)
                    if self._on_discard is not None:
                        self._on_discard(stream.stream_id)
            quic._streams = all_streams
            quic._streams_queue = []
            # Served streams go to the back of the rotation, in aioquic's order.
            for stream in order:
                stream_id: int = stream.stream_id  # type: ignore[assignment]
                self._queue.pop(stream_id, None)
                if stream.stream_id in remaining and _needs_service(stream):
                    self._queue[stream.stream_id] = stream

    def requeue(self, stream: Any) -> None:
        """A MAX_STREAM_DATA of the stream was acknowledged or lost."""
        self._queue.setdefault(stream.stream_id, stream)

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
    return close_reason_text(event.error_code, event.reason_phrase, event.frame_type)


def close_reason_text(code: int, phrase: str, frame_type: int | None) -> str:
    """Why a connection closed, as its CONNECTION_CLOSE says: the peer's reason phrase
    (made safe to show), else its code, an application close's H3_NO_ERROR named as the
    graceful close it is (as the native engine words it; a transport close, with a
    ``frame_type``, of code 0x100 is a TLS alert, CRYPTO_ERROR)."""
    if text := peer_text(phrase):
        return text
    if code == 0x100 and frame_type is None:
        return f"error code {code:#x}, H3_NO_ERROR: a graceful close"
    return f"error code {code:#x}"


def is_draining(quic: QuicConnection) -> bool:
    """True once the peer's CONNECTION_CLOSE arrived: nothing may be sent any more."""
    return bool(quic._state == QuicConnectionState.DRAINING)


def has_request_streams(quic: QuicConnection) -> bool:
    """Whether aioquic still holds a bidirectional stream (data unacked or unread)."""
    return any(not stream_id & 2 for stream_id in quic._streams)


def stream_is_open(quic: QuicConnection, stream_id: int) -> bool:
    """Whether aioquic still holds state for the stream."""
    return stream_id in quic._streams


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

    Some tens of microseconds of HKDF and AES-GCM, where creating the aioquic
    connection that would find out (TLS context, certificate, key) costs a
    millisecond: a listener checks this before it keeps anything for a new
    connection. Only the client's key is derived (``CryptoPair.setup_initial``
    derives the server's too, twice the work for every forged Initial).
    """
    buf = Buffer(data=data)
    try:
        header = pull_quic_header(buf, host_cid_length=cid_length)
        if header.version is None:
            return False
        salt = (
            INITIAL_SALT_VERSION_2
            if header.version == QuicProtocolVersion.VERSION_2
            else INITIAL_SALT_VERSION_1
        )
        algorithm = tls.cipher_suite_hash(INITIAL_CIPHER_SUITE)
        initial_secret = tls.hkdf_extract(algorithm, salt, header.destination_cid)
        client = CryptoContext()
        client.setup(
            cipher_suite=INITIAL_CIPHER_SUITE,
            secret=tls.hkdf_expand_label(
                algorithm, initial_secret, b"client in", b"", algorithm.digest_size
            ),
            version=header.version,
        )
        client.decrypt_packet(data[: header.packet_length], buf.tell(), 0)
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


def invalid_token_close(version: int, source_cid: bytes, destination_cid: bytes) -> bytes:
    """A server Initial closing with INVALID_TOKEN (RFC 9000 8.1.3), as aioquic's
    server sends for a Retry token that does not validate."""
    return bytes(_encode_invalid_token_close(version, source_cid, destination_cid))


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


# -- the connection subclass ---------------------------------------------------------


class MeshPacketRecovery(QuicPacketRecovery):
    """aioquic's loss recovery, counting packets sent as 0-RTT and packets lost
    (aioquic counts neither)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.packets_lost = 0
        self.zero_rtt_packets_sent = 0

    def on_packet_sent(self, *, packet: QuicSentPacket, space: QuicPacketSpace) -> None:
        if packet.packet_type == QuicPacketType.ZERO_RTT:
            self.zero_rtt_packets_sent += 1
        super().on_packet_sent(packet=packet, space=space)

    def _on_packets_lost(self, *, packets: Any, **kwargs: Any) -> None:
        self.packets_lost += len(packets)
        super()._on_packets_lost(packets=packets, **kwargs)


class RateLimitedStreamCredit(Limit):
    """aioquic's MAX_STREAMS (bidirectional) limit of one connection, whose
    increases go through a :class:`~quicmesh.transport._stream_rate.StreamRate`.

    aioquic raises the limit by one for each peer stream it discards (``value +=
    1``): here that credit is *wanted*, and granted when the bucket has tokens
    (read by ``_write_connection_limits`` when it builds a packet).
    """

    def __init__(self, limit: Limit, bucket: StreamRate) -> None:
        self.frame_type = limit.frame_type
        self.name = limit.name
        self.sent = limit.sent
        self.used = limit.used
        self._granted = self._wanted = limit.value
        self.bucket = bucket

    @property
    def value(self) -> int:
        # Constant between grants: aioquic reads it several times per frame (the
        # batching check, the number it writes, then ``sent = value``). Taking tokens
        # here made the last read exceed the number written when a token came in
        # between: ``sent`` then counted credit the peer never got, and the peer
        # waited for it forever (MAX_STREAMS is only sent while value != sent).
        return self._granted

    @value.setter
    def value(self, value: int) -> None:
        self._wanted += value - self._granted

    def grant(self, now: float) -> None:
        """Grant the owed credit the bucket has tokens for (before each packet's
        connection limits are written)."""
        if self._wanted > self._granted:
            self._granted += self.bucket.take(self._wanted - self._granted, now)

    def next_grant_at(self, now: float) -> float | None:
        """When the tokens for a batch of the owed credit are there (at most about
        100 MAX_STREAMS updates a second, none sooner than 2 ms), or None."""
        if self._wanted <= self._granted:
            return None
        bucket = self.bucket
        batch = min(self._wanted - self._granted, max(1, int(bucket.rate / 100)))
        bucket.take(0, now)  # refill
        return max(now + 0.002, now + (batch - bucket.tokens) / bucket.rate)


class _QuietProtocolErrors(QuicConnectionAdapter):
    """aioquic's connection logger, with the protocol errors it closes a connection for
    (``QuicConnectionError``) at DEBUG instead of WARNING: aioquic logs one for every
    datagram that still carries the fault (41 lines for one peer's flow-control
    violation), naming neither the peer's identity nor its address, and anyone can cause
    them at will. quicmesh logs its own line for each (``QuicPeerConnection``: a peer
    violation after the handshake, a client's failed handshake before it), rate-limited."""

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, QuicConnectionError):
            self.debug(msg, *args, **kwargs)
        else:
            super().warning(msg, *args, **kwargs)


class MeshQuicConnection(QuicConnection):
    """aioquic's ``QuicConnection`` with every quicmesh deviation, in one class.

    The transport, the interop endpoint and the in-memory tests all build this
    class (:mod:`quicmesh.transport.quic.aioquic_engine`); nothing else changes
    aioquic's behaviour. Each override calls ``super()``; in the order a
    connection meets them:

    1. ``__init__``: loss recovery becomes :class:`MeshPacketRecovery` (counts);
       the peer's initial MAX_STREAMS is ``max_streams`` (aioquic fixes 128);
       (server) stateless reset tokens are derived from ``stateless_reset_key``
       (:func:`stateless_reset_token`) instead of random, so they survive a
       restart; with BBR, the pacer follows the model
       (:func:`quicmesh.congestion.adaptor.enable_model_pacing`).
    2. ``_initialize`` (server, first Initial): the TLS context asks for a client
       certificate when ``request_client_certificate`` (aioquic accepts an
       empty one and never verifies it: the driver verifies chain and SPIFFE
       ID), looks tickets up per connection (``fetch_ticket``: a hit withdraws
       the certificate request, since a resumed handshake carries none), reports
       issued tickets (``on_ticket_issued``), and with ``accept_early_data=False``
       never installs the 0-RTT read key, so EncryptedExtensions omits
       ``early_data`` and the client learns of the rejection.
    3. ``_payload_received`` (server): an Initial without a CRYPTO frame (a
       client's probe after its ClientHello was lost, RFC 9002 6.2.4) is kept,
       where aioquic closes with PROTOCOL_VIOLATION (found by the interop runner
       against qh3 under handshake loss).
    4. ``receive_datagram`` (server): a new peer address raises
       :class:`~quicmesh.transport.quic.engine.PeerAddressChanged`.
    5. ``_handle_path_response_frame`` / ``_abandon_path_validation``: path
       validation results raise :class:`~quicmesh.transport.quic.engine.PathValidated`
       / :class:`~quicmesh.transport.quic.engine.PathAbandoned` (aioquic reports
       neither).
    6. ``datagrams_to_send``: (a) while the handshake is incomplete, a probe
       re-schedules the Initial/Handshake ACK frames (aioquic writes them once; if
       that ACK is lost the peer resends what we have, seen against ngtcp2 at 30 %
       loss); (b) with an :class:`ActiveStreamScheduler` attached, aioquic's
       writer sees only streams with something to send (``_streams`` /
       ``_streams_queue`` swapped for a view; BBR's
       ``has_pending_stream_data`` relies on that view).
    7. ``_write_stream_limits`` / ``_write_connection_limits``: with a
       :class:`ReadDrivenFlowControl` attached, tracked streams' windows follow
       the read path; aioquic's own doubling on arrival is hidden
       (``highest_offset`` and ``_local_max_data.used`` zeroed for the call).
    8. ``_on_max_stream_data_delivery``: the stream goes back to the scheduler.
    9. ``_replenish_connection_ids`` (server): new connection IDs get derived
       reset tokens too.
    10. ``get_timer`` (server, with :meth:`attach_stream_rate`): the credit for
        new peer streams that aioquic returns as streams end is granted through
        the identity's token bucket (:class:`RateLimitedStreamCredit`); the
        timer also fires when held-back credit can next be granted.

    The private aioquic names these rely on are listed, with signatures, in
    ``tests/test_aioquic_canary.py``.
    """

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
        session_ticket_handler: tls.SessionTicketHandler | None = None,
        max_streams: int | None = None,
        stateless_reset_key: bytes | None = None,
        request_client_certificate: bool = False,
        fetch_ticket: Callable[[bytes], tls.SessionTicket | None] | None = None,
        on_ticket_issued: Callable[[tls.SessionTicket], None] | None = None,
        accept_early_data: bool = True,
    ) -> None:
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
            session_ticket_handler=session_ticket_handler,
        )
        self._loss = MeshPacketRecovery(
            congestion_control_algorithm=configuration.congestion_control_algorithm,
            initial_rtt=configuration.initial_rtt,
            max_datagram_size=self._max_datagram_size,
            peer_completed_address_validation=not self._is_client,
            quic_logger=self._quic_logger,
            send_probe=self._send_probe,
            logger=self._logger,
        )
        self.flow_control: ReadDrivenFlowControl | None = None
        self.scheduler: ActiveStreamScheduler | None = None
        self._request_client_certificate = request_client_certificate
        self._fetch_ticket = fetch_ticket
        self._on_ticket_issued = on_ticket_issued
        self._accept_early_data = accept_early_data
        self._reset_key = stateless_reset_key
        self._last_peer_addr: Any = None
        if max_streams is not None:
            limit = self._local_max_streams_bidi
            limit.value = limit.sent = max_streams
        if stateless_reset_key is not None:
            for connection_id in self._host_cids:
                connection_id.stateless_reset_token = stateless_reset_token(
                    stateless_reset_key, connection_id.cid
                )
        if configuration.congestion_control_algorithm == "bbr":
            from .congestion.adaptor import enable_model_pacing

            enable_model_pacing(self)
        self.closed_by_us = False
        """Whether this side closed the connection (our verdict on a handshake, our
        application's close), not the peer (its CONNECTION_CLOSE)."""
        self._logger = _QuietProtocolErrors(self._logger.logger, self._logger.extra)

    def close(
        self,
        error_code: int = QuicErrorCode.NO_ERROR,
        frame_type: int | None = None,
        reason_phrase: str = "",
    ) -> None:
        # aioquic closes through here on its own errors too (a TLS alert it raised on
        # the peer's certificate); the peer's CONNECTION_CLOSE takes another way.
        if self._close_event is None and self._state not in END_STATES:
            self.closed_by_us = True
        super().close(error_code=error_code, frame_type=frame_type, reason_phrase=reason_phrase)

    # -- attachments -------------------------------------------------------------

    def attach_flow_control(self, flow_control: ReadDrivenFlowControl) -> None:
        """Let ``flow_control`` drive the receive windows of the streams it tracks."""
        self.flow_control = flow_control

    def attach_scheduler(self, scheduler: ActiveStreamScheduler) -> None:
        """Let ``scheduler`` choose which streams the packet writer sees."""
        self.scheduler = scheduler

    def attach_stream_rate(self, bucket: StreamRate) -> None:
        """(server) Grant the peer new-stream credit at ``bucket``'s rate (step 10)."""
        limit = self._local_max_streams_bidi
        if isinstance(limit, RateLimitedStreamCredit):
            limit.bucket = bucket
        else:
            self._local_max_streams_bidi = RateLimitedStreamCredit(limit, bucket)

    # -- 2. TLS --------------------------------------------------------------------

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if self._is_client:
            return
        context = self.tls
        context._request_client_certificate = self._request_client_certificate
        if self._on_ticket_issued is not None:
            context.new_session_ticket_cb = self._on_ticket_issued
        if not self._accept_early_data:
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
        fetch = self._fetch_ticket
        if fetch is not None:

            def fetch_and_skip_certificate(label: bytes) -> tls.SessionTicket | None:
                ticket = fetch(label)
                if ticket is not None:
                    context._request_client_certificate = False
                return ticket

            context.get_session_ticket_cb = fetch_and_skip_certificate

    # -- 3. an Initial without CRYPTO ------------------------------------------------

    def _payload_received(
        self, context: Any, plain: bytes, crypto_frame_required: bool = False
    ) -> tuple[bool, bool]:
        if not self._is_client:
            crypto_frame_required = False
        return super()._payload_received(context, plain, crypto_frame_required)

    # -- 4, 5. paths -----------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        super().receive_datagram(data, addr, now)
        if not self._is_client and self._network_paths:
            current = self._network_paths[0].addr
            if self._last_peer_addr is not None and current != self._last_peer_addr:
                self._events.append(cast(Any, engine_events.PeerAddressChanged(current)))
            self._last_peer_addr = current

    def _handle_path_response_frame(self, context: Any, frame_type: int, buf: Buffer) -> None:
        before = {id(path): path.is_validated for path in self._network_paths}
        super()._handle_path_response_frame(context, frame_type, buf)
        for path in self._network_paths:
            if path.is_validated and not before.get(id(path), True):
                self._events.append(cast(Any, engine_events.PathValidated(path.addr)))

    def _abandon_path_validation(self) -> None:
        addr = self._network_paths[0].addr if self._network_paths else None
        super()._abandon_path_validation()
        if self._network_paths:
            self._last_peer_addr = self._network_paths[0].addr
        self._events.append(cast(Any, engine_events.PathAbandoned(addr)))

    # -- 6. sending ------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        if self._probe_pending and not self._handshake_complete:
            for epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE):
                space = self._spaces.get(epoch)
                if (
                    space is not None
                    and len(space.ack_queue) > 0
                    and space.ack_at is None
                    and self._cryptos[epoch].send.is_valid()
                ):
                    space.ack_at = now
        if self.scheduler is None:
            return super().datagrams_to_send(now)
        send = super().datagrams_to_send
        return self.scheduler.send(self, lambda: send(now))

    # -- 7, 8. flow control and the scheduler ------------------------------------------

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        flow = self.flow_control
        credit = flow.credit(stream.stream_id) if flow is not None else None
        if flow is None or credit is None:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
            return
        flow.raise_stream_window(stream, credit)
        # aioquic doubles the window when half of it has *arrived*; hide the
        # arrivals from that check so only the line above moves the window.
        highest = stream.receiver.highest_offset
        stream.receiver.highest_offset = 0
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            stream.receiver.highest_offset = highest

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        streams = self._local_max_streams_bidi
        if isinstance(streams, RateLimitedStreamCredit):
            streams.grant(time.monotonic())
        flow = self.flow_control
        if flow is None:
            super()._write_connection_limits(builder=builder, space=space)
            return
        max_data = self._local_max_data
        target = flow.connection_target(max_data.used)
        if target - max_data.value >= flow.connection_window // 4:
            max_data.value = target
        used = max_data.used
        max_data.used = 0
        try:
            super()._write_connection_limits(builder=builder, space=space)
        finally:
            max_data.used = used

    def _on_max_stream_data_delivery(self, delivery: Any, stream: Any) -> None:
        super()._on_max_stream_data_delivery(delivery, stream)
        if self.scheduler is not None:
            self.scheduler.requeue(stream)

    # -- 9. stateless reset tokens -------------------------------------------------------

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        key = self._reset_key
        if key is not None:
            for connection_id in self._host_cids:
                if not connection_id.was_sent:
                    connection_id.stateless_reset_token = stateless_reset_token(
                        key, connection_id.cid
                    )

    # -- 10. stream credit at a rate ------------------------------------------------------

    def get_timer(self) -> float | None:
        at = super().get_timer()
        limit = self._local_max_streams_bidi
        if isinstance(limit, RateLimitedStreamCredit):
            grant = limit.next_grant_at(time.monotonic())
            if grant is not None and (at is None or grant < at):
                return grant
        return at

    # -- counts ----------------------------------------------------------------------------

    @property
    def packets_lost(self) -> int:
        """Packets the loss detector declared lost so far."""
        return cast(MeshPacketRecovery, self._loss).packets_lost

    @property
    def zero_rtt_packets_sent(self) -> int:
        """Packets sent as 0-RTT so far."""
        return cast(MeshPacketRecovery, self._loss).zero_rtt_packets_sent

    # -- the engine interface (quicmesh.transport.quic.engine.DatagramConnection) --------

    @property
    def is_client(self) -> bool:
        """Whether this is the client side."""
        return bool(self._is_client)

    @property
    def log_id(self) -> str:
        """Our first connection ID, in hex, for logs."""
        return self.host_cid.hex()

    def track_stream(self, stream_id: int) -> None:
        """See :meth:`ReadDrivenFlowControl.track`."""
        if self.flow_control is not None:
            self.flow_control.track(stream_id)

    def stream_delivered(self, stream_id: int, stream_bytes: int, payload_bytes: int) -> None:
        """See :meth:`ReadDrivenFlowControl.delivered`."""
        if self.flow_control is not None:
            self.flow_control.delivered(stream_id, stream_bytes, payload_bytes)

    def stream_consumed(self, stream_id: int, payload_bytes: int) -> bool:
        """See :meth:`ReadDrivenFlowControl.consumed`."""
        if self.flow_control is None:
            return False
        return self.flow_control.consumed(stream_id, payload_bytes)

    def forget_stream(self, stream_id: int) -> None:
        """See :meth:`ReadDrivenFlowControl.forget`."""
        if self.flow_control is not None:
            self.flow_control.forget(stream_id)

    def stream_unsent_bytes(self, stream_id: int) -> int:
        """See :func:`unsent_bytes`."""
        return unsent_bytes(self, stream_id)

    def stream_is_open(self, stream_id: int) -> bool:
        """See :func:`stream_is_open`."""
        return stream_is_open(self, stream_id)

    def can_open_bidi_stream(self) -> bool:
        """See :func:`can_open_bidi_stream`."""
        return can_open_bidi_stream(self)

    def peer_certificate(self) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
        """See :func:`peer_certificate` (nothing before the TLS context exists)."""
        if self.tls is None:
            return None, []
        return peer_certificate(self)

    def resend_early_data(self, now: float) -> int:
        """See :func:`reschedule_early_data`."""
        return reschedule_early_data(self, now)

    def closing_reason(self) -> str | None:
        """See :func:`closing_reason`."""
        return closing_reason(self)

    def closing_error_code(self) -> int | None:
        """The error code of the close :meth:`closing_reason` describes (None: open)."""
        event = self._close_event
        return None if event is None else int(event.error_code)

    def is_draining(self) -> bool:
        """See :func:`is_draining`."""
        return is_draining(self)

    def probe_timeouts(self) -> int:
        """See :func:`pto_count`."""
        return pto_count(self)

    def awaiting_ack(self) -> bool:
        """See :func:`awaiting_ack`."""
        return awaiting_ack(self)

    def active_path(self) -> tuple[Any, bool] | None:
        """See :func:`active_path`."""
        return active_path(self)

    def spare_connection_ids(self) -> int:
        """See :func:`spare_connection_ids`."""
        return spare_connection_ids(self)

    def is_stateless_reset(self, data: bytes) -> bool:
        """See :func:`is_stateless_reset`."""
        return is_stateless_reset(self, data)

    def terminate_after_stateless_reset(self) -> None:
        """See :func:`terminate_after_stateless_reset`."""
        terminate_after_stateless_reset(self)

    def received_valid_packet(self) -> bool:
        """See :func:`received_valid_packet`."""
        return received_valid_packet(self)

    def ticket_received(self, ticket: tls.SessionTicket) -> None:
        """(client) Queue a ``SessionTicketReceived`` event for a NewSessionTicket."""
        self._events.append(cast(Any, engine_events.SessionTicketReceived(ticket)))

    def pending_issued_connection_ids(self) -> list[bytes]:
        """See :func:`pending_issued_connection_ids`."""
        return pending_issued_connection_ids(self)

    def stats(self) -> dict[str, Any]:
        """:func:`connection_stats` plus the packet counts."""
        result = connection_stats(self)
        result.update(
            packets_lost=self.packets_lost, zero_rtt_packets_sent=self.zero_rtt_packets_sent
        )
        return result
