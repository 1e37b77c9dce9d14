"""The socket interface a proxy plugs in: Transport, Listener, PeerConnection.

These abstract classes are defined once; :class:`~quicmesh.QuicTransport`,
:class:`~quicmesh.H2Transport`, :class:`~quicmesh.TcpTransport` and
:class:`~quicmesh.AutoTransport` implement them, and a proxy picks one by
configuration without changing its own code. A flow is a
:class:`~quicmesh.transport.stream.MeshStream` whichever transport carries it.

Every implementation takes the same arguments (``connect(..., early_data=)``,
``open_stream(..., wait_response=)``, ``listen(..., early_data=)``) and says what
it can do through attributes (:attr:`PeerConnection.supports_migration`,
:attr:`PeerConnection.early_data`, :attr:`Transport.counters`), so that a caller
never asks which transport it has. :func:`transport_registry` builds one by name
from its per-transport options (:mod:`quicmesh.transport.registry`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

from ..errors import ConfigError, TunnelError, TunnelUsageError, os_error_text
from ..tls import Identity, TrustBundle
from .stream import MeshStream, SpliceOutcome

if TYPE_CHECKING:
    from cryptography import x509

    from .registry import TransportRegistry as TransportRegistry

Address = tuple[str, int]


def checked_address(address: object, what: str) -> Address:
    """``address`` if it is a ``(host, port)`` pair (a host name or IP address, a port
    0-65535), for the public API's ``connect``, ``listen`` and ``migrate``.

    :raises ConfigError: naming ``what`` and the value (a ``"host:port"`` string was
        indexed as a pair before: ``("1", "2")``, a connection to 0.0.0.1 port 2).
    """
    pair = tuple(address) if isinstance(address, (tuple, list)) else None
    if pair is None or len(pair) != 2:
        raise ConfigError(f"{what}: expected a (host, port) pair, got {address!r}")
    host, port = pair
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{what}: the host must be a non-empty string, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"{what}: the port must be an integer 0-65535, got {port!r}")
    return (host, port)


StreamHandler = Callable[[MeshStream], Awaitable[None]]
"""Called once per accepted stream, in its own task."""

Authorizer = Callable[[str, str], bool]
"""``authorize(peer_spiffe_id, target) -> bool``: may this peer reach this target? It
answers at once, on the event loop (an ``async def`` one is refused by ``listen``)."""


def checked_authorizer(authorize: Authorizer | None) -> Authorizer | None:
    """``authorize`` as ``listen`` takes it: None, or a plain callable.

    :raises TunnelUsageError: it is an ``async def`` function (or an object whose
        ``__call__`` is one): its answer would be a coroutine, which is true, so every
        stream would be allowed (a review found it so on every transport).
    """
    if authorize is None:
        return None
    if not callable(authorize):
        raise TunnelUsageError(f"authorize must be callable, not {type(authorize).__name__}")
    call = type(authorize).__call__  # (an object's own; a function's is the function)
    if inspect.iscoroutinefunction(authorize) or inspect.iscoroutinefunction(call):
        raise TunnelUsageError(
            "authorize must answer at once (a plain function returning a bool), not be an"
            " async function: look up what it needs before listen(), or refuse in the"
            " stream handler (stream.refuse(403, ...))"
        )
    return authorize


def host_port(address: Any) -> str:
    """A socket address (``(host, port, ...)``) as ``host:port`` or ``[v6]:port``; ``""``
    for anything else."""
    if not isinstance(address, tuple) or len(address) < 2:
        return ""
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class FlowEvents(Protocol):
    """What an :class:`EngineAcceptor` reports, in the order its engine saw it."""

    def flow_accepted(self, flow: int, peer: tuple[str, int]) -> None:
        """A connection from ``peer`` was accepted as ``flow``: start it
        (:meth:`PeerConnection.start_engine_flow`) or take it (:meth:`EngineAcceptor.release`)."""

    def flow_unanswered(self, flow: int, kind: str, reason: str) -> None:
        """An engine flow got no plain 200: nothing was read from its socket, which
        waits for :meth:`EngineAcceptor.release`. ``kind``: ``answered`` (something else,
        e.g. a refusal), ``reset`` (the peer reset or ended the stream first),
        ``timeout`` (no answer in time) or ``lost`` (the connection failed); ``reason``
        says more.

        An object that also has ``flow_refused(flow, refusal)`` hears of a refusal the
        engine could read there instead (``refusal``: the peer's
        :class:`~quicmesh.errors.StreamRefused`, status and reason, what
        :meth:`PeerConnection.open_stream` would have raised; the socket waits as
        here): then that is the flow's answer, and asking again is not needed."""

    def flow_ended(self, flow: int, sent: int, received: int, error: str) -> None:
        """An engine flow ended: payload bytes each way, and why it failed ("" if not)."""


class EngineAcceptor(ABC):
    """An accept loop a transport's engine runs on a listening socket, for flows the
    engine carries from accept to end (*engine flows*: see
    :meth:`Transport.engine_acceptor`)."""

    @abstractmethod
    def release(self, flow: int) -> socket.socket | None:
        """The accepted connection ``flow`` as a non-blocking socket the caller owns,
        or None if it is not waiting (running, or gone)."""

    @abstractmethod
    def abort(self, flow: int, code: int) -> bool:
        """Reset a running engine flow both ways; its end is reported as any other's.
        Whether it was still running."""

    @abstractmethod
    def moved(self, flow: int) -> tuple[int, int] | None:
        """(bytes read from the accepted connection and sent on the stream, bytes
        received and written to it) so far by a running engine flow; None once it ended
        (its end reports the totals) or before it started."""

    @abstractmethod
    def stop(self) -> None:
        """Stop accepting; accepted and running flows carry on."""

    @abstractmethod
    def close(self) -> None:
        """Stop accepting and reporting (once no flow runs)."""


class InboundEngineFlow(ABC):
    """(accepting side) A peer's CONNECT that the transport's engine can carry from here
    to its end: connect the destination, answer 200, splice (*inbound engine flows*: see
    :meth:`Listener.set_engine_flows`). What a handler would learn of its
    :class:`MeshStream`, and what an overload action needs of a running flow."""

    channel: PeerConnection
    stream_id: int
    target: str
    """The CONNECT target, ``host:port`` (a parsed :class:`~quicmesh.tunnel.connect.Target`)."""
    headers: dict[str, str]
    peer_identity: str
    peer_address: str
    transport: str

    @property
    @abstractmethod
    def buffered_bytes(self) -> int:
        """What the flow holds in memory now (0 before it runs and after it ended)."""

    @abstractmethod
    def spliced_bytes(self) -> tuple[int, int] | None:
        """(bytes read from the destination and sent on the stream, bytes received and
        written to the destination) so far, while the engine carries the flow; None
        before and after (its outcome has the totals)."""

    @abstractmethod
    def abort(self) -> None:
        """Reset the running flow both ways; its end is reported as any other's."""

    @abstractmethod
    def refuse(self, status: int, reason: str) -> None:
        """Answer the CONNECT with ``status`` and ``reason`` (a flow whose destination
        could not be connected: nothing else was sent on the stream)."""


@dataclass
class EngineFlowPlan:
    """Where an :class:`InboundEngineFlow` goes, and who hears of its end."""

    host: str
    """An IP address: the engine connects it as it is."""
    port: int
    timeout: float
    """Seconds the destination's TCP connect may take."""
    ended: Callable[[SpliceOutcome | OSError], None]
    """Called once, with the flow's outcome, or the OSError its connect failed with
    (nothing was answered then: the callee refuses the flow)."""
    idle_timeout: float | None = None
    """Seconds with no byte moving either way after which the flow is reset both ways
    (None: never)."""


InboundDecider = Callable[[InboundEngineFlow], EngineFlowPlan | None]
"""Decides a peer's CONNECT at once (in the engine's event batch): a plan the engine
carries out, or None to hand the stream to the listener's handler as usual."""


class PeerConnection(ABC):
    """A connection to one peer sidecar that carries many streams."""

    transport_name: str
    peer_identity: str
    """The peer sidecar's SPIFFE ID, verified during the handshake."""

    @abstractmethod
    async def open_stream(
        self,
        target: str,
        headers: dict[str, str] | None = None,
        *,
        wait_response: bool = True,
    ) -> MeshStream:
        """Open a flow to ``target`` (``host:port``) through the peer sidecar.

        Waits while the peer's stream limit is reached. Raises
        :class:`~quicmesh.errors.InvalidTarget` for a malformed target or header,
        :class:`~quicmesh.errors.StreamRefused` when the peer answers with an error
        status, :class:`~quicmesh.errors.ConnectionLost` when the connection fails.

        :param wait_response: False returns as soon as the CONNECT is queued, so the
            first bytes written follow it at once (as 0-RTT on a QUIC connection
            whose :attr:`early_data` is ``"attempted"``); a refusal then surfaces as
            :class:`~quicmesh.errors.StreamRefused` from the stream's next read,
            write or drain. A transport that opens a connection per flow (TCP)
            always waits for the answer and ignores it.
        """

    @property
    @abstractmethod
    def is_closed(self) -> bool:
        """True once the connection is closed or lost."""

    @property
    def early_data(self) -> str:
        """0-RTT outcome: ``"none"``, ``"attempted"`` (handshake still running: streams
        opened with ``wait_response=False`` go as 0-RTT), ``"accepted"`` or
        ``"rejected"``. Always ``"none"`` on transports without 0-RTT."""
        return "none"

    @property
    def supports_migration(self) -> bool:
        """Whether :meth:`migrate` can move this connection to a new local address
        (a QUIC client connection); False by default."""
        return False

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer presented in the handshake; None when unknown (a
        resumed QUIC session presents none). TLS-over-TCP, a handshake per flow: the
        latest flow's."""
        return None

    @property
    def peer_chain(self) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
        """The certificate the peer presented and the intermediates it sent with it, to
        verify them again (with a new trust bundle); ``(None, [])`` when unknown."""
        return self.peer_certificate, []

    @property
    def peer_address(self) -> str:
        """The peer sidecar's address now, ``host:port`` (``[v6]:port``); ``""`` if unknown."""
        return ""

    @property
    @abstractmethod
    def active_streams(self) -> int:
        """Streams currently open on this connection."""

    @property
    @abstractmethod
    def can_open_stream(self) -> bool:
        """Whether a stream can be opened now without waiting for the peer's credit."""

    async def wait_for_stream_credit(self) -> None:
        """Return once a stream can be opened without waiting for the peer's credit.

        The wait :meth:`open_stream` makes first, on its own: a caller that must tell
        waiting for credit from waiting for the peer's answer (a pool whose queued flow
        timed out; its endpoint is not at fault) awaits this, then :meth:`open_stream`.
        The default returns at once, for connections without a stream limit of their
        own (TCP: a connection per flow).

        :raises ~quicmesh.errors.ConnectionLost: the connection takes no new stream
            (closed, lost, or its peer going away), as :meth:`open_stream` would.
        """
        return

    @property
    def stream_needs_dial(self) -> bool:
        """Whether a stream opened now would first dial a connection of its own (TCP:
        each flow is a TLS connection); False by default."""
        return False

    @property
    def lost_error(self) -> TunnelError | None:
        """Why the connection ended (None while it is open, or where not known)."""
        return None

    @property
    def going_away(self) -> bool:
        """True once the peer announced that it takes no new stream on this connection
        (an HTTP/3 GOAWAY, RFC 9114 5.2, or an HTTP/2 one with NO_ERROR, RFC 9113 6.8: it
        is shutting down): :meth:`open_stream` then raises
        :class:`~quicmesh.errors.ConnectionLost`, so open new flows on another
        connection; the open ones carry on. (An HTTP/2 GOAWAY with an error code ends
        the connection.)"""
        return False

    def go_away(self) -> bool:
        """(accepting side) Tell the peer to open no new stream on this connection, as a
        draining server does (an HTTP/3 GOAWAY naming the first request stream not yet
        seen, RFC 9114 5.2): streams already open carry on, and requests on later streams
        are refused with H3_REQUEST_REJECTED, which tells the peer that they were not
        processed. HTTP/2 (the h2 transport, and h2 under ``auto``): a GOAWAY with
        NO_ERROR naming the last stream the peer opened; later requests are refused with
        REFUSED_STREAM. True when this call sent it: once a connection, after its
        handshake; never on TLS-over-TCP (one flow a connection)."""
        return False

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters. Every transport: ``transport``, ``peer_identity``, ``bytes_sent``,
        ``bytes_received``, ``streams_opened``, ``streams_active``. Where the transport
        knows them: ``rtt`` (s), ``packets_lost`` and ``cwnd`` (bytes) on QUIC and on h2
        (the kernel's TCP_INFO of its one connection), ``packets_sent`` and
        ``packets_received`` on QUIC; TLS-over-TCP, a TCP connection per flow, gives
        ``connections_opened`` and ``connections_active`` instead. A QUIC connection
        adds its share of its transport's :attr:`Transport.counters` (e.g.
        ``migrations_active``) and engine figures (``bytes_in_flight``, None on the
        native engine, which does not expose it; ``mtu`` there)."""

    @abstractmethod
    def close(self) -> None:
        """Close gracefully (GOAWAY / CONNECTION_CLOSE); open streams are reset."""

    @abstractmethod
    async def wait_closed(self) -> None:
        """Wait until the connection is fully closed."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """``async with await transport.connect(...) as conn:`` closes it at the block's
        end (:meth:`close`: streams still open are reset; call :meth:`aclose` in the
        block for a graceful end) and waits until it is closed."""
        self.close()
        await self.wait_closed()

    async def aclose(self, timeout: float = 10.0) -> None:
        """Close gracefully: open no new stream, let open ones finish, then close.

        Streams still open after ``timeout`` seconds are reset by the close. Unlike
        :meth:`close`, no byte a stream has written is lost if it finishes in time.
        """
        self.close()
        await self.wait_closed()

    async def migrate(self, local_address: Address | None = None) -> None:
        """Move the connection to a new local address (only where
        :attr:`supports_migration`; others raise :class:`NotImplementedError`)."""
        raise NotImplementedError(f"{self.transport_name} connections cannot migrate")

    def can_start_engine_flow(self) -> bool:
        """Whether :meth:`start_engine_flow` may start a flow now (False by default)."""
        return False

    def start_engine_flow(
        self,
        acceptor: EngineAcceptor,
        flow: int,
        target: str,
        headers: dict[str, str],
        timeout: float,
        idle_timeout: float | None = None,
    ) -> bool:
        """Have the engine carry the connection ``acceptor`` accepted as ``flow`` on this
        connection: a CONNECT for ``target`` with ``headers``, then (once the peer
        answered 200 within ``timeout`` seconds) the flow's bytes, with no Python on
        the way (reset both ways once no byte moved for ``idle_timeout`` seconds);
        counted in :attr:`active_streams` until :meth:`engine_flow_ended`. False when
        nothing was started (the default: this connection cannot; or it cannot now),
        the socket still waiting in ``acceptor``."""
        return False

    def engine_flow_ended(self) -> None:
        """A flow :meth:`start_engine_flow` started has ended, or went back to the caller
        (nothing to do where none can start)."""
        return None


class Listener(ABC):
    """Accepts peer connections and hands each stream to the handler."""

    address: Address
    """The (host, port) actually bound."""

    @property
    @abstractmethod
    def connections(self) -> Sequence[PeerConnection]:
        """The accepted peer connections still open (a snapshot)."""

    @abstractmethod
    def close(self) -> None:
        """Stop accepting; established connections are closed."""

    @abstractmethod
    async def wait_closed(self) -> None:
        """Wait until the listener and its connections are closed (stream handlers still
        running carry on: :meth:`PeerConnection.wait_closed` waits for its own)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """``async with await transport.listen(...) as listener:`` closes it at the
        block's end and waits until its port is free."""
        self.close()
        await self.wait_closed()

    def set_engine_flows(self, decide: InboundDecider | None) -> bool:
        """Offer each peer CONNECT the engine could carry itself to ``decide`` first
        (None: stop), in the engine's event batch: a plan the engine then carries out
        (connect, answer, splice), or None for the listener's handler. Whether this
        listener can (False, the default: its streams all go to the handler)."""
        return False


DEFAULT_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a server waits for a client to finish its TLS handshake (h2 and TLS-over-TCP;
the QUIC listener's admission ``handshake_timeout`` has the same default)."""


def engine_failure_text(error: str, lost: TunnelError | None) -> str:
    """Why an engine-carried flow failed, as the engine words it (``error``), with the
    reason its connection was lost (``lost``, :attr:`PeerConnection.lost_error`) where
    the engine only knows that it was: quinn sees the close Python's liveness checks
    made, or its own idle timer, not that the peer was unresponsive or unreachable."""
    if lost is not None and error.startswith("connection lost"):
        return f"connection lost: {lost}"
    return error


def checked_tls(identity: object, trust: object) -> None:
    """Refuse an ``identity`` or ``trust`` of the wrong kind when a transport is made,
    naming it, rather than with an internal error at the first handshake (a
    :class:`~quicmesh.DevCA` passed as ``trust``, where its ``trust_bundle`` belongs, is
    an easy slip).

    :raises ConfigError: either is not of its type.
    """
    if not isinstance(identity, Identity):
        raise ConfigError(
            "identity must be a quicmesh.Identity (Identity.from_files(...) or DevCA().issue(...)),"
            f" not {type(identity).__name__}"
        )
    if not isinstance(trust, TrustBundle):
        hint = " (its trust_bundle?)" if hasattr(trust, "trust_bundle") else ""
        raise ConfigError(
            "trust must be a quicmesh.TrustBundle (TrustBundle.from_file(...) or"
            f" DevCA().trust_bundle), not {type(trust).__name__}{hint}"
        )


class Transport(ABC):
    """A way of carrying flows between sidecars, with mutual TLS on every hop."""

    name: str

    connection_per_flow: bool = False
    """Whether every flow has a connection of its own (TCP): per-connection limits
    then do not apply, and a limit on flows bounds connections too."""

    def __init__(self, *, identity: Identity, trust: TrustBundle) -> None:
        checked_tls(identity, trust)
        self.identity = identity
        self.trust = trust
        self.handshake_failures: Counter[str] = Counter()
        """(server side) Handshakes refused, by reason (see
        :func:`quicmesh.tls.check.handshake_failure_reason`)."""
        self.counters: Counter[str] = Counter()
        """Event counts over every connection and listener of this transport, each
        key present from the start (zero): QUIC's 0-RTT, tickets, migrations, path
        validations and admission events (:data:`quicmesh.transport.quic.COUNTERS`).
        Empty for a transport that counts nothing of the kind (H2, TCP)."""

    def identity_problem(self, identity: Identity, trust: TrustBundle) -> str | None:
        """Why :meth:`set_identity` could not take ``identity`` and ``trust`` here (the
        TLS library or QUIC engine under this transport cannot load them), in one line;
        None if it can. Asked before a rotation, so that one every transport cannot
        take changes nothing."""
        return None

    def set_identity(self, identity: Identity, trust: TrustBundle) -> None:
        """Present ``identity`` and verify with ``trust`` in every handshake from now on.

        Connections already established keep the certificates they were made with.

        :raises ConfigError: ``identity`` or ``trust`` is not what it must be.
        """
        checked_tls(identity, trust)
        self.identity = identity
        self.trust = trust

    @abstractmethod
    async def listen(
        self,
        address: Address,
        handler: StreamHandler,
        authorize: Authorizer | None = None,
        *,
        early_data: bool = True,
    ) -> Listener:
        """Accept peer connections on ``address``.

        Each stream whose CONNECT is well formed and allowed by ``authorize`` is
        passed to ``handler``; the others are refused and logged: a request that is not
        a plain CONNECT or names a bad target is answered 400, one ``authorize`` refuses
        403, an HTTP/3 header section over the limit is reset (431 in the log), and a
        field section that breaks HTTP's rules resets the stream. A handler object with a
        ``rejected(connection, status, reason)`` method also hears of those answered 400
        and the 431s (a sidecar logs them as refused flows); one that raises is logged,
        and the connection carries on.

        :param early_data: accept 0-RTT from clients resuming a session (QUIC);
            ignored by transports without 0-RTT.
        """

    @abstractmethod
    async def connect(
        self, address: Address, *, timeout: float = 10.0, early_data: bool = False
    ) -> PeerConnection:
        """Connect to the peer sidecar at ``address``, verifying its identity.

        :param timeout: seconds for the connection and its handshake.
        :param early_data: where the transport has 0-RTT (QUIC) and a session
            ticket for ``address`` is cached, return before the handshake completes
            (:attr:`PeerConnection.early_data` ``"attempted"``) so that streams
            opened with ``wait_response=False`` go as 0-RTT. Only for flows whose
            first bytes are safe to replay. Otherwise an ordinary connect: H2 and
            TCP ignore it, and so does :class:`~quicmesh.AutoTransport` (a connection
            returned before its handshake would always win the race with HTTP/2).
        """

    @property
    def runs_engine_flows(self) -> bool:
        """Whether :meth:`engine_acceptor` gives an accept loop (False by default)."""
        return False

    def engine_acceptor(self, sock: socket.socket, events: FlowEvents) -> EngineAcceptor | None:
        """An accept loop on the listening ``sock`` (a duplicate of it: the caller keeps
        its own) run by this transport's engine, reporting to ``events``; None where the
        engine runs no flows (the default). Its flows are started on this transport's
        connections with :meth:`PeerConnection.start_engine_flow`."""
        return None

    def set_stream_rate(self, identity: str, rate: float | None) -> bool:
        """(server) Let ``identity`` open at most ``rate`` new streams a second over
        all its connections from now on (None: back to the transport's own limit).

        An overload action (the sidecar slows its heaviest peer when its event loop
        falls behind). Returns False where the transport cannot do it (H2, TCP: a
        new stream there costs no credit to withhold), True otherwise.
        """
        return False

    def stats(self) -> dict[str, Any]:
        """Transport-wide state for the admin's ``/stats`` besides :attr:`counters`
        (an :class:`~quicmesh.AutoTransport`'s fallbacks); none by default."""
        return {}

    async def aclose(self) -> None:
        """Stop the transport's own background work, if any (listeners and
        connections are closed through their own objects)."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """``async with QuicTransport(...) as transport:``: :meth:`aclose` at the end."""
        await self.aclose()


DEFAULT_ACK_ELICITING_THRESHOLD = 1
"""Ack-eliciting packets a native QUIC peer may receive before it must acknowledge:
1 is RFC 9000's default (an ACK for every second packet) and sends no
ACK_FREQUENCY frames (draft-ietf-quic-ack-frequency). A higher value (9: an ACK
for every tenth packet, or within the peer's max_ack_delay, 25 ms) saved 13 % of
the datagrams per request and 40 % of the CPU per GB in ``quicmesh bench overhead``,
but raised added latency and lowered bulk throughput in the same run
(docs/performance.md), so it is an option, not the default."""

ACK_ELICITING_THRESHOLD_MAX = 1 << 20
"""The largest ``ack_eliciting_threshold`` accepted."""

STATELESS_RESET_KEY_MIN_BYTES = 16
"""The shortest stateless reset key file a QUIC listener takes."""


def exposed_secret(path: object, mode: int) -> str:
    """Why a secret file at ``path`` with permission bits ``mode`` is exposed (others
    may read or write it), or ""."""
    mode &= 0o777
    if not mode & 0o077:
        return ""
    return f"{path} is readable by others (mode {mode:03o}): chmod 600 it"


STATELESS_RESET_KEY_MAX_BYTES = 4096
"""The longest stateless reset key file a QUIC listener takes (``/dev/zero`` is none)."""

QUIC_ENGINE_NAMES = ("aioquic", "native")
"""The QUIC engines ``QuicTransport(engine=...)`` knows (:mod:`quicmesh.transport.quic.engine`)."""


DEFAULT_ENGINE_VARIABLE = "QUICMESH_QUIC_ENGINE"
"""The environment variable that names the QUIC engine used where none is named."""

BUILT_IN_DEFAULT_ENGINE = "native"
"""The engine used where neither the configuration nor :data:`DEFAULT_ENGINE_VARIABLE`
names one, where its extension is built (else aioquic; docs/design.md, "The default engine")."""

_fallback_logged = False


def default_quic_engine() -> str:
    """The QUIC engine used where none is named (``QuicTransport()``, a sidecar
    cluster or QUIC inbound listener without ``engine``, the demo, the benchmarks,
    xDS clusters): the one ``QUICMESH_QUIC_ENGINE`` names, else
    :data:`BUILT_IN_DEFAULT_ENGINE`; ``"native"`` falls back to ``"aioquic"`` where
    the extension ``quicmesh._native`` is not built (logged once: at INFO, at WARNING
    where the variable named native). The one place that decides. An unknown name
    raises :class:`~quicmesh.errors.ConfigError` naming the variable."""
    global _fallback_logged
    from .native import native_available  # the implementations import this module

    wanted = os.environ.get(DEFAULT_ENGINE_VARIABLE, "").strip() or BUILT_IN_DEFAULT_ENGINE
    if wanted not in QUIC_ENGINE_NAMES:
        raise ConfigError(
            f"environment: {DEFAULT_ENGINE_VARIABLE}={wanted!r} is not a QUIC engine "
            f"(one of {', '.join(QUIC_ENGINE_NAMES)})"
        )
    if wanted == "aioquic" or native_available():
        return wanted
    if not _fallback_logged:
        _fallback_logged = True
        # A WARNING where the variable asked for native by name (it ran aioquic without a
        # word a user would see); refusing instead would refuse h2-only configurations and
        # the benchmarks' --help, which resolve the default whatever the transport.
        named = os.environ.get(DEFAULT_ENGINE_VARIABLE, "").strip() == "native"
        logging.getLogger(__name__).log(
            logging.WARNING if named else logging.INFO,
            "%sthe native QUIC engine is not built (no quicmesh._native): QUIC runs on "
            "aioquic (README, 'The native engine and machines without Rust')",
            f"{DEFAULT_ENGINE_VARIABLE}=native, but " if named else "",
        )
    return "aioquic"


def quic_engine_problem(name: str) -> str | None:
    """Why ``QuicTransport(engine=name)`` cannot run here, in one line (an unknown
    name, or ``"native"`` where its extension is not built), or None when it can."""
    from ..errors import QuicmeshError
    from .quic.engine import get_engine  # the implementations import this module

    try:
        get_engine(name)
    except (ValueError, QuicmeshError) as exc:
        return str(exc)
    return None


def transport_registry(*, ticket_cache: str | None = None) -> TransportRegistry:
    """A :class:`~quicmesh.transport.registry.TransportRegistry`: builds transports
    by name (``"quic"``, ``"h2"``, ``"tcp"``, ``"auto"``) from per-transport options.

    :param ticket_cache: the file where the QUIC transports it builds keep their
        session tickets (None: in memory); one cache is shared by all of them.
    """
    from .registry import TransportRegistry  # the implementations import this module

    return TransportRegistry(ticket_cache=ticket_cache)


MAX_TICKET_CACHE_BYTES = 16 * 2**20
"""The largest ticket cache file read (``/dev/zero`` is not one)."""


def ticket_cache_problem(path: Path) -> str | None:
    """Why the file at ``path`` must not be used as a ticket cache, or None. The cache
    rewrites its file whole: a file there that is not one (not empty, not a JSON
    object) is another file named by mistake, and is refused rather than overwritten
    (a cache once took it for a damaged cache, and replaced it at its first ticket)."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_TICKET_CACHE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read it ({os_error_text(exc)}): not overwritten"
    if len(raw) > MAX_TICKET_CACHE_BYTES:
        return f"larger than {MAX_TICKET_CACHE_BYTES // 2**20} MiB: not overwritten"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "cannot read it (not UTF-8 text): not overwritten"
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return "not a ticket cache (a JSON object): not overwritten; remove it or name another file"
    return None
