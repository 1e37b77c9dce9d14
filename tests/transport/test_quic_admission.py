"""Issue 13, finding 1: what unauthenticated Initials may cost a QUIC listener.

Forged Initials (the right header, nothing that decrypts) leave no state;
real first flights that never finish count as half-open, capped per source and
dropped after the handshake timeout; Retry validates addresses always when
configured, and under load otherwise. Real UDP sockets on loopback.
"""

from __future__ import annotations

import asyncio
import random
import socket
from typing import Any

import pytest
from aioquic._buffer import Buffer
from aioquic._crypto import CryptoError
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair, KeyUnavailableError
from aioquic.quic.packet import QuicProtocolVersion, pull_quic_header
from hypothesis import given
from hypothesis import strategies as st
from quic_helpers import CA, CLIENT, SERVER, TARGET, run, until

from quicmesh import MeshStream, QuicTransport, _aioquic
from quicmesh.transport._admission import Admission, AdmissionConfig, Decision, RateLimitedLog


async def echo(stream: MeshStream) -> None:
    while data := await stream.read(65536):
        stream.write(data)
    stream.write_eof()


def forged_initial(rng: random.Random, size: int = 1200) -> bytes:
    """A version-1 Initial header with random connection IDs and a payload that
    decrypts to nothing: what costs an attacker nothing to send, from any address."""
    head = bytes([0xC3]) + (1).to_bytes(4, "big")
    head += bytes([8]) + rng.randbytes(8) + bytes([8]) + rng.randbytes(8) + b"\x00"
    remaining = size - len(head) - 2
    return head + (remaining | 0x4000).to_bytes(2, "big") + rng.randbytes(remaining)


def first_flight(address: tuple[str, int]) -> list[bytes]:
    """A real client's first datagrams (a valid ClientHello), never followed up."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN))
    quic.connect(address, now=0.0)
    return [data for data, _ in quic.datagrams_to_send(now=0.0)]


async def exchange(transport: QuicTransport, address: Any, payload: bytes) -> bytes:
    conn = await transport.connect(address, timeout=10)
    stream = await conn.open_stream(TARGET)
    stream.write(payload)
    stream.write_eof()
    data: bytes = await stream.read()
    conn.close()
    await conn.wait_closed()
    return data


# These tests look inside aioquic's listener (BatchingQuicServer, its admission and
# routing table) and forge Initials with aioquic: they run on aioquic whatever the
# default engine (the native engine's admission runs in Rust, tests/native).
def _client() -> QuicTransport:
    return QuicTransport(identity=CLIENT, trust=CA.trust_bundle, engine="aioquic")


def _server(**admission: Any) -> QuicTransport:
    return QuicTransport(
        identity=SERVER,
        trust=CA.trust_bundle,
        admission=AdmissionConfig(**admission),
        engine="aioquic",
    )


def test_forged_initials_leave_no_connection_state() -> None:
    async def main() -> None:
        server = _server()
        listener = await server.listen(("127.0.0.1", 0), echo)
        good = _client()
        conn = await good.connect(listener.address)
        rng = random.Random(13)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        count = 2000
        for index in range(count):
            try:
                sock.sendto(forged_initial(rng), listener.address)
            except BlockingIOError:
                await asyncio.sleep(0)
            if index % 100 == 0:
                await asyncio.sleep(0)  # let the listener read, as a real flood would
        sock.close()
        # The flood is counted (some datagrams may be lost in the socket buffer)...
        await until(lambda: server.counters["initials_undecryptable"] > count // 2, 20)
        stream = await conn.open_stream(TARGET)
        stream.write(b"during the flood")
        stream.write_eof()
        assert await stream.read() == b"during the flood"
        # ...and leaves nothing behind: only the good connection's IDs are routed.
        routed = set(listener._server._protocols.values())
        assert len(routed) == 1
        assert listener._server.admission.half_open == 0
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_half_open_connections_are_capped_per_source_and_time_out() -> None:
    async def main() -> None:
        server = _server(max_half_open_per_source=3, handshake_timeout=1.0, retry="never")
        listener = await server.listen(("127.0.0.1", 0), echo)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(8):
            for datagram in first_flight(listener.address):
                sock.sendto(datagram, listener.address)
        admission = listener._server.admission
        await until(lambda: server.counters["initials_refused_half_open"] >= 5, 10)
        assert admission.half_open == 3
        await until(lambda: admission.half_open == 0, 10)
        assert server.counters["handshakes_timed_out"] == 3
        # A real client from the same address gets through once they timed out.
        assert await exchange(_client(), listener.address, b"after") == b"after"
        sock.close()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_retry_always_validates_every_client_address() -> None:
    async def main() -> None:
        server = _server(retry="always")
        listener = await server.listen(("127.0.0.1", 0), echo)
        for index in range(3):
            assert await exchange(_client(), listener.address, b"r%d" % index) == b"r%d" % index
        assert server.counters["retries_sent"] == 3
        assert server.counters["retry_tokens_invalid"] == 0
        listener.close()
        await listener.wait_closed()

    run(main())


def test_retry_starts_when_half_open_connections_pass_the_threshold() -> None:
    async def main() -> None:
        server = _server(retry="auto", retry_threshold=2)
        listener = await server.listen(("127.0.0.1", 0), echo)
        assert await exchange(_client(), listener.address, b"calm") == b"calm"
        assert server.counters["retries_sent"] == 0
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(2):
            for datagram in first_flight(listener.address):
                sock.sendto(datagram, listener.address)
        await until(lambda: listener._server.admission.half_open == 2, 10)
        assert await exchange(_client(), listener.address, b"loaded") == b"loaded"
        assert server.counters["retries_sent"] == 1
        sock.close()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_admission_decisions() -> None:
    admission = Admission(
        AdmissionConfig(retry_threshold=2, max_half_open=3, max_half_open_per_source=2)
    )
    assert admission.decide("a", False) is Decision.ADMIT
    admission.opened(1, "a")
    admission.opened(2, "a")
    assert admission.decide("a", True) is Decision.REFUSE
    assert admission.decide("b", False) is Decision.RETRY
    assert admission.decide("b", True) is Decision.ADMIT
    admission.opened(3, "b")
    assert admission.decide("c", True) is Decision.REFUSE
    assert admission.closed(1) and not admission.closed(1)
    assert admission.decide("a", True) is Decision.ADMIT


def test_refusal_logs_are_rate_limited(caplog: Any) -> None:
    now = [0.0]
    import logging

    log = RateLimitedLog(logging.getLogger("quicmesh.test"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="quicmesh.test"):
        logged = [log.log(logging.WARNING, "k", "refused %d", i) for i in range(1000)]
        now[0] = 11.0
        log.log(logging.WARNING, "k", "refused again")
    assert logged.count(True) == 1
    assert len(caplog.records) == 2
    assert "999 more like this since the last one logged, 11s ago" in caplog.records[1].getMessage()
    # A line long after: the count is of those since the last line, and says when that was
    # (it read "in the last 10s" of refusals made ten minutes before).
    log.log(logging.WARNING, "k", "refused once more")
    now[0] = 611.0
    log.log(logging.WARNING, "k", "refused much later")
    assert (
        caplog.records[-1]
        .getMessage()
        .endswith("(1 more like this since the last one logged, 600s ago)")
    )


def _decrypts_with_both_keys(data: bytes, cid_length: int) -> bool:
    """The reference: aioquic's own Initial key pair (client and server keys)."""
    buf = Buffer(data=data)
    try:
        header = pull_quic_header(buf, host_cid_length=cid_length)
        if header.version is None:
            return False
        crypto = CryptoPair()
        crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
        crypto.decrypt_packet(data[: header.packet_length], buf.tell(), 0)
    except (ValueError, CryptoError, KeyUnavailableError):
        return False
    return True


@pytest.mark.parametrize("version", [QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2])
def test_trial_decryption_accepts_real_first_flights_of_both_versions(version: int) -> None:
    # Only the client's Initial key is derived now (half the HKDF work per forged
    # Initial); real first flights of QUIC v1 and v2 must still decrypt.
    for _ in range(5):
        quic = QuicConnection(
            configuration=QuicConfiguration(
                is_client=True, alpn_protocols=H3_ALPN, original_version=version
            )
        )
        quic.connect(("127.0.0.1", 4433), now=0.0)
        [first, *_] = [data for data, _ in quic.datagrams_to_send(now=0.0)]
        assert _aioquic.initial_decrypts(first, 8) and _decrypts_with_both_keys(first, 8)
        forged = bytearray(first)
        forged[60] ^= 0x01  # one bit of the encrypted payload: the AEAD check fails
        assert not _aioquic.initial_decrypts(bytes(forged), 8)


@given(st.binary(min_size=0, max_size=1400), st.integers(0, 2**32 - 1))
def test_trial_decryption_agrees_with_aioquic_on_any_bytes(payload: bytes, seed: int) -> None:
    rng = random.Random(seed)
    candidates = [payload, forged_initial(rng), forged_initial(rng)[: len(payload) or 1]]
    for data in candidates:
        assert _aioquic.initial_decrypts(data, 8) == _decrypts_with_both_keys(data, 8)
