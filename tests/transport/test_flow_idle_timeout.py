"""A spliced flow's idle timeout (Envoy's ``tcp_proxy`` ``idle_timeout``): once no byte
moved either way for ``idle_timeout`` seconds, the flow is reset on both sides; bytes
moving either way keep it alive.

Each case is a pair of "sidecars" built from the library (as tests/test_splice_and_cli.py):
A accepts a local TCP connection and splices it into a stream, B splices each stream to a
loopback app. One side gets the idle timeout; the other side and both TCP ends must see
the reset. On the native engine the engine's own splice carries it (the timeout is the
engine's), elsewhere :func:`quicmesh.splice`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from quic_helpers import CA, CLIENT, SERVER, require_engine

import quicmesh
from quicmesh import MeshStream, QuicTransport, splice
from quicmesh.errors import StreamReset, TunnelUsageError
from quicmesh.sidecar.capture import pipe
from quicmesh.splice import (
    FlowIdle,
    IdleClock,
    SpliceResult,
    connect_and_splice,
    splice_accepted,
)

IDLE = 0.5
PATHS = ["quic-native", "quic-aioquic", "h2", "tcp"]


def transport(path: str, identity: Any) -> Any:
    if path.startswith("quic-"):
        engine = path.removeprefix("quic-")
        require_engine(engine)
        return QuicTransport(identity=identity, trust=CA.trust_bundle, engine=engine)
    return quicmesh.TRANSPORTS[path](identity=identity, trust=CA.trust_bundle)


@dataclass
class App:
    """A loopback backend: after one line it answers ``+OK``, then (``silent``) waits, or
    (``talk``) sends a byte every ``period`` seconds; it records how its connection ended."""

    period: float = 0.1
    ended: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = (await reader.readline()).strip()
        writer.write(b"+OK\n")
        talker = None
        if command == b"talk":

            async def talk() -> None:
                while True:
                    await asyncio.sleep(self.period)
                    writer.write(b".")

            talker = asyncio.ensure_future(talk())
        try:
            while await reader.read(65536):
                pass
            self.ended.put_nowait("eof")
            writer.write(b"+BYE\n")
            writer.write_eof()
        except ConnectionResetError:
            self.ended.put_nowait("reset")
        finally:
            if talker is not None:
                talker.cancel()
            writer.close()


class Pair:
    """A (outbound: TCP listener into a stream) and B (inbound: stream to the app)."""

    def __init__(self) -> None:
        self.results: dict[str, asyncio.Queue[SpliceResult]] = {
            "a": asyncio.Queue(),
            "b": asyncio.Queue(),
        }
        self._closers: list[Any] = []

    async def start(self, path: str, app_port: int, idle: dict[str, float | None]) -> int:
        async def inbound(stream: MeshStream) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", app_port)
            self.results["b"].put_nowait(
                await splice(stream, reader, writer, idle_timeout=idle.get("b"))
            )

        listener = await transport(path, SERVER).listen(("127.0.0.1", 0), inbound)
        peer = await transport(path, CLIENT).connect(listener.address)

        async def outbound(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stream = await peer.open_stream(f"app.local:{app_port}")
            self.results["a"].put_nowait(
                await splice(stream, reader, writer, idle_timeout=idle.get("a"))
            )

        server = await asyncio.start_server(outbound, "127.0.0.1", 0)
        self._closers = [server, peer, listener]
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        for closer in self._closers:
            closer.close()
            await closer.wait_closed()


async def client_ends(reader: asyncio.StreamReader) -> str:
    try:
        await reader.read()
    except ConnectionResetError:
        return "reset"
    return "clean end"


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("path", PATHS)
def test_an_idle_flow_is_reset_on_both_sides(path: str, side: str) -> None:
    async def main() -> None:
        app = App()
        app_server = await asyncio.start_server(app.serve, "127.0.0.1", 0)
        pair = Pair()
        port = await pair.start(path, app_server.sockets[0].getsockname()[1], {side: IDLE})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"silent\n")
        assert await reader.readline() == b"+OK\n"
        # Nothing moves from now on: the side with the timeout resets the flow.
        assert await client_ends(reader) == "reset"
        assert await app.ended.get() == "reset"
        timed_out = await pair.results[side].get()
        assert timed_out.error == f"idle timeout: no bytes either way for {IDLE:g}s"
        other = await pair.results["b" if side == "a" else "a"].get()
        assert other.error  # it saw the reset, from the tunnel or its TCP end
        writer.close()
        await pair.close()
        app_server.close()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("direction", ["upload", "download"])
@pytest.mark.parametrize("path", ["quic-native", "quic-aioquic", "h2"])
def test_bytes_moving_one_way_keep_the_flow_alive(path: str, direction: str) -> None:
    """A byte every 0.1 s in one direction for longer than twice the timeout (1.5 s):
    the flow ends cleanly on both sides."""

    async def main() -> None:
        app = App(period=0.1)
        app_server = await asyncio.start_server(app.serve, "127.0.0.1", 0)
        pair = Pair()
        idle = {"a": 1.5, "b": 1.5}
        port = await pair.start(path, app_server.sockets[0].getsockname()[1], idle)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"talk\n" if direction == "download" else b"silent\n")
        assert await reader.readline() == b"+OK\n"
        loop = asyncio.get_running_loop()
        until = loop.time() + 3.5
        while loop.time() < until:
            if direction == "upload":
                writer.write(b".")
                await writer.drain()
                await asyncio.sleep(0.1)
            else:
                assert await asyncio.wait_for(reader.readexactly(1), 1.0) == b"."
        writer.write_eof()
        rest = await reader.read()
        assert rest.endswith(b"+BYE\n")
        assert await app.ended.get() == "eof"
        for side in ("a", "b"):
            assert (await pair.results[side].get()).error == ""
        writer.close()
        await pair.close()
        app_server.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_capture_listeners_copy_resets_an_idle_connection_pair() -> None:
    """The capture listeners' direct copy (passthrough, inbound capture): both TCP
    connections reset, the error says why."""

    async def main() -> None:
        app = App()
        app_server = await asyncio.start_server(app.serve, "127.0.0.1", 0)
        app_port = app_server.sockets[0].getsockname()[1]
        outcome: asyncio.Future[tuple[int, int, str]] = asyncio.get_running_loop().create_future()

        async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", app_port)
            outcome.set_result(await pipe(reader, writer, up_reader, up_writer, idle_timeout=IDLE))

        server = await asyncio.start_server(capture, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        writer.write(b"silent\n")
        assert await reader.readline() == b"+OK\n"
        assert await client_ends(reader) == "reset"
        assert await app.ended.get() == "reset"
        sent, received, error = await outcome
        assert (sent, received) == (len(b"silent\n"), len(b"+OK\n"))
        assert error == f"idle timeout: no bytes either way for {IDLE:g}s"
        writer.close()
        server.close()
        app_server.close()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), 1e19, True, "5"])
@pytest.mark.parametrize("path", ["quic-native", "quic-aioquic"])
def test_an_idle_timeout_out_of_range_is_refused_before_anything_is_done(
    path: str, bad: object
) -> None:
    """One line naming the argument, from every entry; the stream is untouched (a splice
    with a valid timeout then carries the flow)."""

    async def main() -> None:
        app = App()
        app_server = await asyncio.start_server(app.serve, "127.0.0.1", 0)
        app_port = app_server.sockets[0].getsockname()[1]
        refused: list[str] = []
        result: asyncio.Future[SpliceResult] = asyncio.get_running_loop().create_future()

        async def inbound(stream: MeshStream) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", app_port)
            sock = writer.get_extra_info("socket")
            for attempt in (
                splice(stream, reader, writer, idle_timeout=bad),  # type: ignore[arg-type]
                splice_accepted(stream, sock, idle_timeout=bad),  # type: ignore[arg-type]
                stream.splice_socket(sock, idle_timeout=bad),  # type: ignore[arg-type]
                connect_and_splice(
                    stream,
                    "127.0.0.1",
                    app_port,
                    5.0,
                    idle_timeout=bad,  # type: ignore[arg-type]
                ),
            ):
                with pytest.raises(TunnelUsageError) as caught:
                    await attempt
                refused.append(str(caught.value))
            result.set_result(await splice(stream, reader, writer, idle_timeout=IDLE))

        listener = await transport(path, SERVER).listen(("127.0.0.1", 0), inbound)
        peer = await transport(path, CLIENT).connect(listener.address)
        stream = await peer.open_stream(f"app.local:{app_port}")
        stream.write(b"silent\n")
        assert await stream.readexactly(4) == b"+OK\n"
        with pytest.raises(StreamReset):
            await stream.read()
        assert (await result).error == f"idle timeout: no bytes either way for {IDLE:g}s"
        assert len(refused) == 4
        for message in refused:
            assert message.startswith("idle_timeout must be positive seconds up to 86400")
            assert "\n" not in message
        peer.close()
        await peer.wait_closed()
        listener.close()
        await listener.wait_closed()
        app_server.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_bytes_handed_on_while_a_write_waits_count_as_moving() -> None:
    """The Python copy marks a flow moving when it reads and when a write completes; a
    write waiting on a slow reader completes late, so when the time runs out the clock
    also asks what the writers handed on meanwhile (as Envoy's bytes-sent callbacks)."""

    async def main() -> None:
        handed_off = [0]
        loop = asyncio.get_running_loop()
        clock = IdleClock(0.3, lambda: handed_off[0])
        started = loop.time()

        async def trickle() -> None:
            while loop.time() - started < 1.0:
                await asyncio.sleep(0.05)
                handed_off[0] += 1024

        expired = asyncio.ensure_future(clock.expired())
        await trickle()
        assert not expired.done()  # a second with bytes handed on and no read or write
        with pytest.raises(FlowIdle):
            await asyncio.wait_for(expired, 5)  # then nothing: idle

    asyncio.run(main())


def test_bytes_that_only_went_into_the_tunnel_time_out_once() -> None:
    """A one-way write's bytes leave after the copy marked them (the session sends on its
    next turn): the clock must not take that for a slow reader at the deadline and wait a
    second timeout (it reset such flows after about two)."""

    async def main() -> float:
        app = App()
        app_server = await asyncio.start_server(app.serve, "127.0.0.1", 0)
        pair = Pair()
        port = await pair.start("h2", app_server.sockets[0].getsockname()[1], {"a": 1.0})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"silent\n")
        assert await reader.readline() == b"+OK\n"
        loop = asyncio.get_running_loop()
        writer.write(b"x" * 100)  # one way, the app never answers
        await writer.drain()
        last = loop.time()
        assert await client_ends(reader) == "reset"
        elapsed = loop.time() - last
        writer.close()
        await pair.close()
        app_server.close()
        return elapsed

    assert asyncio.run(asyncio.wait_for(main(), 60)) < 1.75  # at most 1.25 timeouts
