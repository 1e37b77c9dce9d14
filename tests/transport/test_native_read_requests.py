"""Read requests the native engine is spared on a new flow.

* The opening side's request stream is read from its open (``try_open_stream``'s
  ``first_read``): the answer reaches Python without a read request of its own.
* A read request made while the session takes in a batch of events waits until the
  tasks those events woke have run their next step (:meth:`NativeConnection.woke`): a
  handler that hands its stream to a splice at once (both sidecars do) costs no read
  request that the engine would serve and the splice then discard. A handler that reads
  in Python still gets every byte.

What the engine is asked is recorded at its boundary: the endpoint handle each
connection gives its commands to is wrapped in a recorder of the ``read`` commands.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from typing import Any

import pytest
from quic_helpers import (
    TARGET,
    client_transport,
    flows_through,
    require_engine,
    run,
    server_transport,
)

from quicmesh.splice import splice_accepted
from quicmesh.transport.stream import MeshStream, SpliceOutcome


class ReadRecorder:
    """An endpoint handle that counts ``read`` commands by (side, stream) and passes
    everything through."""

    def __init__(self, endpoint: Any, is_client: bool, reads: Counter[tuple[str, int]]) -> None:
        self._endpoint = endpoint
        self._side = "client" if is_client else "server"
        self._reads = reads

    def read(self, conn: int, stream_id: int, size: int) -> Any:
        self._reads[self._side, stream_id] += 1
        return self._endpoint.read(conn, stream_id, size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._endpoint, name)


def record_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, int]]:
    require_engine("native")
    from quicmesh.transport.quic.native_engine import NativeConnection

    reads: Counter[tuple[str, int]] = Counter()
    commands = NativeConnection._native

    def recording_commands(self: NativeConnection) -> ReadRecorder:
        return ReadRecorder(commands.fget(self), self.is_client, reads)  # type: ignore[attr-defined]

    monkeypatch.setattr(NativeConnection, "_native", property(recording_commands))
    return reads


def request_stream_reads(reads: Counter[tuple[str, int]], side: str) -> dict[int, int]:
    return {stream: n for (s, stream), n in reads.items() if s == side and stream & 3 == 0}


def test_flows_spliced_at_once_cost_no_read_request_on_either_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """16 flows as two sidecars carry them: the client opens each stream, waits for the
    answer and hands the stream and an accepted TCP connection to a splice
    (``splice_accepted``); the server's handler connects, answers and splices in its
    first step (``connect_and_splice``). Every byte arrives both ways, and neither side
    sent the engine a read request for any request stream: the client's first read went
    with the open, and the read requests made as the answer (client) or the CONNECT
    (server) came in were dropped once the stream had been handed over."""
    reads = record_reads(monkeypatch)
    uploads = [b"upload %d " % n * 1000 for n in range(16)]
    outcomes: list[SpliceOutcome | None] = []

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write((await reader.read()).upper())
        await writer.drain()
        writer.close()

    async def main() -> list[bytes]:
        server = await asyncio.start_server(destination, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def handler(stream: MeshStream) -> None:
            outcomes.append(await stream.connect_and_splice("127.0.0.1", port, 5.0))

        listener = await server_transport(engine="native").listen(("127.0.0.1", 0), handler)
        conn = await client_transport(engine="native").connect(listener.address)
        local = socket.create_server(("127.0.0.1", 0))
        local.setblocking(False)
        loop = asyncio.get_running_loop()

        async def flow(upload: bytes) -> bytes:
            # The application's connection to the client sidecar, and its accepted end.
            app = socket.create_connection(local.getsockname())
            accepted, _ = await loop.sock_accept(local)
            accepted.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=app)
            writer.write(upload)
            writer.write_eof()
            downloading = asyncio.ensure_future(asyncio.wait_for(reader.read(), 20))
            # As the client sidecar does: the splice follows the answer in the same step.
            stream = await conn.open_stream(TARGET)
            assert not (await splice_accepted(stream, accepted)).error
            download = await downloading
            writer.close()
            return download

        try:
            return list(await asyncio.gather(*(flow(upload) for upload in uploads)))
        finally:
            conn.close()
            await conn.wait_closed()
            listener.close()
            await listener.wait_closed()
            local.close()
            server.close()

    assert run(main()) == [upload.upper() for upload in uploads]
    assert len(outcomes) == 16 and all(o is not None and not o.error for o in outcomes)
    assert request_stream_reads(reads, "server") == {}
    assert request_stream_reads(reads, "client") == {}


def test_the_answer_reaches_the_opening_side_without_a_read_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """12 flows whose server answers at once and sends a short reply: on the client,
    each request stream's first bytes (the answer) arrive before Python asked the engine
    to read the stream (its first read went with the open)."""
    reads = record_reads(monkeypatch)
    from quicmesh.transport.quic.native_engine import NativeConnection

    asked_before_data: set[int] = set()
    data_seen: set[int] = set()
    on_event = NativeConnection.on_native_event

    def recording_event(self: NativeConnection, event: tuple[Any, ...]) -> None:
        if event[0] == "data" and self.is_client:
            stream_id = event[2]
            if reads["client", stream_id] and stream_id not in data_seen:
                asked_before_data.add(stream_id)
            data_seen.add(stream_id)
        on_event(self, event)

    monkeypatch.setattr(NativeConnection, "on_native_event", recording_event)

    async def handler(stream: MeshStream) -> None:
        stream.accept()
        stream.write(b"hello from %d" % stream.stream_id)
        stream.write_eof()
        await stream.read()

    replies = run(flows_through(handler, [b""] * 12, wait_response=True))
    assert sorted(replies) == sorted(b"hello from %d" % (4 * n) for n in range(12))
    assert {stream_id for stream_id in data_seen if stream_id & 3 == 0} == {
        4 * n for n in range(12)
    }
    # Request streams only: the peer's unidirectional streams (control, QPACK) are read
    # when Python asks since f1d22fa (read at once, a peer's empty ones gave their credit
    # back without Python hearing of them).
    assert {stream_id for stream_id in asked_before_data if stream_id & 2 == 0} == set()


def test_a_handler_reading_in_python_gets_every_byte_of_a_deferred_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """12 flows, each uploading 3 MB (far more than one read) to a handler that reads it
    in Python: the read requests made while the session took in events went out once
    the handlers had run, and every byte arrived in order."""
    reads = record_reads(monkeypatch)
    uploads = [bytes([n]) * 3_000_000 for n in range(12)]

    async def handler(stream: MeshStream) -> None:
        received = bytearray()
        while chunk := await stream.read(1 << 16):
            received += chunk
        stream.write(b"%d:%d" % (received[0], len(received)))
        stream.write_eof()

    replies = run(flows_through(handler, uploads, wait_response=False))
    assert replies == [b"%d:3000000" % n for n in range(12)]
    assert all(n > 1 for n in request_stream_reads(reads, "server").values())
