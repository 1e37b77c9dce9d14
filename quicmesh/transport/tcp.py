"""TcpTransport: one mutual-TLS TCP connection per flow, with an HTTP/1.1 CONNECT preamble.

The per-flow baseline. :meth:`TcpPeerConnection.open_stream` dials a new TLS 1.3
connection (ALPN ``http/1.1``) for every flow and runs an
:class:`~quicmesh.tunnel.http1.Http1TunnelSession` on it: ``CONNECT host:port``,
``200``, then the flow's bytes unframed. Half-close is TLS ``close_notify``
followed by a TCP write shutdown, which TLS 1.3 allows in each direction
independently; an abort is a TCP RST, which the peer reads as
:class:`~quicmesh.errors.StreamReset`. The socket and TLS handling is
:mod:`quicmesh.transport._tcp`, shared with :class:`~quicmesh.transport.h2.H2Transport`.

:meth:`TcpTransport.connect` dials the first connection at once, so the peer's
identity is known and verified (and a server that refuses our certificate is
reported) before any flow; that connection then carries the first flow.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from typing import Any

from cryptography import x509

from ..errors import ConnectionLost, PeerVerificationError, TunnelError, TunnelUsageError
from ..tls import Identity, TrustBundle
from ..tls.context import MutualTlsContexts
from ..tunnel.connect import parse_target, validate_headers
from ..tunnel.http1 import DEFAULT_RECEIVE_WINDOW, STREAM_ID, Http1TunnelSession
from ._tcp import (
    MAX_HALF_OPEN_PER_SOURCE,
    TlsListener,
    TlsTunnelProtocol,
    open_connection,
    start_server,
)
from .base import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    Address,
    Authorizer,
    PeerConnection,
    StreamHandler,
    Transport,
    checked_authorizer,
    checked_tls,
    host_port,
)
from .liveness import checked_liveness
from .stream import DEFAULT_HIGH_WATER, MeshStream, check_seconds, check_whole

ALPN = "http/1.1"

MAX_DIALS = MAX_HALF_OPEN_PER_SOURCE // 2
"""Flows' connections a :class:`TcpPeerConnection` dials at once (in their TCP and TLS
handshakes); more flows wait for one to finish. A peer takes at most
:data:`~._tcp.MAX_HALF_OPEN_PER_SOURCE` handshakes from one address at once and resets
the rest: a burst of 300 flows failed 23 of them (``ConnectError``) on loopback, and
more the longer the round trip. Half leaves room for another client on the address."""


class TcpListener(TlsListener):
    """A TCP socket accepting one mutual-TLS connection per flow from peer sidecars."""


class TcpPeerConnection(PeerConnection):
    """Flows to one peer sidecar, each on its own mutual-TLS TCP connection."""

    transport_name = "tcp"

    def __init__(
        self, transport: TcpTransport, address: Address, first: TlsTunnelProtocol, timeout: float
    ) -> None:
        assert first.connection is not None
        self.peer_identity = first.connection.peer_identity
        self._peer_certificate = first.connection.peer_certificate
        self.connections_opened = 1
        self._transport = transport
        self._address = address
        self._timeout = timeout
        self._spare: TlsTunnelProtocol | None = first
        self._flows: set[TlsTunnelProtocol] = {first}
        self._closed = False
        self._dialling = asyncio.Semaphore(MAX_DIALS)
        self._bytes_sent = 0
        self._bytes_received = 0
        self._streams_opened = 0
        """CONNECTs sent on the flows' connections that closed (the open ones count theirs)."""
        self._stream_ids = itertools.count(STREAM_ID)
        """The flows' stream IDs, 1, 2, 3... in the order their CONNECTs go (for logs:
        until 2026-12 every flow was stream 1)."""
        first.closed.add_done_callback(lambda _: self._flow_closed(first))

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer presented on the latest flow's connection (each flow
        has its own handshake; all present :attr:`peer_identity`)."""
        return self._peer_certificate

    @property
    def peer_address(self) -> str:
        """The peer sidecar's address (every flow's connection dials it)."""
        return host_port(self._address)

    @property
    def lost_error(self) -> TunnelError | None:
        """None: there is no one connection to lose (a flow's own connection failing
        fails that flow alone)."""
        return None

    @property
    def streams_opened(self) -> int:
        """CONNECT requests sent, as QUIC and h2 count them: a stream refused by the
        peer or reset before :meth:`open_stream` returned counts too (until 2026-12-07
        only those it returned did); a dial that failed sent none."""
        return self._streams_opened + sum(
            p.connection.streams_opened for p in self._flows if p.connection is not None
        )

    @property
    def active_streams(self) -> int:
        return sum(p.connection.active_streams for p in self._flows if p.connection is not None)

    @property
    def can_open_stream(self) -> bool:
        return not self._closed

    @property
    def stream_needs_dial(self) -> bool:
        """True unless the connection of :meth:`TcpTransport.connect` is still unused."""
        return self._spare is None or self._spare.closed.done()

    async def open_stream(
        self,
        target: str,
        headers: dict[str, str] | None = None,
        *,
        wait_response: bool = True,
    ) -> MeshStream:
        """Open a flow on its own TLS connection (see :meth:`PeerConnection.open_stream`).

        ``wait_response`` is ignored: the stream is returned once the peer answered
        the CONNECT, as a new flow's connection has no 0-RTT to gain from sending first.
        """
        target = parse_target(target)
        validate_headers(headers)
        if not isinstance(wait_response, bool):  # ("no" was taken as true, as on QUIC and h2)
            raise TunnelUsageError(f"wait_response must be true or false, not {wait_response!r}")
        if self._closed:
            raise ConnectionLost("connection to the peer is closed")
        protocol, self._spare = self._spare, None
        if protocol is None or protocol.closed.done():
            async with self._dialling:  # (waits, as for stream credit on h2 and QUIC)
                protocol = await self._transport._dial(self._address, self._timeout)
            self.connections_opened += 1
            if self._closed:  # closed while the flow's connection was dialled
                protocol.close()
                raise ConnectionLost("connection to the peer is closed")
            self._flows.add(protocol)
            protocol.closed.add_done_callback(lambda _: self._flow_closed(protocol))
        connection = protocol.connection
        assert connection is not None
        if connection.peer_identity != self.peer_identity:
            protocol.close()
            raise PeerVerificationError(
                f"peer identity changed from {self.peer_identity} to {connection.peer_identity}"
            )
        self._peer_certificate = connection.peer_certificate
        session = connection.session
        if isinstance(session, Http1TunnelSession) and session.can_open_stream():
            session.stream_id = next(self._stream_ids)
        try:
            stream = await connection.open_stream(target, headers)
        except TunnelError:
            if protocol.failure is not None and not isinstance(protocol.failure, ConnectionLost):
                raise protocol.failure from None
            raise
        return stream

    def stats(self) -> dict[str, Any]:
        flows = list(self._flows)
        return {
            "transport": "tcp",
            "peer_identity": self.peer_identity,
            "streams_opened": self.streams_opened,
            "streams_active": self.active_streams,
            "connections_opened": self.connections_opened,
            "connections_active": len(flows),
            "bytes_sent": self._bytes_sent + sum(p.bytes_sent for p in flows),
            "bytes_received": self._bytes_received + sum(p.bytes_received for p in flows),
        }

    def close(self) -> None:
        self._closed = True
        for protocol in list(self._flows):
            if protocol.connection is not None:
                protocol.connection.close()
            else:
                protocol.close()

    async def aclose(self, timeout: float = 10.0) -> None:
        self._closed = True
        spare, self._spare = self._spare, None
        if (
            spare is not None
            and spare.connection is not None
            and not spare.connection.active_streams
        ):
            spare.connection.close()
        closing = [
            p.connection.aclose(timeout) for p in list(self._flows) if p.connection is not None
        ]
        await asyncio.gather(*closing)
        self.close()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        if self._flows:
            await asyncio.gather(*(asyncio.shield(p.closed) for p in list(self._flows)))
        waits = [p.connection.wait_closed() for p in list(self._flows) if p.connection is not None]
        await asyncio.gather(*waits)

    def _flow_closed(self, protocol: TlsTunnelProtocol) -> None:
        if protocol in self._flows:
            self._flows.discard(protocol)
            self._bytes_sent += protocol.bytes_sent
            self._bytes_received += protocol.bytes_received
            if protocol.connection is not None:
                self._streams_opened += protocol.connection.streams_opened


class TcpTransport(Transport):
    """Flows as HTTP/1.1 CONNECT tunnels, one mutual-TLS TCP connection each.

    :param identity: this sidecar's certificate and key.
    :param trust: the CAs peers' certificates must chain to.
    :param receive_window: unread bytes per flow above which the socket is not read.
    :param high_water: unsent bytes per stream above which ``drain()`` waits.
    :param handshake_timeout: seconds a server allows a client for its TLS handshake.
    :param keepalive_interval: seconds a flow's connection may stay idle before the
        kernel's TCP keepalive probes it, and between probes (whole seconds, at least
        1; None: no keepalive).
    :param dead_after: seconds of unanswered keepalive probes after which the kernel
        resets the connection, so the flow on it fails with
        :class:`~quicmesh.errors.PeerUnresponsive` (None: the kernel's 9 probes). A
        dead peer host or a path that drops everything is noticed so on an idle flow,
        in about ``keepalive_interval + dead_after`` seconds. Not a bound on
        unacknowledged data (no ``TCP_USER_TIMEOUT``: the kernel would also reset a
        flow whose destination reads slowly, see :func:`._tcp.tune_liveness`), and a
        hung peer process is not seen (its kernel answers): HTTP/1.1 has no PING.

    A value out of range (``receive_window`` at least 1 KiB, positive seconds and
    bytes) is a :class:`~quicmesh.errors.ConfigError` naming the option, raised here.
    """

    name = "tcp"
    connection_per_flow = True

    def __init__(
        self,
        *,
        identity: Identity,
        trust: TrustBundle,
        receive_window: int = DEFAULT_RECEIVE_WINDOW,
        high_water: int = DEFAULT_HIGH_WATER,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        keepalive_interval: float | None = 1.0,
        dead_after: float | None = 10.0,
    ) -> None:
        super().__init__(identity=identity, trust=trust)
        # (Until 2026-12-07 unchecked: receive_window=0 or handshake_timeout=0 hung or
        # failed every flow, high_water="big" raised TypeError from the first write.)
        check_whole("receive_window", receive_window, 1024, 1 << 40)
        check_whole("high_water", high_water, 1, 1 << 40)
        check_seconds("handshake_timeout", handshake_timeout)
        self.liveness = checked_liveness(keepalive_interval, dead_after)
        """The TCP keepalive of each flow's connection (:func:`._tcp.tune_liveness`)."""
        self.receive_window = receive_window
        self.high_water = high_water
        self.handshake_timeout = handshake_timeout
        self._tls = MutualTlsContexts([ALPN], session_tickets=1)

    def ssl_context(self, *, server_side: bool) -> ssl.SSLContext:
        """The current mutual-TLS context for one side (:class:`MutualTlsContexts`).

        The server sends one TLS session ticket, once it accepted the client's
        certificate: that is how :meth:`connect` learns it. The ticket resumes nothing:
        a listener refuses every resumed session (it would present no certificate).
        """
        return self._tls.get(self.identity, self.trust, server_side=server_side)

    def identity_problem(self, identity: Identity, trust: TrustBundle) -> str | None:
        """Why OpenSSL cannot take ``identity`` and ``trust`` (see :class:`Transport`)."""
        problem = self._tls.problem(identity, trust)
        return None if problem is None else f"tcp: {problem}"

    def set_identity(self, identity: Identity, trust: TrustBundle) -> None:
        """Present ``identity`` from the next handshake on (listeners' contexts too)."""
        checked_tls(identity, trust)  # before the TLS contexts take them
        self._tls.update(identity, trust)
        super().set_identity(identity, trust)

    def session(self, *, is_client: bool, stream_id: int = STREAM_ID) -> Http1TunnelSession:
        """A new sans-IO session for one flow's connection (its stream ``stream_id``)."""
        return Http1TunnelSession(
            is_client=is_client, receive_window=self.receive_window, stream_id=stream_id
        )

    async def listen(
        self,
        address: Address,
        handler: StreamHandler,
        authorize: Authorizer | None = None,
        *,
        early_data: bool = True,
    ) -> TcpListener:
        """Accept peer connections (see :meth:`Transport.listen`); ``early_data`` is
        ignored (no 0-RTT over TLS here).

        The flows it accepts are numbered (their ``stream_id``) 1, 2, 3... in the order
        their connections completed the TLS handshake."""
        authorize = checked_authorizer(authorize)
        stream_ids = itertools.count(STREAM_ID)
        server, protocols = await start_server(
            address,
            context=self.ssl_context(server_side=True),
            alpn=ALPN,
            session_factory=lambda: self.session(is_client=False, stream_id=next(stream_ids)),
            transport_name=self.name,
            handler=handler,
            authorize=authorize,
            high_water=self.high_water,
            handshake_timeout=self.handshake_timeout,
            handshake_failures=self.handshake_failures,
            liveness=self.liveness,
        )
        return TcpListener(server, protocols)

    async def connect(
        self, address: Address, *, timeout: float = 10.0, early_data: bool = False
    ) -> TcpPeerConnection:
        """Connect (see :meth:`Transport.connect`): the first flow's TLS connection,
        kept for the first stream; ``early_data`` is ignored.

        :raises ConfigError: ``timeout`` is not a positive, finite number of seconds.
        """
        check_seconds("timeout", timeout, high=None)
        first = await self._dial(address, timeout, wait_for_ticket=True)
        return TcpPeerConnection(self, address, first, timeout)

    async def _dial(
        self, address: Address, timeout: float, *, wait_for_ticket: bool = False
    ) -> TlsTunnelProtocol:
        return await open_connection(
            address,
            context=self.ssl_context(server_side=False),
            alpn=ALPN,
            session_factory=lambda: self.session(is_client=True),
            transport_name=self.name,
            high_water=self.high_water,
            timeout=timeout,
            wait_for_ticket=wait_for_ticket,
            liveness=self.liveness,
        )
