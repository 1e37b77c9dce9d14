"""One CONNECT tunnel over an HTTP/1.1 connection, sans-IO (the per-flow baseline).

:class:`Http1TunnelSession` carries exactly one flow on its own connection
(its ID, for logs, given by the transport: :data:`STREAM_ID` by default). The
client sends ``CONNECT host:port HTTP/1.1`` with a ``Host`` header and the
extra headers; the server answers ``200`` (the tunnel is open) or an error status
with a ``proxy-status`` reason, ``Content-Length: 0`` and ``Connection: close``.
h11 reads and writes that preamble; after a 200 both directions carry the flow's
bytes unframed.

HTTP/1.1 has no frames to mark a half-close or an abort, so they are the
connection's: the session reports :attr:`~Http1TunnelSession.output_ended` once
every byte and the FIN have been handed out (the I/O layer then sends a TLS
``close_notify`` and shuts down the TCP write side), takes the peer's
``close_notify`` through :meth:`~Http1TunnelSession.receive_eof`, and asks for
the connection to be reset (TCP RST) with
:attr:`~Http1TunnelSession.abort_requested`. There is no end-to-end window
either: the I/O layer stops reading the socket while
:attr:`~Http1TunnelSession.input_paused`, and TCP's own flow control does the rest.
"""

from __future__ import annotations

import enum

import h11

from ..errors import TunnelUsageError
from . import events
from .connect import (
    MAX_FIELD_SECTION_SIZE,
    STATUS_REASONS,
    Target,
    decode_proxy_status,
    encode_proxy_status,
    parse_connect_request,
)
from .session import ResetReason, TunnelSession

STREAM_ID = 1
"""The default ID of the one stream an HTTP/1.1 tunnel connection carries (the ``tcp``
transport numbers the flows of a peer connection, and of a listener, 1, 2, 3...)."""

DEFAULT_RECEIVE_WINDOW = 1024 * 1024
"""Unread bytes above which the session asks for the socket not to be read."""

MAX_REQUEST_HEAD_BYTES = MAX_FIELD_SECTION_SIZE
"""Longest request or response head h11 will buffer; larger heads are refused (431)."""


class _State(enum.Enum):
    IDLE = "idle"
    """Client: no CONNECT sent yet. Server: the request head is not complete."""
    REQUESTED = "requested"
    """Client: CONNECT sent. Server: a valid request is waiting for respond()."""
    OPEN = "open"
    """200 exchanged: bytes flow unframed."""
    DONE = "done"
    """Refused, rejected, reset or failed: the connection only needs closing."""


class Http1TunnelSession(TunnelSession):
    """One CONNECT tunnel on one HTTP/1.1 connection.

    :param is_client: which side of the connection this is.
    :param receive_window: unread bytes above which :attr:`input_paused` turns True.
    :param stream_id: the ID of its one stream (for logs; a client may change it with
        :attr:`stream_id` until :meth:`open_stream`).
    """

    def __init__(
        self,
        *,
        is_client: bool,
        receive_window: int = DEFAULT_RECEIVE_WINDOW,
        stream_id: int = STREAM_ID,
    ) -> None:
        self.is_client = is_client
        self.stream_id = stream_id
        """The ID of the connection's one stream (until 2026-12 always 1)."""
        self.abort_requested = False
        """True once the flow was aborted: reset the connection."""
        self._h11 = h11.Connection(
            h11.CLIENT if is_client else h11.SERVER,
            max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
        )
        self._state = _State.IDLE
        self._receive_window = receive_window
        self._outgoing = bytearray()
        self._held = bytearray()
        self._fin_requested = False
        self._output_ended = False
        self._input_ended = False
        self._reading_stopped = False
        self._unread = 0
        self._early = 0
        """(server) Bytes after the request head, kept by h11 until respond()."""
        self._pending: list[events.TunnelEvent] = []

    # -- the byte-stream interface ------------------------------------------------

    ready = True
    """An HTTP/1.1 connection is usable as soon as TLS is established."""

    @property
    def output_ended(self) -> bool:
        """True once every byte and the FIN were handed out: close the write side."""
        return self._output_ended

    @property
    def finished(self) -> bool:
        """True once both directions are over: close the connection."""
        if self.abort_requested:
            return True
        input_done = self._input_ended or self._reading_stopped
        return self._output_ended and input_done

    @property
    def awaiting_request(self) -> bool:
        """(server) True until the client's request head is complete: the I/O layer
        gives a connection only so long to send it (the handshake's timeout)."""
        return not self.is_client and self._state is _State.IDLE and not self._input_ended

    @property
    def input_paused(self) -> bool:
        """True while the application has more than the receive window unread (the
        bytes a client sent after its request, before our answer, included)."""
        held = self._unread + self._early
        return held >= self._receive_window and not self._reading_stopped

    def receive_data(self, data: bytes) -> list[events.TunnelEvent]:
        """Process bytes read from the connection and return the tunnel events they caused.

        Malformed input never raises: a server answers 400 (or 431) and reports
        :class:`~quicmesh.tunnel.events.RequestRejected`; a client reports a 502.
        """
        if self._state is _State.OPEN:
            return self._tunnel_data(data)
        if not data or self._state is _State.DONE or self._input_ended:
            return []
        if not self.is_client and self._state is _State.REQUESTED:
            # Bytes after the request head, before our answer: h11 keeps them
            # (paused) and gives them back as trailing data once we accept; they
            # count against the receive window meanwhile.
            self._h11.receive_data(data)
            self._early += len(data)
            return []
        self._h11.receive_data(data)
        return self._client_events() if self.is_client else self._server_events()

    def receive_eof(self) -> list[events.TunnelEvent]:
        """The peer ended its side of the connection (TLS close_notify)."""
        if self._input_ended:
            return []
        self._input_ended = True
        state = self._state
        if state is _State.OPEN:
            return [] if self._reading_stopped else [events.DataReceived(self.stream_id, b"", True)]
        if state is _State.DONE or (state is _State.REQUESTED and not self.is_client):
            return []  # a server delivers the FIN once respond() opens the tunnel
        self._finish()
        if self.is_client and state is _State.REQUESTED:
            return [events.StreamReset(self.stream_id, 0)]
        return []

    def pending_events(self) -> list[events.TunnelEvent]:
        """Events caused by :meth:`respond`: bytes the client sent before our 200."""
        pending, self._pending = self._pending, []
        return pending

    def data_to_send(self, budget: int = 64 * 1024) -> bytes:
        """Return up to about ``budget`` bytes to write (the preamble always in full)."""
        if self.abort_requested or self._output_ended:
            return b""
        size = max(budget, 0)
        data = bytes(self._outgoing[:size])
        del self._outgoing[:size]
        if self._fin_requested and not self._outgoing and not self._held:
            self._output_ended = True
        return data

    # -- input -------------------------------------------------------------------

    def _tunnel_data(self, data: bytes) -> list[events.TunnelEvent]:
        if self._reading_stopped or not data:
            return []
        self._unread += len(data)
        return [events.DataReceived(self.stream_id, data)]

    def _server_events(self) -> list[events.TunnelEvent]:
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
            return self._reject(status, f"malformed request: {exc}")
        if not isinstance(event, h11.Request):
            return []
        # The request line in HTTP/2 form; Host repeats the target and is left out.
        fields = [(b":method", bytes(event.method)), (b":authority", bytes(event.target))]
        fields += [(bytes(n), bytes(v)) for n, v in event.headers if bytes(n) != b"host"]
        try:
            request = parse_connect_request(fields)
        except TunnelUsageError as exc:
            return self._reject(400, str(exc))
        try:
            self._h11.next_event()  # EndOfMessage: CONNECT carries no body
        except h11.RemoteProtocolError as exc:
            return self._reject(400, f"malformed request: {exc}")
        self._state = _State.REQUESTED
        self._early = len(self._h11.trailing_data[0])  # (read with the request head)
        return [events.StreamRequested(self.stream_id, request.target, request.headers)]

    def _client_events(self) -> list[events.TunnelEvent]:
        if self._state is not _State.REQUESTED:
            return self._fail_client("peer sent bytes before our request")
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                return self._fail_client(f"malformed response from peer: {exc}")
            if isinstance(event, h11.InformationalResponse):
                continue
            if not isinstance(event, h11.Response):
                return []
            break
        proxy_status = None
        for raw_name, raw_value in event.headers:
            if bytes(raw_name) == b"proxy-status":
                proxy_status = bytes(raw_value).decode("utf-8", "replace")
        result: list[events.TunnelEvent] = [
            events.ResponseReceived(
                self.stream_id, event.status_code, decode_proxy_status(proxy_status)
            )
        ]
        if event.status_code != 200:
            self._finish()
            return result
        self._state = _State.OPEN
        self._outgoing += self._held
        self._held.clear()
        trailing, _ = self._h11.trailing_data
        result.extend(self._tunnel_data(bytes(trailing)))
        return result

    def _fail_client(self, reason: str) -> list[events.TunnelEvent]:
        self._finish()
        return [events.ResponseReceived(self.stream_id, 502, reason)]

    def _reject(self, status: int, reason: str) -> list[events.TunnelEvent]:
        self.respond(self.stream_id, status, reason)
        return [events.RequestRejected(self.stream_id, status, reason)]

    def _finish(self) -> None:
        self._state = _State.DONE
        self._outgoing.clear()
        self._held.clear()
        self._fin_requested = True
        self._reading_stopped = True
        self._unread = 0
        self._early = 0

    # -- TunnelSession -------------------------------------------------------------

    def can_open_stream(self) -> bool:
        return self.is_client and self._state is _State.IDLE

    def open_stream(self, target: Target, headers: dict[str, str]) -> int:
        if not self.can_open_stream():
            raise RuntimeError("an HTTP/1.1 tunnel connection carries exactly one stream")
        fields = [("host", target.authority), *headers.items()]
        request = h11.Request(method="CONNECT", target=target.authority, headers=fields)
        self._outgoing += self._h11.send(request) or b""
        self._outgoing += self._h11.send(h11.EndOfMessage()) or b""
        self._state = _State.REQUESTED
        return self.stream_id

    def respond(self, stream_id: int, status: int, reason: str = "") -> None:
        if self.is_client or self._state is _State.OPEN or self._state is _State.DONE:
            return
        if status == 200:
            self._outgoing += self._h11.send(h11.Response(status_code=200, headers=[])) or b""
            self._state = _State.OPEN
            trailing, _ = self._h11.trailing_data
            self._early = 0
            self._pending.extend(self._tunnel_data(bytes(trailing)))
            if self._input_ended:
                self._pending.append(events.DataReceived(self.stream_id, b"", True))
            return
        fields = [("content-length", "0"), ("connection", "close")]
        if reason:
            fields.append(("proxy-status", encode_proxy_status(reason)))
        response = h11.Response(
            status_code=status, headers=fields, reason=STATUS_REASONS.get(status, "")
        )
        try:
            head = self._h11.send(response) or b""
            head += self._h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            head = b""
        self._finish()
        self._outgoing += head

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if self._fin_requested or self.abort_requested:
            return
        if self._state is _State.OPEN:
            self._outgoing += data
        else:
            self._held += data
        self._fin_requested = end_stream

    def reset_stream(self, stream_id: int, reason: ResetReason) -> None:
        """Abort the flow: the I/O layer resets the connection (HTTP/1.1 has no error codes)."""
        self.abort_requested = True
        self._finish()

    def stop_reading(self, stream_id: int) -> None:
        self._reading_stopped = True
        self._unread = 0

    def data_consumed(self, stream_id: int, amount: int) -> bool:
        self._unread = max(self._unread - amount, 0)
        return True

    def unsent_bytes(self, stream_id: int) -> int:
        return len(self._outgoing) + len(self._held)

    def is_idle(self) -> bool:
        return self.finished and not self.unsent_bytes(1)

    def close(self, reason: str = "") -> None:
        """Close the connection: a tunnel still open in either direction is reset, and
        so is one whose bytes are not all handed out yet (a peer that does not read
        would otherwise hold the close for ever; until 2026-12 its FIN went after a
        truncated flow, or never)."""
        if self._state is _State.OPEN:
            done_reading = self._input_ended or self._reading_stopped
            if not (self._fin_requested and done_reading and not self.unsent_bytes(0)):
                self.abort_requested = True
                self._finish()
        elif self._state is not _State.DONE:
            self._finish()
