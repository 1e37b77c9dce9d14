"""The native engine connection tells HTTP/3 whether the peer announced DATAGRAM support.

aioquic's H3Connection, which runs over every engine, refuses a peer's
SETTINGS_H3_DATAGRAM=1 with H3_SETTINGS_ERROR unless the QUIC connection saw the
peer's ``max_datagram_frame_size`` transport parameter (RFC 9297 2.1.1); it reads
``_remote_max_datagram_frame_size``. The native connection answered None whatever
the peer announced, so it closed every connection with qh3 (which announces both),
in both roles (found by the interop runner). quinn announces the parameter by
default, quicmesh's aioquic engine does not: a native peer gives a size, an
aioquic peer None.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted
from quic_helpers import CA, CLIENT, SERVER, require_engine, run

from quicmesh import QuicTransport
from quicmesh.transport.quic.engine import EngineTls


async def _echo(stream: Any) -> None:
    stream.write(await stream.read())
    stream.write_eof()


@pytest.mark.parametrize(("server_engine", "announced"), [("native", True), ("aioquic", False)])
def test_the_native_connection_reports_the_peers_datagram_parameter(
    server_engine: str, announced: bool
) -> None:
    require_engine("native")

    async def main() -> None:
        server = QuicTransport(identity=SERVER, trust=CA.trust_bundle, engine=server_engine)
        listener = await server.listen(("127.0.0.1", 0), _echo)
        client = QuicTransport(identity=CLIENT, trust=CA.trust_bundle, engine="native")
        woken = asyncio.Event()
        quic: Any = client.engine.connect(
            client.engine_limits(),
            EngineTls(identity=CLIENT, trust=CA.trust_bundle),
            listener.address,
            wake=woken.set,
        )
        if quic.conn < 0:  # not connected yet (on loopback it can be, already)
            assert quic._remote_max_datagram_frame_size is None
        while True:
            event = quic.next_event()
            if event is None:
                woken.clear()
                await woken.wait()
                continue
            assert not isinstance(event, ConnectionTerminated), event
            if isinstance(event, HandshakeCompleted):
                break
        size = quic._remote_max_datagram_frame_size
        if announced:
            assert size is not None and size >= 1000
        else:
            assert size is None
        quic.close()
        listener.close()
        await client.aclose()
        await server.aclose()

    run(main())
