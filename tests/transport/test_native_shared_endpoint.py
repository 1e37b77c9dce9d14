"""A native client endpoint carries many connections; opening one must not strand the
others' events.

A new connection drains the endpoint's events at once (a resumed one is reported in the
same call), and with them those of the endpoint's other connections, and the wake-up
that would have made the event loop hand them over. The connections they were routed to
are woken for them once the new connection is made.
"""

from __future__ import annotations

import asyncio
import select
from typing import Any

from quic_helpers import TARGET, client_transport, require_engine, run, server_transport

from quicmesh.transport.stream import MeshStream


def test_a_new_connection_leaves_no_event_of_another_unread() -> None:
    """The server answers a flow; the client's engine queues the answer's bytes, and
    before the event loop takes them (it is held on the endpoint's wake-up descriptor
    until they are queued) the same client connects a second time: the first flow
    still reads its answer."""
    require_engine("native")
    server_wrote = asyncio.Event()

    async def handler(stream: MeshStream) -> None:
        stream.accept()
        await stream.read(2)
        stream.write(b"pong")
        server_wrote.set()
        await stream.read()

    async def main() -> bytes:
        client = client_transport(engine="native")
        listener = await server_transport(engine="native").listen(("127.0.0.1", 0), handler)
        first = await client.connect(listener.address)
        stream = await first.open_stream(TARGET)
        stream.write(b"go")
        await server_wrote.wait()
        pumps: Any = client.engine._clients.values()  # type: ignore[attr-defined]
        (pump,) = pumps
        # Hold the loop until the client's engine has queued an event (the answer): the
        # pump that would hand it to the first connection does not run before the connect.
        readable, _, _ = select.select([pump.endpoint.fileno()], [], [], 10)
        assert readable
        second = await client.connect(listener.address)
        try:
            return await asyncio.wait_for(stream.read(4), 5)
        finally:
            stream.write_eof()
            for connection in (first, second):
                connection.close()
                await connection.wait_closed()
            listener.close()
            await listener.wait_closed()

    assert run(main()) == b"pong"
