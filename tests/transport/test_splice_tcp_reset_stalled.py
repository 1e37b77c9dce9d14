"""A TCP reset while the Python copy waits for the stream's credit fails the flow then.

Found by a review: on the Python copy path (aioquic, h2, TLS-over-TCP) a destination that
wrote until the tunnel's peer stopped taking bytes and then reset its connection was
heard only once the peer read again, or at the flow's idle timeout (an hour by default):
the copy no longer read the socket (asyncio stops watching a socket whose reading is
paused). The native engine's splice had the same fault, fixed before
(test_native_splice.py). On both event loops: under uvloop (the sidecar's), once the
copy's read had heard the reset, the splice's own reset of the TCP side could raise a
ValueError from uvloop's stand-in for the closed socket, and the flow's handler failed
with a traceback (seen while writing this test).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import uvloop

import quicmesh
from quicmesh import DevCA, MeshStream
from quicmesh.splice import SpliceResult, splice

CA = DevCA()
SERVER = CA.issue("spiffe://mesh.local/ns/default/sa/server")
CLIENT = CA.issue("spiffe://mesh.local/ns/default/sa/client")
LINGER_ZERO = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {1, 0}: close with RST


def transport(name: str, identity: quicmesh.Identity) -> quicmesh.Transport:
    if name == "quic":
        return quicmesh.QuicTransport(identity=identity, trust=CA.trust_bundle, engine="aioquic")
    return quicmesh.TRANSPORTS[name](identity=identity, trust=CA.trust_bundle)


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


Destination = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def spliced_flow(
    name: str, destination: Destination
) -> AsyncIterator[tuple[MeshStream, asyncio.Future[SpliceResult]]]:
    """A flow from a client over transport ``name`` whose accepting side copies it in
    Python (``splice(offload=False)``) to ``destination``: the client's stream, and the
    splice's result to come."""
    backend = await asyncio.start_server(destination, "127.0.0.1", 0)
    spliced: asyncio.Future[SpliceResult] = asyncio.get_running_loop().create_future()

    async def handler(stream: MeshStream) -> None:
        stream.accept()
        reader, writer = await asyncio.open_connection(*backend.sockets[0].getsockname()[:2])
        spliced.set_result(await splice(stream, reader, writer, offload=False))

    listener = await transport(name, SERVER).listen(("127.0.0.1", 0), handler)
    conn = await transport(name, CLIENT).connect(listener.address)
    try:
        yield await conn.open_stream("backend.svc:80"), spliced
    finally:
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
        backend.close()


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("name", ["quic", "h2", "tcp"])
def test_a_destination_reset_while_the_stream_waits_for_credit_fails_the_flow(
    name: str, loop: str
) -> None:
    async def main() -> tuple[SpliceResult, bool]:
        blocked = asyncio.Event()

        async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Writes until the splice stops taking bytes (the tunnel's peer reads
            # nothing), then resets its connection.
            for _ in range(1024):
                writer.write(bytes(1 << 20))
                if writer.transport.get_write_buffer_size() > 0:
                    break
            while writer.transport.get_write_buffer_size() == 0:
                await asyncio.sleep(0.01)  # (the kernel buffers still took it)
                writer.write(bytes(1 << 20))
            await asyncio.sleep(0.2)  # the copy waiting on the stream's credit by now
            blocked.set()
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO
            )
            writer.transport.abort()

        async with spliced_flow(name, destination) as (stream, spliced):
            stream.write(b"x")  # and never read
            await asyncio.wait_for(blocked.wait(), 20)
            result = await asyncio.wait_for(spliced, 10)
            reset_seen = False
            try:
                while await asyncio.wait_for(stream.read(1 << 20), 10):
                    pass  # (what came before the reset, where the transport still gives it)
            except quicmesh.TunnelError:
                reset_seen = True  # the client hears of the failure too, not a clean end
        return result, reset_seen

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        result, reset_seen = runner.run(main())
    assert "reset" in result.error.lower(), result
    assert reset_seen


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("name", ["quic", "h2", "tcp"])
def test_a_client_reset_while_the_destination_does_not_read_fails_the_flow(
    name: str, loop: str
) -> None:
    """The other way round: the destination reads nothing, so the copy to it waits and
    the stream's reading stops; the client then resets the flow. On TLS-over-TCP the
    flow's own connection had its reading paused, its reset went unheard, and the flow
    and its destination connection were held until the drain (a review)."""

    async def main() -> SpliceResult:
        destination_ended = asyncio.get_running_loop().create_future()

        async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await destination_ended  # reads nothing; held until the test ends
            writer.close()

        async with spliced_flow(name, destination) as (stream, spliced):
            try:  # until the sidecar's side stops taking bytes
                for _ in range(4096):
                    stream.write(bytes(1 << 16))
                    await asyncio.wait_for(stream.drain(), 2)
            except TimeoutError:
                pass
            await asyncio.sleep(0.2)  # the copy to the destination waiting, its stream paused
            stream.abort()
            result = await asyncio.wait_for(spliced, 10)
            destination_ended.set_result(None)
        return result

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        result = runner.run(main())
    assert result.error, result  # the flow failed, so both sides were reset
