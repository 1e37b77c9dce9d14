"""splice() between a MeshStream and real TCP sockets, and the CLI's error handling."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import struct

import pytest

import quicmesh
from quicmesh import DevCA, MeshStream, splice
from quicmesh.cli import main

CA = DevCA()
CLIENT = CA.issue("spiffe://mesh.local/ns/default/sa/client")
SERVER = CA.issue("spiffe://mesh.local/ns/default/sa/server")


class Tunnel:
    """The two sidecars of a test, and how to tear them down without leaking sockets."""

    def __init__(
        self, listener: quicmesh.Listener, peer: quicmesh.PeerConnection, server: asyncio.Server
    ) -> None:
        self.listener, self.peer, self.server = listener, peer, server
        self.port: int = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        self.peer.close()
        await self.peer.wait_closed()
        self.listener.close()
        await self.listener.wait_closed()


async def _tunnel_to_app(name: str, app_port: int) -> Tunnel:
    """Sidecar B (inbound, splices to the app) and A (TCP listener, splices into the tunnel)."""

    async def inbound(stream: MeshStream) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", app_port)
        await splice(stream, reader, writer)

    transport = quicmesh.TRANSPORTS[name]
    listener = await transport(identity=SERVER, trust=CA.trust_bundle).listen(
        ("127.0.0.1", 0), inbound
    )
    peer = await transport(identity=CLIENT, trust=CA.trust_bundle).connect(listener.address)

    async def outbound(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = await peer.open_stream(f"app.local:{app_port}")
        await splice(stream, reader, writer)

    server = await asyncio.start_server(outbound, "127.0.0.1", 0)
    return Tunnel(listener, peer, server)


@pytest.mark.parametrize("name", ["quic", "h2", "tcp"])
def test_splice_carries_both_directions_with_half_close(name: str) -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # the client's half-close reaches the app
        writer.write(hashlib.sha256(request).digest() + request[::-1])
        writer.write_eof()
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def run() -> None:
        app_server = await asyncio.start_server(app, "127.0.0.1", 0)
        tunnel = await _tunnel_to_app(name, app_server.sockets[0].getsockname()[1])
        port = tunnel.port

        async def flow(seed: int) -> None:
            payload = random.Random(seed).randbytes(random.Random(seed).randint(0, 300_000))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            writer.write_eof()
            answer = await reader.read()
            writer.close()
            await writer.wait_closed()
            assert answer == hashlib.sha256(payload).digest() + payload[::-1]

        await asyncio.gather(*(flow(seed) for seed in range(20)))
        await tunnel.close()
        app_server.close()
        await app_server.wait_closed()

    asyncio.run(asyncio.wait_for(run(), 60))


@pytest.mark.parametrize("name", ["quic", "h2"])
def test_app_reset_resets_the_client_flow(name: str) -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # the app crashes mid-flow: TCP RST
        await writer.wait_closed()

    async def run() -> None:
        app_server = await asyncio.start_server(app, "127.0.0.1", 0)
        tunnel = await _tunnel_to_app(name, app_server.sockets[0].getsockname()[1])
        port = tunnel.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        await writer.drain()
        # The local client must not mistake the failed flow for a complete one: EOF
        # without data would look like success, so the sidecar resets instead.
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        await tunnel.close()
        app_server.close()
        await app_server.wait_closed()

    asyncio.run(asyncio.wait_for(run(), 60))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "nonsense"], "unknown benchmark 'nonsense'"),
        (["demo", "--flows", "0"], "--flows and --size must be positive"),
        (["demo", "--transport", "carrier-pigeon"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
