"""aclose(): a connection closed gracefully loses no byte of the streams still running."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from test_contract import MESH, TARGET, TRANSPORT_NAMES

import quicmesh
from quicmesh import MeshStream


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
