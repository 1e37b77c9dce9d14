"""Sans-IO tests of Http1TunnelSession: one CONNECT tunnel per connection, via h11."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.tunnel import events
from quicmesh.tunnel.connect import Target, parse_target
from quicmesh.tunnel.http1 import MAX_REQUEST_HEAD_BYTES, STREAM_ID, Http1TunnelSession
from quicmesh.tunnel.session import ResetReason

TARGET = Target("reviews.default.svc", 9080)


def drain(session: Http1TunnelSession) -> bytes:
    out = b""
    while chunk := session.data_to_send():
        out += chunk
    return out


def open_tunnel(
    headers: dict[str, str] | None = None,
) -> tuple[Http1TunnelSession, Http1TunnelSession]:
    client = Http1TunnelSession(is_client=True)
    server = Http1TunnelSession(is_client=False)
    assert client.can_open_stream()
    assert client.open_stream(TARGET, headers or {}) == STREAM_ID
    assert not client.can_open_stream()
    assert server.receive_data(drain(client)) == [
        events.StreamRequested(STREAM_ID, TARGET.authority, headers or {})
    ]
    server.respond(STREAM_ID, 200)
    assert client.receive_data(drain(server)) == [events.ResponseReceived(STREAM_ID, 200, "")]
    return client, server


def test_tunnel_carries_raw_bytes_and_half_closes_each_way() -> None:
    client, server = open_tunnel({"x-request-id": "1"})
    client.send_data(STREAM_ID, b"ping", end_stream=True)
    assert drain(client) == b"ping"
    assert client.output_ended and not client.finished
    assert server.receive_data(b"ping") == [events.DataReceived(STREAM_ID, b"ping")]
    assert server.receive_eof() == [events.DataReceived(STREAM_ID, b"", True)]
    assert not server.finished
    server.send_data(STREAM_ID, b"pong")
    server.send_data(STREAM_ID, b"", end_stream=True)
    assert drain(server) == b"pong"
    assert server.finished
    assert client.receive_data(b"pong") == [events.DataReceived(STREAM_ID, b"pong")]
    assert client.receive_eof() == [events.DataReceived(STREAM_ID, b"", True)]
    assert client.finished


def test_bytes_sent_before_the_answer_reach_the_application_after_it() -> None:
    client = Http1TunnelSession(is_client=True)
    server = Http1TunnelSession(is_client=False)
    client.open_stream(TARGET, {})
    request = drain(client)
    assert server.receive_data(request + b"early") == [
        events.StreamRequested(STREAM_ID, TARGET.authority, {})
    ]
    assert server.receive_data(b" bytes") == []
    assert server.receive_eof() == []
    server.respond(STREAM_ID, 200)
    assert server.pending_events() == [
        events.DataReceived(STREAM_ID, b"early bytes"),
        events.DataReceived(STREAM_ID, b"", True),
    ]


def test_client_holds_data_until_the_tunnel_is_open_and_gets_trailing_bytes() -> None:
    client = Http1TunnelSession(is_client=True)
    client.open_stream(TARGET, {})
    drain(client)
    client.send_data(STREAM_ID, b"queued")
    assert client.unsent_bytes(STREAM_ID) == 6
    assert drain(client) == b""
    reply = client.receive_data(b"HTTP/1.1 200 Connection Established\r\n\r\nfirst")
    assert reply == [
        events.ResponseReceived(STREAM_ID, 200, ""),
        events.DataReceived(STREAM_ID, b"first"),
    ]
    assert drain(client) == b"queued"


def test_refusal_carries_status_and_reason_and_ends_both_sides() -> None:
    client = Http1TunnelSession(is_client=True)
    server = Http1TunnelSession(is_client=False)
    client.open_stream(TARGET, {})
    server.receive_data(drain(client))
    server.respond(STREAM_ID, 403, "spiffe://mesh.local/ns/a/sa/b may not reach it")
    response = drain(server)
    assert response.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert server.finished
    assert client.receive_data(response) == [
        events.ResponseReceived(STREAM_ID, 403, "spiffe://mesh.local/ns/a/sa/b may not reach it")
    ]
    drain(client)
    assert client.finished


def test_reset_asks_for_the_connection_to_be_reset() -> None:
    client, _ = open_tunnel()
    client.send_data(STREAM_ID, b"x" * 1000)
    client.reset_stream(STREAM_ID, ResetReason.CONNECT_ERROR)
    assert client.abort_requested and client.finished
    assert drain(client) == b""


def test_input_pauses_above_the_window_until_read() -> None:
    client = Http1TunnelSession(is_client=True, receive_window=1000)
    client.open_stream(TARGET, {})
    drain(client)
    client.receive_data(b"HTTP/1.1 200 OK\r\n\r\n")
    client.receive_data(b"x" * 1500)
    assert client.input_paused
    client.data_consumed(STREAM_ID, 600)
    assert not client.input_paused


@pytest.mark.parametrize("with_head", [True, False])
def test_bytes_before_the_answer_count_against_the_servers_window(with_head: bool) -> None:
    """A client that keeps sending after its CONNECT while the server has not answered
    (the destination still dialing) is held to the receive window: the server stops
    reading (it held 2.4 GB of one client's bytes in 7 s before). Whether the bytes came
    in the read that carried the request head or after it; all reach the application
    once it accepts."""
    client = Http1TunnelSession(is_client=True)
    server = Http1TunnelSession(is_client=False, receive_window=1000)
    client.open_stream(TARGET, {})
    head = drain(client)
    if with_head:
        server.receive_data(head + b"x" * 600)
    else:
        server.receive_data(head)
        server.receive_data(b"x" * 600)
    assert not server.input_paused
    server.receive_data(b"y" * 600)
    assert server.input_paused
    server.respond(STREAM_ID, 200)
    assert server.pending_events() == [events.DataReceived(STREAM_ID, b"x" * 600 + b"y" * 600)]
    assert server.input_paused  # (unread by the application yet)
    server.data_consumed(STREAM_ID, 1200)
    assert not server.input_paused


def test_a_refusal_forgets_the_bytes_held_before_it() -> None:
    client = Http1TunnelSession(is_client=True)
    server = Http1TunnelSession(is_client=False, receive_window=1000)
    client.open_stream(TARGET, {})
    server.receive_data(drain(client) + b"x" * 2000)
    assert server.input_paused
    server.respond(STREAM_ID, 403, "no")
    assert not server.input_paused


def test_server_closing_before_answering_resets_the_client_stream() -> None:
    client = Http1TunnelSession(is_client=True)
    client.open_stream(TARGET, {})
    drain(client)
    assert client.receive_eof() == [events.StreamReset(STREAM_ID, 0)]


def request_bytes(head: bytes) -> tuple[list[events.TunnelEvent], bytes]:
    server = Http1TunnelSession(is_client=False)
    result = server.receive_data(head)
    return result, drain(server)


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n",
        b"CONNECT no-port HTTP/1.1\r\nhost: no-port\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\nhost: a:1\r\nproxy-status: x\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\nhost: a:1\r\ncontent-length: 5\r\n\r\nhello",
        b"CONNECT a:1 HTTP/1.1\r\nhost: a:1\r\nx-a: 1\r\nx-a: 2\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\nhost: a:1\r\nx-a: caf\xc3\xa9\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ],
)
def test_malformed_requests_get_400(head: bytes) -> None:
    result, response = request_bytes(head)
    assert len(result) == 1
    assert isinstance(result[0], events.RequestRejected)
    assert result[0].status == 400
    assert response.startswith(b"HTTP/1.1 400 ")


def test_oversized_request_head_gets_431() -> None:
    head = b"CONNECT a:1 HTTP/1.1\r\nhost: a:1\r\nx-big: " + b"y" * MAX_REQUEST_HEAD_BYTES
    result, response = request_bytes(head)
    assert [type(e) for e in result] == [events.RequestRejected]
    assert response.startswith(b"HTTP/1.1 431 ")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=512), max_size=4), st.booleans())
def test_garbage_never_raises(chunks: list[bytes], with_connect_prefix: bool) -> None:
    server = Http1TunnelSession(is_client=False)
    prefix = [b"CONNECT a:1 HTTP/1.1\r\n"] if with_connect_prefix else []
    produced: list[events.TunnelEvent] = []
    for chunk in prefix + chunks:
        produced += server.receive_data(chunk)
    produced += server.receive_eof()
    response = drain(server)
    for event in produced:
        if isinstance(event, events.RequestRejected):
            assert event.status in (400, 431)
            assert response.startswith(f"HTTP/1.1 {event.status} ".encode())
            assert server.finished


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_response_never_raises(garbage: bytes) -> None:
    client = Http1TunnelSession(is_client=True)
    client.open_stream(TARGET, {})
    drain(client)
    for event in client.receive_data(garbage):
        if isinstance(event, events.ResponseReceived) and event.status != 200:
            drain(client)
            assert client.finished


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_HOSTS = (
    st.lists(_LABEL, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda h: not h.rsplit(".", 1)[-1].isdigit())
)
_HEADER_NAMES = st.from_regex(r"x-[a-z0-9-]{1,20}", fullmatch=True)
_HEADER_VALUES = st.from_regex(r"[!-~]([ !-~]{0,30}[!-~])?", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(_HOSTS, st.integers(1, 65535), st.dictionaries(_HEADER_NAMES, _HEADER_VALUES, max_size=8))
def test_well_formed_connects_are_parsed(host: str, port: int, headers: dict[str, str]) -> None:
    client = Http1TunnelSession(is_client=True)
    server = Http1TunnelSession(is_client=False)
    client.open_stream(Target(host, port), headers)
    assert server.receive_data(drain(client)) == [
        events.StreamRequested(STREAM_ID, f"{host}:{port}", headers)
    ]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40))
def test_any_target_is_parsed_or_rejected_with_400(target: str) -> None:
    head = f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n".encode()
    result, response = request_bytes(head)
    [event] = result
    try:
        expected = parse_target(target)
    except ValueError:
        assert isinstance(event, events.RequestRejected) and event.status == 400
        assert response.startswith(b"HTTP/1.1 400 ")
    else:
        assert event == events.StreamRequested(STREAM_ID, expected.authority, {})
