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
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

from .._timeouts import wait_within
from ..errors import ConfigError, PeerVerificationError, QuicmeshError, TunnelError, peer_text
from ..logs import RateLimitedLog
from ..splice import (
    SpliceResult,
    connect_and_splice,
    moved_so_far,
    splice,
    splice_engine_socket,
)
from ..tls import Identity, TrustBundle
from ..tls.verify import verify_peer
from ..transport.base import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    EngineFlowPlan,
    InboundEngineFlow,
    Listener,
    PeerConnection,
    StreamHandler,
    Transport,
    transport_registry,
)
from ..transport.stream import EngineSocket, MeshStream, SpliceOutcome
from ..tunnel.h3 import DEFAULT_CONNECTION_WINDOW, DEFAULT_STREAM_WINDOW
from .accesslog import FlowRecord, Outcome
from .config import Address, InboundListenerConfig, SidecarConfig, format_address, ip_address_of
from .flows import ACK_TIMEOUT, FLUSH_TIMEOUT, FlowTracker, wait_sent
from .overload import (
    LOOP_LAG_TICK,
    STOP_ACCEPTING,
    OverloadManager,
    StreamRateGovernor,
    default_max_descriptors,
    measure,
)
from .policy import allowed_nowhere, refusal_reason, split_target
from .stats import ListenerStats, retire_counters
from .tracing import continue_or_start

logger = logging.getLogger("quicmesh.sidecar.inbound")

MIB = 1024 * 1024

MAX_REMEMBERED_REFUSALS = 4096
"""Policy answers (identity, destination) an inbound listener keeps until a reload."""

OVERLOAD_SAMPLE_INTERVAL = 1.0
"""Seconds between two samples of memory and descriptors (:mod:`.overload`)."""

_Made = TypeVar("_Made")

UNTRUSTED_PEER_GRACE = 10.0
"""Seconds the flows under way on a peer connection the trust bundle no longer
verifies may go on after its GOAWAY (:meth:`InboundListener.refuse_untrusted_peers`)."""

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
    options: dict[str, Any] = {}
    if name in ("quic", "h2"):
        stream_window, connection_window = DEFAULT_STREAM_WINDOW, DEFAULT_CONNECTION_WINDOW
        if config is not None:
            stream_window, connection_window = receive_windows(
                config.max_buffered_per_connection * MIB
            )
        options.update(
            max_streams=max_streams,
            stream_window=stream_window,
            connection_window=connection_window,
        )
    if name == "quic" and config is not None:
        options["admission"] = {
            "retry": config.retry,
            "retry_threshold": config.retry_threshold,
            "max_half_open": config.max_half_open,
            "max_half_open_per_source": config.max_half_open_per_source,
            "handshake_timeout": config.handshake_timeout,
        }
        if config.stateless_reset_key is not None:
            options["stateless_reset_key_file"] = config.stateless_reset_key
        options["max_stream_rate"] = config.max_stream_rate
        options["engine"] = config.engine
        options["max_datagram_size"] = config.max_datagram_size
        options["ack_eliciting_threshold"] = config.ack_eliciting_threshold
    return transport_registry().build(name, identity=identity, trust=trust, options=options)


def receive_windows(max_buffered: int) -> tuple[int, int]:
    """Receive windows keeping what one peer connection can make us buffer on
    the receive side to half of ``max_buffered`` (at most the transports'
    defaults, 16 MiB and 1 MiB; at least 64 KiB): a hard bound, by flow control.
    The send side holds at most ``high_water`` per stream; the listener's
    sampler resets the fullest flows of a connection over ``max_buffered``.
    Returns (stream window, connection window)."""
    connection = max(64 * 1024, min(DEFAULT_CONNECTION_WINDOW, max_buffered // 2))
    return min(DEFAULT_STREAM_WINDOW, connection), connection


def _inbound_record(
    config: InboundListenerConfig,
    downstream: str,
    target: str,
    transport: str,
    peer_identity: str,
    flow_id: str,
    start: float | None = None,
) -> FlowRecord:
    """The access-log record of a flow from a peer, before it has carried anything."""
    return FlowRecord(
        start=time.time() if start is None else start,
        duration=0.0,
        listener=config.name,
        direction="inbound",
        downstream=downstream,
        target=target,
        transport=transport,
        peer_identity=peer_identity,
        endpoint="",
        bytes_sent=0,
        bytes_received=0,
        outcome=Outcome.COMPLETED,
        flow_id=flow_id,
    )


class _Handler:
    """An inbound listener's stream handler, with the hook a transport calls for a
    stream it refused before the handler saw it (:meth:`~quicmesh.Transport.listen`)."""

    __slots__ = ("handle", "rejected")

    def __init__(
        self,
        handle: Callable[[MeshStream], Awaitable[None]],
        rejected: Callable[[PeerConnection, int, str], None],
    ) -> None:
        self.handle = handle
        self.rejected = rejected

    def __call__(self, stream: MeshStream) -> Awaitable[None]:
        return self.handle(stream)


async def listen(
    transport: Transport, config: InboundListenerConfig, handler: StreamHandler
) -> Listener:
    """Listen with one transport; QUIC accepts 0-RTT unless ``early_data`` is off."""
    return await transport.listen(config.address, handler, early_data=config.early_data)


def check_overload_limits(config: SidecarConfig, listener: int | None = None) -> None:
    """Refuse a configured memory or descriptor limit the sidecar is over already: every
    stream would be refused (``overload_max_rss: 1`` ran so). At the sidecar's start
    and with ``--check`` (which passed such limits; it measures its own process, a
    little smaller than a running sidecar, so a limit just above that passes it and is
    refused at start). Not on a reload: a busy sidecar may be over a limit for a while,
    as the limit is meant to make it.

    :param listener: the index of the one inbound listener to check (None: all).
    :raises ConfigError: ``<file>: listeners.inbound[<i>].<key>: <limit and use>``.
    """
    rss, descriptors = measure()
    indexes = range(len(config.inbound)) if listener is None else (listener,)
    for index in indexes:
        inbound = config.inbound[index]
        max_rss, max_descriptors = inbound.overload_max_rss, inbound.overload_max_descriptors
        over = None
        if max_rss and rss >= max_rss * MIB * STOP_ACCEPTING:
            over = "overload_max_rss", f"{max_rss} MiB", f"{rss / MIB:.0f} MiB"
        elif max_descriptors and descriptors >= max_descriptors * STOP_ACCEPTING:
            over = "overload_max_descriptors", f"{max_descriptors}", f"{descriptors} descriptors"
        if over is not None:
            key, limit, use = over
            raise ConfigError(
                f"{config.source}: listeners.inbound[{index}].{key}: {limit} is below what "
                f"the sidecar uses already ({use}; streams are refused from "
                f"{STOP_ACCEPTING:.0%} of it)"
            )


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
        own_addresses: Callable[[], Collection[Address]] = tuple,
    ) -> None:
        self._config = config
        self._own_addresses = own_addresses
        """The sidecar's own listening addresses, never a destination (policy.refusal_reason)."""
        self._refusals: dict[tuple[str, str], str | None] = {}
        self.identity = identity
        self.trust = trust
        self.stats = stats
        self.draining = False
        """New flows are refused (503): the drain began, or its graceful period is over."""
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
            max_connections_per_identity=config.max_connections_per_identity,
            max_buffered_total=config.max_buffered_total * MIB,
            max_buffered_per_connection=config.max_buffered_per_connection * MIB,
        )
        self._connections: dict[str, dict[object, None]] = {}
        """Per peer identity, the connections that carried an admitted stream, oldest first."""
        self._active: dict[MeshStream | InboundEngineFlow, None] = {}
        """Inbound streams admitted, oldest first (the newest are shed first)."""
        self._sampler: asyncio.Task[None] | None = None
        self.governor = StreamRateGovernor(
            max_lag=config.overload_max_loop_lag, base_rate=config.max_stream_rate or None
        )
        """The overload action on event-loop delay (:class:`.overload.StreamRateGovernor`)."""
        self._lag_probe: asyncio.Handle | None = None
        self._lag_probe_due = 0.0
        self._closing: set[asyncio.Task[None]] = set()
        """Connections being closed once their refusal reached the peer."""

    @property
    def config(self) -> InboundListenerConfig:
        """The listener's configuration; replace it to change policies on reload."""
        return self._config

    @config.setter
    def config(self, config: InboundListenerConfig) -> None:
        self._config = config
        self._refusals = {}
        self._set_stream_rates(
            self.governor.review_denied(
                lambda identity: allowed_nowhere(config, identity), config.denied_stream_rate
            )
        )

    def _refusal(self, config: InboundListenerConfig, identity: str, target: str) -> str | None:
        """:func:`.policy.refusal_reason`, remembered for the current configuration
        (flows repeat their identity and destination; a reload forgets)."""
        if config is not self._config:
            return refusal_reason(config, identity, target, self._own_addresses())
        refusals = self._refusals
        key = (identity, target)
        if key in refusals:
            return refusals[key]
        if len(refusals) >= MAX_REMEMBERED_REFUSALS:
            refusals.clear()
        reason = refusals[key] = refusal_reason(config, identity, target, self._own_addresses())
        return reason

    def _set_stream_rates(self, changes: dict[str, float | None]) -> list[str]:
        """Apply new-stream rate changes (None: the transport's own) to every
        transport that can withhold stream credit; the identities it applied to."""
        return [
            identity
            for identity, rate in changes.items()
            if any([t.set_stream_rate(identity, rate) for t in self._transports])
        ]

    async def start(self) -> None:
        """Listen on the address with every transport.

        :raises QuicmeshError: an address cannot be bound (listeners already open are closed).
        """
        try:
            for name in self.config.transports:
                transport = inbound_transport(
                    name, self.identity, self.trust, self.config.max_streams, self.config
                )
                if transport.counters:
                    self.stats.quic_counters.append(transport.counters)
                self._transports.append(transport)
                listener = await listen(
                    transport, self.config, _Handler(self._handle, self._rejected)
                )
                self._listeners.append(listener)
                listener.set_engine_flows(self._decide_now)
        except (QuicmeshError, OSError):
            self.close()
            raise
        self.stats.overload = self._overload_view
        self._sample()
        loop = asyncio.get_running_loop()
        self._sampler = loop.create_task(self._sample_every_second())
        if self.governor.max_lag > 0:
            self._schedule_lag_probe(loop, loop.time())

    def _schedule_lag_probe(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        # The time it is due is kept here: uvloop's call_at() of a time already
        # past (the probe itself ran late) returns a plain Handle, without when().
        self._lag_probe_due = now + LOOP_LAG_TICK
        self._lag_probe = loop.call_at(self._lag_probe_due, self._probe_lag, loop)

    def _probe_lag(self, loop: asyncio.AbstractEventLoop) -> None:
        """Measure how late this timer fired (the event loop's delay) and apply the
        governor's rate changes to every transport that can withhold stream credit."""
        now = loop.time()
        delay = max(0.0, now - self._lag_probe_due)
        changes = self.governor.observe(delay, now)
        for identity in self._set_stream_rates(changes):
            rate = changes[identity]
            if rate is not None and delay > self.governor.max_lag:  # a cut, not a restore
                REFUSAL_LOG.log(
                    logging.WARNING,
                    "loop_lag",
                    "overloaded: event loop %.0f ms late; %s may open %.0f new streams/s",
                    delay * 1000,
                    identity,
                    rate,
                )
        self._schedule_lag_probe(loop, now)

    async def _sample_every_second(self) -> None:
        while True:
            await asyncio.sleep(OVERLOAD_SAMPLE_INTERVAL)
            self._sample()

    def _sample(self) -> None:
        """Measure memory, descriptors and buffers; reset the fullest flows of a
        connection over its buffer limit; close an identity's connections beyond
        its limit; in ``shed``, reset the newest tenth of flows."""
        overload = self.overload
        per_connection: dict[object, int] = {}
        for stream in self._active:
            held = stream.buffered_bytes
            per_connection[stream.channel] = per_connection.get(stream.channel, 0) + held
        for connection in overload.over_buffered(per_connection):
            self._reset_fullest(connection, per_connection[connection])
        self._close_extra_connections()
        state = overload.update(*measure(), buffered=sum(per_connection.values()))
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

    def _reset_fullest(self, connection: object, held: int) -> None:
        """Reset the flows of ``connection`` holding the most, until it holds no more
        than ``max_buffered_per_connection``."""
        cap = self.overload.max_buffered_per_connection
        assert cap is not None
        streams = sorted(
            (s for s in self._active if s.channel is connection),
            key=lambda s: s.buffered_bytes,
            reverse=True,
        )
        for stream in streams:
            if held <= cap:
                break
            REFUSAL_LOG.log(
                logging.WARNING,
                "buffers",
                "resetting %s -> %s: its connection holds %d bytes in buffers"
                " (max_buffered_per_connection %d)",
                stream.peer_identity,
                stream.target,
                held,
                cap,
            )
            held -= stream.buffered_bytes
            self.overload.buffer_resets += 1
            stream.abort()

    def _close_extra_connections(self) -> None:
        """Close the connections of an identity beyond ``max_connections_per_identity``
        (those that never carried an admitted stream first, then the newest), so
        that connections kept idle are bounded too."""
        cap = self.overload.max_connections_per_identity
        by_identity: dict[str, list[PeerConnection]] = {}
        for transport, listener in zip(self._transports, self._listeners, strict=False):
            if transport.connection_per_flow:
                continue  # max_streams_per_identity bounds them
            for connection in getattr(listener, "connections", ()):
                if not connection.is_closed:
                    by_identity.setdefault(connection.peer_identity, []).append(connection)
        for identity, known in list(self._connections.items()):
            for connection in [c for c in known if getattr(c, "is_closed", True)]:
                del known[connection]
            if not known:
                del self._connections[identity]
        for identity, connections in by_identity.items():
            if len(connections) <= cap:
                continue
            known = self._connections.get(identity, {})
            age = {c: index for index, c in enumerate(known)}
            # Never used first, then the newest.
            connections.sort(key=lambda c: (c in age, -age.get(c, 0)))
            extra = connections[: len(connections) - cap]
            REFUSAL_LOG.log(
                logging.WARNING,
                "connections",
                "closing %d connections of %s: max_connections_per_identity (%d)",
                len(extra),
                identity,
                cap,
            )
            for connection in extra:
                self.overload.refusals["connections_per_identity"] += 1
                known.pop(connection, None)
                connection.close()

    def _admit_connection(
        self, stream: MeshStream | InboundEngineFlow, *, count: bool = True
    ) -> str | None:
        """Count the stream's connection for its identity: the refusal if the
        identity already holds ``max_connections_per_identity`` others. (Not for
        a transport with one connection per flow (``tcp``), which
        ``max_streams_per_identity`` bounds.) ``count=False`` only asks: nothing is
        recorded, a refusal is not counted."""
        if any(t.connection_per_flow and t.name == stream.transport for t in self._transports):
            return None
        known = self._connections.setdefault(stream.peer_identity, {})
        connection = stream.channel
        if connection in known:
            return None
        for other in [c for c in known if getattr(c, "is_closed", True)]:
            del known[other]
        if not count:
            return self.overload.connection_refusal(stream.peer_identity, len(known))
        refusal = self.overload.admit_connection(stream.peer_identity, len(known))
        if refusal is None:
            known[connection] = None
        return refusal

    def _overload_view(self) -> dict[str, object]:
        overload = self.overload
        return {
            "state": overload.state,
            "pressure": dict(overload.pressure),
            "refusals": dict(overload.refusals),
            "shed": overload.shed,
            "buffer_resets": overload.buffer_resets,
            "buffered": overload.buffered,
            "streams": overload.streams,
            "loop_lag": self.governor.lag,
            "rate_cuts": self.governor.cuts,
            "slowed": dict(self.governor.rates),
            "denied": dict(self.governor.denied),
        }

    def identity_problem(self, identity: Identity, trust: TrustBundle) -> str | None:
        """Why one of this listener's transports cannot take ``identity`` and ``trust``."""
        for transport in self._transports:
            problem = transport.identity_problem(identity, trust)
            if problem is not None:
                return problem
        return None

    def set_identity(self, identity: Identity, trust: TrustBundle) -> None:
        """Present ``identity`` to peers and verify them with ``trust`` from their next
        handshake on. A trust bundle without a CA the one in use had also reaches the
        peers connected already: :meth:`refuse_untrusted_peers`, once this rotation is
        decided (the next turn of the event loop: a rotation another transport refuses
        puts the old bundle back first, and then every peer still verifies)."""
        removed = trust.lacks_a_root_of(self.trust)
        self.identity, self.trust = identity, trust
        for transport in self._transports:
            transport.set_identity(identity, trust)
        if removed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # (not serving: no peer connected)
            loop.call_soon(lambda: self.refuse_untrusted_peers(self.trust))
            # A handshake under way now was begun with the old bundle and is verified
            # with it when it ends: looked at again once every such one has ended (the
            # transports' handshake timeouts), or one kept slow escaped the sweep.
            longest = max(
                self.config.handshake_timeout if t.name == "quic" else DEFAULT_HANDSHAKE_TIMEOUT
                for t in self._transports
            )
            loop.call_later(longest + 1.0, lambda: self.refuse_untrusted_peers(self.trust))

    def refuse_untrusted_peers(
        self, trust: TrustBundle, grace: float = UNTRUSTED_PEER_GRACE
    ) -> list[PeerConnection]:
        """Tell each open peer connection whose certificate chain ``trust`` no longer
        verifies (a CA taken out of the bundle) to go away, and close it.

        A handshake is verified once: without this, a peer connected with a certificate
        of a CA removed after a compromise kept opening flows on its connection for as
        long as it kept it. Each such connection gets a GOAWAY at once (new flows on it
        are refused, so the peer dials again, and its new handshake meets ``trust``),
        then is closed once its flows end or after ``grace`` seconds (those left are
        reset). The chain checked is the one the peer presented (:func:`verify_peer`,
        as a new handshake is); a connection whose chain cannot be read any more (an
        aioquic session resumed from a ticket presents none) is refused too, since
        nothing shows it is still trusted. Each is logged with the peer's identity and
        why. Returns the connections refused.
        """
        refused: list[PeerConnection] = []
        for transport, listener in zip(self._transports, self._listeners, strict=False):
            if transport.connection_per_flow:
                continue  # (TLS-over-TCP: every flow has its own handshake)
            for connection in list(getattr(listener, "connections", ())):
                if connection.is_closed:
                    continue
                reason = _untrusted_reason(connection, trust)
                if reason is None:
                    continue
                logger.warning(
                    "inbound listener %s: %s connection from %s (%s) no longer trusted: "
                    "%s; told to go away, closed once its flows end (at most %g s)",
                    self.config.name,
                    connection.transport_name,
                    connection.peer_identity,
                    connection.peer_address,
                    reason,
                    grace,
                )
                connection.go_away()
                refused.append(connection)
                closing = asyncio.get_running_loop().create_task(_aclose(connection, grace))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        return refused

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
        if self._lag_probe is not None:
            self._lag_probe.cancel()
            self._lag_probe = None
        for listener in self._listeners:
            listener.close()

    async def wait_closed(self) -> None:
        """Wait until every transport listener has closed."""
        for listener in self._listeners:
            with contextlib.suppress(QuicmeshError, OSError):
                await listener.wait_closed()

    async def drain_and_close(self, grace: float, acks: float = ACK_TIMEOUT) -> None:
        """Refuse new streams, wait up to ``grace`` seconds for live ones, then close.

        Peers are told first, where the protocol can say it (:meth:`begin_drain`).
        Peer connections are then closed gracefully
        (:meth:`~quicmesh.PeerConnection.aclose`): the last bytes of finished flows get
        ``acks`` seconds (:data:`~.flows.ACK_TIMEOUT`; none when the sidecar is asked to
        quit) to be acknowledged.
        """
        self.begin_drain()
        with contextlib.suppress(TimeoutError):
            await wait_within(self._local_flows.wait_idle(), grace)
        connections = self._accepted_connections()
        await asyncio.gather(*(_aclose(connection, acks) for connection in connections))
        self.close()
        await self.wait_closed()
        for transport in self._transports:  # (a listener of its name may go on counting)
            retire_counters(self.stats.quic_counters, transport.counters)

    def begin_drain(self, *, refuse: bool = True) -> None:
        """Tell the peers to open no new flow (a GOAWAY on each QUIC or HTTP/2
        connection, :meth:`~quicmesh.PeerConnection.go_away`); the flows under way carry
        on. ``refuse``: new streams are refused (503) from now on, else only from
        :meth:`refuse_new_flows` (Envoy's graceful drain: a peer that has not yet learnt of
        the drain, or has no other endpoint and dials this one again, is still served,
        and its new connection is told only then). (A quicmesh peer's cluster sends new
        flows to its other endpoints, :data:`~.pool.GOING_AWAY_SECONDS`.)"""
        if refuse:
            self.refuse_new_flows()
        else:
            self._tell_peers_to_go_away()

    def refuse_new_flows(self) -> None:
        """Refuse new streams (503) from now on, every peer connection told to go away
        (one made later hears it at its first, refused, flow)."""
        if self.draining:
            return
        self.draining = True
        self._tell_peers_to_go_away()

    def _tell_peers_to_go_away(self) -> None:
        told = sum(connection.go_away() for connection in self._accepted_connections())
        if told:
            logger.info(
                "inbound listener %s: told %d peer connection(s) to go away (GOAWAY)",
                self.config.name,
                told,
            )

    def _accepted_connections(self) -> list[PeerConnection]:
        return [
            connection
            for listener in self._listeners
            # QuicListener and the TLS listeners expose the connections they accepted.
            for connection in getattr(listener, "connections", ())
        ]

    async def _handle(self, stream: MeshStream) -> None:
        with self._flows.track(), self._local_flows.track():
            await self._serve(stream)

    @staticmethod
    def _record(
        stream: MeshStream | InboundEngineFlow,
        config: InboundListenerConfig,
        start: float | None = None,
    ) -> FlowRecord:
        """A new flow's access-log record; its ``flow_id`` is the trace id of its
        ``traceparent``, or a new one."""
        return _inbound_record(
            config,
            stream.peer_address,
            stream.target,
            stream.transport,
            stream.peer_identity,
            continue_or_start(stream.headers).trace_id,
            start,
        )

    def _rejected(self, connection: PeerConnection, status: int, reason: str) -> None:
        """The transport refused a stream of ``connection`` before it reached us (its
        request was malformed: 400; its header section too large: 431): counted and
        logged as a refused flow, as Envoy logs a downstream protocol error."""
        stats = self.stats
        stats.streams_total += 1
        stats.flow_ended(Outcome.REFUSED, 0, 0)
        record = _inbound_record(
            self.config,
            connection.peer_address,
            "",
            connection.transport_name,
            connection.peer_identity,
            continue_or_start({}).trace_id,
        )
        record.outcome = Outcome.REFUSED
        record.reason = f"{status} {peer_text(reason)}"  # (it may repeat the peer's words)
        self._log(record)

    def _decide_now(self, flow: InboundEngineFlow) -> EngineFlowPlan | None:
        """Take a peer's CONNECT at once, for the engine to connect, answer and splice
        (inbound engine flows, docs/design.md): only one that :meth:`_serve` would
        splice as it is (``splice`` on, not draining, allowed by the policies, to an IP
        address, within the limits), counted and logged as :meth:`_serve` does. Anything
        else (None) goes to :meth:`_handle`, which refuses it with its reason."""
        config = self.config
        identity = flow.peer_identity
        if self.draining or not config.splice:
            return None
        if self._refusal(config, identity, flow.target) is not None:
            return None
        parsed = split_target(flow.target)
        if parsed is None or ip_address_of(parsed[0]) is None:
            return None  # a name: resolved in Python (_serve)
        # Asked first (a refusal is the handler's to count and log), then counted in.
        if (
            self._admit_connection(flow, count=False) is not None
            or self.overload.refusal(identity) is not None
        ):
            return None
        self._admit_connection(flow)
        self.overload.admit(identity)
        started = time.monotonic()
        self._flows.begin()
        self._local_flows.begin()
        self.governor.opened(identity)
        stats = self.stats
        stats.streams_total += 1
        stats.streams_active += 1
        stats.connections_active += 1
        record = self._record(flow, config)
        record.endpoint = format_address(parsed)
        self._active[flow] = None
        stats.live.add(record, lambda: flow.spliced_bytes() or (0, 0))

        def ended(outcome: SpliceOutcome | OSError) -> None:
            stats.connections_active -= 1
            self._active.pop(flow, None)
            self.overload.release(identity)
            if isinstance(outcome, OSError):
                record.outcome = Outcome.UNREACHABLE
                record.reason = _unreachable(flow.target, outcome, config.connect_timeout)
                flow.refuse(502, record.reason)
            else:
                if outcome.connected:
                    stats.connections_total += 1
                    stats.streams_spliced += 1
                    stats.engine_flows += 1
                record.bytes_sent = outcome.bytes_from_stream
                record.bytes_received = outcome.bytes_to_stream
                if outcome.error:
                    record.outcome, record.reason = Outcome.RESET, outcome.error
            stats.streams_active -= 1
            record.duration = time.monotonic() - started
            stats.flow_logged(record)
            self._log(record)
            self._local_flows.end()
            self._flows.end()

        return EngineFlowPlan(
            parsed[0], parsed[1], config.connect_timeout, ended, config.flow_idle_timeout
        )

    async def _serve(self, stream: MeshStream) -> None:
        start, started = time.time(), time.monotonic()
        config = self.config
        stats = self.stats
        self.governor.opened(stream.peer_identity)
        stats.streams_total += 1
        stats.streams_active += 1
        record = self._record(stream, config, start)
        try:
            await self._forward(stream, config, record)
        finally:
            stats.streams_active -= 1
            record.duration = time.monotonic() - started
            stats.flow_logged(record)
            self._log(record)

    async def _forward(
        self, stream: MeshStream, config: InboundListenerConfig, record: FlowRecord
    ) -> None:
        if self.draining:
            record.outcome, record.reason = Outcome.DRAINING, "sidecar is draining"
            _refuse(stream, 503, record.reason)
            # A connection made (or finishing its handshake) after the refusals began:
            # told now, so that its peer opens no more flows on it (the rest were told).
            if isinstance(stream.channel, PeerConnection):
                stream.channel.go_away()
            return
        # Limits and overload first: a refused stream costs no destination connection.
        connection_refusal = self._admit_connection(stream)
        if connection_refusal is not None:
            REFUSAL_LOG.log(
                logging.WARNING,
                "connections",
                "refused %s and closed its connection: %s",
                stream.peer_identity,
                connection_refusal,
            )
            record.outcome, record.reason = Outcome.OVERFLOW, connection_refusal
            _refuse(stream, 503, connection_refusal)
            # Gracefully, after the 503: an immediate close discards what the engine has
            # not sent yet (the native engine's writes cross to its thread), so the peer
            # would see its connection closed without the answer.
            if isinstance(stream.channel, PeerConnection):
                closing = asyncio.get_running_loop().create_task(
                    _aclose(stream.channel, ACK_TIMEOUT)
                )
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            return
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
        reason = self._refusal(config, stream.peer_identity, stream.target)
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
            if allowed_nowhere(config, stream.peer_identity):
                self._hold_denied(stream.peer_identity, config.denied_stream_rate)
            return
        parsed = split_target(stream.target)
        assert parsed is not None
        host, port = parsed
        record.endpoint = format_address(parsed)
        engine_socket: EngineSocket | None = None
        result: SpliceResult | None = None
        progress = SpliceResult()
        self.stats.live.add(record, lambda: moved_so_far(stream, progress))
        try:
            if config.splice:
                # The engine that splices the flow connects, answers and splices in one
                # step, where it can (no socket passes through Python, and Python is not
                # woken between the connect and the splice); else it connects for the splice.
                result = await self._connect_and_splice(stream, host, port, config)
                if result is None:
                    engine_socket = await _unless_given_up(
                        stream,
                        stream.connect_for_splice(host, port, config.connect_timeout),
                        lambda made: made.close() if made is not None else None,
                    )
            if result is None and engine_socket is None:
                reader, writer = await _unless_given_up(
                    stream,
                    wait_within(asyncio.open_connection(host, port), config.connect_timeout),
                    lambda made: made[1].close(),
                )
        except _GivenUp as given_up:
            record.outcome, record.reason = Outcome.RESET, str(given_up.error)
            return
        except (OSError, TimeoutError) as exc:
            record.outcome = Outcome.UNREACHABLE
            record.reason = _unreachable(stream.target, exc, config.connect_timeout)
            _refuse(stream, 502, record.reason)
            return
        if result is None:
            self.stats.connections_total += 1
            self.stats.connections_active += 1
            try:
                if engine_socket is not None:
                    result = await splice_engine_socket(
                        stream,
                        engine_socket,
                        idle_timeout=config.flow_idle_timeout,
                        progress=progress,
                    )
                else:
                    result = await splice(
                        stream,
                        reader,
                        writer,
                        offload=config.splice,
                        idle_timeout=config.flow_idle_timeout,
                        progress=progress,
                    )
            finally:
                self.stats.connections_active -= 1
        if not result.error and not result.offloaded:
            # (A splice ended once the peer acknowledged every byte: nothing is left.)
            await wait_sent(stream, FLUSH_TIMEOUT)
        self.stats.streams_spliced += result.offloaded
        record.bytes_sent = result.bytes_from_stream
        record.bytes_received = result.bytes_to_stream
        if result.error:
            record.outcome, record.reason = Outcome.RESET, result.error

    async def _connect_and_splice(
        self, stream: MeshStream, host: str, port: int, config: InboundListenerConfig
    ) -> SpliceResult | None:
        """:func:`~quicmesh.splice.connect_and_splice`, counting the destination
        connection as active from its connect on (the engine reports only the end), and
        in the total once made."""
        stats = self.stats
        stats.connections_active += 1
        try:
            result = await connect_and_splice(
                stream, host, port, config.connect_timeout, idle_timeout=config.flow_idle_timeout
            )
        finally:
            stats.connections_active -= 1
        if result is not None and result.connected:
            stats.connections_total += 1
        return result

    def _hold_denied(self, identity: str, rate: float) -> None:
        """Hold an identity that no policy allows at ``rate`` new streams a second
        (its streams cost a refusal each; a compliant peer waits for credit)."""
        if self._set_stream_rates(self.governor.deny(identity, rate)):
            REFUSAL_LOG.log(
                logging.WARNING,
                "denied",
                "%s is allowed nowhere by listener %s: it may open %g new streams/s",
                identity,
                self.config.name,
                rate,
            )


def _untrusted_reason(connection: PeerConnection, trust: TrustBundle) -> str | None:
    """Why the certificate chain ``connection``'s peer presented does not verify with
    ``trust`` now (one line), or None if it does."""
    try:
        certificate, chain = connection.peer_chain
        if certificate is None:
            return "its certificate chain cannot be read to check it again (a resumed session)"
        verify_peer(certificate, chain, trust)
    except PeerVerificationError as exc:
        return str(exc)
    except Exception as exc:  # (one connection's odd chain must not stop the sweep)
        return f"its certificate chain could not be checked again: {exc}"
    return None


async def _aclose(connection: PeerConnection, timeout: float) -> None:
    with contextlib.suppress(QuicmeshError, OSError, TimeoutError):
        await wait_within(connection.aclose(timeout), timeout + ACK_TIMEOUT)


class _GivenUp(Exception):
    """The flow failed (the peer reset it, its connection went) while its destination
    was being connected."""

    def __init__(self, error: TunnelError) -> None:
        super().__init__(str(error))
        self.error = error


async def _unless_given_up(
    stream: MeshStream, connect: Awaitable[_Made], discard: Callable[[_Made], None]
) -> _Made:
    """``connect`` (to the flow's destination), abandoned if the flow fails first, as
    the native engine's own connects are: the destination's connection is not held, nor
    the flow answered 502, for a flow nobody waits on. A connection made as the flow
    failed goes to ``discard``.

    :raises _GivenUp: the flow failed first (its error).
    """
    connecting = asyncio.ensure_future(connect)
    failed = asyncio.ensure_future(stream.wait_closed())

    def abandon() -> None:
        """Stop the connect; a connection it made (or makes as it is stopped) is
        discarded."""

        def abandoned(task: asyncio.Future[_Made]) -> None:
            if not task.cancelled() and task.exception() is None:
                discard(task.result())

        connecting.cancel()
        connecting.add_done_callback(abandoned)

    try:
        await asyncio.wait((connecting, failed), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # (cancelled: the listener is closing)
        abandon()  # (the connect may have finished in the same turn: its connection too)
        raise
    finally:
        failed.cancel()
    error = stream.exception()
    if connecting.done() or error is None:
        return await connecting
    abandon()
    raise _GivenUp(error)


def _unreachable(target: str, error: OSError, timeout: float) -> str:
    """The reason a destination's failed connect gives (the 502's and the log's)."""
    why = (
        f"timed out after {timeout:g}s"
        if isinstance(error, TimeoutError)
        else error.strerror or str(error)
    )
    return f"cannot reach {target}: {why}"


def _refuse(stream: MeshStream, status: int, reason: str) -> None:
    try:
        stream.refuse(status, reason)
    except TunnelError:
        stream.abort()
