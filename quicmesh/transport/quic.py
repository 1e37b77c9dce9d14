"""QuicTransport: flows as HTTP/3 CONNECT streams over aioquic.

The asyncio adaptor is thin: :class:`_TunnelProtocol` is an aioquic
:class:`QuicConnectionProtocol` that hands QUIC events to a sans-IO
:class:`~quicmesh.tunnel.h3.H3TunnelSession` and the resulting tunnel events to
the shared :class:`~quicmesh.transport._session.SessionConnection`. Servers use
aioquic's own :func:`~aioquic.asyncio.serve` (connection-ID routing, version
negotiation, retry).

Mutual TLS: the client verifies the server's chain through aioquic (``cadata``)
and its SPIFFE ID here; the server asks for a client certificate through
:func:`quicmesh._aioquic.require_client_certificate` and verifies its chain and
SPIFFE ID with :func:`quicmesh.tls.verify_peer` when the handshake completes,
before any stream is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.h3.connection import H3_ALPN
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from .. import _aioquic
from ..errors import ConnectError, ConnectionLost, PeerVerificationError, QuicmeshError
from ..tls import Identity, TrustBundle, spiffe_id_of, verify_peer
from ..tunnel.h3 import DEFAULT_CONNECTION_WINDOW, DEFAULT_STREAM_WINDOW, H3TunnelSession
from ._session import SessionConnection
from .base import Address, Authorizer, Listener, StreamHandler, Transport

logger = logging.getLogger("quicmesh.transport.quic")

CRYPTO_ERROR_BAD_CERTIFICATE = 0x100 + 42
"""QUIC CRYPTO_ERROR carrying TLS alert bad_certificate (RFC 9001 section 4.8)."""


class QuicPeerConnection(SessionConnection):
    """A QUIC connection to one peer sidecar; each flow is one HTTP/3 CONNECT stream."""

    transport_name = "quic"

    def __init__(self, protocol: _TunnelProtocol, **kwargs: Any) -> None:
        super().__init__(protocol.session, **kwargs)
        self.protocol = protocol
        self.packets_lost = 0

    def _transmit(self) -> None:
        self.protocol.transmit()

    def _close_transport(self) -> None:
        self.protocol.close_socket_when_done()

    def stats(self) -> dict[str, Any]:
        quic = self.protocol._quic
        result = super().stats()
        result.update(_aioquic.connection_stats(quic))
        result.update(
            transport="quic",
            peer_identity=self.peer_identity,
            bytes_sent=self.protocol.bytes_sent,
            bytes_received=self.protocol.bytes_received,
            packets_sent=self.protocol.datagrams_sent,
            packets_received=self.protocol.datagrams_received,
            packets_lost=self.packets_lost,
        )
        return result

    async def wait_closed(self) -> None:
        await self.protocol.wait_closed()
        self.protocol.close_socket_when_done()
        await super().wait_closed()


class _TunnelProtocol(QuicConnectionProtocol):
    """aioquic protocol feeding an H3TunnelSession; one per QUIC connection."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        transport: QuicTransport,
        handler: StreamHandler | None = None,
        authorize: Authorizer | None = None,
        owns_socket: bool = False,
    ) -> None:
        super().__init__(quic)
        self._owner = transport
        self._handler = handler
        self._authorize = authorize
        self._owns_socket = owns_socket
        self._close_socket = False
        self.is_client = quic.configuration.is_client
        if not self.is_client:
            _aioquic.require_client_certificate(quic)
        if quic.configuration.congestion_control_algorithm == "bbr":
            from ..congestion import enable_model_pacing

            enable_model_pacing(quic)
        self.session = H3TunnelSession(
            quic,
            stream_window=transport.stream_window,
            connection_window=transport.connection_window,
        )
        self.connection: QuicPeerConnection | None = None
        self.failure: QuicmeshError | None = None
        self._pending: list[quic_events.QuicEvent] = []
        self.bytes_sent = self.bytes_received = 0
        self.datagrams_sent = self.datagrams_received = 0
        self.log_id = quic.host_cid.hex()

    # -- I/O -------------------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.bytes_received += len(data)
        self.datagrams_received += 1
        super().datagram_received(data, addr)
        if self.connection is not None and self.connection._credit is not None:
            # MAX_STREAMS raises no QUIC event: wake open_stream() calls waiting for credit.
            self.connection._handle_events([])

    def transmit(self) -> None:
        self._transmit_task = None
        assert self._transport is not None
        now = self._loop.time()
        for data, addr in self._quic.datagrams_to_send(now=now):
            self.bytes_sent += len(data)
            self.datagrams_sent += 1
            self._transport.sendto(data, addr)
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at
        if self.connection is not None:
            self.connection._transmitted()

    def close_socket_when_done(self) -> None:
        self._close_socket = True
        if self._closed.is_set():
            self._close_own_socket()

    def _close_own_socket(self) -> None:
        if self._owns_socket and self._transport is not None:
            self._transport.close()

    # -- events ----------------------------------------------------------------

    def quic_event_received(self, event: quic_events.QuicEvent) -> None:
        if isinstance(event, quic_events.HandshakeCompleted):
            self._on_handshake_completed()
        elif isinstance(event, quic_events.ConnectionTerminated):
            self._on_terminated(event)
            return
        if self.connection is None:
            if self.failure is None:
                self._pending.append(event)
            return
        self.connection._handle_events(self.session.handle_quic_event(event))

    def _on_handshake_completed(self) -> None:
        try:
            identity = self._verify_peer()
        except PeerVerificationError as exc:
            self.failure = exc
            self._pending.clear()
            side = "server" if self.is_client else "client"
            logger.warning("[%s] refused %s: %s", self.log_id, side, exc)
            self._quic.close(error_code=CRYPTO_ERROR_BAD_CERTIFICATE, reason_phrase=str(exc))
            return
        self.connection = QuicPeerConnection(
            self,
            peer_identity=identity,
            handler=self._handler,
            authorize=self._authorize,
            high_water=self._owner.high_water,
            log_id=self.log_id,
        )
        _aioquic.count_lost_packets(self._quic, self._count_lost)
        pending, self._pending = self._pending, []
        for event in pending:
            self.connection._handle_events(self.session.handle_quic_event(event))

    def _count_lost(self, count: int) -> None:
        if self.connection is not None:
            self.connection.packets_lost += count

    def _verify_peer(self) -> str:
        certificate, chain = _aioquic.peer_certificate(self._quic)
        if certificate is None:
            raise PeerVerificationError("peer presented no certificate")
        if self.is_client:
            # aioquic verified the chain against our trust bundle already.
            identity = spiffe_id_of(certificate)
            if identity is None:
                raise PeerVerificationError("peer certificate carries no SPIFFE ID")
            return identity
        return verify_peer(certificate, chain, self._owner.trust)

    def _on_terminated(self, event: quic_events.ConnectionTerminated) -> None:
        reason = event.reason_phrase or f"error code {event.error_code:#x}"
        if self.connection is not None:
            self.connection._connection_lost(ConnectionLost(f"QUIC connection closed: {reason}"))
        elif self.failure is None:
            if (
                event.error_code == CRYPTO_ERROR_BAD_CERTIFICATE
                or 0x100 <= event.error_code < 0x200
            ):
                self.failure = PeerVerificationError(f"handshake refused: {reason}")
            else:
                self.failure = ConnectError(f"QUIC connection closed during handshake: {reason}")
        if self._close_socket:
            self._close_own_socket()


class QuicListener(Listener):
    """A UDP socket accepting QUIC connections from peer sidecars."""

    def __init__(self, server: QuicServer) -> None:
        self._server = server
        assert server._transport is not None
        sockname = server._transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        self._closed = asyncio.get_running_loop().create_future()

    def close(self) -> None:
        if not self._closed.done():
            self._server.close()
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)


class QuicTransport(Transport):
    """Flows as HTTP/3 CONNECT streams, many per QUIC connection.

    :param identity: this sidecar's certificate and key.
    :param trust: the CAs peers' certificates must chain to.
    :param congestion_control: ``"reno"``, ``"cubic"`` (aioquic's) or ``"bbr"``.
    :param idle_timeout: seconds of silence before a connection is dropped.
    :param stream_window: receive window per stream, in bytes.
    :param connection_window: receive window per connection, in bytes.
    :param high_water: unsent bytes per stream above which ``drain()`` waits.
    :param max_streams: concurrent streams a peer may open towards us.
    """

    name = "quic"

    def __init__(
        self,
        *,
        identity: Identity,
        trust: TrustBundle,
        congestion_control: str = "cubic",
        idle_timeout: float = 60.0,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        high_water: int = 64 * 1024,
        max_streams: int = 128,
        qlog_dir: str | None = None,
    ) -> None:
        super().__init__(identity=identity, trust=trust)
        if congestion_control == "bbr":
            from .. import congestion

            congestion.ensure_registered()
        self.congestion_control = congestion_control
        self.idle_timeout = idle_timeout
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.high_water = high_water
        self.max_streams = max_streams
        self.qlog_dir = qlog_dir

    def configuration(self, *, is_client: bool) -> QuicConfiguration:
        """The aioquic configuration for one side of a connection."""
        config = QuicConfiguration(
            alpn_protocols=H3_ALPN,
            is_client=is_client,
            idle_timeout=self.idle_timeout,
            max_data=self.connection_window,
            max_stream_data=self.stream_window,
            congestion_control_algorithm=self.congestion_control,
            cadata=self.trust.pem,
            certificate=self.identity.certificate,
            certificate_chain=self.identity.chain,
            private_key=self.identity.private_key,
            server_name=None,
        )
        config.max_datagram_frame_size = None
        if self.qlog_dir is not None:
            from aioquic.quic.logger import QuicFileLogger

            config.quic_logger = QuicFileLogger(self.qlog_dir)
        return config

    async def listen(
        self,
        address: Address,
        handler: StreamHandler,
        authorize: Authorizer | None = None,
    ) -> QuicListener:
        config = self.configuration(is_client=False)

        def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> _TunnelProtocol:
            _aioquic.limit_peer_streams(quic, self.max_streams)
            return _TunnelProtocol(quic, transport=self, handler=handler, authorize=authorize)

        try:
            server = await serve(
                address[0], address[1], configuration=config, create_protocol=create_protocol
            )
        except OSError as exc:
            raise ConnectError(
                f"cannot listen on UDP {address[0]}:{address[1]}: {exc.strerror}"
            ) from None
        assert server._transport is not None
        _tune_udp_socket(server._transport)
        return QuicListener(server)

    async def connect(self, address: Address, *, timeout: float = 10.0) -> QuicPeerConnection:
        loop = asyncio.get_running_loop()
        quic = QuicConnection(configuration=self.configuration(is_client=True))
        _aioquic.limit_peer_streams(quic, self.max_streams)
        local = "::" if _is_ipv6(address[0]) else "0.0.0.0"
        try:
            udp, protocol = await loop.create_datagram_endpoint(
                lambda: _TunnelProtocol(quic, transport=self, owns_socket=True),
                local_addr=(local, 0),
            )
        except OSError as exc:
            raise ConnectError(f"cannot open a UDP socket: {exc.strerror}") from None
        _tune_udp_socket(udp)
        protocol.close_socket_when_done()
        try:
            protocol.connect(address)
            await asyncio.wait_for(protocol.wait_connected(), timeout)
        except (TimeoutError, ConnectionError, OSError) as exc:
            quic.close()
            protocol.transmit()
            protocol._close_own_socket()
            if protocol.failure is not None:
                raise protocol.failure from None
            if isinstance(exc, asyncio.TimeoutError):
                raise ConnectError(
                    f"QUIC handshake with {address[0]}:{address[1]} timed out after {timeout:g}s"
                ) from None
            raise ConnectError(
                f"QUIC connection to {address[0]}:{address[1]} failed: {exc}"
            ) from None
        if protocol.connection is None:
            protocol._close_own_socket()
            raise protocol.failure or ConnectError("QUIC handshake failed")
        return protocol.connection


UDP_SOCKET_BUFFER = 4 * 1024 * 1024
"""SO_RCVBUF / SO_SNDBUF asked for on QUIC sockets (the kernel caps it at rmem_max/wmem_max)."""


def _tune_udp_socket(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
