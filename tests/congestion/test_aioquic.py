"""BBR inside aioquic: registration, the pacer, and a real in-memory connection pair."""

from __future__ import annotations

import datetime
import heapq
import random
import ssl
import statistics

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.congestion.base import create_congestion_control
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.tls import Epoch
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from quicmesh.congestion import (
    BbrCongestionControl,
    BbrState,
    ModelPacer,
    available_congestion_controls,
    congestion_controller,
    enable_model_pacing,
    ensure_registered,
)

MSS = 1200
RATE = 20e6 / 8  # the bottleneck in the in-memory network, bytes/s
ONE_WAY_DELAY = 0.020


def test_bbr_is_registered_beside_aioquics_own() -> None:
    ensure_registered()
    ensure_registered()
    assert {"bbr", "cubic", "reno"} <= set(available_congestion_controls())
    controller = create_congestion_control("bbr", max_datagram_size=MSS)
    assert isinstance(controller, BbrCongestionControl)
    assert controller.congestion_window == 10 * MSS


def _sent_packet(number: int, sent_time: float) -> QuicSentPacket:
    return QuicSentPacket(
        epoch=Epoch.ONE_RTT,
        in_flight=True,
        is_ack_eliciting=True,
        is_crypto_packet=False,
        packet_number=number,
        packet_type=QuicPacketType.ONE_RTT,
        sent_time=sent_time,
        sent_bytes=MSS,
    )


def test_adaptor_forwards_events_and_detects_app_limited_pauses() -> None:
    controller = BbrCongestionControl(max_datagram_size=MSS)
    packets = [_sent_packet(i, 0.0) for i in range(3)]
    for packet in packets:
        controller.on_packet_sent(packet=packet)
    assert controller.bytes_in_flight == 3 * MSS
    assert controller.model.sampler.app_limited_until == 0
    controller.on_packet_acked(now=0.05, packet=packets[0])
    controller.on_packets_lost(now=0.05, packets=[packets[1]])
    controller.on_packets_expired(packets=[packets[2]])
    assert controller.bytes_in_flight == 0
    # A packet sent after a 100 ms pause with the window open: the app had no data.
    controller.on_packet_sent(packet=_sent_packet(3, 0.15))
    assert controller.model.sampler.app_limited_until != 0
    controller.on_rtt_measurement(now=0.2, rtt=0.05)
    controller.on_persistent_congestion()
    assert controller.congestion_window >= controller.model.minimum_window
    log = controller.get_log_data()
    assert log["bbr_state"] == BbrState.STARTUP.value
    assert log["pacing_rate"] > 0


def test_adaptor_marks_app_limited_when_the_streams_run_dry() -> None:
    controller = BbrCongestionControl(max_datagram_size=MSS)
    pending = [True]
    controller.has_pending_data = lambda: pending[0]
    # Late sends with data still queued (a busy CPU, not an idle application).
    for number, sent_time in enumerate((0.0, 0.1, 0.2)):
        controller.on_packet_sent(packet=_sent_packet(number, sent_time))
    assert controller.model.sampler.app_limited_until == 0
    # The last queued byte left with the window open: the application ran dry.
    pending[0] = False
    controller.on_packet_sent(packet=_sent_packet(3, 0.2001))
    assert controller.model.sampler.app_limited_until != 0


def test_pacer_holds_the_models_rate_despite_late_timers() -> None:
    controller = BbrCongestionControl(max_datagram_size=MSS)
    controller.model.pacing_rate = RATE
    controller.model.congestion_window = 200_000
    pacer = ModelPacer(controller=controller, max_datagram_size=MSS)
    assert pacer.rate == RATE
    rng = random.Random(3)
    now, sent = 0.0, 0
    while now < 2.0:
        at = pacer.next_send_time(now)
        if at is None:
            pacer.update_after_send(now)
            sent += 1
        else:
            now = at + rng.uniform(0.0, 0.002)  # timers fire up to 2 ms late
    assert sent * MSS / now == pytest.approx(RATE, rel=0.03)
    # aioquic's own update (cwnd / srtt) does not move it off the model's rate.
    pacer.update_rate(congestion_window=200_000, smoothed_rtt=0.04)
    assert pacer.rate == RATE


def _certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def test_connection_pair_transfers_with_bbr() -> None:
    cert, key = _certificate()
    client = QuicConnection(
        configuration=QuicConfiguration(
            is_client=True,
            alpn_protocols=["test"],
            server_name="localhost",
            verify_mode=ssl.CERT_NONE,
            congestion_control_algorithm="bbr",
        )
    )
    server_config = QuicConfiguration(
        is_client=False, alpn_protocols=["test"], congestion_control_algorithm="bbr"
    )
    server_config.certificate = cert
    server_config.private_key = key
    server = QuicConnection(
        configuration=server_config,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    assert enable_model_pacing(client)
    assert enable_model_pacing(server)
    controller = congestion_controller(client)
    assert isinstance(controller, BbrCongestionControl)
    assert controller.has_pending_data is not None
    assert not controller.has_pending_data()

    size = 3_000_000
    client_addr, server_addr = ("10.0.0.1", 1234), ("10.0.0.2", 4433)
    peers = {id(client): (server, client_addr), id(server): (client, server_addr)}
    # (arrival time, sequence, destination, datagram, source address)
    wire: list[tuple[float, int, int, bytes, tuple[str, int]]] = []
    link_free_at = 0.0  # the client-to-server bottleneck
    queue_delays: list[float] = []
    sequence = 0
    received = 0
    sent_at: float | None = None
    done_at: float | None = None
    now = 0.0
    server_started = False  # aioquic's server has no path until it receives
    client.connect(server_addr, now=now)

    while done_at is None and now < 10.0:
        for connection in (client, server) if server_started else (client,):
            peer, source = peers[id(connection)]
            for data, _ in connection.datagrams_to_send(now=now):
                if connection is client:
                    queue_delays.append(max(link_free_at - now, 0.0))
                    link_free_at = max(link_free_at, now) + len(data) / RATE
                    arrival = link_free_at + ONE_WAY_DELAY
                else:
                    arrival = now + ONE_WAY_DELAY
                heapq.heappush(wire, (arrival, sequence, id(peer), data, source))
                sequence += 1
        timers = [t for t in (client.get_timer(), server.get_timer()) if t is not None]
        # A real clock always moves on: aioquic can ask to be woken "now" again.
        now = max(now + 1e-6, min([*timers, *(wire[:1] and [wire[0][0]])]))
        while wire and wire[0][0] <= now:
            _, _, destination, data, source = heapq.heappop(wire)
            receiver = client if destination == id(client) else server
            receiver.receive_datagram(data, source, now=now)
            server_started = server_started or receiver is server
        for connection in (client, server) if server_started else (client,):
            timer = connection.get_timer()
            if timer is not None and timer <= now:
                connection.handle_timer(now=now)
        while (event := client.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                stream_id = client.get_next_available_stream_id()
                client.send_stream_data(stream_id, b"x" * size, end_stream=True)
                assert controller.has_pending_data is not None
                assert controller.has_pending_data()
                sent_at = now
        while (event := server.next_event()) is not None:
            if isinstance(event, StreamDataReceived):
                received += len(event.data)
                if event.end_stream:
                    done_at = now

    assert received == size
    assert sent_at is not None and done_at is not None
    model = controller.model
    assert model.sampler.delivered >= 0.9 * size  # the last ACKs are still on their way
    assert model.state is not BbrState.STARTUP
    assert model.max_bw == pytest.approx(RATE, rel=0.25)
    # 3 MB at 20 Mbit/s is 1.2 s; startup adds a few round trips.
    assert done_at - sent_at < 1.5
    # Once Startup's queue is drained, pacing at the model's rate keeps the queue short.
    steady = queue_delays[len(queue_delays) // 2 :]
    assert statistics.median(steady) < 0.1 * 2 * ONE_WAY_DELAY
