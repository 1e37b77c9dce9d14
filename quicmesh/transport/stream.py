"""MeshStream: one tunnelled flow, with asyncio stream semantics.

A :class:`MeshStream` is what an application holds for one flow, whichever
transport carries it. Reading follows :class:`asyncio.StreamReader` (``read``,
``readexactly``, ``at_eof``); writing follows :class:`asyncio.StreamWriter`
(``write``, ``drain``, ``write_eof``, ``close``, ``wait_closed``). The stream
talks to its connection through :class:`StreamChannel`, which every transport's
connection implements.

Backpressure works both ways: ``drain()`` waits while more than
``high_water`` bytes of this stream are still unsent, and the connection only
credits the peer (flow-control window) for bytes the application has read. (On
the native QUIC engine a reader that stops can have about twice ``stream_window``
held for it: one window in quinn, which the engine reads from for Python, and one
in the stream's buffer here; the other transports hold about one.)

Splicing: where the transport can copy a flow between the stream and a TCP
socket itself (the native QUIC engine), :meth:`MeshStream.can_splice` says so and
:meth:`MeshStream.splice_socket` hands both over; the application then sees only
the outcome (:class:`SpliceOutcome`). Other transports answer False and the
caller copies in Python (:func:`quicmesh.splice.splice` does either).
"""

from __future__ import annotations

import asyncio
import enum
import socket
import sys
from dataclasses import dataclass
from typing import Protocol, Self

from ..errors import (
    ConfigError,
    StreamRefused,
    StreamReset,
    StreamWriteStopped,
    TunnelError,
    TunnelUsageError,
)
from ..tunnel.connect import Target
from ..tunnel.session import ResetReason

MAX_IDLE_TIMEOUT = 86_400.0
"""The longest idle timeout a spliced flow takes (a day; None is no timeout at all)."""


def check_idle_timeout(idle_timeout: float | None) -> None:
    """:raises TunnelUsageError: ``idle_timeout`` is neither None nor positive seconds up
    to :data:`MAX_IDLE_TIMEOUT`."""
    if idle_timeout is None:
        return
    if (
        isinstance(idle_timeout, bool)
        or not isinstance(idle_timeout, int | float)
        or not 0 < idle_timeout <= MAX_IDLE_TIMEOUT
    ):
        raise TunnelUsageError(
            f"idle_timeout must be positive seconds up to {MAX_IDLE_TIMEOUT:g}, or None"
            f" (no timeout), not {idle_timeout!r}"
        )


DEFAULT_HIGH_WATER = 64 * 1024
"""Unsent bytes above which :meth:`MeshStream.drain` waits."""

DRAINS_BEFORE_YIELD = 16
"""``drain()`` calls in a row without a wait after which one lets the event loop run."""

LINGER_TIMEOUT = 2.0
"""Seconds a side that is done with a flow drops what its peer still sends without an
error: on QUIC and h2 the writer told to stop (STOP_SENDING, RST_STREAM with NO_ERROR)
has its writes discarded this long, then :meth:`MeshStream.drain` raises; TLS-over-TCP
keeps reading (and dropping) this long before it closes (nginx's and Apache's
lingering close)."""

MAX_SETTING_SECONDS = 86_400.0
"""The longest time in seconds a transport option takes (:func:`check_seconds`: a day)."""


# -- transport options -------------------------------------------------------------------
# Every transport checks its options when it is built, with these, so that a bad value
# is a ConfigError naming the option (not a TypeError, a hang or an engine's exception
# at the first connection).


def check_whole(name: str, value: object, low: int, high: int, *, span: str = "") -> None:
    """:raises ConfigError: ``value`` is not a whole number from ``low`` to ``high`` (the
    message says so, or ``{name} must be {span}`` when ``span`` is given)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        span = span or f"a whole number from {low} to {high}"
        raise ConfigError(f"{name} must be {span}, not {value!r}")


def _number(value: object) -> float | None:
    """``value`` as a number (an int or a float, not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def check_seconds(
    name: str, value: object, *, high: float | None = MAX_SETTING_SECONDS, zero: bool = False
) -> None:
    """:raises ConfigError: ``value`` is not a number of seconds above 0 (from 0 with
    ``zero``) up to ``high`` (None: any finite number)."""
    number = _number(value)
    limit = sys.float_info.max if high is None else high  # (inf and nan are refused)
    if number is None or not (number >= 0 if zero else number > 0) or not number <= limit:
        what = "0 or more seconds" if zero else "positive seconds"
        if high is not None:
            what = f"0 to {high:g} seconds" if zero else f"positive seconds up to {high:g}"
        raise ConfigError(f"{name} must be {what}, not {value!r}")


def check_positive(name: str, value: object) -> None:
    """:raises ConfigError: ``value`` is not a finite number above 0 (a rate)."""
    number = _number(value)
    if number is None or not 0 < number < float("inf"):
        raise ConfigError(f"{name} must be a positive number, not {value!r}")


@dataclass
class SpliceOutcome:
    """What a flow spliced by its transport carried (:meth:`MeshStream.splice_socket`)."""

    bytes_to_stream: int = 0
    """Bytes read from the socket and sent on the stream (payload)."""
    bytes_from_stream: int = 0
    """Bytes received on the stream and written to the socket (payload)."""
    error: str = ""
    """Empty when both directions finished cleanly, else why the flow was reset (both
    sides: the stream with RESET_STREAM/STOP_SENDING, the socket with RST)."""
    connected: bool = True
    """(:meth:`MeshStream.connect_and_splice`) The destination was connected: False when
    the flow was aborted while it connected (nothing was answered then)."""


class EngineSocket(Protocol):
    """A TCP connection a stream's transport made itself for a splice
    (:meth:`MeshStream.connect_for_splice`): held by the transport's engine until
    :meth:`MeshStream.splice_socket` hands it the stream too."""

    def detach(self) -> socket.socket | None:
        """Take the connection out of the engine as a socket of Python's own (to copy
        in Python after all); None if the engine no longer holds it."""

    def close(self) -> None:
        """Reset the connection (RST), unless it was spliced."""


class StreamChannel(Protocol):
    """What a stream asks of the connection that carries it."""

    transport_name: str

    @property
    def peer_address(self) -> str:
        """The peer's address (``host:port``), ``""`` if unknown."""

    def send_stream_data(self, stream: MeshStream, data: bytes, end_stream: bool) -> None:
        """Queue bytes (and the half-close) on the stream."""

    def respond_stream(self, stream: MeshStream, status: int, reason: str) -> None:
        """(server) Answer the stream's CONNECT."""

    def reset_stream(self, stream: MeshStream, reason: ResetReason) -> None:
        """Abort the stream in both directions."""

    def stop_stream_reading(self, stream: MeshStream) -> None:
        """Discard further input on the stream."""

    def stream_data_consumed(self, stream: MeshStream, amount: int) -> None:
        """The application has read ``amount`` bytes."""

    def stream_unsent_bytes(self, stream: MeshStream) -> int:
        """Bytes written to the stream and not yet sent."""

    def stream_spliced_bytes(self, stream: MeshStream) -> tuple[int, int] | None:
        """(to the stream, from it) the engine moved so far while it splices the stream;
        None when it does not."""

    def stream_closed(self, stream: MeshStream) -> None:
        """Both directions of the stream are finished: forget it."""

    def stream_waits_for_drain(self, stream: MeshStream) -> None:
        """Call ``stream._on_writable()`` after the next bytes leave."""

    def can_splice_stream(self, stream: MeshStream) -> bool:
        """Whether the connection can splice the stream onto a socket now."""

    async def splice_stream(
        self,
        stream: MeshStream,
        sock: socket.socket | EngineSocket,
        pending: bytes,
        idle_timeout: float | None,
    ) -> SpliceOutcome:
        """Copy between the stream and ``sock`` (taken over) until both directions end
        (or no byte moved for ``idle_timeout`` seconds: a failure);
        ``pending`` was read from ``sock`` and goes first. Collects what the stream
        buffered with :meth:`MeshStream._hand_over` once nothing more arrives for it."""

    async def connect_for_splice(
        self, stream: MeshStream, host: str, port: int, timeout: float
    ) -> EngineSocket | None:
        """Connect to ``host:port`` from the engine that would splice the stream, or
        None where it cannot (the caller connects itself).

        :raises OSError: the connect failed (:class:`TimeoutError` after ``timeout``)."""

    async def connect_and_splice_stream(
        self,
        stream: MeshStream,
        host: str,
        port: int,
        timeout: float,
        idle_timeout: float | None,
    ) -> SpliceOutcome | None:
        """(server) Connect to ``host:port``, accept the stream's CONNECT once connected
        and splice it onto the connection, all in the engine; None where it cannot (the
        stream is untouched).

        :raises OSError: the connect failed (the stream is unanswered)."""


class _Response(enum.Enum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REFUSED = "refused"


class MeshStream:
    """One flow tunnelled to or from a peer sidecar.

    :ivar target: the CONNECT target, a :class:`~quicmesh.tunnel.connect.Target`: the
        ``host:port`` string itself, with its parsed ``host`` and ``port``. Parsed
        once (by the opener, or by the tunnel session from the request), never again.
    :ivar headers: the extra request headers, lower-cased.
    :ivar peer_identity: the peer sidecar's SPIFFE ID.
    :ivar stream_id: the transport's stream identifier (for logs).
    """

    def __init__(
        self,
        channel: StreamChannel,
        *,
        stream_id: int,
        target: Target,
        headers: dict[str, str],
        peer_identity: str,
        is_client: bool,
        high_water: int = DEFAULT_HIGH_WATER,
    ) -> None:
        self.stream_id = stream_id
        self.target = target
        self.headers = headers
        self.peer_identity = peer_identity
        self.is_client = is_client
        self.bytes_received = 0
        self.bytes_sent = 0
        self._channel = channel
        self._high_water = high_water
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._credited_ahead = 0
        """Bytes at the front of the buffer whose credit the peer already has."""
        self._eof_received = False
        self._eof_sent = False
        self._peer_stopped_reading = False
        self._closed_here = False
        """:meth:`close` was called: a :meth:`drain` does not wait."""
        self._writing_stopped_at: float | None = None
        """(loop time) When the peer told us to stop sending while we still wrote (our
        side not half-closed yet)."""
        self._reading_stopped = False
        self._error: TunnelError | None = None
        self._input_complete_at_failure = False
        """The peer's FIN was in when the stream failed (reset by the peer, its connection
        lost): reads still give what came, then EOF."""
        self._response = _Response.PENDING
        self._responded = self._loop.create_future()
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._drain_waiters = 0
        self._drains_unwaited = 0
        """drain() calls in a row that did not wait (:meth:`drain`)."""
        self._closed = self._loop.create_future()
        self._spliced = False

    @property
    def peer_address(self) -> str:
        """The address of the peer sidecar carrying this flow now (``host:port``), or ``""``."""
        return self._channel.peer_address

    def __repr__(self) -> str:
        side = "client" if self.is_client else "server"
        return f"<MeshStream {side} id={self.stream_id} target={self.target}>"

    # -- the peer's answer ---------------------------------------------------

    async def wait_accepted(self) -> None:
        """Wait for the CONNECT to be answered; raise StreamRefused if it was refused."""
        await asyncio.shield(self._responded)
        if self._error is not None and self._response is not _Response.ACCEPTED:
            raise self._error

    def accept(self) -> None:
        """(server) Answer the CONNECT with 200 and open the tunnel.

        Reading or writing accepts implicitly; call this to accept early.
        """
        if self._response is _Response.PENDING and not self.is_client:
            self._response = _Response.ACCEPTED
            self._channel.respond_stream(self, 200, "")
            self._set_responded()

    def refuse(self, status: int, reason: str = "") -> None:
        """(server) Answer the CONNECT with an error status (4xx/5xx) and end the stream."""
        if self.is_client:
            raise TunnelError("only the accepting side can refuse a stream")
        if not 400 <= status <= 599:
            raise ValueError(f"refusal status must be 4xx or 5xx, not {status}")
        if self._response is not _Response.PENDING:
            raise TunnelError(f"stream {self.stream_id} was already answered")
        self._response = _Response.REFUSED
        self._channel.respond_stream(self, status, reason)
        self._eof_sent = True
        self._reading_stopped = True
        self._fail(StreamRefused(status, reason))

    # -- reading -------------------------------------------------------------

    def at_eof(self) -> bool:
        """True when the peer half-closed and every byte has been read, or once this
        side stopped reading (:meth:`close`)."""
        return self._input_over and not self._buffer

    @property
    def _input_over(self) -> bool:
        """Nothing more will be read: the peer's FIN came, or :meth:`close` stopped
        reading (a read then ends as at EOF, as on a closed asyncio stream)."""
        return self._eof_received or self._reading_stopped

    async def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (at least one unless at EOF); ``n=-1`` reads to EOF.
        Interrupted (cancelled, or the stream failed), a read to EOF leaves what it took
        in the stream for the next read, as :meth:`readexactly` does (it was lost)."""
        self.accept()
        if n == 0:
            return b""
        if n < 0:
            taken = bytearray()
            try:
                while True:
                    chunk = await self.read(1 << 20)
                    if not chunk:
                        return bytes(taken)
                    taken += chunk
            except BaseException:
                self._put_back(taken)
                raise
        while not self._buffer and not self._input_over:
            self._raise_read_error()
            await self._wait_readable()
        self._raise_read_error()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        if data:
            self._consumed(len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes; :class:`asyncio.IncompleteReadError` at an early EOF.

        Bytes are taken, and their credit given back to the peer, as they arrive, so
        ``n`` may exceed the receive window. Interrupted (cancelled, or the stream
        failed), the call leaves what it took in the stream for the next read.
        """
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        self.accept()
        collected = bytearray()
        try:
            while len(collected) < n:
                self._raise_read_error()
                if self._buffer:
                    taken = self._buffer[: n - len(collected)]
                    del self._buffer[: len(taken)]
                    self._consumed(len(taken))
                    collected += taken
                elif self._input_over:
                    break
                else:
                    await self._wait_readable()
        except BaseException:
            self._put_back(collected)
            raise
        if len(collected) < n:
            raise asyncio.IncompleteReadError(bytes(collected), n)
        return bytes(collected)

    def _put_back(self, taken: bytearray) -> None:
        """Bytes an interrupted read took go back to the front of the buffer (their
        credit was given when they were taken)."""
        self._buffer[:0] = taken
        self._credited_ahead += len(taken)

    def _consumed(self, amount: int) -> None:
        """Give the peer credit for ``amount`` bytes taken from the buffer, less those
        an interrupted :meth:`readexactly` put back (credited when it took them)."""
        ahead = min(amount, self._credited_ahead)
        self._credited_ahead -= ahead
        if amount > ahead:
            self._channel.stream_data_consumed(self, amount - ahead)

    async def _wait_readable(self) -> None:
        if self._read_waiter is not None:
            # As asyncio's StreamReader: which of two readers would get the bytes?
            raise RuntimeError("a read called while another task is already reading this stream")
        waiter = self._read_waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            if self._read_waiter is waiter:
                self._read_waiter = None

    # -- writing -------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for the peer; call :meth:`drain` to respect backpressure.

        :raises TypeError: ``data`` is not bytes-like (a ``str``, say), before anything
            is accepted, counted or sent, as :meth:`asyncio.StreamWriter.write` does.
        """
        if not isinstance(data, bytes):
            try:
                data = memoryview(data).tobytes()  # counted in bytes, whatever its format
            except TypeError:
                raise TypeError(
                    f"data must be a bytes-like object, not {type(data).__name__!r}"
                ) from None
        self._raise_error()
        if self._peer_stopped_reading:
            return  # the peer asked for no more bytes: discard, as HTTP/3 allows
        if self._eof_sent:
            done = "close()" if self._closed_here else "write_eof()"
            raise TunnelError(f"stream {self.stream_id}: write after {done}")
        if not data:
            return
        self.accept()
        self.bytes_sent += len(data)
        self._channel.send_stream_data(self, data, False)

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after the bytes already written."""
        if self._eof_sent or self._error is not None:
            return
        self.accept()
        self._eof_sent = True
        self._channel.send_stream_data(self, b"", True)
        self._maybe_closed()

    def can_write_eof(self) -> bool:
        """Always True: every transport supports half-close."""
        return True

    @property
    def transport(self) -> str:
        """The name of the transport carrying the stream: ``quic``, ``h2`` or ``tcp``."""
        return self._channel.transport_name

    @property
    def channel(self) -> StreamChannel:
        """The connection carrying this stream (to group a peer's flows by connection)."""
        return self._channel

    @property
    def buffered_bytes(self) -> int:
        """Bytes this stream holds in memory: received and not read, written and not sent."""
        return len(self._buffer) + self._channel.stream_unsent_bytes(self)

    async def drain(self) -> None:
        """Wait until this stream's unsent bytes fall to the high-water mark.

        Every :data:`DRAINS_BEFORE_YIELD` calls in a row that did not wait, it lets the
        event loop run once anyway: the transport may drop what is written before this
        stream hears why (the peer's STOP_SENDING or reset, on its way in a batch of
        events), and a ``write(); await drain()`` loop that never waited then never let
        that news in (a review froze the native engine's event loop with 200 such
        handlers). Not on every call: a loop turn per chunk cost the Python copy path.
        """
        if await self._wait_unsent_at_most(self._high_water):
            self._drains_unwaited = 0
            self._raise_if_discarding_too_long()
            return
        self._drains_unwaited += 1
        if self._drains_unwaited >= DRAINS_BEFORE_YIELD:
            self._drains_unwaited = 0
            await asyncio.sleep(0)
            self._raise_error()

    def _raise_if_discarding_too_long(self) -> None:
        """The peer told us to stop sending (it answered and needs nothing more: RFC 9114
        4.1.2, RFC 9113 8.1) while we still wrote, :data:`LINGER_TIMEOUT` or more ago: a
        writer that never stops (``while True: write(); await drain()``) learns of it,
        as TLS-over-TCP's does once its peer's lingering close ends (broken pipe). A
        finite upload cut short by an early answer still ends quietly, and the answer can
        be read. (Its writes were discarded without an error for as long as it wrote: a
        review's uploader ran at a whole core for ever.)"""
        stopped = self._writing_stopped_at
        if stopped is None:
            return
        ago = self._loop.time() - stopped
        if ago >= LINGER_TIMEOUT:
            raise StreamWriteStopped(
                f"stream {self.stream_id}: the peer stopped reading {ago:.1f}s ago (it"
                " answered and needs no more of our bytes): what is written is discarded",
                0,
            )

    def drain_would_wait(self) -> bool:
        """Whether :meth:`drain` would wait now (more than ``high_water`` bytes unsent,
        and the peer still reading)."""
        return (
            self._error is None
            and not self._peer_stopped_reading
            and self._channel.stream_unsent_bytes(self) > self._high_water
        )

    async def wait_sent(self) -> None:
        """Wait until every byte written so far has been handed to the network.

        Delivery to the peer is the connection's business: close it with
        :meth:`~quicmesh.PeerConnection.aclose` to wait for that too.
        """
        await self._wait_unsent_at_most(0)

    async def _wait_unsent_at_most(self, limit: int) -> bool:
        """Wait until at most ``limit`` bytes are unsent; whether it let the loop run."""
        self._raise_error()
        if self._peer_stopped_reading:
            # Writes are discarded from now on: yield to the event loop anyway, so that
            # a ``write(); await drain()`` loop lets the others run (asyncio's
            # StreamWriter.drain does the same on a closing transport).
            await asyncio.sleep(0)
            return True
        waited = False
        while (
            not self._peer_stopped_reading
            and not (self._closed_here and limit > 0)  # (drain(); wait_sent() still waits)
            and self._channel.stream_unsent_bytes(self) > limit
        ):
            waited = True
            # One future for every task waiting here (drain() and wait_sent() from
            # several tasks, as asyncio's StreamWriter.drain allows).
            waiter = self._drain_waiter
            if waiter is None or waiter.done():
                waiter = self._drain_waiter = self._loop.create_future()
                self._channel.stream_waits_for_drain(self)
            self._drain_waiters += 1
            try:
                await asyncio.shield(waiter)
            finally:
                self._drain_waiters -= 1
                if not self._drain_waiters:
                    self._drain_waiter = None
            self._raise_error()
        return waited

    # -- splicing ------------------------------------------------------------

    def can_splice(self) -> bool:
        """Whether :meth:`splice_socket` can hand this flow to its transport now: the
        transport can (the native QUIC engine), the CONNECT was accepted (or, on the
        accepting side, is accepted by splicing), and nothing was half-closed, stopped
        or failed yet."""
        answered = self._response is _Response.ACCEPTED
        return (
            (answered or (self._response is _Response.PENDING and not self.is_client))
            and self._error is None
            and not self._eof_sent
            and not self._reading_stopped
            and not self._peer_stopped_reading
            and not self._spliced
            and self._channel.can_splice_stream(self)
        )

    async def connect_for_splice(self, host: str, port: int, timeout: float) -> EngineSocket | None:
        """(server) Connect to ``host:port`` (an IP address) from the transport's own
        engine, for :meth:`splice_socket`: no socket object or descriptor passes
        through Python. None where the transport cannot (:meth:`can_splice` is False,
        or ``host`` is a name): the caller connects itself.

        :raises OSError: the connect failed (:class:`TimeoutError` after ``timeout``
            seconds).
        """
        if not self.can_splice():
            return None
        return await self._channel.connect_for_splice(self, host, port, timeout)

    async def connect_and_splice(
        self, host: str, port: int, timeout: float, *, idle_timeout: float | None = None
    ) -> SpliceOutcome | None:
        """(server) Connect to ``host:port`` (an IP address) from the transport's own
        engine, accept the CONNECT once connected and splice the flow onto the
        connection: :meth:`connect_for_splice`, :meth:`accept` and :meth:`splice_socket`
        in one step that the engine runs without returning to Python in between. None
        where the transport cannot (as :meth:`connect_for_splice`), on the opening side,
        or once the CONNECT was answered: nothing was done then.
        Returns as :meth:`splice_socket` (``idle_timeout`` as there).

        :raises OSError: the connect failed (:class:`TimeoutError` after ``timeout``
            seconds): the CONNECT is unanswered, for the caller to :meth:`refuse`.
        :raises TunnelError: the stream failed before the engine took it.
        """
        check_idle_timeout(idle_timeout)
        if self.is_client or not self.can_splice() or self._response is not _Response.PENDING:
            return None
        self._spliced = True
        try:
            outcome = await self._channel.connect_and_splice_stream(
                self, host, port, timeout, idle_timeout
            )
        except OSError:
            self._spliced = False
            raise
        if outcome is None:
            self._spliced = False
            return None
        if outcome.connected:  # the engine sent the 200
            self._response = _Response.ACCEPTED
            self._set_responded()
        return self._spliced_outcome(outcome)

    async def splice_socket(
        self,
        sock: socket.socket | EngineSocket,
        pending: bytes = b"",
        *,
        idle_timeout: float | None = None,
    ) -> SpliceOutcome:
        """Let the transport copy this flow to and from a connected TCP socket itself.

        The transport takes ``sock`` over (it is closed here) and copies both ways
        with the same semantics as :func:`quicmesh.splice.splice`: half-close each
        way, backpressure, and on a failure a reset of both sides. ``sock`` may be one
        the transport connected itself (:meth:`connect_for_splice`). ``pending`` holds
        bytes already read from ``sock``: they are sent first. Bytes this stream
        received and nobody read yet are written to ``sock`` first. Returns once both
        directions ended; the stream is then closed (or failed, with the outcome's
        error). :meth:`abort` fails a spliced flow too, and so does ``idle_timeout``
        seconds with no byte moving either way (None: never).

        :raises TunnelUsageError: ``idle_timeout`` is out of range (nothing was done).

        :raises TunnelError: the stream cannot be spliced (:meth:`can_splice`), or it
            failed before the transport took it (``sock`` is then still open).
        """
        check_idle_timeout(idle_timeout)
        if not self.can_splice():
            raise TunnelError(f"stream {self.stream_id} cannot be spliced now")
        self.accept()  # (server) the 200 goes out before the engine takes the stream
        self._spliced = True
        return self._spliced_outcome(
            await self._channel.splice_stream(self, sock, pending, idle_timeout)
        )

    def spliced_bytes(self) -> tuple[int, int] | None:
        """While the transport's engine splices this flow (:meth:`splice_socket`,
        :meth:`connect_and_splice`): (bytes read from the socket and sent on the
        stream, bytes received and written to the socket) so far, as the outcome will
        count them; None before and after (then :attr:`bytes_sent` and
        :attr:`bytes_received` count them)."""
        return self._channel.stream_spliced_bytes(self) if self._spliced else None

    def _spliced_outcome(self, outcome: SpliceOutcome) -> SpliceOutcome:
        """Count a splice's bytes and end the stream as its outcome says."""
        self.bytes_sent += outcome.bytes_to_stream
        self.bytes_received += outcome.bytes_from_stream
        if outcome.error:
            self._fail(StreamReset(outcome.error))
        else:
            self._eof_sent = self._eof_received = True
            self._set_closed()
        return outcome

    def _hand_over(self) -> tuple[bytes, bool]:
        """(splicing) The bytes received and not read, and whether the peer's FIN is in;
        the stream keeps none of them. Raises the stream's error if it failed."""
        self._raise_error()
        data = bytes(self._buffer)
        self._buffer.clear()
        self.bytes_received -= len(data)  # counted again in the splice's outcome
        return data, self._eof_received

    # -- closing -------------------------------------------------------------

    def abort(self, reason: ResetReason = ResetReason.CANCELLED) -> None:
        """Reset the stream in both directions; the peer sees an error on read.

        :raises TypeError: ``reason`` is not a :class:`~quicmesh.ResetReason` (checked
            before anything is reset).
        """
        if not isinstance(reason, ResetReason):
            raise TypeError(f"abort() takes a ResetReason, not {type(reason).__name__}")
        if self._closed.done():
            return
        self._channel.reset_stream(self, reason)
        self._fail(StreamReset(f"stream {self.stream_id} aborted locally ({reason.value})"))

    def close(self) -> None:
        """Half-close our side and stop reading (bytes not read yet are dropped): the
        stream counts as closed at once (:attr:`closed`, :meth:`wait_closed`), while the
        bytes written before go out in the background, as long as the connection lasts
        (unlike asyncio's ``writer.close(); await writer.wait_closed()``, that does not
        wait for them: use :meth:`wait_sent`, or :meth:`write_eof` and read to EOF)."""
        self.write_eof()
        self._closed_here = True
        # A drain() waiting returns (the native engine's did; the others waited for as
        # long as the peer did not read): the bytes go out in the background.
        self._wake_drainers()
        if not self._eof_received and not self._reading_stopped and self._error is None:
            self._reading_stopped = True
            self._channel.stop_stream_reading(self)
        if self._buffer:
            # Unread bytes are dropped: credit them so the connection window does not shrink.
            self._consumed(len(self._buffer))
            self._buffer.clear()
        self._wake_reader()  # a read waiting ends as at EOF
        self._maybe_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        """``async with await conn.open_stream(target) as stream:`` closes the stream at
        the block's end (:meth:`close`: what was written still goes out), or aborts it
        (:meth:`abort`, a reset both ways) when the block raised."""
        if exc_type is not None and self._error is None and not self._closed.done():
            self.abort()
        else:
            self.close()

    def exception(self) -> TunnelError | None:
        """Why the stream failed (reset by either side, refused, its connection lost), as
        :meth:`asyncio.StreamReader.exception`; None while it has not."""
        return self._error

    def is_closing(self) -> bool:
        """True once our side is half-closed, closed or aborted."""
        return self._eof_sent or self._error is not None

    async def wait_closed(self) -> None:
        """Wait until both directions are finished (FIN or reset each way)."""
        await asyncio.shield(self._closed)

    @property
    def closed(self) -> bool:
        """True once both directions are finished."""
        return self._closed.done()

    # -- fed by the connection -----------------------------------------------

    def _on_response(self, status: int, reason: str) -> None:
        if self._response is not _Response.PENDING:
            return
        if status == 200:
            self._response = _Response.ACCEPTED
            self._set_responded()
        else:
            self._response = _Response.REFUSED
            self._fail(StreamRefused(status, reason, peer_identity=self.peer_identity))

    def _on_data(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self._reading_stopped:
            self._channel.stream_data_consumed(self, len(data))
            return
        self._buffer += data
        self._wake_reader()

    def _on_eof(self) -> None:
        self._eof_received = True
        self._wake_reader()
        self._maybe_closed()

    def _on_peer_stopped_reading(self) -> None:
        if not self._eof_sent:
            self._writing_stopped_at = self._loop.time()
        self._peer_stopped_reading = True
        self._eof_sent = True
        self._wake_drainers()
        self._maybe_closed()

    def _on_reset(self, error: TunnelError) -> None:
        if self._error is None and not self._closed.done():
            # Every byte of the peer's side came (its FIN too): a failure after that, its
            # connection closed say, takes the writing side, not a complete answer
            # (RFC 9000 3.2 "Data Recvd"; TLS-over-TCP delivered it, QUIC and h2 did not).
            self._input_complete_at_failure = self._eof_received
        self._fail(error)

    def _on_writable(self) -> None:
        # Bytes left: the waiter re-checks its own limit (high water, or 0 for wait_sent).
        self._wake_drainers()

    @property
    def _wants_writable(self) -> bool:
        return self._drain_waiter is not None and not self._drain_waiter.done()

    # -- internals -----------------------------------------------------------

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _raise_read_error(self) -> None:
        if self._error is not None and not self._input_complete_at_failure:
            raise self._error

    def _set_responded(self) -> None:
        if not self._responded.done():
            self._responded.set_result(None)

    def _wake_drainers(self) -> None:
        """Wake the tasks in :meth:`drain` and :meth:`wait_sent`: each looks again at
        what it waits for (unsent bytes under its limit, the peer's stop, a failure)."""
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter, self._read_waiter = self._read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: TunnelError) -> None:
        if self._error is None and not self._closed.done():
            self._error = error
        self._set_responded()
        self._wake_reader()
        self._wake_drainers()
        self._set_closed()

    def _maybe_closed(self) -> None:
        if self._eof_sent and self._input_over:
            self._set_closed()

    def _set_closed(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
            self._channel.stream_closed(self)
