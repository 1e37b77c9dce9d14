"""aclose(): a connection closed gracefully loses no byte of the streams still running."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from quic_helpers import only_connection, require_engine
from test_contract import MESH, TARGET, TRANSPORT_NAMES

import quicmesh
from quicmesh import MeshStream
from quicmesh.tls.identity import Identity
from quicmesh.transport.quic import QuicPeerConnection


@pytest.mark.parametrize("name", TRANSPORT_NAMES)
def test_aclose_lets_running_streams_finish(name: str) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB per stream
    digests: list[bytes] = []
    started = 0
    all_started: asyncio.Future[None]

    async def handler(stream: MeshStream) -> None:
        nonlocal started
        stream.accept()
        started += 1
        if started == 4:
            all_started.set_result(None)
        digests.append(hashlib.sha256(await stream.read()).digest())

    async def main() -> None:
        nonlocal all_started
        all_started = asyncio.get_running_loop().create_future()
        server = MESH.transport(name, identity=MESH.server)
        listener = await server.listen(("127.0.0.1", 0), handler)
        conn = await MESH.transport(name).connect(listener.address)
        streams = [await conn.open_stream(TARGET) for _ in range(4)]
        for stream in streams:
            stream.write(payload)
            stream.write_eof()
        await all_started
        await conn.aclose(timeout=30)  # every stream's bytes are still in flight here
        assert conn.is_closed or name == "tcp"
        with pytest.raises(quicmesh.TunnelError):
            await conn.open_stream(TARGET)
        listener.close()
        await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert digests == [hashlib.sha256(payload).digest()] * 4


@pytest.mark.parametrize("name", ["quic", "h2"])
def test_finished_streams_are_forgotten_on_both_sides(name: str) -> None:
    async def handler(stream: MeshStream) -> None:
        await stream.read()
        stream.write(b"bye")
        stream.write_eof()  # our EOF is the last thing that happens on this stream

    async def main() -> None:
        server = MESH.transport(name, identity=MESH.server)
        listener = await server.listen(("127.0.0.1", 0), handler)
        conn = await MESH.transport(name).connect(listener.address)
        for _ in range(5):
            stream = await conn.open_stream(TARGET)
            stream.write_eof()
            assert await stream.read() == b"bye"
            assert stream.closed
        assert conn.active_streams == 0
        accepted = await only_connection(listener)
        assert accepted.active_streams == 0
        await conn.aclose()
        listener.close()
        await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_quic_peer_close_is_seen_before_the_draining_period_ends(engine: str) -> None:
    async def handler(stream: MeshStream) -> None:
        await stream.read()

    def transport(identity: Identity) -> quicmesh.QuicTransport:
        require_engine(engine)
        return quicmesh.QuicTransport(identity=identity, trust=MESH.ca.trust_bundle, engine=engine)

    async def main() -> None:
        server = transport(MESH.server)
        listener = await server.listen(("127.0.0.1", 0), handler)
        conn = await transport(MESH.client).connect(listener.address)
        assert isinstance(conn, QuicPeerConnection)
        stream = await conn.open_stream(TARGET)
        accepted = await only_connection(listener)
        accepted.close()
        with pytest.raises(quicmesh.StreamReset):
            await stream.read()
        # What a user sees at once on the peer's CONNECTION_CLOSE, on either engine:
        # the connection is closed and no stream can be opened on it meanwhile.
        assert conn.is_closed
        if engine == "aioquic":
            # aioquic reports the end only when its draining period (3 PTO, RFC 9000
            # 10.2.2) is over. quinn runs that period inside its endpoint and reports
            # the end as it begins, so a native connection may be terminated here.
            assert not conn.terminated
        with pytest.raises(quicmesh.ConnectionLost):
            await conn.open_stream(TARGET)
        await conn.wait_closed()
        assert conn.terminated
        listener.close()
        await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("name", ["quic", "quic-native", "h2"])
def test_aclose_on_the_accepting_side_tells_the_peer_to_go_away(name: str) -> None:
    """A review (2026-12-07): the accepting side's ``aclose()`` sent no GOAWAY, so its
    peer kept opening streams that the draining side took (and reset at its deadline).
    Now the peer hears it first: its next stream opens elsewhere, none is taken here."""
    served: list[str] = []
    first: asyncio.Future[None]
    release: asyncio.Future[None]

    async def handler(stream: MeshStream) -> None:
        stream.accept()
        served.append(stream.target.host)
        if not first.done():
            first.set_result(None)
        await release
        stream.write(await stream.read())
        stream.write_eof()

    async def main() -> None:
        nonlocal first, release
        first = asyncio.get_running_loop().create_future()
        release = asyncio.get_running_loop().create_future()
        server = MESH.transport(name, identity=MESH.server)
        listener = await server.listen(("127.0.0.1", 0), handler)
        conn = await MESH.transport(name).connect(listener.address)
        running = await conn.open_stream("first:1")
        running.write(b"kept")
        running.write_eof()
        await first
        accepted = await only_connection(listener)
        closing = asyncio.ensure_future(accepted.aclose(timeout=30))
        while not conn.going_away:  # (no event says so: looked at each turn)
            await asyncio.sleep(0)
        with pytest.raises(quicmesh.ConnectionLost):
            await conn.open_stream("second:1")
        release.set_result(None)
        assert await running.read() == b"kept"  # the running stream finishes
        await closing
        assert served == ["first"]
        conn.close()
        listener.close()
        await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 60))
