"""QuicTransport: flows as HTTP/3 CONNECT streams over QUIC.

The transport holds the settings and the shared state (tickets, counters) and
makes connections: :meth:`QuicTransport.connect` opens a UDP socket connected to
the peer and a :class:`~quicmesh.transport.quic.connection.QuicPeerConnection`
(the driver of one QUIC connection) over an engine connection;
:meth:`QuicTransport.listen` binds a
:class:`~quicmesh.transport.quic.listener.BatchingQuicServer` that makes one
driver per accepted connection. The engine is chosen by name
(:mod:`quicmesh.transport.quic.engine`); the default is
:func:`~quicmesh.transport.base.default_quic_engine` (native where its extension
is built, else aioquic; ``QUICMESH_QUIC_ENGINE`` names another). With a socket engine
(``engine="native"``, :mod:`quicmesh.transport.quic.native_engine`) the engine owns
the UDP sockets: :meth:`QuicTransport.connect` and
:meth:`QuicTransport.listen` ask it for a connection or a listener
(:class:`~quicmesh.transport.quic.listener.SocketEngineListener`) and the same
driver and HTTP/3 tunnel session run over it.

Mutual TLS: the client's engine verifies the server's chain (``cadata``), the
driver its SPIFFE ID; the server's engine asks for a client certificate and the
driver verifies its chain and SPIFFE ID with :func:`quicmesh.tls.verify_peer`
when the handshake completes, before any stream is served.

0-RTT resumption (:meth:`QuicTransport.connect` with ``early_data=True``): a
resumed handshake carries no certificate, so each session ticket is stored with
the identity verified when it was issued (:mod:`quicmesh.transport.tickets`).
The client returns a connection at once, with the identity its ticket recorded;
streams opened with ``wait_response=False`` send their CONNECT and first bytes
(up to ``max_early_data``) as 0-RTT; when the handshake completes the identity is
confirmed (or every stream fails with :class:`PeerVerificationError`) and, if the
server rejected 0-RTT, that data is sent again in 1-RTT packets at once. The
server serves 0-RTT streams as soon as a single-use ticket is redeemed, with the
identity the ticket was issued to; a replayed first flight finds no ticket.

Connection migration (:meth:`QuicPeerConnection.migrate`): the client moves to a
new UDP socket and the next connection ID; the server (aioquic) validates the
new path and limits what it sends there to three times what it received until
then. Migrations and path validations are counted per connection and per
transport (:attr:`QuicTransport.counters`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
import weakref
from collections import Counter
from dataclasses import replace
from typing import cast

from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from ..._aioquic import MeshQuicConnection
from ..._timeouts import wait_within
from ...errors import (
    ConfigError,
    ConnectError,
    PeerVerificationError,
    QuicmeshError,
    os_error_text,
)
from ...tls import Identity, TrustBundle
from ...tls.check import handshake_failure_reason, key_refusal
from ...tunnel.h3 import DEFAULT_CONNECTION_WINDOW, DEFAULT_STREAM_WINDOW
from .. import _udp
from .._admission import ADMISSION_COUNTERS, AdmissionConfig
from .._stream_rate import DEFAULT_STREAM_RATE, StreamRates
from ..base import (
    STATELESS_RESET_KEY_MAX_BYTES,
    STATELESS_RESET_KEY_MIN_BYTES,
    Address,
    Authorizer,
    EngineAcceptor,
    FlowEvents,
    InboundDecider,
    StreamHandler,
    Transport,
    checked_address,
    checked_authorizer,
    checked_tls,
    default_quic_engine,
    exposed_secret,
)
from ..liveness import MAX_LIVENESS_SECONDS, checked_liveness
from ..stream import check_positive, check_seconds, check_whole
from ..tickets import TicketCache, TicketStore
from . import aioquic_engine
from .connection import (
    QuicPeerConnection,
    SocketReceiver,
    numeric_address,
    tune_udp_socket,
)
from .engine import (
    EngineError,
    EngineLimits,
    EngineListener,
    EngineTls,
    QuicEngine,
    SocketConnection,
    get_engine,
)
from .listener import BatchingQuicServer, QuicListener, SocketEngineListener
from .native_flows import FlowAcceptor, engine_flows_available
from .options import (
    ACK_ELICITING_THRESHOLD_MAX,
    COUNTERS,
    DEFAULT_ACK_ELICITING_THRESHOLD,
    DEFAULT_MAX_EARLY_DATA,
    QuicOptions,
)

logger = logging.getLogger("quicmesh.transport.quic")

RECEIVE_BATCH = _udp.DEFAULT_MAX_DATAGRAMS
"""Datagrams a QUIC socket reads per readiness event by default (``receive_batch``)."""

_RECVERR_MESSAGES = frozenset(
    {(socket.IPPROTO_IP, _udp.IP_RECVERR), (socket.IPPROTO_IPV6, _udp.IPV6_RECVERR)}
)
"""The control messages (level, type) that carry an error queue entry's ``sock_extended_err``."""

MAX_QUEUED_ERRORS = 256
"""Error queue entries read in one go at most (the rest on the next wake-up), as the
native engine reads them."""


def check_early_data(early_data: object) -> None:
    """``early_data`` must be a bool: aioquic took any truthy value (``"false"``
    included) as True, and the native engine failed with PyO3's TypeError."""
    if not isinstance(early_data, bool):
        raise ConfigError(f"early_data must be true or false, not {early_data!r}")


class QuicTransport(Transport):
    """Flows as HTTP/3 CONNECT streams, many per QUIC connection.

    :param identity: this sidecar's certificate and key.
    :param trust: the CAs peers' certificates must chain to.
    :param congestion_control: ``"reno"``, ``"cubic"`` (aioquic's) or ``"bbr"`` (the
        names the engine lists, :meth:`.engine.QuicEngine.congestion_controls`; another
        is a :class:`ConfigError`); by default the host's TCP algorithm
        (:func:`~quicmesh.congestion.default_congestion_control`).
    :param idle_timeout: seconds of silence before a connection is dropped.
    :param stream_window: receive window per stream, in bytes.
    :param connection_window: receive window per connection, in bytes.
    :param high_water: unsent bytes per stream above which ``drain()`` waits.
    :param max_streams: concurrent streams a peer may open towards us.
    :param qlog_dir: write a qlog file per connection there.
    :param ticket_cache: (client) session tickets per peer, for ``connect(...,
        early_data=True)``; by default in memory only. Pass
        ``TicketCache(path)`` to resume after a restart.
    :param ticket_store: (server) the tickets this transport's listeners issued:
        single use, expiring. Replicas behind one address must share one.
    :param max_early_data: (client) payload bytes sent as 0-RTT before the
        handshake completes, over all streams; further bytes wait for the
        handshake. (server) 0-RTT stream bytes accepted, plus
        ``EARLY_DATA_OVERHEAD`` for headers and framing; more closes the connection.
    :param rebind_after_ptos: (client) move to a new UDP port after this many
        consecutive probe timeouts, as when a NAT mapping died (off by default).
    :param receive_batch: datagrams read from a socket per readiness event, each
        connection then transmitting once (:mod:`quicmesh.transport._udp`); 1
        reads one at a time, as plain asyncio does. By default
        :data:`RECEIVE_BATCH`, or the ``QUICMESH_RECEIVE_BATCH`` environment
        variable when set (for A/B benchmarks, whose servers run in child processes).
    :param max_datagram_size: largest UDP payload sent, 1200 (aioquic's default and
        QUIC's minimum, safe on any path) to 1452 (the most a 1500-byte MTU carries
        over IPv6). aioquic does no path MTU discovery: raise it only on paths known
        to carry it; larger datagrams cost fewer packets (and less CPU) per byte.
        The native engine starts at this size and, with ``mtu_discovery``, probes the
        path for more.
    :param mtu_discovery: (native engine) path MTU discovery (DPLPMTUD, RFC 8899 /
        RFC 9000 14.3, quinn's): probe for datagrams up to 1452 bytes of UDP payload
        and fall back to 1200 when they stop arriving. aioquic has none.
    :param send_window: (native engine) bytes of stream data quinn holds
        unacknowledged over all streams (None: quinn's default, about 10 MB). A bulk
        stream can fill it, and a new write on another stream then waits for it to
        drain: smaller bounds that head-of-line wait (docs/performance.md: 256 KiB
        took quic-bbr's p99 next to a bulk flow from 1.54x to 0.69x h2-bbr's) but
        caps throughput at about send_window per round trip.
    :param ack_eliciting_threshold: (native engine) ack-eliciting packets a native
        peer may receive before it must acknowledge (ACK_FREQUENCY frames,
        draft-ietf-quic-ack-frequency; it still acknowledges within its
        max_ack_delay, and at once on reordering). 1 is RFC 9000's default, an ACK
        for every second packet, and sends no such frames; aioquic peers ignore it.
    :param admission: (server) half-open connection caps, Retry policy and
        handshake timeout (:mod:`quicmesh.transport._admission`); protective
        defaults. Its counters (:data:`ADMISSION_COUNTERS`) join :attr:`counters`.
    :param stateless_reset_key: (server) secret from which the stateless reset
        token of every connection ID is derived (at least 16 bytes). Give the same
        key after a restart (:func:`load_stateless_reset_key`) and a peer whose
        connection the restart lost learns it from its next packet (RFC 9000
        10.3) instead of waiting for its idle timeout. Random by default.
    :param keepalive_interval: seconds of silence after which an idle connection
        PINGs its peer (None: never), so a dead peer is noticed while no flow sends.
        At most half of ``idle_timeout`` in effect (RFC 9000 10.1.2), so that a live
        connection is never dropped as idle (:attr:`liveness` holds the value used).
    :param max_probe_timeouts: consecutive probe timeouts without an acknowledgement
        after which the connection fails with :class:`~quicmesh.errors.PeerUnresponsive`
        and every stream on it is reset (None: only the idle timeout ends it).
    :param dead_after: seconds with packets unacknowledged and nothing received
        after which the connection fails the same way (None: no bound).
        :mod:`quicmesh.transport.liveness` has the rules, ICMP unreachable included.
    :param max_stream_rate: (server) new streams per second one peer identity may
        open, over all its connections, through the stream credit (MAX_STREAMS) it
        is granted (:mod:`quicmesh.transport._stream_rate`; None: as fast as its
        streams end). Churn and rapid reset cost the listener no more than this.
    :param engine: the QUIC implementation, by name (:func:`.engine.get_engine`):
        ``"native"`` (quinn + rustls in Rust, when the extension is built; otherwise
        :class:`ConfigError` says how to get it) or ``"aioquic"`` (pure Python).
        None (the default): :func:`~quicmesh.transport.base.default_quic_engine`
        (native where the extension is built, else aioquic; ``QUICMESH_QUIC_ENGINE``
        names another). An unknown name raises
        :class:`ValueError` naming the valid ones. What the native engine does
        differently (tickets, liveness, the settings it ignores) is in
        :mod:`quicmesh.transport.quic.native_engine`.

    Any other option of the wrong type or out of range is a :class:`ConfigError`
    naming it, raised here, before anything runs.

    The kernel reports ICMP port and host unreachable (aioquic: a client's UDP
    socket is connected to its peer; native: the endpoint socket reads its error
    queue): :meth:`connect` then fails at once with
    :class:`~quicmesh.errors.ConnectError` instead of waiting for its timeout.

    :attr:`counters` adds up, over every connection of this transport, the keys
    in :data:`COUNTERS`: 0-RTT attempted / accepted / rejected, tickets received
    (client) and issued / redeemed / refused (server), migrations by cause
    (``active``: :meth:`QuicPeerConnection.migrate`; ``auto_rebind``; and, on a
    server, ``peer_address_change``), and path validations ok / failed.
    """

    name = "quic"

    def __init__(
        self,
        *,
        identity: Identity,
        trust: TrustBundle,
        congestion_control: str | None = None,
        idle_timeout: float = 60.0,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        high_water: int = 64 * 1024,
        max_streams: int = 128,
        qlog_dir: str | None = None,
        ticket_cache: TicketCache | None = None,
        ticket_store: TicketStore | None = None,
        max_early_data: int = DEFAULT_MAX_EARLY_DATA,
        rebind_after_ptos: int | None = None,
        receive_batch: int | None = None,
        max_datagram_size: int = 1200,
        mtu_discovery: bool = True,
        ack_eliciting_threshold: int = DEFAULT_ACK_ELICITING_THRESHOLD,
        send_window: int | None = None,
        admission: AdmissionConfig | None = None,
        stateless_reset_key: bytes | None = None,
        keepalive_interval: float | None = 1.0,
        max_probe_timeouts: int | None = 6,
        dead_after: float | None = 10.0,
        engine: str | None = None,
        max_stream_rate: float | None = DEFAULT_STREAM_RATE,
    ) -> None:
        super().__init__(identity=identity, trust=trust)
        if engine is None:
            engine = default_quic_engine()
        elif not isinstance(engine, str):
            raise ConfigError(f"engine must be a QUIC engine's name, not {engine!r}")
        found = get_engine(engine)
        if found.io == "datagrams" and not isinstance(found, aioquic_engine.AioquicEngine):
            raise ConfigError(
                f"QUIC engine {engine!r}: the only datagram engine the transport runs is aioquic"
            )
        self.engine: QuicEngine = found
        """The QUIC engine connections are built with (:mod:`.engine`)."""
        if found.io == "socket":
            # A transport dropped without aclose() lets go of the engine's client
            # endpoint as aclose() does (the event loop's watch of its descriptor kept
            # it, and its sockets, until the loop closed: 4 descriptors a transport).
            weakref.finalize(self, found.close).atexit = False
        if congestion_control is None:
            from ...congestion.host import default_congestion_control

            congestion_control = default_congestion_control()
        # Each engine's own names (aioquic's registered controllers, BBR included; the
        # native engine's quinn ones): any other was aioquic's bare Exception at the
        # first handshake (a listener logged one per Initial), the native engine's
        # ConnectError at connect.
        controls = found.congestion_controls()
        if congestion_control not in controls:
            raise ConfigError(
                f"congestion_control must be one of {', '.join(controls)} on the "
                f"{found.name} QUIC engine, not {congestion_control!r}"
            )
        self.congestion_control = congestion_control
        # (On the native engine a float, a negative or a 2**64 was a bare TypeError or
        # OverflowError, or a stale-build warning; aioquic took them. A string was a
        # TypeError on both.)
        check_whole("stream_window", stream_window, 1024, 1 << 40)
        check_whole("connection_window", connection_window, 1024, 1 << 40)
        check_whole("high_water", high_water, 1, 1 << 40)
        check_whole("max_streams", max_streams, 1, 1 << 30)
        check_seconds("idle_timeout", idle_timeout, high=MAX_LIVENESS_SECONDS)
        check_whole("max_early_data", max_early_data, 0, 1 << 32)
        if rebind_after_ptos is not None:
            check_whole("rebind_after_ptos", rebind_after_ptos, 1, 1 << 30)
            if found.io == "socket":  # (it was taken, and the connection died unrebound)
                raise ConfigError(
                    f"rebind_after_ptos is not applied by the {found.name} QUIC engine "
                    "(quinn 0.11 moves a connection only when asked): leave it unset, call "
                    "migrate() on probe timeouts, or use engine='aioquic'"
                )
        check_whole("max_datagram_size", max_datagram_size, 1200, 1452, span="1200 to 1452")
        if not isinstance(mtu_discovery, bool):
            raise ConfigError(f"mtu_discovery must be True or False, not {mtu_discovery!r}")
        check_whole(
            "ack_eliciting_threshold",
            ack_eliciting_threshold,
            0,
            ACK_ELICITING_THRESHOLD_MAX,
            span=f"0 to {ACK_ELICITING_THRESHOLD_MAX}",
        )
        if send_window is not None:
            check_whole("send_window", send_window, 16 * 1024, 1 << 40, span="16 KiB to 1 TiB")
        liveness = checked_liveness(keepalive_interval, dead_after, max_probe_timeouts)
        if max_stream_rate is not None:
            check_positive("max_stream_rate", max_stream_rate)
        if qlog_dir is not None and not isinstance(qlog_dir, str | os.PathLike):
            raise ConfigError(f"qlog_dir must be a directory's path, not {qlog_dir!r}")
        for name, value, kind in (
            ("ticket_cache", ticket_cache, TicketCache),
            ("ticket_store", ticket_store, TicketStore),
            ("admission", admission, AdmissionConfig),
        ):
            if value is not None and not isinstance(value, kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, not {value!r}")
        if stateless_reset_key is not None and not isinstance(stateless_reset_key, bytes):
            raise ConfigError(
                f"stateless_reset_key must be bytes, not {type(stateless_reset_key).__name__}"
            )
        self.idle_timeout = idle_timeout
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.high_water = high_water
        self.max_streams = max_streams
        self.stream_rates = StreamRates(max_stream_rate, burst=max_streams)
        """(server) One new-stream token bucket per peer identity (:mod:`.._stream_rate`)."""
        self.qlog_dir = qlog_dir
        self.ticket_cache = ticket_cache if ticket_cache is not None else TicketCache()
        self.ticket_store = ticket_store if ticket_store is not None else TicketStore()
        self.max_early_data = max_early_data
        self.rebind_after_ptos = rebind_after_ptos
        if receive_batch is None:
            setting = os.environ.get("QUICMESH_RECEIVE_BATCH", str(RECEIVE_BATCH))
            receive_batch = int(setting) if setting.isdigit() else 0
        check_whole("receive_batch", receive_batch, 1, 1 << 16)
        self.receive_batch = receive_batch
        self.max_datagram_size = max_datagram_size
        self.mtu_discovery = mtu_discovery
        self.ack_eliciting_threshold = ack_eliciting_threshold
        self.send_window = send_window
        if keepalive_interval is not None:
            # RFC 9000 10.1.2: PING more often than the idle timeout. At or below it, a
            # live flow quiet for the idle timeout was dropped ("timed out") before its
            # first keepalive was due. (A peer whose idle timeout is shorter than ours
            # PINGs within its own half, which keeps the connection open both ways.)
            liveness = replace(
                liveness, keepalive_interval=min(keepalive_interval, idle_timeout / 2)
            )
        self.liveness = liveness
        """The rules every connection's liveness runs (``keepalive_interval`` as in effect)."""
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self.counters.update({name: 0 for name in ADMISSION_COUNTERS})
        self.admission = admission if admission is not None else AdmissionConfig()
        if stateless_reset_key is not None and len(stateless_reset_key) < 16:
            raise ConfigError("stateless_reset_key must be at least 16 bytes")
        self.stateless_reset_key = stateless_reset_key or os.urandom(32)
        self._server_configurations: list[QuicConfiguration] = []
        self._socket_listeners: weakref.WeakSet[EngineListener] = weakref.WeakSet()

    async def aclose(self) -> None:
        """Release the engine's own sockets (the native engine's client endpoint: now
        if no connection is open on it, else once the last one ends; connections are
        closed through their own objects)."""
        self.engine.close()

    def set_stream_rate(self, identity: str, rate: float | None) -> bool:
        self.stream_rates.set_rate(identity, rate, time.monotonic())
        return True

    def identity_problem(self, identity: Identity, trust: TrustBundle) -> str | None:
        """Why this transport's QUIC engine cannot take ``identity`` and ``trust`` (see
        :class:`Transport`). A socket engine (native: rustls, which knows RSA, ECDSA
        P-256/P-384 and Ed25519 keys, not the P-521 or Ed448 keys Python accepts) loads
        them into a listener on a loopback port, closed at once (about 1 ms); aioquic
        signs with the key as ``cryptography`` loaded it, so whatever an
        :class:`Identity` holds, it can use. A probe that cannot open its socket (out of
        descriptors, say) says nothing against the certificate: logged, None."""
        if self.engine.io != "socket":
            return None
        tls = EngineTls(identity=identity, trust=trust)
        try:
            probe = self.engine.listen(
                self.engine_limits(), tls, ("127.0.0.1", 0), wake=lambda: None
            )
        except (EngineError, QuicmeshError) as exc:
            if str(exc).startswith("cannot bind") or "(os error" in str(exc):
                logger.warning(
                    "could not check the new certificate on the %s QUIC engine (%s): taking it",
                    self.engine.name,
                    exc,
                )
                return None
            reason = key_refusal(identity, "rustls") or exc
            return f"the {self.engine.name} QUIC engine cannot use the new certificate: {reason}"
        probe.close()
        return None

    def set_identity(self, identity: Identity, trust: TrustBundle) -> None:
        """Present ``identity`` from the next handshake on, on listeners too. A trust
        bundle that drops a CA forgets the session tickets this (aioquic) side issued and
        the ones cached for peers: a client or server verified under the old bundle
        resumes no session; adding a CA (the first step of a CA rotation) keeps them.
        (A native listener starts a new ticket store with any new bundle.)"""
        checked_tls(identity, trust)
        root_removed = trust.lacks_a_root_of(self.trust)
        super().set_identity(identity, trust)
        if root_removed:
            self.ticket_store.clear()
            self.ticket_cache.clear()
        for config in self._server_configurations:
            config.certificate = identity.certificate
            config.certificate_chain = identity.chain
            config.private_key = identity.private_key
            config.cadata = trust.pem
        for listener in list(self._socket_listeners):
            listener.set_identity(EngineTls(identity=identity, trust=trust))

    @property
    def runs_engine_flows(self) -> bool:
        """True on the native engine built with outbound flows (:mod:`.native_flows`)."""
        return self.engine.name == "native" and engine_flows_available()

    def engine_acceptor(self, sock: socket.socket, events: FlowEvents) -> EngineAcceptor | None:
        """The native engine's accept loop on ``sock`` (:mod:`.native_flows`)."""
        if not self.runs_engine_flows:
            return None
        return FlowAcceptor(sock, events)

    def engine_limits(self) -> EngineLimits:
        """The transport settings every connection's engine gets."""
        return EngineLimits(
            idle_timeout=self.idle_timeout,
            stream_window=self.stream_window,
            connection_window=self.connection_window,
            max_streams=self.max_streams,
            congestion_control=self.congestion_control,
            max_datagram_size=self.max_datagram_size,
            mtu_discovery=self.mtu_discovery,
            ack_eliciting_threshold=self.ack_eliciting_threshold,
            qlog_dir=self.qlog_dir,
            stateless_reset_key=self.stateless_reset_key,
            alpn=tuple(H3_ALPN),
            keep_alive=self.liveness.keepalive_interval,
            send_window=self.send_window,
            admission=self.admission,
            max_early_data=self.max_early_data,
        )

    def options(self) -> QuicOptions:
        """The settings a new connection driver gets (a snapshot: :meth:`set_identity`
        changes the trust bundle of later connections)."""
        return QuicOptions(
            trust=self.trust,
            high_water=self.high_water,
            stream_window=self.stream_window,
            connection_window=self.connection_window,
            max_early_data=self.max_early_data,
            rebind_after_ptos=self.rebind_after_ptos,
            receive_batch=self.receive_batch,
            liveness=self.liveness,
            ticket_cache=self.ticket_cache,
            ticket_store=self.ticket_store,
            stream_rates=self.stream_rates,
            own_identity=self.identity.spiffe_id,
        )

    def configuration(self, *, is_client: bool) -> QuicConfiguration:
        """The aioquic configuration for one side of a connection."""
        return aioquic_engine.configuration(
            self.engine_limits(),
            EngineTls(identity=self.identity, trust=self.trust),
            is_client=is_client,
        )

    async def listen(
        self,
        address: Address,
        handler: StreamHandler,
        authorize: Authorizer | None = None,
        *,
        early_data: bool = True,
    ) -> QuicListener | SocketEngineListener:
        """Accept peer connections (see :meth:`Transport.listen`).

        :param early_data: accept 0-RTT from clients resuming with a ticket. False:
            no 0-RTT is taken; on aioquic sessions still resume (no certificates) and
            their 0-RTT is rejected, which the clients then send again in 1-RTT; the
            native engine issues no tickets then, so every handshake is a full one.
        :raises ConfigError: our certificate carries no SPIFFE ID (no client could
            verify it), as :meth:`connect` raises; ``early_data`` is not a bool.
        """
        check_early_data(early_data)
        authorize = checked_authorizer(authorize)
        self.identity.spiffe_id  # noqa: B018 - raises ConfigError naming the certificate
        address = await numeric_address(checked_address(address, "listen address"), "listen on")
        if self.engine.io == "socket":
            return self._listen_socket(address, handler, authorize, early_data=early_data)
        config = self.configuration(is_client=False)
        self._server_configurations.append(config)

        accepted: weakref.WeakSet[QuicPeerConnection] = weakref.WeakSet()

        limits = self.engine_limits()

        def accept(
            original_cid: bytes | None, retry_source_cid: bytes | None
        ) -> tuple[MeshQuicConnection, QuicPeerConnection]:
            driver: list[QuicPeerConnection] = []
            tls = EngineTls(
                identity=self.identity,
                trust=self.trust,
                fetch_ticket=lambda label: driver[0].redeem_ticket(label),
                ticket_issued=lambda ticket: driver[0].ticket_issued(ticket),
                accept_early_data=early_data,
            )
            quic = cast(aioquic_engine.AioquicEngine, self.engine).accept(
                limits,
                tls,
                original_destination_connection_id=original_cid,
                retry_source_connection_id=retry_source_cid,
                config=config,
            )
            connection = QuicPeerConnection(
                quic,
                self.options(),
                counters=self.counters,
                handshake_failures=self.handshake_failures,
                handler=handler,
                authorize=authorize,
            )
            driver.append(connection)
            accepted.add(connection)
            return quic, connection

        try:
            _, server = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: BatchingQuicServer(
                    configuration=config,
                    max_datagrams=self.receive_batch,
                    admission=self.admission,
                    counters=self.counters,
                    reset_key=self.stateless_reset_key,
                    accept=accept,
                ),
                local_addr=(address[0], address[1]),
            )
        except OSError as exc:
            raise ConnectError(
                f"cannot listen on UDP {address[0]}:{address[1]}: {os_error_text(exc)}"
            ) from None
        assert server._transport is not None
        tune_udp_socket(server._transport)
        return QuicListener(server, accepted)

    async def connect(
        self, address: Address, *, timeout: float = 10.0, early_data: bool = False
    ) -> QuicPeerConnection:
        """Connect to the peer sidecar at ``address`` (see :meth:`Transport.connect`).

        :param early_data: resume with a ticket cached for ``address`` and return
            before the handshake completes, so that streams opened with
            ``open_stream(..., wait_response=False)`` send their CONNECT and first
            bytes as 0-RTT. Only for flows whose first bytes are safe to replay
            (0-RTT data can be replayed by an attacker unless the server's tickets
            are single use, as quicmesh's are). Without a cached ticket this is
            an ordinary connect (:attr:`QuicPeerConnection.early_data` ``"none"``).
            A handshake failure then surfaces on the streams, not here.
        :raises ConfigError: ``address`` is not a ``(host, port)`` pair, or ``timeout``
            not a positive, finite number of seconds (the caller's mistake: until
            2026-12-07 ``timeout=-1`` was a ConnectError "timed out after -1s"), or
            ``early_data`` not a bool.
        """
        address = checked_address(address, "connect address")
        check_seconds("timeout", timeout, high=None)
        check_early_data(early_data)
        address = await numeric_address(address, "connect to")
        if self.engine.io == "socket":
            return await self._connect_socket(address, timeout=timeout, early_data=early_data)
        loop = asyncio.get_running_loop()
        config = self.configuration(is_client=True)
        cached = self.ticket_cache.take(address, self.identity.spiffe_id) if early_data else None
        if cached is not None:
            config.session_ticket = cached.ticket
        quic = cast(aioquic_engine.AioquicEngine, self.engine).connect(
            self.engine_limits(),
            EngineTls(identity=self.identity, trust=self.trust),
            address,
            config=config,
        )
        connection = QuicPeerConnection(
            quic,
            self.options(),
            counters=self.counters,
            handshake_failures=self.handshake_failures,
            owns_socket=True,
            peer_address=address,
            ticket_identity=cached.identity if cached is not None else None,
        )
        try:
            # Connected, and asking for every ICMP error (IP_RECVERR) where the event loop
            # takes it: the kernel then reports port, host and network unreachable.
            sock = _udp.client_udp_socket(address, recverr=takes_error_queue(loop))
        except OSError as exc:
            raise ConnectError(
                f"cannot open a UDP socket to {address[0]}:{address[1]}: {exc.strerror or exc}"
            ) from None
        try:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: ErrorQueueReceiver(connection, self.receive_batch, sock), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        connection.connected_socket = udp
        connection.connection_made(udp)
        tune_udp_socket(udp)
        connection.close_socket_when_done()
        # The peer's address as the socket reports it on each datagram (IPv6: a
        # 4-tuple), which aioquic matches against the path it connected on.
        peer = udp.get_extra_info("peername") or address
        if cached is not None and cached.ticket.max_early_data_size is not None:
            try:
                connection.connect(peer)
            except OSError as exc:
                connection.close_socket()
                raise ConnectError(
                    f"QUIC connection to {address[0]}:{address[1]} failed: {exc}"
                ) from None
            connection.start_early(cached.identity)
            connection.limit_early_handshake(timeout)
            return connection
        try:
            connection.connect(peer)
            await wait_within(asyncio.shield(connection.handshake_finished), timeout)
        except (TimeoutError, ConnectionError, OSError) as exc:
            connection.abandon()
            if connection.failure is not None:
                raise connection.failure from None
            if isinstance(exc, asyncio.TimeoutError):
                raise ConnectError(
                    f"QUIC handshake with {address[0]}:{address[1]} timed out after {timeout:g}s"
                ) from None
            raise ConnectError(
                f"QUIC connection to {address[0]}:{address[1]} failed: {exc}"
            ) from None
        except asyncio.CancelledError:
            # Abandoned (e.g. the other side of an AutoTransport race won): no socket left.
            connection.abandon()
            raise
        if not connection.established:
            connection.close_socket()
            raise connection.failure or ConnectError("QUIC handshake failed")
        return connection

    # -- socket engines ------------------------------------------------------------------

    def _listen_socket(
        self,
        address: Address,
        handler: StreamHandler,
        authorize: Authorizer | None,
        *,
        early_data: bool,
    ) -> SocketEngineListener:
        """:meth:`listen` on a socket engine: it binds and accepts; one driver per
        connection it accepted."""
        accepted: weakref.WeakSet[QuicPeerConnection] = weakref.WeakSet()
        found: list[EngineListener] = []
        engine_flows: list[InboundDecider | None] = [None]

        def wake() -> None:
            listener = found[0]
            self.counters.update(listener.counted())
            for reason in listener.refused():
                refusal = PeerVerificationError(reason)
                self.handshake_failures[handshake_failure_reason(refusal)[0]] += 1
            for quic in listener.accepted():
                driver = QuicPeerConnection(
                    quic,
                    self.options(),
                    counters=self.counters,
                    handshake_failures=self.handshake_failures,
                    handler=handler,
                    authorize=authorize,
                )
                driver.inbound_decider = engine_flows[0]
                accepted.add(driver)

        tls = EngineTls(identity=self.identity, trust=self.trust, accept_early_data=early_data)
        try:
            found.append(self.engine.listen(self.engine_limits(), tls, address, wake=wake))
        except EngineError as exc:
            raise ConnectError(f"cannot listen on UDP {address[0]}:{address[1]}: {exc}") from None
        self._socket_listeners.add(found[0])
        return SocketEngineListener(found[0], accepted, engine_flows)

    async def _connect_socket(
        self, address: Address, *, timeout: float, early_data: bool
    ) -> QuicPeerConnection:
        """:meth:`connect` on a socket engine (its first flight is on its way when
        it returns the connection; 0-RTT when it resumed a session)."""
        tls = EngineTls(identity=self.identity, trust=self.trust)
        try:
            # Resumed only when asked (as the aioquic engine): an ordinary connect verifies
            # the server's certificate of now, not the one a ticket recorded.
            quic = self.engine.connect(self.engine_limits(), tls, address, resume=early_data)
        except EngineError as exc:
            raise ConnectError(str(exc)) from None
        assert isinstance(quic, SocketConnection)
        identity = quic.resumed_identity()
        connection = QuicPeerConnection(
            quic,
            self.options(),
            counters=self.counters,
            handshake_failures=self.handshake_failures,
            owns_socket=True,
            peer_address=address,
            ticket_identity=identity,
        )
        if early_data and quic.early and identity is not None:
            connection.start_early(identity)
            connection.connect(address)
            connection.limit_early_handshake(timeout)
            return connection
        try:
            connection.connect(address)
            await wait_within(asyncio.shield(connection.handshake_finished), timeout)
        except TimeoutError:
            connection.abandon()
            raise ConnectError(
                f"QUIC handshake with {address[0]}:{address[1]} timed out after {timeout:g}s"
            ) from None
        except asyncio.CancelledError:
            connection.abandon()
            raise
        if not connection.established:
            raise connection.failure or ConnectError("QUIC handshake failed")
        return connection


def takes_error_queue(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether a UDP socket of ``loop`` may ask for ICMP errors (``IP_RECVERR``):
    asyncio's own (selector) loops, which leave the socket's error queue to
    :class:`ErrorQueueReceiver`. Not uvloop: its libuv reads the error queue itself
    on ``EPOLLERR`` and hands the error to uvloop as a positive length, which
    crashed the process (segmentation fault, uvloop 0.23, at the first ICMP error);
    there a host or network unreachable goes unseen, as before, and the connect
    waits for its timeout."""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)


def read_error_queue(sock: socket.socket) -> list[OSError]:
    """The errors queued on ``sock``'s error queue (``IP_RECVERR``), oldest first,
    which this empties without waiting (up to :data:`MAX_QUEUED_ERRORS` of them)."""
    errors: list[OSError] = []
    for _ in range(MAX_QUEUED_ERRORS):
        try:
            # (The start of the datagram that drew the error is not needed.)
            _, ancillary, _, _ = sock.recvmsg(64, 512, socket.MSG_ERRQUEUE)
        except InterruptedError:
            continue
        except OSError:
            break  # EAGAIN: the queue is empty (or the socket is closed)
        for level, kind, data in ancillary:
            if (level, kind) in _RECVERR_MESSAGES and len(data) >= 4:
                (number,) = struct.unpack_from("=I", data)  # sock_extended_err.ee_errno
                errors.append(OSError(number, os.strerror(number)))
    return errors


class ErrorQueueReceiver(SocketReceiver):
    """The receiver of a client's UDP socket from :func:`client_udp_socket`: takes the
    ICMP errors off the socket's error queue.

    The kernel queues each error and also makes it the socket's pending error, which
    the next read or send raises once (asyncio then calls :meth:`error_received`, and
    so does the batch reader): the queue is emptied there and each error in it reported
    to the connection once (the pending one is the last of them). A queue left as it is
    kept the socket readable (``EPOLLERR``) with nothing to read, and, charged to the
    receive buffer, would in the end have crowded out the peer's datagrams.
    """

    def __init__(
        self, connection: QuicPeerConnection, max_datagrams: int, sock: socket.socket
    ) -> None:
        super().__init__(connection, max_datagrams)
        self._socket = sock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.reader = _udp.BatchReader(
            cast(asyncio.DatagramTransport, transport),
            self._connection.datagram_received,
            max_datagrams=self._max_datagrams,
            on_error=self.error_received,
        )

    def error_received(self, exc: Exception) -> None:
        if not isinstance(exc, OSError):
            return
        errors = read_error_queue(self._socket)
        if all(error.errno != exc.errno for error in errors):
            errors.append(exc)  # not a queued one: a send's own error, or the queue was full
        for error in errors:
            self._connection.socket_error(error)


def load_stateless_reset_key(path: str | os.PathLike[str]) -> bytes:
    """The stateless reset key kept in ``path``, created (32 random bytes, mode 0600)
    if missing, so that it survives restarts.

    A file that others may read or write is used, with a warning.

    :raises ConfigError: the file cannot be read or created, or is too short.
    """
    try:
        with open(path, "rb") as existing:
            key = existing.read(STATELESS_RESET_KEY_MAX_BYTES + 1)
            mode = os.fstat(existing.fileno()).st_mode
        if exposed := exposed_secret(path, mode):
            # OpenSSH refuses such a private key; a reset key is less precious (it
            # lets its reader end this server's connections, not read them): warned.
            logger.warning(
                "stateless reset key %s (whoever reads it can reset this server's connections)",
                exposed,
            )
    except FileNotFoundError:
        key = os.urandom(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as created:
                created.write(key)
        except OSError as exc:
            raise ConfigError(
                f"cannot create stateless reset key {path}: {os_error_text(exc)}"
            ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read stateless reset key {path}: {os_error_text(exc)}") from None
    if len(key) > STATELESS_RESET_KEY_MAX_BYTES:
        raise ConfigError(
            f"stateless reset key {path} is longer than {STATELESS_RESET_KEY_MAX_BYTES} bytes"
        )
    if len(key) < STATELESS_RESET_KEY_MIN_BYTES:
        raise ConfigError(
            f"stateless reset key {path} is shorter than {STATELESS_RESET_KEY_MIN_BYTES} bytes"
        )
    return key
