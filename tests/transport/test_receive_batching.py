"""Receive batching: every datagram waiting on a socket is read per readiness
event, and each connection transmits once per batch (quicmesh.transport._udp)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import time
from typing import Any

import pytest

from quicmesh import DevCA, MeshStream
from quicmesh.errors import ConfigError
from quicmesh.transport import _udp
from quicmesh.transport.quic import QuicPeerConnection, QuicTransport

CA = DevCA()
CLIENT = CA.issue("spiffe://mesh.local/ns/default/sa/client")
SERVER = CA.issue("spiffe://mesh.local/ns/default/sa/server")
TARGET = "bulk.default.svc:9000"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


class _Recorder(asyncio.DatagramProtocol):
    """A socket's protocol that records datagrams and transmits through a BatchReader."""

    def __init__(self, max_datagrams: int) -> None:
        self.max_datagrams = max_datagrams
        self.received: list[bytes] = []
        self.transmits: list[int] = []
        self.reader: _udp.BatchReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.reader = _udp.BatchReader(
            transport,  # type: ignore[arg-type]
            self._deliver,
            max_datagrams=self.max_datagrams,
        )

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.reader is not None
        self.reader.datagram_received(data, addr)

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.reader is not None
        self.reader.close()

    def _deliver(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        assert _udp.defer_transmit(self.transmit)

    def transmit(self) -> None:
        self.transmits.append(len(self.received))


async def _burst(max_datagrams: int, count: int) -> _Recorder:
    loop = asyncio.get_running_loop()
    transport, recorder = await loop.create_datagram_endpoint(
        lambda: _Recorder(max_datagrams), local_addr=("127.0.0.1", 0)
    )
    address = transport.get_extra_info("sockname")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        # The loop does not run while the burst is sent: it all waits in the queue.
        for index in range(count):
            sender.sendto(index.to_bytes(4, "big") * 100, address)
        deadline = time.monotonic() + 5
        while len(recorder.received) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    transport.close()
    await asyncio.sleep(0)
    return recorder


def test_burst_is_read_in_one_batch_with_one_transmit() -> None:
    recorder = run(_burst(64, 40))
    assert [int.from_bytes(d[:4], "big") for d in recorder.received] == list(range(40))
    assert recorder.reader is not None
    assert (recorder.reader.batches, recorder.reader.datagrams) == (1, 40)
    assert recorder.transmits == [40]


def test_batches_are_bounded() -> None:
    recorder = run(_burst(16, 40))
    assert [int.from_bytes(d[:4], "big") for d in recorder.received] == list(range(40))
    assert recorder.transmits == [16, 32, 40]


def test_batch_of_one_reads_as_asyncio_does() -> None:
    recorder = run(_burst(1, 10))
    assert recorder.transmits == list(range(1, 11))


def test_a_socket_made_out_of_descriptors_reads_one_datagram_at_a_time() -> None:
    # Found by a review: the batch reader's dup() raised EMFILE out of connection_made,
    # and an aioquic connection that migrated onto that socket heard nothing and died.
    import resource

    async def main() -> _Recorder:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Room for the transport's socket, none for the reader's copy of it.
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe.fileno() + 1, hard))
        probe.close()
        try:
            transport, recorder = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _Recorder(64), local_addr=("127.0.0.1", 0)
            )
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        address = transport.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for index in range(5):
                sender.sendto(index.to_bytes(4, "big"), address)
            while len(recorder.received) < 5:
                await asyncio.sleep(0.01)
        transport.close()
        await asyncio.sleep(0)
        return recorder

    recorder = run(main())
    assert [int.from_bytes(d, "big") for d in recorder.received] == list(range(5))
    assert recorder.transmits == [1, 2, 3, 4, 5]  # a batch of one each


def test_defer_transmit_outside_a_batch_is_refused() -> None:
    assert not _udp.defer_transmit(lambda: None)


def test_a_failing_datagram_does_not_stop_the_batch() -> None:
    errors: list[dict[str, Any]] = []

    async def main() -> _Recorder:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        original = _Recorder._deliver

        def deliver(self: _Recorder, data: bytes, addr: Any) -> None:
            original(self, data, addr)
            if len(self.received) == 3:
                raise RuntimeError("boom")

        _Recorder._deliver = deliver  # type: ignore[method-assign]
        try:
            return await _burst(64, 6)
        finally:
            _Recorder._deliver = original  # type: ignore[method-assign]

    recorder = run(main())
    assert len(recorder.received) == 6
    assert recorder.transmits == [6]
    assert [type(ctx["exception"]) for ctx in errors] == [RuntimeError]


def test_receive_batch_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        QuicTransport(identity=CLIENT, trust=CA.trust_bundle, receive_batch=0)


# -- over QUIC -------------------------------------------------------------------

SIZE = 3 * 1024 * 1024
PAYLOAD = random.Random(7).randbytes(SIZE)


async def _send_payload(stream: MeshStream) -> None:
    for offset in range(0, SIZE, 65536):
        stream.write(PAYLOAD[offset : offset + 65536])
        await stream.drain()
    stream.write_eof()


async def _download(
    receive_batch: int, streams: int
) -> tuple[QuicPeerConnection, _udp.BatchReader, _udp.BatchReader, int]:
    # Batched UDP reads are the driver's, for a datagram engine: aioquic (the native
    # engine reads its own sockets in Rust).
    server = QuicTransport(
        identity=SERVER, trust=CA.trust_bundle, receive_batch=receive_batch, engine="aioquic"
    )
    client = QuicTransport(
        identity=CLIENT, trust=CA.trust_bundle, receive_batch=receive_batch, engine="aioquic"
    )
    listener = await server.listen(("127.0.0.1", 0), _send_payload)
    conn = await client.connect(listener.address)
    protocol = conn
    assert protocol._transport is not None
    client_reader = protocol._transport.get_protocol().reader  # type: ignore[attr-defined]
    transmits = 0
    transmit = protocol.transmit

    def counting_transmit() -> None:
        nonlocal transmits
        transmits += 1
        transmit()

    protocol.transmit = counting_transmit  # type: ignore[method-assign]

    async def fetch() -> None:
        stream = await conn.open_stream(TARGET)
        digest = hashlib.sha256()
        received = 0
        while data := await stream.read(65536):
            digest.update(data)
            received += len(data)
            if received % (512 * 1024) < len(data):
                time.sleep(0.02)  # a busy loop: datagrams queue up in the socket
        assert received == SIZE
        assert digest.digest() == hashlib.sha256(PAYLOAD).digest()

    await asyncio.gather(*(fetch() for _ in range(streams)))
    server_reader = listener._server.reader  # type: ignore[attr-defined]
    await conn.aclose()
    listener.close()
    return conn, client_reader, server_reader, transmits


@pytest.mark.parametrize("streams", [1, 4])
def test_bulk_download_in_batches_is_intact(streams: int) -> None:
    conn, reader, server_reader, transmits = run(_download(64, streams))
    assert reader.datagrams == conn.stats()["packets_received"]
    # Several datagrams per readiness event, and fewer transmits than datagrams
    # (without batching, at least one per datagram).
    assert reader.batches * 2 < reader.datagrams
    assert transmits < reader.datagrams
    assert server_reader.batches <= server_reader.datagrams


def test_bulk_download_one_datagram_at_a_time_is_intact() -> None:
    _, reader, _, transmits = run(_download(1, 1))
    assert reader.batches == reader.datagrams
    assert transmits >= reader.datagrams
