"""``MeshStream.connect_and_splice`` on the native engine: the accepting side's whole
flow in one engine command (connect the destination, answer the CONNECT with 200 once
connected, splice), with no wake-up of Python between the connect and the splice.

A connect that fails leaves the CONNECT unanswered for the handler to refuse; an abort
while the destination connects resets the stream at once; a name, or another engine,
gets None (the caller connects itself, as before).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import pytest
from quic_helpers import (
    TARGET,
    client_transport,
    only_connection,
    require_engine,
    run,
    server_transport,
    until,
)

from quicmesh.errors import StreamRefused, StreamReset
from quicmesh.sidecar.launch import held_port
from quicmesh.transport.stream import MeshStream, SpliceOutcome

T = TypeVar("T")


@contextmanager
def unanswering_port() -> Iterator[int]:
    """A loopback port whose SYNs go unanswered: a listener with a backlog of one, full
    with a connection nobody accepts (Linux drops SYNs to a full accept queue)."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as server:
        port = server.getsockname()[1]
        fillers = []
        try:
            for _ in range(2):
                filler = socket.socket()
                filler.setblocking(False)
                with suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            yield port
        finally:
            for filler in fillers:
                filler.close()


async def serve(
    handler: Callable[[MeshStream], Coroutine[Any, Any, None]],
    client: Callable[[Any, Any], Coroutine[Any, Any, T]],
    engine: str = "native",
) -> T:
    """Run ``client(connection, listener)`` against a listener serving ``handler``."""
    require_engine(engine)
    listener = await server_transport(engine=engine).listen(("127.0.0.1", 0), handler)
    conn = await client_transport(engine=engine).connect(listener.address)
    try:
        return await client(conn, listener)
    finally:
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()


def test_flows_are_connected_answered_and_spliced_by_one_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """12 flows at once, each uploading 2.5 MB right behind its CONNECT (more than the
    stream window, so the engine takes the reading over mid-upload, while the
    destination connects) and downloading 1 MB: every byte arrives both ways, once, and
    Python heard of no connect (no ``tcp_connected`` event: it was not woken between
    the connect and the splice)."""
    from quicmesh.transport.quic.native_engine import _Pump

    kinds: list[str] = []
    route = _Pump._route

    def recording_route(self: _Pump, event: tuple[Any, ...]) -> Any:
        kinds.append(event[0])
        return route(self, event)

    monkeypatch.setattr(_Pump, "_route", recording_route)
    uploads = [random.Random(n).randbytes(2_500_000) for n in range(12)]
    at_destination: dict[bytes, bytes] = {}
    outcomes: list[SpliceOutcome | None] = []

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upload = await reader.read()
        at_destination[upload[:16]] = upload
        writer.write(upload[:16] * 65536)  # 1 MiB, naming the upload it answers
        await writer.drain()
        writer.close()

    async def main() -> list[bytes]:
        server = await asyncio.start_server(destination, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def handler(stream: MeshStream) -> None:
            outcomes.append(await stream.connect_and_splice("127.0.0.1", port, 5.0))

        async def client(conn: Any, listener: Any) -> list[bytes]:
            async def flow(upload: bytes) -> bytes:
                stream = await conn.open_stream(TARGET, wait_response=False)
                stream.write(upload)
                stream.write_eof()
                return bytes(await asyncio.wait_for(stream.read(), 30))

            return list(await asyncio.gather(*(flow(upload) for upload in uploads)))

        try:
            return await serve(handler, client)
        finally:
            server.close()

    downloads = run(main())
    for upload, download in zip(uploads, downloads, strict=True):
        assert at_destination[upload[:16]] == upload
        assert download == upload[:16] * 65536
    assert sorted(outcomes, key=repr) == [SpliceOutcome(1 << 20, 2_500_000, "")] * 12
    assert kinds.count("spliced") == 12
    assert "tcp_connected" not in kinds


def test_a_refused_connect_leaves_the_connect_for_the_handler_to_refuse() -> None:
    """The destination refuses the connection: nothing was sent on the stream, so the
    handler answers 502 with the reason, which the client sees; the bytes the client sent
    behind its CONNECT are dropped, and the connection carries the next flow."""
    failures: list[BaseException] = []

    async def main() -> tuple[StreamRefused, bytes]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read())
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        live = server.sockets[0].getsockname()[1]
        with held_port() as (dead, _):  # bound, not listening: connects are refused
            dead_port = dead.getsockname()[1]

            async def handler(stream: MeshStream) -> None:
                port = dead_port if stream.headers.get("x-dest") == "dead" else live
                try:
                    await stream.connect_and_splice("127.0.0.1", port, 5.0)
                except OSError as exc:
                    failures.append(exc)
                    stream.refuse(502, f"cannot reach the destination: {exc.strerror}")

            async def client(conn: Any, listener: Any) -> tuple[StreamRefused, bytes]:
                stream = await conn.open_stream(
                    TARGET, headers={"x-dest": "dead"}, wait_response=False
                )
                stream.write(b"sent behind the CONNECT")
                with pytest.raises(StreamRefused) as refused:
                    await asyncio.wait_for(stream.read(), 10)
                stream = await conn.open_stream(TARGET)
                stream.write(b"the next flow")
                stream.write_eof()
                return refused.value, bytes(await asyncio.wait_for(stream.read(), 10))

            try:
                return await serve(handler, client)
            finally:
                server.close()

    refused, echoed = run(main())
    assert refused.status == 502
    assert "Connection refused" in str(refused)
    assert echoed == b"the next flow"
    (failure,) = failures
    assert isinstance(failure, ConnectionRefusedError)


def test_a_connect_past_its_timeout_is_a_timeout_error() -> None:
    failures: list[BaseException] = []

    async def main() -> StreamRefused:
        with unanswering_port() as port:

            async def handler(stream: MeshStream) -> None:
                try:
                    await stream.connect_and_splice("127.0.0.1", port, 0.3)
                except OSError as exc:
                    failures.append(exc)
                    stream.refuse(504, "timed out")

            async def client(conn: Any, listener: Any) -> StreamRefused:
                stream = await conn.open_stream(TARGET, wait_response=False)
                with pytest.raises(StreamRefused) as refused:
                    await asyncio.wait_for(stream.read(), 10)
                return refused.value

            return await serve(handler, client)

    assert run(main()).status == 504
    (failure,) = failures
    assert isinstance(failure, TimeoutError)


def test_a_flow_aborted_while_its_destination_connects_is_reset_at_once() -> None:
    """The accepting side aborts the flow (as a drain or an overload shed does) while the
    engine still waits for the destination's answer (a 30 s connect timeout): the client
    sees the reset at once, and the handler the abort as the flow's outcome."""
    outcomes: list[SpliceOutcome | None] = []
    streams: list[MeshStream] = []

    async def main() -> str:
        with unanswering_port() as port:

            async def handler(stream: MeshStream) -> None:
                streams.append(stream)
                outcomes.append(await stream.connect_and_splice("127.0.0.1", port, 30.0))

            async def client(conn: Any, listener: Any) -> str:
                stream = await conn.open_stream(TARGET, wait_response=False)
                stream.write(b"x")
                accepted = await only_connection(listener)
                await until(lambda: bool(accepted.quic._pump.splices))  # connecting
                streams[0].abort()
                with pytest.raises(StreamReset) as reset:
                    await asyncio.wait_for(stream.read(), 10)
                await until(lambda: bool(outcomes))
                return str(reset.value)

            return await serve(handler, client)

    client_saw = run(main())
    assert "0x10c" in client_saw  # H3_REQUEST_CANCELLED
    (outcome,) = outcomes
    assert outcome is not None and "aborted locally" in outcome.error
    assert not outcome.connected  # nothing was answered
    assert streams[0].closed and not streams[0].can_splice()


@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_a_name_or_another_engine_gets_none_and_the_stream_is_untouched(engine: str) -> None:
    """None where the engine cannot connect, answer and splice itself: a name on the
    native engine, anything on aioquic, and the opening side on either. The stream is
    still its user's."""
    answers: list[SpliceOutcome | None] = []

    async def main() -> bytes:
        async def handler(stream: MeshStream) -> None:
            host = "localhost" if engine == "native" else "127.0.0.1"
            answers.append(await stream.connect_and_splice(host, 9, 1.0))
            stream.write(await stream.read())
            stream.write_eof()

        async def client(conn: Any, listener: Any) -> bytes:
            stream = await conn.open_stream(TARGET)
            # The opening side has no CONNECT to answer.
            answers.append(await stream.connect_and_splice("127.0.0.1", 9, 1.0))
            stream.write(b"echo me")
            stream.write_eof()
            return bytes(await asyncio.wait_for(stream.read(), 10))

        return await serve(handler, client, engine)

    assert run(main()) == b"echo me"
    assert answers == [None, None]


def test_a_handler_cancelled_as_its_connect_failed_still_resets_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handler is cancelled right after the engine said the connect failed (before
    it could refuse): nothing was sent on the stream, so its abort must reset it; the
    client sees a reset, not a stream left unanswered for the connection's lifetime."""
    from quicmesh.splice import connect_and_splice
    from quicmesh.transport.quic.native_engine import _Pump

    handlers: list[asyncio.Task[Any]] = []
    route = _Pump._route

    def cancelling_route(self: _Pump, event: tuple[Any, ...]) -> Any:
        connection = route(self, event)
        if event[0] == "splice_unconnected":
            handlers[0].cancel()
        return connection

    monkeypatch.setattr(_Pump, "_route", cancelling_route)

    async def main() -> str:
        with held_port() as (dead, _):
            port = dead.getsockname()[1]

            async def handler(stream: MeshStream) -> None:
                handlers.append(asyncio.current_task())  # type: ignore[arg-type]
                await connect_and_splice(stream, "127.0.0.1", port, 5.0)

            async def client(conn: Any, listener: Any) -> str:
                stream = await conn.open_stream(TARGET, wait_response=False)
                stream.write(b"x")
                with pytest.raises(StreamReset) as reset:
                    await asyncio.wait_for(stream.read(), 10)
                return str(reset.value)

            return await serve(handler, client)

    assert "0x10c" in run(main())  # H3_REQUEST_CANCELLED
