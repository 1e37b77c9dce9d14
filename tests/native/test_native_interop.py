"""The native engine (quinn + rustls) against aioquic, both ways, on raw QUIC streams.

Both sides use quicmesh's development CA and a shared ALPN; each verifies the other. The
aioquic side checks the native peer with :func:`quicmesh.tls.verify_peer` (aioquic's own
client-side check wants a DNS name matching the server name, and quicmesh's certificates
carry only a SPIFFE URI, so its ``connect()`` helper runs with ``CERT_NONE`` here).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, QuicEvent, StreamDataReceived

from quicmesh import _aioquic
from quicmesh._aioquic import MeshQuicConnection
from quicmesh.tls import verify_peer
from quicmesh.transport.native import NativeEndpoint
from quicmesh.transport.quic.server import MeshQuicServer

from .test_native_engine import CA, CLIENT, SERVER, echo, run

ALPN = "quicmesh-interop"


def _configuration(identity: Any, *, is_client: bool) -> QuicConfiguration:
    return QuicConfiguration(
        alpn_protocols=[ALPN],
        is_client=is_client,
        cadata=CA.trust_bundle.pem,
        certificate=identity.certificate,
        certificate_chain=identity.chain,
        private_key=identity.private_key,
        server_name=None,
    )


class EchoProtocol(QuicConnectionProtocol):
    """An aioquic server connection that echoes every stream and records the client's ID."""

    identities: list[str]

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            certificate, chain = _aioquic.peer_certificate(self._quic)
            assert certificate is not None
            self.identities.append(verify_peer(certificate, chain, CA.trust_bundle))
        elif isinstance(event, StreamDataReceived):
            self._quic.send_stream_data(event.stream_id, event.data, event.end_stream)
            self.transmit()


def test_native_client_and_aioquic_server() -> None:
    payload = os.urandom(300_000)
    identities: list[str] = []
    configuration = _configuration(SERVER, is_client=False)

    def create_protocol(quic: Any, **kwargs: Any) -> EchoProtocol:
        protocol = EchoProtocol(quic, **kwargs)
        protocol.identities = identities
        return protocol

    def accept(
        original_cid: bytes | None, retry_source_cid: bytes | None
    ) -> tuple[MeshQuicConnection, EchoProtocol]:
        # quicmesh's aioquic connection, asking for the client's certificate.
        quic = MeshQuicConnection(
            configuration=configuration,
            original_destination_connection_id=original_cid,
            retry_source_connection_id=retry_source_cid,
            request_client_certificate=True,
        )
        return quic, create_protocol(quic)

    async def main() -> None:
        transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: MeshQuicServer(configuration=configuration, accept=accept),
            local_addr=("127.0.0.1", 0),
        )
        try:
            port = transport.get_extra_info("sockname")[1]
            async with await NativeEndpoint.bind(
                "127.0.0.1", 0, CLIENT, CA.trust_bundle, alpn=[ALPN]
            ) as client:
                connection = await client.connect("127.0.0.1", port)
                assert connection.peer_identity == SERVER.spiffe_id
                stream = await connection.open_stream()
                stream.write(payload)
                stream.finish()
                assert await stream.read_all() == payload
                assert identities == [CLIENT.spiffe_id]
        finally:
            server.close()


def test_aioquic_client_and_native_server() -> None:
    payload = os.urandom(300_000)

    async def main() -> None:
        async with await NativeEndpoint.bind(
            "127.0.0.1", 0, SERVER, CA.trust_bundle, server=True, alpn=[ALPN]
        ) as server:

            async def serve_one() -> str:
                connection = await server.accept()
                await echo(await connection.accept_stream())
                return connection.peer_identity

            serving = asyncio.create_task(serve_one())
            configuration = _configuration(CLIENT, is_client=True)
            configuration.verify_mode = ssl.CERT_NONE
            async with connect(*server.address, configuration=configuration) as client:
                reader, writer = await client.create_stream()
                writer.write(payload)
                writer.write_eof()
                assert await reader.read() == payload
                certificate, chain = _aioquic.peer_certificate(client._quic)
                assert certificate is not None
                assert verify_peer(certificate, chain, CA.trust_bundle) == SERVER.spiffe_id
            assert await serving == CLIENT.spiffe_id

    run(main())
