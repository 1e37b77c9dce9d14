"""A spliced flow whose tunnel stream fails while neither copy waits on it.

Found by a review: on the Python copy path (h2, tcp, the aioquic engine) a stream whose
input had ended (the peer's FIN read) and whose TCP side was idle or not reading failed
without waking either copy, so the flow was held for ever: never logged, its
destination never reset. Now the splice watches the stream too.

Not on TLS-over-TCP: there the peer's FIN (its half-close) ends the reading of the
flow's own TCP connection, and a reset after it is seen only when something is written.
"""

from __future__ import annotations

import asyncio
import os

import pytest

import quicmesh
from quicmesh import DevCA, MeshStream
from quicmesh.splice import SpliceResult, splice

CA = DevCA()
SERVER = CA.issue("spiffe://mesh.local/ns/default/sa/server")
CLIENT = CA.issue("spiffe://mesh.local/ns/default/sa/client")


def transport(name: str, identity: quicmesh.Identity) -> quicmesh.Transport:
    if name == "quic":
        return quicmesh.QuicTransport(identity=identity, trust=CA.trust_bundle, engine="aioquic")
    return quicmesh.TRANSPORTS[name](identity=identity, trust=CA.trust_bundle)


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("quic", "connection closed"),
        ("h2", "connection closed"),
        ("quic", "stream reset"),
        ("h2", "stream reset"),
    ],
)
def test_a_stream_lost_after_its_input_ended_ends_the_splice(name: str, how: str) -> None:
    async def main() -> SpliceResult:
        held: list[asyncio.StreamWriter] = []

        async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # accepts, never reads, never writes

        backend = await asyncio.start_server(destination, "127.0.0.1", 0)
        spliced: asyncio.Future[SpliceResult] = asyncio.get_running_loop().create_future()
        accepted: list[MeshStream] = []

        async def handler(stream: MeshStream) -> None:
            accepted.append(stream)
            stream.accept()
            reader, writer = await asyncio.open_connection(*backend.sockets[0].getsockname()[:2])
            spliced.set_result(await splice(stream, reader, writer, offload=False))

        listener = await transport(name, SERVER).listen(("127.0.0.1", 0), handler)
        conn = await transport(name, CLIENT).connect(listener.address)
        stream = await conn.open_stream("backend.svc:80")
        stream.write(os.urandom(64 * 1024))
        stream.write_eof()
        await stream.drain()
        # Until the splice has read the stream to its end (so no copy waits on it) and
        # the destination holds the bytes.
        while not (held and accepted and accepted[0].at_eof()):
            await asyncio.sleep(0.01)
        if how == "stream reset":
            stream.abort()
        else:
            conn.close()  # the peer is gone: the stream fails
        result = await asyncio.wait_for(spliced, 10)
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
        for writer in held:
            writer.close()
        backend.close()
        await backend.wait_closed()
        return result

    result = asyncio.run(main())
    assert result.error  # ended, as a failure (the destination was reset)
