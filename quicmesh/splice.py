"""Pump a MeshStream to and from an asyncio TCP connection.

:func:`splice` is what a proxy does with each flow: bytes from the local TCP
peer go into the tunnel and bytes from the tunnel go to the local peer, each
direction with backpressure (``drain``) and half-close (EOF one way does not
end the other). If either side fails, the flow is reset on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from .errors import TunnelError
from .transport.stream import MeshStream
from .tunnel.session import ResetReason

CHUNK = 64 * 1024


@dataclass
class SpliceResult:
    """What one spliced flow carried."""

    bytes_to_stream: int = 0
    """Bytes read from the TCP side and written into the tunnel."""
    bytes_from_stream: int = 0
    """Bytes read from the tunnel and written to the TCP side."""
    error: str = ""
    """Empty when both directions finished cleanly, else why the flow was reset."""


async def splice(
    stream: MeshStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> SpliceResult:
    """Copy bytes both ways between ``stream`` and a TCP connection until both ends close.

    Returns byte counts and the error that ended the flow, if any. On an error the
    stream is aborted (the peer sees a reset) and the TCP connection is closed
    with a reset, so neither side mistakes a failed flow for a complete one.
    """
    result = SpliceResult()

    async def tcp_to_stream() -> None:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                stream.write_eof()
                return
            result.bytes_to_stream += len(data)
            stream.write(data)
            await stream.drain()

    async def stream_to_tcp() -> None:
        while True:
            data = await stream.read(CHUNK)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            result.bytes_from_stream += len(data)
            writer.write(data)
            await writer.drain()

    tasks = [asyncio.ensure_future(tcp_to_stream()), asyncio.ensure_future(stream_to_tcp())]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    raise exc
    except (TunnelError, OSError, asyncio.IncompleteReadError) as exc:
        result.error = str(exc) or type(exc).__name__
        is_tcp_error = isinstance(exc, OSError)
        stream.abort(ResetReason.CONNECT_ERROR if is_tcp_error else ResetReason.CANCELLED)
        _reset_tcp(writer)
    except asyncio.CancelledError:
        # Abandoned (the caller's task was cancelled): reset both sides, not leak them.
        stream.abort()
        _reset_tcp(writer)
        raise
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
    if not result.error:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        stream.close()
    return result


def _reset_tcp(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) so the local peer sees the failure."""
    import socket
    import struct

    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
