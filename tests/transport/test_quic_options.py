"""QuicTransport options that change what goes on the wire."""

from __future__ import annotations

import asyncio

import pytest
from test_contract import MESH, TARGET

import quicmesh
from quicmesh import MeshStream


@pytest.mark.parametrize("size", [1200, 1452])
def test_max_datagram_size_bounds_the_datagrams_sent(size: int) -> None:
    async def handler(stream: MeshStream) -> None:
        stream.accept()
        for _ in range(16):
            stream.write(b"x" * 65536)
            await stream.drain()
        stream.write_eof()

    async def main() -> tuple[int, int]:
        server = quicmesh.QuicTransport(
            identity=MESH.server, trust=MESH.ca.trust_bundle, max_datagram_size=size
        )
        listener = await server.listen(("127.0.0.1", 0), handler)
        conn = await MESH.transport("quic").connect(listener.address)
        stream = await conn.open_stream(TARGET)
        stream.write_eof()
        assert len(await stream.read()) == 16 * 65536
        (accepted,) = listener.connections
        stats = accepted.stats()
        await conn.aclose()
        listener.close()
        await listener.wait_closed()
        return stats["bytes_sent"], stats["packets_sent"]

    sent, packets = asyncio.run(asyncio.wait_for(main(), 60))
    average = sent / packets
    assert average <= size
    assert average > size - 100  # a bulk download fills its datagrams


@pytest.mark.parametrize("size", [1199, 1453, 9000])
def test_max_datagram_size_outside_the_safe_range_is_refused(size: int) -> None:
    with pytest.raises(quicmesh.ConfigError, match="max_datagram_size"):
        quicmesh.QuicTransport(
            identity=MESH.server, trust=MESH.ca.trust_bundle, max_datagram_size=size
        )
