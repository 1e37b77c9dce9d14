"""What a QUIC listener does with peers that break the protocol or fail handshakes at will.

Each failure is the peer's: its connection (or flow) ends as the RFCs say, the listener
logs one line naming the peer and what it did, rate-limited (anyone who can send a
datagram can fail a handshake; a peer can break the protocol once per connection), and
other flows carry on. The hostile client is quicmesh's own client with its QUIC state
pushed past what the protocol allows (the aioquic engine's connection, or raw frames on
the native one's stream).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
from typing import Any

import pytest
from aioquic.quic.connection import QuicConnection
from quic_helpers import (
    CA,
    CLIENT,
    SERVER,
    TARGET,
    only_connection,
    require_engine,
    run,
    tcp_pair,
    until,
)

from quicmesh import QuicTransport
from quicmesh.errors import PeerVerificationError, QuicmeshError, StreamReset
from quicmesh.tls import DevCA
from quicmesh.transport.stream import MeshStream, SpliceOutcome

H3_NO_ERROR = 0x100
QUIC_LOGGERS = ("quicmesh.transport.quic", "quicmesh.transport.native")


def transport(engine: str, identity: object, **kwargs: Any) -> QuicTransport:
    require_engine(engine)
    return QuicTransport(
        identity=identity,  # type: ignore[arg-type]
        trust=kwargs.pop("trust", CA.trust_bundle),
        engine=engine,
        congestion_control="cubic",
        **kwargs,
    )


async def echo(stream: MeshStream) -> None:
    stream.accept()
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()
    stream.write_eof()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name in (*QUIC_LOGGERS, "quic")
    ]


def expired_client() -> Any:
    """The mesh's client identity, with a certificate that expired yesterday."""
    now = datetime.datetime.now(datetime.UTC)
    return CA.issue(
        CLIENT.spiffe_id,
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )


async def refused_handshake(identity: Any, address: Any) -> None:
    """Connect as ``identity`` from aioquic's client and see the server refuse it (TLS
    1.3: the client hears of the refusal at its first stream)."""
    with pytest.raises(QuicmeshError):
        conn = await transport("aioquic", identity).connect(address)
        try:
            stream = await conn.open_stream(TARGET)
            await stream.read()
        finally:
            conn.close()
            await conn.wait_closed()


@pytest.mark.parametrize("server_engine", ["native", "aioquic"])
def test_failed_handshakes_are_counted_each_and_logged_once_an_interval_with_the_address(
    server_engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, every failed handshake was one WARNING (the aioquic engine: aioquic's own
    line too), without the client's address: a log anyone could flood."""
    stranger = DevCA().issue("spiffe://mesh.local/ns/default/sa/intruder")  # another CA

    async def main() -> int:
        server = transport(server_engine, SERVER)
        listener = await server.listen(("127.0.0.1", 0), echo)
        for _ in range(5):
            await refused_handshake(stranger, listener.address)
        await until(lambda: sum(server.handshake_failures.values()) >= 5)
        refused = sum(server.handshake_failures.values())
        # The listener still serves its own mesh.
        conn = await transport("aioquic", CLIENT).connect(listener.address)
        stream = await conn.open_stream(TARGET)
        stream.write(b"still here")
        stream.write_eof()
        assert await stream.read() == b"still here"
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
        return refused

    with caplog.at_level(logging.DEBUG):
        refused = run(main())
    assert refused == 5
    lines = [line for line in warnings(caplog) if "client" in line]
    assert len(lines) == 1, lines
    assert re.search(r"client at 127\.0\.0\.1:\d+", lines[0]), lines


@pytest.mark.parametrize("server_engine", ["native", "aioquic"])
def test_a_peer_over_the_stream_limit_is_named_in_one_line(
    server_engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that opens streams past MAX_STREAMS breaks QUIC (STREAM_LIMIT_ERROR): its
    connection is closed and the listener says who it was. Before, the native engine said
    nothing and aioquic logged a line per datagram, naming no one."""

    server = transport(server_engine, SERVER, max_streams=4)

    async def main() -> str:
        listener = await server.listen(("127.0.0.1", 0), echo)
        conn = await transport("aioquic", CLIENT).connect(listener.address)
        stream = await conn.open_stream(TARGET)  # (the server's handshake is done then)
        stream.write(b"x")
        assert await stream.read(1) == b"x"
        quic = conn.quic
        quic._remote_max_streams_bidi = 1000  # the hostile part: ignore the peer's limit
        for _ in range(20):
            stream_id = quic.get_next_available_stream_id()
            quic.send_stream_data(stream_id, b"\x00\x01x")  # a DATA frame first: bad anyway
        conn.transmit()
        await until(lambda: conn.lost_error is not None)
        await until(lambda: any("broke" in line for line in warnings(caplog)))
        lost = str(conn.lost_error)
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
        return lost

    with caplog.at_level(logging.DEBUG):
        lost = run(main())
    lines = warnings(caplog)
    [line] = [line for line in lines if "broke" in line]
    assert CLIENT.spiffe_id in line and re.search(r" at 127\.0\.0\.1:\d+", line), line
    assert "the peer broke QUIC" in line and "(STREAM_LIMIT_ERROR, 0x4)" in line, line
    # ... and counted (quicmesh_listener_peer_violations_total{protocol="quic"})
    assert (server.counters["peer_violations_quic"], server.counters["peer_violations_http3"]) == (
        1,
        0,
    )
    assert not [line for line in lines if line.startswith("Error")], lines  # aioquic's own
    assert any(words in lost.lower() for words in ("0x4", "too many streams")), lost


async def splicing_listener() -> tuple[Any, asyncio.Queue[Any], asyncio.Queue[SpliceOutcome]]:
    """A native listener splicing each stream to a new loopback TCP connection."""
    ends: asyncio.Queue[Any] = asyncio.Queue()
    outcomes: asyncio.Queue[SpliceOutcome] = asyncio.Queue()

    async def handler(stream: MeshStream) -> None:
        sock, reader, writer = await tcp_pair()
        ends.put_nowait((reader, writer))
        outcomes.put_nowait(await stream.splice_socket(sock))

    listener = await transport("native", SERVER).listen(("127.0.0.1", 0), handler)
    return listener, ends, outcomes


def test_a_stop_sending_without_error_is_answered_with_reset_stream_at_once() -> None:
    """RFC 9000 3.5: a STOP_SENDING is answered with RESET_STREAM. The engine's splice
    dropped what the destination sent after a STOP_SENDING with H3_NO_ERROR, but reset
    the stream only once the destination's side ended: the peer's stream stayed open
    (and held its stream slot) meanwhile."""

    async def main() -> None:
        listener, ends, outcomes = await splicing_listener()
        # (aioquic's client: quinn's drops a RESET_STREAM for a half it stopped itself)
        conn = await transport("aioquic", CLIENT).connect(listener.address)
        stream = await conn.open_stream(TARGET)
        stream.write(b"x")
        reader, writer = await asyncio.wait_for(ends.get(), 10)
        assert await reader.readexactly(1) == b"x"
        conn.quic.stop_stream(stream.stream_id, H3_NO_ERROR)
        conn.transmit()
        writer.write(b"not wanted")  # the destination still has something to say
        # The peer hears RESET_STREAM while the destination's side is still open.
        with pytest.raises(StreamReset, match="0x100"):
            await asyncio.wait_for(stream.read(), 5)  # (before: not until writer.close())
        writer.close()
        conn.close()
        await asyncio.wait_for(outcomes.get(), 10)
        listener.close()
        await listener.wait_closed()

    run(main())


def test_a_frame_a_request_stream_may_not_carry_closes_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 9114 7.2.4 and 8.1: a SETTINGS frame on a request stream is a connection error
    (H3_FRAME_UNEXPECTED), as the Python session makes it; the engine's splice reset only
    the stream, and nothing but the access log said which peer did it."""

    async def main() -> str:
        listener, ends, outcomes = await splicing_listener()
        conn = await transport("native", CLIENT).connect(listener.address)
        stream = await conn.open_stream(TARGET)
        stream.write(b"x")
        reader, writer = await asyncio.wait_for(ends.get(), 10)
        assert await reader.readexactly(1) == b"x"
        conn.quic.send_stream_data(stream.stream_id, b"\x04\x00")  # SETTINGS, empty
        conn.transmit()
        await until(lambda: conn.lost_error is not None)
        await until(lambda: any("broke" in line for line in warnings(caplog)))
        outcome = await asyncio.wait_for(outcomes.get(), 10)
        assert "frame type 0x4 is not allowed on a request stream" in outcome.error
        writer.close()
        listener.close()
        await listener.wait_closed()
        return str(conn.lost_error)

    with caplog.at_level(logging.WARNING):
        lost = run(main())
    assert "frame type 0x4" in lost, lost
    [line] = [line for line in warnings(caplog) if "broke" in line]
    assert CLIENT.spiffe_id in line and "the peer broke HTTP/3" in line, line
    assert "(H3_FRAME_UNEXPECTED, 0x105)" in line, line


async def refusal(engine: str, server: object, client: object) -> str:
    """The PeerVerificationError's message of ``client`` connecting to ``server``."""
    listener = await transport(engine, server).listen(("127.0.0.1", 0), echo)
    try:
        with pytest.raises(PeerVerificationError) as refused:
            await transport(engine, client).connect(listener.address)
    finally:
        listener.close()
        await listener.wait_closed()
    return str(refused.value)


def test_a_client_refused_for_its_certificate_is_told_it_was_its_own() -> None:
    """The native client's error read "handshake refused: ... invalid peer certificate:
    peer certificate has expired", as if the server's certificate had expired: the
    server's reason speaks of its peer, which is us."""
    message = run(refusal("native", SERVER, expired_client()))
    assert message.startswith("handshake refused: the server refused our certificate: "), message
    assert "expired" in message, message


@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_a_server_certificate_we_refuse_is_named_the_servers(engine: str) -> None:
    """Our verdict on the server's certificate names the server, in the verifier's words,
    on both engines (native said "the cryptographic handshake failed: error 46: invalid
    peer certificate: ...": no side, a TLS alert's number)."""
    impostor = DevCA().issue("spiffe://mesh.local/ns/default/sa/server")
    message = run(refusal(engine, impostor, CLIENT))
    assert message.startswith("server certificate not trusted: "), message
    assert "error 46" not in message and "cryptographic handshake" not in message, message


@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_a_peers_close_gives_its_code_in_hex(engine: str) -> None:
    """native said "closed by peer: 256" (quinn's decimal), aioquic "error code 0x100";
    both name H3_NO_ERROR for what it is (a review read "closed by peer: 256" as an
    unexplained failure when the peer drained)."""

    async def main() -> str:
        listener = await transport(engine, SERVER).listen(("127.0.0.1", 0), echo)
        conn = await transport(engine, CLIENT).connect(listener.address)
        accepted = await only_connection(listener)
        accepted.close()
        await until(lambda: conn.lost_error is not None)
        listener.close()
        await listener.wait_closed()
        return str(conn.lost_error)

    message = run(main())
    assert "error code 0x100, H3_NO_ERROR: a graceful close" in message, message
    assert "256" not in message, message


@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_stalled_streams_hold_at_most_the_connection_window(engine: str) -> None:
    """``connection_window`` bounds what all of a connection's unread streams hold at the
    receiver, as each stream's window bounds one. The native engine bounded only each
    stream: twelve stalled streams held twelve stream windows (quinn's connection credit
    reopens as the engine reads, and it read for each stream up to its window)."""
    window, stream_window, count = 1 << 20, 256 << 10, 12
    held: list[MeshStream] = []

    async def stall(stream: MeshStream) -> None:
        held.append(stream)
        stream.accept()
        await asyncio.Event().wait()  # never reads

    async def main() -> int:
        options = {"connection_window": window, "stream_window": stream_window}
        listener = await transport(engine, SERVER, **options).listen(("127.0.0.1", 0), stall)
        conn = await transport(engine, CLIENT).connect(listener.address)
        streams = [await conn.open_stream(TARGET) for _ in range(count)]

        async def write(stream: MeshStream) -> None:
            while True:
                stream.write(b"w" * 65536)
                await stream.drain()

        writers = [asyncio.ensure_future(write(stream)) for stream in streams]
        await until(lambda: sum(s.buffered_bytes for s in held) >= window * 3 // 4)
        most = 0
        for _ in range(100):  # the bound holds while the writers keep on (2 s)
            most = max(most, sum(s.buffered_bytes for s in held))
            await asyncio.sleep(0.02)
        for writer in writers:
            writer.cancel()
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
        return most

    most = run(main())
    # (reads asked for before the window filled may each add one 64 KiB chunk)
    assert most <= window + count * 65536, most


@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_a_stalled_stream_lets_its_peer_send_about_one_stream_window(engine: str) -> None:
    """A reader that stops lets its peer send about ``stream_window`` more, on either
    engine. The native engine read ahead for Python up to a whole window beyond quinn's,
    so a stalled stream took two, and its sender kept on twice as long, taking the link
    from the connection's other streams meanwhile (docs/hol.md, "Stall isolation on the
    native engine")."""
    window = 1 << 20
    held: list[MeshStream] = []

    async def stall(stream: MeshStream) -> None:
        held.append(stream)
        stream.accept()
        await asyncio.Event().wait()  # never reads

    async def main() -> tuple[int, int]:
        listener = await transport(engine, SERVER, stream_window=window).listen(
            ("127.0.0.1", 0), stall
        )
        conn = await transport(engine, CLIENT).connect(listener.address)
        accepted = await only_connection(listener)
        stream = await conn.open_stream(TARGET)

        async def write() -> None:
            while True:
                stream.write(b"w" * 65536)
                await stream.drain()

        writer = asyncio.ensure_future(write())
        await until(lambda: accepted.stats()["bytes_received"] >= window)
        most = 0
        for _ in range(100):  # the bound holds while the writer keeps on (2 s)
            most = max(most, accepted.stats()["bytes_received"])
            await asyncio.sleep(0.02)
        writer.cancel()
        buffered = held[0].buffered_bytes
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
        return most, buffered

    most, buffered = run(main())
    # UDP payload: the window, what the engine read ahead (native: 128 KiB, with a
    # 64 KiB read asked for before), packet and HTTP/3 overhead and the handshake.
    assert most <= window * 3 // 2, (most, buffered)


@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_streams_that_end_unread_give_their_share_of_the_window_back(engine: str) -> None:
    """A flow the client gives up while the server's application has not read its upload
    (a slow destination) must not keep its bytes counted against the connection's window:
    the native engine's count kept them once the stream was forgotten, and after a few
    such flows every new stream on the connection waited for ever."""
    window = 1 << 20
    slow: list[MeshStream] = []

    async def handler(stream: MeshStream) -> None:
        stream.accept()
        if stream.headers.get("x-kind") != "probe":
            slow.append(stream)
            await asyncio.Event().wait()  # a destination that reads nothing
        received = 0
        while data := await stream.read(65536):
            received += len(data)
        stream.write(str(received).encode())
        stream.write_eof()

    async def main() -> bytes:
        options = {"connection_window": window, "stream_window": 512 << 10}
        listener = await transport(engine, SERVER, **options).listen(("127.0.0.1", 0), handler)
        conn = await transport(engine, CLIENT).connect(listener.address)
        # Each slow flow's unread upload is counted (native: what the engine read ahead
        # for Python, 128 KiB; aioquic: all 400 KiB), more than the window in all.
        for flow in range(10):
            stream = await conn.open_stream(TARGET, {"x-kind": "slow"})
            stream.write(b"u" * (400 << 10))
            await until(lambda n=flow: len(slow) > n and slow[n].buffered_bytes >= 120 << 10)
            stream.abort()
            await until(lambda n=flow: slow[n].exception() is not None)
        probe = await conn.open_stream(TARGET, {"x-kind": "probe"})
        probe.write(b"p" * window)
        probe.write_eof()
        answer = await asyncio.wait_for(probe.read(), 10)
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
        return answer

    assert run(main()) == str(window).encode()


@pytest.mark.parametrize("server_engine", ["native", "aioquic"])
def test_a_client_breaking_quic_in_its_handshake_is_counted_and_named(
    server_engine: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends a transport parameter only a server may send breaks QUIC
    during its handshake (TRANSPORT_PARAMETER_ERROR): counted and logged with its address
    on both engines (the aioquic listener's only line was aioquic's own, now at DEBUG)."""
    serialize = QuicConnection._serialize_transport_parameters

    def as_a_server(self: QuicConnection) -> bytes:
        if not self._is_client:
            return serialize(self)
        self._is_client = False  # original_destination_connection_id: a server's only
        try:
            return serialize(self)
        finally:
            self._is_client = True

    async def main() -> int:
        server = transport(server_engine, SERVER)
        listener = await server.listen(("127.0.0.1", 0), echo)
        with monkeypatch.context() as patched:
            patched.setattr(QuicConnection, "_serialize_transport_parameters", as_a_server)
            with pytest.raises(QuicmeshError):
                await transport("aioquic", CLIENT).connect(listener.address, timeout=5)
        await until(lambda: sum(server.handshake_failures.values()) > 0)
        listener.close()
        await listener.wait_closed()
        return sum(server.handshake_failures.values())

    with caplog.at_level(logging.WARNING):
        assert run(main()) == 1
    [line] = [line for line in warnings(caplog) if "client at 127.0.0.1" in line]
    assert "not allowed" in line or "transport parameter" in line.lower(), line


@pytest.mark.parametrize("server_engine", ["native", "aioquic"])
def test_one_reason_for_refusing_clients_does_not_hide_another(
    server_engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Handshake failures are rate-limited per reason: a stranger refused every second
    does not hide the line of a workload whose own certificate just expired."""
    stranger = DevCA().issue("spiffe://mesh.local/ns/default/sa/intruder")  # another CA
    expired = expired_client()

    async def main() -> None:
        server = transport(server_engine, SERVER)
        listener = await server.listen(("127.0.0.1", 0), echo)
        for identity in (stranger, stranger, expired):
            await refused_handshake(identity, listener.address)
        await until(lambda: sum(server.handshake_failures.values()) >= 3)
        listener.close()
        await listener.wait_closed()

    with caplog.at_level(logging.WARNING):
        run(main())
    lines = [line for line in warnings(caplog) if "client at 127.0.0.1" in line]
    assert len(lines) == 2, lines
    assert "expired" in lines[1], lines
