"""CONNECT tunnels over HTTP/2 (RFC 9113 section 8.5), sans-IO.

:class:`H2TunnelSession` wraps an h2 :class:`~h2.connection.H2Connection`: feed
it the bytes read from the (TLS) connection with :meth:`~H2TunnelSession.receive_data`,
act on the tunnel events it returns, and write what
:meth:`~H2TunnelSession.data_to_send` gives back. Each flow is one stream:
HEADERS ``:method CONNECT`` and ``:authority host:port`` (no ``:scheme`` or
``:path``) plus extra headers; the answer ``:status 200``, or an error status
with a ``proxy-status`` reason and END_STREAM; then DATA frames both ways.
END_STREAM is half-close; an abort is RST_STREAM CANCEL or CONNECT_ERROR.

Two things h2 leaves to its user are done here:

- **Flow control driven by the reader.** Received bytes are acknowledged to h2
  (and so credited to the peer in WINDOW_UPDATE frames) only when the
  application reports them read with :meth:`~H2TunnelSession.data_consumed`, so
  a reader that stops makes its own peer's writer stop and nothing else.
- **Fair sending.** :meth:`~H2TunnelSession.send_data` only appends to the
  stream's buffer in the session; :meth:`~H2TunnelSession.data_to_send` builds
  DATA frames round robin over the streams that have data, at most
  :data:`SEND_QUANTUM` bytes per stream per turn and within h2's flow-control
  windows, so a stream with a few bytes never waits behind another's megabytes.

- **Frames refused at their header**: a frame longer than SETTINGS_MAX_FRAME_SIZE
  closes the connection with FRAME_SIZE_ERROR as soon as its 9-byte header is in (h2
  checks the length only once it buffered the whole frame), and PING, SETTINGS,
  PRIORITY and empty DATA frames over :data:`IDLE_FRAME_RATE` close it with
  ENHANCE_YOUR_CALM (:class:`_FrameHeaders`).

- **Graceful GOAWAY**: h2 takes any GOAWAY it reads for the connection's end and
  refuses to send anything after it, so the streams a graceful GOAWAY lets finish
  (RFC 9113 6.8) died with their connection. The peer's GOAWAY frames with NO_ERROR
  are taken out before h2 reads them (:class:`_FrameHeaders`, frame headers
  only). A client then takes no new stream on the connection
  (:class:`~quicmesh.tunnel.events.PeerGoingAway`), streams up to the GOAWAY's last
  stream ID carry on, later ones are reset as not processed (REFUSED_STREAM). A
  server reads nothing more in a client's (it names server-initiated streams, which
  we never open): the client's streams carry on until it closes the connection. A
  server sends one the same way, past h2 (:meth:`H2TunnelSession.go_away`).

Header blocks are validated by h2 (RFC 9113 rules: pseudo-header order and set,
lower-case names, no connection-specific fields); a block that breaks them is a
protocol error that closes the connection, as h2 does. A well-formed request
that is not a plain CONNECT, or whose target or extra headers are invalid, is
answered 400 on its stream and reported as :class:`~quicmesh.tunnel.events.RequestRejected`.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from ..errors import TunnelUsageError, peer_text
from ..transport._stream_rate import StreamRate
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

MAX_STREAM_ID = 2**31 - 1
"""The largest HTTP/2 stream ID: a GOAWAY naming it is a shutdown notice (RFC 9113 6.8)."""

DEFAULT_STREAM_WINDOW = 1024 * 1024
"""Receive window per stream (SETTINGS_INITIAL_WINDOW_SIZE)."""

DEFAULT_CONNECTION_WINDOW = 16 * 1024 * 1024
"""Receive window of the whole connection."""

DEFAULT_MAX_STREAMS = 128
"""Concurrent streams the peer may open towards us (SETTINGS_MAX_CONCURRENT_STREAMS)."""

MAX_HEADER_LIST_SIZE = MAX_FIELD_SECTION_SIZE
"""SETTINGS_MAX_HEADER_LIST_SIZE; h2's HPACK decoder refuses larger header blocks."""

SEND_QUANTUM = 16 * 1024
"""Bytes one stream may send per round-robin turn."""

H2_MAX_STREAM_RATE = 10_000.0
"""New streams per second a peer may open on one HTTP/2 connection (after a first burst
of a tenth of a second's worth, at least ``max_streams``), the h2 transport's default:
far above what a legitimate client opens on one connection (the Python h2 hop carries
about 1,500 new flows a second), far below a rapid-reset flood (70,000 a second from one
connection), so only a flood is refused. h2 has no stream credit to hold back as QUIC
does (``max_stream_rate``, 1000 a second per identity): a stream above the rate can
only be refused."""

REFUSAL_BURST = 4
"""Streams refused for the rate that a connection may accumulate, in bursts of the
rate, beyond those the rate forgives, before it is closed."""

MAX_PENDING_OUTPUT = 1024 * 1024
"""Bytes of frames h2 queued for the peer (PING and SETTINGS acknowledgments,
RST_STREAM, WINDOW_UPDATE...) above which the peer is not read until it takes them."""

_INITIAL_CONNECTION_WINDOW = 65535
_RESET_CODES = {
    ResetReason.CANCELLED: ErrorCodes.CANCEL,
    ResetReason.CONNECT_ERROR: ErrorCodes.CONNECT_ERROR,
}


IDLE_FRAME_RATE = 1000.0
"""Frames a second that carry nothing forward (PING, SETTINGS and PRIORITY frames, DATA
frames without payload or END_STREAM) a peer may send on one connection, after a burst
of :data:`IDLE_FRAME_BURST`: far above what a client sends (a PING a second to keep the
connection alive), far below a flood, which costs the loop a frame's parsing each (CPU
exhaustion: CVE-2019-9512, -9513, -9518). Over it the connection is closed with
ENHANCE_YOUR_CALM, as nghttp2 and Envoy close such floods."""

IDLE_FRAME_BURST = 2000

_PREFACE_SIZE = 24
"""A client's connection preface, ``PRI * HTTP/2.0...`` (RFC 9113 3.4)."""
_FRAME_HEADER_SIZE = 9
_DATA, _PRIORITY, _SETTINGS, _PING, _GOAWAY = 0x0, 0x2, 0x4, 0x6, 0x7
_HEADERS, _PUSH_PROMISE, _CONTINUATION = 0x1, 0x5, 0x9
_END_HEADERS = 0x4
_END_STREAM = _ACK = 0x1


class _FrameHeaders:
    """Reads the frame headers of the bytes h2 reads (RFC 9113 4.1): takes the peer's
    graceful GOAWAY frames out, and stops at a frame h2 would buffer whole before
    refusing it, or at a flood of frames that carry nothing forward.

    Every other frame passes through unchanged as its bytes arrive. A GOAWAY on stream
    0, outside a header block, of 8 bytes or more and at most ``max_frame_size``, is
    held whole (at most that many bytes); with NO_ERROR it is kept back and reported,
    with any other code passed on as it came (h2 ends the connection). A malformed one
    goes to h2 as it is, which refuses it as before.

    :attr:`violation` (an error code and a reason, then nothing more is passed): a frame
    longer than ``max_frame_size`` (FRAME_SIZE_ERROR, RFC 9113 4.2: h2 checks the length
    only once the whole frame is in, so a peer announcing 16 MiB frames made it hold
    16 MiB a connection), or idle frames over ``idle_frames`` (ENHANCE_YOUR_CALM, see
    :data:`IDLE_FRAME_RATE`).
    """

    def __init__(
        self,
        *,
        max_frame_size: int,
        preface: bool = False,
        idle_frames: StreamRate | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_frame_size = max_frame_size
        self._idle_frames = idle_frames
        self._clock = clock
        self.violation: tuple[ErrorCodes, str] | None = None
        self._skip = _PREFACE_SIZE if preface else 0
        """Bytes to pass through before the next frame header."""
        self._header = bytearray()
        self._held: bytearray | None = None
        """A GOAWAY being read: its header, then its payload."""
        self._held_left = 0
        self._in_header_block = False

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
        """The bytes for h2, and the last stream ID and debug data of each graceful
        GOAWAY taken out, in order."""
        passed = bytearray()
        found: list[tuple[int, bytes]] = []
        view = memoryview(data)
        while view and self.violation is None:
            if self._skip:
                taken = min(self._skip, len(view))
                passed += view[:taken]
                view = view[taken:]
                self._skip -= taken
            elif self._held is not None:
                taken = min(self._held_left, len(view))
                self._held += view[:taken]
                view = view[taken:]
                self._held_left -= taken
                if not self._held_left:
                    frame, self._held = bytes(self._held), None
                    payload = frame[_FRAME_HEADER_SIZE:]
                    if int.from_bytes(payload[4:8], "big") == ErrorCodes.NO_ERROR:
                        last = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
                        found.append((last, payload[8:]))
                    else:
                        passed += frame
            else:
                taken = _FRAME_HEADER_SIZE - len(self._header)
                self._header += view[:taken]
                view = view[taken:]
                if len(self._header) == _FRAME_HEADER_SIZE:
                    self._on_header(bytes(self._header), passed)
                    self._header.clear()
        return bytes(passed), found

    def _on_header(self, header: bytes, passed: bytearray) -> None:
        length = int.from_bytes(header[:3], "big")
        kind, flags = header[3], header[4]
        stream_id = int.from_bytes(header[5:9], "big") & 0x7FFF_FFFF
        if length > self._max_frame_size:
            self.violation = (
                ErrorCodes.FRAME_SIZE_ERROR,
                f"a frame of {length} bytes, over SETTINGS_MAX_FRAME_SIZE {self._max_frame_size}",
            )
            return
        if (
            self._idle_frames is not None
            and _is_idle_frame(kind, flags, length)
            and not self._idle_frames.take(1, self._clock())
        ):
            self.violation = (
                ErrorCodes.ENHANCE_YOUR_CALM,
                f"more than {IDLE_FRAME_RATE:.0f} PING, SETTINGS, PRIORITY or empty "
                "DATA frames a second",
            )
            return
        if (
            kind == _GOAWAY
            and stream_id == 0
            and not self._in_header_block
            and 8 <= length <= self._max_frame_size
        ):
            self._held = bytearray(header)
            self._held_left = length
            return
        if kind in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
            self._in_header_block = not flags & _END_HEADERS
        passed += header
        self._skip = length


def _is_idle_frame(kind: int, flags: int, length: int) -> bool:
    """A frame that carries nothing forward: a PING or SETTINGS (not an acknowledgment),
    a PRIORITY, a DATA frame with no payload that does not end its stream."""
    if kind in (_PING, _SETTINGS):
        return not flags & _ACK
    if kind == _DATA:
        return length == 0 and not flags & _END_STREAM
    return kind == _PRIORITY


class _Stream:
    """What the session keeps about one stream, in one record dropped in one place
    (:meth:`H2TunnelSession._forget`, or once both directions are over)."""

    __slots__ = (
        "blocked",
        "buffer",
        "discarding",
        "end_stream",
        "input_ended",
        "open",
        "queued",
        "remote_ended",
        "sending",
        "unread",
    )

    def __init__(self, *, open_: bool = False) -> None:
        self.sending = True
        """We may still send: bytes queued, or the END_STREAM still to come."""
        self.buffer = bytearray()
        """Bytes the application queued, not yet framed."""
        self.end_stream = False
        """The application's half-close, sent after the buffer."""
        self.queued = False
        """In the round-robin queue of streams with something to frame."""
        self.blocked = False
        """Out of flow-control window: waits for the peer's WINDOW_UPDATE."""
        self.open = open_
        """CONNECT accepted (200 sent or received): the peer's DATA is the flow's."""
        self.unread = 0
        """Bytes delivered that the application has not read (not yet credited)."""
        self.discarding = False
        """The application stopped reading: the peer's bytes are credited and dropped."""
        self.remote_ended = False
        """The peer sent END_STREAM while we were still sending."""
        self.input_ended = False
        """The peer's END_STREAM arrived."""


CLOSED_STREAMS_KEPT = 4096
"""How many closed streams an HTTP/2 connection remembers the end of (h2 keeps 65,536):
at 10,000 new flows a second, the last 0.4 s of them, longer than a late frame takes."""


class _H2Connection(h2.connection.H2Connection):
    """h2's connection, with a new stream past our SETTINGS_MAX_CONCURRENT_STREAMS
    left for the session to refuse.

    h2 treats a HEADERS frame that opens a stream past the limit as a connection error
    (``TooManyStreamsError``), and raises it before it decodes the frame's field block,
    so every other flow on the connection ended with it (a client that opened streams
    before it saw a lowered limit, or a faulty one). RFC 9113 5.1.2 allows a stream
    error instead, REFUSED_STREAM, which leaves the others alone and tells the client
    the stream was not processed. h2's check is the only reader of
    ``open_inbound_streams`` while a HEADERS frame is received; it is switched off
    there, so the stream opens and its field block is decoded (HPACK state belongs to
    the connection: a block left undecoded would garble every later one); such streams
    are noted in :attr:`past_limit`, for :meth:`H2TunnelSession._on_request` to refuse
    as it takes their request.

    h2 remembers how each closed stream ended (to ignore frames the peer sent before it
    saw our RST_STREAM) for the last 65,536 streams: about 8 MB a connection, on each
    side, once that many flows have passed, for ever on a pooled connection. quicmesh
    keeps the last :data:`CLOSED_STREAMS_KEPT`; a frame on a stream closed before them
    is taken as on a reset stream: answered with RST_STREAM (STREAM_CLOSED) or ignored,
    which ends nothing else (h2 credits the connection window for its DATA either way).
    """

    MAX_CLOSED_STREAMS = CLOSED_STREAMS_KEPT

    def _stream_closed_by(self, stream_id: int) -> Any:
        # A stream older than the ones remembered is taken as reset: a frame on it is a
        # stream error (RST_STREAM STREAM_CLOSED), as for a stream remembered as reset.
        # Else h2 made a late HEADERS on it (our 200 crossing the client's cancel) a
        # connection error, every flow ending with it. (h2 decodes the field block
        # before it looks the stream up: HPACK stays in step.)
        closed_by = super()._stream_closed_by(stream_id)
        closed = self._closed_streams
        forgotten = len(closed) >= self.MAX_CLOSED_STREAMS and stream_id < next(iter(closed))
        if closed_by is None and forgotten:
            return h2.stream.StreamClosedBy.SEND_RST_STREAM
        return closed_by

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.past_limit: set[int] = set()
        """New streams opened past the limit, not yet refused."""
        self._receiving_headers = False

    @property
    def open_inbound_streams(self) -> int:
        count = super().open_inbound_streams
        return 0 if self._receiving_headers else count

    def _receive_headers_frame(self, frame: Any) -> Any:
        if (
            frame.stream_id not in self.streams
            and self.open_inbound_streams >= self.local_settings.max_concurrent_streams
        ):
            self.past_limit.add(frame.stream_id)
        self._receiving_headers = True
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.ProtocolError as exc:
            # A malformed field section (a pseudo-header twice or after a regular one,
            # an upper-case name...): h2 raises it from the stream's validation, after
            # the block was decoded and the stream opened; RFC 9113 8.1.1 makes it a
            # stream error. h2 made it a connection error: every other flow of the
            # connection died with it. A block that did not decode (h2 chains the HPACK
            # error as the cause; on a new stream no stream was opened for it) stays a
            # connection error, also on a stream already open (trailers): HPACK state is
            # the connection's.
            if (
                type(exc) is not h2.exceptions.ProtocolError
                or exc.__cause__ is not None
                or frame.stream_id not in self.streams
            ):
                raise
            self.reset_stream(frame.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return [], [_MalformedFieldSection(frame.stream_id, str(exc))]
        finally:
            self._receiving_headers = False


class _MalformedFieldSection(h2.events.Event):
    """(quicmesh's) A request's or response's field section broke RFC 9113 8.2-8.3; the
    stream was reset with PROTOCOL_ERROR (:class:`_H2Connection`). h2 knows no such
    event: the session tells the stream's opener (client) or the handler's hook (server)."""

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


class H2TunnelSession(TunnelSession):
    """CONNECT tunnels over one HTTP/2 connection.

    The connection preface and SETTINGS are queued on creation; send them with
    :meth:`data_to_send`.

    :param is_client: which side of the connection this is.
    :param stream_window: receive window per stream, credited as the application reads.
    :param connection_window: receive window of the whole connection.
    :param max_streams: concurrent streams the peer may open.
    :param max_pending_output: bytes h2 may hold for the peer before its input pauses.
    :param max_stream_rate: (server) new streams per second the peer may open on this
        connection, after a first burst of a tenth of a second's worth (at least
        ``max_streams``); None: no limit.
    :param clock: seconds, for the stream rate.
    """

    def __init__(
        self,
        *,
        is_client: bool,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_pending_output: int = MAX_PENDING_OUTPUT,
        max_stream_rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.is_client = is_client
        self.max_pending_output = max_pending_output
        self._clock = clock
        self._stream_rate: StreamRate | None = None
        self._refusal_budget: StreamRate | None = None
        if max_stream_rate is not None and not is_client:
            now = clock()
            # A burst of a tenth of a second's streams, at least max_streams.
            burst = max(max_streams, int(max_stream_rate / 10))
            self._stream_rate = StreamRate(max_stream_rate, burst, now)
            self._refusal_budget = StreamRate(max_stream_rate, REFUSAL_BURST * burst, now)
        self.streams_refused_for_rate = 0
        """New streams refused (REFUSED_STREAM) because the peer was above the rate."""
        self.streams_refused_over_limit = 0
        """New streams refused (REFUSED_STREAM) because ``max_streams`` were open."""
        self.streams_refused_after_goaway = 0
        """New streams refused (REFUSED_STREAM) because they came after our GOAWAY."""
        config = h2.config.H2Configuration(
            client_side=is_client,
            header_encoding=None,
            validate_outbound_headers=True,
            validate_inbound_headers=True,
            normalize_outbound_headers=True,
            normalize_inbound_headers=True,
        )
        self.h2 = _H2Connection(config)
        settings: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        }
        if is_client:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.h2.local_settings = h2.settings.Settings(client=is_client, initial_values=settings)
        # (h2 applies MAX_HEADER_LIST_SIZE to its decoder when the peer acknowledges a
        # change; given as an initial value it is no change: the decoder kept 64 KiB.)
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.h2.initiate_connection()
        if connection_window > _INITIAL_CONNECTION_WINDOW:
            self.h2.increment_flow_control_window(connection_window - _INITIAL_CONNECTION_WINDOW)
        self.peer_settings_received = False
        """True once the peer's SETTINGS arrived: its preface is in and it accepted us."""
        self.closed = False
        """True once the connection is closed (GOAWAY sent or received, or a protocol error)."""
        # Both sides: a client's graceful GOAWAY names the last stream *we* may open
        # (a push; we never push), so its own streams carry on, which h2 did not let them.
        self._goaways = _FrameHeaders(
            max_frame_size=self.h2.local_settings.max_frame_size,
            preface=not is_client,
            idle_frames=StreamRate(IDLE_FRAME_RATE, IDLE_FRAME_BURST, clock()),
            clock=clock,
        )
        self.peer_last_stream: int | None = None
        """(client) The last stream ID of the peer's graceful GOAWAY: streams up to it
        carry on, no new one opens; None until one came."""
        self._peer_goaway_reason = ""
        self._peer_sent_goaway = False
        """A graceful GOAWAY came (its debug data in ``_peer_goaway_reason``)."""
        self.goaway_last_stream: int | None = None
        """(server) The last stream ID our graceful GOAWAY named: later requests are
        refused unprocessed; None until :meth:`go_away`."""
        self._extra_output = b""
        """Bytes to send before h2's next ones: our graceful GOAWAY, written past h2,
        after what h2 had queued before it."""
        self._streams: dict[int, _Stream] = {}
        self._ready: deque[int] = deque()
        """Streams with something to frame, in round-robin order."""

    # -- the byte-stream interface ------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the connection can be used: the peer's SETTINGS arrived."""
        return self.peer_settings_received

    @property
    def output_ended(self) -> bool:
        """True once the connection is closed: shut the write side after the last bytes."""
        return self.closed

    @property
    def finished(self) -> bool:
        """True once the underlying connection can be closed."""
        return self.closed

    abort_requested = False
    """HTTP/2 never needs the underlying connection reset."""

    awaiting_request = False
    """An idle HTTP/2 connection is bounded by the listener's connection limits, not a
    timer (it may carry streams later)."""

    @property
    def input_paused(self) -> bool:
        """HTTP/2 flow control bounds the DATA a peer sends; what it does not bound is
        the answers h2 queues to the peer's control frames. A peer that floods PING or
        SETTINGS (or DATA on closed streams) without reading is not read while h2 holds
        more than ``max_pending_output`` bytes for it (h2 has no public size for its
        queue: its ``_data_to_send``)."""
        return len(self.h2._data_to_send) > self.max_pending_output

    def receive_data(self, data: bytes) -> list[events.TunnelEvent]:
        """Process bytes read from the connection and return the tunnel events they caused.

        A protocol error closes the connection (h2 queues GOAWAY) and is reported
        as :class:`~quicmesh.tunnel.events.ConnectionTerminated`; nothing is raised.
        """
        if self.closed:
            return []
        data, goaways = self._goaways.feed(data)
        try:
            h2_events = self.h2.receive_data(data) if data else []
        except h2.exceptions.ProtocolError as exc:
            self._close_all()
            code = int(exc.error_code)
            return [
                events.ConnectionTerminated(code, f"HTTP/2 protocol error: {exc}", by_peer=False)
            ]
        result: list[events.TunnelEvent] = []
        for event in h2_events:
            if self.closed:
                break
            result.extend(self._on_event(event))
        for last, debug in goaways:
            if self.closed:
                break
            result.extend(self._on_graceful_goaway(last, debug))
        violation = self._goaways.violation
        if violation is not None and not self.closed:
            code, reason = violation
            result.extend(self._close_with(code, f"HTTP/2 protocol error: {reason}"))
        return result

    def _on_graceful_goaway(self, last: int, debug: bytes) -> list[events.TunnelEvent]:
        """The peer's GOAWAY with NO_ERROR: no new stream; ours past ``last`` were not
        processed (RFC 9113 6.8), the others carry on. Its last stream ID may only fall.
        A client's names server-initiated streams, which we never open: its own streams
        carry on (it closes the connection once they are done), nothing to report."""
        if not self.is_client:
            self._peer_goaway_reason = peer_text(debug) or self._peer_goaway_reason
            self._peer_sent_goaway = True
            if self.is_idle() and not self._streams:
                # Done with the connection and nothing under way: ours to close too, as
                # nghttp2 does (a client may wait for it). With streams open, the
                # client's close ends it once they are done.
                said = self._peer_goaway_reason
                return self._close_with(ErrorCodes.NO_ERROR, said or "the peer went away")
            return []
        if self.peer_last_stream is not None and last > self.peer_last_stream:
            return self._close_with(
                ErrorCodes.PROTOCOL_ERROR,
                f"HTTP/2 protocol error: the peer's GOAWAY raised its last stream ID "
                f"from {self.peer_last_stream} to {last}",
            )
        self.peer_last_stream = last
        self._peer_sent_goaway = True
        said = peer_text(debug)
        self._peer_goaway_reason = said or self._peer_goaway_reason
        why = f"not processed: the peer is going away (GOAWAY, last stream {last}" + (
            f": {said})" if said else ")"
        )
        result: list[events.TunnelEvent] = [
            events.PeerGoingAway(last + 1, notice=last == MAX_STREAM_ID)
        ]
        # Ours (a client's are odd) past its last: also those we half-closed before
        # their answer, whose record we dropped while h2 keeps them open.
        open_in_h2 = (i for i, stream in self.h2.streams.items() if not stream.closed)
        for stream_id in sorted({*self._streams, *open_in_h2}):
            if stream_id > last and stream_id % 2 == 1:
                self._forget(stream_id)
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
                result.append(
                    events.StreamReset(
                        stream_id, int(ErrorCodes.REFUSED_STREAM), reason=why, not_processed=True
                    )
                )
        return result

    def receive_eof(self) -> list[events.TunnelEvent]:
        """The peer closed its side of the connection (TLS close_notify)."""
        if self.closed:
            return []
        self._close_all()
        if self._peer_sent_goaway:
            reason = self._peer_goaway_reason or "peer closed the connection after its GOAWAY"
            return [events.ConnectionTerminated(0, reason)]
        return [events.ConnectionTerminated(0, "peer closed the connection without GOAWAY")]

    def pending_events(self) -> list[events.TunnelEvent]:
        """Events caused by application calls rather than input: none for HTTP/2."""
        return []

    def data_to_send(self, budget: int = 64 * 1024) -> bytes:
        """Frame queued stream data, round robin, and return everything to write.

        Each stream with queued bytes gets up to :data:`SEND_QUANTUM` bytes per
        turn, limited by its and the connection's flow-control windows, until
        about ``budget`` bytes of DATA are framed. Control frames h2 queued
        (SETTINGS, WINDOW_UPDATE, RST_STREAM, GOAWAY...) are always included.
        """
        framed = 0
        while self._ready and framed < budget and not self.closed:
            stream_id = self._ready[0]
            stream = self._streams.get(stream_id)
            if stream is None or not stream.sending:
                self._unqueue()
                continue
            try:
                window = self.h2.local_flow_control_window(stream_id)
            except h2.exceptions.H2Error:
                self._drop_outbound(stream_id)
                continue
            size = min(len(stream.buffer), window, self.h2.max_outbound_frame_size, SEND_QUANTUM)
            if size <= 0 and stream.buffer:
                if self.h2.outbound_flow_control_window <= 0:
                    break  # the whole connection waits for WINDOW_UPDATE
                self._unqueue()
                stream.blocked = True
                continue
            self._ready.popleft()
            chunk = bytes(stream.buffer[:size])
            del stream.buffer[:size]
            end_stream = stream.end_stream and not stream.buffer
            try:
                self.h2.send_data(stream_id, chunk, end_stream=end_stream)
            except h2.exceptions.H2Error:
                stream.queued = False
                self._drop_outbound(stream_id)
                continue
            framed += size
            if end_stream:
                stream.queued = False
                stream.sending = stream.remote_ended = False
                self._release_if_done(stream_id)
                self._drop_if_over(stream_id)
            elif stream.buffer:
                self._ready.append(stream_id)
            else:
                stream.queued = False
        output = self.h2.data_to_send()
        if self._extra_output:
            output, self._extra_output = self._extra_output + output, b""
        return output

    def go_away(self) -> bool:
        """(server) Send a graceful GOAWAY (NO_ERROR) naming the last stream the peer
        opened (RFC 9113 6.8): its open streams carry on, a request on a later one (it
        crossed the GOAWAY) is refused unprocessed, REFUSED_STREAM. Written past h2,
        which would take its own GOAWAY for the connection's end and send nothing more
        (the module's docstring). True when sent: once, on an open server connection."""
        if self.is_client or self.closed or self.goaway_last_stream is not None:
            return False
        last = self.h2.highest_inbound_stream_id
        self.goaway_last_stream = last
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = int(ErrorCodes.NO_ERROR)
        frame.additional_data = b"draining"
        # After what h2 queued before it, ahead of what it queues next.
        self._extra_output += self.h2.data_to_send() + bytes(frame.serialize())
        return True

    # -- input -------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event) -> list[events.TunnelEvent]:
        if isinstance(event, h2.events.DataReceived):
            return self._on_data(event)
        if isinstance(event, h2.events.StreamEnded):
            return self._on_stream_ended(event.stream_id)
        if isinstance(event, h2.events.RequestReceived):
            return self._on_request(event)
        if isinstance(event, h2.events.ResponseReceived):
            return self._on_response(event)
        if isinstance(event, h2.events.StreamReset):
            return self._on_reset(event)
        if isinstance(event, _MalformedFieldSection):
            return self._on_malformed(event)
        if isinstance(event, h2.events.WindowUpdated):
            self._on_window_updated(event.stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.peer_settings_received = True
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for stream_id in [i for i, s in self._streams.items() if s.blocked]:
                    self._on_window_updated(stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close_all()
            reason = peer_text(event.additional_data or b"")
            code = int(event.error_code) if event.error_code is not None else 0
            return [events.ConnectionTerminated(code, reason or f"GOAWAY (error code {code:#x})")]
        return []

    def _refuse_unprocessed(self, stream_id: int) -> list[events.TunnelEvent]:
        """A new stream above ``max_stream_rate``, or past ``max_streams`` open ones:
        refused unprocessed (REFUSED_STREAM, so a client may retry it), no handler
        started. Refusals have a budget of their own (server sessions), the rate over
        ``REFUSAL_BURST`` bursts of the rate: a client a little above the rate or the
        limit, or a burst, only sees refusals; a peer far above them (rapid reset)
        loses its connection (GOAWAY ENHANCE_YOUR_CALM), as nghttp2 does for the same
        attack."""
        if self._refusal_budget_spent():
            return self._close_with(
                ErrorCodes.ENHANCE_YOUR_CALM,
                "too many new streams refused (max_stream_rate, max_streams)",
            )
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
        return []

    def _on_data(self, event: h2.events.DataReceived) -> list[events.TunnelEvent]:
        stream_id = event.stream_id
        assert stream_id is not None and event.data is not None
        data = event.data
        padding = (event.flow_controlled_length or 0) - len(data)
        if padding > 0:
            self._acknowledge(stream_id, padding)
        stream = self._streams.get(stream_id)
        if stream is None or not stream.open or stream.discarding:
            self._acknowledge(stream_id, len(data))
            return []
        if not data:
            return []
        stream.unread += len(data)
        return [events.DataReceived(stream_id, data)]

    def _on_stream_ended(self, stream_id: int | None) -> list[events.TunnelEvent]:
        assert stream_id is not None
        stream = self._streams.get(stream_id)
        if stream is None or not stream.open or stream.discarding:
            return []
        stream.input_ended = True
        if stream.sending:
            stream.remote_ended = True
        self._drop_if_over(stream_id)
        return [events.DataReceived(stream_id, b"", True)]

    def _on_request(self, event: h2.events.RequestReceived) -> list[events.TunnelEvent]:
        stream_id = event.stream_id
        assert stream_id is not None
        if stream_id in self.h2.past_limit:
            self.h2.past_limit.discard(stream_id)
            self.streams_refused_over_limit += 1
            return self._refuse_unprocessed(stream_id)
        if self.goaway_last_stream is not None and stream_id > self.goaway_last_stream:
            # Crossed our GOAWAY: not processed, the peer may open it elsewhere. Within
            # the refusal budget: a peer that goes on opening streams is cut off.
            self.streams_refused_after_goaway += 1
            return self._refuse_unprocessed(stream_id)
        if self._stream_rate is not None and not self._stream_rate.take(1, self._clock()):
            self.streams_refused_for_rate += 1
            return self._refuse_unprocessed(stream_id)
        try:
            request = parse_connect_request((bytes(n), bytes(v)) for n, v in event.headers or [])
        except TunnelUsageError as exc:
            return self._reject(stream_id, 400, str(exc))
        self._streams[stream_id] = _Stream(open_=True)
        return [events.StreamRequested(stream_id, request.target, request.headers)]

    def _on_response(self, event: h2.events.ResponseReceived) -> list[events.TunnelEvent]:
        stream_id = event.stream_id
        assert stream_id is not None
        # (h2 reports an interim answer as InformationalResponseReceived, not here.)
        status, reason = read_connect_response(event.headers or []) or (502, "")
        if status == 200:
            self._stream(stream_id).open = True
        else:
            # Refused: release the stream here too, in case the server does not.
            self._forget(stream_id)
            self._send_reset(stream_id, ErrorCodes.CANCEL)
        return [events.ResponseReceived(stream_id, status, reason)]

    def _on_reset(self, event: h2.events.StreamReset) -> list[events.TunnelEvent]:
        stream_id = event.stream_id
        assert stream_id is not None
        code = int(event.error_code) if event.error_code is not None else 0
        stream = self._streams.get(stream_id)
        if code == ErrorCodes.NO_ERROR and stream is not None and stream.remote_ended:
            # RFC 9113 section 8.1: the peer sent all it had and needs nothing more
            # from us. Its bytes stay readable; ours are dropped.
            self._drop_outbound(stream_id)
            stream.open = False
            self._drop_if_over(stream_id)
            return [events.PeerStoppedReading(stream_id)]
        self._forget(stream_id)
        return [events.StreamReset(stream_id, code, connect_error=code == ErrorCodes.CONNECT_ERROR)]

    def _on_malformed(self, event: _MalformedFieldSection) -> list[events.TunnelEvent]:
        """A malformed request is a refused one (400, for the handler's hook and the
        access log; the stream was reset); a malformed answer, or malformed trailers of
        a flow under way, end the stream with that reason, so that its opener or its
        handler does not wait for more."""
        stream_id = event.stream_id
        why = peer_text(event.reason)
        self.h2.past_limit.discard(stream_id)  # (a request h2 never hands us)
        code = int(ErrorCodes.PROTOCOL_ERROR)
        if stream_id in self._streams:
            # A flow under way (its trailers are malformed) or a client's stream waiting
            # for its answer: it ends, with the reason.
            answered = self._streams[stream_id].open  # (a server's: its request taken)
            self._forget(stream_id)
            side = "trailers are" if answered else "answer is"
            reason = f"the peer's {side} malformed: {why}"
            return [events.StreamReset(stream_id, code, reason=reason)]
        if self.is_client:
            # Ours, half-closed before its answer (its record dropped): its opener waits.
            reason = f"the peer's answer is malformed: {why}"
            return [events.StreamReset(stream_id, code, reason=reason)]
        if self._refusal_budget_spent():
            return self._close_with(ErrorCodes.ENHANCE_YOUR_CALM, "too many malformed requests")
        return [events.RequestRejected(stream_id, 400, f"malformed request (reset): {why}")]

    def _on_window_updated(self, stream_id: int | None) -> None:
        stream = self._streams.get(stream_id) if stream_id is not None else None
        if stream_id is not None and stream is not None and stream.blocked:
            stream.blocked = False
            self._schedule(stream_id)

    def _reject(self, stream_id: int, status: int, reason: str) -> list[events.TunnelEvent]:
        self.respond(stream_id, status, reason)
        return [events.RequestRejected(stream_id, status, reason)]

    # -- TunnelSession -------------------------------------------------------------

    def can_open_stream(self) -> bool:
        if self.closed or self.peer_last_stream is not None:
            return False
        limit = self.h2.remote_settings.max_concurrent_streams
        return bool(self.h2.open_outbound_streams < limit)

    def open_stream(self, target: Target, headers: dict[str, str]) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, connect_request_fields(target, headers))
        self._streams[stream_id] = _Stream()
        return stream_id

    def respond(self, stream_id: int, status: int, reason: str = "") -> None:
        try:
            self.h2.send_headers(
                stream_id, response_fields(status, reason), end_stream=status != 200
            )
        except h2.exceptions.H2Error:
            return
        if status != 200:
            # RFC 9113 section 8.1: a complete response, then RST_STREAM NO_ERROR
            # so the client stops sending and the stream is released on both sides.
            self._drop_outbound(stream_id)
            self.stop_reading(stream_id)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or not stream.sending or stream.end_stream:
            return
        stream.buffer += data
        stream.end_stream = end_stream
        if stream.buffer or end_stream:
            self._schedule(stream_id)

    def reset_stream(self, stream_id: int, reason: ResetReason) -> None:
        self._forget(stream_id)
        self._send_reset(stream_id, _RESET_CODES[reason])

    def stop_reading(self, stream_id: int) -> None:
        """Discard (and credit at once) what the peer still sends on the stream.

        HTTP/2 has no STOP_SENDING: once our own side has ended, the stream is
        reset with NO_ERROR so the peer stops and the stream is released.
        """
        stream = self._stream(stream_id)
        stream.discarding = True
        self._acknowledge(stream_id, stream.unread)
        stream.unread = 0
        self._release_if_done(stream_id)

    def data_consumed(self, stream_id: int, amount: int) -> bool:
        stream = self._streams.get(stream_id)
        amount = min(amount, stream.unread if stream is not None else 0)
        if stream is None or amount <= 0:
            return False
        stream.unread -= amount
        self._acknowledge(stream_id, amount)
        self._drop_if_over(stream_id)
        return True

    def unsent_bytes(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return len(stream.buffer) if stream is not None and stream.sending else 0

    def is_idle(self) -> bool:
        return not any(s.sending for s in self._streams.values()) and not (
            self.h2.open_outbound_streams + self.h2.open_inbound_streams
        )

    def close(self, reason: str = "") -> None:
        if not self.closed:
            self._close_with(ErrorCodes.NO_ERROR, reason)

    # -- internals -----------------------------------------------------------------

    def _stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _Stream()
            stream.sending = False
        return stream

    def _schedule(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.queued and not stream.blocked:
            stream.queued = True
            self._ready.append(stream_id)

    def _unqueue(self) -> None:
        stream = self._streams.get(self._ready.popleft())
        if stream is not None:
            stream.queued = False

    def _drop_outbound(self, stream_id: int) -> None:
        """Nothing more goes out on the stream: drop what is queued."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.sending = stream.remote_ended = stream.blocked = False
        stream.buffer.clear()
        if stream.queued:
            stream.queued = False
            self._ready.remove(stream_id)

    def _forget(self, stream_id: int) -> None:
        """Drop the stream's record, crediting what the application never read."""
        self._drop_outbound(stream_id)
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._acknowledge(stream_id, stream.unread)

    def _drop_if_over(self, stream_id: int) -> None:
        """Drop the record once both directions are over and everything was read."""
        stream = self._streams.get(stream_id)
        if (
            stream is not None
            and not stream.sending
            and not stream.discarding
            and stream.unread == 0
            and (stream.input_ended or not stream.open)
        ):
            del self._streams[stream_id]

    def _release_if_done(self, stream_id: int) -> None:
        """Reset a stream we stopped reading once our own side has ended."""
        stream = self._streams.get(stream_id)
        if stream is not None and stream.discarding and not stream.sending:
            self._forget(stream_id)
            h2_stream = self.h2.streams.get(stream_id)
            if h2_stream is not None and not h2_stream.closed:
                self._send_reset(stream_id, ErrorCodes.NO_ERROR)

    def _send_reset(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.reset_stream(stream_id, code)

    def _acknowledge(self, stream_id: int, amount: int) -> None:
        if amount <= 0 or self.closed:
            return
        with contextlib.suppress(h2.exceptions.H2Error, ValueError):
            self.h2.acknowledge_received_data(amount, stream_id)

    def _refusal_budget_spent(self) -> bool:
        """Count one more refusal (server sessions with a stream rate); True once the
        budget is spent: the peer is then cut off (ENHANCE_YOUR_CALM)."""
        budget = self._refusal_budget
        return budget is not None and not budget.take(1, self._clock())

    def _close_with(self, code: ErrorCodes, reason: str) -> list[events.TunnelEvent]:
        """Close the connection with a GOAWAY of ``code`` and ``reason`` (its first 256
        bytes). After our graceful GOAWAY its last stream ID may not rise (RFC 9113 6.8):
        the streams refused since are not counted in."""
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.close_connection(
                code,
                reason.encode("utf-8", "replace")[:256],
                last_stream_id=self.goaway_last_stream,
            )
        self._close_all()
        # With an error code, for what the peer sent (a violation, a flood); NO_ERROR
        # answers the peer's own graceful GOAWAY.
        return [events.ConnectionTerminated(int(code), reason, by_peer=not code)]

    def _close_all(self) -> None:
        self.closed = True
        self._streams.clear()
        self._ready.clear()
