"""HTTP/3 GOAWAY (RFC 9114 5.2): a server going away is told to its clients, and a client
is told by its server.

aioquic reads a GOAWAY frame and drops it, and has no call to send one: a client kept
opening streams on a connection whose server had said it would process none, took any
ID (even a decreasing one's opposite, or an ID that is not a request stream's), and a
draining sidecar could only refuse each new flow (503) after it arrived.
"""

from __future__ import annotations

import asyncio

import pytest
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import ErrorCode as H3ErrorCode
from aioquic.h3.connection import FrameType, encode_frame
from hypothesis import given, settings
from hypothesis import strategies as st
from quic_helpers import (
    CA,
    CLIENT,
    SERVER,
    TARGET,
    Recorder,
    client_transport,
    run,
    server_transport,
    until,
)
from test_aioquic_layer import Clock, settle
from test_header_limits import _raw_h3_server

from quicmesh import ConnectionLost, H2Transport, StreamRefused
from quicmesh._aioquic import _GoawayReader
from quicmesh.sidecar.circuit import CircuitBreaker
from quicmesh.sidecar.cluster import is_connection_failure
from quicmesh.sidecar.config import CircuitBreakerConfig
from quicmesh.sidecar.pool import GOING_AWAY, MAX_DIALS_PER_FLOW, EndpointPool
from quicmesh.tunnel import events
from quicmesh.tunnel.connect import parse_target

ENGINES = ["native", "aioquic"]


def _send_control(server: object, frame: bytes) -> None:
    h3 = server.h3  # type: ignore[attr-defined]
    h3._quic.send_stream_data(h3._local_control_stream_id, frame)


def _goaway(stream_id: int) -> bytes:
    return bytes(encode_frame(FrameType.GOAWAY, encode_uint_var(stream_id)))


def test_a_server_goaway_stops_new_streams_and_open_ones_finish() -> None:
    clock = Clock()
    client, server = _raw_h3_server(clock)
    session = client.session
    open_ = session.open_stream(parse_target("x.svc:80"), {})
    settle(client, server, clock)
    _send_control(server, _goaway(open_ + 4))
    settle(client, server, clock)
    assert [e.stream_id for e in client.of(events.PeerGoingAway)] == [open_ + 4]
    assert not session.can_open_stream()
    # A lower ID later is allowed (RFC 9114 5.2) and reported again.
    _send_control(server, _goaway(open_))
    settle(client, server, clock)
    assert [e.stream_id for e in client.of(events.PeerGoingAway)] == [open_ + 4, open_]
    # The stream opened before carries on.
    server.h3.send_headers(open_, [(b":status", b"200")])
    settle(client, server, clock)
    assert [e.status for e in client.of(events.ResponseReceived)] == [200]
    assert client.quic._close_event is None and server.quic._close_event is None


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([_goaway(1)], H3ErrorCode.H3_ID_ERROR),  # not a client-initiated bidirectional stream
        ([_goaway(2)], H3ErrorCode.H3_ID_ERROR),
        ([_goaway(8), _goaway(12)], H3ErrorCode.H3_ID_ERROR),  # raised
        ([bytes(encode_frame(FrameType.GOAWAY, b"\x04\x00"))], H3ErrorCode.H3_FRAME_ERROR),
        ([bytes(encode_frame(FrameType.GOAWAY, b"\x40"))], H3ErrorCode.H3_FRAME_ERROR),
        ([bytes(encode_frame(FrameType.GOAWAY, b"\x00" * 9))], H3ErrorCode.H3_FRAME_ERROR),
    ],
    ids=["odd", "unidirectional", "raised", "trailing-bytes", "cut-integer", "too-long"],
)
def test_a_goaway_that_breaks_the_rules_closes_the_connection(
    frames: list[bytes], code: int
) -> None:
    clock = Clock()
    client, server = _raw_h3_server(clock)
    for frame in frames:
        _send_control(server, frame)
    settle(client, server, clock)
    closed = server.quic._close_event  # the client's CONNECTION_CLOSE, received
    assert closed is not None and closed.error_code == code, closed


_OTHER_FRAMES = st.tuples(
    st.sampled_from([FrameType.SETTINGS, FrameType.MAX_PUSH_ID, 0x21, 0x1F * 7 + 0x21, 0x3FFF]),
    st.binary(max_size=40),
).map(lambda f: bytes(encode_frame(f[0], f[1])))


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(st.one_of(_OTHER_FRAMES, st.integers(0, 2**62 - 1)), max_size=12),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_the_goaway_reader_finds_every_goaway_however_the_stream_is_cut(
    frames: list[bytes | int], cuts: list[int]
) -> None:
    wire = b"".join(f if isinstance(f, bytes) else _goaway(f) for f in frames)
    expected = [f for f in frames if isinstance(f, int)]
    reader = _GoawayReader()
    found: list[int] = []
    start = 0
    for cut in [*sorted(c for c in cuts if c <= len(wire)), len(wire)]:
        found += reader.feed(wire[start:cut])
        start = cut
        assert len(reader._held) <= 24  # a frame header and a GOAWAY's integer at most
    assert found == expected


@pytest.mark.parametrize("engine", ENGINES)
def test_a_server_that_goes_away_takes_no_new_flow_and_finishes_the_open_ones(
    engine: str,
) -> None:
    async def main() -> None:
        listener = await server_transport(engine=engine).listen(("127.0.0.1", 0), Recorder())
        conn = await client_transport(engine=engine).connect(listener.address)
        held = await conn.open_stream(TARGET)
        held.write(b"before")
        assert await held.readexactly(6) == b"before"
        (accepted,) = listener.connections
        accepted.go_away()
        accepted.go_away()  # once only
        await until(lambda: conn.going_away)
        assert not conn.can_open_stream
        with pytest.raises(ConnectionLost, match="going away"):
            await conn.open_stream(TARGET)
        # The flow opened before carries on to its end, both ways.
        held.write(b"after")
        held.write_eof()
        assert await asyncio.wait_for(held.read(), 10) == b"after"
        assert not conn.is_closed
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_a_request_past_the_goaway_is_refused_unprocessed(engine: str) -> None:
    """A client that opens a stream past our GOAWAY's ID (it sent the request before the
    GOAWAY reached it) has it refused with H3_REQUEST_REJECTED, the handler never
    called: the pool opens it again elsewhere."""

    async def main() -> None:
        recorder = Recorder()
        listener = await server_transport(engine=engine).listen(("127.0.0.1", 0), recorder)
        conn = await client_transport(engine=engine).connect(listener.address)
        first = await conn.open_stream(TARGET, headers={"x-request-id": "first"})
        (accepted,) = listener.connections
        resets = _resets_seen(conn)
        accepted.go_away()
        # Past the client's check, as if the request crossed the GOAWAY on the wire.
        late_id = conn.session.open_stream(parse_target(TARGET), {"x-request-id": "late"})
        conn._transmit()
        await until(lambda: conn.going_away and late_id in resets)
        assert resets[late_id] == H3ErrorCode.H3_REQUEST_REJECTED
        first.write_eof()
        assert await asyncio.wait_for(first.read(), 10) == b""
        assert "late" not in recorder.received and "first" in recorder.received
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


def _resets_seen(conn: object) -> dict[int, int]:
    """The error code of each stream reset the connection hears of from now on."""
    seen: dict[int, int] = {}
    original = conn.handle_events  # type: ignore[attr-defined]

    def spy(tunnel_events: list[events.TunnelEvent]) -> None:
        seen.update(
            (e.stream_id, e.error_code) for e in tunnel_events if isinstance(e, events.StreamReset)
        )
        original(tunnel_events)

    conn.handle_events = spy  # type: ignore[attr-defined]
    return seen


@pytest.mark.parametrize("engine", ENGINES)
def test_the_pool_moves_new_flows_off_a_connection_going_away(engine: str) -> None:
    async def main() -> None:
        listener = await server_transport(engine=engine).listen(("127.0.0.1", 0), Recorder())
        breaker = CircuitBreaker(CircuitBreakerConfig())
        pool = EndpointPool(
            listener.address, client_transport(engine=engine), breaker, connect_timeout=5
        )
        busy, first, _ = await pool.open_stream(TARGET, {})
        (accepted,) = listener.connections
        accepted.go_away()
        await until(lambda: first.going_away)
        other, second, _ = await pool.open_stream(TARGET, {})
        assert second is not first and pool.connections_opened == 2
        (retired,) = [p for p in pool.connections if p.connection is first]
        assert retired.retired == GOING_AWAY
        # The old connection closes once its last flow has ended.
        busy.write(b"bye")
        busy.write_eof()
        assert await busy.read() == b"bye"
        await until(lambda: first.active_streams == 0)
        pool.close_idle(0.0, 60.0)
        await until(lambda: first.is_closed, timeout=10)
        assert [p.connection for p in pool.connections] == [second]
        other.write_eof()
        await other.read()
        await pool.close()
        listener.close()
        await listener.wait_closed()

    run(main())


def _pool_to(listener: object, engine: str) -> EndpointPool:
    breaker = CircuitBreaker(CircuitBreakerConfig())
    return EndpointPool(
        listener.address,  # type: ignore[attr-defined]
        client_transport(engine=engine),
        breaker,
        connect_timeout=5,
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_a_flow_refused_unprocessed_before_the_goaway_came_is_opened_on_a_new_connection(
    engine: str,
) -> None:
    """The server's H3_REQUEST_REJECTED can reach the client before its GOAWAY (here the
    GOAWAY is never sent): the pool opens the flow again, on a new connection, and the
    refusing one takes no new flow."""

    async def main() -> None:
        recorder = Recorder()
        listener = await server_transport(engine=engine).listen(("127.0.0.1", 0), recorder)
        pool = _pool_to(listener, engine)
        busy, first, _ = await pool.open_stream(TARGET, {"x-request-id": "first"})
        (accepted,) = listener.connections
        # Requests from the next stream on are refused as after a GOAWAY, whose frame
        # has not reached the client.
        accepted._goaway_sent = accepted._next_request_stream
        again, second, _ = await pool.open_stream(TARGET, {"x-request-id": "again"})
        assert second is not first and pool.connections_opened == 2
        assert not first.going_away
        (retired,) = [p for p in pool.connections if p.connection is first]
        assert retired.retired == "the peer refused a request unprocessed"
        again.write(b"hi")
        again.write_eof()
        assert await asyncio.wait_for(again.read(), 10) == b"hi"
        busy.write_eof()
        assert await asyncio.wait_for(busy.read(), 10) == b""
        assert len(recorder.received["again"]) == 1
        # Its GOAWAY, arriving after the refusal, still counts for the endpoint.
        accepted._goaway_sent = None  # (the frame itself was never sent)
        assert accepted.go_away()
        await until(lambda: first.going_away)
        pool.sweep_closed()
        assert retired.retired == GOING_AWAY
        assert pool.going_away(asyncio.get_running_loop().time())
        await pool.close()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("engine", ENGINES)
def test_a_flow_turned_away_twice_by_goaway_is_a_refusal_not_a_connection_failure(
    engine: str,
) -> None:
    """Opened again once after a GOAWAY, and turned away again (the new connection's
    peer is going away too): the flow is refused as a draining peer's 503 is, which a
    cluster does not count against the endpoint, not lost with its connection."""

    async def main() -> None:
        listener = await server_transport(engine=engine).listen(("127.0.0.1", 0), Recorder())
        pool = _pool_to(listener, engine)
        busy, first, _ = await pool.open_stream(TARGET, {})
        (accepted,) = listener.connections
        accepted.go_away()
        await until(lambda: first.going_away)
        # Every connection the pool has or dials says it is going away at once.
        transport = pool.transport
        original = transport.connect

        async def connect_going_away(*args: object, **kwargs: object) -> object:
            connection = await original(*args, **kwargs)
            await until(lambda: any(c.go_away() for c in listener.connections))
            await until(lambda: connection.going_away)
            return connection

        transport.connect = connect_going_away
        with pytest.raises(StreamRefused) as refused:
            await pool.open_stream(TARGET, {})
        assert refused.value.status == 503 and "going away" in str(refused.value)
        assert not is_connection_failure(refused.value)
        # Not a dial for each slot of the circuit breaker (64): at most two for the flow.
        assert pool.connections_opened <= 1 + MAX_DIALS_PER_FLOW
        busy.write_eof()
        await asyncio.wait_for(busy.read(), 10)
        await pool.close()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_an_h2_server_going_away_lets_open_streams_finish_and_the_pool_moves() -> None:
    """HTTP/2 (the fallback when UDP is blocked): ``go_away()`` sends a GOAWAY with
    NO_ERROR naming the last stream seen; the client's open stream finishes, the
    connection takes no new one, and the pool dials a new connection for the next flow."""

    async def main() -> None:
        recorder = Recorder()
        server = H2Transport(identity=SERVER, trust=CA.trust_bundle)
        listener = await server.listen(("127.0.0.1", 0), recorder)
        breaker = CircuitBreaker(CircuitBreakerConfig())
        pool = EndpointPool(
            listener.address,
            H2Transport(identity=CLIENT, trust=CA.trust_bundle),
            breaker,
            connect_timeout=5,
        )
        busy, first, _ = await pool.open_stream(TARGET, {"x-request-id": "busy"})
        (accepted,) = listener.connections
        assert accepted.go_away() and not accepted.go_away()  # once
        await until(lambda: first.going_away)
        with pytest.raises(ConnectionLost, match="going away"):
            await first.open_stream(TARGET)
        other, second, _ = await pool.open_stream(TARGET, {"x-request-id": "other"})
        assert second is not first and pool.connections_opened == 2
        for stream, data in ((busy, b"still here"), (other, b"elsewhere")):
            stream.write(data)
            stream.write_eof()
            assert await asyncio.wait_for(stream.read(), 10) == data
        await pool.close()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_an_h2_request_that_crossed_the_goaway_is_refused_unprocessed() -> None:
    """A stream the client opened before our GOAWAY reached it is refused with
    REFUSED_STREAM, its handler never called."""
    from quicmesh.tunnel.h2 import H2TunnelSession

    client, server = H2TunnelSession(is_client=True), H2TunnelSession(is_client=False)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    kept = client.open_stream(parse_target(TARGET), {})
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [events.StreamRequested]
    assert server.go_away()
    crossed = client.open_stream(parse_target(TARGET), {})
    assert server.receive_data(client.data_to_send()) == []  # no StreamRequested
    got = client.receive_data(server.data_to_send())
    assert events.PeerGoingAway(kept + 1) in got
    assert any(isinstance(e, events.StreamReset) and e.stream_id == crossed for e in got)
    assert kept in server._streams and crossed not in server._streams
