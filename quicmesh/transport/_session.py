"""The asyncio side of a tunnel session, shared by every transport.

:class:`SessionConnection` owns the :class:`~quicmesh.transport.stream.MeshStream`
objects of one connection and drives a sans-IO
:class:`~quicmesh.tunnel.session.TunnelSession`: it turns stream calls into
session calls, session events into stream wake-ups, and asks its subclass (the
QUIC or TCP adaptor) to move bytes with :meth:`SessionConnection._transmit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
from collections.abc import Callable
from typing import Any

from .._timeouts import wait_within
from ..errors import ConnectionLost, StreamReset, TunnelError, TunnelUsageError
from ..logs import RateLimitedLog
from ..tunnel import events
from ..tunnel.connect import parse_target, validate_headers
from ..tunnel.session import ResetReason, TunnelSession
from .base import Authorizer, PeerConnection, StreamHandler
from .stream import DEFAULT_HIGH_WATER, EngineSocket, MeshStream, SpliceOutcome

logger = logging.getLogger("quicmesh.transport")

REFUSAL_LOG = RateLimitedLog(logger)
"""Refused and rejected streams, logged at most once per 10 s per kind (with a count)."""
PEER_VIOLATION_LOG = RateLimitedLog(logger)
"""Connections closed for the peer's protocol violations (one line per code per 10 s)."""


class SessionConnection(PeerConnection):
    """A peer connection whose streams are carried by a :class:`TunnelSession`.

    Subclasses implement :meth:`_transmit` (send what the session has queued),
    :meth:`_close_transport` and :meth:`stats`. The I/O adaptor (the subclass
    itself, or the protocol object of a TCP connection) calls the methods under
    "for the I/O adaptor": :meth:`handle_events` with what the session returned
    for its input, :meth:`transmitted` after bytes left,
    :meth:`stream_credit_changed` when the session may allow more streams, and
    :meth:`on_connection_lost` when the connection is gone.
    """

    transport_name = "session"

    def __init__(
        self,
        session: TunnelSession,
        *,
        peer_identity: str,
        handler: StreamHandler | None = None,
        authorize: Authorizer | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        log_id: str = "",
    ) -> None:
        self.session = session
        self.peer_identity = peer_identity
        self.streams_opened = 0
        self._handler = handler
        self._rejected_hook: Callable[[Any, int, str], None] | None = getattr(
            handler, "rejected", None
        )
        """The handler's ``rejected(connection, status, reason)``, if it has one
        (:meth:`~quicmesh.Transport.listen`)."""
        self._authorize = authorize
        self._high_water = high_water
        self._loop = asyncio.get_running_loop()
        self._streams: dict[int, MeshStream] = {}
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._drain_waiting: set[MeshStream] = set()
        self._closing = False
        self._idle_waiter: asyncio.Future[None] | None = None
        self._credit: asyncio.Future[None] | None = None
        self._transmit_scheduled = False
        self._lost: TunnelError | None = None
        self._going_away: str | None = None
        """Why the peer takes no new stream here (its GOAWAY), or None."""
        self._closed = self._loop.create_future()
        self.log = logging.LoggerAdapter(logger, {"connection": log_id})
        self._log_id = log_id

    # -- PeerConnection ------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._lost is not None

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def can_open_stream(self) -> bool:
        return (
            self.session.is_client
            and self._lost is None
            and not self._closing
            and self._going_away is None
            and self.session.can_open_stream()
        )

    @property
    def going_away(self) -> bool:
        return self._going_away is not None

    @property
    def lost_error(self) -> TunnelError | None:
        """Why the connection is gone (the error its streams were reset with), or
        None while it is open."""
        return self._lost

    def add_lost_callback(self, callback: Callable[[TunnelError], None]) -> None:
        """Call ``callback(error)`` once the connection is lost or closed (at once
        if it already is)."""
        self._closed.add_done_callback(lambda _: callback(self._lost or ConnectionLost("closed")))

    async def open_stream(
        self,
        target: str,
        headers: dict[str, str] | None = None,
        *,
        wait_response: bool = True,
    ) -> MeshStream:
        """Open a flow (see :meth:`PeerConnection.open_stream`).

        :param wait_response: False returns as soon as the CONNECT is queued, so the
            first bytes written follow it at once (in 0-RTT packets on a QUIC
            connection still in its handshake). A refusal then surfaces as
            :class:`~quicmesh.errors.StreamRefused` from the stream's next read,
            write or drain.
        """
        self._raise_if_accepted()
        parsed = parse_target(target)
        checked = validate_headers(headers)
        if not isinstance(wait_response, bool):  # ("no" was taken as true)
            raise TunnelUsageError(f"wait_response must be true or false, not {wait_response!r}")
        await self.wait_for_stream_credit()
        stream_id = self.session.open_stream(parsed, checked)
        stream = MeshStream(
            self,
            stream_id=stream_id,
            target=parsed,
            headers=checked,
            peer_identity=self.peer_identity,
            is_client=True,
            high_water=self._high_water,
        )
        self._streams[stream_id] = stream
        self.streams_opened += 1
        if not wait_response:
            # Sent now, not at the loop's next turn: on a connection still in its
            # handshake the CONNECT goes as 0-RTT only if it leaves before the server's
            # answer is read, and uvloop runs the callbacks of waiting I/O before those
            # scheduled meanwhile (an answer that came while we were preempted).
            self._transmit()
            return stream
        self._schedule_transmit()
        try:
            await stream.wait_accepted()
        except BaseException:
            # Refused, lost, or abandoned by the caller (a timeout cancels us): a
            # stream nobody will read must not hold its slot or its peer's
            # destination connection, so reset it both ways (no-op once closed).
            stream.abort()
            raise
        return stream

    async def wait_for_stream_credit(self) -> None:
        self._raise_if_accepted()
        self._raise_if_closing()
        while not self.session.can_open_stream():
            self._raise_if_closing()
            if self._credit is None:
                self._credit = self._loop.create_future()
            await asyncio.shield(self._credit)
        self._raise_if_closing()

    def _raise_if_accepted(self) -> None:
        """A connection a listener accepted opens no flow: CONNECT requests go from the
        side that connected (RFC 9114 4.4 and 6.1, RFC 9113 8.5). It waited for ever on
        QUIC and TLS-over-TCP (a review); h2's peer refused it (403)."""
        if not self.session.is_client:
            raise TunnelUsageError(
                "an accepted connection opens no stream: flows are opened by the side"
                " that connected (CONNECT requests go from client to server)"
            )

    def close(self) -> None:
        # No new stream from now on, even before the close takes effect (on QUIC, at the
        # loop's next turn): open_stream raises ConnectionLost.
        self._closing = True
        if self._lost is None:
            self.session.close()
            self._transmit()
            self._close_transport()
            # Its streams end now, not when the transport reports the close (a loop
            # turn or more later): a ``write(); await drain()`` loop on one fails at
            # once instead of writing into a session that drops what it is given.
            streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream._on_reset(
                    StreamReset(f"stream {stream.stream_id} reset: the connection was closed")
                )
            self._wake_credit()

    async def aclose(self, timeout: float = 10.0) -> None:
        # (accepting side) The peer is told first to open no new stream here, as a
        # draining Envoy or nghttpx does: without it, requests kept coming while the
        # running ones finished, and the last ones were reset by the close.
        self.go_away()
        self._closing = True
        deadline = self._loop.time() + timeout
        while self._lost is None and not self._is_idle():
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                self.log.info("closing with %d streams still open", len(self._streams))
                break
            self._idle_waiter = self._loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_within(asyncio.shield(self._idle_waiter), remaining)
        self.close()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)
        if self._handler_tasks:
            # Shielded: a caller that gives up waiting (``wait_for``) must not cancel the
            # handlers themselves (it cancelled them in the middle of their clean-up).
            await asyncio.shield(asyncio.gather(*self._handler_tasks, return_exceptions=True))

    def stats(self) -> dict[str, Any]:
        return {"streams_opened": self.streams_opened, "streams_active": len(self._streams)}

    # -- for the I/O adaptor -------------------------------------------------

    def _transmit(self) -> None:
        """Send whatever the session has queued."""
        raise NotImplementedError

    def _close_transport(self) -> None:
        """Close the underlying socket(s) after the session's close was sent."""
        raise NotImplementedError

    def handle_events(self, tunnel_events: list[events.TunnelEvent]) -> None:
        """Act on what the session reported.

        The caller (the I/O adaptor, after feeding input) sends what the session
        queued in reply.
        """
        for event in tunnel_events:
            if isinstance(event, events.DataReceived):
                self._on_data(event)
            elif isinstance(event, events.ResponseReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_response(event.status, event.reason)
                    self._forget_if_closed(stream)
            elif isinstance(event, events.StreamRequested):
                self._on_stream_requested(event)
            elif isinstance(event, events.StreamReset):
                stream = self._streams.pop(event.stream_id, None)
                if event.not_processed:  # the peer's GOAWAY left it out (logged once)
                    message = f"stream {event.stream_id} {event.reason}"
                elif event.reason:  # our reset, for what the peer sent
                    REFUSAL_LOG.log(
                        logging.WARNING,
                        "bad_answer",
                        "[%s] stream %d to %s: %s",
                        self._log_id,
                        event.stream_id,
                        self.peer_identity,
                        event.reason,
                    )
                    message = f"stream {event.stream_id}: {event.reason}"
                else:
                    # H3_CONNECT_ERROR: the TCP connection at the peer's end of the flow
                    # was reset or closed abnormally (RFC 9114 8.1): its destination's for
                    # a stream we opened, its client's for one it opened (that read
                    # "destination" too; and a reset mid-flow read "connect error").
                    kind = "reset"
                    if event.connect_error:
                        opened_here = stream is not None and stream.is_client
                        kind = "destination TCP reset" if opened_here else "client TCP reset"
                    message = (
                        f"stream {event.stream_id} {kind} by peer "
                        f"(error code {event.error_code:#x})"
                    )
                if stream is not None:
                    stream._on_reset(StreamReset(message, event.error_code))
            elif isinstance(event, events.PeerStoppedReading):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_peer_stopped_reading()
                    self._forget_if_closed(stream)
            elif isinstance(event, events.RequestRejected):
                # A peer can cause these at will: one line per interval, with a count.
                REFUSAL_LOG.log(
                    logging.WARNING,
                    "rejected",
                    "[%s] rejected stream %d from %s: %d %s",
                    self._log_id,
                    event.stream_id,
                    self.peer_identity,
                    event.status,
                    event.reason,
                )
                if self._rejected_hook is not None:
                    self._tell_rejected(self._rejected_hook, event.status, event.reason)
            elif isinstance(event, events.PeerGoingAway):
                self._on_peer_going_away(event.stream_id, event.notice)
            elif isinstance(event, events.ConnectionTerminated):
                reason = event.reason or f"error code {event.error_code:#x}"
                if event.by_peer:
                    self.on_connection_lost(ConnectionLost(f"connection closed by peer: {reason}"))
                else:
                    self._closed_for_violation(event.error_code, reason)
        self.stream_credit_changed()
        # No transmit here: both adaptors send right after feeding input to the session.
        if self._idle_waiter is not None:
            self._wake_if_idle()

    def _closed_for_violation(self, code: int, reason: str) -> None:
        """This side closed the connection (GOAWAY ``code``): the peer's traffic broke
        the protocol or its limits, and every stream went with it. One line naming the
        peer and what it did (rate-limited per code: a peer can cause these at will), as
        the QUIC connections say it; the streams fail with that reason."""
        PEER_VIOLATION_LOG.log(
            logging.WARNING,
            f"violation {code:#x}",
            "[%s] closed the connection with %s%s: %s (error code %#x)",
            self._log_id,
            self.peer_identity or "the peer",
            f" at {self.peer_address}" if self.peer_address else "",
            reason,
            code,
        )
        self.on_connection_lost(ConnectionLost(f"connection closed by us: {reason}"))

    def _tell_rejected(
        self, hook: Callable[[Any, int, str], None], status: int, reason: str
    ) -> None:
        try:
            hook(self, status, reason)
        except Exception:
            # The handler's bug, not the connection's: its other flows carry on.
            REFUSAL_LOG.log(
                logging.ERROR,
                "rejected_hook",
                "[%s] the handler's rejected hook failed",
                self._log_id,
                exc_info=True,
            )

    def _on_peer_going_away(self, stream_id: int, notice: bool = False) -> None:
        """The peer's GOAWAY: no new stream here (waiting opens fail, to go elsewhere);
        the open ones carry on (the peer resets any it will not process)."""
        goaway = "a GOAWAY notice" if notice else f"GOAWAY, stream {stream_id}"
        if self._going_away is None:
            self.log.info(
                "[%s] %s is going away (%s): no new flow on this connection, %d open carry on",
                self._log_id,
                self.peer_identity,
                goaway,
                len(self._streams),
            )
        self._going_away = f"the peer is going away ({goaway})"
        self._wake_credit()

    def _is_idle(self) -> bool:
        return not self._streams and self.session.is_idle()

    def _wake_if_idle(self) -> None:
        waiter = self._idle_waiter
        if waiter is not None and not waiter.done() and self._is_idle():
            waiter.set_result(None)

    @property
    def waits_for_stream_credit(self) -> bool:
        """Whether an :meth:`open_stream` call waits for the peer to allow a stream."""
        return self._credit is not None

    def stream_credit_changed(self) -> None:
        """The session may allow more streams now: wake :meth:`open_stream` calls
        waiting for credit, if one can proceed."""
        if self._credit is not None and self.can_open_stream:
            self._wake_credit()

    def transmitted(self) -> None:
        """Bytes left: wake the streams whose drain() waits (and a graceful close)."""
        if self._idle_waiter is not None:
            self._wake_if_idle()
        if self._drain_waiting:
            waiting, self._drain_waiting = self._drain_waiting, set()
            for stream in waiting:
                stream._on_writable()
                if stream._wants_writable:
                    self._drain_waiting.add(stream)

    def on_connection_lost(self, error: TunnelError) -> None:
        """The connection is gone: reset every stream with ``error``, wake waiters;
        :meth:`wait_closed` returns. Later calls change nothing."""
        if self._lost is not None:
            return
        self._lost = error
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._on_reset(StreamReset(f"stream {stream.stream_id} lost: {error}"))
        self._wake_credit()
        if self._idle_waiter is not None and not self._idle_waiter.done():
            self._idle_waiter.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)

    # -- StreamChannel -------------------------------------------------------

    def send_stream_data(self, stream: MeshStream, data: bytes, end_stream: bool) -> None:
        if self._lost is not None:
            raise self._lost
        self.session.send_data(stream.stream_id, data, end_stream)
        self._forget_if_closed(stream)
        self._schedule_transmit()

    def respond_stream(self, stream: MeshStream, status: int, reason: str) -> None:
        if self._lost is None:
            self.session.respond(stream.stream_id, status, reason)
            if status != 200:
                self._streams.pop(stream.stream_id, None)
            self._schedule_transmit()

    def reset_stream(self, stream: MeshStream, reason: ResetReason) -> None:
        self._streams.pop(stream.stream_id, None)
        if self._lost is None:
            self.session.reset_stream(stream.stream_id, reason)
            self._schedule_transmit()

    def stop_stream_reading(self, stream: MeshStream) -> None:
        if self._lost is None:
            self.session.stop_reading(stream.stream_id)
            self._forget_if_closed(stream)
            self._schedule_transmit()

    def stream_data_consumed(self, stream: MeshStream, amount: int) -> None:
        if self._lost is None and self.session.data_consumed(stream.stream_id, amount):
            self._schedule_transmit()

    def stream_closed(self, stream: MeshStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
        if self._idle_waiter is not None:
            self._wake_if_idle()

    def stream_waits_for_drain(self, stream: MeshStream) -> None:
        self._drain_waiting.add(stream)

    def can_splice_stream(self, stream: MeshStream) -> bool:
        """False: only a connection whose engine copies between sockets itself can."""
        return False

    def stream_spliced_bytes(self, stream: MeshStream) -> tuple[int, int] | None:
        """None: only a connection whose engine copies between sockets splices."""
        return None

    async def splice_stream(
        self,
        stream: MeshStream,
        sock: socket.socket | EngineSocket,
        pending: bytes,
        idle_timeout: float | None,
    ) -> SpliceOutcome:
        raise TunnelError(f"a {self.transport_name} connection cannot splice streams")

    async def connect_for_splice(
        self, stream: MeshStream, host: str, port: int, timeout: float
    ) -> EngineSocket | None:
        """None: only an engine that splices can connect for a splice."""
        return None

    async def connect_and_splice_stream(
        self,
        stream: MeshStream,
        host: str,
        port: int,
        timeout: float,
        idle_timeout: float | None,
    ) -> SpliceOutcome | None:
        """None: only an engine that splices can connect, answer and splice itself."""
        return None

    def stream_unsent_bytes(self, stream: MeshStream) -> int:
        if self._lost is not None:
            return 0
        return self.session.unsent_bytes(stream.stream_id)

    # -- internals -----------------------------------------------------------

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise ConnectionLost(str(self._lost))

    def _raise_if_closing(self) -> None:
        """No new stream here: the connection is lost, closing, or its peer going away."""
        self._raise_if_lost()
        if self._closing:
            raise ConnectionLost("the connection is closing: open the stream on another one")
        if self._going_away is not None:
            raise ConnectionLost(f"{self._going_away}: open the stream on another connection")

    def _wake_credit(self) -> None:
        if self._credit is not None and not self._credit.done():
            self._credit.set_result(None)
        self._credit = None

    def _schedule_transmit(self) -> None:
        if not self._transmit_scheduled and self._lost is None:
            self._transmit_scheduled = True
            self._loop.call_soon(self._scheduled_transmit)

    def _scheduled_transmit(self) -> None:
        self._transmit_scheduled = False
        if self._lost is None:
            self._transmit()

    def _forget_if_closed(self, stream: MeshStream) -> None:
        if stream.closed:
            self._streams.pop(stream.stream_id, None)

    def _on_data(self, event: events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            if event.data:
                self.session.data_consumed(event.stream_id, len(event.data))
            return
        if event.data:
            stream._on_data(event.data)
        if event.stream_ended:
            stream._on_eof()
        self._forget_if_closed(stream)

    def _authorized(self, target: str) -> bool:
        """The ``authorize`` callback's answer for our peer and ``target``. One that
        raises refuses the stream (logged with its traceback), as a handler that raises
        fails only its stream: it closed the whole connection, or left the stream
        unanswered."""
        if self._authorize is None:
            return True
        try:
            answer = self._authorize(self.peer_identity, target)
            if inspect.isawaitable(answer):  # (listen() refuses async functions; a
                # callable may still return an awaitable: fail closed, not "true")
                if inspect.iscoroutine(answer):
                    answer.close()
                raise TunnelUsageError("authorize returned an awaitable, not a bool")
            return bool(answer)
        except Exception:
            REFUSAL_LOG.log(
                logging.ERROR,
                "authorize_failed",
                "[%s] authorize failed for %s to %s: refused",
                self._log_id,
                self.peer_identity,
                target,
                exc_info=True,
            )
            return False

    def _on_stream_requested(self, event: events.StreamRequested) -> None:
        if self._handler is None:
            self.session.respond(event.stream_id, 403, "this peer accepts no streams")
            return
        if not self._authorized(event.target):
            REFUSAL_LOG.log(
                logging.WARNING,
                "unauthorized",
                "[%s] refused stream %d: %s may not reach %s",
                self._log_id,
                event.stream_id,
                self.peer_identity,
                event.target,
            )
            self.session.respond(
                event.stream_id, 403, f"{self.peer_identity} may not reach {event.target}"
            )
            return
        stream = MeshStream(
            self,
            stream_id=event.stream_id,
            target=event.target,
            headers=event.headers,
            peer_identity=self.peer_identity,
            is_client=False,
            high_water=self._high_water,
        )
        self._streams[event.stream_id] = stream
        self.streams_opened += 1
        task = self._loop.create_task(self._run_handler(self._handler, stream))
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)

    async def _run_handler(self, handler: StreamHandler, stream: MeshStream) -> None:
        try:
            await handler(stream)
        except asyncio.CancelledError:
            # The handler was abandoned (shutdown): the peer must not wait for it.
            stream.abort()
            raise
        except TunnelError as exc:
            self.log.info("stream %d to %s ended: %s", stream.stream_id, stream.target, exc)
            stream.abort()
        except Exception as exc:
            # Rate-limited: if a peer can make a handler fail, it can do so per stream;
            # per failure (the exception's type and where it was raised), so that a
            # second bug is logged too (one kind for all hid every other for 10 s).
            REFUSAL_LOG.log(
                logging.ERROR,
                f"handler_failed {_failure_site(exc)}",
                "[%s] handler failed on stream %d to %s",
                self._log_id,
                stream.stream_id,
                stream.target,
                exc_info=True,
            )
            if stream.closed:
                pass
            elif stream.is_closing():
                # Its answer was whole (half-closed) before it failed: the peer gets it;
                # only the reading stops.
                stream.close()
            else:
                try:
                    stream.refuse(500, "handler failed")
                except TunnelError:  # a part of an answer went: the peer must know
                    stream.abort()
        else:
            if not stream.closed:
                stream.close()


def _failure_site(exc: BaseException) -> str:
    """``ValueError at app.py:12``: an exception's type and the line that raised it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
    return f"{type(exc).__qualname__} at {where}"
