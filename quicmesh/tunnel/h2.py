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

Header blocks are validated by h2 (RFC 9113 rules: pseudo-header order and set,
lower-case names, no connection-specific fields); a block that breaks them is a
protocol error that closes the connection, as h2 does. A well-formed request
that is not a plain CONNECT, or whose target or extra headers are invalid, is
answered 400 on its stream and reported as :class:`~quicmesh.tunnel.events.RequestRejected`.
"""

from __future__ import annotations

import contextlib
from collections import deque

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from ..errors import TunnelUsageError
from . import events
from .connect import (
    MAX_FIELD_SECTION_SIZE,
    Target,
    connect_request_fields,
    decode_proxy_status,
    parse_connect_request,
    response_fields,
)
from .session import ResetReason, TunnelSession

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

_INITIAL_CONNECTION_WINDOW = 65535
_RESET_CODES = {
    ResetReason.CANCELLED: ErrorCodes.CANCEL,
    ResetReason.CONNECT_ERROR: ErrorCodes.CONNECT_ERROR,
}


class _Outbound:
    """Bytes the application queued on one stream, not yet framed."""

    __slots__ = ("buffer", "end_stream")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.end_stream = False


class H2TunnelSession(TunnelSession):
    """CONNECT tunnels over one HTTP/2 connection.

    The connection preface and SETTINGS are queued on creation; send them with
    :meth:`data_to_send`.

    :param is_client: which side of the connection this is.
    :param stream_window: receive window per stream, credited as the application reads.
    :param connection_window: receive window of the whole connection.
    :param max_streams: concurrent streams the peer may open.
    """

    def __init__(
        self,
        *,
        is_client: bool,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        self.is_client = is_client
        config = h2.config.H2Configuration(
            client_side=is_client,
            header_encoding=None,
            validate_outbound_headers=True,
            validate_inbound_headers=True,
            normalize_outbound_headers=True,
            normalize_inbound_headers=True,
        )
        self.h2 = h2.connection.H2Connection(config)
        settings: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        }
        if is_client:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.h2.local_settings = h2.settings.Settings(client=is_client, initial_values=settings)
        self.h2.initiate_connection()
        if connection_window > _INITIAL_CONNECTION_WINDOW:
            self.h2.increment_flow_control_window(connection_window - _INITIAL_CONNECTION_WINDOW)
        self.peer_settings_received = False
        """True once the peer's SETTINGS arrived: its preface is in and it accepted us."""
        self.closed = False
        """True once the connection is closed (GOAWAY sent or received, or a protocol error)."""
        self._outbound: dict[int, _Outbound] = {}
        self._ready: deque[int] = deque()
        self._queued: set[int] = set()
        self._blocked: set[int] = set()
        self._unread: dict[int, int] = {}
        self._open: set[int] = set()
        self._discarding: set[int] = set()
        self._remote_ended: set[int] = set()

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

    input_paused = False
    """HTTP/2 flow control bounds what the peer sends: never stop reading the socket."""

    def receive_data(self, data: bytes) -> list[events.TunnelEvent]:
        """Process bytes read from the connection and return the tunnel events they caused.

        A protocol error closes the connection (h2 queues GOAWAY) and is reported
        as :class:`~quicmesh.tunnel.events.ConnectionTerminated`; nothing is raised.
        """
        if self.closed:
            return []
        try:
            h2_events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._close_all()
            code = int(exc.error_code)
            return [events.ConnectionTerminated(code, f"HTTP/2 protocol error: {exc}")]
        result: list[events.TunnelEvent] = []
        for event in h2_events:
            result.extend(self._on_event(event))
        return result

    def receive_eof(self) -> list[events.TunnelEvent]:
        """The peer closed its side of the connection (TLS close_notify)."""
        if self.closed:
            return []
        self._close_all()
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
            outbound = self._outbound.get(stream_id)
            if outbound is None:
                self._unqueue()
                continue
            try:
                window = self.h2.local_flow_control_window(stream_id)
            except h2.exceptions.H2Error:
                self._drop_outbound(stream_id)
                continue
            size = min(len(outbound.buffer), window, self.h2.max_outbound_frame_size, SEND_QUANTUM)
            if size <= 0 and outbound.buffer:
                if self.h2.outbound_flow_control_window <= 0:
                    break  # the whole connection waits for WINDOW_UPDATE
                self._unqueue()
                self._blocked.add(stream_id)
                continue
            self._ready.popleft()
            chunk = bytes(outbound.buffer[:size])
            del outbound.buffer[:size]
            end_stream = outbound.end_stream and not outbound.buffer
            try:
                self.h2.send_data(stream_id, chunk, end_stream=end_stream)
            except h2.exceptions.H2Error:
                self._queued.discard(stream_id)
                self._drop_outbound(stream_id)
                continue
            framed += size
            if end_stream:
                self._queued.discard(stream_id)
                del self._outbound[stream_id]
                self._remote_ended.discard(stream_id)
                self._release_if_done(stream_id)
            elif outbound.buffer:
                self._ready.append(stream_id)
            else:
                self._queued.discard(stream_id)
        return self.h2.data_to_send()

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
        if isinstance(event, h2.events.WindowUpdated):
            self._on_window_updated(event.stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.peer_settings_received = True
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for stream_id in list(self._blocked):
                    self._on_window_updated(stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close_all()
            reason = (event.additional_data or b"").decode("utf-8", "replace")
            code = int(event.error_code) if event.error_code is not None else 0
            return [events.ConnectionTerminated(code, reason or f"GOAWAY (error code {code:#x})")]
        return []

    def _on_data(self, event: h2.events.DataReceived) -> list[events.TunnelEvent]:
        stream_id = event.stream_id
        assert stream_id is not None and event.data is not None
        data = event.data
        padding = (event.flow_controlled_length or 0) - len(data)
        if padding > 0:
            self._acknowledge(stream_id, padding)
        if stream_id not in self._open or stream_id in self._discarding:
            self._acknowledge(stream_id, len(data))
            return []
        if not data:
            return []
        self._unread[stream_id] = self._unread.get(stream_id, 0) + len(data)
        return [events.DataReceived(stream_id, data)]

    def _on_stream_ended(self, stream_id: int | None) -> list[events.TunnelEvent]:
        assert stream_id is not None
        if stream_id not in self._open or stream_id in self._discarding:
            return []
        if stream_id in self._outbound:
            self._remote_ended.add(stream_id)
        return [events.DataReceived(stream_id, b"", True)]

    def _on_request(self, event: h2.events.RequestReceived) -> list[events.TunnelEvent]:
        stream_id = event.stream_id
        assert stream_id is not None
        try:
            request = parse_connect_request((bytes(n), bytes(v)) for n, v in event.headers or [])
        except TunnelUsageError as exc:
            return self._reject(stream_id, 400, str(exc))
        self._open.add(stream_id)
        self._outbound[stream_id] = _Outbound()
        return [events.StreamRequested(stream_id, request.target, request.headers)]

    def _on_response(self, event: h2.events.ResponseReceived) -> list[events.TunnelEvent]:
        stream_id = event.stream_id
        assert stream_id is not None
        status_text = ""
        proxy_status = None
        for raw_name, raw_value in event.headers or []:
            name = bytes(raw_name)
            if name == b":status":
                status_text = bytes(raw_value).decode("ascii", "replace")
            elif name == b"proxy-status":
                proxy_status = bytes(raw_value).decode("utf-8", "replace")
        status = int(status_text) if status_text.isdigit() else 502
        if status == 200:
            self._open.add(stream_id)
        else:
            # Refused: release the stream here too, in case the server does not.
            self._forget(stream_id)
            self._send_reset(stream_id, ErrorCodes.CANCEL)
        return [events.ResponseReceived(stream_id, status, decode_proxy_status(proxy_status))]

    def _on_reset(self, event: h2.events.StreamReset) -> list[events.TunnelEvent]:
        stream_id = event.stream_id
        assert stream_id is not None
        code = int(event.error_code) if event.error_code is not None else 0
        if code == ErrorCodes.NO_ERROR and stream_id in self._remote_ended:
            # RFC 9113 section 8.1: the peer sent all it had and needs nothing more
            # from us. Its bytes stay readable; ours are dropped.
            self._drop_outbound(stream_id)
            self._open.discard(stream_id)
            return [events.PeerStoppedReading(stream_id)]
        self._forget(stream_id)
        return [events.StreamReset(stream_id, code, connect_error=code == ErrorCodes.CONNECT_ERROR)]

    def _on_window_updated(self, stream_id: int | None) -> None:
        if stream_id and stream_id in self._blocked:
            self._blocked.discard(stream_id)
            self._schedule(stream_id)

    def _reject(self, stream_id: int, status: int, reason: str) -> list[events.TunnelEvent]:
        self.respond(stream_id, status, reason)
        return [events.RequestRejected(stream_id, status, reason)]

    # -- TunnelSession -------------------------------------------------------------

    def can_open_stream(self) -> bool:
        if self.closed:
            return False
        limit = self.h2.remote_settings.max_concurrent_streams
        return bool(self.h2.open_outbound_streams < limit)

    def open_stream(self, target: Target, headers: dict[str, str]) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, connect_request_fields(target, headers))
        self._outbound[stream_id] = _Outbound()
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
        outbound = self._outbound.get(stream_id)
        if outbound is None or outbound.end_stream:
            return
        outbound.buffer += data
        outbound.end_stream = end_stream
        if outbound.buffer or end_stream:
            self._schedule(stream_id)

    def reset_stream(self, stream_id: int, reason: ResetReason) -> None:
        self._forget(stream_id)
        self._send_reset(stream_id, _RESET_CODES[reason])

    def stop_reading(self, stream_id: int) -> None:
        """Discard (and credit at once) what the peer still sends on the stream.

        HTTP/2 has no STOP_SENDING: once our own side has ended, the stream is
        reset with NO_ERROR so the peer stops and the stream is released.
        """
        self._discarding.add(stream_id)
        self._acknowledge(stream_id, self._unread.pop(stream_id, 0))
        self._release_if_done(stream_id)

    def data_consumed(self, stream_id: int, amount: int) -> bool:
        unread = self._unread.get(stream_id, 0)
        amount = min(amount, unread)
        if amount <= 0:
            return False
        if unread > amount:
            self._unread[stream_id] = unread - amount
        else:
            del self._unread[stream_id]
        self._acknowledge(stream_id, amount)
        return True

    def unsent_bytes(self, stream_id: int) -> int:
        outbound = self._outbound.get(stream_id)
        return len(outbound.buffer) if outbound is not None else 0

    def is_idle(self) -> bool:
        return not self._outbound and not (
            self.h2.open_outbound_streams + self.h2.open_inbound_streams
        )

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.close_connection(ErrorCodes.NO_ERROR, reason.encode("utf-8", "replace")[:256])
        self._close_all()

    # -- internals -----------------------------------------------------------------

    def _schedule(self, stream_id: int) -> None:
        if stream_id not in self._queued and stream_id not in self._blocked:
            self._queued.add(stream_id)
            self._ready.append(stream_id)

    def _unqueue(self) -> None:
        self._queued.discard(self._ready.popleft())

    def _drop_outbound(self, stream_id: int) -> None:
        self._outbound.pop(stream_id, None)
        self._remote_ended.discard(stream_id)
        self._blocked.discard(stream_id)
        if stream_id in self._queued:
            self._queued.discard(stream_id)
            self._ready.remove(stream_id)

    def _forget(self, stream_id: int) -> None:
        self._drop_outbound(stream_id)
        self._open.discard(stream_id)
        self._discarding.discard(stream_id)
        self._acknowledge(stream_id, self._unread.pop(stream_id, 0))

    def _release_if_done(self, stream_id: int) -> None:
        """Reset a stream we stopped reading once our own side has ended."""
        if stream_id in self._discarding and stream_id not in self._outbound:
            self._forget(stream_id)
            stream = self.h2.streams.get(stream_id)
            if stream is not None and not stream.closed:
                self._send_reset(stream_id, ErrorCodes.NO_ERROR)

    def _send_reset(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.reset_stream(stream_id, code)

    def _acknowledge(self, stream_id: int, amount: int) -> None:
        if amount <= 0 or self.closed:
            return
        with contextlib.suppress(h2.exceptions.H2Error, ValueError):
            self.h2.acknowledge_received_data(amount, stream_id)

    def _close_all(self) -> None:
        self.closed = True
        self._outbound.clear()
        self._ready.clear()
        self._queued.clear()
        self._blocked.clear()
        self._unread.clear()
        self._remote_ended.clear()
