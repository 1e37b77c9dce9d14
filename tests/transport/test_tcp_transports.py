"""Contract tests for the TLS-over-TCP transports (H2Transport, TcpTransport) on loopback sockets.

Each ``check_*`` function takes a transport class and runs on real sockets; the
tests below parametrise them over ``h2`` and ``tcp`` (QUIC can join the same
functions). Synchronisation is by events and futures only, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from cert_helpers import odd_leaf
from cryptography import x509
from quic_helpers import until

from quicmesh.errors import (
    ConnectError,
    ConnectionLost,
    InvalidTarget,
    PeerVerificationError,
    StreamRefused,
    StreamReset,
    TunnelError,
)
from quicmesh.tls import DevCA, Identity, TrustBundle
from quicmesh.transport import _tcp
from quicmesh.transport._tcp import MAX_HALF_OPEN_PER_SOURCE
from quicmesh.transport.base import Authorizer, PeerConnection, StreamHandler, Transport
from quicmesh.transport.h2 import H2Transport
from quicmesh.transport.stream import MeshStream
from quicmesh.transport.tcp import TcpTransport

TransportFactory = Callable[..., Transport]
CLIENT_ID = "spiffe://mesh.local/ns/default/sa/client"
SERVER_ID = "spiffe://mesh.local/ns/default/sa/server"
CHUNK = 64 * 1024


class Mesh:
    """A development CA with a client and a server identity, plus a stranger's CA."""

    def __init__(self) -> None:
        self.ca = DevCA()
        self.client = self.ca.issue(CLIENT_ID)
        self.server = self.ca.issue(SERVER_ID)
        self.stranger_ca = DevCA()


_MESH: Mesh | None = None


def mesh() -> Mesh:
    global _MESH
    if _MESH is None:
        _MESH = Mesh()
    return _MESH


def run(coro: Coroutine[Any, Any, None], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, timeout)

    asyncio.run(bounded())


@contextlib.asynccontextmanager
async def peers(
    make: TransportFactory,
    handler: StreamHandler,
    *,
    authorize: Authorizer | None = None,
    client_identity: Identity | None = None,
    **options: Any,
) -> AsyncIterator[PeerConnection]:
    m = mesh()
    server = make(identity=m.server, trust=m.ca.trust_bundle, **options)
    listener = await server.listen(("127.0.0.1", 0), handler, authorize)
    try:
        client = make(identity=client_identity or m.client, trust=m.ca.trust_bundle, **options)
        conn = await client.connect(listener.address)
        try:
            yield conn
        finally:
            conn.close()
            await conn.wait_closed()
    finally:
        listener.close()
        await listener.wait_closed()


async def echo(stream: MeshStream) -> None:
    while chunk := await stream.read(CHUNK):
        stream.write(chunk)
        await stream.drain()
    stream.write_eof()


async def send_and_receive(stream: MeshStream, payload: bytes) -> bytes:
    async def send() -> None:
        for offset in range(0, len(payload), CHUNK):
            stream.write(payload[offset : offset + CHUNK])
            await stream.drain()
        stream.write_eof()

    sender = asyncio.create_task(send())
    received = await stream.read()
    await sender
    return received


# -- the contract ----------------------------------------------------------------------


async def check_many_streams_echo(make: TransportFactory, count: int = 200) -> None:
    rng = random.Random(20240611)
    seen: dict[str, tuple[str, str]] = {}

    async def handler(stream: MeshStream) -> None:
        seen[stream.headers["x-request-id"]] = (stream.peer_identity, stream.target)
        await echo(stream)

    async with peers(make, handler) as conn:
        assert conn.peer_identity == SERVER_ID

        async def one(index: int) -> None:
            payload = rng.randbytes(rng.randrange(0, 256 * 1024))
            stream = await conn.open_stream(
                f"svc-{index}.default.svc:80", {"x-request-id": str(index)}
            )
            assert stream.peer_identity == SERVER_ID
            assert await send_and_receive(stream, payload) == payload
            await stream.wait_closed()

        await asyncio.gather(*(one(i) for i in range(count)))
        assert conn.stats()["streams_opened"] == count
        assert conn.active_streams == 0
    assert seen == {str(i): (CLIENT_ID, f"svc-{i}.default.svc:80") for i in range(count)}


async def check_half_close_client_first(make: TransportFactory) -> None:
    async def handler(stream: MeshStream) -> None:
        request = await stream.read()  # to the client's FIN
        assert stream.at_eof()
        stream.write(b"got " + request)
        stream.write_eof()

    async with peers(make, handler) as conn:
        stream = await conn.open_stream("a.svc:1")
        stream.write(b"question")
        stream.write_eof()
        assert await stream.read() == b"got question"
        assert stream.at_eof()
        await stream.wait_closed()


async def check_half_close_server_first(make: TransportFactory) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(stream: MeshStream) -> None:
        stream.write(b"banner")
        stream.write_eof()
        received.set_result(await stream.read())

    async with peers(make, handler) as conn:
        stream = await conn.open_stream("a.svc:1")
        assert await stream.read() == b"banner"
        assert stream.at_eof()
        for _ in range(4):  # the client's direction still flows after the server's FIN
            stream.write(b"x" * CHUNK)
            await stream.drain()
        stream.write_eof()
        assert await received == b"x" * (4 * CHUNK)
        await stream.wait_closed()


async def check_client_abort_resets_the_server(make: TransportFactory) -> None:
    outcome: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()
    got_data = asyncio.Event()

    async def handler(stream: MeshStream) -> None:
        await stream.readexactly(5)
        got_data.set()
        try:
            outcome.set_result(await stream.read())
        except TunnelError as exc:
            outcome.set_result(exc)
            raise

    async with peers(make, handler) as conn:
        stream = await conn.open_stream("a.svc:1")
        stream.write(b"hello")
        await got_data.wait()
        stream.abort()
        assert isinstance(await outcome, StreamReset)
        with pytest.raises(StreamReset):
            await stream.read()


async def check_server_abort_resets_the_client(make: TransportFactory) -> None:
    async def handler(stream: MeshStream) -> None:
        stream.write(b"partial")
        await stream.drain()
        await stream.readexactly(2)
        stream.abort()

    async with peers(make, handler) as conn:
        stream = await conn.open_stream("a.svc:1")
        assert await stream.readexactly(7) == b"partial"
        stream.write(b"go")
        with pytest.raises(StreamReset):
            await stream.read()
        # The connection (H2) or the transport (TCP) still carries other flows.
        other = await conn.open_stream("b.svc:1")
        other.write_eof()
        await other.readexactly(7)


async def check_stalled_reader_does_not_slow_others(
    make: TransportFactory, *, bound: int, others: int = 50
) -> None:
    release = asyncio.Event()

    async def handler(stream: MeshStream) -> None:
        if stream.target.startswith("stalled"):
            stream.accept()
            await release.wait()
            total = len(await stream.read())
            stream.write(str(total).encode())
            stream.write_eof()
        else:
            await echo(stream)

    async with peers(make, handler) as conn:
        stalled = await conn.open_stream("stalled.svc:1")
        written = 0
        stop = False

        async def writer() -> None:
            nonlocal written
            while not stop:
                stalled.write(b"s" * CHUNK)
                written += CHUNK
                if written > bound:
                    raise AssertionError(f"wrote {written} bytes to a stalled reader")
                await stalled.drain()
            stalled.write_eof()

        task = asyncio.create_task(writer())
        rng = random.Random(7)

        async def one(index: int) -> None:
            payload = rng.randbytes(CHUNK)
            stream = await conn.open_stream(f"svc-{index}.svc:80")
            assert await send_and_receive(stream, payload) == payload

        await asyncio.gather(*(one(i) for i in range(others)))
        # The writer must come to a stop: no progress over a full round trip
        # through both sides. Without backpressure it passes ``bound`` and fails.
        while True:
            before = written
            await send_and_receive(await conn.open_stream("ping.svc:1"), b".")
            assert not task.done(), "the stalled stream's writer should be waiting in drain()"
            if written == before:
                break
        unsent = stalled._channel.stream_unsent_bytes(stalled)
        assert unsent <= 64 * 1024 + CHUNK
        stop = True
        release.set()
        await task
        assert int(await stalled.read()) == written


async def check_untrusted_server(make: TransportFactory) -> None:
    m = mesh()
    impostor = m.stranger_ca.issue(SERVER_ID)
    listener = await make(identity=impostor, trust=m.ca.trust_bundle).listen(("127.0.0.1", 0), echo)
    try:
        client = make(identity=m.client, trust=m.ca.trust_bundle)
        with pytest.raises(PeerVerificationError, match="server certificate not trusted"):
            await client.connect(listener.address)
    finally:
        listener.close()
        await listener.wait_closed()


async def check_untrusted_client(make: TransportFactory) -> None:
    m = mesh()
    intruder = m.stranger_ca.issue(CLIENT_ID)
    with pytest.raises(PeerVerificationError, match="rejected our certificate"):
        async with peers(make, echo, client_identity=intruder):
            pass
    # A trusted client still gets through.
    async with peers(make, echo) as conn:
        stream = await conn.open_stream("a.svc:1")
        assert await send_and_receive(stream, b"ok") == b"ok"


async def check_authorize_refusal_is_403(make: TransportFactory) -> None:
    def authorize(peer: str, target: str) -> bool:
        assert peer == CLIENT_ID
        return not target.startswith("secret")

    async with peers(make, echo, authorize=authorize) as conn:
        with pytest.raises(StreamRefused) as refused:
            await conn.open_stream("secret.svc:443")
        assert refused.value.status == 403
        assert CLIENT_ID in refused.value.reason
        stream = await conn.open_stream("public.svc:80")
        assert await send_and_receive(stream, b"still fine") == b"still fine"


async def check_invalid_target_fails_locally(make: TransportFactory) -> None:
    async with peers(make, echo) as conn:
        with pytest.raises(InvalidTarget):
            await conn.open_stream("no-port")
        with pytest.raises(InvalidTarget):
            await conn.open_stream("a.svc:1", {"connection": "close"})


async def check_unreachable_peer(make: TransportFactory) -> None:
    m = mesh()
    listener = await make(identity=m.server, trust=m.ca.trust_bundle).listen(("127.0.0.1", 0), echo)
    address = listener.address
    listener.close()
    await listener.wait_closed()
    with pytest.raises(ConnectError, match="cannot connect"):
        await make(identity=m.client, trust=m.ca.trust_bundle).connect(address)


# -- run against each transport ------------------------------------------------------

TRANSPORTS: dict[str, TransportFactory] = {"h2": H2Transport, "tcp": TcpTransport}
STALLED_BOUND = {"h2": 2 * 1024 * 1024, "tcp": 32 * 1024 * 1024}
"""Bytes a writer may get ahead of a reader that stopped: the stream window (h2), or
the receive window plus the kernel's socket buffers (one TCP connection per flow)."""


@pytest.fixture(params=sorted(TRANSPORTS))
def transport_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


Check = Callable[[TransportFactory], Awaitable[None]]


@pytest.mark.parametrize(
    "check",
    [
        check_many_streams_echo,
        check_half_close_client_first,
        check_half_close_server_first,
        check_client_abort_resets_the_server,
        check_server_abort_resets_the_client,
        check_untrusted_server,
        check_untrusted_client,
        check_authorize_refusal_is_403,
        check_invalid_target_fails_locally,
        check_unreachable_peer,
    ],
    ids=lambda check: check.__name__.removeprefix("check_"),
)
def test_contract(transport_name: str, check: Check) -> None:
    async def main() -> None:
        await check(TRANSPORTS[transport_name])

    run(main())


def test_stalled_reader_does_not_slow_others(transport_name: str) -> None:
    async def main() -> None:
        await check_stalled_reader_does_not_slow_others(
            TRANSPORTS[transport_name], bound=STALLED_BOUND[transport_name]
        )

    run(main())


def test_a_tcp_connection_that_sends_no_request_is_closed() -> None:
    """The tcp transport carries one flow per connection: a client that completes the
    TLS handshake and sends no CONNECT is given the handshake's timeout for it, then
    closed (idle connections were held for ever, past every per-identity limit); one
    that sends its request in time is served."""
    from quicmesh.tls.context import client_ssl_context

    ca = DevCA()
    server_id = ca.issue("spiffe://mesh.local/ns/default/sa/server")
    client_id = ca.issue("spiffe://mesh.local/ns/default/sa/client")

    async def handler(stream: MeshStream) -> None:
        stream.accept()
        stream.write_eof()

    async def main() -> None:
        server = TcpTransport(identity=server_id, trust=ca.trust_bundle, handshake_timeout=0.5)
        listener = await server.listen(("127.0.0.1", 0), handler)
        context = client_ssl_context(client_id, ca.trust_bundle, ["http/1.1"])
        try:
            reader, writer = await asyncio.open_connection(
                *listener.address, ssl=context, server_hostname=None
            )
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
            writer.close()
            reader, writer = await asyncio.open_connection(
                *listener.address, ssl=context, server_hostname=None
            )
            writer.write(b"CONNECT a.svc:80 HTTP/1.1\r\nHost: a.svc:80\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            writer.close()
        finally:
            listener.close()
            await listener.wait_closed()

    asyncio.run(main())


def test_a_half_close_arriving_while_our_last_bytes_wait_still_gets_our_close_notify() -> None:
    """The peer's close_notify and TCP FIN came in after our session had handed out its
    last bytes but while the socket was still paused above its high-water mark (a slow
    reader): the FIN closed the connection at once, our close_notify was never sent, and
    the peer lost the flow ("peer closed the TCP connection without TLS close_notify";
    it failed the throughput benchmark once in CI). The reader here is a raw TLS client
    whose small socket buffers keep the server's write buffer full, and which sends its
    FIN only once the server has handed out everything."""
    import socket
    import ssl

    from quicmesh.tls.context import client_ssl_context

    size = 120 * 1024  # two hand-outs of at most 64 KiB: the second pauses the writer
    everything_handed_out: asyncio.Future[None] | None = None

    async def handler(stream: MeshStream) -> None:
        stream.write(b"x" * size)
        stream.write_eof()
        await stream.wait_sent()
        assert everything_handed_out is not None
        everything_handed_out.set_result(None)
        assert await stream.read(-1) == b""

    async def main() -> None:
        nonlocal everything_handed_out
        loop = asyncio.get_running_loop()
        everything_handed_out = loop.create_future()
        server = TcpTransport(identity=mesh().server, trust=mesh().ca.trust_bundle)
        listener = await server.listen(("127.0.0.1", 0), handler)
        # Small, fixed socket buffers (the accepted socket inherits the listener's).
        for listening in listener._server.sockets:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = client_ssl_context(mesh().client, mesh().ca.trust_bundle, ["http/1.1"])
        tls = context.wrap_bio(incoming, outgoing)

        async def send_pending() -> None:
            if data := outgoing.read():
                await loop.sock_sendall(sock, data)

        async def receive() -> bool:
            data = await loop.sock_recv(sock, 65536)
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()
            return bool(data)

        try:
            await loop.sock_connect(sock, listener.address)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await send_pending()
                    assert await receive(), "the server closed during the handshake"
            tls.write(b"CONNECT a.svc:80 HTTP/1.1\r\nHost: a.svc:80\r\n\r\n")
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.unwrap()  # our close_notify, right after the request
            await send_pending()
            await everything_handed_out
            sock.shutdown(socket.SHUT_WR)  # the FIN, once the server's writer is paused
            received = bytearray()
            while True:
                try:
                    received += tls.read(65536)
                    continue
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    break  # the server's close_notify: a clean end
                assert await receive(), (
                    f"the server closed without close_notify after {len(received)} bytes"
                )
            head, _, body = bytes(received).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert len(body) == size
        finally:
            sock.close()
            listener.close()
            await listener.wait_closed()

    run(main())


def test_a_dial_cancelled_at_any_point_leaves_no_unretrieved_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flow's dial cancelled inside ``create_connection`` (after the TCP connect,
    before it returned) was not abandoned: its reset later settled the dial's readiness
    with an error nobody read, which asyncio logged as "Future exception was never
    retrieved ... (it may not trust our certificate)"."""
    import gc

    async def handler(stream: MeshStream) -> None:
        await stream.read()

    async def main() -> None:
        server = TcpTransport(identity=mesh().server, trust=mesh().ca.trust_bundle)
        listener = await server.listen(("127.0.0.1", 0), handler)
        client = TcpTransport(identity=mesh().client, trust=mesh().ca.trust_bundle)
        conn = await client.connect(listener.address)
        first = await conn.open_stream("a.svc:80")  # takes the connection dialled first
        for turns in range(40):
            dial = asyncio.ensure_future(conn.open_stream("a.svc:80"))
            for _ in range(turns % 10):
                await asyncio.sleep(0)  # cancelled after a different number of steps
            dial.cancel()
            await asyncio.gather(dial, return_exceptions=True)
        first.abort()
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run(main())
        gc.collect()
    assert "never retrieved" not in caplog.text


@pytest.mark.parametrize("make", [TcpTransport, H2Transport], ids=["tcp", "h2"])
def test_a_new_flow_reads_no_tls_session(make: TransportFactory, monkeypatch: Any) -> None:
    """Reading ``SSLObject.session`` leaks a copy of the session on CPython before 3.12.7
    (python/cpython#116810, about 6 KB): read once per flow, memory grew without bound.
    Only a TCP peer connection's first dial, which waits for its session ticket, reads it;
    not the dial of each flow, nor an HTTP/2 connection's."""
    reads: list[ssl.SSLObject] = []
    session = ssl.SSLObject.session

    def counted(self: ssl.SSLObject) -> Any:
        reads.append(self)
        return session.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(ssl.SSLObject, "session", property(counted, session.fset))

    async def echo(stream: MeshStream) -> None:
        stream.write(await stream.read())
        stream.write_eof()

    async def flow(conn: PeerConnection) -> None:
        stream = await conn.open_stream("x.svc:80")
        stream.write(b"ping")
        stream.write_eof()
        assert await stream.read() == b"ping"

    async def main() -> None:
        m = mesh()
        server = make(identity=m.server, trust=m.ca.trust_bundle)
        client = make(identity=m.client, trust=m.ca.trust_bundle)
        listener = await server.listen(("127.0.0.1", 0), echo)
        conn = await client.connect(listener.address)
        first_dial = len(reads)
        for _ in range(10):
            await flow(conn)  # tcp: a connection of its own each
        for _ in range(10):
            other = await client.connect(listener.address)
            await flow(other)
            other.close()
            await other.wait_closed()
        per_connect = (len(reads) - first_dial) / 10
        assert per_connect == (first_dial if make is TcpTransport else 0)
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("make", [TcpTransport, H2Transport], ids=["tcp", "h2"])
def test_a_running_listener_takes_a_rotation_at_its_next_handshake(make: TransportFactory) -> None:
    """A rotated certificate is presented, and a CA taken out of the trust bundle refused,
    by a listener started before the change (its TLS context only gained roots before:
    a removed CA stayed trusted until a restart)."""
    m = mesh()
    other = m.stranger_ca
    both = TrustBundle([*m.ca.trust_bundle.certificates, *other.trust_bundle.certificates])
    renewed = m.ca.issue(SERVER_ID)
    presented: list[int] = []

    async def main() -> None:
        server = make(identity=m.server, trust=both)
        listener = await server.listen(("127.0.0.1", 0), echo)

        async def dial(identity: Identity) -> PeerConnection:
            return await make(identity=identity, trust=m.ca.trust_bundle).connect(
                listener.address, timeout=5
            )

        async def flow(conn: PeerConnection, payload: bytes) -> None:
            stream = await conn.open_stream("127.0.0.1:1")
            assert await send_and_receive(stream, payload) == payload

        def server_serial() -> int:
            # What the listener presents now, read by a client that trusts its CA.
            context = ssl.create_default_context(cadata=m.ca.trust_bundle.pem.decode())
            context.check_hostname = False
            context.load_cert_chain(*certificate_files)
            with (
                socket.create_connection(listener.address) as raw,
                context.wrap_socket(raw) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
            return x509.load_der_x509_certificate(der).serial_number

        stranger = await dial(other.issue(CLIENT_ID))  # trusted while the bundle has its CA
        await flow(stranger, b"before")
        presented.append(await asyncio.to_thread(server_serial))
        server.set_identity(renewed, m.ca.trust_bundle)
        with pytest.raises(PeerVerificationError):
            await dial(other.issue(CLIENT_ID))
        member = await dial(m.client)
        await flow(member, b"after")
        presented.append(await asyncio.to_thread(server_serial))
        if make is H2Transport:
            await flow(stranger, b"still")  # made before: carries on with its certificates
        else:
            # Every TCP flow is a connection of its own: a new handshake, refused now.
            with pytest.raises(TunnelError):
                await flow(stranger, b"refused")
        for conn in (stranger, member):
            conn.close()
            await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    with tempfile.TemporaryDirectory() as directory:
        certificate_files = (Path(directory) / "cert.pem", Path(directory) / "key.pem")
        certificate_files[0].write_bytes(m.client.cert_chain_pem())
        certificate_files[1].write_bytes(m.client.private_key_pem())
        run(main())
    assert presented == [m.server.certificate.serial_number, renewed.certificate.serial_number]


@pytest.mark.parametrize("make", [TcpTransport, H2Transport], ids=["tcp", "h2"])
def test_handshakes_under_way_are_bounded_per_source(make: TransportFactory) -> None:
    """Connections that never finish their TLS handshake held a descriptor each for the
    whole handshake timeout, without bound and without a certificate: the listener ran
    out of descriptors. At MAX_HALF_OPEN_PER_SOURCE under way from one address, the next
    connection from it is closed at once; other sources, and later connections once those
    end, are served."""
    m = mesh()

    async def main() -> None:
        server = make(identity=m.server, trust=m.ca.trust_bundle)
        listener = await server.listen(("127.0.0.1", 0), echo)
        loop = asyncio.get_running_loop()
        idle: list[socket.socket] = []
        try:
            for _ in range(MAX_HALF_OPEN_PER_SOURCE):
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, listener.address)
                idle.append(sock)
            extra = socket.socket()
            extra.setblocking(False)
            await loop.sock_connect(extra, listener.address)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(loop.sock_recv(extra, 100), 5) == b""
            extra.close()
            # Another source address is served meanwhile.
            other = await asyncio.to_thread(_tls_handshake_from, "127.0.0.2", listener.address)
            assert other == m.server.certificate.serial_number
        finally:
            for sock in idle:
                sock.close()
        # Once those connections ended, this source is served again.
        deadline = loop.time() + 10
        while True:
            try:
                conn = await make(identity=m.client, trust=m.ca.trust_bundle).connect(
                    listener.address, timeout=5
                )
                break
            except TunnelError:
                if loop.time() > deadline:
                    raise
        stream = await conn.open_stream("127.0.0.1:1")
        assert await send_and_receive(stream, b"after") == b"after"
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


def _tls_handshake_from(source: str, address: tuple[str, int]) -> int:
    """A mutual-TLS handshake from ``source``; the serial of the server's certificate."""
    m = mesh()
    context = ssl.create_default_context(cadata=m.ca.trust_bundle.pem.decode())
    context.check_hostname = False
    with tempfile.TemporaryDirectory() as directory:
        cert, key = Path(directory) / "c.pem", Path(directory) / "k.pem"
        cert.write_bytes(m.client.cert_chain_pem())
        key.write_bytes(m.client.private_key_pem())
        context.load_cert_chain(cert, key)
    with (
        socket.create_connection(address, timeout=5, source_address=(source, 0)) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_failed_incoming_handshakes_are_logged_within_a_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each failed incoming handshake wrote a line: a client opening connections and
    closing them at once wrote a megabyte of log in ten seconds. Past the burst they are
    counted, and the next line logged says how many were held back."""
    m = mesh()
    budget = _tcp._LogBudget(_tcp.HANDSHAKE_LOG_RATE, _tcp.HANDSHAKE_LOG_BURST)

    async def main() -> None:
        server = H2Transport(identity=m.server, trust=m.ca.trust_bundle)
        listener = await server.listen(("127.0.0.1", 0), echo)
        loop = asyncio.get_running_loop()
        for _ in range(3 * _tcp.HANDSHAKE_LOG_BURST):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, listener.address)
            await loop.sock_sendall(sock, b"\x16\x03\x01\x00\x05hello")  # not a ClientHello
            with contextlib.suppress(ConnectionResetError):
                await asyncio.wait_for(loop.sock_recv(sock, 100), 5)
            sock.close()
        await until(lambda: len(listener._protocols) == 0)  # type: ignore[attr-defined]
        listener.close()
        await listener.wait_closed()

    original = _tcp._handshake_log
    _tcp._handshake_log = budget
    try:
        with caplog.at_level(logging.INFO, logger="quicmesh.transport.tls"):
            run(main())
    finally:
        _tcp._handshake_log = original
    lines = [r.getMessage() for r in caplog.records if r.name == "quicmesh.transport.tls"]
    failed = [line for line in lines if "connection with client failed" in line]
    assert _tcp.HANDSHAKE_LOG_BURST <= len(failed) < 2 * _tcp.HANDSHAKE_LOG_BURST
    assert budget.held_back > 0 or any("not logged" in line for line in lines)


@pytest.mark.parametrize("transport_class", [H2Transport, TcpTransport])
def test_a_server_that_resets_during_the_handshake_is_not_blamed_on_our_certificate(
    transport_class: type[Transport],
) -> None:
    """Found by a review: a crashed peer (a reset mid-handshake) was counted as our
    certificate refused, and the endpoint marked so; a close without a word (how a
    quicmesh server refuses a certificate its SPIFFE checks refuse) still is."""
    from quicmesh.tls.check import handshake_failure_reason

    async def main(reset: bool) -> BaseException:
        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)  # the ClientHello began
            sock = writer.get_extra_info("socket")
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()

        listening = await asyncio.start_server(server, "127.0.0.1", 0)
        client = transport_class(identity=mesh().client, trust=mesh().ca.trust_bundle)
        with pytest.raises(ConnectError) as failed:
            await client.connect(listening.sockets[0].getsockname()[:2], timeout=5)
        listening.close()
        await listening.wait_closed()
        return failed.value

    reset = asyncio.run(main(reset=True))
    assert "reset" in str(reset) and handshake_failure_reason(reset) == ("other", "unknown")
    closed = asyncio.run(main(reset=False))
    assert handshake_failure_reason(closed) == ("our_certificate_refused", "ours")


# -- a review's findings (2026-12-07) -----------------------------------------------------


def test_a_burst_of_flows_past_the_peers_handshake_cap_all_open() -> None:
    """300 flows opened at once to one peer: the peer takes at most
    MAX_HALF_OPEN_PER_SOURCE handshakes from one address and resets the rest, and 23
    of them failed with ConnectError; a peer connection now dials at most half that
    many at once, the others wait."""
    count = 300
    assert count > MAX_HALF_OPEN_PER_SOURCE

    async def main() -> None:
        async with peers(TcpTransport, echo) as conn:
            payloads = [random.randbytes(64) for _ in range(count)]

            async def one(payload: bytes) -> bytes:
                stream = await conn.open_stream("reviews.default.svc:9080")
                return await send_and_receive(stream, payload)

            echoed = await asyncio.gather(*(one(p) for p in payloads))
            assert echoed == payloads

    run(main(), timeout=120)


def test_the_client_knows_the_certificate_its_tcp_peer_presented() -> None:
    """``peer_certificate`` was None on a TLS-over-TCP client (each flow has its own
    handshake), which api.md lists for every PeerConnection."""

    async def main() -> None:
        async with peers(TcpTransport, echo) as conn:
            assert conn.peer_certificate == mesh().server.certificate
            stream = await conn.open_stream("reviews.default.svc:9080")
            assert await send_and_receive(stream, b"x") == b"x"
            assert conn.peer_certificate == mesh().server.certificate

    run(main())


@pytest.mark.parametrize("make", [H2Transport, TcpTransport], ids=["h2", "tcp"])
def test_a_client_certificate_the_server_refuses_ends_the_connection(
    make: TransportFactory,
) -> None:
    """A client certificate the server refuses for its SPIFFE ID (no URI SAN) after the
    TLS handshake: ``ConnectionLost`` at the connect, as api.md says, naming what the
    client saw (on TLS-over-TCP until 2026-12-07 at the first stream: the server's
    session ticket, which its connect waits for, went out before the check)."""
    m = mesh()
    nameless = odd_leaf(m.ca, [])

    async def main() -> None:
        server = make(identity=m.server, trust=m.ca.trust_bundle)
        listener = await server.listen(("127.0.0.1", 0), echo)
        client = make(identity=nameless, trust=m.ca.trust_bundle)
        try:
            with pytest.raises(ConnectionLost, match="without TLS close_notify"):
                await client.connect(listener.address)
        finally:
            listener.close()
            await listener.wait_closed()

    run(main())
