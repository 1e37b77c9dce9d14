"""0-RTT on the native engine: single-use tickets bound to the client's identity.

A client endpoint with ``early_data=True`` keeps the server's session tickets and
sends its next connection's first streams as 0-RTT; the server serves a resumed
client at once under the identity its ticket recorded. A ticket resumes once, so
a replayed first flight is not delivered a second time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from quicmesh.errors import PeerVerificationError
from quicmesh.transport.native import NativeConnection

from .test_native_engine import CLIENT, SERVER, client_endpoint, run, server_endpoint, wait_for


async def round_trip(connection: NativeConnection, accepted: NativeConnection) -> None:
    """One request and answer (the server's tickets travel right after its handshake)."""
    stream = await connection.open_stream()
    stream.write(b"hello")
    stream.finish()
    peer = await accepted.accept_stream()
    assert await peer.read_all() == b"hello"
    peer.finish()
    assert await stream.read_all() == b""


def test_a_resumed_connection_sends_0rtt_under_the_ticket_identities() -> None:
    async def main() -> None:
        server = await server_endpoint(early_data=True)
        async with server, await client_endpoint(early_data=True) as client:
            first = await client.connect(*server.address)
            accepted = await server.accept()
            assert first.early_data is None and not accepted.resumed
            await round_trip(first, accepted)
            first.close()

            second = await client.connect(*server.address)
            # (on loopback the server's answer can be in before this line runs)
            assert second.early_data in ("attempted", "accepted")
            stream = await second.open_stream()
            stream.write(b"sent in 0-RTT")
            stream.finish()
            resumed = await server.accept()
            assert resumed.resumed and resumed.peer_identity == CLIENT.spiffe_id
            peer = await resumed.accept_stream()
            assert await peer.read_all() == b"sent in 0-RTT"
            await wait_for(lambda: second.early_data == "accepted", "the server's answer")
            assert second.peer_identity == SERVER.spiffe_id  # as verified for the ticket

            # A ticket resumes only under the checks it was issued under: other allowed
            # identities mean a full handshake, which verifies them.
            with pytest.raises(PeerVerificationError, match="not one of the allowed"):
                await client.connect(
                    *server.address, allowed=["spiffe://mesh.local/ns/default/sa/other"]
                )

    run(main())


def test_without_early_data_nothing_resumes() -> None:
    async def main() -> None:
        async with await server_endpoint() as server, await client_endpoint() as client:
            for _ in range(2):
                connection = await client.connect(*server.address)
                accepted = await server.accept()
                assert connection.early_data is None and not accepted.resumed
                await round_trip(connection, accepted)
                connection.close()

    run(main())


class _Relay(asyncio.DatagramProtocol):
    """Forwards UDP between one client and the server, recording what the client sends."""

    def __init__(self, towards_server: Any) -> None:
        self.towards_server = towards_server
        self.transport: Any = None
        self.client: Any = None
        self.recorded: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client = addr
        self.recorded.append(data)
        self.towards_server.transport.sendto(data)


class _Back(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.relay: _Relay | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.relay is not None and self.relay.client is not None:
            self.relay.transport.sendto(data, self.relay.client)


def test_a_replayed_0rtt_flight_is_delivered_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await server_endpoint(early_data=True)
        async with server, await client_endpoint(early_data=True) as client:
            first = await client.connect(*server.address)
            await round_trip(first, await server.accept())
            first.close()

            # The resumed connection goes through a relay that records the client's datagrams.
            back_transport, back = await loop.create_datagram_endpoint(
                _Back, remote_addr=server.address
            )
            relay_transport, relay = await loop.create_datagram_endpoint(
                lambda: _Relay(back), local_addr=("127.0.0.1", 0)
            )
            back.relay = relay
            try:
                second = await client.connect(*relay_transport.get_extra_info("sockname")[:2])
                assert second.early_data == "attempted"
                stream = await second.open_stream()
                stream.write(b"pay once")
                stream.finish()
                resumed = await server.accept()
                peer = await resumed.accept_stream()
                assert await peer.read_all() == b"pay once"
                await wait_for(lambda: second.early_data == "accepted", "the server's answer")
                second.close()
                await resumed.wait_closed()
            finally:
                relay_transport.close()
                back_transport.close()

            # An attacker replays the whole recorded flight from another address: its ticket
            # was used up, so the server cannot resume (nor decrypt the 0-RTT data), and the
            # full handshake it answers with cannot be completed without the client's key.
            replay_transport, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=server.address
            )
            try:
                for datagram in relay.recorded:
                    replay_transport.sendto(datagram)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(server.accept(), 2.0)
            finally:
                replay_transport.close()

    run(main())


@pytest.mark.parametrize("attempt", range(3))
def test_a_rejected_flight_is_not_resent_to_another_server_behind_the_address(
    attempt: int,
) -> None:
    """A client resumes (0-RTT) to an address where another mesh identity now listens: its
    flight is rejected and the handshake goes on as a full one with that server. The
    engine wrote the rejected flight again at once, before quicmesh checked the identity,
    so the other server's handler could get the bytes (3 of 12 runs, a review found); it
    is written again only to the server its ticket came from. (A stream opened after
    quinn took the rejection and before Python heard of it can still reach the other
    server: docs/api.md.) Timing-bound: three attempts, each a fresh pair."""
    from quicmesh.errors import TunnelError
    from tests.quic_helpers import CA, Recorder, client_transport, server_transport

    impostor_saw = Recorder()

    async def main() -> None:
        client = client_transport(engine="native")
        listener = await server_transport(engine="native").listen(("127.0.0.1", 0), Recorder())
        address = listener.address
        conn = await client.connect(address)
        stream = await conn.open_stream("a.svc:1")
        stream.write_eof()
        await stream.read()
        # The ticket arrives after the first answer; the native client's tickets are not
        # visible from Python, so time is given (50 ms was short once CI was busy: no
        # ticket yet, so no 0-RTT attempt, in two clean-clone runs of the same day).
        await asyncio.sleep(0.5)
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
        impostor = server_transport(
            CA.issue("spiffe://mesh.local/ns/default/sa/other"), engine="native"
        )
        impostor_listener = await impostor.listen(address, impostor_saw)
        conn = await client.connect(address, early_data=True)
        assert conn.early_data == "attempted"
        with pytest.raises(TunnelError, match="ticket was issued by"):
            # (The refusal may beat the open: the handshake is that quick on loopback.)
            stream = await conn.open_stream("a.svc:1", wait_response=False)
            stream.write(b"secret")
            stream.write_eof()
            await asyncio.wait_for(stream.read(), 10)
        assert conn.is_closed
        assert conn.quic.resend_early_data(0) == 0  # the flight was not written again
        await conn.wait_closed()
        impostor_listener.close()
        await impostor_listener.wait_closed()

    run(main())
