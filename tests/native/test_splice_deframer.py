"""The splice's HTTP/3 deframer (native/src/splice.rs) at the byte level.

When the native engine splices a flow it reads the request stream's frames
itself: DATA frames carry the bytes (RFC 9114 7.2.1), unknown and reserved
frame types are skipped (RFC 9114 9), HEADERS after the body are trailers and
end it, a frame type not allowed on a request stream is H3_FRAME_UNEXPECTED and
a frame cut by the end of the stream H3_FRAME_ERROR. Hypothesis builds valid
frame sequences, cuts them anywhere, and checks the payload; on arbitrary bytes
the deframer must agree with a reference model written from the RFC (same
payload up to the first violation, same error code, never a panic).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.transport.native import native_module

H3_FRAME_UNEXPECTED = 0x105
H3_FRAME_ERROR = 0x106
NOT_ON_REQUEST_STREAMS = {0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0D}


def native() -> Any:
    module = native_module()
    assert module is not None
    return module


def varint(value: int) -> bytes:
    """RFC 9000 16, shortest form; longer forms when ``width`` forces them."""
    for width, prefix in ((1, 0), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * width - 2):
            return (value | prefix << (8 * width - 8)).to_bytes(width, "big")
    raise ValueError(value)


def frame(frame_type: int, payload: bytes) -> bytes:
    return varint(frame_type) + varint(len(payload)) + payload


def reference(data: bytes) -> tuple[bytes, int | None]:
    """What RFC 9114 says a tunnel's request stream body is, after the HEADERS."""
    out = bytearray()
    at = 0
    trailers = False

    def read_varint() -> int | None:
        nonlocal at
        if at >= len(data):
            return None
        width = 1 << (data[at] >> 6)
        if at + width > len(data):
            return None
        value = int.from_bytes(data[at : at + width], "big") & ((1 << (8 * width - 2)) - 1)
        at += width
        return value

    while at < len(data):
        frame_type = read_varint()
        length = read_varint() if frame_type is not None else None
        if frame_type is None or length is None:
            return bytes(out), H3_FRAME_ERROR
        if trailers and frame_type in (0x00, 0x01):
            return bytes(out), H3_FRAME_UNEXPECTED
        if frame_type in NOT_ON_REQUEST_STREAMS:
            return bytes(out), H3_FRAME_UNEXPECTED
        if frame_type == 0x01:
            trailers = True
        body = data[at : at + length]
        at += len(body)
        if frame_type == 0x00:
            out += body
        if len(body) < length:
            return bytes(out), H3_FRAME_ERROR
    return bytes(out), None


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


grease = st.integers(0, 1000).map(lambda n: 0x1F * n + 0x21)
unknown = st.integers(0x0E, (1 << 62) - 1).filter(lambda t: t not in NOT_ON_REQUEST_STREAMS)
body_frames = st.one_of(
    st.binary(max_size=3000).map(lambda b: ("data", b)),
    st.tuples(st.one_of(grease, unknown), st.binary(max_size=100)).map(lambda t: ("skip", t)),
)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(body_frames, max_size=12),
    trailers=st.one_of(st.none(), st.binary(max_size=50)),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=20),
)
def test_valid_frame_sequences_in_any_chunking_give_their_payload(
    frames: list[tuple[str, Any]], trailers: bytes | None, cuts: list[int]
) -> None:
    stream = bytearray()
    expected = bytearray()
    for kind, value in frames:
        if kind == "data":
            stream += frame(0x00, value)
            expected += value
        else:
            frame_type, payload = value
            stream += frame(frame_type, payload)
    if trailers is not None:
        stream += frame(0x01, trailers)
        stream += frame(0x21, b"after the trailers, still skipped")
    payload, code, why = native().h3_deframe(cut(bytes(stream), cuts))
    assert (payload, code, why) == (bytes(expected), None, "")


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 1 << 20), max_size=10))
def test_any_bytes_give_the_reference_payload_and_at_most_one_error(
    data: bytes, cuts: list[int]
) -> None:
    payload, code, why = native().h3_deframe(cut(data, cuts))
    assert (payload, code) == reference(data)
    assert (why == "") == (code is None)


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.binary(min_size=1, max_size=200),
    garbage_type=st.sampled_from(sorted(NOT_ON_REQUEST_STREAMS)),
    rest=st.binary(max_size=200),
)
def test_a_forbidden_frame_after_data_stops_there_with_frame_unexpected(
    prefix: bytes, garbage_type: int, rest: bytes
) -> None:
    stream = frame(0x00, prefix) + frame(garbage_type, rest) + frame(0x00, b"never")
    payload, code, why = native().h3_deframe([stream])
    assert (payload, code) == (prefix, H3_FRAME_UNEXPECTED)
    assert f"{garbage_type:#x}" in why


@settings(max_examples=200, deadline=None)
@given(whole=st.binary(min_size=1, max_size=500), taken=st.integers(0, 499), extra=st.binary())
def test_resuming_inside_a_data_frame_continues_it(whole: bytes, taken: int, extra: bytes) -> None:
    """A splice takes over where Python's parser stood: inside a DATA frame."""
    taken %= len(whole)
    rest = whole[taken:]
    stream = rest + frame(0x00, extra)
    payload, code, _ = native().h3_deframe([stream], frame_type=0x00, remaining=len(rest))
    assert (payload, code) == (rest + extra, None)
