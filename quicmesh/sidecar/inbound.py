"""The inbound tunnel listener: flows from peer sidecars to local destinations.

One listener serves several transports on one port number (QUIC on UDP, H2 or
TCP on TCP, like HBONE's 15008). Each stream is checked against the listener's
destination allow-list and identity policies (:mod:`.policy`): a refused stream
is answered 403 with the reason, and a destination that cannot be reached 502,
both logged. A flow's ``flow_id`` is the trace id of its ``traceparent`` header
(sent by the peer sidecar, or by any W3C-traced client), a new one without it;
``downstream`` is the peer sidecar's address. An accepted stream is spliced onto
a TCP connection to its target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from .. import TRANSPORTS
from ..errors import QuicmeshError, TunnelError
from ..splice import splice
from ..tls import Identity, TrustBundle
from ..transport._admission import AdmissionConfig, RateLimitedLog
from ..transport.base import Listener, PeerConnection, StreamHandler, Transport
from ..transport.quic import QuicTransport, load_stateless_reset_key
from ..transport.stream import MeshStream
from .accesslog import FlowRecord, Outcome
from .config import InboundListenerConfig, format_address
from .flows import ACK_TIMEOUT, FLUSH_TIMEOUT, FlowTracker, wait_sent
from .overload import OverloadManager, default_max_descriptors, measure
from .policy import refusal_reason, split_target
from .stats import ListenerStats
from .tracing import continue_or_start

logger = logging.getLogger("quicmesh.sidecar.inbound")

OVERLOAD_SAMPLE_INTERVAL = 1.0
"""Seconds between two samples of memory and descriptors (:mod:`.overload`)."""

REFUSAL_LOG = RateLimitedLog(logger)
"""Streams refused by policy: a peer can send them at will, so one line per 10 s
(with the count of those not logged); the access log still records each one."""


def inbound_transport(
    name: str,
    identity: Identity,
    trust: TrustBundle,
    max_streams: int,
    config: InboundListenerConfig | None = None,
) -> Transport:
    """The server-side transport for one of a listener's ``transports`` (QUIC with
    the listener's admission limits and stateless reset key)."""
    cls = TRANSPORTS[name]
    if name == "quic" and config is not None:
        reset_key = None
        if config.stateless_reset_key is not None:
            reset_key = load_stateless_reset_key(config.stateless_reset_key)
        return QuicTransport(
            identity=identity,
            trust=trust,
            max_streams=max_streams,
            admission=AdmissionConfig(
                retry=config.retry,
                retry_threshold=config.retry_threshold,
                max_half_open=config.max_half_open,
                max_half_open_per_source=config.max_half_open_per_source,
                handshake_timeout=config.handshake_timeout,
            ),
            stateless_reset_key=reset_key,
        )
    if name in ("quic", "h2"):
        return cls(identity=identity, trust=trust, max_streams=max_streams)  # type: ignore[call-arg]
    return cls(identity=identity, trust=trust)


async def listen(
    transport: Transport, config: InboundListenerConfig, handler: StreamHandler
) -> Listener:
    """Listen with one transport; QUIC accepts 0-RTT unless ``early_data`` is off."""
    if isinstance(transport, QuicTransport):
        return await transport.listen(config.address, handler, early_data=config.early_data)
    return await transport.listen(config.address, handler)


class InboundListener:
    """Accepts tunnel streams on every configured transport of one address.

    :param config: the listener's configuration; replace it to change policies on reload.
    :param identity: this sidecar's identity, presented to peers.
    :param trust: the CAs peers must chain to.
    :param stats: counters, kept across reloads.
    :param flows: the sidecar's live-flow tracker.
    :param log: called with each flow's access-log record.
    """

    def __init__(
        self,
        config: InboundListenerConfig,
        identity: Identity,
        trust: TrustBundle,
        stats: ListenerStats,
        flows: FlowTracker,
        log: Callable[[FlowRecord], None],
    ) -> None:
        self.config = config
        self.identity = identity
        self.trust = trust
        self.stats = stats
        self.draining = False
        self._flows = flows
        self._log = log
        self._listeners: list[Listener] = []
        self._transports: list[Transport] = []
        self._local_flows = FlowTracker()
        self.overload = OverloadManager(
            max_streams_per_identity=config.max_streams_per_identity,
            max_streams_total=config.max_streams_total,
            max_rss=config.overload_max_rss * 1024 * 1024 if config.overload_max_rss else None,
            max_descriptors=config.overload_max_descriptors or default_max_descriptors(),
        )
        self._active: dict[MeshStream, None] = {}
        """Inbound streams admitted, oldest first (the newest are shed first)."""
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen on the address with every transport.

        :raises QuicmeshError: an address cannot be bound (listeners already open are closed).
        """
        try:
            for name in self.config.transports:
                transport = inbound_transport(
                    name, self.identity, self.trust, self.config.max_streams, self.config
                )
                if isinstance(transport, QuicTransport):
                    self.stats.quic_counters.append(transport.counters)
                self._transports.append(transport)
                self._listeners.append(await listen(transport, self.config, self._handle))
        except (QuicmeshError, OSError):
            self.close()
            raise
        self.stats.overload = self._overload_view
        self._sample()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_every_second())

    async def _sample_every_second(self) -> None:
        while True:
            await asyncio.sleep(OVERLOAD_SAMPLE_INTERVAL)
            self._sample()

    def _sample(self) -> None:
        """Measure memory and descriptors; in ``shed``, reset the newest tenth of flows."""
        overload = self.overload
        state = overload.update(*measure())
        if state == "shed" and self._active:
            newest = list(self._active)[-max(1, len(self._active) // 10) :]
            REFUSAL_LOG.log(
                logging.WARNING,
                "shed",
                "overloaded (%s): resetting the %d newest inbound flows",
                ", ".join(f"{k} {v:.0%}" for k, v in overload.pressure.items()),
                len(newest),
            )
            for stream in newest:
                overload.shed += 1
                stream.abort()

    def _overload_view(self) -> dict[str, object]:
        overload = self.overload
        return {
            "state": overload.state,
            "pressure": dict(overload.pressure),
            "refusals": dict(overload.refusals),
            "shed": overload.shed,
            "streams": overload.streams,
        }

    def set_identity(self, identity: Identity, trust: TrustBundle) -> None:
        """Present ``identity`` to peers from their next handshake on."""
        self.identity, self.trust = identity, trust
        for transport in self._transports:
            transport.set_identity(identity, trust)

    def handshake_failures(self) -> dict[str, int]:
        """Peers' handshakes this listener refused, by reason."""
        total: dict[str, int] = {}
        for transport in self._transports:
            for reason, count in transport.handshake_failures.items():
                total[reason] = total.get(reason, 0) + count
        return total

    def close(self) -> None:
        """Close the transports' listeners and their connections (GOAWAY / CONNECTION_CLOSE)."""
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        for listener in self._listeners:
            listener.close()

    async def wait_closed(self) -> None:
        """Wait until every transport listener has closed."""
        for listener in self._listeners:
            with contextlib.suppress(QuicmeshError, OSError):
                await listener.wait_closed()

    async def drain_and_close(self, grace: float) -> None:
        """Refuse new streams, wait up to ``grace`` seconds for live ones, then close.

        Peer connections are then closed gracefully
        (:meth:`~quicmesh.PeerConnection.aclose`): the last bytes of finished flows
        get :data:`~.flows.ACK_TIMEOUT` seconds to be acknowledged.
        """
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._local_flows.wait_idle(), grace)
        connections: list[PeerConnection] = [
            connection
            for listener in self._listeners
            # QuicListener and the TLS listeners expose the connections they accepted.
            for connection in getattr(listener, "connections", ())
        ]
        await asyncio.gather(
            *(_aclose(connection, ACK_TIMEOUT) for connection in connections),
        )
        self.close()
        await self.wait_closed()

    async def _handle(self, stream: MeshStream) -> None:
        with self._flows.track(), self._local_flows.track():
            await self._serve(stream)

    async def _serve(self, stream: MeshStream) -> None:
        start, started = time.time(), time.monotonic()
        config = self.config
        stats = self.stats
        stats.streams_total += 1
        stats.streams_active += 1
        record = FlowRecord(
            start=start,
            duration=0.0,
            listener=config.name,
            direction="inbound",
            downstream=stream.peer_address,
            target=stream.target,
            transport=stream.transport,
            peer_identity=stream.peer_identity,
            endpoint="",
            bytes_sent=0,
            bytes_received=0,
            outcome=Outcome.COMPLETED,
            flow_id=continue_or_start(stream.headers).trace_id,
        )
        try:
            await self._forward(stream, config, record)
        finally:
            stats.streams_active -= 1
            record.duration = time.monotonic() - started
            stats.flow_ended(record.outcome, record.bytes_sent, record.bytes_received)
            self._log(record)

    async def _forward(
        self, stream: MeshStream, config: InboundListenerConfig, record: FlowRecord
    ) -> None:
        if self.draining:
            record.outcome, record.reason = Outcome.DRAINING, "sidecar is draining"
            _refuse(stream, 503, record.reason)
            return
        # Limits and overload first: a refused stream costs no destination connection.
        refusal = self.overload.admit(stream.peer_identity)
        if refusal is not None:
            REFUSAL_LOG.log(
                logging.WARNING, "limit", "refused %s: %s", stream.peer_identity, refusal
            )
            record.outcome, record.reason = Outcome.OVERFLOW, refusal
            _refuse(stream, 503, refusal)
            return
        self._active[stream] = None
        try:
            await self._forward_admitted(stream, config, record)
        finally:
            del self._active[stream]
            self.overload.release(stream.peer_identity)

    async def _forward_admitted(
        self, stream: MeshStream, config: InboundListenerConfig, record: FlowRecord
    ) -> None:
        reason = refusal_reason(config, stream.peer_identity, stream.target)
        if reason is not None:
            REFUSAL_LOG.log(
                logging.WARNING,
                "policy",
                "refused %s -> %s: %s",
                stream.peer_identity,
                stream.target,
                reason,
            )
            record.outcome, record.reason = Outcome.REFUSED, reason
            _refuse(stream, 403, reason)
            return
        parsed = split_target(stream.target)
        assert parsed is not None
        host, port = parsed
        record.endpoint = format_address(parsed)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), config.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            why = (
                f"timed out after {config.connect_timeout:g}s"
                if isinstance(exc, TimeoutError)
                else exc.strerror or str(exc)
            )
            record.outcome = Outcome.UNREACHABLE
            record.reason = f"cannot reach {stream.target}: {why}"
            _refuse(stream, 502, record.reason)
            return
        self.stats.connections_total += 1
        self.stats.connections_active += 1
        try:
            result = await splice(stream, reader, writer)
            if not result.error:
                await wait_sent(stream, FLUSH_TIMEOUT)
        finally:
            self.stats.connections_active -= 1
        record.bytes_sent = result.bytes_from_stream
        record.bytes_received = result.bytes_to_stream
        if result.error:
            record.outcome, record.reason = Outcome.RESET, result.error


async def _aclose(connection: PeerConnection, timeout: float) -> None:
    with contextlib.suppress(QuicmeshError, OSError, TimeoutError):
        await asyncio.wait_for(connection.aclose(timeout), timeout + ACK_TIMEOUT)


def _refuse(stream: MeshStream, status: int, reason: str) -> None:
    try:
        stream.refuse(status, reason)
    except TunnelError:
        stream.abort()
