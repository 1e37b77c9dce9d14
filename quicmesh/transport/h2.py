"""H2Transport: flows as HTTP/2 CONNECT streams over one mutual-TLS TCP connection.

The HBONE-style baseline QUIC is compared against. Each flow is one HTTP/2
stream carrying a CONNECT (RFC 9113 section 8.5), multiplexed on one TLS 1.3
connection (ALPN ``h2``) per peer. The protocol work is in the sans-IO
:class:`~quicmesh.tunnel.h2.H2TunnelSession`; the socket, TLS and write-buffer
handling in :mod:`quicmesh.transport._tcp`, shared with
:class:`~quicmesh.transport.tcp.TcpTransport`.

Both sides present their identity and verify the peer's chain against the
trust bundle during the handshake (``ssl``), then read its SPIFFE ID. A client's
:meth:`H2Transport.connect` returns once the server's SETTINGS arrived, so a
server that refused our certificate is reported there, as
:class:`~quicmesh.errors.PeerVerificationError`.
"""

from __future__ import annotations

import ssl

from ..tls import Identity, TrustBundle
from ..tls.context import MutualTlsContexts
from ..tunnel.h2 import (
    DEFAULT_CONNECTION_WINDOW,
    DEFAULT_MAX_STREAMS,
    DEFAULT_STREAM_WINDOW,
    H2_MAX_STREAM_RATE,
    H2TunnelSession,
)
from ._tcp import (
    TlsListener,
    TlsPeerConnection,
    open_connection,
    start_server,
)
from .base import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    Address,
    Authorizer,
    StreamHandler,
    Transport,
    checked_authorizer,
    checked_tls,
)
from .liveness import checked_liveness
from .stream import DEFAULT_HIGH_WATER, check_positive, check_seconds, check_whole

ALPN = "h2"

MAX_WINDOW = 2**31 - 1
"""The largest flow-control window HTTP/2 has (RFC 9113 6.9.1)."""

H2PeerConnection = TlsPeerConnection
"""A peer connection of :class:`H2Transport`: many CONNECT streams on one HTTP/2 connection."""


class H2Listener(TlsListener):
    """A TCP socket accepting HTTP/2-over-mutual-TLS connections from peer sidecars."""


class H2Transport(Transport):
    """Flows as HTTP/2 CONNECT streams, many per mutual-TLS TCP connection.

    :param identity: this sidecar's certificate and key.
    :param trust: the CAs peers' certificates must chain to.
    :param stream_window: receive window per stream, in bytes.
    :param connection_window: receive window per connection, in bytes.
    :param high_water: unsent bytes per stream above which ``drain()`` waits.
    :param max_streams: concurrent streams a peer may open towards us.
    :param handshake_timeout: seconds a server allows a client for its TLS handshake.
    :param max_stream_rate: new streams per second a peer may open on one connection
        (after a first burst of 1,000; default ``H2_MAX_STREAM_RATE``, 10,000): those
        above are refused unprocessed (REFUSED_STREAM), and a peer far above it (rapid
        reset) loses the connection. None: no limit.
    :param keepalive_interval: seconds without anything from the peer after which a
        connection sends it an HTTP/2 PING (None: never); also the idle time and
        interval of the kernel's TCP keepalive probes (whole seconds, at least 1).
    :param dead_after: seconds after a keepalive PING with nothing from the peer after
        which the connection fails with :class:`~quicmesh.errors.PeerUnresponsive` and
        every stream on it is reset (None: no bound); also ``TCP_USER_TIMEOUT``, the
        longest sent data may stay unacknowledged (:func:`._tcp.tune_liveness`), which
        fails it with :class:`~quicmesh.errors.PeerUnresponsive` too, often first
        ("the peer stopped answering (no PING reply in ...)" either way). As on
        QUIC (``QuicTransport``'s defaults): a dead or hung peer (``kill -9``,
        ``SIGSTOP``, a path that drops everything) is noticed within about
        ``keepalive_interval + dead_after`` seconds, on both sides of a connection.

    A value out of range (windows 1 KiB to :data:`MAX_WINDOW`, ``max_streams`` at
    least 1, positive seconds and bytes) is a :class:`~quicmesh.errors.ConfigError`
    naming the option, raised here.
    """

    name = "h2"

    def __init__(
        self,
        *,
        identity: Identity,
        trust: TrustBundle,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        high_water: int = DEFAULT_HIGH_WATER,
        max_streams: int = DEFAULT_MAX_STREAMS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_stream_rate: float | None = H2_MAX_STREAM_RATE,
        keepalive_interval: float | None = 1.0,
        dead_after: float | None = 10.0,
    ) -> None:
        super().__init__(identity=identity, trust=trust)
        # (Until 2026-12-07 unchecked: max_streams=0 or stream_window=0 hung the first
        # stream, high_water="big" raised TypeError from the first write.)
        check_whole("stream_window", stream_window, 1024, MAX_WINDOW)
        check_whole("connection_window", connection_window, 1024, MAX_WINDOW)
        check_whole("high_water", high_water, 1, 1 << 40)
        check_whole("max_streams", max_streams, 1, 1 << 30)
        check_seconds("handshake_timeout", handshake_timeout)
        if max_stream_rate is not None:
            check_positive("max_stream_rate", max_stream_rate)
        # (Until 2026-12-07 none: a hung peer's flows stayed open for as long as the
        # kernel kept its TCP connection, for ever when it was idle.)
        self.liveness = checked_liveness(keepalive_interval, dead_after)
        """When a connection PINGs its peer and when it gives up on it."""
        self.max_stream_rate = max_stream_rate
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.high_water = high_water
        self.max_streams = max_streams
        self.handshake_timeout = handshake_timeout
        self._tls = MutualTlsContexts([ALPN])

    def ssl_context(self, *, server_side: bool) -> ssl.SSLContext:
        """The current mutual-TLS context for one side (:class:`MutualTlsContexts`)."""
        return self._tls.get(self.identity, self.trust, server_side=server_side)

    def identity_problem(self, identity: Identity, trust: TrustBundle) -> str | None:
        """Why OpenSSL cannot take ``identity`` and ``trust`` (see :class:`Transport`)."""
        problem = self._tls.problem(identity, trust)
        return None if problem is None else f"h2: {problem}"

    def set_identity(self, identity: Identity, trust: TrustBundle) -> None:
        """Present ``identity`` from the next handshake on (listeners' contexts too)."""
        checked_tls(identity, trust)  # before the TLS contexts take them
        self._tls.update(identity, trust)
        super().set_identity(identity, trust)

    def session(self, *, is_client: bool) -> H2TunnelSession:
        """A new sans-IO session for one connection."""
        return H2TunnelSession(
            is_client=is_client,
            stream_window=self.stream_window,
            connection_window=self.connection_window,
            max_streams=self.max_streams,
            max_stream_rate=self.max_stream_rate,
        )

    async def listen(
        self,
        address: Address,
        handler: StreamHandler,
        authorize: Authorizer | None = None,
        *,
        early_data: bool = True,
    ) -> H2Listener:
        """Accept peer connections (see :meth:`Transport.listen`); TLS over TCP has
        no 0-RTT here, so ``early_data`` is ignored."""
        authorize = checked_authorizer(authorize)
        server, protocols = await start_server(
            address,
            context=self.ssl_context(server_side=True),
            alpn=ALPN,
            session_factory=lambda: self.session(is_client=False),
            transport_name=self.name,
            handler=handler,
            authorize=authorize,
            high_water=self.high_water,
            handshake_timeout=self.handshake_timeout,
            handshake_failures=self.handshake_failures,
            liveness=self.liveness,
            user_timeout=True,
        )
        return H2Listener(server, protocols)

    async def connect(
        self, address: Address, *, timeout: float = 10.0, early_data: bool = False
    ) -> H2PeerConnection:
        """Connect (see :meth:`Transport.connect`); ``early_data`` is ignored: the
        connection is returned once the TLS handshake has completed.

        :raises ConfigError: ``timeout`` is not a positive, finite number of seconds.
        """
        check_seconds("timeout", timeout, high=None)
        protocol = await open_connection(
            address,
            context=self.ssl_context(server_side=False),
            alpn=ALPN,
            session_factory=lambda: self.session(is_client=True),
            transport_name=self.name,
            high_water=self.high_water,
            timeout=timeout,
            liveness=self.liveness,
            user_timeout=True,
        )
        assert protocol.connection is not None
        return protocol.connection
