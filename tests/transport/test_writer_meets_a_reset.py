"""A writer that meets its peer's reset ends, on every transport and event loop.

Found by a soak review: under uvloop a flow whose client reset its TCP connection
mid-download was held for ever on both sidecars (uvloop's ``write`` raises
RuntimeError on a closed handle, which the splice did not take for a reset), and on the
native engine a ``write(); await drain()`` handler froze the event loop once its peer
aborted the stream (the writes were dropped before the stream heard why, and ``drain``
never let the news in)."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from quic_helpers import CA, CLIENT, SERVER, require_engine

from quicmesh import H2Transport
from quicmesh.splice import splice
from quicmesh.transport.stream import MeshStream


def test_a_splice_whose_tcp_client_resets_ends_under_uvloop() -> None:
    """The stream's bytes go to a TCP client that reset its connection: the splice ends
    with the reset as its error and resets the stream too (uvloop's write raised
    RuntimeError on the closed transport: the splice failed with it, and the flow's
    stream was held)."""
    uvloop = pytest.importorskip("uvloop")  # (a test dependency: pyproject's [test])

    async def main() -> tuple[str, bool]:
        server = H2Transport(identity=SERVER, trust=CA.trust_bundle)
        flows: asyncio.Queue[MeshStream] = asyncio.Queue()

        async def held(stream: MeshStream) -> None:
            stream.accept()
            await flows.put(stream)
            await stream.wait_closed()

        listener = await server.listen(("127.0.0.1", 0), held)
        connection = await H2Transport(identity=CLIENT, trust=CA.trust_bundle).connect(
            listener.address
        )
        stream = await connection.open_stream("x.svc:80")
        far = await flows.get()
        app = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(app.getsockname())
        sock, _ = app.accept()
        app.close()
        sock.setblocking(False)
        _, writer = await asyncio.open_connection(sock=sock)
        # The splice reads from a quiet connection of its own: only its writes meet the
        # reset (as when the client's reset comes while bytes are on their way to it).
        quiet, quiet_peer = socket.socketpair()
        reader, quiet_writer = await asyncio.open_connection(sock=quiet)
        splicing = asyncio.ensure_future(splice(stream, reader, writer))
        far.write(b"x" * 10_000)
        got = 0
        while got < 10_000:
            got += len(await asyncio.to_thread(client.recv, 65536))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset
        while not writer.transport.is_closing():  # (uvloop saw it: its handle is closed)
            await asyncio.sleep(0.001)
        far.write(b"y" * 10_000)  # more from the destination, for the closed connection
        result = await asyncio.wait_for(splicing, 10)
        closing = stream.is_closing()
        quiet_writer.close()
        quiet_peer.close()
        connection.close()
        listener.close()
        await listener.wait_closed()
        return result.error, closing

    error, closing = uvloop.run(main())
    assert error, "the splice ended with no error"
    assert closing


ABORTED_WRITERS = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from quic_helpers import CA, CLIENT, SERVER
    from quicmesh import QuicTransport
    from quicmesh.errors import StreamReset

    ended = []

    async def writer(stream):
        try:
            while True:
                stream.write(b"z" * 16384)
                await stream.drain()
        except StreamReset:
            ended.append(stream)

    def native(identity):
        return QuicTransport(identity=identity, trust=CA.trust_bundle, engine="native")

    async def main():
        listener = await native(SERVER).listen(("127.0.0.1", 0), writer)
        connection = await native(CLIENT).connect(listener.address)

        async def one():
            stream = await connection.open_stream("x.svc:1")
            await stream.readexactly(20000)
            stream.abort()

        await asyncio.gather(*(one() for _ in range(200)))
        while len(ended) < 200:
            await asyncio.sleep(0.01)
        print("ended", len(ended))
        connection.close()
        listener.close()

    asyncio.run(main())
    """
)


def test_write_drain_handlers_end_when_their_peer_aborts_on_the_native_engine() -> None:
    """200 handlers each in a ``write(); await drain()`` loop, every stream aborted by the
    client: each ends with StreamReset (the event loop froze: run in a child process, so
    that a freeze fails the test rather than hanging it)."""
    require_engine("native")
    done = subprocess.run(
        [sys.executable, "-c", ABORTED_WRITERS, str(Path(__file__).parent.parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ended 200"
