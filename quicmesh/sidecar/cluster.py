"""A cluster: peer sidecars reached over one transport, with pools, balancing and health.

:meth:`Cluster.open_flow` is how an outbound listener gets a tunnel stream: it
takes circuit-breaker slots, lets the load balancer pick among available
endpoints, opens the stream on that endpoint's :class:`~.pool.EndpointPool`, and
on a connect failure records it (outlier ejection) and retries another endpoint.
The decisions live in the sans-IO :mod:`.lb`, :mod:`.health`, :mod:`.circuit`
and :func:`.pool.plan_open`; this module is their asyncio glue, plus the active
health checks and idle-connection sweep as two background tasks.

QUIC clusters also count what their transport reports (0-RTT, session tickets,
migrations, path validations) and can move every peer connection to a new
local port (:meth:`Cluster.migrate`, the admin's ``POST /migrate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from dataclasses import dataclass
from typing import Any

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
    TunnelUsageError,
)
from ..tls.check import handshake_failure_reason
from ..transport.base import Address, EngineAcceptor, PeerConnection, Transport
from ..transport.stream import MeshStream
from .accesslog import Outcome
from .circuit import CircuitBreaker
from .config import MIN_HEALTH_CHECK_INTERVAL, MIN_IDLE_TIMEOUT, ClusterConfig, format_address
from .health import HealthState, HealthTracker
from .lb import make_balancer
from .policy import server_refusal
from .pool import EndpointPool, PooledConnection, PoolOverflow
from .stats import ClusterStats, sum_counters

logger = logging.getLogger("quicmesh.sidecar.cluster")

SWEEP_INTERVAL = 1.0
"""Seconds between idle-connection sweeps."""


def sweep_interval(idle_timeout: float) -> float:
    """Seconds between a cluster's idle-connection sweeps: half its ``idle_timeout``, at
    most :data:`SWEEP_INTERVAL`, and at least half of :data:`~.config.MIN_IDLE_TIMEOUT`
    (the loader refuses a shorter idle timeout; a library caller's 1 us one swept
    without pause, a core busy)."""
    return max(MIN_IDLE_TIMEOUT / 2, min(SWEEP_INTERVAL, idle_timeout / 2))


class FlowRefused(QuicmeshError):
    """A cluster could not open a flow; :attr:`outcome` says why, for the access log.

    :param peer_identity: the peer sidecar that refused it, where one did.
    :param final: the outcome when no other endpoint takes the flow after this attempt,
        if not ``outcome`` (a draining or full peer's 503 is a failed attempt, so that
        another endpoint may take the flow, but the flow was *refused* if none does:
        the peer's own record says so).
    """

    def __init__(
        self,
        outcome: Outcome,
        reason: str,
        endpoint: str = "",
        *,
        peer_identity: str = "",
        final: Outcome | None = None,
    ) -> None:
        self.outcome = outcome
        self.reason = reason
        self.endpoint = endpoint
        self.peer_identity = peer_identity
        self.final = final
        super().__init__(reason)

    def as_final(self) -> FlowRefused:
        """This refusal as the flow's last word (its :attr:`final` outcome)."""
        if self.final is None or self.final is self.outcome:
            return self
        return FlowRefused(self.final, self.reason, self.endpoint, peer_identity=self.peer_identity)


@dataclass
class Endpoint:
    """One peer sidecar of a cluster and its pool."""

    address: Address
    pool: EndpointPool

    @functools.cached_property
    def name(self) -> str:
        """``host:port``."""
        return format_address(self.address)

    @property
    def active_requests(self) -> int:
        """Flows open to this endpoint (for least_request)."""
        return self.pool.active_streams


@dataclass(frozen=True)
class FailedOpen:
    """A flow's first attempt, made outside :meth:`Cluster.open_flow` (an engine flow
    that got no answer in time, or a refusal), which failed on ``endpoint`` as
    ``refused`` says: it counts as that attempt (:meth:`Cluster.open_flow` ``failed``)."""

    endpoint: Endpoint
    refused: FlowRefused


def _naming(endpoint_name: str, reason: str) -> str:
    """``reason`` prefixed with the endpoint's name, unless the transport named it already
    (an auto transport's reason starts with the address it dialled)."""
    return reason if reason.startswith(f"{endpoint_name}: ") else f"{endpoint_name}: {reason}"


def refusal_outcome(refusal: StreamRefused) -> Outcome:
    """The outcome of a flow the peer sidecar answered ``refusal``: ``destination_unreachable``
    for its 502 (it could not connect the destination, as its own log says), ``refused`` for
    any other (its policy's 403, a limit's 429 or 503)."""
    return Outcome.UNREACHABLE if refusal.status == 502 else Outcome.REFUSED


def _refused_by(endpoint: Endpoint, refusal: StreamRefused) -> FlowRefused:
    """What the peer's refusal of a stream on ``endpoint`` makes of the flow: a draining
    peer's 503 lets another endpoint take it (a failed attempt), any other ends it
    (:func:`refusal_outcome`)."""
    identity = refusal.peer_identity
    if refusal.status == 503:
        return FlowRefused(
            Outcome.CONNECT_FAILED,
            str(refusal),
            endpoint.name,
            peer_identity=identity,
            final=Outcome.REFUSED,
        )
    return FlowRefused(
        refusal_outcome(refusal), str(refusal), endpoint.name, peer_identity=identity
    )


@dataclass
class OpenedFlow:
    """A tunnel stream a cluster opened, and where."""

    stream: MeshStream
    endpoint: Endpoint
    connection: PeerConnection
    early: bool = False
    """Opened in 0-RTT, without waiting for the peer's answer."""


@dataclass
class EngineFlow:
    """A flow the cluster started as an engine flow (:meth:`Cluster.start_engine_flow`)."""

    endpoint: Endpoint
    connection: PeerConnection


def _staying(candidates: list[Endpoint], now: float) -> list[Endpoint]:
    """The candidates whose peer is not going away (HTTP/3 GOAWAY: draining), if any;
    else all of them (a draining endpoint still answers, with a refusal to retry)."""
    staying = [e for e in candidates if not e.pool.going_away(now)]
    return staying or candidates


def is_connection_failure(error: BaseException) -> bool:
    """Whether a failed stream open counts against its endpoint (outlier detection).

    Only connection failures and timeouts do: the endpoint could not be reached or
    its handshake failed (:class:`ConnectError`, ``OSError``), its connection failed
    (:class:`ConnectionLost`, or a :class:`StreamReset` without an error code: the
    stream was lost with its connection), or it did not answer in time. A stream
    the peer reset with an error code, a refusal (:class:`StreamRefused`) and a
    malformed request of ours (:class:`TunnelUsageError`) do not.
    """
    if isinstance(error, StreamReset):
        return error.error_code is None
    return isinstance(error, TimeoutError | ConnectError | ConnectionLost | OSError)


class Cluster:
    """The running form of a :class:`~.config.ClusterConfig`.

    :param config: the cluster's configuration.
    :param transport: the transport instance (with this sidecar's identity) to dial with.
    :param stats: counters, kept across reloads by the runtime.
    :param rng: randomness for the balancer.
    """

    def __init__(
        self,
        config: ClusterConfig,
        transport: Transport,
        stats: ClusterStats,
        *,
        headers: dict[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.stats = stats
        self.headers = headers or {}
        self.breaker = CircuitBreaker(config.circuit_breakers)
        self.health = HealthTracker(
            config.outlier_detection,
            config.health_check,
            panic_threshold=config.healthy_panic_threshold,
        )
        self._in_panic = False
        """Whether the last flow chosen was chosen in panic (:meth:`_panic`)."""
        self.balancer = make_balancer(config.load_balancing, rng)
        self.endpoints: dict[Address, Endpoint] = {}
        self.retired: list[Endpoint] = []
        self._loop = asyncio.get_running_loop()
        self._tasks: list[asyncio.Task[None]] = []
        counters = transport.counters
        if counters and not any(c is counters for c in stats.quic_counters):
            stats.quic_counters.append(counters)
        self.set_endpoints(config.endpoints)

    # -- configuration -------------------------------------------------------

    def set_endpoints(self, addresses: tuple[Address, ...]) -> None:
        """Replace the endpoint list; kept endpoints keep their pools and health."""
        new: dict[Address, Endpoint] = {}
        for address in addresses:
            if address in new:
                continue
            existing = self.endpoints.get(address)
            new[address] = existing or Endpoint(
                address,
                EndpointPool(
                    address,
                    self.transport,
                    self.breaker,
                    connect_timeout=self.config.connect_timeout,
                    early_data=self.config.early_data,
                    server_identities=self.config.server_identities,
                    on_connected=self._connected,
                ),
            )
        for address, endpoint in self.endpoints.items():
            if address not in new:
                self.retired.append(endpoint)
        self.endpoints = new
        self.health.set_endpoints(new)
        if addresses != self.config.endpoints:
            from dataclasses import replace

            self.config = replace(self.config, endpoints=tuple(new))
        for endpoint in new.values():
            self.stats.endpoint(endpoint.name)

    def start(self) -> None:
        """Start the background tasks (health checks, idle sweep)."""
        self._tasks.append(self._loop.create_task(self._sweep_loop()))
        if self.config.health_check is not None:
            self._tasks.append(self._loop.create_task(self._health_loop()))

    # -- flows ----------------------------------------------------------------

    async def open_flow(
        self,
        *,
        target: str | None = None,
        endpoint: Address | None = None,
        headers: dict[str, str] | None = None,
        chosen: Endpoint | None = None,
        failed: FailedOpen | None = None,
    ) -> OpenedFlow:
        """Open a tunnel stream to the cluster's target on a chosen endpoint.

        :param target: the CONNECT authority instead of the configured ``target``
            (a captured connection's original destination).
        :param endpoint: use only this endpoint (the peer fronting the destination).
        :param headers: sent in the CONNECT besides the cluster's own (e.g. ``traceparent``).
        :param chosen: the endpoint the load balancer already chose for this flow (the
            first attempt goes there if it is still available; retries choose again).
        :param failed: the flow's first attempt, made already, failed (an engine flow's
            CONNECT got no answer in time, or a refusal): what is left are the retries
            (``connect_retries``), on other endpoints, as after a failed first attempt
            here; with none left, or no other endpoint, the flow is refused with its
            reason. A refusal that is not retried here (all but a draining peer's 503)
            is raised at once.

        :raises FlowRefused: over a circuit-breaker limit, no available endpoint,
            every attempt failed, or the peer refused the stream.
        """
        if failed is not None and failed.refused.outcome is not Outcome.CONNECT_FAILED:
            raise failed.refused
        if not self.breaker.try_open_stream():
            self.stats.overflows["max_concurrent_streams"] += 1
            raise FlowRefused(
                Outcome.OVERFLOW,
                f"cluster {self.config.name}: max_concurrent_streams "
                f"({self.config.circuit_breakers.max_concurrent_streams}) reached",
            )
        try:
            authority = target or self.config.target
            if not authority:
                raise FlowRefused(
                    Outcome.REFUSED,
                    f"cluster {self.config.name}: no CONNECT target (no listener names one)",
                )
            return await self._open_with_retries(
                authority, endpoint, {**self.headers, **(headers or {})}, chosen, failed
            )
        except BaseException:
            self.breaker.release_stream()
            raise

    async def _open_with_retries(
        self,
        target: str,
        pinned: Address | None,
        headers: dict[str, str],
        chosen: Endpoint | None = None,
        failed: FailedOpen | None = None,
    ) -> OpenedFlow:
        tried: set[Address] = set()
        last: FlowRefused | None = None
        first = 0
        if failed is not None:
            tried.add(failed.endpoint.address)
            last = failed.refused
            first = 1
        for attempt in range(first, self.config.connect_retries + 1):
            now = self._loop.time()
            routable, panic = self._routable(now)
            candidates = _staying(
                [
                    e
                    for e in self.endpoints.values()
                    if e.address not in tried
                    and e.address in routable
                    and (pinned is None or e.address == pinned)
                ],
                now,
            )
            if not candidates:
                if last is not None:
                    raise last.as_final()
                raise FlowRefused(
                    Outcome.NO_HEALTHY_ENDPOINT,
                    f"cluster {self.config.name}: no healthy endpoint "
                    f"({len(self.endpoints)} configured)",
                )
            if attempt == 0 and chosen is not None and chosen in candidates:
                endpoint = chosen
            else:
                endpoint = self.balancer.choose(candidates)
            if panic:
                self.stats.panic_flows += 1  # (per choice, retries too: Envoy's lb_healthy_panic)
            tried.add(endpoint.address)
            if attempt > 0:
                self.stats.retries += 1
            try:
                return await self._open_on(endpoint, target, headers)
            except FlowRefused as exc:
                if exc.outcome is not Outcome.CONNECT_FAILED:
                    raise
                last = exc
        assert last is not None
        raise last.as_final()

    async def _open_on(
        self, endpoint: Endpoint, target: str, headers: dict[str, str]
    ) -> OpenedFlow:
        # Pending: waiting for a connection or stream credit (Envoy's pending requests),
        # not the CONNECT's round trip on a connection ready now (every flow counted
        # here until 2026-12-06, so max_pending_opens also capped flows in flight).
        pending = not endpoint.pool.has_ready_connection()
        if pending and not self.breaker.try_begin_pending():
            self.stats.overflows["max_pending_opens"] += 1
            raise FlowRefused(
                Outcome.OVERFLOW,
                f"cluster {self.config.name}: max_pending_opens "
                f"({self.config.circuit_breakers.max_pending_opens}) reached",
                endpoint.name,
            )
        try:
            # (Within connect_timeout: the pool keeps it, as it alone knows whether a
            # flow that ran out of it was queued there, which is no endpoint failure.)
            stream, connection, early = await endpoint.pool.open_stream(target, headers)
        except PoolOverflow as exc:
            # Also a flow that timed out queued for stream credit: what held it was
            # the max_connections limit.
            self.stats.overflows["max_connections"] += 1
            raise FlowRefused(
                Outcome.OVERFLOW, f"cluster {self.config.name}: {exc}", endpoint.name
            ) from None
        except StreamRefused as exc:
            raise _refused_by(endpoint, exc) from None
        except TunnelUsageError as exc:
            # Our request is at fault, not the endpoint: no outlier ejection, no retry.
            raise FlowRefused(
                Outcome.REFUSED, f"cluster {self.config.name}: {exc}", endpoint.name
            ) from None
        except (TimeoutError, TunnelError, OSError) as exc:
            reason = (
                self._timed_out()
                if isinstance(exc, TimeoutError)
                else str(exc) or type(exc).__name__
            )
            if is_connection_failure(exc):
                self._record_connect_failure(endpoint, exc)
            # Either way another endpoint may take the flow (a retry).
            raise FlowRefused(
                Outcome.CONNECT_FAILED, _naming(endpoint.name, reason), endpoint.name
            ) from None
        finally:
            if pending:
                self.breaker.end_pending()
        if endpoint.address in self.endpoints:
            # (An endpoint removed while the flow was opening has no health record
            # any more; the flow still runs on it to its end.)
            self.health[endpoint.address].connect_succeeded(self._loop.time())
        ep_stats = self.stats.endpoint(endpoint.name)
        ep_stats.streams_total += 1
        ep_stats.streams_active += 1
        self.stats.streams_total += 1
        self.stats.streams_active += 1
        return OpenedFlow(stream, endpoint, connection, early)

    @property
    def takes_engine_flows(self) -> bool:
        """Whether an outbound listener should let the transport's engine accept and run
        this cluster's flows (:meth:`start_engine_flow`): QUIC on the native engine,
        spliced (``splice``, the default)."""
        return self.config.splice and self.transport.runs_engine_flows

    def start_engine_flow(
        self,
        acceptor: EngineAcceptor,
        flow: int,
        headers: dict[str, str],
        idle_timeout: float | None = None,
    ) -> EngineFlow | Endpoint | None:
        """Start the connection ``acceptor`` accepted as ``flow`` as an engine flow
        (:meth:`~quicmesh.transport.base.PeerConnection.start_engine_flow`) if it can go
        at once: within the circuit breakers, on a healthy endpoint the load balancer
        chose, on a pooled connection that takes engine flows now. When it cannot,
        nothing is counted and :meth:`open_flow` carries it (and refuses it, dials or
        waits as it does for any flow): given the endpoint the load balancer chose
        (returned, None if it chose none) so that the flow takes one turn of the
        balancer, not two. The flow counts as active from now on; in ``streams_total``
        once it ended (:meth:`engine_flow_finished`: only then is it known that the peer
        answered 200)."""
        target = self.config.target
        if not target or not self.breaker.try_open_stream():
            return None
        started: EngineFlow | None = None
        endpoint: Endpoint | None = None
        try:
            now = self._loop.time()
            routable, panic = self._routable(now)
            candidates = _staying(
                [e for e in self.endpoints.values() if e.address in routable], now
            )
            if not candidates:
                return None
            endpoint = self.balancer.choose(candidates)
            connection = endpoint.pool.engine_flow_connection()
            if connection is None or not connection.start_engine_flow(
                acceptor,
                flow,
                target,
                {**self.headers, **headers},
                self.config.connect_timeout,
                idle_timeout,
            ):
                return endpoint  # (open_flow chooses again, and counts a panic there)
            started = EngineFlow(endpoint, connection)
            if panic:
                self.stats.panic_flows += 1
        except TunnelUsageError:
            return endpoint  # open_flow refuses it, with the reason
        finally:
            if started is None:
                self.breaker.release_stream()
        self.stats.streams_active += 1
        self.stats.endpoint(endpoint.name).streams_active += 1
        return started

    def engine_flow_unanswered(
        self,
        flow: EngineFlow,
        failure: str | None,
        refusal: StreamRefused | None = None,
        *,
        unresponsive: PeerUnresponsive | None = None,
    ) -> FailedOpen | None:
        """An engine flow did not get its 200 and goes back to :meth:`open_flow`: undo
        what :meth:`start_engine_flow` counted. The engine's attempt was the flow's
        first, returned for :meth:`open_flow`'s ``failed``, when it was refused
        (``refusal``: the peer's answer, as :meth:`open_flow` would have read it), got
        no answer in time (``failure``; it counts against the endpoint, as a failed open
        does) or was lost with a connection its liveness checks failed
        (``unresponsive``: counted so too, as :class:`~.pool.EndpointPool` does); None
        when the usual way has to ask again."""
        self.breaker.release_stream()
        self.stats.streams_active -= 1
        self.stats.endpoint(flow.endpoint.name).streams_active -= 1
        flow.connection.engine_flow_ended()
        name = flow.endpoint.name
        if refusal is not None:
            return FailedOpen(flow.endpoint, _refused_by(flow.endpoint, refusal))
        if unresponsive is not None:
            self._record_connect_failure(flow.endpoint, unresponsive)
            refused = FlowRefused(Outcome.CONNECT_FAILED, _naming(name, str(unresponsive)), name)
            return FailedOpen(flow.endpoint, refused)
        if failure is None:
            return None
        self._record_connect_failure(flow.endpoint, ConnectionLost(failure))
        refused = FlowRefused(Outcome.CONNECT_FAILED, f"{name}: {self._timed_out()}", name)
        return FailedOpen(flow.endpoint, refused)

    def _timed_out(self) -> str:
        """The reason of an open that got no answer within ``connect_timeout``."""
        return f"timed out after {self.config.connect_timeout:g}s"

    def engine_flow_finished(self, flow: EngineFlow, bytes_sent: int, bytes_received: int) -> None:
        """An engine flow ended (after its 200): count it, as :meth:`open_flow` and
        :meth:`flow_finished` count the others."""
        if flow.endpoint.address in self.endpoints:
            self.health[flow.endpoint.address].connect_succeeded(self._loop.time())
        self.stats.streams_total += 1
        self.stats.endpoint(flow.endpoint.name).streams_total += 1
        self.flow_finished(flow, bytes_sent, bytes_received)
        flow.connection.engine_flow_ended()

    def flow_finished(
        self, flow: OpenedFlow | EngineFlow, bytes_sent: int, bytes_received: int
    ) -> None:
        """A flow opened by :meth:`open_flow` ended: give back its slot, count its bytes
        (its running count in :attr:`ClusterStats.live` ends, if it had one)."""
        seen_sent, seen_received = self.stats.live.discard(flow)
        self.breaker.release_stream()
        self.stats.streams_active -= 1
        self.stats.bytes_sent += max(bytes_sent, seen_sent)
        self.stats.bytes_received += max(bytes_received, seen_received)
        self.stats.endpoint(flow.endpoint.name).streams_active -= 1

    def _record_connect_failure(self, endpoint: Endpoint, error: BaseException) -> None:
        self.stats.connect_failures += 1
        side = "unknown"
        if isinstance(error, PeerVerificationError) or "certificate" in str(error).lower():
            reason, side = handshake_failure_reason(error)
            self.stats.handshake_failures[reason] += 1
            logger.warning(
                "cluster %s: TLS handshake with %s failed (%s at fault): %s",
                self.config.name,
                endpoint.name,
                {"ours": "our certificate", "peer": "the peer's certificate"}.get(side, "unknown"),
                error,
            )
        ep_stats = self.stats.endpoint(endpoint.name)
        ep_stats.connect_failures += 1
        if endpoint.address in self.endpoints and self.health.connect_failed(
            endpoint.address, self._loop.time(), our_certificate_refused=side == "ours"
        ):
            ep_stats.ejections += 1
            endpoint.pool.retire_connections("ejected")
            health = self.health[endpoint.address]
            logger.warning(
                "cluster %s: ejected %s after %d connect failures (for %.1fs)",
                self.config.name,
                endpoint.name,
                self.config.outlier_detection.consecutive_connect_failures,
                (health.ejected_until or 0) - self._loop.time(),
            )

    def our_identity_changed(self) -> None:
        """Our certificate changed (rotated): endpoints ejected because their peers
        refused the previous one take flows again at once."""
        ended = self.health.our_identity_changed(self._loop.time())
        if ended:
            logger.info(
                "cluster %s: our certificate changed: %d endpoint(s) ejected for refusing "
                "the previous one take flows again",
                self.config.name,
                ended,
            )

    def _connected(self, pool: EndpointPool, pooled: PooledConnection) -> None:
        self.stats.connections_total += 1
        self.stats.connections_by_transport[pooled.connection.transport_name] += 1
        self.stats.endpoint(format_address(pool.address)).connections_total += 1

    # -- migration ------------------------------------------------------------

    async def migrate(self) -> list[dict[str, Any]]:
        """Move every live QUIC peer connection to a new local UDP port, at once.

        Streams in flight carry on (the peer validates the new path). Returns one
        entry per connection: endpoint, connection id, streams active when it
        moved, its migration count, and ``error`` (empty when it moved).
        """
        moving: list[tuple[Endpoint, PooledConnection, PeerConnection]] = [
            (endpoint, pooled, pooled.connection)
            for endpoint in list(self.endpoints.values()) + self.retired
            for pooled in endpoint.pool.connections
            if pooled.connection.supports_migration and not pooled.connection.is_closed
        ]
        streams = [connection.active_streams for _, _, connection in moving]
        outcomes = await asyncio.gather(
            *(connection.migrate() for _, _, connection in moving), return_exceptions=True
        )
        report = []
        for (endpoint, pooled, connection), active, outcome in zip(
            moving, streams, outcomes, strict=True
        ):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            error = str(outcome) if isinstance(outcome, Exception) else ""
            if error:
                logger.warning(
                    "cluster %s: connection %s to %s did not migrate: %s",
                    self.config.name,
                    pooled.label,
                    endpoint.name,
                    error,
                )
            report.append(
                {
                    "cluster": self.config.name,
                    "endpoint": endpoint.name,
                    "connection": pooled.label,
                    "streams_active": active,
                    "migrations": connection.stats().get("migrations_active", 0),
                    "error": error,
                }
            )
        return report

    # -- background -----------------------------------------------------------

    async def _sweep_loop(self) -> None:
        interval = sweep_interval(self.config.idle_timeout)
        while True:
            await asyncio.sleep(interval)
            now = self._loop.time()
            for endpoint in self.endpoints.values():
                endpoint.pool.close_idle(now, self.config.idle_timeout)
            for endpoint in list(self.retired):
                endpoint.pool.close_idle(now, 0.0)
                if endpoint.pool.connections:
                    continue
                # Its counters go with it (EDS churn kept one for every address ever
                # seen), unless the address is an endpoint again; while a flow there is
                # still counted (its end not reported yet, or an older version of the
                # cluster, which shares the counters, carrying it), it waits a sweep more.
                counters = self.stats.endpoints.get(endpoint.name)
                if endpoint.address in self.endpoints or counters is None:
                    self.retired.remove(endpoint)
                elif counters.streams_active == 0:
                    del self.stats.endpoints[endpoint.name]
                    self.retired.remove(endpoint)

    async def _health_loop(self) -> None:
        check = self.config.health_check
        assert check is not None
        while True:
            endpoints = list(self.endpoints.values())
            await asyncio.gather(*(self._check(e, check.timeout) for e in endpoints))
            # (The loader refuses a shorter interval; a library caller's is held to it.)
            await asyncio.sleep(max(check.interval, MIN_HEALTH_CHECK_INTERVAL))

    async def _check(self, endpoint: Endpoint, timeout: float) -> None:
        try:
            connection = await self.transport.connect(endpoint.address, timeout=timeout)
            refusal = server_refusal(connection.peer_identity, self.config.server_identities)
            if refusal is not None:  # (a handshake it could not serve flows on)
                connection.close()
                raise PeerVerificationError(refusal)
        except (QuicmeshError, OSError) as exc:
            if endpoint.address in self.endpoints:
                health = self.health[endpoint.address]
                was = health.state(self._loop.time())
                health.check_failed(self._loop.time())
                if health.state(self._loop.time()) is not was:
                    logger.warning(
                        "cluster %s: %s is unhealthy: %s", self.config.name, endpoint.name, exc
                    )
                    endpoint.pool.retire_connections("failed its health checks")
            return
        connection.close()
        with contextlib.suppress(QuicmeshError, OSError, TimeoutError):
            await wait_within(connection.wait_closed(), timeout)
        if endpoint.address in self.endpoints:
            health = self.health[endpoint.address]
            was = health.state(self._loop.time())
            health.check_passed(self._loop.time())
            if health.state(self._loop.time()) is not was:
                logger.info("cluster %s: %s is healthy again", self.config.name, endpoint.name)

    # -- views and shutdown ----------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Counters and live state for ``/stats`` and ``/metrics``."""
        now = self._loop.time()
        stats = self.stats
        endpoints: dict[str, Any] = {}
        connections_active = 0
        for endpoint in list(self.endpoints.values()) + self.retired:
            ep_stats = stats.endpoint(endpoint.name)
            state = (
                self.health[endpoint.address].state(now).value
                if endpoint.address in self.endpoints
                else "removed"
            )
            connections = []
            for pooled in endpoint.pool.connections:
                if pooled.connection.is_closed:
                    continue
                try:
                    conn_stats = dict(pooled.connection.stats())
                except Exception:  # a transport's stats() must not break the admin page
                    conn_stats = {}
                connections_active += 1
                connections.append(
                    {
                        "id": pooled.label,
                        "early_data": pooled.connection.early_data,
                        "streams_active": pooled.connection.active_streams,
                        **{k: v for k, v in conn_stats.items() if _is_scalar(v)},
                    }
                )
            endpoints[endpoint.name] = {
                "health": state,
                "streams_active": ep_stats.streams_active,
                "streams_total": ep_stats.streams_total,
                "connect_failures": ep_stats.connect_failures,
                "ejections": ep_stats.ejections,
                "connections_total": ep_stats.connections_total,
                "connections": connections,
            }
        bytes_sent, bytes_received = stats.moved()
        view = {
            "transport": self.config.transport,
            "target": self.config.target,
            "connections_total": stats.connections_total,
            "connections_active": connections_active,
            "streams_total": stats.streams_total,
            "streams_active": stats.streams_active,
            "bytes_sent": bytes_sent,
            "bytes_received": bytes_received,
            "connect_failures": stats.connect_failures,
            "retries": stats.retries,
            "circuit_breaker_overflows": dict(stats.overflows),
            "connections_by_transport": dict(stats.connections_by_transport),
            "outcomes": dict(stats.outcomes),
            "handshake_failures": dict(stats.handshake_failures),
            "panic": self.health.in_panic(now),
            "panic_flows": stats.panic_flows,
            "endpoints": endpoints,
        }
        if stats.quic_counters:
            view["quic"] = sum_counters(stats.quic_counters)
        fallback = self.transport.stats()
        if fallback:
            view["fallback"] = fallback
        return view

    def _routable(self, now: float) -> tuple[set[object], bool]:
        """:meth:`HealthTracker.routable`; panic said once as a flow finds the cluster
        in it and once as a flow finds it out of it."""
        routable, panic = self.health.routable(now)
        if panic is not self._in_panic:
            self._in_panic = panic
            if panic:
                logger.warning(
                    "cluster %s: panic: %d of %d endpoints healthy, under %d%%"
                    " (healthy_panic_threshold): flows go to every endpoint",
                    self.config.name,
                    len(self.health.available(now)),
                    len(self.endpoints),
                    self.config.healthy_panic_threshold,
                )
            else:
                logger.info("cluster %s: out of panic", self.config.name)
        return routable, panic

    def healthy_endpoints(self) -> int:
        """How many endpoints may take flows now."""
        now = self._loop.time()
        return sum(
            1
            for e in self.endpoints.values()
            if self.health[e.address].state(now) is HealthState.HEALTHY
        )

    async def close(self, grace: float = 0.0) -> None:
        """Stop the background tasks and close every pooled connection.

        :param grace: seconds running streams get to finish, every byte acknowledged.
        """
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        # All at once: one after the other, each busy endpoint added its ``grace``
        # (a drain took 2 s more for each).
        await asyncio.gather(
            *(endpoint.pool.close(grace) for endpoint in [*self.endpoints.values(), *self.retired])
        )
        await self.transport.aclose()


def _is_scalar(value: object) -> bool:
    return isinstance(value, int | float | str | bool) or value is None
