"""Byte-level property test (issue 13, fuzzing): whatever bytes a peer puts on a
request stream and on its QPACK encoder stream, the server's H3 tunnel session
never raises; it answers with tunnel events (or closes the connection, for
connection errors). Hypothesis, since atheris does not install here; the examples
it shrinks to are kept as regression cases below."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_aioquic_layer import Clock, make_pair, settle, transfer

from quicmesh.tunnel import events
from quicmesh.tunnel.h3 import H3TunnelSession

_HEADERS = bytes([0x01])


@settings(max_examples=25, deadline=None)
@given(
    request=st.binary(max_size=300),
    encoder=st.binary(max_size=100),
    frame_headers=st.booleans(),
    split=st.integers(1, 50),
)
@example(request=b"\x00" * 10, encoder=b"", frame_headers=True, split=1)
@example(request=b"\xff" * 40, encoder=b"\x3f\xe1\x1f", frame_headers=True, split=7)
@example(
    request=b"\x80" * 64, encoder=b"\x02\x3f\xe1\x1f\x46x-bomb\x03abc", frame_headers=True, split=3
)
@example(
    request=b"\xc0\x00\x00\x00\x00\x00\x00\n\x03\x00\x00\x00",
    encoder=b"",
    frame_headers=False,
    split=1,
)
def test_random_bytes_never_escape_the_session(
    request: bytes, encoder: bytes, frame_headers: bool, split: int
) -> None:
    # The bytes travel through the client's QUIC connection, as a peer's would: on a
    # request stream the client opens (in ``split``-byte writes, the last with FIN) and
    # on the client's QPACK encoder stream (its type already sent by the client's H3
    # layer). The server's QUIC layer knows both streams, so what its H3 layer sends
    # back (a reset of an incomplete request) goes out as it would in a real exchange.
    clock = Clock()
    client, server = make_pair(clock, sessions=True)
    assert isinstance(server.session, H3TunnelSession)
    assert isinstance(client.session, H3TunnelSession)
    body = request
    if frame_headers:
        body = _HEADERS + bytes([min(len(request), 63)]) + request
    if encoder:
        encoder_stream = client.session.h3._local_encoder_stream_id
        assert encoder_stream is not None
        client.quic.send_stream_data(encoder_stream, encoder)
    request_stream = client.quic.get_next_available_stream_id()
    if not body:
        client.quic.send_stream_data(request_stream, b"", end_stream=True)
    for start in range(0, len(body), split):
        chunk = body[start : start + split]
        client.quic.send_stream_data(request_stream, chunk, end_stream=start + split >= len(body))
        clock.now += 0.001
        transfer(client, server, clock.now)  # the server's session sees each write
    settle(client, server, clock)
    assert all(isinstance(event, events.TunnelEvent) for event in server.tunnel_events)
