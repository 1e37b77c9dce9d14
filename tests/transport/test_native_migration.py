"""The native engine reads its old socket after an active migration.

Until a packet from the client's new address reaches the server, the server keeps
sending to the old one, so the client reads its old socket for a while
(``OLD_SOCKET_GRACE``, as on aioquic). quinn's endpoint read it only until one receive
cycle's time budget ran out with datagrams still waiting, and nothing woke it for that
socket again (native/src/rebind.rs): a burst on the old path stayed unread, then was
dropped with the socket when the server's first packet reached the new one. Here the
relay holds the server's datagrams to the old address and delivers them in one burst
while the new address is cut off (so that nothing else wakes the client's endpoint):
every one must be read. What is checked is a count, not a time.
"""

from __future__ import annotations

import contextlib

from quic_helpers import SERVER, TARGET, run, until
from test_quic_engines import transport

from quicmesh import MeshStream, TunnelError
from quicmesh.bench.relay import UdpRelay

BURST = 48
"""Datagrams held for the old address: more than one of quinn's receive batches (32)."""
WARM_UP = 4 << 20
"""Bytes downloaded first, so that the server has more than ``BURST`` datagrams in flight."""


async def download(stream: MeshStream) -> None:
    """Server: send until the client goes away."""
    block = bytes(16 * 1024)
    with contextlib.suppress(TunnelError):  # the client closed: the test is over
        while True:
            stream.write(block)
            await stream.drain()


def test_a_burst_on_the_old_path_after_migrate_is_read() -> None:
    # The server is native too: quinn's congestion window after the warm-up holds more
    # than BURST datagrams (aioquic's, after its losses on loopback, not always). Neither
    # side may give up on the other while nothing is acknowledged during the hold. The
    # datagrams stay small (no path MTU discovery: on loopback it raises them to 6550
    # bytes, and the window would hold fewer than BURST).
    async def main() -> None:
        options = {"max_probe_timeouts": None, "mtu_discovery": False}
        server = transport("native", SERVER, **options)
        listener = await server.listen(("127.0.0.1", 0), download)
        relay = await UdpRelay(listener.address).start()
        conn = await transport("native", **options).connect(relay.address)
        try:
            stream = await conn.open_stream(TARGET)
            received = 0
            while received < WARM_UP:  # the server's congestion window grows
                received += len(await stream.read(65536))
            old = ("127.0.0.1", conn.local_address[1])
            relay.hold(old)
            await conn.migrate()
            # The relay has not run since: the PING quinn sent from the new port is
            # still unread, and is dropped with what follows.
            relay.blackholed.add(("127.0.0.1", conn.local_address[1]))
            await until(lambda: len(relay.held[old]) >= BURST)
            before = conn.stats()["packets_received"]
            released = relay.release(old)
            await until(lambda: conn.stats()["packets_received"] >= before + released)
            (accepted,) = listener.connections
            upstream = relay.upstream_address(old)
            assert upstream is not None
            assert accepted.stats()["path"][1] == upstream[1]  # the server never moved
        finally:
            conn.close()
            await conn.wait_closed()
            relay.close()
            listener.close()
            await listener.wait_closed()

    run(main())
