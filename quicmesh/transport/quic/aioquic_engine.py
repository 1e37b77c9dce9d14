"""aioquic as a QUIC engine (:mod:`quicmesh.transport.quic.engine`), ``engine="aioquic"``.

A datagram engine: every connection is a :class:`~quicmesh._aioquic.MeshQuicConnection`
(aioquic's sans-IO ``QuicConnection`` with quicmesh's deviations, one class), and
the driver moves its datagrams and arms its timer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from aioquic.quic.configuration import QuicConfiguration

from ..._aioquic import MeshQuicConnection
from .engine import Address, EngineLimits, EngineListener, EngineTls


def configuration(limits: EngineLimits, tls: EngineTls, *, is_client: bool) -> QuicConfiguration:
    """The aioquic configuration for one side of a connection."""
    config = QuicConfiguration(
        alpn_protocols=list(limits.alpn),
        is_client=is_client,
        idle_timeout=limits.idle_timeout,
        max_data=limits.connection_window,
        max_stream_data=limits.stream_window,
        congestion_control_algorithm=limits.congestion_control,
        cadata=tls.trust.pem,
        certificate=tls.identity.certificate,
        certificate_chain=tls.identity.chain,
        private_key=tls.identity.private_key,
        server_name=None,
        max_datagram_size=limits.max_datagram_size,
    )
    config.max_datagram_frame_size = None
    if tls.ticket is not None:
        config.session_ticket = tls.ticket
    if limits.qlog_dir is not None:
        from aioquic.quic.logger import QuicFileLogger

        config.quic_logger = QuicFileLogger(limits.qlog_dir)
    return config


class AioquicEngine:
    """aioquic 1.7, driven datagram by datagram (see the module docstring)."""

    name = "aioquic"
    io: Literal["datagrams", "socket"] = "datagrams"

    def congestion_controls(self) -> list[str]:
        """``reno``, ``cubic`` and ``bbr`` (:mod:`quicmesh.congestion`)."""
        from ...congestion.adaptor import available_congestion_controls

        return available_congestion_controls()

    def connect(
        self,
        limits: EngineLimits,
        tls: EngineTls,
        address: Address,
        *,
        wake: Callable[[], None] | None = None,
        resume: bool = True,
        config: QuicConfiguration | None = None,
    ) -> MeshQuicConnection:
        """A client connection (handshake not started: the driver calls ``connect``);
        each ticket the server issues is a ``SessionTicketReceived`` event.

        :param resume: unused: the connection resumes with the ticket the driver put
            in ``config`` (``session_ticket``), if any.
        :param config: the aioquic configuration to use instead of one made from
            ``limits`` and ``tls`` (the transport's, which follows ``set_identity``).
        """
        connection: list[MeshQuicConnection] = []
        quic = MeshQuicConnection(
            configuration=config or configuration(limits, tls, is_client=True),
            session_ticket_handler=lambda ticket: connection[0].ticket_received(ticket),
            max_streams=limits.max_streams,
        )
        connection.append(quic)
        return quic

    def accept(
        self,
        limits: EngineLimits,
        tls: EngineTls,
        *,
        original_destination_connection_id: bytes | None,
        retry_source_connection_id: bytes | None,
        config: QuicConfiguration | None = None,
    ) -> MeshQuicConnection:
        """A server connection for a new client Initial; asks for a client certificate.

        :param config: the listener's aioquic configuration (see :meth:`connect`).
        """
        return MeshQuicConnection(
            configuration=config or configuration(limits, tls, is_client=False),
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
            max_streams=limits.max_streams,
            stateless_reset_key=limits.stateless_reset_key,
            request_client_certificate=True,
            fetch_ticket=tls.fetch_ticket,
            on_ticket_issued=tls.ticket_issued,
            accept_early_data=tls.accept_early_data,
        )

    def listen(
        self,
        limits: EngineLimits,
        tls: EngineTls,
        address: Address,
        *,
        wake: Callable[[], None],
    ) -> EngineListener:
        """Not for a datagram engine: the driver's listener owns the socket."""
        raise NotImplementedError("aioquic is a datagram engine: the driver listens")

    def close(self) -> None:
        """Nothing: the driver owns every socket."""
