"""Issue 13, finding 3: a stream its opener abandons is reset both ways and frees its slot.

A caller's timeout cancels ``open_stream()`` while the peer has not answered (a
stopped or overloaded peer sidecar). Before the fix the stream stayed open on
both sides for the life of the connection, holding one of the peer's stream
slots and, on the peer, the connection to the application. Every transport, real
loopback sockets; the server allows only a few concurrent streams so that leaked
slots would block the streams opened afterwards.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import quicmesh
from quicmesh import DevCA, MeshStream

TRANSPORT_NAMES = ["quic", "h2", "tcp"]
TARGET = "reviews.default.svc:9080"
CA = DevCA()
CLIENT = CA.issue("spiffe://mesh.local/ns/default/sa/client")
SERVER = CA.issue("spiffe://mesh.local/ns/default/sa/server")

SLOTS = 4
ABANDONED = 3 * SLOTS


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


async def echo(stream: MeshStream) -> None:
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()
    stream.write_eof()


async def _pair(name: str, handler: Any) -> tuple[quicmesh.Listener, quicmesh.PeerConnection]:
    kwargs: dict[str, Any] = {"identity": SERVER, "trust": CA.trust_bundle}
    if name != "tcp":
        kwargs["max_streams"] = SLOTS
    server = quicmesh.TRANSPORTS[name](**kwargs)
    listener = await server.listen(("127.0.0.1", 0), handler)
    client = quicmesh.TRANSPORTS[name](identity=CLIENT, trust=CA.trust_bundle)
    conn = await client.connect(listener.address)
    return listener, conn


async def shutdown(listener: quicmesh.Listener, conn: quicmesh.PeerConnection) -> None:
    conn.close()
    await conn.wait_closed()
    listener.close()
    await listener.wait_closed()


@pytest.mark.parametrize("name", TRANSPORT_NAMES)
def test_cancelled_open_stream_resets_both_ways_and_frees_its_slot(name: str) -> None:
    requested: asyncio.Queue[MeshStream]
    outcomes: asyncio.Queue[BaseException | None]

    async def handler(stream: MeshStream) -> None:
        if stream.headers.get("x-role") != "unanswered":
            await echo(stream)
            return
        await requested.put(stream)
        # Never answered, as by a stopped peer: only the opener's reset ends it.
        await stream.wait_closed()
        try:
            stream.write(b"too late")
        except quicmesh.StreamReset as exc:
            await outcomes.put(exc)
        else:
            await outcomes.put(None)

    async def main() -> None:
        nonlocal requested, outcomes
        requested, outcomes = asyncio.Queue(), asyncio.Queue()
        listener, conn = await _pair(name, handler)
        for _ in range(ABANDONED):
            opening = asyncio.ensure_future(
                conn.open_stream(TARGET, headers={"x-role": "unanswered"})
            )
            await requested.get()  # the peer holds the CONNECT, unanswered
            opening.cancel()  # what asyncio.wait_for does when connect_timeout fires
            with pytest.raises(asyncio.CancelledError):
                await opening
            assert isinstance(await outcomes.get(), quicmesh.StreamReset)
            assert conn.active_streams == 0
        # Every slot came back: with SLOTS concurrent streams allowed, leaked ones
        # would make this wait forever (run() gives up after 60 s).
        streams = [await conn.open_stream(TARGET) for _ in range(SLOTS)]
        for index, stream in enumerate(streams):
            stream.write(b"flow %d" % index)
            stream.write_eof()
        for index, stream in enumerate(streams):
            assert await stream.read() == b"flow %d" % index
        served = listener.connections  # type: ignore[attr-defined]
        assert sum(c.active_streams for c in served) == 0
        await shutdown(listener, conn)

    run(main())


@pytest.mark.parametrize("name", ["quic", "h2"])
def test_timed_out_open_stream_does_not_hold_a_slot(name: str) -> None:
    release = asyncio.Event()

    async def handler(stream: MeshStream) -> None:
        if stream.headers.get("x-role") == "unanswered":
            await release.wait()
            return
        await echo(stream)

    async def main() -> None:
        listener, conn = await _pair(name, handler)
        for _ in range(ABANDONED):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    conn.open_stream(TARGET, headers={"x-role": "unanswered"}), 0.2
                )
            assert conn.active_streams == 0
        stream = await asyncio.wait_for(conn.open_stream(TARGET), 10)
        stream.write(b"after the timeouts")
        stream.write_eof()
        assert await stream.read() == b"after the timeouts"
        release.set()
        await shutdown(listener, conn)

    run(main())
