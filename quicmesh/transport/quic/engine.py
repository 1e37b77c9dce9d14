"""The QUIC engine interface: what quicmesh needs from a QUIC implementation.

quicmesh's QUIC side has three layers (docs/design.md, "QUIC connection anatomy"):

* the **driver** (:mod:`quicmesh.transport.quic.connection`): one asyncio object
  per QUIC connection. It owns one :class:`EngineConnection`, the sans-IO
  HTTP/3 tunnel session on top of it (:class:`~quicmesh.tunnel.h3.H3TunnelSession`)
  and the shared stream bookkeeping
  (:class:`~quicmesh.transport._session.SessionConnection`); it arms one timer,
  moves datagrams (or wakes on the engine's batches), verifies the peer's
  identity, keeps the 0-RTT budget and the rebind rule, and counts;
* the **engine** (this interface): packet protection, frames, loss recovery,
  congestion control, flow control, TLS 1.3, connection IDs, paths. A
  :class:`QuicEngine` is chosen by name (``QuicTransport(..., engine="aioquic")``,
  :func:`get_engine`) and makes :class:`EngineConnection` objects;
* the engine's own library (aioquic for :mod:`quicmesh.transport.quic.aioquic_engine`;
  a native library for a native engine), never seen above this interface.

A second engine plugs in by implementing :class:`QuicEngine` and
:class:`EngineConnection` and calling :func:`register_engine`: the sidecar, the
tunnel session and the driver do not change.

Two I/O shapes are allowed (:attr:`QuicEngine.io`):

* ``"datagrams"`` (aioquic): the engine is sans-IO. The driver owns the UDP
  sockets, feeds :meth:`DatagramConnection.receive_datagram`, sends what
  :meth:`DatagramConnection.datagrams_to_send` returns, and arms one timer at
  :meth:`DatagramConnection.get_timer`. A server's datagrams are routed to
  connections by the driver's listener (connection IDs from
  :meth:`EngineConnection.next_event`'s ``ConnectionIdIssued`` /
  ``ConnectionIdRetired`` events), which asks the engine for a new connection
  with :meth:`QuicEngine.accept`.
* ``"socket"`` (a native engine with its own thread doing UDP I/O): the engine
  owns the sockets, timers and pacing. It watches its own wake-up file
  descriptor on the event loop (``loop.add_reader``) and calls the ``wake``
  callback given to :meth:`QuicEngine.connect` (or, for an accepted connection,
  :meth:`SocketConnection.set_wake`) on the event loop's thread when events for
  that connection wait; the driver then drains :meth:`EngineConnection.next_event`
  (a batch: many stream events per wake-up). A listener's ``wake``
  (:meth:`QuicEngine.listen`) says that :meth:`EngineListener.accepted` has
  connections. :meth:`SocketConnection.flush` tells the engine that commands
  issued since the last flush (stream writes, resets, credit) may go out.
  Migration is :meth:`SocketConnection.migrate`. There is no timer and no
  datagram in Python. :mod:`quicmesh.transport.quic.native_engine` is one (its
  docstring lists the hooks below it implements differently, e.g. tickets and
  0-RTT inside rustls, and the ones it cannot offer).

Events are aioquic's public event dataclasses (:mod:`aioquic.quic.events`:
``HandshakeCompleted``, ``StreamDataReceived``, ``StreamReset``,
``StopSendingReceived``, ``ConnectionTerminated``, ``ConnectionIdIssued``,
``ConnectionIdRetired``, ``ProtocolNegotiated``, ``PingAcknowledged``): they are
plain past-tense dataclasses, the vocabulary aioquic's HTTP/3 layer (which the
tunnel session uses, whatever the engine) understands. A native engine builds
them from its own events; nothing else of aioquic is needed for that. The
few facts aioquic has no event for are quicmesh's own events below
(:class:`PathValidated`, :class:`PathAbandoned`, :class:`PeerAddressChanged`,
:class:`SessionTicketReceived`).

What the interface asks for, by concern:

* streams with **read-driven credit** (:meth:`EngineConnection.track_stream`,
  :meth:`EngineConnection.stream_delivered`,
  :meth:`EngineConnection.stream_consumed`): receive windows grow from what the
  application has read, not from what arrived, so a reader that stops reading
  stops its peer (the tunnel's backpressure; docs/design.md);
* **timers**: one deadline per connection (datagram engines) or none (socket
  engines);
* **TLS identity**: our certificate, key and chain and the trust bundle in
  :class:`EngineTls`; the server always asks for a client certificate; the
  engine verifies the chain (client side: against ``trust_pem``) but *not* the
  SPIFFE ID, which the driver checks from :meth:`EngineConnection.peer_certificate`
  when the handshake completes, before any stream is served;
* **tickets and 0-RTT**: the client offers one ticket (:attr:`EngineTls.ticket`);
  the server looks tickets up through :attr:`EngineTls.fetch_ticket` (single
  use: the driver's :class:`~quicmesh.transport.tickets.TicketStore`) and reports
  each ticket it issues to :attr:`EngineTls.ticket_issued`; 0-RTT can be refused
  per listener (:attr:`EngineTls.accept_early_data`); a rejected 0-RTT flight is
  resent at once (:meth:`EngineConnection.resend_early_data`). Tickets are the
  engine's own objects to the driver; :mod:`quicmesh.transport.tickets` stores
  them, so an engine's ticket type must have aioquic's ``SessionTicket`` fields
  (or the engine gives a ticket codec in a later revision of this interface);
* **migration**: client-side moves to a new socket and the next connection ID
  (:meth:`EngineConnection.change_connection_id` for datagram engines,
  :meth:`SocketConnection.migrate` for socket engines); path validation results
  as events; the active path (:meth:`EngineConnection.active_path`);
* **liveness**: :meth:`EngineConnection.probe_timeouts`,
  :meth:`EngineConnection.awaiting_ack` and :meth:`EngineConnection.send_ping`,
  read by :mod:`quicmesh.transport.liveness`; stateless resets (RFC 9000 10.3)
  derived from a shared key (:attr:`EngineLimits.stateless_reset_key`) so that
  a restarted server's peers learn of it from their next packet;
* **congestion control** by name (:attr:`EngineLimits.congestion_control`;
  :meth:`QuicEngine.congestion_controls` lists the names an engine offers);
* **stats**: :meth:`EngineConnection.stats` with the keys of
  :data:`ENGINE_STATS`.

Errors: an engine raises :class:`EngineError` (or a subclass) for what the
driver must translate (a socket that cannot be opened, a closed connection);
its library's exceptions never cross this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from .._admission import AdmissionConfig
from .options import DEFAULT_MAX_EARLY_DATA

if TYPE_CHECKING:
    from cryptography import x509

    from ...tls import Identity, TrustBundle

Address = tuple[str, int]
NetworkAddress = Any
"""A peer address as the socket layer gives it (``(host, port)`` or
``(host, port, flowinfo, scope_id)`` for IPv6)."""

ENGINE_STATS = (
    "rtt",
    "rtt_min",
    "cwnd",
    "bytes_in_flight",
    "congestion_control",
    "packets_lost",
    "zero_rtt_packets_sent",
)
"""Keys every :meth:`EngineConnection.stats` returns (``rtt``/``rtt_min`` in
seconds or None before the first sample; ``cwnd`` and ``bytes_in_flight`` in bytes)."""


LIVENESS_SAMPLE = 0.25
"""(socket engines) Seconds between two :meth:`SocketConnection.sample_liveness`
calls while ack-eliciting packets await an acknowledgement."""


class EngineError(Exception):
    """An engine could not do what the driver asked (the message says what); the
    driver turns it into a :class:`~quicmesh.errors.QuicmeshError`."""


# -- quicmesh's own events (aioquic's event classes have no counterpart) -----------


@dataclass(frozen=True)
class PathValidated:
    """A PATH_RESPONSE validated the path to ``addr`` (RFC 9000 section 8.2)."""

    addr: NetworkAddress


@dataclass(frozen=True)
class PathAbandoned:
    """Validation of the path to ``addr`` failed; the engine went back to the last
    validated path (RFC 9000 section 9.3.2)."""

    addr: NetworkAddress


@dataclass(frozen=True)
class PeerAddressChanged:
    """(server) The peer's packets now come from ``addr`` (NAT rebinding or a
    client migration)."""

    addr: NetworkAddress


@dataclass(frozen=True)
class PeerCertificateRefused:
    """This side's TLS refused the peer's certificate inside the handshake (an engine
    that verifies there; ``reason`` names the problem). A refusal by the peer
    arrives as aioquic's ``ConnectionTerminated`` with a crypto error code."""

    reason: str


@dataclass(frozen=True)
class PeerUnreachable:
    """(socket engines) An ICMP destination unreachable (port, host or network) came
    back for a datagram to the peer's address, read off the engine's unconnected
    socket: the driver applies the same rule as to a datagram engine's connected
    socket reporting ``errno`` (:data:`.connection.UNREACHABLE_ERRNOS`)."""

    errno: int
    """``ECONNREFUSED`` (port unreachable), ``EHOSTUNREACH``, ``ENETUNREACH`` or ``EHOSTDOWN``."""
    detail: str
    """What the ICMP message said and who sent it (for logs)."""


@dataclass(frozen=True)
class SessionTicketReceived:
    """(client) The server issued a session ticket (engine's ticket object)."""

    ticket: Any


# -- what the driver gives an engine --------------------------------------------------


@dataclass(frozen=True)
class EngineLimits:
    """Transport settings of one connection, from :class:`~quicmesh.transport.quic.QuicOptions`.

    :param idle_timeout: seconds of silence before the connection is dropped.
    :param stream_window: initial receive window per stream (raised from the read
        path for tracked streams, see :meth:`EngineConnection.stream_consumed`).
    :param connection_window: initial receive window of the connection.
    :param max_streams: concurrent bidirectional streams the peer may open.
    :param congestion_control: algorithm name, one of
        :meth:`QuicEngine.congestion_controls`.
    :param max_datagram_size: UDP payload size sent from the start (1200 to 1452;
        an engine without path MTU discovery never sends more).
    :param mtu_discovery: (engines with DPLPMTUD, RFC 8899 / RFC 9000 14.3) probe
        the path for larger datagrams, up to 1452 bytes of UDP payload.
    :param ack_eliciting_threshold: (engines with draft-ietf-quic-ack-frequency)
        ack-eliciting packets a peer that supports the extension may receive
        before it must acknowledge; 1 is RFC 9000's default (an ACK for every
        second packet, no ACK_FREQUENCY frames sent).
    :param qlog_dir: write a qlog file per connection there (None: no qlog).
    :param stateless_reset_key: (server) secret the stateless reset tokens are
        derived from (HMAC-SHA256 of the connection ID, first 16 bytes:
        :func:`quicmesh._aioquic.stateless_reset_token`), so they survive restarts.
    :param alpn: ALPN protocols offered / accepted (HTTP/3).
    :param send_window: (native engine) bytes of stream data the engine holds
        unacknowledged over all streams (quinn's ``send_window``; None: quinn's
        default, about 10 MB).
    :param keep_alive: (socket engines) seconds of silence after which the engine
        PINGs the peer itself (None: never); datagram engines leave this to the
        driver's liveness rules.
    :param admission: (socket engines, server) half-open caps, Retry policy and
        handshake timeout the engine's listener applies
        (:mod:`quicmesh.transport._admission`); datagram engines get them from the
        driver's listener.
    :param max_early_data: (socket engines, server) 0-RTT payload bytes a resumed
        client may send before its handshake completes (plus
        :data:`~quicmesh.transport.quic.options.EARLY_DATA_OVERHEAD`); more closes
        the connection.
    """

    idle_timeout: float
    stream_window: int
    connection_window: int
    max_streams: int
    congestion_control: str
    max_datagram_size: int = 1200
    qlog_dir: str | None = None
    stateless_reset_key: bytes | None = None
    mtu_discovery: bool = True
    ack_eliciting_threshold: int = 1
    alpn: tuple[str, ...] = ("h3",)
    keep_alive: float | None = None
    send_window: int | None = None
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    max_early_data: int = DEFAULT_MAX_EARLY_DATA


@dataclass(frozen=True)
class EngineTls:
    """TLS identity and ticket hooks of one connection (or of one listener).

    :param identity: our certificate, chain and private key.
    :param trust: CAs the peer's chain must reach. A client engine verifies the
        server's chain against it; a server engine requests a client certificate
        and leaves its verification to the driver
        (:func:`quicmesh.tls.verify_peer`), which also checks the SPIFFE ID.
    :param ticket: (client) the session ticket to offer, or None.
    :param fetch_ticket: (server) ``fetch_ticket(label)`` gives the ticket a
        ClientHello offers, or None to refuse resumption. A resumed handshake
        asks for no client certificate.
    :param ticket_issued: (server) called with each ticket issued (after the
        client's Finished, before ``HandshakeCompleted``).
    :param accept_early_data: (server) False refuses 0-RTT even with a valid ticket
        (EncryptedExtensions without ``early_data``; 0-RTT packets dropped).
    """

    identity: Identity
    trust: TrustBundle
    ticket: Any = None
    fetch_ticket: Callable[[bytes], Any] | None = None
    ticket_issued: Callable[[Any], None] | None = None
    accept_early_data: bool = True


# -- what an engine gives the driver ----------------------------------------------


@runtime_checkable
class EngineConnection(Protocol):
    """One QUIC connection inside an engine: the driver's only view of QUIC.

    The stream and event methods are aioquic's ``QuicConnection`` public API
    (same names and arguments), so aioquic's HTTP/3 layer runs on any engine;
    the rest is what quicmesh adds. All methods are called on the event loop's
    thread and must not block.
    """

    @property
    def is_client(self) -> bool:
        """Whether this is the client side."""

    @property
    def log_id(self) -> str:
        """A short hex connection ID for logs."""

    # -- streams (aioquic's names) --

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int:
        """The ID the next locally opened stream will get."""

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Queue ``data`` (and FIN) on a stream, opening it if needed."""

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Abandon sending on a stream (RESET_STREAM)."""

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        """Ask the peer to stop sending on a stream (STOP_SENDING)."""

    def next_event(self) -> Any:
        """The next pending event (aioquic event classes or this module's), or None."""

    def close(
        self, error_code: int = 0, frame_type: int | None = None, reason_phrase: str = ""
    ) -> None:
        """Close the connection (CONNECTION_CLOSE); ``ConnectionTerminated`` follows."""

    def send_ping(self, uid: int) -> None:
        """Send an ack-eliciting PING (keepalive, path probe after migration)."""

    # -- streams: read-driven credit and sender state --

    def track_stream(self, stream_id: int) -> None:
        """Drive this stream's receive window from the read path from now on."""

    def stream_delivered(self, stream_id: int, stream_bytes: int, payload_bytes: int) -> None:
        """``stream_bytes`` of the stream reached the HTTP/3 layer, of which
        ``payload_bytes`` now wait for the application (they hold credit back)."""

    def stream_consumed(self, stream_id: int, payload_bytes: int) -> bool:
        """The application read ``payload_bytes``; True when a window update is now
        due (the driver then transmits / flushes)."""

    def forget_stream(self, stream_id: int) -> None:
        """The stream is finished: its unread payload no longer holds credit back."""

    def stream_unsent_bytes(self, stream_id: int) -> int:
        """Bytes written to the stream not yet put in a packet (for ``drain()``)."""

    def stream_is_open(self, stream_id: int) -> bool:
        """Whether the engine still holds state for the stream."""

    def can_open_bidi_stream(self) -> bool:
        """Whether the peer's MAX_STREAMS allows one more bidirectional stream now."""

    # -- TLS and tickets --

    def peer_certificate(self) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
        """The certificate and chain the peer presented (full handshakes only)."""

    def resend_early_data(self, now: float) -> int:
        """(client) 0-RTT was rejected: send what went as 0-RTT again in 1-RTT
        packets at once (no congestion event); return how many packets (a socket
        engine: streams) that was."""

    # -- closing, liveness, paths --

    def closing_reason(self) -> str | None:
        """Why the connection is closing as soon as it is (before the draining
        period ends and ``ConnectionTerminated`` comes), or None while open."""

    def is_draining(self) -> bool:
        """True once the peer's CONNECTION_CLOSE arrived (send nothing more)."""

    def probe_timeouts(self) -> int:
        """Consecutive probe timeouts without an acknowledgement (RFC 9002 6.2)."""

    def awaiting_ack(self) -> bool:
        """Whether ack-eliciting packets are in flight, unacknowledged."""

    def active_path(self) -> tuple[NetworkAddress, bool] | None:
        """The peer address packets go to now and whether that path is validated."""

    def spare_connection_ids(self) -> int:
        """Connection IDs the peer issued that are not in use yet."""

    def change_connection_id(self) -> None:
        """Switch to the next connection ID the peer issued (before migrating)."""

    def attach_stream_rate(self, bucket: Any) -> None:
        """(server) Grant the peer new-stream credit (MAX_STREAMS) no faster than the
        :class:`~quicmesh.transport._stream_rate.StreamRate` ``bucket`` allows."""

    def stats(self) -> dict[str, Any]:
        """The keys of :data:`ENGINE_STATS`."""


@runtime_checkable
class DatagramConnection(EngineConnection, Protocol):
    """An engine connection the driver moves datagrams for (``io="datagrams"``)."""

    def connect(self, addr: NetworkAddress, now: float) -> None:
        """(client) Start the handshake towards ``addr``."""

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        """Process one received UDP datagram."""

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """The datagrams to send now, with their destination."""

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next (loop time), or None."""

    def handle_timer(self, now: float) -> None:
        """The timer fired (loss detection, ACK delay, idle, pacing)."""

    def is_stateless_reset(self, data: bytes) -> bool:
        """(client) Whether ``data`` is a stateless reset for this connection."""

    def terminate_after_stateless_reset(self) -> None:
        """End at once after a stateless reset; ``ConnectionTerminated`` follows."""

    def received_valid_packet(self) -> bool:
        """(server) Whether a packet has decrypted yet (admission drops it if not)."""

    def pending_issued_connection_ids(self) -> list[bytes]:
        """(server) Connection IDs just issued whose ``ConnectionIdIssued`` event is
        still queued (the listener routes them at once)."""


@runtime_checkable
class SocketConnection(EngineConnection, Protocol):
    """An engine connection whose engine owns the UDP socket (``io="socket"``).

    The engine thread reads and writes datagrams, runs timers and pacing, and
    queues events; it calls the ``wake`` callback given to the engine when the
    queue goes from empty to non-empty.
    """

    def set_wake(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` on the event loop's thread whenever events for this
        connection were queued (the driver then drains :meth:`next_event`)."""

    def flush(self) -> None:
        """Let commands issued since the last flush go out (one wake of the engine
        thread per batch of driver work, not per call)."""

    async def migrate(self, local_address: Address | None) -> Address:
        """(client) Move to a new UDP socket (``None``: same host, new port) and the
        next connection ID; return the new local address. Raises
        :class:`EngineError` when the socket cannot be opened."""

    def local_address(self) -> Address:
        """The local address of the socket in use."""

    def has_request_streams(self) -> bool:
        """Whether a bidirectional stream is still open (the connection is not idle)."""

    @property
    def early(self) -> bool:
        """(client) The connection resumed a session with 0-RTT and the server has not
        answered yet (the engine keeps its own tickets: :attr:`EngineTls.ticket` is
        not used)."""

    def resumed_identity(self) -> str | None:
        """(client) The server identity the resumed session vouches for (the one
        verified at its last full handshake with that address), or None."""

    def sample_liveness(self, now: float) -> bool:
        """Read the engine's counters at ``now`` (the driver's clock): return whether a
        datagram from the peer arrived since the last sample. Until the next sample,
        :meth:`~EngineConnection.awaiting_ack` and
        :meth:`~EngineConnection.probe_timeouts` answer from this one, so the
        driver's liveness rules (:mod:`quicmesh.transport.liveness`) run on a socket
        engine too; the driver samples at least every :data:`LIVENESS_SAMPLE` seconds
        while something awaits an acknowledgement."""


class EngineListener(Protocol):
    """(socket engines) A listening UDP socket owned by the engine."""

    @property
    def address(self) -> Address:
        """The bound address."""

    def accepted(self) -> Iterable[SocketConnection]:
        """Connections accepted since the last call (each one's first events wait)."""

    def refused(self) -> list[str]:
        """Why each handshake the engine refused since the last call failed."""

    def counted(self) -> dict[str, int]:
        """Admission counters (:data:`~quicmesh.transport._admission.ADMISSION_COUNTERS`)
        added since the last call: Initials dropped, refused, retried, timed out."""

    def set_identity(self, tls: EngineTls) -> None:
        """Present ``tls.identity`` and trust ``tls.trust`` from the next handshake on
        (certificate rotation); connections already made carry on.

        :raises EngineError: the identity or trust bundle cannot be used.
        """

    def close(self) -> None:
        """Stop accepting; close the socket (connections close through their driver)."""

    async def wait_released(self) -> None:
        """(after :meth:`close`) Return once the socket is closed and its port free
        (the engine may keep it while closed connections drain)."""


class QuicEngine(Protocol):
    """A QUIC implementation quicmesh can run on (see the module docstring)."""

    name: str
    """The name :func:`get_engine` and ``QuicTransport(engine=...)`` know it by."""

    io: Literal["datagrams", "socket"]
    """Who moves datagrams: the driver (``"datagrams"``) or the engine (``"socket"``)."""

    def congestion_controls(self) -> list[str]:
        """Congestion-control names this engine accepts, sorted."""

    def connect(
        self,
        limits: EngineLimits,
        tls: EngineTls,
        address: Address,
        *,
        wake: Callable[[], None] | None = None,
        resume: bool = True,
    ) -> EngineConnection:
        """A client connection to ``address``, handshake not started.

        A datagram engine returns a :class:`DatagramConnection` (the driver opens
        the socket and calls :meth:`DatagramConnection.connect`); a socket engine
        returns a :class:`SocketConnection` already sending its first flight and
        calls ``wake`` when events wait. ``resume=False``: a full handshake even
        where a socket engine holds a ticket for ``address`` (a datagram engine
        resumes only with the ticket the driver put in its configuration).
        """

    def accept(
        self,
        limits: EngineLimits,
        tls: EngineTls,
        *,
        original_destination_connection_id: bytes | None,
        retry_source_connection_id: bytes | None,
    ) -> DatagramConnection:
        """(datagram engines) A server connection for a new client Initial."""

    def listen(
        self,
        limits: EngineLimits,
        tls: EngineTls,
        address: Address,
        *,
        wake: Callable[[], None],
    ) -> EngineListener:
        """(socket engines) Listen on ``address``; ``wake`` when connections or
        events wait. Raises :class:`EngineError` when the socket cannot be bound."""

    def close(self) -> None:
        """Release what the engine holds besides its connections and listeners (a
        socket engine's client sockets; client connections still on them end)."""


_ENGINES: dict[str, Callable[[], QuicEngine]] = {}


def register_engine(name: str, factory: Callable[[], QuicEngine]) -> None:
    """Make ``QuicTransport(engine=name)`` build its connections with ``factory()``."""
    _ENGINES[name] = factory


def engine_names() -> list[str]:
    """The names of the registered engines, sorted."""
    _register_builtin()
    return sorted(_ENGINES)


def get_engine(name: str) -> QuicEngine:
    """The engine registered as ``name``.

    :raises ValueError: unknown name (the message lists the valid ones).
    """
    _register_builtin()
    factory = _ENGINES.get(name)
    if factory is None and name == "native":
        from ...errors import ConfigError
        from .native_engine import NOT_BUILT

        raise ConfigError(NOT_BUILT)
    if factory is None:
        # Every engine quicmesh knows, built here or not, and any registered besides.
        from ..base import QUIC_ENGINE_NAMES

        valid = ", ".join(sorted({*_ENGINES, *QUIC_ENGINE_NAMES}))
        raise ValueError(f"unknown QUIC engine {name!r}: valid engines are {valid}")
    return factory()


def _register_builtin() -> None:
    if "aioquic" not in _ENGINES:
        from .aioquic_engine import AioquicEngine

        register_engine("aioquic", AioquicEngine)
    if "native" not in _ENGINES:
        from .native_engine import NativeEngine, native_available

        if native_available():
            register_engine("native", NativeEngine)
