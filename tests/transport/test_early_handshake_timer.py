"""A 0-RTT connection's handshake timer goes with its handshake or its end."""

from __future__ import annotations

import gc

import pytest
from quic_helpers import CA, CLIENT, SERVER, exchange, require_engine, run

from quicmesh import QuicTransport
from quicmesh.transport.quic.connection import QuicPeerConnection


@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_closed_zero_rtt_connections_are_not_kept_for_the_connect_timeout(engine: str) -> None:
    """Each 0-RTT connection armed a timer for the connect timeout (to fail a handshake
    that never completes) and left it armed once the handshake was done: every closed
    0-RTT connection stayed in memory that long (a soak review: 800 after 800
    reconnects, 10 s each)."""
    require_engine(engine)

    async def main() -> int:
        server = QuicTransport(identity=SERVER, trust=CA.trust_bundle, engine=engine)
        listener = await server.listen(("127.0.0.1", 0), _echo)
        client = QuicTransport(identity=CLIENT, trust=CA.trust_bundle, engine=engine)
        first = await client.connect(listener.address)
        assert await exchange(first, b"prime", "prime") == b"prime"
        first.close()
        await first.wait_closed()
        del first
        for _ in range(20):
            connection = await client.connect(listener.address, early_data=True, timeout=60)
            assert await exchange(connection, b"x", "again") == b"x"
            await connection.handshake_finished
            connection.close()
            await connection.wait_closed()
        del connection
        gc.collect()
        alive = sum(isinstance(o, QuicPeerConnection) and o.is_client for o in gc.get_objects())
        listener.close()
        await listener.wait_closed()
        await client.aclose()
        return alive

    assert run(main()) <= 2  # (the last one or two may be in the middle of their end)


async def _echo(stream: object) -> None:
    while data := await stream.read(65536):  # type: ignore[attr-defined]
        stream.write(data)  # type: ignore[attr-defined]
    stream.write_eof()  # type: ignore[attr-defined]
