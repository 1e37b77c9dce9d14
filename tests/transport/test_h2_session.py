"""Sans-IO tests of H2TunnelSession: two sessions (or a raw h2 peer) wired back to back."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.tunnel import events
from quicmesh.tunnel.connect import Target, parse_target
from quicmesh.tunnel.h2 import (
    CLOSED_STREAMS_KEPT,
    DEFAULT_STREAM_WINDOW,
    IDLE_FRAME_BURST,
    IDLE_FRAME_RATE,
    SEND_QUANTUM,
    H2TunnelSession,
    _FrameHeaders,
    _H2Connection,
)
from quicmesh.tunnel.session import ResetReason

TARGET = Target("reviews.default.svc", 9080)


def exchange(
    client: H2TunnelSession, server: H2TunnelSession
) -> tuple[list[events.TunnelEvent], list[events.TunnelEvent]]:
    """Move bytes both ways until both sides are quiet; return (client, server) events."""
    client_events: list[events.TunnelEvent] = []
    server_events: list[events.TunnelEvent] = []
    while True:
        to_server = client.data_to_send()
        to_client = server.data_to_send()
        if not to_server and not to_client:
            return client_events, server_events
        if to_server:
            server_events += server.receive_data(to_server)
        if to_client:
            client_events += client.receive_data(to_client)


def connected_pair() -> tuple[H2TunnelSession, H2TunnelSession]:
    client = H2TunnelSession(is_client=True)
    server = H2TunnelSession(is_client=False)
    exchange(client, server)
    assert client.ready and server.ready
    return client, server


def open_tunnel(
    client: H2TunnelSession, server: H2TunnelSession, headers: dict[str, str] | None = None
) -> int:
    stream_id = client.open_stream(TARGET, headers or {})
    _, server_events = exchange(client, server)
    assert server_events == [events.StreamRequested(stream_id, TARGET.authority, headers or {})]
    server.respond(stream_id, 200)
    client_events, _ = exchange(client, server)
    assert client_events == [events.ResponseReceived(stream_id, 200, "")]
    return stream_id


def payload_of(evs: list[events.TunnelEvent], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in evs if isinstance(e, events.DataReceived) and e.stream_id == stream_id
    )


def ended(evs: list[events.TunnelEvent], stream_id: int) -> bool:
    return any(
        isinstance(e, events.DataReceived) and e.stream_id == stream_id and e.stream_ended
        for e in evs
    )


def test_connect_exchange_carries_target_headers_and_data_both_ways() -> None:
    client, server = connected_pair()
    stream_id = open_tunnel(client, server, {"x-request-id": "7"})
    client.send_data(stream_id, b"ping")
    server.send_data(stream_id, b"pong", end_stream=True)
    client_events, server_events = exchange(client, server)
    assert payload_of(server_events, stream_id) == b"ping"
    assert not ended(server_events, stream_id)
    assert payload_of(client_events, stream_id) == b"pong"
    assert ended(client_events, stream_id)
    # Half-closed one way, the other direction still flows.
    client.send_data(stream_id, b"more", end_stream=True)
    _, server_events = exchange(client, server)
    assert payload_of(server_events, stream_id) == b"more"
    assert ended(server_events, stream_id)
    assert client.h2.open_outbound_streams == 0


def test_refusal_carries_status_and_reason_and_releases_the_stream() -> None:
    client, server = connected_pair()
    stream_id = client.open_stream(TARGET, {})
    exchange(client, server)
    server.respond(stream_id, 403, 'spiffe://x may not reach "y"')
    client_events, _ = exchange(client, server)
    assert client_events[0] == events.ResponseReceived(
        stream_id, 403, 'spiffe://x may not reach "y"'
    )
    assert client.h2.open_outbound_streams == 0
    assert server.h2.open_inbound_streams == 0


@pytest.mark.parametrize(
    ("reason", "code", "connect_error"),
    [
        (ResetReason.CANCELLED, ErrorCodes.CANCEL, False),
        (ResetReason.CONNECT_ERROR, ErrorCodes.CONNECT_ERROR, True),
    ],
)
def test_reset_reaches_the_peer_with_its_code(
    reason: ResetReason, code: int, connect_error: bool
) -> None:
    client, server = connected_pair()
    stream_id = open_tunnel(client, server)
    server.reset_stream(stream_id, reason)
    client_events, _ = exchange(client, server)
    assert client_events == [events.StreamReset(stream_id, code, connect_error=connect_error)]


def test_receive_window_opens_only_as_the_application_reads() -> None:
    client, server = connected_pair()
    stream_id = open_tunnel(client, server)
    total = 3 * DEFAULT_STREAM_WINDOW
    server.send_data(stream_id, b"x" * total, end_stream=True)
    client_events, _ = exchange(client, server)
    received = len(payload_of(client_events, stream_id))
    assert received == DEFAULT_STREAM_WINDOW
    assert server.unsent_bytes(stream_id) == total - received
    while received < total:
        client.data_consumed(stream_id, received)
        client_events, _ = exchange(client, server)
        chunk = len(payload_of(client_events, stream_id))
        assert 0 < chunk <= DEFAULT_STREAM_WINDOW
        received += chunk
    assert ended(client_events, stream_id)


def test_stalled_stream_holds_back_only_itself() -> None:
    client, server = connected_pair()
    stalled = open_tunnel(client, server)
    other = open_tunnel(client, server)
    server.send_data(stalled, b"s" * (2 * DEFAULT_STREAM_WINDOW))
    exchange(client, server)
    server.send_data(other, b"o" * 100_000, end_stream=True)
    client_events, _ = exchange(client, server)
    assert payload_of(client_events, other) == b"o" * 100_000


def test_small_stream_is_not_queued_behind_a_bulk_stream() -> None:
    client, server = connected_pair()
    bulk = open_tunnel(client, server)
    small = open_tunnel(client, server)
    client.send_data(bulk, b"b" * (4 * 1024 * 1024))
    client.send_data(small, b"hello", end_stream=True)
    first_batch = client.data_to_send(64 * 1024)
    server_events = server.receive_data(first_batch)
    assert payload_of(server_events, small) == b"hello"
    assert len(payload_of(server_events, bulk)) <= 64 * 1024 + SEND_QUANTUM


def test_unsent_bytes_counts_the_sessions_buffer() -> None:
    client, server = connected_pair()
    stream_id = open_tunnel(client, server)
    client.send_data(stream_id, b"x" * 100_000)
    assert client.unsent_bytes(stream_id) == 100_000
    client.data_to_send(SEND_QUANTUM)
    assert client.unsent_bytes(stream_id) == 100_000 - SEND_QUANTUM


def test_stop_reading_discards_input_and_releases_the_stream() -> None:
    client, server = connected_pair()
    stream_id = open_tunnel(client, server)
    server.send_data(stream_id, b"bye", end_stream=True)
    exchange(client, server)
    client.send_data(stream_id, b"ignored" * 10_000)
    server.stop_reading(stream_id)
    client_events, server_events = exchange(client, server)
    assert payload_of(server_events, stream_id) == b""
    assert server.h2.open_inbound_streams == 0
    # RST_STREAM NO_ERROR after the server's END_STREAM: not an abort, a "stop sending".
    assert client_events == [events.PeerStoppedReading(stream_id)]
    assert client.unsent_bytes(stream_id) == 0


@pytest.mark.parametrize("how", ["both-ends", "reset", "refused", "peer-stopped-reading"])
def test_finished_streams_leave_no_session_state(how: str) -> None:
    # One record per stream, dropped in one place: nothing is left once streams end.
    client, server = connected_pair()
    for _ in range(20):
        if how == "refused":
            stream_id = client.open_stream(TARGET, {})
            exchange(client, server)
            server.respond(stream_id, 403, "no")
            exchange(client, server)
            continue
        stream_id = open_tunnel(client, server)
        client.send_data(stream_id, b"ping" * 1000, end_stream=how == "both-ends")
        server.send_data(stream_id, b"pong" * 1000, end_stream=how != "reset")
        client_events, server_events = exchange(client, server)
        if how == "reset":
            client.reset_stream(stream_id, ResetReason.CANCELLED)
        elif how == "peer-stopped-reading":
            server.stop_reading(stream_id)  # its side ended: RST_STREAM NO_ERROR
        for session, evs in ((client, client_events), (server, server_events)):
            session.data_consumed(stream_id, len(payload_of(evs, stream_id)))
        exchange(client, server)
    assert not client._streams and not server._streams
    assert client.is_idle() and server.is_idle()


def test_stream_limit_is_respected() -> None:
    client = H2TunnelSession(is_client=True)
    server = H2TunnelSession(is_client=False, max_streams=2)
    exchange(client, server)
    client.open_stream(TARGET, {})
    client.open_stream(TARGET, {})
    assert not client.can_open_stream()


def test_close_sends_goaway() -> None:
    client, server = connected_pair()
    client.close("bye")
    _, server_events = exchange(client, server)
    # With no stream under way the server closes its side at once (with streams, they
    # finish first: test_a_clients_graceful_goaway_lets_its_streams_carry_on).
    assert server_events == [events.ConnectionTerminated(0, "bye")]
    assert client.finished and server.finished


# -- malformed input from a raw h2 peer ---------------------------------------------


def raw_client() -> tuple[h2.connection.H2Connection, H2TunnelSession]:
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False
        )
    )
    raw.initiate_connection()
    server = H2TunnelSession(is_client=False)
    server.receive_data(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    server.receive_data(raw.data_to_send())
    return raw, server


def send_raw_request(
    headers: list[tuple[bytes, bytes]], end_stream: bool = False
) -> tuple[list[events.TunnelEvent], list[h2.events.Event]]:
    raw, server = raw_client()
    raw.send_headers(1, headers, end_stream=end_stream)
    server_events = server.receive_data(raw.data_to_send())
    raw_events = raw.receive_data(server.data_to_send())
    return server_events, raw_events


def response_status(raw_events: list[h2.events.Event]) -> int | None:
    for event in raw_events:
        if isinstance(event, h2.events.ResponseReceived):
            return int(dict(event.headers or [])[b":status"])
    return None


@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a:1")],
        [(b":method", b"CONNECT"), (b":authority", b"no-port")],
        [(b":method", b"CONNECT"), (b":authority", b"a:99999")],
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"proxy-status", b"x")],
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"x-a", b"1"), (b"x-a", b"2")],
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"x-a", b"caf\xc3\xa9")],
    ],
)
def test_malformed_connect_gets_400(headers: list[tuple[bytes, bytes]]) -> None:
    server_events, raw_events = send_raw_request(headers)
    assert len(server_events) == 1
    rejected = server_events[0]
    assert isinstance(rejected, events.RequestRejected)
    assert rejected.status == 400
    assert response_status(raw_events) == 400


@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")],
        [(b":method", b"CONNECT")],
    ],
)
def test_a_malformed_request_resets_its_stream(headers: list[tuple[bytes, bytes]]) -> None:
    """A field section HTTP/2 calls malformed (RFC 9113 8.1.1) is a stream error: reset
    with PROTOCOL_ERROR, the connection kept (h2 closed it until 2026-12-06)."""
    server_events, raw_events = send_raw_request(headers)
    assert not any(isinstance(e, events.ConnectionTerminated) for e in server_events)
    resets = [e for e in raw_events if isinstance(e, h2.events.StreamReset)]
    assert [r.error_code for r in resets] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in raw_events)


def test_a_block_that_does_not_decode_on_an_open_stream_closes_the_connection() -> None:
    """Trailers whose HPACK block does not decode: the connection's decoder state is
    lost, so it is a connection error (not the malformed request's stream reset)."""
    server = _H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"a:1")])
    server.receive_data(client.data_to_send())
    garbage = HeadersFrame(1)
    garbage.data = b"\xff" * 5
    garbage.flags.add("END_HEADERS")
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(garbage.serialize())
    assert server.state_machine.state is h2.connection.ConnectionState.CLOSED


def test_a_header_list_over_the_limit_closes_the_connection() -> None:
    """One the decoder cannot take (over SETTINGS_MAX_HEADER_LIST_SIZE) is a connection
    error: HPACK state is the connection's."""
    headers = [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"x", b"y" * 70_000)]
    server_events, raw_events = send_raw_request(headers)
    assert len(server_events) == 1
    assert isinstance(server_events[0], events.ConnectionTerminated)
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in raw_events)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.booleans())
def test_garbage_never_raises(garbage: bytes, after_preface: bool) -> None:
    if after_preface:
        _, server = raw_client()
    else:
        server = H2TunnelSession(is_client=False)
    result = server.receive_data(garbage)
    assert all(isinstance(e, events.TunnelEvent) for e in result)
    server.data_to_send()
    if any(isinstance(e, events.ConnectionTerminated) for e in result):
        assert server.finished
        assert server.receive_data(b"more") == []


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_HOSTS = (
    st.lists(_LABEL, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda h: not h.rsplit(".", 1)[-1].isdigit())
)
_HEADER_NAMES = st.from_regex(r"x-[a-z0-9-]{1,20}", fullmatch=True)
_HEADER_VALUES = st.from_regex(r"[!-~]([ !-~]{0,30}[!-~])?", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(
    _HOSTS,
    st.integers(1, 65535),
    st.dictionaries(_HEADER_NAMES, _HEADER_VALUES, max_size=8),
)
def test_well_formed_connects_are_parsed(host: str, port: int, headers: dict[str, str]) -> None:
    client, server = connected_pair()
    stream_id = client.open_stream(Target(host, port), headers)
    _, server_events = exchange(client, server)
    assert server_events == [events.StreamRequested(stream_id, f"{host}:{port}", headers)]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40))
def test_any_authority_is_parsed_or_rejected_with_400(authority: str) -> None:
    server_events, raw_events = send_raw_request(
        [(b":method", b"CONNECT"), (b":authority", authority.encode())]
    )
    [event] = server_events
    try:
        expected = parse_target(authority)
    except ValueError:
        assert isinstance(event, events.RequestRejected) and event.status == 400
        assert response_status(raw_events) == 400
    else:
        assert event == events.StreamRequested(1, expected.authority, {})


def test_the_decoder_holds_the_header_list_size_it_announces() -> None:
    """A header list between the 60 KiB we announce and h2's default 64 KiB is refused
    (h2 applies the setting to its decoder only when a change is acknowledged)."""
    from quicmesh.tunnel.h2 import MAX_HEADER_LIST_SIZE

    value = b"v" * 2000
    headers = [(b":method", b"CONNECT"), (b":authority", b"a:1")]
    headers += [(b"x-%d" % n, value) for n in range(31)]  # about 63 KB decoded
    assert MAX_HEADER_LIST_SIZE < sum(len(n) + len(v) + 32 for n, v in headers) < 65536
    server_events, _ = send_raw_request(headers)
    assert [type(e) for e in server_events] == [events.ConnectionTerminated]


def test_a_peer_flooding_pings_without_reading_is_not_read() -> None:
    """PING acknowledgments queued for a peer that does not read: above
    ``max_pending_output`` the session asks for its input to pause, until they are sent."""
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    server = H2TunnelSession(is_client=False, max_pending_output=1000)
    server.receive_data(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    assert not server.input_paused
    for n in range(100):  # 100 acknowledgments of 17 bytes
        raw.ping(n.to_bytes(8, "big"))
    server.receive_data(raw.data_to_send())
    assert server.input_paused
    assert len(server.data_to_send()) >= 1700
    assert not server.input_paused


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _rate_limited_pair(clock: _Clock) -> tuple[h2.connection.H2Connection, H2TunnelSession]:
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    raw.initiate_connection()
    server = H2TunnelSession(is_client=False, max_streams=4, max_stream_rate=10.0, clock=clock)
    server.receive_data(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    server.receive_data(raw.data_to_send())
    return raw, server


def _open_and_reset(raw: h2.connection.H2Connection, count: int, reset: bool = True) -> None:
    for _ in range(count):
        stream_id = raw.get_next_available_stream_id()
        raw.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", b"a:1")])
        if reset:
            raw.reset_stream(stream_id, ErrorCodes.CANCEL)


def test_new_streams_above_the_rate_are_refused_unprocessed() -> None:
    """Rapid reset (a stream opened and reset at once, over and over) frees h2's
    concurrency limit at once: the rate bounds the handlers. The first ``max_streams``
    (4) and then 10 a second are taken; the others are refused with REFUSED_STREAM
    and never reach the application."""
    clock = _Clock()
    raw, server = _rate_limited_pair(clock)
    _open_and_reset(raw, 4)
    _open_and_reset(raw, 2, reset=False)
    requested = [
        e for e in server.receive_data(raw.data_to_send()) if isinstance(e, events.StreamRequested)
    ]
    assert len(requested) == 4
    assert server.streams_refused_for_rate == 2
    refused = [
        e for e in raw.receive_data(server.data_to_send()) if isinstance(e, h2.events.StreamReset)
    ]
    assert {e.error_code for e in refused} >= {ErrorCodes.REFUSED_STREAM}
    clock.now += 0.1  # one more token
    _open_and_reset(raw, 1)
    requested = [
        e for e in server.receive_data(raw.data_to_send()) if isinstance(e, events.StreamRequested)
    ]
    assert len(requested) == 1
    assert not server.closed


def test_a_peer_that_keeps_on_above_the_rate_loses_its_connection() -> None:
    clock = _Clock()
    raw, server = _rate_limited_pair(clock)
    _open_and_reset(raw, 4 + 16)  # the burst, then the refusal budget (4 x max_streams)
    server.receive_data(raw.data_to_send())
    assert not server.closed
    _open_and_reset(raw, 1)
    result = server.receive_data(raw.data_to_send())
    assert server.closed
    terminated = [e for e in result if isinstance(e, events.ConnectionTerminated)]
    assert terminated and terminated[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    goaway = [
        e
        for e in raw.receive_data(server.data_to_send())
        if isinstance(e, h2.events.ConnectionTerminated)
    ]
    assert goaway and goaway[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_client_session_has_no_stream_rate() -> None:
    assert H2TunnelSession(is_client=True, max_stream_rate=1.0)._stream_rate is None


def test_a_stream_past_the_concurrency_limit_is_refused_and_the_others_carry_on() -> None:
    """RFC 9113 5.1.2: a stream past our SETTINGS_MAX_CONCURRENT_STREAMS is a stream
    error (REFUSED_STREAM); h2 made it a connection error and closed every flow. Here
    the client opens three streams before it has seen the server's limit of 2 (as a
    client does after a limit is lowered), the header blocks sharing HPACK's dynamic
    table: the third is refused unprocessed, and the connection, the first two
    streams and the table (a later stream's headers read back intact) carry on."""
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    raw.initiate_connection()
    server = H2TunnelSession(is_client=False, max_streams=2)
    server.receive_data(raw.data_to_send())
    fields = [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"x-flow", b"mesh-flow")]
    for stream_id in (1, 3, 5):
        raw.send_headers(stream_id, fields)
    server_events = server.receive_data(raw.data_to_send())
    assert [e.stream_id for e in server_events if isinstance(e, events.StreamRequested)] == [1, 3]
    assert not any(isinstance(e, events.ConnectionTerminated) for e in server_events)
    assert server.streams_refused_over_limit == 1
    raw_events = raw.receive_data(server.data_to_send())
    refused = [e for e in raw_events if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in refused] == [(5, ErrorCodes.REFUSED_STREAM)]
    server.respond(1, 200)
    raw.receive_data(server.data_to_send())
    raw.send_data(1, b"still here")
    raw.reset_stream(3, ErrorCodes.CANCEL)  # frees a slot
    raw.send_headers(7, fields)
    server_events = server.receive_data(raw.data_to_send())
    assert payload_of(server_events, 1) == b"still here"
    assert events.StreamRequested(7, "a:1", {"x-flow": "mesh-flow"}) in server_events
    assert not server.closed


def test_a_peer_that_keeps_opening_past_the_limit_loses_its_connection() -> None:
    """Refusals past the limit draw on the same budget as those above the rate: one
    stream open (the limit), then four refused (the budget at 10/s: 4 bursts of 1),
    then GOAWAY ENHANCE_YOUR_CALM."""
    clock = _Clock()
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    raw.initiate_connection()
    server = H2TunnelSession(is_client=False, max_streams=1, max_stream_rate=10.0, clock=clock)
    server.receive_data(raw.data_to_send())
    fields = [(b":method", b"CONNECT"), (b":authority", b"a:1")]
    for stream_id in range(1, 12, 2):
        raw.send_headers(stream_id, fields)
    server_events = server.receive_data(raw.data_to_send())
    assert [e.stream_id for e in server_events if isinstance(e, events.StreamRequested)] == [1]
    assert server.streams_refused_over_limit == 5
    terminated = [e for e in server_events if isinstance(e, events.ConnectionTerminated)]
    assert [e.error_code for e in terminated] == [ErrorCodes.ENHANCE_YOUR_CALM]
    assert server.closed


# -- a server's graceful GOAWAY (RFC 9113 6.8) ------------------------------------------


def _goaway(last_stream_id: int, code: int = 0, debug: bytes = b"") -> bytes:
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = code
    frame.additional_data = debug
    return bytes(frame.serialize())


def test_a_graceful_goaway_lets_the_streams_it_covers_finish_and_refuses_the_others() -> None:
    client, server = connected_pair()
    kept = open_tunnel(client, server)
    late = open_tunnel(client, server)
    got = client.receive_data(_goaway(kept, debug=b"draining"))
    assert got == [
        events.PeerGoingAway(kept + 1),
        events.StreamReset(
            late,
            int(ErrorCodes.REFUSED_STREAM),
            reason=f"not processed: the peer is going away (GOAWAY, last stream {kept}: draining)",
            not_processed=True,
        ),
    ]
    assert not client.can_open_stream() and not client.closed
    # h2 itself never saw the GOAWAY: the covered stream still carries bytes both ways.
    _ping_pong(client, server, kept)
    # The peer's final GOAWAY may lower the ID; then it closes.
    assert client.receive_data(_goaway(kept)) == [events.PeerGoingAway(kept + 1)]
    assert client.receive_eof() == [events.ConnectionTerminated(0, "draining")]


def _ping_pong(client: H2TunnelSession, server: H2TunnelSession, stream_id: int) -> None:
    """The stream carries bytes, and its end, both ways."""
    client.send_data(stream_id, b"ping", end_stream=True)
    _, server_events = exchange(client, server)
    assert payload_of(server_events, stream_id) == b"ping" and ended(server_events, stream_id)
    server.send_data(stream_id, b"pong", end_stream=True)
    client_events, _ = exchange(client, server)
    assert payload_of(client_events, stream_id) == b"pong" and ended(client_events, stream_id)


def test_a_malformed_answer_ends_its_stream_with_the_reason() -> None:
    """A response field section that breaks RFC 9113 8.3 (``:status`` twice) resets its
    stream (PROTOCOL_ERROR) and tells its opener why; h2 alone dropped it silently, and
    the opener waited for an answer that could not come."""
    client, server = connected_pair()
    stream_id = client.open_stream(TARGET, {})
    exchange(client, server)
    server.h2.config.validate_outbound_headers = False
    server.h2.send_headers(stream_id, [(b":status", b"200"), (b":status", b"200")])
    client_events, _ = exchange(client, server)
    ((reset),) = client_events
    assert isinstance(reset, events.StreamReset) and reset.stream_id == stream_id
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
    assert "the peer's answer is malformed" in reset.reason and ":status" in reset.reason
    # Another stream of the connection is unaffected.
    open_tunnel(client, server)


def test_a_goaway_naming_the_largest_stream_id_is_a_notice_that_refuses_nothing() -> None:
    """A server's first GOAWAY of two (RFC 9113 6.8: the largest stream ID) stops new
    streams and refuses none (the connection then logs "a GOAWAY notice")."""
    client, server = connected_pair()
    kept = open_tunnel(client, server)
    got = client.receive_data(_goaway(2**31 - 1))
    assert got == [events.PeerGoingAway(2**31, notice=True)]
    assert client.receive_data(_goaway(kept)) == [events.PeerGoingAway(kept + 1)]


def test_malformed_trailers_end_the_flow_they_belong_to() -> None:
    """Trailers that break RFC 9113 8.1 (a pseudo-header) on a flow under way reset it,
    and its handler hears why; it is no refused request (a 400 was logged for a flow
    that had been accepted, and the handler waited for bytes that could not come)."""
    raw, server = raw_client()
    raw.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"x.svc:80")])
    raw.send_data(1, b"hi")
    got = server.receive_data(raw.data_to_send())
    assert isinstance(got[0], events.StreamRequested) and payload_of(got, 1) == b"hi"
    server.respond(1, 200)
    raw.receive_data(server.data_to_send())
    raw.send_headers(1, [(b":authority", b"y")], end_stream=True)
    (reset,) = server.receive_data(raw.data_to_send())
    assert isinstance(reset, events.StreamReset) and reset.stream_id == 1
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
    assert reset.reason.startswith("the peer's trailers are malformed: "), reset.reason
    assert not server._streams


def test_a_malformed_answer_to_a_half_closed_stream_still_ends_it() -> None:
    """A stream we half-closed before its answer had its record dropped: a malformed
    answer then produced no event, and its opener waited for ever."""
    client, server = connected_pair()
    stream_id = client.open_stream(TARGET, {})
    client.send_data(stream_id, b"hello", end_stream=True)
    exchange(client, server)
    server.h2.config.validate_outbound_headers = False
    server.h2.send_headers(stream_id, [(b":status", b"200"), (b":status", b"200")])
    client_events, _ = exchange(client, server)
    assert [(type(e), e.stream_id) for e in client_events] == [(events.StreamReset, stream_id)]


def test_malformed_requests_spend_the_refusal_budget() -> None:
    """Malformed requests were refused (400) without limit, where refused well-formed
    ones past the stream rate end the connection (ENHANCE_YOUR_CALM)."""
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False
        )
    )
    raw.initiate_connection()
    server = H2TunnelSession(is_client=False, max_stream_rate=10, clock=lambda: 0.0)
    server.receive_data(raw.data_to_send())
    got: list[events.TunnelEvent] = []
    malformed = [(b":method", b"CONNECT"), (b":method", b"CONNECT"), (b":authority", b"x:1")]
    for stream_id in range(1, 2001, 2):
        raw.send_headers(stream_id, malformed, end_stream=True)
        got += server.receive_data(raw.data_to_send())
        if server.closed:
            break
    assert server.closed, len(got)
    assert got[-1] == events.ConnectionTerminated(
        ErrorCodes.ENHANCE_YOUR_CALM, "too many malformed requests", by_peer=False
    ), got[-1]
    assert 0 < sum(isinstance(e, events.RequestRejected) for e in got) < 1000


def test_a_clients_graceful_goaway_lets_its_streams_carry_on() -> None:
    """A client's GOAWAY names the last stream the server may open (pushes, which we
    never open): its own streams carry on (RFC 9113 6.8). h2 took it for the end of
    the connection and the server's streams died with it."""
    client, server = connected_pair()
    kept = open_tunnel(client, server)
    assert server.receive_data(_goaway(0)) == []
    assert not server.closed
    _ping_pong(client, server, kept)
    # An error GOAWAY still ends the connection, as before.
    (terminated,) = server.receive_data(_goaway(0, code=ErrorCodes.INTERNAL_ERROR))
    assert isinstance(terminated, events.ConnectionTerminated) and server.closed


def test_a_goaway_that_raises_its_last_stream_id_closes_the_connection() -> None:
    client, server = connected_pair()
    open_tunnel(client, server)
    client.receive_data(_goaway(1))
    (terminated,) = client.receive_data(_goaway(3))
    assert isinstance(terminated, events.ConnectionTerminated)
    assert terminated.error_code == ErrorCodes.PROTOCOL_ERROR
    assert "raised its last stream ID from 1 to 3" in terminated.reason
    assert client.closed


def test_a_goaway_with_an_error_ends_the_connection_at_once() -> None:
    client, server = connected_pair()
    open_tunnel(client, server)
    got = client.receive_data(_goaway(1, int(ErrorCodes.ENHANCE_YOUR_CALM), b"calm down"))
    assert got == [events.ConnectionTerminated(int(ErrorCodes.ENHANCE_YOUR_CALM), "calm down")]
    assert client.closed


_FRAMES = st.one_of(
    st.tuples(
        st.sampled_from([0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9, 0x5, 0xEE]),
        st.integers(0, 0xFF),
        st.integers(0, 9),
        st.binary(max_size=40),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(_FRAMES, max_size=12),
    cuts=st.lists(st.integers(1, 60), max_size=20),
)
def test_the_goaway_filter_takes_out_exactly_the_graceful_goaways(
    frames: list[tuple[int, int, int, bytes]], cuts: list[int]
) -> None:
    """Whatever the frames and however the bytes are cut, h2 is given every byte but
    those of the graceful GOAWAYs (stream 0, outside a header block, 8 bytes or more,
    NO_ERROR), in order, and those are reported."""
    wire = bytearray()
    expected_passed = bytearray()
    expected_found: list[tuple[int, bytes]] = []
    in_block = False
    for kind, flags, stream_id, payload in frames:
        frame = len(payload).to_bytes(3, "big") + bytes([kind, flags])
        frame += stream_id.to_bytes(4, "big") + payload
        wire += frame
        graceful = (
            kind == 0x7
            and stream_id == 0
            and not in_block
            and len(payload) >= 8
            and payload[4:8] == b"\0\0\0\0"
        )
        if graceful:
            expected_found.append((int.from_bytes(payload[:4], "big") & 0x7FFFFFFF, payload[8:]))
        else:
            expected_passed += frame
        if kind in (0x1, 0x5, 0x9):
            in_block = not flags & 0x4
    filter_ = _FrameHeaders(max_frame_size=16384)
    passed = bytearray()
    found: list[tuple[int, bytes]] = []
    rest = bytes(wire)
    for cut in [*cuts, len(rest)]:
        piece, rest = rest[:cut], rest[cut:]
        out, more = filter_.feed(piece)
        passed += out
        found += more
    out, more = filter_.feed(rest)
    passed += out
    found += more
    assert bytes(passed) == bytes(expected_passed)
    assert found == expected_found


def test_after_our_graceful_goaway_the_closing_one_names_the_same_last_stream() -> None:
    """A request that crossed our GOAWAY raises h2's highest stream ID; the GOAWAY
    that closes the connection must still name the graceful one's (RFC 9113 6.8: it
    may not rise), or the client takes the clean end for a protocol error."""
    client, server = connected_pair()
    kept = open_tunnel(client, server)
    assert server.go_away()
    client.open_stream(TARGET, {})  # crosses the GOAWAY
    exchange(client, server)
    server.close("drained")
    client_events, _ = exchange(client, server)
    assert not any(
        isinstance(e, events.ConnectionTerminated) and e.error_code for e in client_events
    ), client_events
    assert client.peer_last_stream == kept


def test_a_peer_that_keeps_opening_streams_after_our_goaway_loses_its_connection() -> None:
    clock = _Clock()
    raw, server = _rate_limited_pair(clock)
    _open_and_reset(raw, 1, reset=False)
    server.receive_data(raw.data_to_send())
    assert server.go_away()
    closed = None
    for _ in range(5000):
        _open_and_reset(raw, 1)
        got = server.receive_data(raw.data_to_send())
        closed = next((e for e in got if isinstance(e, events.ConnectionTerminated)), None)
        if closed is not None:
            break
    assert closed is not None and closed.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert server.streams_refused_after_goaway > 0


def test_a_stream_half_closed_before_its_answer_is_refused_by_a_goaway_that_leaves_it_out() -> None:
    client, server = connected_pair()
    kept = open_tunnel(client, server)
    late = client.open_stream(TARGET, {})
    client.send_data(late, b"", end_stream=True)  # no answer yet
    client.data_to_send()  # (the server never sees it: as if it crossed the GOAWAY)
    got = client.receive_data(_goaway(kept))
    assert any(
        isinstance(e, events.StreamReset) and e.stream_id == late and e.not_processed for e in got
    ), got
    assert late not in client.h2.streams or client.h2.streams[late].closed


@pytest.mark.parametrize("code", [0, int(ErrorCodes.PROTOCOL_ERROR)])
def test_a_goaways_text_reaches_us_printable_and_bounded(code: int) -> None:
    client, _server = connected_pair()
    forged = b"bye\nERROR quicmesh.sidecar: forged line \x1b[31mred" + b"x" * 1000
    got = client.receive_data(_goaway(0, code, forged))
    if code == 0:
        got = client.receive_eof()
    (terminated,) = [e for e in got if isinstance(e, events.ConnectionTerminated)]
    assert terminated.reason.startswith("bye?ERROR quicmesh.sidecar: forged line ?[31mred")
    assert len(terminated.reason) <= 256 and terminated.reason.isprintable()


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"", length: int = -1) -> bytes:
    size = len(payload) if length < 0 else length
    return size.to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def _terminated(evs: list[events.TunnelEvent]) -> events.ConnectionTerminated:
    (end,) = [e for e in evs if isinstance(e, events.ConnectionTerminated)]
    return end


def test_a_frame_over_the_max_frame_size_closes_the_connection_at_its_header() -> None:
    """h2 checks a frame's length only once the whole frame is in: a peer announcing
    16 MiB DATA frames made the server hold 16 MiB a connection before refusing it."""
    client, server = connected_pair()
    stream_id = open_tunnel(client, server)
    evs = server.receive_data(_frame(0x0, 0, stream_id, length=0xFFFFFF))  # header only
    end = _terminated(evs)
    assert end.error_code == ErrorCodes.FRAME_SIZE_ERROR
    assert "a frame of 16777215 bytes, over SETTINGS_MAX_FRAME_SIZE 16384" in end.reason
    assert server.closed
    # The GOAWAY says so, and what follows is not read.
    client_events = client.receive_data(server.data_to_send())
    assert _terminated(client_events).error_code == ErrorCodes.FRAME_SIZE_ERROR
    assert server.receive_data(b"\0" * 100_000) == []


@pytest.mark.parametrize(
    ("frame", "what"),
    [
        (_frame(0x6, 0, 0, b"12345678"), "PING"),
        (_frame(0x4, 0, 0), "SETTINGS"),
        (_frame(0x2, 0, 1, b"\0\0\0\0\x10"), "PRIORITY"),
        (None, "empty DATA"),
    ],
)
def test_a_flood_of_frames_that_carry_nothing_closes_the_connection(
    frame: bytes | None, what: str
) -> None:
    """Empty DATA, PING, SETTINGS and PRIORITY frames were taken without bound from a
    peer that reads what we send: 200,000 a second held a core. Within the rate they
    are fine; over it, ENHANCE_YOUR_CALM."""
    now = [0.0]
    client = H2TunnelSession(is_client=True)
    server = H2TunnelSession(is_client=False, clock=lambda: now[0])
    exchange(client, server)
    stream_id = open_tunnel(client, server)
    if frame is None:
        frame = _frame(0x0, 0, stream_id)
    # At the rate, for ten seconds: no complaint.
    for _ in range(10):
        now[0] += 1.0
        for _ in range(int(IDLE_FRAME_RATE)):
            assert not any(
                isinstance(e, events.ConnectionTerminated) for e in server.receive_data(frame)
            )
        server.data_to_send()
    # A burst over it: closed, naming the frames.
    evs: list[events.TunnelEvent] = []
    for _ in range(IDLE_FRAME_BURST + 1):
        evs += server.receive_data(frame)
        if server.closed:
            break
    end = _terminated(evs)
    assert end.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert "PING, SETTINGS, PRIORITY or empty DATA frames a second" in end.reason


def test_a_connection_remembers_a_bounded_number_of_closed_streams() -> None:
    # h2 keeps 65,536 (about 8 MB a connection side on a pool that carried that many
    # flows); a frame on a stream closed before the last CLOSED_STREAMS_KEPT is answered
    # with RST_STREAM (STREAM_CLOSED) and the connection carries on.
    client, server = connected_pair()
    first = None
    for _ in range(CLOSED_STREAMS_KEPT + 100):
        stream_id = open_tunnel(client, server)
        first = first or stream_id
        client.send_data(stream_id, b"x", end_stream=True)
        server.send_data(stream_id, b"y", end_stream=True)
        exchange(client, server)
        client.data_consumed(stream_id, 1)
        server.data_consumed(stream_id, 1)
    for session in (client, server):
        assert len(session.h2._closed_streams) == CLOSED_STREAMS_KEPT
    assert first is not None
    late = DataFrame(first)  # the peer's DATA on the first stream, long closed
    late.data = b"late"
    assert server.receive_data(late.serialize()) == []
    sent = server.data_to_send()
    frames, at = [], 0
    while at < len(sent):
        frame, length = Frame.parse_frame_header(memoryview(sent[at : at + 9]))
        frame.parse_body(memoryview(sent[at + 9 : at + 9 + length]))
        frames.append(frame)
        at += 9 + length
    [reset] = [f for f in frames if isinstance(f, RstStreamFrame)]
    assert (reset.stream_id, reset.error_code) == (first, ErrorCodes.STREAM_CLOSED)
    client.receive_data(sent)
    # A late answer (HEADERS) on it, as our 200 crossing the peer's cancel: a stream
    # error too, not the connection's end (h2 made it a PROTOCOL_ERROR for the connection).
    answer = HeadersFrame(first, flags=["END_HEADERS"])
    answer.data = server.h2.encoder.encode([(b":status", b"200")])
    assert client.receive_data(answer.serialize()) == []
    assert not client.closed
    server.receive_data(client.data_to_send())
    stream_id = open_tunnel(client, server)  # the connection carries on
    client.send_data(stream_id, b"still here", end_stream=True)
    _, server_events = exchange(client, server)
    assert payload_of(server_events, stream_id) == b"still here"
