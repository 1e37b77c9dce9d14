"""``MeshStream.connect_for_splice``: the native engine connects the destination's
TCP socket on its own thread and splices it, with no socket passing through Python.

The accepting side of a real QUIC connection (native engine, loopback) connects to a
real TCP server: the flow's bytes go both ways; a closed port and a destination that
never answers (its accept queue full) fail as ``asyncio.open_connection`` would; a
host name is left to the caller; a socket the engine connected can be taken back as
a plain socket. Other transports connect nothing (None).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from quic_helpers import CA, CLIENT, SERVER, TARGET, require_engine

from quicmesh import QuicTransport
from quicmesh.errors import StreamRefused
from quicmesh.splice import SpliceResult, splice_engine_socket
from quicmesh.transport.stream import EngineSocket, MeshStream

T = TypeVar("T")


def transport(engine: str, identity: object) -> QuicTransport:
    require_engine(engine)
    return QuicTransport(
        identity=identity,  # type: ignore[arg-type]
        trust=CA.trust_bundle,
        engine=engine,
    )


LISTENERS: list[Any] = []
"""The listeners :func:`on_server` started, closed by :func:`run` at the end."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def main() -> T:
        try:
            return await asyncio.wait_for(coro, 60)
        finally:
            while LISTENERS:
                LISTENERS.pop().close()

    return asyncio.run(main())


async def on_server(
    engine: str, handler: Callable[[MeshStream], Coroutine[Any, Any, T]]
) -> tuple[asyncio.Future[T], MeshStream | None]:
    """Run ``handler`` on the accepting side of one flow: its result (to come) and the
    opening side's stream once answered (None if the handler refused it)."""
    done: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    async def serve(stream: MeshStream) -> None:
        try:
            done.set_result(await handler(stream))
        except Exception as exc:  # handed to the test
            done.set_exception(exc)

    listener = await transport(engine, SERVER).listen(("127.0.0.1", 0), serve)
    LISTENERS.append(listener)
    conn = await transport(engine, CLIENT).connect(listener.address)
    try:
        return done, await conn.open_stream(TARGET)
    except StreamRefused:
        return done, None


async def outcome(engine: str, handler: Callable[[MeshStream], Coroutine[Any, Any, T]]) -> T:
    """The result of ``handler`` on a flow that it answers itself."""
    done, _ = await on_server(engine, handler)
    return await asyncio.wait_for(done, 30)


async def echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def test_the_engine_connects_and_splices_the_flow() -> None:
    payload = bytes(range(256)) * 2000

    async def main() -> None:
        app = await echo_server()
        port = app.sockets[0].getsockname()[1]

        async def handler(stream: MeshStream) -> SpliceResult:
            sock = await stream.connect_for_splice("127.0.0.1", port, 5)
            assert sock is not None
            return await splice_engine_socket(stream, sock)

        spliced, stream = await on_server("native", handler)
        assert stream is not None
        stream.write(payload)
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(), 30) == payload
        result = await asyncio.wait_for(spliced, 30)
        assert result == SpliceResult(len(payload), len(payload), "", offloaded=True)
        app.close()

    run(main())


def test_a_closed_port_fails_as_a_refused_connect() -> None:
    async def main() -> None:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]

        async def handler(stream: MeshStream) -> OSError:
            with pytest.raises(OSError) as failed:
                await stream.connect_for_splice("127.0.0.1", port, 5)
            stream.refuse(502, failed.value.strerror or "")
            return failed.value

        error = await outcome("native", handler)
        assert isinstance(error, ConnectionRefusedError)
        assert error.errno == errno.ECONNREFUSED
        assert error.strerror == "Connection refused"

    run(main())


def test_a_destination_that_never_answers_times_out() -> None:
    async def main() -> None:
        # A listener that accepts nothing, its accept queue filled: the kernel drops
        # further SYNs, so a connect waits until its timeout.
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.2)

        async def handler(stream: MeshStream) -> tuple[BaseException, float]:
            started = time.monotonic()
            with pytest.raises(OSError) as failed:
                await stream.connect_for_splice("127.0.0.1", port, 0.5)
            elapsed = time.monotonic() - started
            stream.refuse(502, "timed out")
            return failed.value, elapsed

        error, elapsed = await outcome("native", handler)
        assert isinstance(error, TimeoutError)
        assert 0.4 < elapsed < 5
        for filler in fillers:
            filler.close()
        listener.close()

    run(main())


def test_a_host_name_is_left_to_the_caller_and_other_engines_connect_nothing() -> None:
    async def main() -> None:
        async def by_name(stream: MeshStream) -> EngineSocket | None:
            sock = await stream.connect_for_splice("localhost", 9, 5)
            stream.refuse(502, "")
            return sock

        assert await outcome("native", by_name) is None
        assert await outcome("aioquic", by_name) is None

    run(main())


def test_a_socket_the_engine_connected_can_come_back_to_python() -> None:
    async def main() -> None:
        app = await echo_server()
        port = app.sockets[0].getsockname()[1]

        async def handler(stream: MeshStream) -> bytes:
            engine_socket = await stream.connect_for_splice("127.0.0.1", port, 5)
            assert engine_socket is not None
            sock = engine_socket.detach()
            assert sock is not None
            assert engine_socket.detach() is None  # once
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"ping")
            echoed = await reader.readexactly(4)
            writer.close()
            stream.refuse(502, "")
            return echoed

        assert await outcome("native", handler) == b"ping"
        app.close()

    run(main())


def test_closing_a_socket_the_engine_connected_resets_it() -> None:
    async def main() -> None:
        seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read()
                seen.set_result("eof")
            except ConnectionResetError:
                seen.set_result("reset")

        server = await asyncio.start_server(app, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def handler(stream: MeshStream) -> None:
            engine_socket = await stream.connect_for_splice("127.0.0.1", port, 5)
            assert engine_socket is not None
            engine_socket.close()
            stream.refuse(502, "")

        await outcome("native", handler)
        assert await asyncio.wait_for(seen, 10) == "reset"
        server.close()

    run(main())
