"""Shared test helpers: identities, servers, waiting (in the loop, for processes), packets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from quicmesh import DevCA, MeshStream, QuicTransport

CA = DevCA()
CLIENT = CA.issue("spiffe://mesh.local/ns/default/sa/client")
SERVER = CA.issue("spiffe://mesh.local/ns/default/sa/server")
TARGET = "reviews.default.svc:9080"


T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


# These tests look at first flights packet by packet (how much 0-RTT leaves before the
# handshake, which datagrams carry it), so they pin the congestion controller instead of
# taking the host's default: Cubic sends its initial window as one burst, BBR paces it.
PINNED_CONGESTION_CONTROL = "cubic"


def client_transport(**kwargs: Any) -> QuicTransport:
    kwargs.setdefault("congestion_control", PINNED_CONGESTION_CONTROL)
    return QuicTransport(identity=CLIENT, trust=CA.trust_bundle, **kwargs)


def server_transport(identity: Any = SERVER, **kwargs: Any) -> QuicTransport:
    kwargs.setdefault("congestion_control", PINNED_CONGESTION_CONTROL)
    return QuicTransport(identity=identity, trust=CA.trust_bundle, **kwargs)


class Recorder:
    """A server handler that echoes and records what each stream delivered, by request ID."""

    def __init__(self) -> None:
        self.received: dict[str, list[bytes]] = {}

    async def __call__(self, stream: MeshStream) -> None:
        request_id = stream.headers.get("x-request-id", "")
        chunks = []
        while data := await stream.read(65536):
            chunks.append(data)
            stream.write(data)
            await stream.drain()
        self.received.setdefault(request_id, []).append(b"".join(chunks))
        stream.write_eof()


async def flows_through(
    handler: Callable[[MeshStream], Awaitable[None]],
    uploads: list[bytes],
    *,
    wait_response: bool = False,
    server: QuicTransport | None = None,
) -> list[bytes]:
    """Each upload as a flow of its own (CONNECT, the upload and FIN), all at once, over
    one native connection to a listener of ``server`` (default: a native
    :func:`server_transport`) serving ``handler``; what came back on each."""
    server = server or server_transport(engine="native")
    listener = await server.listen(("127.0.0.1", 0), handler)
    conn = await client_transport(engine="native").connect(listener.address)

    async def flow(upload: bytes) -> bytes:
        stream = await conn.open_stream(TARGET, wait_response=wait_response)
        stream.write(upload)
        stream.write_eof()
        return bytes(await asyncio.wait_for(stream.read(), 20))

    try:
        return list(await asyncio.gather(*(flow(upload) for upload in uploads)))
    finally:
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()


def poll_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (another process's state) until it holds; fail, saying ``what``
    was expected, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s")
        time.sleep(0.05)  # polling a condition of other processes, bounded by the deadline


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds (checked after each turn of the event loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def only_connection(listener: Any) -> Any:
    """The one connection ``listener`` accepted, once it has: a client's ``connect()``
    returns when its own handshake completes, and the server completes its side when
    the client's Finished arrives, so right after ``connect()`` the listener may not
    know the connection yet (a CI run under load found it empty)."""
    await until(lambda: bool(listener.connections))
    (accepted,) = listener.connections
    return accepted


async def exchange(conn: Any, payload: bytes, request_id: str = "x", **kwargs: Any) -> bytes:
    """Open a stream, send ``payload`` and half-close, return what came back."""
    stream = await conn.open_stream(TARGET, headers={"x-request-id": request_id}, **kwargs)
    stream.write(payload)
    stream.write_eof()
    data: bytes = await stream.read()
    return data


async def round_trip(stream: Any, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send ``payload`` on an open stream (an echo's), half-close it, return what came
    back."""
    stream.write(payload)
    stream.write_eof()
    data: bytes = await asyncio.wait_for(stream.read(), timeout)
    return data


async def close_both(connection: Any, listener: Any) -> None:
    """Close a test's connection, then its listener, waiting for each to be closed."""
    connection.close()
    await connection.wait_closed()
    listener.close()
    await listener.wait_closed()


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    length = 1 << (data[pos] >> 6)
    value = data[pos] & 0x3F
    for byte in data[pos + 1 : pos + length]:
        value = (value << 8) | byte
    return value, pos + length


LONG_HEADER_TYPES = {0: "initial", 1: "0rtt", 2: "handshake", 3: "retry"}


def packet_types(datagram: bytes) -> list[tuple[str, int]]:
    """The QUIC v1 packets coalesced in a datagram: (type, length) for each."""
    result = []
    pos = 0
    while pos < len(datagram):
        first = datagram[pos]
        if not first & 0x80:
            result.append(("1rtt", len(datagram) - pos))
            break
        kind = LONG_HEADER_TYPES[(first & 0x30) >> 4]
        cursor = pos + 5
        cursor += 1 + datagram[cursor]  # destination CID
        cursor += 1 + datagram[cursor]  # source CID
        if kind == "initial":
            token_length, cursor = _varint(datagram, cursor)
            cursor += token_length
        if kind == "retry":
            result.append((kind, len(datagram) - pos))
            break
        length, cursor = _varint(datagram, cursor)
        result.append((kind, cursor + length - pos))
        pos = cursor + length
    return result


def first_flight(datagrams: list[bytes], count: int = 3) -> list[bytes]:
    """The first ``count`` datagrams from the first one carrying an Initial: what a
    client sent to open a connection, without the 1-RTT packets of the one it used
    before that were still on their way (a closed connection answers a late packet of
    its peer, e.g. a path MTU probe, with its CONNECTION_CLOSE)."""
    for index, datagram in enumerate(datagrams):
        if any(kind == "initial" for kind, _ in packet_types(datagram)):
            return datagrams[index : index + count]
    return []


def zero_rtt_bytes(datagrams: list[bytes]) -> int:
    """Bytes of 0-RTT packets in ``datagrams``."""
    return sum(size for d in datagrams for kind, size in packet_types(d) if kind == "0rtt")


# -- engines -------------------------------------------------------------------------

QUIC_ENGINES = ["aioquic", "native"]
"""The QUIC engines the engine-parametrised tests run on."""

NATIVE_MISSING = (
    "the native QUIC extension quicmesh._native is not built "
    "(pip install -e . on a machine with Rust and cargo builds it)"
)


def require_engine(engine: str) -> None:
    """Skip a native-engine case where the extension is not built (with the reason);
    fail it instead under ``QUICMESH_REQUIRE_NATIVE=1`` (CI), as tests/native does."""
    import os

    import pytest

    from quicmesh.transport.quic.native_engine import native_available

    if engine != "native" or native_available():
        return
    if os.environ.get("QUICMESH_REQUIRE_NATIVE") == "1":
        pytest.fail(f"{NATIVE_MISSING}; QUICMESH_REQUIRE_NATIVE=1 requires it")
    pytest.skip(NATIVE_MISSING)


async def tcp_pair() -> tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter]:
    """A connected loopback TCP pair: a plain socket (to hand over) and a stream end."""
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock = socket.create_connection(("127.0.0.1", port))
    reader, writer = await accepted
    server.close()
    return sock, reader, writer
