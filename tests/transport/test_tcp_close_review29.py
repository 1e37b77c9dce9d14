"""TcpTransport: closing flows whose bytes are still queued, and flows' stream IDs (review 29).

A flow that finished on our side (``stream.close()``, or ``write_eof()`` after the
peer's FIN) with bytes still queued to a peer that does not read held
``conn.close()``/``wait_closed()``, ``conn.aclose(timeout)`` and a listener's close
for ever: the socket transport's close waited for its buffer to drain. And every
flow was stream 1. Real loopback sockets; synchronisation by events and polling real
state, with timeouts, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from quic_helpers import until

from quicmesh.tls import DevCA
from quicmesh.transport._tcp import LINGER_TIMEOUT
from quicmesh.transport.base import StreamHandler
from quicmesh.transport.stream import MeshStream
from quicmesh.transport.tcp import TcpListener, TcpPeerConnection, TcpTransport

CLIENT_ID = "spiffe://mesh.local/ns/default/sa/client"
SERVER_ID = "spiffe://mesh.local/ns/default/sa/server"
FLOOD = 8 * 1024 * 1024
"""Bytes written at once: far more than loopback's socket buffers take from a flow
whose peer does not read (its receive window is 1 KiB)."""
BOUND = 2.0
"""Seconds a close may take here (it hung for ever before the fix)."""

_CA: DevCA | None = None


def _ca() -> DevCA:
    global _CA
    if _CA is None:
        _CA = DevCA()
    return _CA


def run(coro: Any, timeout: float = 10.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, timeout)

    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def peers(
    handler: StreamHandler,
    *,
    server_options: dict[str, Any] | None = None,
    client_options: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[TcpPeerConnection, TcpListener]]:
    ca = _ca()
    server = TcpTransport(
        identity=ca.issue(SERVER_ID), trust=ca.trust_bundle, **(server_options or {})
    )
    client = TcpTransport(
        identity=ca.issue(CLIENT_ID), trust=ca.trust_bundle, **(client_options or {})
    )
    listener = await server.listen(("127.0.0.1", 0), handler)
    conn = await client.connect(listener.address)
    try:
        yield conn, listener
    finally:
        # (bounded: the teardown hung too before the fix)
        conn.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(conn.wait_closed(), BOUND)
        listener.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listener.wait_closed(), BOUND)


def stalled_handler(
    accepted: list[MeshStream], release: asyncio.Event, *, half_close: bool = False
) -> Callable[[MeshStream], Any]:
    """Accept (and, with ``half_close``, answer with a FIN), then never read."""

    async def handler(stream: MeshStream) -> None:
        stream.accept()
        if half_close:
            stream.write_eof()
        accepted.append(stream)
        await release.wait()

    return handler


async def _timed(awaitable: Any) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(awaitable, BOUND)
    return loop.time() - start


NOT_READING = {"receive_window": 1024}


def test_close_resets_a_closed_flow_with_bytes_queued() -> None:
    """stream.close() with bytes queued to a peer that does not read, then
    conn.close(): wait_closed() returns once LINGER_TIMEOUT is up (the flow's connection
    is reset then; a peer that reads would have had its bytes)."""

    async def main() -> None:
        accepted: list[MeshStream] = []
        release = asyncio.Event()
        handler = stalled_handler(accepted, release)
        try:
            async with peers(handler, server_options=NOT_READING) as (conn, _):
                stream = await conn.open_stream("stalled.default.svc:80")
                await until(lambda: bool(accepted), 2)
                stream.write(b"f" * FLOOD)
                stream.close()
                assert stream.buffered_bytes > 0
                conn.close()
                assert await _timed(conn.wait_closed()) < LINGER_TIMEOUT + 1.0
                assert conn.is_closed and conn.active_streams == 0
                assert conn.stats()["connections_active"] == 0
        finally:
            release.set()

    run(main())


def test_close_resets_a_flow_finished_by_write_eof_after_the_peers_fin() -> None:
    """The peer half-closed and does not read; we read its EOF and write_eof() with
    bytes still queued: conn.close() ends the flow within LINGER_TIMEOUT."""

    async def main() -> None:
        accepted: list[MeshStream] = []
        release = asyncio.Event()
        handler = stalled_handler(accepted, release, half_close=True)
        try:
            async with peers(handler, server_options=NOT_READING) as (conn, _):
                stream = await conn.open_stream("half.default.svc:80")
                assert await asyncio.wait_for(stream.read(), BOUND) == b""
                stream.write(b"f" * FLOOD)
                stream.write_eof()
                assert stream.buffered_bytes > 0
                conn.close()
                assert await _timed(conn.wait_closed()) < LINGER_TIMEOUT + 1.0
                assert conn.is_closed
        finally:
            release.set()

    run(main())


def test_aclose_timeout_resets_stuck_flow_and_still_delivers_a_drained_one() -> None:
    """aclose(timeout) gives flows ``timeout`` seconds, then resets those whose bytes
    are still queued; a finished flow whose peer reads still gets every byte."""

    async def main() -> None:
        accepted: list[MeshStream] = []
        release = asyncio.Event()
        received: list[bytes] = []
        payload = bytes(range(256)) * 4096  # 1 MiB

        async def handler(stream: MeshStream) -> None:
            if stream.target.host.startswith("reader"):
                received.append(await stream.read())
                stream.write_eof()
                return
            stream.accept()
            accepted.append(stream)
            await release.wait()

        # (the reading flow's server reads with the default window: only the stalled
        # handler leaves bytes unread, and 1 KiB of window stops its socket at once)
        try:
            async with peers(handler) as (conn, _):
                stuck = await conn.open_stream("stalled.default.svc:80")
                await until(lambda: bool(accepted), 2)
                reader = await conn.open_stream("reader.default.svc:80")
                stuck.write(b"f" * (4 * FLOOD))
                stuck.close()
                reader.write(payload)
                reader.close()
                elapsed = await _timed(conn.aclose(timeout=0.5))
                assert 0.4 < elapsed < 1.5
                assert conn.is_closed and conn.active_streams == 0
                await until(lambda: bool(received), 2)
                assert received == [payload]
        finally:
            release.set()

    run(main())


def test_listener_close_ends_a_server_flow_with_bytes_queued() -> None:
    """A handler closed its stream with bytes queued to a client that does not read:
    listener.close() and wait_closed() return within LINGER_TIMEOUT."""

    async def main() -> None:
        closed = asyncio.Event()

        async def handler(stream: MeshStream) -> None:
            stream.accept()
            stream.write(b"z" * FLOOD)
            stream.close()
            closed.set()

        async with peers(handler, client_options=NOT_READING) as (conn, listener):
            stream = await conn.open_stream("flood.default.svc:80")
            await asyncio.wait_for(closed.wait(), BOUND)
            assert stream.exception() is None
            listener.close()
            assert await _timed(listener.wait_closed()) < LINGER_TIMEOUT + 1.0
            assert listener.connections == []

    run(main())


def test_flows_get_distinct_increasing_stream_ids_on_both_sides() -> None:
    """Each flow of a tcp peer connection has its own stream ID (1, 2, 3...), and so
    does each flow a listener accepts (every flow was stream 1 before)."""

    async def main() -> None:
        seen: list[int] = []

        async def handler(stream: MeshStream) -> None:
            seen.append(stream.stream_id)
            stream.accept()
            await stream.read()
            stream.write_eof()

        async with peers(handler) as (conn, _):
            streams = [await conn.open_stream(f"svc-{i}.default.svc:80") for i in range(3)]
            ids = [s.stream_id for s in streams]
            assert ids == sorted(set(ids)) and len(ids) == 3
            more = await asyncio.gather(
                *(conn.open_stream(f"more-{i}.default.svc:80") for i in range(3))
            )
            all_ids = ids + [s.stream_id for s in more]
            assert len(set(all_ids)) == 6 and min(s.stream_id for s in more) > max(ids)
            for stream in [*streams, *more]:
                stream.write_eof()
                assert await asyncio.wait_for(stream.read(), BOUND) == b""
            assert sorted(seen) == sorted(set(seen)) and len(seen) == 6
            assert seen[:3] == sorted(seen[:3])

    run(main())
