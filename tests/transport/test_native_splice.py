"""``MeshStream.splice_socket`` on the native engine: the engine copies a flow
between its QUIC stream and a real TCP connection, starting with the bytes Python
already held.

The accepting side's handler reads one byte, so the rest of the first flight sits
in the stream's buffer when the stream is handed over; ``pending`` stands for
bytes already read from the TCP socket. Both must come out first and in order.
Other transports (aioquic here) answer ``can_splice() == False``.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from quic_helpers import CA, CLIENT, SERVER, TARGET, require_engine, tcp_pair, until

from quicmesh import QuicTransport
from quicmesh.errors import StreamReset, TunnelError
from quicmesh.splice import SpliceResult, moved_so_far
from quicmesh.transport.quic.native_engine import READ_AHEAD
from quicmesh.transport.stream import MeshStream, SpliceOutcome

T = TypeVar("T")


def transport(engine: str, identity: object, **kwargs: Any) -> QuicTransport:
    require_engine(engine)
    return QuicTransport(
        identity=identity,  # type: ignore[arg-type]
        trust=CA.trust_bundle,
        engine=engine,
        congestion_control="cubic",
        **kwargs,
    )


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


TcpEnds = asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


async def splicing_pair() -> tuple[Any, Any, TcpEnds, asyncio.Queue[SpliceOutcome]]:
    """A native listener whose handler splices each stream to a new loopback TCP
    connection, and a client connected to it; the TCP ends and the outcomes, in order."""
    results: asyncio.Queue[SpliceOutcome] = asyncio.Queue()
    tcp_ends: TcpEnds = asyncio.Queue()

    async def handler(stream: MeshStream) -> None:
        sock, reader, writer = await tcp_pair()
        tcp_ends.put_nowait((reader, writer))
        results.put_nowait(await stream.splice_socket(sock))

    listener = await transport("native", SERVER).listen(("127.0.0.1", 0), handler)
    conn = await transport("native", CLIENT).connect(listener.address)
    return listener, conn, tcp_ends, results


async def spliced_flow(
    conn: Any, tcp_ends: TcpEnds, first: bytes
) -> tuple[MeshStream, asyncio.StreamReader, asyncio.StreamWriter]:
    """A new flow through a :func:`splicing_pair` listener: ``first`` written on the
    stream and seen at its TCP end."""
    stream = await conn.open_stream(TARGET)
    stream.write(first)
    reader, writer = await asyncio.wait_for(tcp_ends.get(), 10)
    assert await asyncio.wait_for(reader.readexactly(len(first)), 10) == first
    return stream, reader, writer


async def how_tcp_ends(reader: asyncio.StreamReader) -> str:
    """``"reset"`` or ``"clean end"``: how the TCP end of a flow saw it end."""
    try:
        await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return "reset"
    return "clean end"


def test_bytes_held_in_python_go_first_and_the_flow_ends_cleanly() -> None:
    rng = random.Random(7)
    upload = rng.randbytes(300_000)
    download = rng.randbytes(500_000)
    pending = b"read from TCP before the hand-over|"
    outcomes: list[SpliceOutcome] = []
    at_tcp: list[bytes] = []

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        async def handler(stream: MeshStream) -> None:
            first = await stream.readexactly(1)
            assert stream.can_splice()
            sock, reader, writer = await tcp_pair()

            async def app() -> None:
                writer.write(download)
                await writer.drain()
                writer.write_eof()
                at_tcp.append(await reader.read())
                writer.close()

            app_task = asyncio.ensure_future(app())
            outcomes.append(await stream.splice_socket(sock, pending))
            await app_task
            assert stream.closed
            done.set_result(first)

        listener = await transport("native", SERVER).listen(("127.0.0.1", 0), handler)
        conn = await transport("native", CLIENT).connect(listener.address)
        stream = await conn.open_stream(TARGET)
        stream.write(upload)  # at once, with the CONNECT's answer still on its way
        stream.write_eof()
        received = await asyncio.wait_for(stream.read(), 30)
        first = await asyncio.wait_for(done, 30)
        assert first + at_tcp[0] == upload
        assert received == pending + download
        conn.close()
        await conn.wait_closed()
        listener.close()

    run(main())
    (outcome,) = outcomes
    assert outcome == SpliceOutcome(len(pending) + len(download), len(upload) - 1, "")


def test_streams_handed_over_while_their_bytes_arrive_lose_and_repeat_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The accepting side hands each stream to its splice without pausing its reader
    first (``hand_over_reading``): the engine may just have given Python a chunk the
    session has not taken in, and the splice must carry it, once. 12 flows at once,
    each uploading 2.5 MB right behind its CONNECT: every byte arrives, in order, and
    the hand-over (not the pause) is what ran."""
    from quicmesh.transport.quic.native_engine import NativeConnection

    handed: list[bool] = []
    paused: list[int] = []
    hand_over = NativeConnection.hand_over_reading
    pause = NativeConnection.pause_reading

    def counting_hand_over(self: NativeConnection, stream_id: int) -> bool:
        done = hand_over(self, stream_id)
        handed.append(done)
        return done

    async def counting_pause(self: NativeConnection, stream_id: int) -> None:
        paused.append(stream_id)
        await pause(self, stream_id)

    monkeypatch.setattr(NativeConnection, "hand_over_reading", counting_hand_over)
    monkeypatch.setattr(NativeConnection, "pause_reading", counting_pause)
    uploads = [random.Random(n).randbytes(2_500_000) for n in range(12)]
    at_tcp: dict[bytes, bytes] = {}

    async def main() -> None:
        async def handler(stream: MeshStream) -> None:
            first = await stream.readexactly(16)  # which upload: its first 16 bytes
            sock, reader, writer = await tcp_pair()

            async def app() -> None:
                at_tcp[first] = first + await reader.read()
                writer.close()  # the download's end

            app_task = asyncio.ensure_future(app())
            outcome = await stream.splice_socket(sock)
            await app_task
            assert outcome.error == ""

        listener = await transport("native", SERVER).listen(("127.0.0.1", 0), handler)
        conn = await transport("native", CLIENT).connect(listener.address)

        async def flow(upload: bytes) -> None:
            stream = await conn.open_stream(TARGET)
            stream.write(upload)
            stream.write_eof()
            assert await asyncio.wait_for(stream.read(), 30) == b""

        await asyncio.gather(*(flow(upload) for upload in uploads))
        await until(lambda: len(at_tcp) == len(uploads))
        conn.close()
        await conn.wait_closed()
        listener.close()

    run(main())
    for upload in uploads:
        assert at_tcp[upload[:16]] == upload
    # Each upload is more than the stream's receive window (1 MiB), so no reader can have
    # given the FIN before its splice (then it is paused instead: a_pause_reaching_...).
    assert len(handed) == len(uploads) and all(handed), handed
    assert not paused


def test_a_peer_reset_resets_the_tcp_side_and_a_tcp_reset_the_stream() -> None:
    async def main() -> tuple[str, SpliceOutcome, SpliceOutcome, str]:
        listener, conn, tcp_ends, results = await splicing_pair()

        # 1. The client aborts its stream: the TCP peer sees a reset.
        stream, reader, _ = await spliced_flow(conn, tcp_ends, b"x")
        stream.abort()
        tcp_saw = await how_tcp_ends(reader)
        first = await asyncio.wait_for(results.get(), 10)

        # 2. The TCP peer resets: the client's stream fails with H3_CONNECT_ERROR.
        stream, reader, writer = await spliced_flow(conn, tcp_ends, b"y")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()
        with pytest.raises(StreamReset) as failure:
            await asyncio.wait_for(stream.read(), 10)
        second = await asyncio.wait_for(results.get(), 10)
        # The connection carries on.
        stream, reader, writer = await spliced_flow(conn, tcp_ends, b"z")
        conn.close()
        await conn.wait_closed()
        listener.close()
        writer.close()
        return tcp_saw, first, second, str(failure.value)

    tcp_saw, first, second, client_saw = run(main())
    assert tcp_saw == "reset"
    assert "0x10c" in first.error  # the client's abort: H3_REQUEST_CANCELLED
    assert first.bytes_from_stream == 1
    assert "reset" in second.error.lower()
    assert "0x10f" in client_saw  # H3_CONNECT_ERROR, as the Python pump sends


def test_a_tcp_reset_is_heard_while_the_stream_waits_for_credit() -> None:
    """The TCP side writes until the peer's credit runs out (its reader reads nothing),
    then resets: the splice fails the flow then. It read the socket only once the
    stream took the last chunk, so the reset waited for the reader (a review: until the
    flow's idle timeout, an hour by default, for a reader that never came back)."""

    async def main() -> SpliceOutcome:
        listener, conn, tcp_ends, results = await splicing_pair()
        stream, _, writer = await spliced_flow(conn, tcp_ends, b"x")
        writer.write(bytes(8 << 20))  # more than the stream's credit and the socket hold
        # Blocked: the reader's engine took what it reads ahead, the rest waits in the
        # writer's buffer (the splice stopped reading the socket).
        await until(lambda: stream.buffered_bytes >= READ_AHEAD)
        for _ in range(256):  # the sockets' buffers grow under load: fill them first
            if writer.transport.get_write_buffer_size() > 0:
                break
            writer.write(bytes(1 << 20))
        assert writer.transport.get_write_buffer_size() > 0, "the splice kept reading"
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()
        outcome = await asyncio.wait_for(results.get(), 10)
        conn.close()
        await conn.wait_closed()
        listener.close()
        return outcome

    outcome = run(main())
    assert "reset" in outcome.error.lower(), outcome


def test_a_spliced_stream_tells_its_bytes_while_the_engine_copies_it() -> None:
    """``spliced_bytes()`` reads the engine's counts of a running splice, as its outcome
    will give them (a sidecar's byte counters showed a flow only at its end); None
    before the splice and after it."""

    async def main() -> None:
        spliced: asyncio.Queue[MeshStream] = asyncio.Queue()
        before: list[tuple[int, int] | None] = []

        async def handler(stream: MeshStream) -> None:
            sock, reader, writer = await tcp_pair()
            tcp_ends.put_nowait((reader, writer))
            before.append(stream.spliced_bytes())
            spliced.put_nowait(stream)
            outcomes.put_nowait(await stream.splice_socket(sock))

        tcp_ends: TcpEnds = asyncio.Queue()
        outcomes: asyncio.Queue[SpliceOutcome] = asyncio.Queue()
        listener = await transport("native", SERVER).listen(("127.0.0.1", 0), handler)
        conn = await transport("native", CLIENT).connect(listener.address)
        stream = await conn.open_stream(TARGET)
        stream.write(b"u" * 1000)
        reader, writer = await asyncio.wait_for(tcp_ends.get(), 10)
        assert await asyncio.wait_for(reader.readexactly(1000), 10) == b"u" * 1000
        writer.write(b"d" * 3000)
        assert await asyncio.wait_for(stream.readexactly(3000), 10) == b"d" * 3000
        server_stream = await spliced.get()
        assert before == [None]
        await until(lambda: server_stream.spliced_bytes() == (3000, 1000))
        assert moved_so_far(server_stream, SpliceResult()) == (3000, 1000)
        stream.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.write_eof()
        assert await asyncio.wait_for(stream.read(), 10) == b""
        outcome = await asyncio.wait_for(outcomes.get(), 10)
        assert (outcome.bytes_to_stream, outcome.bytes_from_stream, outcome.error) == (
            3000,
            1000,
            "",
        )
        assert server_stream.spliced_bytes() is None
        writer.close()
        conn.close()
        await conn.wait_closed()
        listener.close()

    run(main())


def test_a_peer_stop_sending_resets_a_quiet_tcp_side_at_once() -> None:
    """A peer's STOP_SENDING with an error code fails the flow when it arrives, as the
    Python pump does, also while the TCP side has nothing to send (the splice heard of
    it only at its next write before: a TCP peer waiting to be asked waited for ever);
    with H3_NO_ERROR (``close()`` before the answer) the flow goes on."""

    async def main() -> tuple[str, SpliceOutcome]:
        listener, conn, tcp_ends, results = await splicing_pair()
        stream, reader, _ = await spliced_flow(conn, tcp_ends, b"x")
        conn.quic.stop_stream(stream.stream_id, 0x10C)  # the engine's own call
        conn.transmit()
        tcp_saw = await how_tcp_ends(reader)
        outcome = await asyncio.wait_for(results.get(), 10)
        # A polite stop (H3_NO_ERROR, with our FIN) leaves the flow to end as usual.
        stream, reader, writer = await spliced_flow(conn, tcp_ends, b"y")
        stream.close()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.write(b"dropped")
        writer.close()
        polite = await asyncio.wait_for(results.get(), 10)
        assert polite.error == ""
        conn.close()
        await conn.wait_closed()
        listener.close()
        return tcp_saw, outcome

    tcp_saw, outcome = run(main())
    assert tcp_saw == "reset"
    assert "STOP_SENDING" in outcome.error and "0x10c" in outcome.error
    assert outcome.bytes_from_stream == 1


def test_other_engines_do_not_splice() -> None:
    payload = hashlib.sha256(b"seed").digest() * 5000

    async def main() -> bytes:
        async def handler(stream: MeshStream) -> None:
            assert not stream.can_splice()
            with socket.socket() as unused, pytest.raises(TunnelError):
                await stream.splice_socket(unused)
            stream.write(await stream.read())
            stream.write_eof()

        listener = await transport("aioquic", SERVER).listen(("127.0.0.1", 0), handler)
        conn = await transport("aioquic", CLIENT).connect(listener.address)
        stream = await conn.open_stream(TARGET)
        stream.write(payload)
        stream.write_eof()
        back = await asyncio.wait_for(stream.read(), 30)
        conn.close()
        await conn.wait_closed()
        listener.close()
        return back

    assert run(main()) == payload


def narrow_tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (the end to hand over, the application's end)
    whose buffers cannot grow: what the application has not read stays small."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
        sock.connect(server.getsockname())
        app, _ = server.accept()
    app.setblocking(False)
    return sock, app


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while chunk := await loop.sock_recv(sock, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_what_quinn_held_for_a_spliced_flow_reaches_tcp_after_the_peers_close() -> None:
    # The TCP application reads nothing until the connection has ended, so most of
    # the upload (more than the TCP buffers and the splice's chunk hold) is still in
    # quinn when the client's CONNECTION_CLOSE arrives (it closes once the server
    # acknowledged every byte). All of it, and the end of the flow, must still reach
    # the TCP side: the splice once failed at the close and reset the socket.
    window = 4 << 20
    payload = random.Random(5).randbytes(2 << 20)
    outcomes: list[SpliceOutcome] = []
    apps: list[socket.socket] = []

    async def main() -> bytes:
        async def handler(stream: MeshStream) -> None:
            sock, app = narrow_tcp_pair()
            app.shutdown(socket.SHUT_WR)  # the application has nothing to send
            apps.append(app)
            outcomes.append(await stream.splice_socket(sock))

        listener = await transport("native", SERVER, stream_window=window).listen(
            ("127.0.0.1", 0), handler
        )
        conn = await transport("native", CLIENT, stream_window=window).connect(listener.address)
        try:
            stream = await conn.open_stream(TARGET)
            stream.write(payload)
            stream.write_eof()
            assert await asyncio.wait_for(stream.read(), 30) == b""
            (accepted,) = listener.connections
            await conn.aclose()  # returns once the server acknowledged every byte
            await until(lambda: accepted.is_closed)  # the server's engine saw the close
            assert not outcomes  # the splice still has to write what quinn held
            with apps[0]:
                got = await asyncio.wait_for(read_all(apps[0]), 30)
            await until(lambda: bool(outcomes))
            return got
        finally:
            conn.close()
            await conn.wait_closed()
            listener.close()
            await listener.wait_closed()

    got = run(main())
    assert len(got) == len(payload)
    assert got == payload
    assert outcomes == [SpliceOutcome(0, len(payload), "")]


@pytest.mark.parametrize("client_engine", ["native", "aioquic"])
def test_a_close_right_after_the_client_read_the_end_is_no_reset(client_engine: str) -> None:
    # The client closes its connection (H3_NO_ERROR) the moment it has read the end
    # of the response: its close can overtake its acknowledgement of the last bytes
    # and the FIN, or reach the server's engine with it. Every byte was delivered,
    # so the splice must not report a failure (a sidecar logged such flows as reset;
    # before the fix, 1 to 10 of 20 flows here did).
    rounds = 30
    response = b"r" * 100
    outcomes: asyncio.Queue[SpliceOutcome] = asyncio.Queue()

    async def main() -> None:
        async def handler(stream: MeshStream) -> None:
            sock, reader, writer = await tcp_pair()

            async def app() -> None:
                await reader.read()
                writer.write(response)
                writer.write_eof()
                await writer.drain()

            app_task = asyncio.ensure_future(app())
            outcomes.put_nowait(await stream.splice_socket(sock))
            await app_task
            writer.close()

        listener = await transport("native", SERVER).listen(("127.0.0.1", 0), handler)
        client = transport(client_engine, CLIENT)
        try:
            for _ in range(rounds):
                conn = await client.connect(listener.address)
                stream = await conn.open_stream(TARGET)
                stream.write(b"request")
                stream.write_eof()
                assert await asyncio.wait_for(stream.read(), 30) == response
                conn.close()
                await conn.wait_closed()
        finally:
            listener.close()
            await listener.wait_closed()
        got = [await asyncio.wait_for(outcomes.get(), 30) for _ in range(rounds)]
        failed = [outcome.error for outcome in got if outcome.error]
        assert not failed, f"{len(failed)} of {rounds} flows failed: {failed[0]}"
        assert got == [SpliceOutcome(len(response), len(b"request"), "")] * rounds

    run(main())


def test_a_close_before_a_spliced_flow_ended_is_still_a_reset() -> None:
    # Real failures keep their reset: (1) the client closes its connection (without
    # an error) while the server's splice still has bytes to send; (2) the client
    # closes after sending part of its upload, without a FIN. The TCP application
    # sees a reset, after the bytes that arrived before the close in (2).
    async def main() -> tuple[SpliceOutcome, SpliceOutcome, bytes, str]:
        outcomes: asyncio.Queue[SpliceOutcome] = asyncio.Queue()
        tcp_ends: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

        async def handler(stream: MeshStream) -> None:
            sock, reader, writer = await tcp_pair()
            tcp_ends.put_nowait((reader, writer))
            outcomes.put_nowait(await stream.splice_socket(sock))

        listener = await transport("native", SERVER).listen(("127.0.0.1", 0), handler)
        client = transport("native", CLIENT, stream_window=64 << 10)
        try:
            # (1) More than the client's windows take while it reads nothing.
            conn = await client.connect(listener.address)
            stream = await conn.open_stream(TARGET)
            stream.write_eof()
            reader, writer = await asyncio.wait_for(tcp_ends.get(), 10)
            writer.write(b"d" * (8 << 20))
            writer.write_eof()
            assert await asyncio.wait_for(stream.read(1), 10) == b"d"
            conn.close()
            await conn.wait_closed()
            first = await asyncio.wait_for(outcomes.get(), 10)
            writer.transport.abort()

            # (2) Part of an upload, no FIN, then the close.
            conn = await client.connect(listener.address)
            stream = await conn.open_stream(TARGET)
            stream.write(b"partial")
            reader, writer = await asyncio.wait_for(tcp_ends.get(), 10)
            writer.write_eof()  # the application's direction ends at once
            assert await asyncio.wait_for(stream.read(), 10) == b""
            got = await asyncio.wait_for(reader.readexactly(7), 10)
            conn.close()
            await conn.wait_closed()
            try:
                await asyncio.wait_for(reader.read(), 10)
                tcp_saw = "clean end"
            except ConnectionResetError:
                tcp_saw = "reset"
            second = await asyncio.wait_for(outcomes.get(), 10)
            writer.close()
        finally:
            listener.close()
            await listener.wait_closed()
        return first, second, got, tcp_saw

    first, second, got, tcp_saw = run(main())
    assert "connection lost" in first.error
    assert first.bytes_to_stream < 8 << 20
    assert "connection lost" in second.error
    assert (second.bytes_from_stream, got, tcp_saw) == (7, b"partial", "reset")


def test_a_spliced_flow_cut_by_its_peers_graceful_close_says_so() -> None:
    """A splice whose connection the peer closed gracefully (a draining sidecar) read
    "connection lost: closed by peer: 256" (quinn's words: the code bare, in decimal);
    it names the code and what it means now, as the connection's own close does."""

    async def main() -> SpliceOutcome:
        listener, conn, tcp_ends, results = await splicing_pair()
        await spliced_flow(conn, tcp_ends, b"x")
        conn.close()  # the client side goes away gracefully mid-flow
        outcome = await asyncio.wait_for(results.get(), 10)
        await conn.wait_closed()
        listener.close()
        return outcome

    outcome = run(main())
    assert "closed by peer: error code 0x100, H3_NO_ERROR" in outcome.error, outcome
