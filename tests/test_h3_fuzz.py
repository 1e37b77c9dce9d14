"""Byte-level property test (issue 13, fuzzing): whatever bytes a peer puts on a
request stream and on its QPACK encoder stream, the server's H3 tunnel session
never raises; it answers with tunnel events (or closes the connection, for
connection errors). Hypothesis, since atheris does not install here; the examples
it shrinks to are kept as regression cases below."""

from __future__ import annotations

from aioquic.quic import events as quic_events
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_aioquic_layer import Clock, make_pair

from quicmesh.tunnel import events
from quicmesh.tunnel.h3 import H3TunnelSession

_HEADERS = bytes([0x01])
_ENCODER_STREAM = 2  # the client's first unidirectional stream carries its type first


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
def test_random_bytes_never_escape_the_session(
    request: bytes, encoder: bytes, frame_headers: bool, split: int
) -> None:
    clock = Clock()
    _, server = make_pair(clock, sessions=True)
    session = server.session
    assert isinstance(session, H3TunnelSession)
    body = request
    if frame_headers:
        body = _HEADERS + bytes([min(len(request), 63)]) + request
    produced: list[events.TunnelEvent] = []
    if encoder:
        produced += session.handle_quic_event(
            quic_events.StreamDataReceived(
                data=bytes([2]) + encoder, end_stream=False, stream_id=_ENCODER_STREAM
            )
        )
    for start in range(0, len(body), split):
        chunk = body[start : start + split]
        produced += session.handle_quic_event(
            quic_events.StreamDataReceived(
                data=chunk, end_stream=start + split >= len(body), stream_id=0
            )
        )
    assert all(isinstance(event, events.TunnelEvent) for event in produced)
