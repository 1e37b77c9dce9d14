"""The native engine reads each stream the peer opens at once (``first_read``), as
Python's first read request would: a new request's bytes reach Python without a read
request going to the engine and back first.

Streams held back by the identity's stream rate are read all the same; what their
first read gave waits in Python until the stream is served, and reaches HTTP/3 then,
whole and in order.
"""

from __future__ import annotations

from typing import Any

import pytest
from quic_helpers import flows_through, require_engine, run, server_transport

from quicmesh.transport.stream import MeshStream


async def echo(stream: MeshStream) -> None:
    stream.write(await stream.read())
    stream.write_eof()


async def echoed(server: Any, uploads: list[bytes]) -> list[bytes]:
    """Each upload as a flow of its own (CONNECT, the upload and FIN at once), all at
    once, through a native echo listener made with ``server``; what came back."""
    return await flows_through(echo, uploads, server=server)


def test_a_new_streams_request_reaches_python_with_no_read_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """20 flows, each a CONNECT with its whole upload and FIN behind it: on the server,
    every request stream's first bytes arrive before Python asked for any of them."""
    require_engine("native")
    from quicmesh.transport.quic.native_engine import NativeConnection

    asked_before_data: dict[int, bool] = {}
    data_seen: set[int] = set()
    read = NativeConnection._read
    on_event = NativeConnection.on_native_event

    def recording_read(self: NativeConnection, stream_id: int, state: Any) -> bool:
        asked = read(self, stream_id, state)
        if asked and not self.is_client and stream_id & 3 == 0 and stream_id not in data_seen:
            asked_before_data[stream_id] = True
        return asked

    def recording_event(self: NativeConnection, event: tuple[Any, ...]) -> None:
        if event[0] == "data" and not self.is_client:
            data_seen.add(event[2])
        on_event(self, event)

    monkeypatch.setattr(NativeConnection, "_read", recording_read)
    monkeypatch.setattr(NativeConnection, "on_native_event", recording_event)

    uploads = [b"flow %d" % n for n in range(20)]
    assert run(echoed(server_transport(engine="native"), uploads)) == uploads
    request_streams = {stream_id for stream_id in data_seen if stream_id & 3 == 0}
    assert len(request_streams) == 20
    assert asked_before_data == {}


def test_held_streams_are_left_unread_and_served_whole_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streams over the identity's rate wait unserved and unread: the engine reads a new
    stream at once only with a read permit (a token taken ahead), so a held stream keeps
    its slot (a read that met a churner's reset freed it). Served later (the rate's
    timer), each flow is whole: the request, its payload and its FIN, in order."""
    require_engine("native")
    from quicmesh.transport.quic.native_engine import NativeConnection

    decisions: list[tuple[bool, bool]] = []
    admitted = NativeConnection._stream_admitted

    def recording(
        self: NativeConnection, stream_id: int, read_started: bool, permit_used: bool
    ) -> bool:
        served = admitted(self, stream_id, read_started, permit_used)
        decisions.append((read_started, served))
        return served

    monkeypatch.setattr(NativeConnection, "_stream_admitted", recording)
    uploads = [b"%d:" % n + bytes([n]) * 50_000 for n in range(12)]
    server = server_transport(engine="native", max_streams=2, max_stream_rate=20.0)
    assert run(echoed(server, uploads)) == uploads
    held = [read for read, served in decisions if not served]
    assert held  # some streams were held
    assert not any(held)  # and none of them had been read
