"""Pump a MeshStream to and from an asyncio TCP connection.

:func:`splice` is what a proxy does with each flow: bytes from the local TCP
peer go into the tunnel and bytes from the tunnel go to the local peer, each
direction with backpressure (``drain``) and half-close (EOF one way does not
end the other). If either side fails, the flow is reset on both sides.

Where the stream's transport can copy between sockets itself (the native QUIC
engine: :meth:`~quicmesh.transport.stream.MeshStream.can_splice`) and
``offload`` allows it, the TCP socket is handed to the transport instead (with
the bytes already read from it), and the same semantics hold without a byte
passing through Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import cast

from .errors import QuicmeshError, StreamWriteStopped, TunnelError
from .transport._socket_errors import SocketErrorWatch
from .transport.stream import EngineSocket, MeshStream, check_idle_timeout
from .tunnel.session import ResetReason

CHUNK = 64 * 1024


IDLE_TIMEOUT_REASON = "idle timeout: "
"""How the error of a flow reset for its idle timeout begins (the native engine's too)."""


class FlowIdle(Exception):
    """No byte moved either way for the flow's idle timeout."""

    def __init__(self, idle_timeout: float) -> None:
        super().__init__(f"{IDLE_TIMEOUT_REASON}no bytes either way for {idle_timeout:g}s")


class IdleClock:
    """When a flow's bytes last moved, and the wait that fails it once they have not for
    its idle timeout (Envoy's ``tcp_proxy`` ``idle_timeout``).

    :param handed_off: the bytes the flow's writers have handed on so far (written and
        no longer buffered): looked at every quarter of the timeout, so that a slow
        reader taking a little at a time while a write waits keeps the flow alive (and
        bytes a writer sends after its write returned count when they leave). A flow is
        failed between one and one and a quarter timeouts after its last bytes.
    """

    def __init__(self, idle_timeout: float, handed_off: Callable[[], int]) -> None:
        check_idle_timeout(idle_timeout)
        self.idle_timeout = idle_timeout
        self._handed_off = handed_off
        self._loop = asyncio.get_running_loop()
        self._last_moved = self._loop.time()

    def moved(self) -> None:
        """Bytes were read or written, either way."""
        self._last_moved = self._loop.time()

    async def expired(self) -> None:
        """Raises :class:`FlowIdle` once no byte moved for the idle timeout."""
        handed_off = self._handed_off()
        while (left := self._last_moved + self.idle_timeout - self._loop.time()) > 0:
            await asyncio.sleep(min(left, self.idle_timeout / 4))
            if (now := self._handed_off()) != handed_off:
                handed_off = now
                self.moved()  # handed on since the last look: no later than now
        raise FlowIdle(self.idle_timeout)


def idle_watch(
    idle_timeout: float | None, handed_off: Callable[[], int]
) -> tuple[Callable[[], None], list[Coroutine[None, None, None]]]:
    """A flow copy's hook for bytes moving and the watchers that fail it once idle
    (:class:`IdleClock`; with no timeout, a hook that does nothing and no watcher)."""
    if idle_timeout is None:
        return _nothing, []
    clock = IdleClock(idle_timeout, handed_off)
    return clock.moved, [clock.expired()]


async def run_copies(
    copies: list[Coroutine[None, None, None]], watchers: list[Coroutine[None, None, None]]
) -> None:
    """Run a flow's copies until each ended, and ``watchers`` (which only end by raising)
    beside them: the first exception of any raises here. Every task is cancelled and
    awaited on the way out."""
    copy_tasks = [asyncio.ensure_future(copy) for copy in copies]
    tasks = [*copy_tasks, *map(asyncio.ensure_future, watchers)]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while not all(task.done() for task in copy_tasks):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if (exc := task.exception()) is not None:
                    raise exc
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


@dataclass
class SpliceResult:
    """What one spliced flow carried."""

    bytes_to_stream: int = 0
    """Bytes read from the TCP side and written into the tunnel."""
    bytes_from_stream: int = 0
    """Bytes read from the tunnel and written to the TCP side."""
    error: str = ""
    """Empty when both directions finished cleanly, else why the flow was reset."""
    offloaded: bool = False
    """The stream's transport copied the bytes itself (:meth:`MeshStream.splice_socket`)."""
    connected: bool = True
    """A destination connection was made (False: :func:`connect_and_splice`'s flow
    ended before its connect completed)."""


async def splice(
    stream: MeshStream,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    offload: bool = True,
    idle_timeout: float | None = None,
    progress: SpliceResult | None = None,
) -> SpliceResult:
    """Copy bytes both ways between ``stream`` and a TCP connection until both ends close.

    Returns byte counts and the error that ended the flow, if any. On an error the
    stream is aborted (the peer sees a reset) and the TCP connection is closed
    with a reset, so neither side mistakes a failed flow for a complete one.

    :param offload: let the stream's transport copy the flow itself when it can
        (:meth:`MeshStream.can_splice`); False always copies here.
    :param idle_timeout: seconds with no byte read or written either way after which
        the flow fails as above (Envoy's ``tcp_proxy`` ``idle_timeout``); None: never.
    :param progress: counted into as bytes move, for the caller to read while the flow
        runs (:func:`moved_so_far`); the result when the flow was copied here.
    :raises TunnelUsageError: ``idle_timeout`` is out of range (nothing was done).
    """
    check_idle_timeout(idle_timeout)
    if offload and stream.can_splice():
        offloaded = await _offload(stream, reader, writer, idle_timeout)
        if offloaded is not None:
            return offloaded
    result = progress if progress is not None else SpliceResult()

    def handed_off() -> int:
        unsent = stream.channel.stream_unsent_bytes(stream)
        return result.bytes_to_stream - unsent + result.bytes_from_stream - unwritten_bytes(writer)

    moved, idle_watchers = idle_watch(idle_timeout, handed_off)

    # The copy from TCP stops reading the socket while the stream waits for its peer's
    # credit: a reset then was heard once the peer read again, or at the idle timeout (a
    # review). A watch, made at the flow's first such wait, fails the copy at once.
    watch: list[SocketErrorWatch] = []
    reset: list[OSError] = []

    async def tcp_to_stream() -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    stream.write_eof()
                    return
                moved()
                result.bytes_to_stream += len(data)
                stream.write(data)
                if not watch and stream.drain_would_wait():
                    sock = writer.get_extra_info("socket")
                    task = asyncio.current_task()
                    if sock is not None and task is not None:
                        watch.append(SocketErrorWatch(sock, _failing(task, reset)))
                with contextlib.suppress(StreamWriteStopped):
                    # The peer answered and needs no more: the client's upload is dropped
                    # until it ends it, the answer still relayed, as the native engine's
                    # splice does (a drain that gave up after the linger reset the flow,
                    # and the client lost the answer; a review).
                    await stream.drain()
                moved()
        except asyncio.CancelledError:
            if reset:
                error = reset[0]
                raise OSError(error.errno, f"TCP connection: {error.strerror}") from None
            raise

    async def stream_to_tcp() -> None:
        while True:
            data = await stream.read(CHUNK)
            if not data:
                if writer.can_write_eof():
                    _write_eof(writer)
                return
            moved()
            result.bytes_from_stream += len(data)
            with _tcp_reset_as_os_error(writer):
                writer.write(data)
            await writer.drain()
            moved()

    async def stream_failure() -> None:
        # A stream that fails while neither copy waits on it (its input over, the TCP
        # side idle or not reading) wakes none of them: the flow was held for ever.
        await stream.wait_closed()
        if (error := stream.exception()) is not None:
            raise error

    try:
        try:
            await run_copies([tcp_to_stream(), stream_to_tcp()], [stream_failure(), *idle_watchers])
        finally:
            for made in watch:
                made.close()
    except (TunnelError, OSError, asyncio.IncompleteReadError, FlowIdle) as exc:
        result.error = str(exc) or type(exc).__name__
        is_tcp_error = isinstance(exc, OSError)
        stream.abort(ResetReason.CONNECT_ERROR if is_tcp_error else ResetReason.CANCELLED)
        _reset_tcp(writer)
    except BaseException:
        # Abandoned (the caller's task was cancelled), or a fault of ours: reset both
        # sides, not leak them (the TCP side through its transport, which owns it).
        stream.abort()
        _reset_tcp(writer)
        raise
    if not result.error:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        stream.close()
    return result


def _failing(task: asyncio.Task[None], errors: list[OSError]) -> Callable[[OSError], None]:
    """A :class:`SocketErrorWatch`'s callback: keep the error, cancel ``task`` (which
    raises it in place of the cancellation)."""

    def failed(error: OSError) -> None:
        errors.append(error)
        task.cancel()

    return failed


@contextlib.contextmanager
def _tcp_reset_as_os_error(writer: asyncio.StreamWriter) -> Iterator[None]:
    """A write to a TCP connection its peer reset: uvloop raises RuntimeError ("unable
    to perform operation on <TCPTransport closed=True ...>; the handler is closed")
    where asyncio's own transports drop the bytes and let ``drain()`` raise
    ``ConnectionResetError``. Taken as that OSError, so the flow is reset on both sides;
    uncaught, it escaped the splice and the flow's stream, and the peer's side with its
    destination connection, were held for ever (a soak review: hundreds of flows a
    sidecar)."""
    try:
        yield
    except RuntimeError as exc:
        if not writer.transport.is_closing():
            raise
        raise ConnectionResetError(errno.ECONNRESET, f"TCP connection closed: {exc}") from None


def _write_eof(writer: asyncio.StreamWriter) -> None:
    """The stream's FIN -> the TCP half-close, where a peer that closed first is no failure
    (the twin of the native engine's ``shut_write``, native/src/splice.rs).

    A TCP peer that closed in order (its FIN came) answers the bytes written to it after
    with RST, and the socket is no longer connected: ``shutdown(SHUT_WR)`` fails with
    ENOTCONN, the socket's pending error being EPIPE (Linux's ``tcp_reset`` in CLOSE_WAIT,
    the FIN before the RST). The peer said all it would: the flow ended in order. asyncio's
    own loop raised that ENOTCONN here (the flow was logged ``reset``, "[Errno 107]
    Transport endpoint is not connected") where uvloop drops the shutdown's error. A peer
    that reset without a FIN first leaves ECONNRESET pending: that fails the flow, named
    (as any other pending error does, as in ``shut_write``); other errors of the
    half-close, or ENOTCONN with none pending, fail it as before. (A write that meets
    EPIPE fails the flow: that is ``drain()``'s.)
    """
    try:
        with _tcp_reset_as_os_error(writer):
            writer.write_eof()
    except OSError as exc:
        sock = writer.get_extra_info("socket")
        if exc.errno != errno.ENOTCONN or sock is None:
            raise
        try:
            pending = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            raise exc from None
        if pending == errno.EPIPE:
            return
        if pending:
            raise OSError(pending, os.strerror(pending)) from None
        raise


def moved_so_far(stream: MeshStream, progress: SpliceResult) -> tuple[int, int]:
    """(to the stream, from it): what a flow spliced with ``progress`` moved so far, the
    engine's count while the stream's transport splices it, else the copy's here (the
    engine's count is gone a moment before its outcome is returned: a caller that must
    not go back, as the sidecar's counters, keeps its last reading)."""
    spliced = stream.spliced_bytes()
    if spliced is not None:
        return spliced
    return progress.bytes_to_stream, progress.bytes_from_stream


async def splice_accepted(
    stream: MeshStream,
    sock: socket.socket,
    *,
    offload: bool = True,
    idle_timeout: float | None = None,
    progress: SpliceResult | None = None,
) -> SpliceResult:
    """:func:`splice` for an accepted socket that asyncio has no transport for yet
    (:class:`~quicmesh._accept.SocketServer`): handed to the stream's
    transport as it is where that can splice it (nothing was read from it), else
    wrapped in asyncio streams and copied here."""
    check_idle_timeout(idle_timeout)
    if offload and stream.can_splice():
        return await _hand_over(stream, sock, b"", lambda: reset_socket(sock), idle_timeout)
    return await _copy_socket(stream, sock, idle_timeout, progress)


async def splice_engine_socket(
    stream: MeshStream,
    sock: EngineSocket,
    *,
    idle_timeout: float | None = None,
    progress: SpliceResult | None = None,
) -> SpliceResult:
    """:func:`splice` for a TCP connection the stream's transport made itself
    (:meth:`MeshStream.connect_for_splice`): the transport splices it; if the stream can
    no longer be spliced (it failed meanwhile), the connection comes out to Python and is
    copied here, with the same outcome as :func:`splice`."""
    check_idle_timeout(idle_timeout)
    if stream.can_splice():
        return await _hand_over(stream, sock, b"", sock.close, idle_timeout)
    detached = sock.detach()
    if detached is None:
        stream.abort()
        return SpliceResult(error="the TCP connection was lost before the splice")
    return await _copy_socket(stream, detached, idle_timeout, progress)


async def connect_and_splice(
    stream: MeshStream,
    host: str,
    port: int,
    timeout: float,
    *,
    idle_timeout: float | None = None,
) -> SpliceResult | None:
    """(server) Connect to ``host:port`` from the stream's transport, accept the CONNECT
    and splice, in one step of the transport's engine (:meth:`MeshStream.
    connect_and_splice`), with the same outcome as :func:`splice`. None where the
    transport cannot: the caller connects and splices as before.

    :raises OSError: the connect failed; the CONNECT is unanswered (refuse it).
    """
    check_idle_timeout(idle_timeout)
    try:
        outcome = await stream.connect_and_splice(host, port, timeout, idle_timeout=idle_timeout)
    except (TunnelError, QuicmeshError) as exc:
        stream.abort()  # it failed before the engine took it
        return SpliceResult(0, 0, str(exc) or type(exc).__name__, connected=False)
    except asyncio.CancelledError:
        stream.abort()
        raise
    if outcome is None:
        return None
    return SpliceResult(
        outcome.bytes_to_stream,
        outcome.bytes_from_stream,
        outcome.error,
        offloaded=outcome.connected,
        connected=outcome.connected,
    )


async def _copy_socket(
    stream: MeshStream,
    sock: socket.socket,
    idle_timeout: float | None,
    progress: SpliceResult | None = None,
) -> SpliceResult:
    """:func:`splice` in Python over asyncio streams made for ``sock``."""
    try:
        reader, writer = await asyncio.open_connection(sock=sock)
    except OSError as exc:
        stream.abort(ResetReason.CONNECT_ERROR)
        reset_socket(sock)
        return SpliceResult(error=str(exc) or type(exc).__name__)
    return await splice(
        stream, reader, writer, offload=False, idle_timeout=idle_timeout, progress=progress
    )


async def _offload(
    stream: MeshStream,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    idle_timeout: float | None,
) -> SpliceResult | None:
    """Hand the TCP connection to the stream's transport; None if it cannot be taken
    from asyncio as it is (the caller copies in Python then)."""
    transport = cast(asyncio.Transport, writer.transport)
    sock = writer.get_extra_info("socket")
    if (
        sock is None
        or transport.is_closing()
        or transport.get_write_buffer_size()
        or reader.exception() is not None
    ):
        return None
    transport.pause_reading()
    # What asyncio already read goes first; feed_eof makes read() return it at once
    # (the socket's own EOF, if any, stays in the kernel for the transport to see).
    reader.feed_eof()
    pending = await reader.read()
    detached = socket.socket(fileno=os.dup(sock.fileno()))
    transport.abort()  # closes asyncio's descriptor; the connection lives on in ours
    return await _hand_over(stream, detached, pending, lambda: reset_socket(detached), idle_timeout)


async def _hand_over(
    stream: MeshStream,
    sock: socket.socket | EngineSocket,
    pending: bytes,
    reset: Callable[[], None],
    idle_timeout: float | None,
) -> SpliceResult:
    """Let the stream's transport splice ``sock`` (``pending`` read from it already);
    ``reset`` resets the socket if the transport did not take it."""
    try:
        outcome = await stream.splice_socket(sock, pending, idle_timeout=idle_timeout)
    except (TunnelError, QuicmeshError, OSError) as exc:
        # The stream failed before the transport took the socket: reset both.
        stream.abort()
        reset()
        return SpliceResult(len(pending), 0, str(exc) or type(exc).__name__, offloaded=True)
    except BaseException:  # (cancelled, or a fault of ours)
        stream.abort()  # once the transport has the socket, it resets it too
        reset()
        raise
    return SpliceResult(
        outcome.bytes_to_stream, outcome.bytes_from_stream, outcome.error, offloaded=True
    )


def _nothing() -> None:
    pass


def unwritten_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes written to ``writer`` that its transport still holds."""
    return 0 if writer.transport.is_closing() else writer.transport.get_write_buffer_size()


_LINGER_ZERO = b"\x01\x00\x00\x00\x00\x00\x00\x00"
"""struct linger {l_onoff=1, l_linger=0}: close() sends RST."""


def reset_socket(sock: socket.socket) -> None:
    """Close ``sock`` with RST (so the local peer sees a failure), unless it was
    already handed over (and closed here)."""
    if sock.fileno() >= 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        sock.close()


def _reset_tcp(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) so the local peer sees the failure."""
    import socket
    import struct

    sock = writer.get_extra_info("socket")
    if sock is not None:
        # (uvloop's stand-in for a socket whose transport already closed, after the peer's
        # reset, raises ValueError "negative file descriptor": it escaped the splice, and
        # the flow's handler failed with a traceback.)
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
