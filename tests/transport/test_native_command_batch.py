"""Python's commands to the native engine wait for the end of the event loop's turn,
and one flush hands the engine all of a turn's commands (one wake-up of its thread
instead of one per command); they run there in the order given.

The order itself is checked in Rust (``cargo test deferred_commands``); here, that a
burst of flows gives many commands per flush and every flow still arrives whole, and
that a stream's reading handed to a splice is not lost when the stream's end arrives
before the turn ends (the hand-over goes to the engine at once: only a command that
reached the stream's reader before it ended is answered with what it read).
"""

from __future__ import annotations

import asyncio
import select
from typing import Any

import pytest
from quic_helpers import CLIENT, SERVER, TARGET, flows_through, require_engine, run, until
from test_native_splice import tcp_pair, transport

from quicmesh.transport.stream import MeshStream, SpliceOutcome


async def echo(stream: MeshStream) -> None:
    stream.write(await stream.read())
    stream.write_eof()


def test_a_burst_of_flows_gives_the_engine_many_commands_per_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """30 flows at once (CONNECT, upload, FIN, each echoed): both sides' commands (opens,
    writes, FINs, reads, answers) reach the engine in a few flushes, several commands in
    each, and every flow is whole."""
    require_engine("native")
    from quicmesh.transport.quic.native_engine import _Pump

    counts = {"commands": 0, "flushes": 0}
    commands, flush = _Pump.commands, _Pump.flush

    def counting_commands(self: _Pump) -> Any:
        counts["commands"] += 1
        return commands.fget(self)  # type: ignore[attr-defined]

    def counting_flush(self: _Pump) -> None:
        counts["flushes"] += 1
        flush(self)

    monkeypatch.setattr(_Pump, "commands", property(counting_commands))
    monkeypatch.setattr(_Pump, "flush", counting_flush)
    uploads = [b"flow %d " % n * 100 for n in range(30)]
    assert run(flows_through(echo, uploads)) == uploads
    assert counts["commands"] >= 3 * 30
    assert counts["commands"] >= 4 * counts["flushes"], counts


def test_a_hand_over_given_as_the_streams_end_arrives_keeps_its_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's handler reads the first byte in Python (its next read request goes
    out), then splices the stream. Right as it hands the reading over, the client sends
    the rest of its upload and FIN, and the loop is held (up to 2 s, on the server
    endpoint's wake-up descriptor) so that the engine can read them before the turn
    ends: the splice still gets them, and the TCP side receives the whole upload."""
    from quicmesh.transport.quic.native_engine import NativeConnection

    hand_over = NativeConnection.hand_over_reading
    client_stream: list[MeshStream] = []

    def racing_hand_over(self: NativeConnection, stream_id: int) -> bool:
        if self.is_client:
            return hand_over(self, stream_id)
        client_stream[0].write(b"rest of the upload")
        client_stream[0].write_eof()
        client_stream[0].channel.quic._pump.flush()  # type: ignore[attr-defined]
        handed = hand_over(self, stream_id)
        # Before the turn ends (the server's queued commands wait for it): the engine
        # reads the FIN now if nothing took the reading over.
        select.select([self._pump.endpoint.fileno()], [], [], 2.0)
        return handed

    monkeypatch.setattr(NativeConnection, "hand_over_reading", racing_hand_over)
    at_tcp: list[bytes] = []
    outcomes: list[SpliceOutcome] = []

    async def main() -> None:
        async def handler(stream: MeshStream) -> None:
            first = await stream.readexactly(1)
            native: Any = stream.channel.quic  # type: ignore[attr-defined]
            await until(lambda: native._streams[stream.stream_id].reading)
            sock, reader, writer = await tcp_pair()

            async def app() -> None:
                at_tcp.append(first + await reader.read())
                writer.close()

            receiving = asyncio.ensure_future(app())
            outcomes.append(await stream.splice_socket(sock))
            await receiving

        listener = await transport("native", SERVER).listen(("127.0.0.1", 0), handler)
        conn = await transport("native", CLIENT).connect(listener.address)
        stream = await conn.open_stream(TARGET)
        client_stream.append(stream)
        stream.write(b"x")
        await until(lambda: bool(outcomes), timeout=20)
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())
    assert outcomes[0].error == "", outcomes
    assert at_tcp == [b"xrest of the upload"]
