"""Inbound engine flows (``Listener.set_engine_flows``): a peer's CONNECT decided at once,
in the native engine's event batch, and carried by the engine (connect the destination,
answer 200, splice) without the HTTP/3 session, a stream object or a handler task.

A CONNECT the decider declines goes to the handler as before; one whose destination
cannot be connected is refused by the decider's ``ended`` (``flow.refuse``) and the peer
sees that status and reason; an abort resets both sides.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pylsqpack
import pytest
from aioquic.h3.connection import validate_request_headers
from hypothesis import given, settings
from hypothesis import strategies as st
from quic_helpers import client_transport, require_engine, run, server_transport, until

from quicmesh import _aioquic
from quicmesh.errors import StreamRefused, StreamReset
from quicmesh.sidecar.launch import held_port
from quicmesh.transport.base import EngineFlowPlan, InboundEngineFlow
from quicmesh.transport.stream import MeshStream, SpliceOutcome


class Decider:
    """Plans every CONNECT to ``plan_port`` (None: declines them all); records what
    it saw and how each flow ended."""

    def __init__(self, plan_port: int | None) -> None:
        self.plan_port = plan_port
        self.flows: list[InboundEngineFlow] = []
        self.ended: list[SpliceOutcome | OSError] = []

    def __call__(self, flow: InboundEngineFlow) -> EngineFlowPlan | None:
        self.flows.append(flow)
        if self.plan_port is None:
            return None

        def ended(outcome: SpliceOutcome | OSError) -> None:
            self.ended.append(outcome)
            if isinstance(outcome, OSError):
                flow.refuse(502, f"cannot reach {flow.target}: {outcome.strerror}")

        return EngineFlowPlan("127.0.0.1", self.plan_port, 2.0, ended)


async def echo_server() -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def with_decider(
    decider: Decider,
    test: Callable[[Any, list[MeshStream]], Coroutine[Any, Any, None]],
    client_engine: str = "native",
    authorize: Callable[[str, str], bool] | None = None,
) -> None:
    """``test(connection, handled)``: a client connection to a native listener whose
    CONNECTs go to ``decider`` first (``handled``: the streams its handler got; the
    listener's ``authorize``, if given, before either)."""
    require_engine("native")
    require_engine(client_engine)
    handled: list[MeshStream] = []

    async def handler(stream: MeshStream) -> None:
        handled.append(stream)
        stream.refuse(403, "the handler refuses")

    listener = await server_transport(engine="native").listen(("127.0.0.1", 0), handler, authorize)
    assert listener.set_engine_flows(decider)
    connection = await client_transport(engine=client_engine).connect(listener.address)
    try:
        await test(connection, handled)
    finally:
        connection.close()
        await connection.wait_closed()
        listener.close()
        await listener.wait_closed()


EchoTest = Callable[[Any, list[MeshStream], Decider, int], Coroutine[Any, Any, None]]


async def to_echo(test: EchoTest) -> None:
    """``test(connection, handled, decider, port)`` (as :func:`with_decider`) with a
    decider that plans every CONNECT to an echo server on ``port``."""
    server = await echo_server()
    port = server.sockets[0].getsockname()[1]
    decider = Decider(port)
    try:
        await with_decider(decider, lambda c, handled: test(c, handled, decider, port))
    finally:
        server.close()


def test_a_planned_connect_is_answered_and_spliced_by_the_engine() -> None:
    async def test(connection: Any, handled: list[MeshStream], decider: Decider, port: int) -> None:
        stream = await connection.open_stream(f"10.1.2.3:{port}", {"x-trace": "t1"})
        payload = bytes(range(256)) * 1024
        stream.write(payload)
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(-1), 20) == payload
        await until(lambda: len(decider.ended) == 1, 10)
        (outcome,) = decider.ended
        assert isinstance(outcome, SpliceOutcome)
        assert (outcome.bytes_to_stream, outcome.bytes_from_stream, outcome.error) == (
            len(payload),
            len(payload),
            "",
        )
        (flow,) = decider.flows
        assert flow.target == f"10.1.2.3:{port}"
        assert flow.headers == {"x-trace": "t1"}
        assert flow.peer_identity == "spiffe://mesh.local/ns/default/sa/client"
        assert not handled  # the handler never saw it

    run(to_echo(test))


def test_a_declined_connect_goes_to_the_handler() -> None:
    decider = Decider(None)

    async def test(connection: Any, handled: list[MeshStream]) -> None:
        with pytest.raises(StreamRefused, match="the handler refuses"):
            await connection.open_stream("10.1.2.3:80")
        assert len(decider.flows) == 1
        assert len(handled) == 1

    run(with_decider(decider, test))


def test_an_unreachable_destination_is_refused_with_the_deciders_reason() -> None:
    with held_port() as (tcp, _):  # bound, not listening: connects are refused
        decider = Decider(tcp.getsockname()[1])

        async def test(connection: Any, handled: list[MeshStream]) -> None:
            with pytest.raises(StreamRefused) as refused:
                await connection.open_stream("10.1.2.3:80")
            assert refused.value.status == 502
            assert "cannot reach 10.1.2.3:80" in str(refused.value)
            assert [type(o) for o in decider.ended] == [ConnectionRefusedError]
            assert not handled

        run(with_decider(decider, test))


def test_an_aborted_flow_is_reset_on_both_sides() -> None:
    async def test(connection: Any, handled: list[MeshStream], decider: Decider, port: int) -> None:
        stream = await connection.open_stream("10.1.2.3:80")
        stream.write(b"ping")
        assert await asyncio.wait_for(stream.read(4), 10) == b"ping"
        decider.flows[0].abort()
        with pytest.raises(StreamReset):
            await asyncio.wait_for(stream.read(-1), 10)
        await until(lambda: len(decider.ended) == 1, 10)
        outcome = decider.ended[0]
        assert isinstance(outcome, SpliceOutcome) and "aborted" in outcome.error

    run(to_echo(test))


def test_a_peer_reset_while_the_engine_connects_ends_the_flow_at_once() -> None:
    """The peer gives a flow up (RESET_STREAM) while the engine is still connecting to
    the destination (here one whose accept queue is full: the connect hangs): the flow
    ends as reset by the peer, unanswered, instead of holding the destination's slot
    until the connect timed out and answering a stream nobody waits on (502)."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = socket.create_connection(full.getsockname())  # fills the accept queue
        decider = Decider(full.getsockname()[1])

        async def test(connection: Any, handled: list[MeshStream]) -> None:
            stream = await connection.open_stream("10.1.2.3:80", wait_response=False)
            await until(lambda: len(decider.flows) == 1, 10)
            quic: Any = connection.quic
            quic.reset_stream(stream.stream_id, 0x10C)
            connection.h3_session.scheduler.activate(stream.stream_id)  # RESET_STREAM alone
            connection.transmit()
            await until(lambda: len(decider.ended) == 1, 10)
            (outcome,) = decider.ended
            assert isinstance(outcome, SpliceOutcome), outcome
            assert not outcome.connected
            assert "reset by peer (error code 0x10c)" in outcome.error
            assert not handled

        try:
            run(with_decider(decider, test, client_engine="aioquic"))
        finally:
            queued.close()


CONNECT = [(b":method", b"CONNECT"), (b":authority", b"10.1.2.3:80"), (b"x-a", b"b")]


def frame(frame_type: int, payload: bytes) -> bytes:
    return bytes([frame_type, len(payload)]) + payload  # (short payloads: 1-byte varints)


def test_only_a_whole_static_table_connect_is_read() -> None:
    """``read_static_request``: the fields and what follows the frame, or None for
    anything the connection's HTTP/3 layer must read (dynamic-table references, a frame
    cut short, another frame first, too large, invalid)."""
    whole = _aioquic.connect_request_frame(CONNECT)
    assert _aioquic.read_static_request(whole + b"data") == (CONNECT, b"data")
    assert _aioquic.read_static_request(whole[:-1]) is None
    assert _aioquic.read_static_request(frame(0x00, b"x") + whole) is None
    encoder = pylsqpack.Encoder()
    encoder.apply_settings(4096, 16)
    encoder.encode(0, CONNECT)
    _, dynamic = encoder.encode(4, CONNECT)  # refers to what the first one inserted
    assert dynamic[0] != 0  # Required Insert Count
    assert _aioquic.read_static_request(frame(0x01, dynamic)) is None
    assert _aioquic.read_static_request(frame(0x01, b"\x00\x00\x80")) is None  # RIC 0, dynamic ref
    assert _aioquic.read_static_request(whole, limit=40) is None
    _, invalid = pylsqpack.Encoder().encode(0, [(b":method", b"CONNECT"), (b"X-Up", b"1")])
    assert _aioquic.read_static_request(frame(0x01, invalid)) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_read_or_left_alone(data: bytes) -> None:
    read = _aioquic.read_static_request(data)
    if read is not None:
        fields, rest = read
        assert data.endswith(rest)
        assert dict(fields)[b":method"]


_HEADER_BYTES = st.binary(max_size=12) | st.sampled_from(
    [b":method", b":authority", b":path", b"CONNECT", b"te", b"trailers", b"x-a", b" v", b"v "]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_HEADER_BYTES, _HEADER_BYTES), max_size=5), st.booleans())
def test_the_quick_check_of_a_connect_accepts_nothing_aioquic_refuses(
    fields: list[tuple[bytes, bytes]], as_connect: bool
) -> None:
    """``read_static_request`` skips aioquic's byte-by-byte validation for a CONNECT as
    quicmesh sends one; what it lets through, aioquic accepts."""
    if as_connect:
        fields = [(b":method", b"CONNECT"), (b":authority", b"10.1.2.3:80"), *fields]
    if _aioquic._is_plain_connect(fields):
        validate_request_headers(fields)


_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=20)
_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_TOKEN, _VALUE, max_size=6))
def test_a_connect_as_quicmesh_sends_it_takes_the_quick_check(headers: dict[str, str]) -> None:
    headers = {n: v for n, v in headers.items() if n.encode() not in _aioquic._SPECIAL_HEADERS}
    fields = [(b":method", b"CONNECT"), (b":authority", b"[::1]:8080")]
    fields += [(n.encode(), v.encode()) for n, v in headers.items()]
    assert _aioquic._is_plain_connect(fields)
    whole = _aioquic.connect_request_frame(fields)
    assert _aioquic.read_static_request(whole) == (fields, b"")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=12), st.binary(max_size=40)), max_size=8),
    st.binary(max_size=60),
)
def test_a_static_table_section_decodes_to_at_most_the_expansion_bound(
    fields: list[tuple[bytes, bytes]], noise: bytes
) -> None:
    """Why ``read_static_request`` may skip the bound's walk for a short section: a
    section that refers to the static table only decodes to at most
    160 bytes (RFC 9114 sizes) per byte, whatever its bytes: the bound's length_bound."""
    static_entries = [
        (b":status", b"200"), (b"content-type", b"application/json"),
        (b"accept-encoding", b"gzip, deflate, br"), (b":method", b"CONNECT"),
    ]  # fmt: skip
    _, encoded = pylsqpack.Encoder().encode(0, static_entries + fields)
    for block in (encoded, b"\x00\x00" + noise):
        try:
            _, decoded = pylsqpack.Decoder(0, 0).feed_header(0, block)
        except Exception:
            continue
        size = sum(len(name) + len(value) + 32 for name, value in decoded)
        assert size <= _aioquic._STATIC_BOUND.length_bound(len(block)) == 160 * len(block)


def test_bytes_and_fin_right_behind_the_connect_go_to_the_destination() -> None:
    """A CONNECT sent without waiting for its answer, its payload and FIN in the same
    packet: what followed the HEADERS frame in the first read is not lost."""

    async def test(connection: Any, handled: list[MeshStream], decider: Decider, port: int) -> None:
        stream = await connection.open_stream("10.1.2.3:80", wait_response=False)
        stream.write(b"right behind")
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(-1), 10) == b"right behind"
        await until(lambda: len(decider.ended) == 1, 10)
        assert not handled

    run(to_echo(test))


def test_the_connections_authorize_is_asked_first() -> None:
    """A listener's ``authorize`` refuses before any decider sees the stream."""
    decider = Decider(1)

    async def test(connection: Any, handled: list[MeshStream]) -> None:
        with pytest.raises(StreamRefused) as refused:
            await connection.open_stream("10.1.2.3:80")
        assert refused.value.status == 403
        assert not decider.flows
        assert not handled

    run(with_decider(decider, test, authorize=lambda peer, target: False))


def test_flows_in_a_socket_pair_are_not_confused() -> None:
    """Many planned flows at once, each to its own echo connection: every byte goes
    back to its own stream."""

    async def test(connection: Any, handled: list[MeshStream], decider: Decider, port: int) -> None:
        async def one(index: int) -> bytes:
            stream = await connection.open_stream("10.1.2.3:80")
            stream.write(index.to_bytes(4, "big") * 5000)
            stream.write_eof()
            return bytes(await asyncio.wait_for(stream.read(-1), 20))

        results = await asyncio.gather(*(one(i) for i in range(24)))
        assert results == [i.to_bytes(4, "big") * 5000 for i in range(24)]
        await until(lambda: len(decider.ended) == 24, 10)
        assert not handled

    run(to_echo(test))


def test_an_unplanned_listener_says_it_cannot() -> None:
    require_engine("aioquic")

    async def main() -> None:
        listener = await server_transport(engine="aioquic").listen(
            ("127.0.0.1", 0), lambda stream: asyncio.sleep(0)
        )
        try:
            assert not listener.set_engine_flows(Decider(None))
        finally:
            listener.close()
            await listener.wait_closed()

    run(main())
