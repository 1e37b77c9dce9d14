"""Canary: every private aioquic name quicmesh relies on, with its signature.

quicmesh's aioquic layer (:class:`quicmesh._aioquic.MeshQuicConnection` and the
helpers beside it, :mod:`quicmesh.congestion.adaptor`,
:mod:`quicmesh.transport.quic.server`) overrides or reads these. An aioquic
upgrade that renames, removes or re-signs one fails this test with the whole
list of what changed, before any behaviour test fails mysteriously.
"""

from __future__ import annotations

import inspect
from typing import Any

import aioquic
from aioquic import tls
from aioquic.asyncio import protocol as asyncio_protocol
from aioquic.asyncio import server as asyncio_server
from aioquic.h3.connection import H3Connection, H3Stream
from aioquic.quic import stream as quic_stream
from aioquic.quic.congestion import base as congestion_base
from aioquic.quic.connection import QuicConnection
from aioquic.quic.recovery import QuicPacketRecovery, QuicPacketSpace

from quicmesh._aioquic import MeshQuicConnection
from quicmesh.tls import DevCA
from quicmesh.transport.quic import QuicTransport

METHODS: list[tuple[Any, str, list[str]]] = [
    # (owner, private method, parameter names after self) -- overridden or called
    (QuicConnection, "__init__", ["configuration", "original_destination_connection_id",
                                  "retry_source_connection_id", "session_ticket_fetcher",
                                  "session_ticket_handler", "token_handler"]),
    (QuicConnection, "_initialize", ["peer_cid"]),
    (QuicConnection, "_payload_received", ["context", "plain", "crypto_frame_required"]),
    (QuicConnection, "_handle_path_response_frame", ["context", "frame_type", "buf"]),
    (QuicConnection, "_abandon_path_validation", []),
    (QuicConnection, "_write_stream_limits", ["builder", "space", "stream"]),
    (QuicConnection, "_write_connection_limits", ["builder", "space"]),
    (QuicConnection, "_on_max_stream_data_delivery", ["delivery", "stream"]),
    (QuicConnection, "_replenish_connection_ids", []),
    (QuicConnection, "_send_probe", []),
    (QuicConnection, "_close_end", []),
    (QuicPacketRecovery, "__init__", ["congestion_control_algorithm", "initial_rtt",
                                      "max_datagram_size", "peer_completed_address_validation",
                                      "send_probe", "logger", "quic_logger"]),
    (QuicPacketRecovery, "_on_packets_lost", ["now", "packets", "space", "congestion_event",
                                          "persistent_congestion"]),
    (QuicPacketRecovery, "on_packet_sent", ["packet", "space"]),
    (H3Connection, "_init_connection", []),
    (H3Connection, "_get_local_settings", []),
    (H3Connection, "_receive_request_or_push_data", ["stream", "data", "stream_ended"]),
    (H3Connection, "_receive_stream_data_uni", ["stream", "data", "stream_ended"]),
    (asyncio_server, "_encode_invalid_token_close", ["version", "source_cid", "destination_cid"]),
    (asyncio_server.QuicServer, "_connection_id_issued", ["cid", "protocol"]),
    (asyncio_server.QuicServer, "_connection_id_retired", ["cid", "protocol"]),
    (asyncio_server.QuicServer, "_connection_terminated", ["protocol"]),
]  # fmt: skip

CONNECTION_ATTRIBUTES = [
    # private state of a live QuicConnection read or written by quicmesh
    "_is_client", "_max_datagram_size", "_quic_logger", "_logger", "_loss", "_streams",
    "_streams_queue", "_events", "_network_paths", "_host_cids", "_peer_cid",
    "_peer_cid_available", "_local_max_streams_bidi", "_remote_max_streams_bidi",
    "_local_max_data", "_close_event", "_state", "_spaces", "_cryptos", "_probe_pending",
    "_handshake_complete", "_version",
]  # fmt: skip

RECOVERY_ATTRIBUTES = ["_cc", "_pacer", "_pto_count", "_rtt_initialized", "_rtt_smoothed",
                       "_rtt_min", "spaces"]  # fmt: skip

TLS_CONTEXT_ATTRIBUTES = ["_request_client_certificate", "_peer_certificate",
                          "_peer_certificate_chain", "get_session_ticket_cb",
                          "new_session_ticket_cb", "update_traffic_key_cb",
                          "early_data_accepted", "session_resumed"]  # fmt: skip

SERVER_ATTRIBUTES = ["_configuration", "_create_protocol", "_protocols", "_transport", "_loop"]

PROTOCOL_ATTRIBUTES = [
    # an aioquic protocol under MeshQuicServer (interop endpoint): the routing
    # callbacks the server sets, and the connection the endpoint reaches
    "_quic", "_connection_id_issued_handler", "_connection_id_retired_handler",
    "_connection_terminated_handler",
]  # fmt: skip

STREAM_ATTRIBUTES = {
    "sender": ["_pending", "_pending_eof", "_buffer_stop", "highest_offset", "buffer_is_empty",
               "reset_pending", "on_data_delivery", "on_reset_delivery"],
    "receiver": ["highest_offset", "stop_pending", "on_stop_sending_delivery"],
    "stream": ["stream_id", "is_finished", "max_stream_data_local",
               "max_stream_data_local_sent"],
}  # fmt: skip

H3_STREAM_ATTRIBUTES = ["buffer", "frame_type", "frame_size", "stream_type"]
"""An H3Stream's parser state, read when a stream is handed to the native engine's splice."""

MODULE_ATTRIBUTES = [(congestion_base, "_factories"), (H3Connection, "_init_connection")]


def _parameters(function: Any) -> list[str]:
    names = list(inspect.signature(function).parameters)
    return [name for name in names if name != "self"]


def _pair() -> tuple[MeshQuicConnection, MeshQuicConnection]:
    ca = DevCA()
    client_transport = QuicTransport(
        identity=ca.issue("spiffe://mesh.local/ns/default/sa/client"), trust=ca.trust_bundle
    )
    server_transport = QuicTransport(
        identity=ca.issue("spiffe://mesh.local/ns/default/sa/server"), trust=ca.trust_bundle
    )
    client = MeshQuicConnection(configuration=client_transport.configuration(is_client=True))
    server = MeshQuicConnection(
        configuration=server_transport.configuration(is_client=False),
        original_destination_connection_id=client.original_destination_connection_id,
    )
    client.connect(("10.0.0.2", 4433), now=0.0)
    for data, _ in client.datagrams_to_send(now=0.0):
        server.receive_datagram(data, ("10.0.0.1", 1234), now=0.0)
    return client, server


def test_private_aioquic_names_are_still_there() -> None:
    changed: list[str] = []
    for owner, name, expected in METHODS:
        function = getattr(owner, name, None)
        if function is None:
            changed.append(f"{getattr(owner, '__name__', owner)}.{name}: missing")
            continue
        found = _parameters(function)
        if sorted(found) != sorted(expected):
            changed.append(f"{owner.__name__}.{name}: parameters {found}, expected {expected}")
    client, server = _pair()
    for quic in (client, server):
        changed += [f"QuicConnection.{a}: missing" for a in CONNECTION_ATTRIBUTES
                    if not hasattr(quic, a)]  # fmt: skip
        changed += [f"QuicPacketRecovery.{a}: missing" for a in RECOVERY_ATTRIBUTES
                    if not hasattr(quic._loss, a)]  # fmt: skip
        changed += [f"tls.Context.{a}: missing" for a in TLS_CONTEXT_ATTRIBUTES
                    if not hasattr(quic.tls, a)]  # fmt: skip
        limit = quic._local_max_streams_bidi
        if not (hasattr(limit, "value") and hasattr(limit, "sent")):
            changed.append("QuicConnection._local_max_streams_bidi: no value/sent")
        if not hasattr(quic._local_max_data, "used"):
            changed.append("QuicConnection._local_max_data: no used")
        for cid in quic._host_cids:
            if not (hasattr(cid, "stateless_reset_token") and hasattr(cid, "was_sent")):
                changed.append("QuicConnectionId: no stateless_reset_token/was_sent")
    stream = quic_stream.QuicStream(stream_id=0)
    for part, names in STREAM_ATTRIBUTES.items():
        holder = stream if part == "stream" else getattr(stream, part)
        changed += [f"QuicStream.{part}.{a}: missing" for a in names if not hasattr(holder, a)]
    h3_stream = H3Stream(stream_id=0)
    changed += [f"H3Stream.{a}: missing" for a in H3_STREAM_ATTRIBUTES
                if not hasattr(h3_stream, a)]  # fmt: skip
    if "self._stream" not in inspect.getsource(H3Connection.__init__):
        changed.append("H3Connection._stream: no longer set in __init__")
    space = QuicPacketSpace()
    for name in ("ack_at", "ack_queue", "sent_packets", "ack_eliciting_in_flight"):
        if not hasattr(space, name):
            changed.append(f"QuicPacketSpace.{name}: missing")
    for owner, name in MODULE_ATTRIBUTES:
        if not hasattr(owner, name):
            changed.append(f"{owner.__name__}.{name}: missing")
    for name in SERVER_ATTRIBUTES:
        if name not in inspect.getsource(asyncio_server.QuicServer.__init__):
            changed.append(f"QuicServer.{name}: no longer set in __init__")
    source = inspect.getsource(asyncio_protocol.QuicConnectionProtocol)
    changed += [f"QuicConnectionProtocol.{a}: missing" for a in PROTOCOL_ATTRIBUTES
                if a not in source]  # fmt: skip
    if not hasattr(tls, "SessionTicket"):
        changed.append("aioquic.tls.SessionTicket: missing")
    assert not changed, (
        f"aioquic {aioquic.__version__} changed private details quicmesh relies on "
        "(quicmesh/_aioquic.py):\n" + "\n".join(changed)
    )
