"""Per-endpoint connection pools: many flows on few peer connections.

A QUIC or H2 peer connection carries many streams, so an endpoint's pool opens
another connection only when every connection it has is at the peer's stream
limit (:attr:`~quicmesh.PeerConnection.can_open_stream` is False). That choice
is the sans-IO :func:`plan_open`; :class:`EndpointPool` is the asyncio side that
dials, waits and keeps the connections. A TCP peer connection dials one TLS
connection per stream itself, so its pool never needs more than one.

With ``early_data`` a QUIC connection resumed with a cached ticket is usable
before its handshake completes; streams opened on it then do not wait for the
peer's answer, so their CONNECT and first bytes ride in 0-RTT packets.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._timeouts import wait_within
from ..errors import (
    ConnectError,
    ConnectionLost,
    PeerUnresponsive,
    PeerVerificationError,
    QuicmeshError,
    StreamRefused,
    StreamReset,
    TunnelError,
)
from ..logs import RateLimitedLog
from ..tls import TrustBundle
from ..transport.base import Address, PeerConnection, Transport
from ..transport.stream import MeshStream
from .circuit import CircuitBreaker
from .policy import server_refusal

logger = logging.getLogger("quicmesh.sidecar.pool")
POOL_LOG = RateLimitedLog(logger)
"""A pool's lines that a draining peer makes once per flow (its GOAWAY, its refused
requests): one per kind every 10 s, with a count (a review saw 400 lines a second).
Per kind, not per endpoint: the kinds kept stay few whatever the endpoints' churn."""


class Poolable(Protocol):
    """What the pool's choice needs to know about a connection."""

    @property
    def is_closed(self) -> bool:
        """True once closed or lost."""

    @property
    def can_open_stream(self) -> bool:
        """True when a stream can be opened without waiting for the peer's credit."""

    @property
    def active_streams(self) -> int:
        """Streams open on the connection."""


class Action(enum.Enum):
    """What to do for the next stream."""

    USE = "use"
    """Open the stream on :attr:`Plan.connection`."""
    CONNECT = "connect"
    """Dial a new connection."""
    WAIT_FOR_CONNECT = "wait_for_connect"
    """A connection is being dialled: wait for it, then plan again."""
    QUEUE = "queue"
    """No new connection is allowed: wait for stream credit on :attr:`Plan.connection`."""
    OVERFLOW = "overflow"
    """No connection exists and none may be opened."""


@dataclass(frozen=True)
class Plan:
    """The outcome of :func:`plan_open`."""

    action: Action
    connection: Any = None


def plan_open(connections: Sequence[Poolable], *, connecting: bool, may_connect: bool) -> Plan:
    """Decide where the next stream goes.

    :param connections: the pool's connections (closed ones are skipped).
    :param connecting: whether a dial is already under way.
    :param may_connect: whether the circuit breaker allows another connection.
    """
    live = [c for c in connections if not c.is_closed]
    ready = [c for c in live if c.can_open_stream]
    if ready:
        return Plan(Action.USE, min(ready, key=lambda c: c.active_streams))
    if connecting:
        return Plan(Action.WAIT_FOR_CONNECT)
    if may_connect:
        return Plan(Action.CONNECT)
    if live:
        return Plan(Action.QUEUE, min(live, key=lambda c: c.active_streams))
    return Plan(Action.OVERFLOW)


GOING_AWAY_SECONDS = 10.0
"""How long an endpoint whose peer sent a GOAWAY (it is draining) is passed over for new
flows where the cluster has another one (the default drain grace period)."""

CLOSE_TIMEOUT = 5.0
"""Seconds a closing connection gets, beyond its grace, to say goodbye."""


GOING_AWAY = "the peer is going away (GOAWAY)"
"""Why a connection whose peer sent a GOAWAY takes no new flow."""

MAX_DIALS_PER_FLOW = 2
"""New connections one flow may dial: a peer whose every new connection is going away
before it takes a flow (draining) would otherwise have a flow dial until the circuit
breaker's ``max_connections``."""

H3_REQUEST_REJECTED = 0x10B
"""HTTP/3's "not processed, safe to retry" (RFC 9114 8.1)."""


def _rejected_unprocessed(error: TunnelError) -> bool:
    """Whether the peer reset the stream saying it processed none of it."""
    return isinstance(error, StreamReset) and error.error_code == H3_REQUEST_REJECTED


class PoolOverflow(QuicmeshError):
    """The cluster's ``max_connections`` is reached and this endpoint has no connection,
    or the flow's ``connect_timeout`` passed while it was queued for stream credit."""


@dataclass
class _Opening:
    """Where one :meth:`EndpointPool.open_stream` call is, for its timeout to read."""

    queued: bool = False
    """Waiting for stream credit on a connection at the peer's stream limit, no other
    connection allowed (:attr:`Action.QUEUE`): a timeout now is an overflow."""


_CONNECTION_NUMBERS = itertools.count(1)
"""The peer connections' labels (``connection`` in the metrics), one count for the whole
process: a series is never taken over by another connection, so a counter never goes
back. (Each pool counted its own: a reload that rebuilt a cluster gave its new
connections the old ones' numbers, and the live old ones were renamed.)"""


@dataclass
class PooledConnection:
    """A peer connection and what the pool knows about it."""

    connection: PeerConnection
    label: str
    opened_at: float
    idle_since: float | None = None
    retired_stats: dict[str, Any] = field(default_factory=dict)
    identity: object = None
    """The identity the transport presented when this connection was dialled."""
    trust: TrustBundle | None = None
    """The trust bundle that verified the peer then."""
    untrusted: bool = False
    """A CA of that bundle was taken out of the transport's since (the peer's
    certificate may be one only it vouched for): the connection takes no new flow."""
    retired: str | None = None
    """Why the connection takes no new flow (its endpoint failed health checks or
    was ejected), or None."""
    replace_after: float | None = None
    """Wall-clock time after which the connection takes no new flows: two thirds of
    the way from its handshake to the expiry of the peer's certificate."""


class EndpointPool:
    """The peer connections to one endpoint (a peer sidecar's address)."""

    def __init__(
        self,
        address: Address,
        transport: Transport,
        breaker: CircuitBreaker,
        *,
        connect_timeout: float,
        early_data: bool = False,
        server_identities: tuple[str, ...] = (),
        on_connected: Any = None,
        on_closed: Any = None,
    ) -> None:
        self.address = address
        self.server_identities = server_identities
        """The identities the endpoint may present (:func:`.policy.server_refusal`)."""
        self.transport = transport
        self.breaker = breaker
        self.connect_timeout = connect_timeout
        self.early_data = early_data
        self.connections: list[PooledConnection] = []
        self.connections_opened = 0
        self._connecting: asyncio.Future[None] | None = None
        self._on_connected = on_connected
        self._on_closed = on_closed
        self._closing: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._gone_away_at: float | None = None
        """When a connection of this pool last heard its peer go away (GOAWAY)."""

    async def open_stream(
        self, target: str, headers: dict[str, str]
    ) -> tuple[MeshStream, PeerConnection, bool]:
        """Open a flow to ``target`` on a pooled connection, dialling one if needed.

        Returns the stream, its connection, and whether the stream was opened in
        0-RTT (without waiting for the peer's answer: a refusal then surfaces on
        the stream's first read or write).

        A stream lost because its pooled connection turned out to be closed (the
        peer closed it, and a QUIC client learns that only when its draining
        period ends), or turned away unprocessed (the peer is going away, or reset it
        with H3_REQUEST_REJECTED), is opened again, once, on another or a new
        connection; turned away twice, it is refused (503). One flow dials at most
        :data:`MAX_DIALS_PER_FLOW` connections.

        All of it within ``connect_timeout``. A flow queued for stream credit (the
        cluster at ``max_connections``, this endpoint's connections at the peer's stream
        limit) that runs out of it overflows the cluster's limit: the endpoint did
        nothing wrong, and its outlier detection must not count it (Envoy's pending
        request timing out in the pool's queue).

        :raises ConnectError: the endpoint could not be reached.
        :raises TimeoutError: ``connect_timeout`` passed while a connection was dialled
            or the peer's answer awaited.
        :raises PoolOverflow: no connection may be opened and none exists, or
            ``connect_timeout`` passed while the flow was queued for stream credit.
        :raises TunnelError: the stream could not be opened (refused, connection lost).
        """
        opening = _Opening()
        try:
            async with asyncio.timeout(self.connect_timeout):  # no task, as wait_for's
                return await self._open_stream(target, headers, opening)
        except TimeoutError:
            if not opening.queued:
                raise
            raise PoolOverflow(
                f"timed out after {self.connect_timeout:g}s waiting for a stream slot "
                f"(max_connections {self.breaker.limits.max_connections} reached)"
            ) from None

    async def _open_stream(
        self, target: str, headers: dict[str, str], opening: _Opening
    ) -> tuple[MeshStream, PeerConnection, bool]:
        lost_once = False
        dialled = 0
        mine: PeerConnection | None = None  # the connection this flow dialled last
        while True:
            self.sweep_closed()
            may_connect = self.breaker.connections < self.breaker.limits.max_connections
            current = [p for p in self.connections if not self.is_stale(p) and p.retired is None]
            # After a certificate rotation, connections made with the old identity
            # take no new flows (a new one is dialled) unless no other may be.
            candidates = current if may_connect or current else self.connections
            plan = plan_open(
                [p.connection for p in candidates],
                connecting=self._connecting is not None,
                may_connect=may_connect,
            )
            if plan.action is Action.USE or plan.action is Action.QUEUE:
                connection: PeerConnection = plan.connection
                self._mark_busy(connection)
                early = False
                try:
                    if plan.action is Action.QUEUE:
                        opening.queued = True
                        try:
                            await connection.wait_for_stream_credit()
                        except TunnelError:
                            # No credit will come (lost, closing, going away): the
                            # flow may be opened again below, no longer queued.
                            opening.queued = False
                            raise
                        opening.queued = False
                    # Still in its handshake: the CONNECT and first bytes go as 0-RTT.
                    early = connection.early_data == "attempted"
                    stream = await connection.open_stream(target, headers, wait_response=not early)
                except StreamRefused:
                    raise
                except TunnelError as exc:
                    if early:
                        raise
                    # The peer took no part of the request: its connection was closed,
                    # it is going away (GOAWAY), or it reset the stream unprocessed (an
                    # H3_REQUEST_REJECTED: its GOAWAY may be on the way, or the
                    # connection is at a limit of its own; RFC 9114 4.1.1).
                    rejected = _rejected_unprocessed(exc)
                    if rejected and not connection.going_away:
                        self._retire(connection, "the peer refused a request unprocessed")
                    turned_away = connection.going_away or rejected
                    if not (connection.is_closed or turned_away):
                        raise
                    lost = connection.lost_error
                    if isinstance(lost, PeerUnresponsive):
                        # Its liveness checks found the peer dead or hung: a new
                        # connection to it would wait out the whole connect timeout.
                        # The flow's retries go to another endpoint instead. (A new
                        # exception each: the connection's own would gather tracebacks.)
                        raise PeerUnresponsive(str(lost)) from None
                    if lost_once:
                        if turned_away:
                            raise self._turned_away(connection, exc) from None
                        raise
                    lost_once = True
                    POOL_LOG.log(
                        logging.INFO,
                        "not taken",
                        "flow to %s:%d not taken (%s): opening it again",
                        *self.address[:2],
                        exc,
                    )
                    continue
                return stream, connection, early
            if plan.action is Action.CONNECT and dialled == MAX_DIALS_PER_FLOW:
                raise self._dials_spent(mine)
            if plan.action is Action.CONNECT:
                dialled += 1
            if plan.action is Action.WAIT_FOR_CONNECT:
                assert self._connecting is not None
                await asyncio.shield(self._connecting)
                continue
            if plan.action is Action.OVERFLOW or not self.breaker.try_open_connection():
                raise PoolOverflow(
                    f"max_connections ({self.breaker.limits.max_connections}) reached"
                )
            mine = await self._connect()

    def has_ready_connection(self) -> bool:
        """Whether :meth:`open_stream` would open a stream at once, on a current
        connection with stream credit (no dial, no wait for credit; on tcp, whose every
        flow dials a connection of its own, only the first flow of a connection):
        such an open is not a pending one (``max_pending_opens``)."""
        return any(
            p.retired is None
            and not self.is_stale(p)
            and not p.connection.is_closed
            and p.connection.can_open_stream
            and not p.connection.stream_needs_dial
            for p in self.connections
        )

    def going_away(self, now: float) -> bool:
        """Whether the peer said it is going away (a GOAWAY on a connection of this pool
        now, or in the last :data:`GOING_AWAY_SECONDS`): its cluster sends new flows to
        another endpoint where it has one, rather than dial one that refuses them."""
        if any(p.connection.going_away for p in self.connections if not p.connection.is_closed):
            self._gone_away_at = now
            return True
        return self._gone_away_at is not None and now - self._gone_away_at < GOING_AWAY_SECONDS

    def engine_flow_connection(self) -> PeerConnection | None:
        """The connection an engine flow may start on now (one that is current, not
        retired, and takes engine flows: fewest streams first), marked busy; None when
        none may (the flow then goes through :meth:`open_stream`). Its stream credit is
        not checked here (that would open a stream ahead on the native engine):
        starting the flow finds out."""
        candidates = [
            p.connection
            for p in self.connections
            if p.retired is None
            and not p.connection.is_closed
            and p.connection.can_start_engine_flow()  # (False once the peer goes away)
            and not self.is_stale(p)
        ]
        if not candidates:
            return None
        connection = min(candidates, key=lambda c: c.active_streams)
        self._mark_busy(connection)
        return connection

    async def _connect(self) -> PeerConnection:
        done: asyncio.Future[None] = self._loop.create_future()
        self._connecting = done
        try:
            identity = self.transport.identity
            try:
                connection = await self.transport.connect(
                    self.address, timeout=self.connect_timeout, early_data=self.early_data
                )
            except OSError as exc:
                self.breaker.release_connection()
                raise ConnectError(f"cannot connect: {exc.strerror or exc}") from None
            except BaseException:
                self.breaker.release_connection()
                raise
            refusal = server_refusal(connection.peer_identity, self.server_identities)
            if refusal is not None:
                # Before any flow goes on it (a 0-RTT connection's identity is the one its
                # ticket recorded, checked again when its handshake completes).
                connection.close()
                self.breaker.release_connection()
                raise PeerVerificationError(f"{self._label()}: {refusal}")
            self.connections_opened += 1
            label = f"{next(_CONNECTION_NUMBERS)}"
            pooled = PooledConnection(
                connection,
                label,
                opened_at=self._loop.time(),
                identity=identity,
                trust=self.transport.trust,
                replace_after=_replace_after(connection),
            )
            self.connections.append(pooled)
            if self._on_connected is not None:
                self._on_connected(self, pooled)
            return connection
        finally:
            self._connecting = None
            done.set_result(None)

    def _retire(self, connection: PeerConnection, reason: str) -> None:
        for pooled in self.connections:
            if pooled.connection is connection and pooled.retired is None:
                POOL_LOG.log(
                    logging.INFO,
                    f"retired: {reason}",
                    "connection %s to %s:%d: %s: no new flow on it, %d open carry on",
                    pooled.label,
                    *self.address[:2],
                    reason,
                    connection.active_streams,
                )
                pooled.retired = reason

    def _label(self) -> str:
        host, port = self.address[:2]
        return f"{host}:{port}"

    def _dials_spent(self, last: PeerConnection | None) -> TunnelError:
        """Why a flow that dialled :data:`MAX_DIALS_PER_FLOW` connections, none of which
        took it, fails: the peer is going away on each (a 503, as a draining peer's, for
        another endpoint to take), or why the last one closed as soon as it was made (a
        peer refusing our certificate after a TLS 1.3 handshake that looked done), in a
        new exception of its kind (the connection keeps its own)."""
        if self.going_away(self._loop.time()):
            return StreamRefused(
                503, f"not taken: {self._label()} is going away (GOAWAY) on every new connection"
            )
        error = last.lost_error if last is not None else None
        if error is not None:
            return type(error)(str(error))
        return ConnectionLost(f"{self._label()}: the new connections closed at once")

    def _turned_away(self, connection: PeerConnection, error: TunnelError) -> StreamRefused:
        """A flow turned away a second time: a refusal, as a draining peer's 503 is
        (not a failure to reach the endpoint, so no outlier ejection; another endpoint
        may take it)."""
        why = GOING_AWAY if connection.going_away else "the peer refused it unprocessed twice"
        return StreamRefused(
            503, f"not taken: {why}: {error}", peer_identity=connection.peer_identity
        )

    def _mark_busy(self, connection: PeerConnection) -> None:
        for pooled in self.connections:
            if pooled.connection is connection:
                pooled.idle_since = None

    def sweep_closed(self) -> None:
        """Forget connections that closed, giving back their circuit-breaker slots, and
        retire those whose peer is going away (they close once their last flow ends)."""
        for pooled in [p for p in self.connections if p.connection.is_closed]:
            self._forget(pooled)
        for pooled in self.connections:
            if pooled.connection.going_away and pooled.retired != GOING_AWAY:
                # (Also one retired for a refusal that overtook its GOAWAY.)
                pooled.retired = GOING_AWAY
                self._gone_away_at = self._loop.time()
                POOL_LOG.log(
                    logging.INFO,
                    "going away",
                    "connection %s to %s:%d: the peer is going away (GOAWAY): "
                    "no new flow on it, %d open carry on",
                    pooled.label,
                    *self.address[:2],
                    pooled.connection.active_streams,
                )

    def _forget(self, pooled: PooledConnection) -> None:
        if pooled in self.connections:
            self.connections.remove(pooled)
            self.breaker.release_connection()
            if self._on_closed is not None:
                self._on_closed(self, pooled)

    def is_stale(self, pooled: PooledConnection) -> bool:
        """Whether ``pooled`` should be replaced: it was made with an identity the
        transport no longer presents (ours rotated), a CA of the trust bundle that
        verified its peer was taken out of the transport's since (whichever CA the
        peer's certificate chains to: its new connection is verified anew), or the
        peer's certificate is two thirds of the way to expiring (the peer has rotated
        by then)."""
        if pooled.identity is not None and pooled.identity is not self.transport.identity:
            return True
        trust = self.transport.trust
        if pooled.trust is not None and pooled.trust is not trust and not pooled.untrusted:
            # (Looked at once per new bundle: a CA added keeps the connection.)
            if trust.lacks_a_root_of(pooled.trust):
                pooled.untrusted = True
            else:
                pooled.trust = trust
        if pooled.untrusted:
            return True
        return pooled.replace_after is not None and time.time() >= pooled.replace_after

    def close_idle(self, now: float, idle_timeout: float) -> None:
        """Close connections that have carried no stream for ``idle_timeout`` seconds.

        Connections made with a rotated-out identity are closed as soon as their
        last flow ends (they take no new flows).
        """
        self.sweep_closed()
        for pooled in list(self.connections):
            if (
                self.is_stale(pooled) or pooled.retired is not None
            ) and pooled.connection.active_streams == 0:
                why = pooled.retired or (
                    "replaced (our certificate rotated, or the peer's is near expiry)"
                )
                POOL_LOG.log(
                    logging.INFO,
                    "closing",
                    "closing connection %s to %s:%d: %s",
                    pooled.label,
                    *self.address[:2],
                    why,
                )
                self._close_gracefully(pooled.connection)
                self._forget(pooled)
                continue
            if pooled.connection.active_streams > 0:
                pooled.idle_since = None
            elif pooled.idle_since is None:
                pooled.idle_since = now
            elif now - pooled.idle_since >= idle_timeout:
                logger.info("closing idle connection %s to %s:%d", pooled.label, *self.address)
                pooled.connection.close()
                self._forget(pooled)

    def _close_gracefully(self, connection: PeerConnection) -> None:
        async def close() -> None:
            with contextlib.suppress(QuicmeshError, OSError, TimeoutError):
                await wait_within(connection.aclose(CLOSE_TIMEOUT), 2 * CLOSE_TIMEOUT)

        task = self._loop.create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def retire_connections(self, reason: str) -> None:
        """The endpoint was found dead (health checks, outlier ejection): its
        connections take no new flow. Idle ones close now, busy ones once their
        last flow ends (the transport's liveness checks fail them first if the peer
        is really gone); the pool dials afresh when the endpoint takes flows again."""
        self.sweep_closed()
        for pooled in list(self.connections):
            if pooled.retired is None:
                logger.info(
                    "retiring connection %s to %s:%d (%s, %d streams)",
                    pooled.label,
                    *self.address,
                    reason,
                    pooled.connection.active_streams,
                )
                pooled.retired = reason
            if pooled.connection.active_streams == 0:
                self._close_gracefully(pooled.connection)
                self._forget(pooled)

    @property
    def active_streams(self) -> int:
        """Streams open on all of this pool's connections."""
        return sum(p.connection.active_streams for p in self.connections)

    async def close(self, grace: float = 0.0) -> None:
        """Close every connection gracefully (GOAWAY / CONNECTION_CLOSE) and wait for them.

        :param grace: seconds streams still running get to finish, every byte
            acknowledged (:meth:`~quicmesh.PeerConnection.aclose`); then they are reset.
        """
        pooled = list(self.connections)

        async def close_one(item: PooledConnection) -> None:
            with contextlib.suppress(QuicmeshError, OSError, TimeoutError):
                await wait_within(item.connection.aclose(grace), grace + CLOSE_TIMEOUT)

        await asyncio.gather(*(close_one(item) for item in pooled))
        for item in pooled:
            self._forget(item)


def peer_certificate_expiry(connection: PeerConnection) -> float | None:
    """When the certificate the peer presented on ``connection`` expires (epoch seconds).

    None when unknown (a resumed QUIC session presents no certificate; a transport
    that does not say).
    """
    certificate = connection.peer_certificate
    if certificate is None:
        return None
    return float(certificate.not_valid_after_utc.timestamp())


def _replace_after(connection: PeerConnection) -> float | None:
    expiry = peer_certificate_expiry(connection)
    if expiry is None:
        return None
    now = time.time()
    return now + max(0.0, expiry - now) * 2 / 3
