"""One native endpoint serves many connections through one pump: a connection's
trouble stays its own.

Found under ``quicmesh bench attack --sidecars --engine native``: a health check's
connection closed right after its handshake made the server's HTTP/3 set-up raise
(no stream could be opened on the gone connection) inside the pump, and the
connections woken after it in the same batch kept their events unread: about 1
flow in 250 hung until its sidecar drained.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

import pytest
from quic_helpers import TARGET, client_transport, exchange, require_engine, run, server_transport

from quicmesh import MeshStream
from quicmesh.errors import QuicmeshError


async def _echo(stream: MeshStream) -> None:
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()
    stream.write_eof()


def test_a_connection_whose_events_raise_is_closed_and_the_others_carry_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    require_engine("native")
    loop_errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: loop_errors.append(context)
        )
        listener = await server_transport(engine="native").listen(("127.0.0.1", 0), _echo)
        client = client_transport(engine="native")
        broken = await client.connect(listener.address)
        healthy = await client.connect(listener.address)
        assert broken.quic._pump is healthy.quic._pump  # one endpoint, one pump

        wake = broken.quic._wake

        def raising_once() -> None:
            broken.quic.set_wake(wake)
            raise RuntimeError("a bug in this connection's event handling")

        stream = await broken.open_stream(TARGET)
        broken.quic.set_wake(raising_once)
        stream.write(b"x" * 1000)
        stream.write_eof()
        with pytest.raises(QuicmeshError):
            await stream.read()  # closed, not left hanging
        payload = os.urandom(100_000)
        for request in range(5):
            assert await exchange(healthy, payload, request_id=str(request)) == payload
        healthy.close()
        await healthy.wait_closed()
        await client.aclose()
        listener.close()
        await listener.wait_closed()

    with caplog.at_level(logging.ERROR, logger="quicmesh.transport.quic"):
        run(main())
    assert loop_errors == []
    logged = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert len(logged) == 1 and "closing the connection" in logged[0]


def test_connections_closed_before_the_server_saw_their_handshake_leave_it_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A health check's connection: handshake (done in Rust, without the server's
    event loop), then closed at once. When the server's loop gets to it, the
    connection is gone: the server must neither raise into its event loop nor
    report a refused client ("resumed session with no recorded peer identity")."""
    require_engine("native")
    loop_errors: list[dict[str, Any]] = []
    server_loop = asyncio.new_event_loop()
    server_loop.set_exception_handler(lambda loop, context: loop_errors.append(context))
    thread = threading.Thread(target=server_loop.run_forever, daemon=True)
    thread.start()

    async def serve() -> Any:
        return await server_transport(engine="native").listen(("127.0.0.1", 0), _echo)

    async def main() -> None:
        listener = asyncio.run_coroutine_threadsafe(serve(), server_loop).result(10)
        client = client_transport(engine="native")
        busy = threading.Event()
        server_loop.call_soon_threadsafe(busy.wait, 30)  # the server's loop is busy
        try:
            for _ in range(10):
                connection = await client.connect(listener.address)
                connection.close()
                await connection.wait_closed()
            await asyncio.sleep(0.5)  # quinn forgets them (their draining period ends)
        finally:
            busy.set()
        # The server still serves.
        connection = await client.connect(listener.address)
        assert await exchange(connection, b"still here") == b"still here"
        connection.close()
        await connection.wait_closed()
        await client.aclose()

        async def stop() -> None:
            listener.close()
            await listener.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), server_loop).result(10)

    try:
        with caplog.at_level(logging.WARNING):
            run(main())
    finally:
        server_loop.call_soon_threadsafe(server_loop.stop)
        thread.join(10)
        server_loop.close()
    assert loop_errors == []
    noise = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noise == []
