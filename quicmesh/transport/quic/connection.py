"""The QUIC connection driver: one object per QUIC connection.

:class:`QuicPeerConnection` is the asyncio side of one QUIC connection, and the
only one: it owns the engine connection (:mod:`quicmesh.transport.quic.engine`;
for aioquic a :class:`~quicmesh._aioquic.MeshQuicConnection`), the sans-IO
HTTP/3 tunnel session on it (:class:`~quicmesh.tunnel.h3.H3TunnelSession`), and,
as a :class:`~quicmesh.transport._session.SessionConnection`, the streams. It
reads datagrams (in batches, :mod:`quicmesh.transport._udp`), arms one timer,
sends datagrams, and acts on QUIC events: the handshake (peer identity, 0-RTT
outcome, tickets), liveness, paths and migration. Its settings are one
:class:`~quicmesh.transport.quic.options.QuicOptions` value; the rules with
state of their own are sans-IO (:mod:`quicmesh.transport.quic.policy`,
:mod:`quicmesh.transport.liveness`).

With a socket engine (``io="socket"``, e.g. the native engine) there is no
datagram, socket or timer here: the engine wakes the driver
(:meth:`QuicPeerConnection.engine_woke`) after it queued events, the driver
drains them into the same tunnel session and flushes; the liveness rules run
on counters the engine is sampled for (:meth:`.engine.SocketConnection.sample_liveness`).

A server connection is built by the listener for a client's first Initial (a
socket engine's listener: for each connection it accepted); a
client connection by :meth:`QuicTransport.connect`. Either exists before its
handshake completes but takes streams only once it is *established*: the
handshake completed and the peer's identity was verified, or (0-RTT) a ticket
vouched for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from aioquic.h3.connection import ErrorCode
from aioquic.quic import events as quic_events
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from aioquic.tls import SessionTicket

from ... import _aioquic
from ...errors import (
    ConnectError,
    ConnectionLost,
    PeerUnresponsive,
    PeerVerificationError,
    QuicmeshError,
    TunnelError,
    TunnelUsageError,
    os_error_text,
)
from ...logs import RateLimitedLog
from ...tls import verify_peer
from ...tls.check import handshake_failure_reason, refused_by_peer
from ...tls.verify import check_server_certificate
from ...tunnel.connect import (
    connect_request_fields,
    parse_connect_request,
    parse_target,
    validate_headers,
)
from ...tunnel.h3 import H3TunnelSession
from ...tunnel.session import ResetReason
from .. import _udp
from .._session import SessionConnection
from ..base import (
    Address,
    Authorizer,
    EngineAcceptor,
    InboundDecider,
    InboundEngineFlow,
    StreamHandler,
    checked_address,
    engine_failure_text,
    host_port,
)
from ..liveness import UNRESPONSIVE, Liveness, Verdict
from ..stream import EngineSocket, MeshStream, SpliceOutcome
from . import engine
from .native_flows import FlowAcceptor
from .options import (
    COUNTERS,
    CRYPTO_ERROR_BAD_CERTIFICATE,
    EARLY_DATA_OVERHEAD,
    OLD_SOCKET_GRACE,
    QuicOptions,
)
from .policy import EarlyDataBudget, RebindRule

if TYPE_CHECKING:
    from cryptography import x509

    from ..._aioquic import MeshQuicConnection
    from .native_flows import FlowAcceptor

logger = logging.getLogger("quicmesh.transport.quic")

UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
)
"""Socket errors that report an ICMP destination unreachable (port, host, network)."""

UDP_SOCKET_BUFFER = 4 * 1024 * 1024
"""SO_RCVBUF / SO_SNDBUF asked for on QUIC sockets (the kernel caps it at rmem_max/wmem_max)."""


def closed_error(reason: str) -> ConnectionLost:
    """What a connection closed with ``reason`` (the peer's reason phrase, as the
    engine words it) is lost with: :class:`PeerUnresponsive` when the peer's
    liveness checks failed it (what it sent reached us, what we sent did not: a
    path dropping packets one way), else :class:`ConnectionLost`."""
    if UNRESPONSIVE in reason:
        return PeerUnresponsive(
            f"QUIC connection closed by the peer, which heard nothing from here: {reason}"
        )
    return ConnectionLost(f"QUIC connection closed: {reason}")


def tune_udp_socket(transport: asyncio.BaseTransport) -> None:
    """Ask for :data:`UDP_SOCKET_BUFFER` bytes of socket buffer each way."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER)


@functools.lru_cache(maxsize=1024)
def _is_ip_address(host: str) -> bool:
    """Whether ``host`` is an IP address the native engine connects to as it is (no
    name, no IPv6 zone). Kept: flows repeat their destinations."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return "%" not in host


async def numeric_address(
    address: Address, action: str, *, family: int = socket.AF_UNSPEC
) -> Address:
    """``address`` with a host name resolved to its first IP address (of ``family``; an
    IP address is kept as it is): the native engine binds and connects IP addresses
    only, and aioquic matches a peer's datagrams against the address it connected to.
    ``action`` (``"listen on"``, ``"connect to"``, ``"migrate to"``) names what for in
    the error; listening resolves as a passive (bind) address.

    :raises ConnectError: the name does not resolve.
    """
    host, port = address[0], address[1]
    if _is_ip_address(host.split("%", 1)[0]):  # (an IPv6 zone kept as it is)
        return address
    passive = socket.AI_PASSIVE if action == "listen on" else 0
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, family=family, type=socket.SOCK_DGRAM, flags=passive
        )
    except (OSError, UnicodeError) as exc:
        raise ConnectError(
            f"cannot {action} {host}:{port}: cannot resolve {host!r}: {exc}"
        ) from None
    ip, resolved_port = infos[0][4][:2]
    return (str(ip), int(resolved_port))


class _EngineInboundFlow(InboundEngineFlow):
    """A peer's CONNECT the native engine carries itself
    (:meth:`QuicPeerConnection._serve_in_engine`)."""

    transport = "quic"

    def __init__(
        self, connection: QuicPeerConnection, stream_id: int, target: str, headers: dict[str, str]
    ) -> None:
        self.channel = connection
        self._quic: Any = connection.quic
        self.stream_id = stream_id
        self.target = target
        self.headers = headers
        self.peer_identity = connection.peer_identity
        self.peer_address = connection.peer_address
        self.splice_id: int | None = None
        """The engine's splice, while it runs."""

    @property
    def buffered_bytes(self) -> int:
        if self.splice_id is None:
            return 0
        return int(self._quic._native.splice_buffered(self.splice_id))

    def spliced_bytes(self) -> tuple[int, int] | None:
        if self.splice_id is None:
            return None
        moved = self._quic._native.splice_moved(self.splice_id)
        return None if moved is None else (int(moved[0]), int(moved[1]))

    def abort(self) -> None:
        if self.splice_id is not None:
            with contextlib.suppress(QuicmeshError):
                self._quic._native.splice_abort(self.splice_id, ErrorCode.H3_REQUEST_CANCELLED)

    def refuse(self, status: int, reason: str) -> None:
        connection = cast(QuicPeerConnection, self.channel)
        if connection.is_closed:
            return
        with contextlib.suppress(QuicmeshError):
            connection.quic.send_stream_data(
                self.stream_id, _aioquic.connect_response_frame(status, reason), end_stream=True
            )
            connection._schedule_transmit()


class QuicPeerConnection(SessionConnection):
    """A QUIC connection to one peer sidecar; each flow is one HTTP/3 CONNECT stream.

    On a client connected with ``early_data=True`` the connection is usable
    before the handshake completes: :attr:`early_data` is ``"attempted"`` until
    then, and stream payload beyond ``max_early_data`` waits for the handshake.

    :param quic: the engine connection (handshake not started, or, for a socket
        engine, under way).
    :param options: the transport's settings.
    :param counters: the transport's counters (this connection adds to them).
    :param handshake_failures: the transport's refused handshakes, by reason.
    :param handler: (server) runs each accepted stream.
    :param authorize: (server) decides whether a peer may reach a target.
    :param owns_socket: (client) close the socket when the connection ends.
    :param peer_address: (client) the address connected to (ticket cache key).
    :param ticket_identity: (client) the identity the offered ticket recorded.
    """

    transport_name = "quic"

    def __init__(
        self,
        quic: MeshQuicConnection | engine.SocketConnection,
        options: QuicOptions,
        *,
        counters: Counter[str],
        handshake_failures: Counter[str],
        handler: StreamHandler | None = None,
        authorize: Authorizer | None = None,
        owns_socket: bool = False,
        peer_address: Address | None = None,
        ticket_identity: str | None = None,
    ) -> None:
        h3_session = H3TunnelSession(
            quic, stream_window=options.stream_window, connection_window=options.connection_window
        )
        super().__init__(
            h3_session,
            peer_identity="",
            handler=handler,
            authorize=authorize,
            high_water=options.high_water,
            log_id=quic.log_id,
        )
        self.h3_session = h3_session
        """The sans-IO HTTP/3 tunnel session (also :attr:`session`)."""
        self.quic: MeshQuicConnection = cast("MeshQuicConnection", quic)
        """The engine connection (aioquic: a :class:`~quicmesh._aioquic.MeshQuicConnection`)."""
        self._socket: engine.SocketConnection | None = (
            quic if isinstance(quic, engine.SocketConnection) else None
        )
        """The engine connection when its engine owns the socket (``io="socket"``)."""
        self.options = options
        self.is_client = quic.is_client
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self._transport_counters = counters
        self._handshake_failures = handshake_failures
        self._owns_socket = owns_socket
        self._close_socket = False
        self._peer_address = peer_address
        self._resumed_identity = ticket_identity
        """The identity the session ticket recorded (client: the one offered;
        server: the one redeemed)."""
        self._resumed_valid_until: float | None = None
        """(server) When the redeemed ticket's client certificate expires: the tickets
        a resumed connection issues are good no longer than the one it came with."""
        if self.is_client and hasattr(quic, "resend_allowed"):
            quic.resend_allowed = self._same_peer_as_ticket
        self._issued_tickets: list[SessionTicket] = []
        self._handshake_done = False
        self._established = False
        self.handshake_finished: asyncio.Future[None] = self._loop.create_future()
        """Done once the handshake completed or the connection ended, never with an
        exception (so an abandoned connect leaves no "Future exception was never
        retrieved")."""
        self._terminated = asyncio.Event()
        """Set once the engine reported ``ConnectionTerminated`` (closing or
        draining period over)."""
        self._early_data = "none"
        self._budget = EarlyDataBudget(remaining=None)
        self._deferred: list[tuple[MeshStream, bytes, bool]] = []
        self._handshake_waiter: asyncio.Future[None] = self._loop.create_future()
        self._early_bytes = 0
        self._max_early_bytes = options.max_early_data + EARLY_DATA_OVERHEAD
        self._old_sockets: list[asyncio.DatagramTransport] = []
        self._rebind = (
            RebindRule(options.rebind_after_ptos)
            if self.is_client and options.rebind_after_ptos is not None
            else None
        )
        self.failure: QuicmeshError | None = None
        """Why the connection never became established (refused, closed, unreachable)."""
        self.on_handshake_done: Callable[[QuicPeerConnection], None] | None = None
        """(server) Called with this connection when the handshake completes."""
        self._discarded = False
        self._pending: list[quic_events.QuicEvent] = []
        self.engine_flows = 0
        """Flows the engine runs on this connection (:meth:`start_engine_flow`; inbound,
        :meth:`_serve_in_engine`)."""
        self.inbound_decider: InboundDecider | None = None
        """(server) Offered each new CONNECT first (inbound engine flows)."""
        self._next_request_stream = 0
        """(server) The lowest request stream ID the peer has not used yet."""
        self._goaway_sent: int | None = None
        """(server) The ID our GOAWAY named: requests on streams from it on are refused."""
        self.bytes_sent = self.bytes_received = 0
        self.datagrams_sent = self.datagrams_received = 0
        self.lost_before = 0
        """Packets lost before the connection was established (not counted)."""
        self.connected_socket: asyncio.DatagramTransport | None = None
        """(client) The UDP socket connected to the peer: datagrams go to it without
        an address, and it reports ICMP errors."""
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._transmit_task: asyncio.Handle | None = None
        self._liveness: Liveness | None = None
        self._liveness_timer: asyncio.TimerHandle | None = None
        self._liveness_at: float | None = None
        # Connection-ID routing callbacks, under the names aioquic's QuicServer sets
        # (quicmesh.transport.quic.server.MeshQuicServer sets them on every connection).
        self._connection_id_issued_handler: Callable[[bytes], None] = lambda cid: None
        self._connection_id_retired_handler: Callable[[bytes], None] = lambda cid: None
        self._connection_terminated_handler: Callable[[], None] = lambda: None
        if self._socket is not None:
            self._socket.set_wake(self.engine_woke)

    # -- PeerConnection --------------------------------------------------------------

    @property
    def log_id(self) -> str:
        """This connection's first connection ID, in hex (in its log lines)."""
        return self._log_id

    @property
    def established(self) -> bool:
        """Whether streams can be opened: the handshake completed and the peer was
        verified, or a session ticket vouched for it (0-RTT)."""
        return self._established

    @property
    def early_data(self) -> str:
        """``"none"``, ``"attempted"`` (client, handshake pending), ``"accepted"``
        or ``"rejected"``."""
        return self._early_data

    @property
    def supports_migration(self) -> bool:
        """A client connection can :meth:`migrate`; a server's follows its peer."""
        return bool(self.is_client)

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's certificate (None on a resumed session, which presents none)."""
        certificate, _ = self.quic.peer_certificate()
        return certificate

    @property
    def peer_chain(self) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
        certificate, chain = self.quic.peer_certificate()
        return certificate, list(chain)

    @property
    def terminated(self) -> bool:
        """Whether the engine reported the end of the connection (aioquic: after the
        closing or draining period; native: as it begins, quinn keeps that period to
        itself; :attr:`is_closed` is true as soon as it began)."""
        return self._terminated.is_set()

    @property
    def local_address(self) -> Address | None:
        """The local address of the UDP socket in use (a client's changes when it
        migrates), or None before there is one."""
        if self._socket is not None:
            return None if self.terminated else self._socket.local_address()
        if self._transport is None:
            return None
        sockname = self._transport.get_extra_info("sockname")
        return (sockname[0], sockname[1])

    @property
    def peer_address(self) -> str:
        path = self.quic.active_path()
        return host_port(path[0]) if path is not None else ""

    def can_splice_stream(self, stream: MeshStream) -> bool:
        """Whether the engine can splice the stream onto a socket now (a socket engine
        offering ``can_splice``, e.g. the native one; not while 0-RTT is unsettled)."""
        can_splice = getattr(self.quic, "can_splice", None)
        return self._lost is None and can_splice is not None and bool(can_splice(stream.stream_id))

    def stream_spliced_bytes(self, stream: MeshStream) -> tuple[int, int] | None:
        spliced_bytes = getattr(self.quic, "stream_spliced_bytes", None)
        return None if spliced_bytes is None else spliced_bytes(stream.stream_id)

    async def connect_for_splice(
        self, stream: MeshStream, host: str, port: int, timeout: float
    ) -> EngineSocket | None:
        """Connect from the engine's thread where it can (the native engine's
        ``connect_tcp``): the socket then never passes through Python."""
        quic: Any = self.quic
        can_connect = getattr(quic, "can_connect_tcp", None)
        if can_connect is None or not can_connect():
            return None
        sock: EngineSocket | None = await quic.connect_tcp(host, port, timeout)
        return sock

    async def splice_stream(
        self,
        stream: MeshStream,
        sock: socket.socket | EngineSocket,
        pending: bytes,
        idle_timeout: float | None,
    ) -> SpliceOutcome:
        """Hand the stream and ``sock`` to the engine (see :meth:`MeshStream.splice_socket`):
        the engine stops reading the stream (at once where it can hand the reading over,
        else after a pause), the bytes that reached the stream and the HTTP/3 parser's state
        go with it, then the engine copies until both ends close."""
        quic: Any = self.quic
        sent, received, error = await quic.splice_stream(
            stream.stream_id,
            sock,
            to_quic=pending,
            idle_timeout=idle_timeout,
            **await self._let_go(stream),
        )
        return self._engine_outcome(sent, received, error)

    async def connect_and_splice_stream(
        self,
        stream: MeshStream,
        host: str,
        port: int,
        timeout: float,
        idle_timeout: float | None,
    ) -> SpliceOutcome | None:
        """(server) Have the engine connect ``host:port``, answer the CONNECT with 200 once
        connected and splice the stream onto the connection, in one command (the native
        engine's ``connect_splice``): Python is not woken between the connect and the
        splice. None where the engine cannot, or ``host`` is a name (the caller connects
        itself); the stream is untouched then.

        :raises OSError: the connect failed (:class:`TimeoutError` after ``timeout``):
            the stream is unanswered, for the caller to refuse.
        """
        quic: Any = self.quic
        can_connect_splice = getattr(quic, "can_connect_splice", None)
        if can_connect_splice is None or not can_connect_splice() or not _is_ip_address(host):
            return None
        sent, received, error, connected = await quic.connect_splice(
            stream.stream_id,
            host,
            port,
            timeout,
            answer=_aioquic.connect_accepted_frame(),
            idle_timeout=idle_timeout,
            **await self._let_go(stream),
        )
        return self._engine_outcome(sent, received, error, connected)

    def _engine_outcome(
        self, sent: int, received: int, error: str, connected: bool = True
    ) -> SpliceOutcome:
        """What the engine reports at the end of a flow it carried (a splice, a
        connect-and-splice, an engine flow), its error worded with the reason this
        connection was lost where the engine knows only that it was
        (:func:`~quicmesh.transport.base.engine_failure_text`)."""
        error = engine_failure_text(error, self._lost)
        return SpliceOutcome(sent, received, error, connected=connected)

    # -- engine flows (the native engine's outbound flows, .native_flows) -------------

    def can_start_engine_flow(self) -> bool:
        """Whether :meth:`start_engine_flow` can start a flow on this connection now: an
        established native-engine connection, not closing, not in 0-RTT."""
        quic: Any = self.quic
        return (
            self._lost is None
            and not self._closing
            and self._going_away is None
            and self._established
            and self._early_data != "attempted"
            and hasattr(quic, "start_flow")
            # A stream Python opened ahead goes first (the engine's would open past it,
            # and the peer would count it open until Python uses it).
            and not quic.has_spare_request_stream()
        )

    def start_engine_flow(
        self,
        acceptor: EngineAcceptor,
        flow: int,
        target: str,
        headers: dict[str, str],
        timeout: float,
        idle_timeout: float | None = None,
    ) -> bool:
        """Start the connection ``acceptor`` accepted as ``flow`` as an engine flow on this
        connection (:mod:`.native_flows`): the engine sends the CONNECT for ``target`` with
        ``headers``, waits at most ``timeout`` seconds for the plain 200, and splices
        (reset once no byte moved for ``idle_timeout`` seconds; None: never).
        Counted in :attr:`active_streams` until :meth:`engine_flow_ended`. False when
        nothing was started (no stream credit now, or the connection is going): the
        socket is still parked."""
        if not self.can_start_engine_flow():
            return False
        fields = connect_request_fields(parse_target(target), validate_headers(headers))
        quic: Any = self.quic
        started = quic.start_flow(
            cast(FlowAcceptor, acceptor).native,
            flow,
            request=_aioquic.connect_request_frame(fields),
            answer=_aioquic.connect_accepted_frame(),
            timeout=timeout,
            idle_timeout=idle_timeout,
        )
        if started:
            self.engine_flows += 1
            self.streams_opened += 1
        return bool(started)

    def engine_flow_ended(self) -> None:
        """An engine flow :meth:`start_engine_flow` started ended (or went back to Python)."""
        self.engine_flows -= 1
        if self._idle_waiter is not None:
            self._wake_if_idle()

    @property
    def active_streams(self) -> int:
        return len(self._streams) + self.engine_flows

    def _is_idle(self) -> bool:
        return not self.engine_flows and super()._is_idle()

    async def _let_go(self, stream: MeshStream) -> dict[str, Any]:
        """(splicing) Stop the stream's reading in Python (at once where the engine can
        hand the reading over, else after a pause) and collect what Python holds of it for
        the splice: the payload that reached the stream and the HTTP/3 parser's state."""
        quic: Any = self.quic
        stream_id = stream.stream_id
        hand_over = getattr(quic, "hand_over_reading", None)
        if hand_over is None or not hand_over(stream_id):
            await quic.pause_reading(stream_id)
        payload, eof = stream._hand_over()
        session = cast(H3TunnelSession, self.session)
        frame_type, remaining, unparsed = session.hand_over(stream_id)
        return {
            "to_tcp": payload,
            "frame_type": frame_type,
            "frame_remaining": remaining,
            "unparsed": unparsed,
            "recv_fin": eof,
        }

    def stats(self) -> dict[str, Any]:
        """Counters of :class:`~quicmesh.PeerConnection` plus QUIC's: ``early_data``,
        ``zero_rtt_packets_sent``, ``path`` (peer address in use), ``migrations_*``,
        ``path_validations_*`` and the 0-RTT and ticket counts of this connection."""
        quic = self.quic
        result = super().stats()
        engine_stats = quic.stats()
        result.update(engine_stats)
        path = quic.active_path()
        if self._socket is not None:
            # The engine moved the datagrams: its counters are the connection's.
            self.bytes_sent = engine_stats.get("bytes_sent", 0)
            self.bytes_received = engine_stats.get("bytes_received", 0)
            self.datagrams_sent = engine_stats.get("packets_sent", 0)
            self.datagrams_received = engine_stats.get("packets_received", 0)
        result.update(
            transport="quic",
            peer_identity=self.peer_identity,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            packets_sent=self.datagrams_sent,
            packets_received=self.datagrams_received,
            packets_lost=engine_stats["packets_lost"] - self.lost_before,
            early_data=self._early_data,
            path=path[0] if path is not None else None,
            path_validated=path[1] if path is not None else None,
        )
        result.update(self.counters)
        result["streams_active"] = self.active_streams
        return result

    async def wait_closed(self) -> None:
        await self._terminated.wait()
        self.close_socket_when_done()
        await super().wait_closed()

    async def migrate(self, local_address: Address | None = None) -> None:
        """Move this (client) connection to a new UDP socket, mid-transfer.

        :param local_address: where to bind the new socket; by default the same
            host as now with a new port. The next connection ID the server issued
            is used, so the two paths cannot be linked by an observer (when the
            server has issued none, the current one is kept). Streams carry on:
            packets lost on the way are retransmitted. Raises
            :class:`~quicmesh.errors.ConnectError` if the socket cannot be opened,
            or before the handshake completed (RFC 9000 section 9: a client does not
            migrate before then; a 0-RTT connection is usable earlier) and, on the
            native engine, while another connection of the endpoint, which moves
            with it, is in its handshake.
        """
        if not self.supports_migration:
            # (On the native engine an accepted connection shares the listener's socket:
            # moving it moved every client's connection.)
            raise NotImplementedError(
                "only a client connection can migrate: a server's follows its client"
            )
        self._raise_if_lost()
        if self._closing:
            raise ConnectionLost("the connection is closing: it cannot migrate")
        if not self._handshake_done:
            raise ConnectError("cannot migrate before the handshake completes")
        if local_address is not None:
            local_address = await numeric_address(
                checked_address(local_address, "migrate address"),
                "migrate to",
                family=self._peer_family(),
            )
            self._check_family(local_address[0])
        await self._migrate(local_address, cause="active")

    def _peer_family(self) -> int:
        """The address family the peer is reached over (AF_UNSPEC when unknown): where a
        migration's host name is resolved."""
        if self._peer_address is not None:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(self._peer_address[0]).version == 6:
                    return socket.AF_INET6
                return socket.AF_INET
        return socket.AF_UNSPEC

    def _check_family(self, host: str) -> None:
        """A new local address must be of the family of the peer's address as connected
        (an IPv6 socket cannot reach an IPv4 address, nor an IPv4 socket an IPv6 one, an
        IPv4-mapped one included): ConnectError before anything moves."""
        if self._peer_address is None:
            return
        peer_host = self._peer_address[0]
        try:
            local, peer = ipaddress.ip_address(host), ipaddress.ip_address(peer_host)
        except ValueError:
            return  # not an address: binding says what is wrong
        # By the socket's family: a peer given as ::ffff:a.b.c.d is reached over IPv6.
        if local.version != peer.version:
            raise ConnectError(
                f"cannot migrate to {host}: an IPv{local.version} address, and the peer "
                f"({peer_host}) is reached over IPv{peer.version}"
            )
        # An IPv4-mapped peer is an IPv4 host: an IPv6 socket on a real IPv6 address
        # cannot reach it, nor one on a mapped address a real IPv6 peer (the migration
        # was taken, then every flow was lost); the wildcard ``::`` reaches both.
        if isinstance(local, ipaddress.IPv6Address) and not local.is_unspecified:
            assert isinstance(peer, ipaddress.IPv6Address)
            if (local.ipv4_mapped is None) != (peer.ipv4_mapped is None):
                kinds = {True: "an IPv4-mapped IPv6 address", False: "an IPv6 address"}
                raise ConnectError(
                    f"cannot migrate to {host}: {kinds[local.ipv4_mapped is not None]}, and "
                    f"the peer ({peer_host}) is {kinds[peer.ipv4_mapped is not None]}"
                )

    # -- 0-RTT budget ----------------------------------------------------------------

    async def open_stream(
        self,
        target: str,
        headers: dict[str, str] | None = None,
        *,
        wait_response: bool = True,
    ) -> MeshStream:
        if self._budget.active and not self._budget.open_stream(target, headers):
            # No 0-RTT budget left for the CONNECT: open it after the handshake.
            await asyncio.shield(self._handshake_waiter)
        return await super().open_stream(target, headers, wait_response=wait_response)

    def send_stream_data(self, stream: MeshStream, data: bytes, end_stream: bool) -> None:
        if self._budget.active:
            self._raise_if_lost()
            if not self._budget.send(stream.stream_id, len(data)):
                # Beyond the 0-RTT budget: wait for the handshake, in order.
                self._deferred.append((stream, data, end_stream))
                return
        super().send_stream_data(stream, data, end_stream)

    def stream_unsent_bytes(self, stream: MeshStream) -> int:
        return super().stream_unsent_bytes(stream) + self._budget.deferred(stream.stream_id)

    def reset_stream(self, stream: MeshStream, reason: ResetReason) -> None:
        if self._budget.forget(stream.stream_id):
            self._deferred = [item for item in self._deferred if item[0] is not stream]
        super().reset_stream(stream, reason)

    def _settle_early_data(self, early_data_accepted: bool) -> None:
        """The handshake is done: settle the 0-RTT outcome and send deferred bytes."""
        self._budget.settle()
        if self._early_data == "attempted":
            self._early_data = "accepted" if early_data_accepted else "rejected"
        deferred, self._deferred = self._deferred, []
        for stream, data, end_stream in deferred:
            if self._lost is None:
                super().send_stream_data(stream, data, end_stream)
        if not self._handshake_waiter.done():
            self._handshake_waiter.set_result(None)

    def on_connection_lost(self, error: TunnelError) -> None:
        super().on_connection_lost(error)
        if self.is_client and self._early_data == "attempted":
            # The handshake failed (or the peer was refused): the 0-RTT flight was not
            # accepted, and each attempt is counted with its outcome.
            self._early_data = "rejected"
            self._count("zero_rtt_rejected")
        self._budget.settle()
        self._deferred.clear()
        if not self._handshake_waiter.done():
            self._handshake_waiter.set_result(None)

    # -- SessionConnection ------------------------------------------------------------

    def _transmit(self) -> None:
        self.transmit()

    def _close_transport(self) -> None:
        self.close_socket_when_done()

    # -- I/O -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The UDP socket datagrams go out on (a server's listening socket)."""
        self._transport = cast(asyncio.DatagramTransport, transport)

    def connect(self, addr: Address) -> None:
        """(client) Start the handshake: the first flight goes out now (a socket
        engine started it already: take what it reported so far)."""
        if self._socket is not None:
            self.engine_woke()
            return
        self.quic.connect(addr, now=self._loop.time())
        self.transmit()

    def engine_woke(self) -> None:
        """(socket engines) Events wait: drain them into the tunnel session, then flush."""
        self._process_events()
        if self._discarded:
            return
        self.transmit()
        if self._established and self.waits_for_stream_credit:
            # Stream credit raises no QUIC event: wake open_stream() calls waiting for it.
            self.handle_events([])

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        """Process one datagram; the transmit waits for the end of the batch being
        read (:mod:`quicmesh.transport._udp`), if any."""
        data = cast(bytes, data)
        self.bytes_received += len(data)
        self.datagrams_received += 1
        if self.is_client and self.quic.is_stateless_reset(data):
            logger.info("[%s] the server sent a stateless reset: connection gone", self.log_id)
            self.quic.terminate_after_stateless_reset()
            self._process_events()
            self.close_socket()
            return
        now = self._loop.time()
        if self._liveness is not None:
            self._liveness.received(now)
        self.quic.receive_datagram(data, addr, now=now)
        self._process_events()
        if not _udp.defer_transmit(self.transmit):
            self.transmit()
        if self._established and not self.is_closed:
            reason = self.quic.closing_reason()
            if reason is not None:
                # The peer closed: say so now, not when the draining period ends.
                self.on_connection_lost(self._peer_closed(self.quic.closing_error_code(), reason))
                if self.quic.is_draining():
                    # A draining endpoint sends nothing more (RFC 9000 10.2.2).
                    self.close_socket()
        if self._established and self.waits_for_stream_credit:
            # MAX_STREAMS raises no QUIC event: wake open_stream() calls waiting for credit.
            self.handle_events([])

    def transmit(self) -> None:
        """Send what the engine has queued and re-arm the timer."""
        self._transmit_task = None
        if self._discarded:
            return
        if self._socket is not None:
            self._socket.flush()
            if self._established:
                self.transmitted()
            return
        assert self._transport is not None
        now = self._loop.time()
        connected = self._transport is self.connected_socket
        # Once the socket is closed (a connect that failed, a draining end) nothing goes
        # out, while aioquic's timers still run to its end: sent into the closed socket,
        # "Exception in callback ..._handle_timer()" followed every such connect.
        closed = self._transport.is_closing()
        for data, addr in self.quic.datagrams_to_send(now=now):
            if closed:
                continue
            self.bytes_sent += len(data)
            self.datagrams_sent += 1
            self._transport.sendto(data, None if connected else addr)
        if not self.is_client:
            # Route the connection IDs just issued now, not at the next event: a
            # packet using one must not be answered with a stateless reset.
            for cid in self.quic.pending_issued_connection_ids():
                self._connection_id_issued_handler(cid)
        timer_at = self.quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at
        if self._established:
            self.transmitted()
        if self._rebind is not None:
            self._maybe_rebind(self._rebind)
        if self._liveness is not None:
            self._watch_liveness(now)

    def _transmit_soon(self) -> None:
        if self._transmit_task is None:
            self._transmit_task = self._loop.call_soon(self.transmit)

    def _handle_timer(self) -> None:
        now = max(self._timer_at or 0.0, self._loop.time())
        self._timer = None
        self._timer_at = None
        if self.quic.get_timer() is None:
            return  # nothing is due any more (the connection ended since it was armed)
        self.quic.handle_timer(now=now)
        self._process_events()
        self.transmit()

    def _process_events(self) -> None:
        event = self.quic.next_event()
        while event is not None:
            if isinstance(event, quic_events.ConnectionIdIssued):
                self._connection_id_issued_handler(event.connection_id)
            elif isinstance(event, quic_events.ConnectionIdRetired):
                self._connection_id_retired_handler(event.connection_id)
            elif isinstance(event, quic_events.ConnectionTerminated):
                self._connection_terminated_handler()
                self._terminated.set()
            self._on_quic_event(event)
            event = self.quic.next_event()

    def discard(self, *, close: bool = False) -> None:
        """(server) Forget this connection now, before its handshake completed: no
        timer, nothing more sent (but a CONNECTION_CLOSE when ``close``)."""
        if close:
            self.quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED)
            self.transmit()
        self._discarded = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close_socket_when_done(self) -> None:
        """(client) Close the socket once the engine reports the connection ended."""
        self._close_socket = True
        if self._terminated.is_set():
            self.close_socket()

    def close_socket(self) -> None:
        """(client) Close the socket(s) now (nothing more is sent or received)."""
        if self._owns_socket and self._transport is not None:
            self._transport.close()
            for old in self._old_sockets:
                old.close()
            self._old_sockets.clear()

    def abandon(self) -> None:
        """(client) Give up a connection attempt: close, send it, close the socket."""
        self.quic.close()
        self.transmit()
        self.close_socket()

    # -- liveness ------------------------------------------------------------------------

    def socket_error(self, exc: OSError) -> None:
        """The UDP socket reported an error: an ICMP port or host unreachable on a
        connected client socket fails the handshake at once and, once established,
        counts towards :attr:`LivenessConfig.unreachable_limit`."""
        if exc.errno not in UNREACHABLE_ERRNOS:
            logger.debug("[%s] UDP socket error ignored: %s", self.log_id, exc)
            return
        if exc.errno != errno.ECONNREFUSED and self._handshake_done and not self._route_here():
            # Our own send's error, not the peer's answer: the local address went away, or
            # the route (a network change). The connection waits for a route or for
            # migrate() as the native engine does (it died before migrate() came, a review).
            logger.debug("[%s] no route to the peer from here: %s", self.log_id, exc)
            return
        self._unreachable(exc.strerror or type(exc).__name__)

    def _route_here(self) -> bool:
        """Whether the socket in use can still reach the peer (:func:`_udp.has_route`)."""
        if self._transport is None or self._peer_address is None:
            return True
        local = self._transport.get_extra_info("sockname")
        return local is None or _udp.has_route(local, self._peer_address)

    def _unreachable(self, why: str) -> None:
        """An ICMP destination unreachable came back for the peer's address (``why``:
        the error's text): a connect in its handshake fails at once; an established
        connection applies :meth:`Liveness.unreachable` (a PING, then failure on the
        ``unreachable_limit``-th in a row)."""
        address = self._peer_address
        where = f"{address[0]}:{address[1]}" if address is not None else "peer"
        if not self._handshake_done:
            error = ConnectError(f"QUIC endpoint {where} unreachable: {why}")
            if self.failure is None:
                self.failure = error
            if self._established:
                self._fail(error)  # 0-RTT: the streams learn it
            else:
                self.quic.close()  # nothing to tell a closed port
            self._finish_handshake_wait()
            return
        if self._liveness is None:
            return
        verdict = self._liveness.unreachable(self._loop.time())
        if verdict is Verdict.UNREACHABLE:
            self._fail(ConnectionLost(f"QUIC {where}: {self._liveness.reason} ({why})"))
        else:
            self.quic.send_ping(0)
            self._transmit_soon()

    def _watch_liveness(self, now: float) -> None:
        liveness = self._liveness
        assert liveness is not None
        if not self._established or self.is_closed:
            self._stop_liveness()
            return
        if self._socket is not None and self._socket.sample_liveness(now):
            liveness.received(now)
        awaiting = self.quic.awaiting_ack()
        verdict = liveness.check(
            now, probe_timeouts=self.quic.probe_timeouts(), awaiting_ack=awaiting
        )
        if verdict is Verdict.UNRESPONSIVE:
            self._fail(PeerUnresponsive(f"QUIC connection failed: {liveness.reason}"))
            return
        if verdict is Verdict.PING and self._socket is None:
            # (A socket engine sends its keepalive PINGs itself.)
            self.quic.send_ping(0)
            self._transmit_soon()
        deadline = liveness.deadline(now, awaiting_ack=awaiting)
        if self._socket is not None and awaiting:
            # Probe timeouts and acknowledgements are only seen by sampling the engine.
            sample_at = now + engine.LIVENESS_SAMPLE
            deadline = sample_at if deadline is None else min(deadline, sample_at)
        if self._socket is not None and deadline is not None and deadline <= now:
            # The engine sends the keepalive PING itself: look again once it may have.
            deadline = now + engine.LIVENESS_SAMPLE
        if deadline is None:
            return
        if self._liveness_timer is not None:
            if self._liveness_at is not None and self._liveness_at <= deadline:
                return  # fires first; it re-arms for the later deadline
            self._liveness_timer.cancel()
        self._liveness_at = deadline
        self._liveness_timer = self._loop.call_at(deadline, self._liveness_timer_fired)

    def _liveness_timer_fired(self) -> None:
        self._liveness_timer = self._liveness_at = None
        if self._liveness is not None:
            self._watch_liveness(self._loop.time())

    def _stop_liveness(self) -> None:
        self._liveness = None
        if self._liveness_timer is not None:
            self._liveness_timer.cancel()
            self._liveness_timer = self._liveness_at = None

    def _fail(self, error: TunnelError) -> None:
        """Fail the connection now: every stream is reset at once, a
        CONNECTION_CLOSE goes out (a hung peer that wakes up learns of it)."""
        logger.warning("[%s] %s", self.log_id, error)
        self._stop_liveness()
        self.quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase=str(error)[:200])
        self.transmit()
        if self._established:
            self.on_connection_lost(error)
        self.close_socket()

    # -- migration -----------------------------------------------------------------------

    async def _migrate(self, local_address: Address | None, *, cause: str) -> None:
        if self._socket is not None:
            try:
                moved = await self._socket.migrate(local_address)
            except engine.EngineError as exc:
                raise ConnectError(str(exc)) from None
            self._count(f"migrations_{cause}")
            logger.info("[%s] migrated (%s) to %s", self.log_id, cause, moved)
            return
        assert self.is_client and self._transport is not None
        if local_address is None:
            current = self._transport.get_extra_info("sockname")
            local_address = (current[0], 0)
        try:
            udp, _ = await self._loop.create_datagram_endpoint(
                lambda: SocketReceiver(self, self.options.receive_batch),
                local_addr=local_address,
            )
        except OSError as exc:
            raise ConnectError(
                f"cannot open a UDP socket on {local_address[0]}:{local_address[1]}: "
                f"{os_error_text(exc)}"
            ) from None
        tune_udp_socket(udp)
        old, self._transport = self._transport, udp
        # Packets already on their way to the old port are still read for a while.
        self._old_sockets.append(old)
        self._loop.call_later(OLD_SOCKET_GRACE, self._retire_socket, old)
        if self.quic.spare_connection_ids():
            self.quic.change_connection_id()
        # An ack-eliciting packet goes out on the new path now, even when idle.
        self.quic.send_ping(0)
        self._count(f"migrations_{cause}")
        logger.info("[%s] migrated (%s) to %s", self.log_id, cause, udp.get_extra_info("sockname"))
        self.transmit()

    def _retire_socket(self, old: asyncio.DatagramTransport) -> None:
        if old in self._old_sockets:
            self._old_sockets.remove(old)
            old.close()

    def _maybe_rebind(self, rule: RebindRule) -> None:
        established = self._handshake_done and self._established and not self.is_closed
        if rule.check(self.quic.probe_timeouts(), established=established):
            task = self._loop.create_task(self._migrate(None, cause="auto_rebind"))
            task.add_done_callback(self._rebind_done)

    def _rebind_done(self, task: asyncio.Task[None]) -> None:
        if self._rebind is not None:
            self._rebind.finished()
        if not task.cancelled() and task.exception() is not None:
            logger.warning("[%s] automatic rebinding failed: %s", self.log_id, task.exception())

    def _count(self, name: str) -> None:
        self._transport_counters[name] += 1
        self.counters[name] += 1

    # -- session tickets -----------------------------------------------------------------

    def redeem_ticket(self, label: bytes) -> SessionTicket | None:
        """(server, engine's ``fetch_ticket`` hook) The ticket a ClientHello offers,
        taken from the store (single use), or None; records its identity."""
        record = self.options.ticket_store.redeem(label)
        if record is None:
            self._count("tickets_refused")
            return None
        self._count("tickets_redeemed")
        self._resumed_identity = record.identity
        self._resumed_valid_until = record.valid_until
        return record.ticket

    def ticket_issued(self, ticket: SessionTicket) -> None:
        """(server, engine's ``ticket_issued`` hook) Stored once the handshake completes."""
        self._issued_tickets.append(ticket)

    def on_ticket_received(self, ticket: SessionTicket) -> None:
        """(client) A NewSessionTicket arrived: cache it with the server's identity."""
        self._issued_tickets.append(ticket)
        if self._handshake_done and self._established:
            self._commit_tickets(self.peer_identity)

    def _commit_tickets(self, identity: str) -> None:
        tickets, self._issued_tickets = self._issued_tickets, []
        for ticket in tickets:
            if self.is_client:
                assert self._peer_address is not None
                self.options.ticket_cache.store(
                    self._peer_address, ticket, identity, self.options.own_identity
                )
                self._count("tickets_received")
            else:
                self.options.ticket_store.add(ticket, identity, self._client_valid_until())
                self._count("tickets_issued")

    def _client_valid_until(self) -> float | None:
        """(server) Until when the tickets issued may be redeemed: the expiry of the
        client certificate verified, or, on a resumed connection (which presents none),
        of the ticket it came with, so a chain of resumptions never outlives the
        certificate (nor an intermediate CA it presented)."""
        certificate, chain = self.peer_chain
        if certificate is None:
            return self._resumed_valid_until
        return min(cert.not_valid_after_utc.timestamp() for cert in [certificate, *chain])

    def go_away(self) -> bool:
        if self.is_client or self._lost is not None or self._closing:
            return False
        if self._goaway_sent is not None or not self._handshake_done:
            return False
        self._goaway_sent = self._next_request_stream
        self.h3_session.go_away(self._goaway_sent)
        self._schedule_transmit()
        logger.info(
            "[%s] GOAWAY to %s: requests on streams from %d on are refused, %d open carry on",
            self.log_id,
            self.peer_identity,
            self._goaway_sent,
            self.active_streams,
        )
        return True

    # -- events ----------------------------------------------------------------------------

    def _on_quic_event(self, event: quic_events.QuicEvent) -> None:
        if not self.is_client:
            # (server) The request streams seen, for a GOAWAY; those past one are refused.
            stream_id = getattr(event, "stream_id", None)
            if stream_id is not None and not stream_id & 3:
                if self._goaway_sent is not None and stream_id >= self._goaway_sent:
                    self.h3_session.refuse_unprocessed(stream_id)
                    self._schedule_transmit()
                    return
                if stream_id >= self._next_request_stream:
                    self._next_request_stream = stream_id + 4
        if isinstance(event, engine.PathValidated):
            self._count("path_validations_ok")
            return
        if isinstance(event, engine.PathAbandoned):
            logger.info("[%s] path validation to %s failed", self.log_id, event.addr)
            self._count("path_validations_failed")
            return
        if isinstance(event, engine.SessionTicketReceived):
            self.on_ticket_received(event.ticket)
            return
        if isinstance(event, engine.PeerCertificateRefused):
            if self.failure is None:
                # Our verdict: the text has no "handshake refused" (the peer's).
                self.failure = PeerVerificationError(event.reason)
            return
        if isinstance(event, engine.PeerUnreachable):
            logger.debug("[%s] peer unreachable: %s", self.log_id, event.detail)
            self._unreachable(os.strerror(event.errno))
            return
        if isinstance(event, engine.PeerAddressChanged):
            logger.info("[%s] peer address changed to %s", self.log_id, event.addr)
            self._count("migrations_peer_address_change")
            return
        if isinstance(event, quic_events.HandshakeCompleted):
            self._on_handshake_completed(event)
            self._finish_handshake_wait()
        elif isinstance(event, quic_events.ConnectionTerminated):
            self._on_terminated(event)
            self._finish_handshake_wait()
            return
        elif (
            isinstance(event, quic_events.StreamDataReceived)
            and not self._handshake_done
            and not self._on_early_stream_data(event)
        ):
            return
        if not self._established:
            if self.failure is None:
                self._pending.append(event)
            return
        if (
            self.inbound_decider is not None
            and isinstance(event, quic_events.StreamDataReceived)
            and self._serve_in_engine(event, self.inbound_decider)
        ):
            return
        self.handle_events(self.h3_session.handle_quic_event(event))

    def _serve_in_engine(
        self, event: quic_events.StreamDataReceived, decide: InboundDecider
    ) -> bool:
        """(server) Offer a new request stream to ``decide`` (inbound engine flows,
        :meth:`~quicmesh.transport.base.Listener.set_engine_flows`): one whose first
        bytes hold its whole CONNECT, encoded with the static QPACK table only, that the
        connection's ``authorize`` allows, once the handshake is done (0-RTT streams go
        the usual way, with its early-data budget). True when the engine took it (the
        HTTP/3 layer never sees the stream); False leaves it to the HTTP/3 layer as
        usual."""
        stream_id = event.stream_id
        quic: Any = self.quic
        if (
            stream_id & 3  # not a client's bidirectional (request) stream
            or not self._handshake_done
            or self._lost is not None
            or self._closing
            or not hasattr(quic, "start_connect_splice")
            or not self.h3_session.is_new_request_stream(stream_id)
            or not quic.can_splice(stream_id)
        ):
            return False
        session = self.h3_session
        read = _aioquic.read_static_request(event.data, session.max_field_section_size)
        if read is None:
            return False
        fields, rest = read
        try:
            request = parse_connect_request(fields)
        except TunnelUsageError:
            return False  # the HTTP/3 layer answers 400, with the reason
        if not self._authorized(request.target):
            return False  # refused (and logged) the usual way
        flow = _EngineInboundFlow(self, stream_id, request.target, request.headers)
        try:
            plan = decide(flow)
        except Exception:  # the decider's bug: the stream still goes the usual way
            logger.exception(
                "[%s] stream %d: the engine-flow decider failed", self.log_id, stream_id
            )
            return False
        if plan is None:
            return False

        def done(outcome: tuple[int, int, str, bool] | OSError) -> None:
            self.engine_flow_ended()
            flow.splice_id = None
            self._schedule_transmit()
            if isinstance(outcome, OSError):
                plan.ended(outcome)
            else:
                plan.ended(self._engine_outcome(*outcome))

        self.engine_flows += 1
        self.streams_opened += 1
        try:
            flow.splice_id = quic.start_connect_splice(
                stream_id,
                plan.host,
                plan.port,
                plan.timeout,
                answer=_aioquic.connect_accepted_frame(),
                unparsed=rest,
                recv_fin=event.end_stream,
                done=done,
                idle_timeout=plan.idle_timeout,
            )
        except Exception as exc:  # (anything else: as a connection gone, nothing answered)
            self.engine_flow_ended()
            if not isinstance(exc, OSError):
                exc = OSError(errno.ECONNABORTED, str(exc) or type(exc).__name__)
            if exc.errno == errno.EAGAIN:
                # The stream's reading had already ended (a reset, or the connection
                # going): a flow that ended before it began, not a destination's fault.
                with contextlib.suppress(QuicmeshError):
                    quic.reset_stream(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
                plan.ended(SpliceOutcome(error=os_error_text(exc), connected=False))
            else:  # no socket to be had, or the connection is gone: nothing was answered
                plan.ended(exc)
        return True

    def _on_early_stream_data(self, event: quic_events.StreamDataReceived) -> bool:
        """(server) Stream data before the handshake completed: 0-RTT, accepted with a
        redeemed ticket. Serve it at once, within the 0-RTT budget."""
        if self.is_client or self._resumed_identity is None:
            return True
        self._early_bytes += len(event.data)
        if self._early_bytes > self._max_early_bytes:
            reason = f"more than {self._max_early_bytes} bytes of 0-RTT data"
            logger.warning("[%s] closing: %s", self.log_id, reason)
            self.quic.close(
                error_code=QuicErrorCode.PROTOCOL_VIOLATION,
                frame_type=QuicFrameType.STREAM_BASE,
                reason_phrase=reason,
            )
            self.transmit()
            return False
        if not self._established and self.failure is None:
            self._establish(self._resumed_identity, early_data="accepted")
        return True

    def start_early(self, identity: str) -> None:
        """(client) The ClientHello offered a ticket allowing 0-RTT: the connection
        is usable now, with the identity the ticket recorded."""
        self._transport_counters["zero_rtt_attempted"] += 1
        self._establish(identity, early_data="attempted")
        self.counters["zero_rtt_attempted"] += 1

    def _establish(self, identity: str, early_data: str = "none") -> None:
        # The native engine numbers a client connection once it is connected.
        self._log_id = self.quic.log_id
        self.log.extra = {"connection": self._log_id}
        self.peer_identity = identity
        self._early_data = early_data
        if early_data == "attempted":
            self._budget = EarlyDataBudget(remaining=self.options.max_early_data)
        elif early_data == "accepted":
            # (server) The client's count is at its handshake's end; a listener's is here
            # (it stayed 0: a listener could not tell how much 0-RTT it took).
            self._count("zero_rtt_accepted")
        self._established = True
        self.lost_before = self.quic.stats()["packets_lost"]
        pending, self._pending = self._pending, []
        for event in pending:
            self.handle_events(self.h3_session.handle_quic_event(event))

    def _on_handshake_completed(self, event: quic_events.HandshakeCompleted) -> None:
        self._handshake_done = True
        if self.on_handshake_done is not None:
            self.on_handshake_done(self)
        try:
            identity = self._verify_peer(event.session_resumed)
            if self._established and identity != self.peer_identity:
                raise PeerVerificationError(
                    f"peer is {identity}, but the session ticket was issued by {self.peer_identity}"
                )
        except PeerVerificationError as exc:
            self._refuse(exc)
            return
        if not self._established:
            # (server) A native listener serves a 0-RTT connection from here (aioquic's
            # from its first early stream data): it arrived in 0-RTT all the same.
            accepted = not self.is_client and event.early_data_accepted
            self._establish(identity, early_data="accepted" if accepted else "none")
        if not self.is_client:
            bucket = self.options.stream_rates.for_identity(identity, time.monotonic())
            if bucket is not None:
                self.quic.attach_stream_rate(bucket)
        # A socket engine PINGs an idle peer itself (EngineLimits.keep_alive); the
        # verdicts are the same, from its sampled counters (sample_liveness).
        self._liveness = Liveness(self.options.liveness, self._loop.time())
        if self._socket is not None:
            self._watch_liveness(self._loop.time())
        self._commit_tickets(identity)
        if self.is_client and self._early_data == "attempted":
            outcome = "accepted" if event.early_data_accepted else "rejected"
            self._count(f"zero_rtt_{outcome}")
            if not event.early_data_accepted:
                resent = self.quic.resend_early_data(self._loop.time())
                logger.info(
                    "[%s] 0-RTT rejected: resending %d packets in 1-RTT", self.log_id, resent
                )
        self._settle_early_data(event.early_data_accepted)

    def _refuse(self, exc: PeerVerificationError) -> None:
        self.failure = exc
        self._pending.clear()
        self._issued_tickets.clear()
        if self.is_client:
            logger.warning("[%s] refused server: %s", self.log_id, exc)
        else:
            self._count_handshake_failure("we refused a client", exc)
        self.quic.close(error_code=CRYPTO_ERROR_BAD_CERTIFICATE, reason_phrase=str(exc))
        if self._established:
            self.on_connection_lost(exc)

    def _same_peer_as_ticket(self) -> bool:
        """(client, 0-RTT rejected) Whether the server of the full handshake is the one
        whose ticket the flight went under: only then is the flight written again."""
        try:
            return self._verify_peer(False) == self.peer_identity
        except PeerVerificationError:
            return False

    def _verify_peer(self, resumed: bool) -> str:
        if resumed:
            # No certificate in a resumed handshake: the ticket vouches for the identity
            # verified when it was issued.
            if self._resumed_identity is None:
                raise PeerVerificationError("resumed session with no recorded peer identity")
            return self._resumed_identity
        certificate, chain = self.quic.peer_certificate()
        if certificate is None:
            raise PeerVerificationError("peer presented no certificate")
        trust = self.options.trust
        if self.is_client:
            # The engine verified the chain against our trust bundle already.
            return check_server_certificate(certificate, chain, trust)
        return verify_peer(certificate, chain, trust)

    def limit_early_handshake(self, timeout: float) -> None:
        """(client, early data) Fail the connection unless its handshake completes within
        ``timeout`` seconds; the timer goes once it does or the connection ends (left
        armed, it held every closed 0-RTT connection for that long: a soak review)."""
        timer = self._loop.call_later(timeout, self.handshake_timed_out, timeout)
        self.handshake_finished.add_done_callback(lambda _: timer.cancel())
        self.add_lost_callback(lambda _: timer.cancel())

    def handshake_timed_out(self, timeout: float) -> None:
        """(client, early data) The handshake did not complete in time."""
        if self._handshake_done or not self._established:
            return
        self.quic.close()
        self.transmit()
        self.on_connection_lost(ConnectError(f"QUIC handshake timed out after {timeout:g}s"))

    def _finish_handshake_wait(self) -> None:
        if not self.handshake_finished.done():
            self.handshake_finished.set_result(None)

    def _on_terminated(self, event: quic_events.ConnectionTerminated) -> None:
        self._stop_liveness()
        reason = _aioquic.close_reason_text(event.error_code, event.reason_phrase, event.frame_type)
        if self._handshake_done and getattr(self.quic, "closed_by_us", False):
            self._log_peer_violation(event.error_code, reason)
        if self._established:
            if self._handshake_done:
                # (A socket engine reports the peer's close only here.)
                self.on_connection_lost(self._peer_closed(event.error_code, reason))
            else:
                self.on_connection_lost(
                    ConnectError(f"QUIC connection closed during handshake: {reason}")
                )
        elif self.failure is None:
            if (
                event.error_code == CRYPTO_ERROR_BAD_CERTIFICATE
                or 0x100 <= event.error_code < 0x200
            ):
                whose = "server" if self.is_client else "client"
                if getattr(self.quic, "closed_by_us", False):  # aioquic's own verdict
                    if (
                        event.error_code == CRYPTO_ERROR_BAD_CERTIFICATE
                        or "certificate" in reason.lower()
                    ):
                        self.failure = PeerVerificationError(
                            f"{whose} certificate not trusted: {reason}"
                        )
                    else:  # another alert of ours: no common ALPN protocol, a bad message
                        self.failure = ConnectError(f"QUIC handshake failed: {reason}")
                    if not self.is_client:
                        self._count_handshake_failure("we refused a client", self.failure)
                else:
                    self.failure = PeerVerificationError(refused_by_peer(whose, reason))
                    if not self.is_client:  # a client refused our certificate (its alert)
                        self._count_handshake_failure("a client refused us", self.failure)
            else:
                self.failure = ConnectError(f"QUIC connection closed during handshake: {reason}")
                if not self.is_client and getattr(self.quic, "closed_by_us", False):
                    # aioquic ended it for the client's fault (a transport parameter only a
                    # server may send, a malformed frame): its own line went to DEBUG.
                    self._count_handshake_failure("we refused a client", self.failure)
        if self._close_socket:
            self.close_socket()

    def _peer_closed(self, error_code: int | None, reason: str) -> TunnelError:
        """What an established connection the peer closed is lost with. A client's
        TLS 1.3 handshake is done before the server has checked its certificate, so the
        server's refusal, its TLS alert (a CRYPTO_ERROR, 0x100-0x1ff, saying
        "certificate"), comes after: :class:`PeerVerificationError`, the server refused
        our certificate (it read "QUIC connection closed: peer certificate not signed by a
        trusted CA", as if the server's were at fault; a review of the library)."""
        if (
            self.is_client
            and error_code is not None
            and 0x100 <= error_code < 0x200
            and not getattr(self.quic, "closed_by_us", False)
            and "certificate" in reason.lower()
        ):
            return PeerVerificationError(refused_by_peer("server", reason))
        return closed_error(reason)

    def _count_handshake_failure(self, what: str, failure: Exception) -> None:
        """(server) A client's handshake failed: counted by reason, and logged at most once
        an interval per kind (anyone who can send a datagram can fail one at will)."""
        label = handshake_failure_reason(failure)[0]
        self._handshake_failures[label] += 1
        HANDSHAKE_FAILURE_LOG.log(
            logging.WARNING,
            f"{what}: {label}",
            "[%s] %s%s: %s",
            self.log_id,
            what,
            self._where(),
            failure,
        )

    def _where(self) -> str:
        """`` at host:port`` of the peer, or nothing when the engine no longer knows it."""
        try:
            address = self.peer_address
        except Exception:  # (the engine no longer knows its path)
            address = ""
        return f" at {address}" if address else ""

    def _log_peer_violation(self, code: int, reason: str) -> None:
        """This side closed the connection with an HTTP/3 or QPACK error code: the
        peer's traffic broke the protocol (RFC 9114 section 8, RFC 9204 section 6), and
        its every stream was lost with it. One line, naming the peer and what it did."""
        if code not in _PEER_VIOLATIONS:
            return
        protocol, name = _PEER_VIOLATIONS[code]
        self._count("peer_violations_quic" if protocol == "QUIC" else "peer_violations_http3")
        PEER_VIOLATION_LOG.log(
            logging.WARNING,
            f"peer_violation {code:#x}",  # (one peer's repeats hide no other fault)
            "[%s] closed the connection with %s%s: the peer broke %s: %s (%s)",
            self.log_id,
            self.peer_identity or "the peer",
            self._where(),
            protocol,
            reason,
            name,
        )


_PEER_VIOLATIONS = {
    int(code): ("HTTP/3", f"{code.name}, {int(code):#x}")
    for code in ErrorCode
    if code
    not in (ErrorCode.H3_NO_ERROR, ErrorCode.H3_REQUEST_CANCELLED, ErrorCode.H3_INTERNAL_ERROR)
}
_PEER_VIOLATIONS.update(
    (int(code), ("QUIC", f"{code.name}, {int(code):#x}"))
    for code in QuicErrorCode
    if 0 < code < 0x100
    and code
    not in (
        QuicErrorCode.INTERNAL_ERROR,
        QuicErrorCode.CONNECTION_REFUSED,
        QuicErrorCode.APPLICATION_ERROR,
    )
)
"""The error codes this side closes a connection with when the peer broke the protocol
(QUIC's transport errors, HTTP/3's and QPACK's), and their names: the QUIC ones as the
engine closes for them (aioquic's ``QuicConnectionError``, quinn's ``TransportError``)."""

PEER_VIOLATION_LOG = RateLimitedLog(logger)
"""A peer can break the protocol once per connection: logged at most once an interval."""

HANDSHAKE_FAILURE_LOG = RateLimitedLog(logger)
"""(server) Clients' failed handshakes: logged at most once an interval per kind."""


class SocketReceiver(asyncio.DatagramProtocol):
    """The asyncio protocol of a client's UDP socket (the first one, and each one
    the connection migrated to): reads datagrams in batches into its connection."""

    def __init__(self, connection: QuicPeerConnection, max_datagrams: int) -> None:
        self._connection = connection
        self._max_datagrams = max_datagrams
        self.reader: _udp.BatchReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.reader = _udp.BatchReader(
            cast(asyncio.DatagramTransport, transport),
            self._connection.datagram_received,
            max_datagrams=self._max_datagrams,
            on_error=self._connection.socket_error,
        )

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.reader is not None
        self.reader.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self._connection.socket_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader is not None:
            self.reader.close()
