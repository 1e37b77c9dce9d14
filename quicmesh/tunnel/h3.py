"""CONNECT tunnels over HTTP/3 (RFC 9114 section 4.4), sans-IO.

:class:`H3TunnelSession` sits on an aioquic :class:`QuicConnection` the way
aioquic's own :class:`H3Connection` does: feed it QUIC events, act on the
tunnel events it returns, and send what ``quic.datagrams_to_send()`` yields.
Each flow is one request stream: HEADERS ``:method CONNECT``,
``:authority host:port`` and extra headers; the answer ``:status 200`` (or an
error status with a ``proxy-status`` reason); then DATA frames both ways. FIN is
half-close; an abort resets the stream with H3_REQUEST_CANCELLED or
H3_CONNECT_ERROR.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from aioquic.h3 import events as h3_events
from aioquic.h3.connection import ErrorCode as H3ErrorCode
from aioquic.h3.exceptions import H3Error
from aioquic.quic import events as quic_events
from aioquic.quic.connection import QuicConnection

from .. import _aioquic
from ..errors import TunnelUsageError, peer_text
from . import events
from .connect import (
    MAX_FIELD_SECTION_SIZE,
    Target,
    connect_request_fields,
    parse_connect_request,
    read_connect_response,
    response_fields,
)
from .session import ResetReason, TunnelSession

if TYPE_CHECKING:
    from ..transport.quic.engine import EngineConnection

MAX_HEADER_STREAM_BYTES = 64 * 1024
"""Bytes a request stream may carry before its HEADERS frame is complete."""

MAX_HEADER_CONNECTION_BYTES = 256 * 1024
"""Bytes all of a connection's request streams may hold together before their HEADERS
frames are complete: without it a peer pins ``MAX_HEADER_STREAM_BYTES`` on each of its
streams (8 MiB a connection at 128 streams), counted by no buffer limit."""

_HEADER_BYTES_UNCHECKED = 4096
"""A stream's unfinished header bytes up to which the connection's total is not summed
(a CONNECT as quicmesh sends one is a few hundred bytes)."""

MAX_CLIENT_STREAM_ID = 2**62 - 4
"""The largest client request stream ID: a server's GOAWAY naming it is a shutdown
notice (RFC 9114 5.2)."""

DEFAULT_STREAM_WINDOW = 1024 * 1024
DEFAULT_CONNECTION_WINDOW = 16 * 1024 * 1024

_RESET_CODES = {
    ResetReason.CANCELLED: H3ErrorCode.H3_REQUEST_CANCELLED,
    ResetReason.CONNECT_ERROR: H3ErrorCode.H3_CONNECT_ERROR,
}


def _is_request_stream(stream_id: int) -> bool:
    return stream_id % 4 == 0


class _Stream:
    """What the session keeps about one request stream (aioquic keeps the rest).

    One record per stream, dropped in one place when aioquic discards the stream
    (:meth:`H3TunnelSession._on_discarded`) or the connection ends.
    """

    __slots__ = ("aborted", "headers_done", "refused", "sending_ended", "stopped_reading")

    def __init__(self) -> None:
        self.headers_done = False
        """The request's (or response's) HEADERS were read: DATA is the flow's bytes."""
        self.stopped_reading = False
        """We sent STOP_SENDING H3_NO_ERROR: the peer's answering reset is expected."""
        self.refused = False
        """Refused undecoded (header section too large): whatever still comes is dropped."""
        self.aborted = False
        """Reset, by us or the peer, and reported: nothing more is reported for it."""
        self.sending_ended = False
        """(server) The peer's STOP_SENDING ended our side before our answer went out:
        whatever is written is dropped (as after the peer stops reading)."""


class EngineFlowControl:
    """Read-driven credit for a socket engine: the engine keeps the windows.

    The same calls as :class:`~quicmesh._aioquic.ReadDrivenFlowControl`, passed
    on to the engine connection's ``track_stream``, ``stream_delivered``,
    ``stream_consumed`` and ``forget_stream``
    (:class:`~quicmesh.transport.quic.engine.EngineConnection`); the
    session's own count of delivered stream bytes (header-size limit) is kept here.
    """

    def __init__(self, quic: EngineConnection) -> None:
        self._quic = quic
        self._delivered: dict[int, int] = {}

    def track(self, stream_id: int) -> None:
        if stream_id not in self._delivered:
            self._delivered[stream_id] = 0
            self._quic.track_stream(stream_id)

    def delivered(self, stream_id: int, stream_bytes: int, payload_bytes: int) -> None:
        if stream_id in self._delivered:
            self._delivered[stream_id] += stream_bytes
            self._quic.stream_delivered(stream_id, stream_bytes, payload_bytes)

    def consumed(self, stream_id: int, payload_bytes: int) -> bool:
        return stream_id in self._delivered and self._quic.stream_consumed(stream_id, payload_bytes)

    def forget(self, stream_id: int) -> None:
        if self._delivered.pop(stream_id, None) is not None:
            self._quic.forget_stream(stream_id)

    def delivered_bytes(self, stream_id: int) -> int:
        return self._delivered.get(stream_id, 0)


class _EngineScheduler:
    """A socket engine schedules its streams itself: nothing to activate."""

    def activate(self, stream_id: int) -> None:
        """Nothing (the engine saw the command)."""


class H3TunnelSession(TunnelSession):
    """CONNECT tunnels over one HTTP/3 connection.

    :param quic: the QUIC connection, not yet connected (client) or not yet
        initialised (server): aioquic's (a datagram engine's
        :class:`~quicmesh._aioquic.MeshQuicConnection`, whose flow control and
        stream scheduling the session installs) or a socket engine's
        connection (:mod:`quicmesh.transport.quic.engine`), which does both itself.
    :param stream_window: receive window per stream, raised as the application reads.
    :param connection_window: receive window of the whole connection.
    :param max_field_section_size: decoded size of a header section (names, values
        and 32 bytes per field) above which a stream is refused before its header
        block is decoded: a 431 answer to a request, a reset of a response.
    """

    def __init__(
        self,
        quic: QuicConnection | EngineConnection,
        *,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        max_field_section_size: int = MAX_FIELD_SECTION_SIZE,
    ) -> None:
        self.quic: Any = quic
        self.max_field_section_size = max_field_section_size
        self.sections_refused = 0
        """Header sections refused, undecoded: for their decoded size, or for the bytes
        the connection's unfinished ones would hold."""
        self._aioquic = isinstance(quic, QuicConnection)
        self.flow_control: _aioquic.ReadDrivenFlowControl | EngineFlowControl
        self.scheduler: _aioquic.ActiveStreamScheduler | _EngineScheduler
        if isinstance(quic, QuicConnection):
            self.is_client = quic.configuration.is_client
            self.flow_control = _aioquic.ReadDrivenFlowControl(
                quic, stream_window, connection_window
            )
            self.scheduler = _aioquic.ActiveStreamScheduler(quic, on_discard=self._on_discarded)
        else:
            self.is_client = quic.is_client
            self.flow_control = EngineFlowControl(quic)
            self.scheduler = _EngineScheduler()
            if hasattr(quic, "on_forget"):
                quic.on_forget = self._on_discarded
        self._h3: _aioquic.MeshH3Connection | None = None
        self._streams: dict[int, _Stream] = {}

    def _stream(self, stream_id: int) -> _Stream:
        record = self._streams.get(stream_id)
        if record is None:
            record = self._streams[stream_id] = _Stream()
        return record

    def _forgotten(self, stream_id: int) -> bool:
        """Whether the stream finished and was forgotten (:meth:`_on_discarded`): a late
        call must not bring its record back."""
        return stream_id not in self._streams and not self._stream_is_open(stream_id)

    def _on_discarded(self, stream_id: int) -> None:
        """The QUIC layer dropped the finished stream (aioquic's scheduler, or a socket
        engine's ``on_forget``): drop what the session and the HTTP/3 layer kept
        about it."""
        self.flow_control.forget(stream_id)
        self._streams.pop(stream_id, None)
        if self._h3 is not None and _is_request_stream(stream_id):
            self._h3.forget_stream(stream_id)

    @property
    def h3(self) -> _aioquic.MeshH3Connection:
        """The HTTP/3 layer, created once the QUIC handshake has started."""
        if self._h3 is None:
            self._h3 = _aioquic.MeshH3Connection(self.quic, self.max_field_section_size)
        return self._h3

    # -- input -----------------------------------------------------------------

    def handle_quic_event(self, event: quic_events.QuicEvent) -> list[events.TunnelEvent]:
        """Process one QUIC event and return the tunnel events it caused."""
        if isinstance(event, quic_events.ConnectionTerminated):
            self._streams.clear()
            return [events.ConnectionTerminated(event.error_code, event.reason_phrase)]
        if isinstance(event, quic_events.ProtocolNegotiated | quic_events.HandshakeCompleted):
            self.h3  # noqa: B018 - creates the control streams as early as possible
            return []
        if isinstance(event, quic_events.StreamDataReceived):
            if event.end_stream:
                self.scheduler.activate(event.stream_id)
            return self._on_stream_data(event)
        if isinstance(event, quic_events.StreamReset | quic_events.StopSendingReceived):
            result = self._on_reset(event)
            self.scheduler.activate(event.stream_id)
            return result
        return []

    def is_new_request_stream(self, stream_id: int) -> bool:
        """Whether nothing of request stream ``stream_id`` reached this session yet."""
        return stream_id not in self._streams and stream_id not in self.h3._stream

    def _on_stream_data(self, event: quic_events.StreamDataReceived) -> list[events.TunnelEvent]:
        stream_id = event.stream_id
        if not _is_request_stream(stream_id):
            return self._to_tunnel_events(self.h3.handle_event(event))
        record = self._stream(stream_id)
        if record.refused or record.aborted:
            return []  # in flight before the peer saw our reset
        self.flow_control.track(stream_id)
        if not record.headers_done:
            pending = self.flow_control.delivered_bytes(stream_id) + len(event.data)
            if pending > MAX_HEADER_STREAM_BYTES:
                return self._reject_oversized(stream_id)
            if pending > _HEADER_BYTES_UNCHECKED:
                held = pending + self._unfinished_header_bytes(but=stream_id)
                if held > MAX_HEADER_CONNECTION_BYTES:
                    self.sections_refused += 1
                    return self._reject_oversized(
                        stream_id,
                        f"unfinished request headers hold {held} bytes on the connection "
                        f"(at most {MAX_HEADER_CONNECTION_BYTES})",
                    )
        try:
            h3_events_ = self.h3.handle_event(event)
        except _aioquic.FieldSectionTooLarge as exc:
            # Refused before decoding: nothing of the block was expanded.
            self.sections_refused += 1
            record.refused = True
            self.h3.abandon_stream(stream_id)
            return self._reject_oversized(stream_id, str(exc))
        result = self._to_tunnel_events(h3_events_)
        payload = sum(len(e.data) for e in result if isinstance(e, events.DataReceived))
        self.flow_control.delivered(stream_id, len(event.data), payload)
        return result

    def _unfinished_header_bytes(self, *, but: int) -> int:
        """Bytes the connection's other request streams delivered before their HEADERS
        frames were complete (all of them header bytes, held by the HTTP/3 layer)."""
        delivered = self.flow_control.delivered_bytes
        return sum(
            delivered(other)
            for other, record in self._streams.items()
            if other != but and not (record.headers_done or record.aborted or record.refused)
        )

    def _reject_oversized(self, stream_id: int, why: str = "") -> list[events.TunnelEvent]:
        """Refuse a header section over the limits, undecoded. A request is answered 431
        (then STOP_SENDING with H3_NO_ERROR: the rest of it is not wanted, RFC 9114 4.1.1),
        not reset with H3_REQUEST_REJECTED, which tells the peer it may send the same
        request again elsewhere; a response is reset."""
        self.flow_control.forget(stream_id)
        self._stream(stream_id).aborted = True
        if self.is_client:
            code = H3ErrorCode.H3_EXCESSIVE_LOAD
            self._abort_stream(stream_id, code)
            reason = f"refused the peer's answer: {why or 'header section too large'}"
            return [events.StreamReset(stream_id, code, reason=reason)]
        reason = why or "request header section too large"
        if self._stream_is_open(stream_id):
            # Static table only: valid whatever the peer's request left undecoded. (Each
            # may be refused: the peer's STOP_SENDING may have ended our side already.)
            with contextlib.suppress(ValueError, RuntimeError, AssertionError):
                self.quic.send_stream_data(
                    stream_id, _aioquic.connect_response_frame(431, reason), end_stream=True
                )
            with contextlib.suppress(ValueError, RuntimeError, AssertionError):
                self.quic.stop_stream(stream_id, H3ErrorCode.H3_NO_ERROR)
            self.scheduler.activate(stream_id)
        return [events.RequestRejected(stream_id, 431, reason)]

    def _on_reset(
        self, event: quic_events.StreamReset | quic_events.StopSendingReceived
    ) -> list[events.TunnelEvent]:
        stream_id = event.stream_id
        self.h3.handle_event(event)
        if not _is_request_stream(stream_id):
            return []
        record = self._stream(stream_id)
        if record.aborted:
            return []  # reported once: a reset and a STOP_SENDING both arrive
        if (
            isinstance(event, quic_events.StopSendingReceived)
            and event.error_code == H3ErrorCode.H3_NO_ERROR
        ):
            # RFC 9114 4.1.1: the peer wants no more request bytes but still sends its own.
            return [events.PeerStoppedReading(stream_id)]
        if isinstance(event, quic_events.StreamReset) and record.stopped_reading:
            # The peer's answer to our STOP_SENDING (RFC 9000 3.5): its direction is
            # over, which we asked for; ours carries on.
            return []
        self.flow_control.forget(stream_id)
        record.aborted = True
        # A reset, or a request to stop sending, aborts the whole flow.
        self._abort_stream(stream_id, event.error_code)
        return [
            events.StreamReset(
                stream_id,
                event.error_code,
                connect_error=event.error_code == H3ErrorCode.H3_CONNECT_ERROR,
            )
        ]

    def _to_tunnel_events(self, h3_evs: list[h3_events.H3Event]) -> list[events.TunnelEvent]:
        result: list[events.TunnelEvent] = []
        for ev in h3_evs:
            if isinstance(ev, h3_events.HeadersReceived):
                result.extend(self._on_headers(ev))
            elif isinstance(ev, h3_events.DataReceived):
                if self._delivers(ev.stream_id):
                    result.append(events.DataReceived(ev.stream_id, ev.data, ev.stream_ended))
                elif ev.stream_ended and self.is_client:
                    result.extend(
                        self._answer_failed(
                            ev.stream_id, "the peer ended the stream before its answer"
                        )
                    )
            elif isinstance(ev, _aioquic.GoawayReceived):
                if self.is_client:
                    notice = ev.stream_id >= MAX_CLIENT_STREAM_ID
                    result.append(events.PeerGoingAway(ev.stream_id, notice=notice))
            elif isinstance(ev, _aioquic.MessageRejected):
                # (The HTTP/3 layer reset it both ways already.)
                said = peer_text(ev.reason)
                record = self._streams.get(ev.stream_id)
                if record is not None and record.headers_done and not record.aborted:
                    result.extend(self._trailers_failed(ev.stream_id, said))
                    continue
                reason = f"the peer's answer is malformed: {said}" if self.is_client else said
                result.extend(self._answer_failed(ev.stream_id, reason, reset=False))
        return result

    def _answer_failed(
        self, stream_id: int, reason: str, *, reset: bool = True
    ) -> list[events.TunnelEvent]:
        """The peer's answer (client) or request (server) on ``stream_id`` is unusable:
        the stream is reset both ways with H3_MESSAGE_ERROR (RFC 9114 4.1.2), and its
        opener told ``reason`` (client), or the handler's hook (server: a 400 refusal)."""
        record = self._streams.get(stream_id)
        if record is None or record.headers_done or record.aborted:
            return []
        self._end_malformed(stream_id, record, reset)
        if not self.is_client:
            # A refused request, for the handler's hook and the access log.
            return [events.RequestRejected(stream_id, 400, f"malformed request (reset): {reason}")]
        return [events.StreamReset(stream_id, H3ErrorCode.H3_MESSAGE_ERROR, reason=reason)]

    def _trailers_failed(self, stream_id: int, said: str) -> list[events.TunnelEvent]:
        """Malformed trailers on a flow under way (its request or answer was taken): the
        HTTP/3 layer reset the stream both ways; the flow ends with that reason."""
        self._end_malformed(stream_id, self._streams[stream_id], reset=False)
        reason = f"the peer's trailers are malformed: {said}"
        return [events.StreamReset(stream_id, H3ErrorCode.H3_MESSAGE_ERROR, reason=reason)]

    def _end_malformed(self, stream_id: int, record: _Stream, reset: bool) -> None:
        """A stream ends for a malformed message: reported once, its credit released,
        reset both ways with H3_MESSAGE_ERROR here (``reset``) or by the HTTP/3 layer
        already (its reset and STOP_SENDING go out now)."""
        record.aborted = True
        self.flow_control.forget(stream_id)
        if reset:
            self._abort_stream(stream_id, H3ErrorCode.H3_MESSAGE_ERROR)
        else:
            self.scheduler.activate(stream_id)

    def _on_headers(self, ev: h3_events.HeadersReceived) -> list[events.TunnelEvent]:
        stream_id = ev.stream_id
        record = self._stream(stream_id)
        if record.headers_done:
            # Trailers end the stream; a tunnel carries none, so they only mark FIN.
            return [events.DataReceived(stream_id, b"", True)] if ev.stream_ended else []
        if not self.is_client:
            record.headers_done = True
            try:
                request = parse_connect_request(ev.headers)
            except TunnelUsageError as exc:
                return self._reject(stream_id, 400, str(exc))
            result: list[events.TunnelEvent] = [
                events.StreamRequested(stream_id, request.target, request.headers)
            ]
        else:
            answer = read_connect_response(ev.headers)
            if answer is None:
                return []
            record.headers_done = True
            result = [events.ResponseReceived(stream_id, *answer)]
        if ev.stream_ended:
            result.append(events.DataReceived(stream_id, b"", True))
        return result

    def _delivers(self, stream_id: int) -> bool:
        record = self._streams.get(stream_id)
        return record is not None and record.headers_done and not record.aborted

    def _reject(self, stream_id: int, status: int, reason: str) -> list[events.TunnelEvent]:
        self.respond(stream_id, status, reason)
        return [events.RequestRejected(stream_id, status, reason)]

    # -- TunnelSession ---------------------------------------------------------

    def can_open_stream(self) -> bool:
        if self._h3 is not None and self._h3.goaway_received is not None:
            return False  # the peer processes no new request (RFC 9114 5.2)
        if not self._aioquic:
            return bool(self.quic.can_open_bidi_stream())
        return _aioquic.can_open_bidi_stream(self.quic)

    def open_stream(self, target: Target, headers: dict[str, str]) -> int:
        stream_id: int = self.quic.get_next_available_stream_id()
        self.flow_control.track(stream_id)
        self.h3.send_headers(stream_id, connect_request_fields(target, headers))
        self.scheduler.activate(stream_id)
        return stream_id

    def respond(self, stream_id: int, status: int, reason: str = "") -> None:
        record = self._streams.get(stream_id)
        if (record is not None and record.aborted) or not _aioquic.stream_is_open(
            self.quic, stream_id
        ):
            # The peer reset the stream before it was answered (rapid reset): the
            # answer is dropped, as data written after a reset is.
            return
        try:
            self.h3.send_headers(
                stream_id, response_fields(status, reason), end_stream=status != 200
            )
        except (H3Error, ValueError, AssertionError):
            return
        except RuntimeError:
            # aioquic's, for a side the peer's STOP_SENDING ended before the answer: it
            # cannot go out (nor can what is written after it), but a refusal still
            # stops reading the peer's request.
            self._stream(stream_id).sending_ended = True
            if status == 200:
                return
        self.scheduler.activate(stream_id)
        if status != 200:
            self.stop_reading(stream_id)
            self.flow_control.forget(stream_id)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        record = self._streams.get(stream_id)
        if (record is not None and (record.aborted or record.sending_ended)) or (
            not self._stream_is_open(stream_id)
        ):
            return  # reset (or reset and gone): nothing more goes out, as over HTTP/2 and 1.1
        try:
            self.h3.send_data(stream_id, data, end_stream)
        except RuntimeError:
            return  # (aioquic: our side ended by the peer's STOP_SENDING: dropped, as above)
        self.scheduler.activate(stream_id)

    def reset_stream(self, stream_id: int, reason: ResetReason) -> None:
        self.flow_control.forget(stream_id)
        if self._forgotten(stream_id):
            return
        self._stream(stream_id).aborted = True
        self._abort_stream(stream_id, _RESET_CODES[reason])

    def stop_reading(self, stream_id: int) -> None:
        self.flow_control.forget(stream_id)
        if self._forgotten(stream_id):
            return
        self._stream(stream_id).stopped_reading = True
        if self._stream_is_open(stream_id):
            with contextlib.suppress(ValueError):
                self.quic.stop_stream(stream_id, H3ErrorCode.H3_NO_ERROR)
            self.scheduler.activate(stream_id)

    def data_consumed(self, stream_id: int, amount: int) -> bool:
        if not self.flow_control.consumed(stream_id, amount):
            return False
        self.scheduler.activate(stream_id)
        return True

    def unsent_bytes(self, stream_id: int) -> int:
        if not self._aioquic:
            return int(self.quic.stream_unsent_bytes(stream_id))
        return _aioquic.unsent_bytes(self.quic, stream_id)

    def is_idle(self) -> bool:
        if not self._aioquic:
            return not self.quic.has_request_streams()
        return not _aioquic.has_request_streams(self.quic)

    def hand_over(self, stream_id: int) -> tuple[int | None, int, bytes]:
        """(splicing) Stop handling a request stream's input, which the engine parses
        from now on: returns the HTTP/3 parser's state for it (see
        :meth:`~quicmesh._aioquic.MeshH3Connection.hand_over_stream`)."""
        self.flow_control.forget(stream_id)
        self._streams.pop(stream_id, None)
        return self.h3.hand_over_stream(stream_id)

    def _stream_is_open(self, stream_id: int) -> bool:
        if not self._aioquic:
            return bool(self.quic.stream_is_open(stream_id))
        return _aioquic.stream_is_open(self.quic, stream_id)

    def close(self, reason: str = "") -> None:
        self.quic.close(error_code=H3ErrorCode.H3_NO_ERROR, reason_phrase=reason)

    def go_away(self, first_unprocessed: int) -> None:
        """(server) Send GOAWAY naming ``first_unprocessed``, the first request stream the
        peer has not used (RFC 9114 5.2); the caller refuses the later ones
        (:meth:`refuse_unprocessed`)."""
        self.h3.send_goaway(first_unprocessed)

    def refuse_unprocessed(self, stream_id: int) -> None:
        """(server) Refuse a request stream at or above our GOAWAY's ID, unread, with
        H3_REQUEST_REJECTED both ways (RFC 9114 4.1.1: safe for the peer to retry
        elsewhere). Once per stream; its later input is dropped."""
        record = self._stream(stream_id)
        if record.aborted:
            return
        record.aborted = True
        self.flow_control.forget(stream_id)
        self._abort_stream(stream_id, H3ErrorCode.H3_REQUEST_REJECTED)

    def _abort_stream(self, stream_id: int, code: int) -> None:
        if not self._stream_is_open(stream_id):
            return
        for action in (self.quic.reset_stream, self.quic.stop_stream):
            with contextlib.suppress(ValueError):
                action(stream_id, code)
        self.scheduler.activate(stream_id)
