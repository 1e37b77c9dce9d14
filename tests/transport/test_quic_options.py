"""QuicTransport options that change what goes on the wire."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from quic_helpers import close_both, require_engine, round_trip
from test_contract import MESH, TARGET

import quicmesh
from quicmesh import MeshStream


@pytest.mark.parametrize("engine", ["aioquic", "native"])
@pytest.mark.parametrize("size", [1200, 1452])
def test_max_datagram_size_bounds_the_datagrams_sent(size: int, engine: str) -> None:
    """On the native engine too (with path MTU discovery off, the size stays)."""
    require_engine(engine)

    async def handler(stream: MeshStream) -> None:
        stream.accept()
        for _ in range(16):
            stream.write(b"x" * 65536)
            await stream.drain()
        stream.write_eof()

    async def main() -> tuple[int, int]:
        server = quicmesh.QuicTransport(
            identity=MESH.server,
            trust=MESH.ca.trust_bundle,
            max_datagram_size=size,
            engine=engine,
            mtu_discovery=False,
        )
        listener = await server.listen(("127.0.0.1", 0), handler)
        conn = await MESH.transport("quic").connect(listener.address)
        stream = await conn.open_stream(TARGET)
        stream.write_eof()
        assert len(await stream.read()) == 16 * 65536
        (accepted,) = listener.connections
        stats = accepted.stats()
        await conn.aclose()
        listener.close()
        await listener.wait_closed()
        await server.aclose()
        return stats["bytes_sent"], stats["packets_sent"]

    sent, packets = asyncio.run(asyncio.wait_for(main(), 60))
    average = sent / packets
    assert average <= size
    assert average > size - 100  # a bulk download fills its datagrams


@pytest.mark.parametrize("size", [1199, 1453, 9000])
def test_max_datagram_size_outside_the_safe_range_is_refused(size: int) -> None:
    with pytest.raises(quicmesh.ConfigError, match="max_datagram_size"):
        quicmesh.QuicTransport(
            identity=MESH.server, trust=MESH.ca.trust_bundle, max_datagram_size=size
        )


def _native(**kwargs: object) -> quicmesh.QuicTransport:
    require_engine("native")
    identity = kwargs.pop("identity", MESH.client)
    return quicmesh.QuicTransport(
        identity=identity,  # type: ignore[arg-type]
        trust=MESH.ca.trust_bundle,
        engine="native",
        congestion_control="cubic",
        **kwargs,  # type: ignore[arg-type]
    )


async def _upload(client: quicmesh.QuicTransport, server: quicmesh.QuicTransport) -> tuple:
    """4 MiB from client to server on one stream; (client stats, server stats)."""
    received = asyncio.get_running_loop().create_future()

    async def handler(stream: MeshStream) -> None:
        stream.accept()
        total = 0
        while data := await stream.read(65536):
            total += len(data)
        stream.write_eof()
        received.set_result(total)

    listener = await server.listen(("127.0.0.1", 0), handler)
    conn = await client.connect(listener.address)
    stream = await conn.open_stream(TARGET)
    for _ in range(64):
        stream.write(b"u" * 65536)
        await stream.drain()
    stream.write_eof()
    assert await stream.read() == b""
    assert await received == 64 * 65536
    (accepted,) = listener.connections
    stats = conn.stats(), accepted.stats()
    await conn.aclose()
    listener.close()
    await listener.wait_closed()
    for transport in (client, server):
        await transport.aclose()
    return stats


def test_native_path_mtu_discovery_raises_the_datagram_size_on_both_ends() -> None:
    """quinn's DPLPMTUD (RFC 8899) from 1200 up to its ceiling (6550, what one GSO
    batch of quinn's can carry) on loopback, whose MTU is 65536, each end for itself
    (each accepts that size: its max_udp_payload_size); off, the size stays at
    max_datagram_size."""
    from quicmesh.transport.quic.native_engine import MTU_DISCOVERY_MAX

    async def main() -> None:
        client_stats, server_stats = await _upload(_native(), _native(identity=MESH.server))
        assert client_stats["mtu"] == server_stats["mtu"] == MTU_DISCOVERY_MAX == 6550
        assert client_stats["mtu_probes_sent"] > 0 and server_stats["mtu_probes_sent"] > 0
        fixed = await _upload(
            _native(mtu_discovery=False), _native(identity=MESH.server, mtu_discovery=False)
        )
        assert [stats["mtu"] for stats in fixed] == [1200, 1200]
        assert [stats["mtu_probes_sent"] for stats in fixed] == [0, 0]

    asyncio.run(asyncio.wait_for(main(), 60))


def test_native_ack_frequency_is_requested_of_the_peer() -> None:
    """ack_eliciting_threshold: the sender asks its native peer (ACK_FREQUENCY
    frames) to acknowledge every tenth packet and the peer gets the request; 1 sends
    none (RFC 9000's default)."""

    async def main() -> None:
        default = await _upload(_native(), _native(identity=MESH.server))
        assert default[0]["ack_frequency_sent"] == 0
        assert default[1]["ack_frequency_received"] == 0
        sparse = await _upload(_native(ack_eliciting_threshold=9), _native(identity=MESH.server))
        assert sparse[0]["ack_frequency_sent"] > 0
        # The receiver (the server) got the request. (How many fewer ACKs it then sent
        # depends on how quinn batches received datagrams: docs/performance.md counts them.)
        assert sparse[1]["ack_frequency_received"] > 0

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("value", [-1, (1 << 20) + 1])
def test_ack_eliciting_threshold_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(quicmesh.ConfigError, match="ack_eliciting_threshold must be 0 to"):
        quicmesh.QuicTransport(
            identity=MESH.server, trust=MESH.ca.trust_bundle, ack_eliciting_threshold=value
        )


def test_native_qlog_writes_one_file_per_connection_on_each_side(tmp_path: Path) -> None:
    """qlog_dir on the native engine: quinn-proto's qlog (JSON-SEQ), one file per
    connection, client and server, with the packets of the exchange in it."""
    import json

    async def main() -> None:
        client_stats, _ = await _upload(
            _native(qlog_dir=str(tmp_path)), _native(identity=MESH.server, qlog_dir=str(tmp_path))
        )
        assert client_stats["packets_sent"] > 0

    asyncio.run(asyncio.wait_for(main(), 60))
    files = sorted(path.name for path in tmp_path.iterdir())
    assert [name.split("-")[1] for name in files] == ["client", "server"], files
    for path in tmp_path.iterdir():
        records = [
            json.loads(record) for record in path.read_text().split("\x1e") if record.strip()
        ]
        assert "qlog_version" in records[0]
        names = {record.get("name") for record in records[1:]}
        assert "transport:packet_sent" in names and "transport:packet_received" in names, names


def test_native_qlog_dir_must_be_a_folder(tmp_path: Path) -> None:
    async def main() -> None:
        client = _native(qlog_dir=str(tmp_path / "missing"))
        with pytest.raises(quicmesh.QuicmeshError, match=r"qlog_dir .* is not a folder"):
            await client.connect(("127.0.0.1", 9))

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("value", [0, 1024, (1 << 40) + 1])
def test_send_window_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(quicmesh.ConfigError, match="send_window must be 16 KiB to 1 TiB"):
        quicmesh.QuicTransport(identity=MESH.server, trust=MESH.ca.trust_bundle, send_window=value)


def test_native_send_window_carries_a_bulk() -> None:
    """A small send_window (the head-of-line lever, docs/performance.md) still moves
    a bulk intact: quinn only holds less of it unacknowledged."""

    async def main() -> None:
        client_stats, _ = await _upload(
            _native(send_window=64 * 1024), _native(identity=MESH.server, send_window=64 * 1024)
        )
        assert client_stats["bytes_sent"] > 64 * 65536

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_listening_with_a_certificate_without_spiffe_id_is_a_config_error(engine: str) -> None:
    """As connect() refuses it: an aioquic listener took it, then raised ConfigError
    from every datagram it received (loop noise) while clients waited out their timeout."""
    import asyncio
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from quicmesh import ConfigError, DevCA, Identity, QuicTransport

    if engine == "native":
        pytest.importorskip("quicmesh._native")
    ca = DevCA()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("O=quicmesh,CN=no-san"))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("x.svc")]), critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    transport = QuicTransport(identity=Identity(leaf, key), trust=ca.trust_bundle, engine=engine)

    async def main() -> None:
        async def handler(stream: object) -> None:
            raise AssertionError("never called")

        with pytest.raises(ConfigError, match="carries no SPIFFE ID"):
            await transport.listen(("127.0.0.1", 0), handler)  # type: ignore[arg-type]
        await transport.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("engine", ["aioquic", "native"])
@pytest.mark.parametrize(
    ("listen", "peer", "wrong", "right"),
    [
        ("127.0.0.1", "127.0.0.1", "::1", "127.0.0.1"),
        ("::", "::ffff:127.0.0.1", "0.0.0.0", "::"),  # an IPv4-mapped peer: over IPv6
        # ...yet an IPv4 host: not from a real IPv6 address, nor back (taken, then every
        # flow was lost, a review).
        ("::", "::ffff:127.0.0.1", "::1", "::ffff:127.0.0.1"),
        ("::", "::1", "::ffff:127.0.0.1", "::1"),
    ],
    ids=["ipv4", "ipv4-mapped", "ipv4-mapped-to-ipv6", "ipv6-to-ipv4-mapped"],
)
def test_migrating_to_another_address_family_is_refused_before_anything_moves(
    engine: str, listen: str, peer: str, wrong: str, right: str
) -> None:
    """migrate(("::1", 0)) on a connection to an IPv4 peer returned, and the connection
    died some seconds later (no packet could reach the peer): ConnectError now, and the
    connection carries on (and moves to an address of the right family)."""
    import asyncio

    from quic_helpers import TARGET, Recorder, client_transport, server_transport

    from quicmesh import ConnectError

    if engine == "native":
        pytest.importorskip("quicmesh._native")

    async def main() -> None:
        listener = await server_transport(engine=engine).listen((listen, 0), Recorder())
        conn = await client_transport(engine=engine).connect((peer, listener.address[1]))
        with pytest.raises(ConnectError, match=rf"cannot migrate to {wrong}: an IPv"):
            await conn.migrate((wrong, 0))
        await conn.migrate((right, 0))
        stream = await conn.open_stream(TARGET)
        assert await round_trip(stream, b"still here") == b"still here"
        await close_both(conn, listener)

    asyncio.run(main())


def test_native_client_connections_log_under_their_own_ids() -> None:
    """Every native client connection logged as ``[native--1]`` (its number taken before
    the engine gave one), and endpoints number their connections alike."""
    import asyncio

    from quic_helpers import Recorder, client_transport, server_transport

    pytest.importorskip("quicmesh._native")

    async def main() -> list[str]:
        listener = await server_transport(engine="native").listen(("127.0.0.1", 0), Recorder())
        connections = [
            await client_transport(engine="native").connect(listener.address) for _ in range(2)
        ]
        connections.append(await client_transport(engine="native").connect(listener.address))
        ids = [conn.log_id for conn in connections]
        for conn in connections:
            conn.close()
            await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
        return ids

    ids = asyncio.run(main())
    assert len(set(ids)) == 3 and all(i.startswith("native-") and "--" not in i for i in ids), ids
