"""The UDP relay of the migration benchmark and tests: its NAT-like mapping, its hold."""

from __future__ import annotations

import asyncio
import socket

from quic_helpers import run, until

from quicmesh.bench.relay import UdpRelay


class _Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, (addr[0], addr[1])))


def test_a_burst_from_a_new_client_leaves_from_one_port_in_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server_transport, server = await loop.create_datagram_endpoint(
            _Sink, local_addr=("127.0.0.1", 0)
        )
        relay = await UdpRelay(server_transport.get_extra_info("sockname")).start()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        try:
            # All sent before the relay runs: each arrives while the upstream opens.
            for index in range(20):
                client.sendto(b"%d" % index, relay.address)
            await until(lambda: len(server.received) == 20)
            assert [data for data, _ in server.received] == [b"%d" % i for i in range(20)]
            assert len({source for _, source in server.received}) == 1
            assert relay.upstream_address(client.getsockname()) == server.received[0][1]
        finally:
            client.close()
            relay.close()
            server_transport.close()

    run(main())


def test_held_datagrams_come_in_one_burst_on_release() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server_transport, _ = await loop.create_datagram_endpoint(
            _Sink, local_addr=("127.0.0.1", 0)
        )
        relay = await UdpRelay(server_transport.get_extra_info("sockname")).start()
        client_transport, client = await loop.create_datagram_endpoint(
            _Sink, local_addr=("127.0.0.1", 0)
        )
        me = client_transport.get_extra_info("sockname")[:2]
        try:
            client_transport.sendto(b"hello", relay.address)
            await until(lambda: relay.upstream_address(me) is not None)
            upstream = relay.upstream_address(me)
            assert upstream is not None
            relay.hold(me)
            for index in range(5):
                server_transport.sendto(b"%d" % index, upstream)
            await until(lambda: len(relay.held[me]) == 5)
            assert client.received == []
            assert relay.release(me) == 5
            await until(lambda: len(client.received) == 5)
            assert [data for data, _ in client.received] == [b"%d" % i for i in range(5)]
            server_transport.sendto(b"after", upstream)  # relayed as usual again
            await until(lambda: len(client.received) == 6)
        finally:
            client_transport.close()
            relay.close()
            server_transport.close()

    run(main())
