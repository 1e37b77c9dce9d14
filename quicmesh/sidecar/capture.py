"""Capture listeners: TCP connections that ``quicmesh intercept`` rules redirected.

The outbound capture listener (port 15001 by default) reads each connection's
original destination (:mod:`.origdst`), asks the :class:`~.destinations.DestinationTable`
where it goes and either carries it through a cluster (the same path as an
explicit outbound listener, :func:`~.outbound.proxy_to_cluster`), connects it
directly (``passthrough``), or resets it (``registry_only``, counted). The
inbound capture listener (15006) connects each captured inbound connection to
its original destination on this host. A connection that was not redirected
(no NAT record: someone dialled the capture port itself) is reset, so nothing
loops. Every flow's access-log line carries ``original_destination``; the counts
per original destination and route are in ``/stats`` and ``/metrics``.

The sidecar's own connections (to peers, passthrough and inbound destinations)
are kept out of the rules by its user or group ID (see docs/interception.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable

from .._timeouts import wait_within
from ..errors import os_error_text
from ..logs import RateLimitedLog
from ..splice import FlowIdle, idle_watch, run_copies, unwritten_bytes
from .accesslog import FlowRecord, Outcome
from .cluster import Cluster
from .config import Address, InterceptConfig, format_address
from .destinations import DestinationTable, Route, RouteKind
from .flows import FlowTracker
from .origdst import normalise, original_destination
from .outbound import proxy_to_cluster, reset_connection
from .stats import ListenerStats

logger = logging.getLogger("quicmesh.sidecar.capture")

_OWN_CONNECTS: dict[int, Address] = {}
"""The sidecar's own direct connections being made or open: local port -> destination.
The rules exempt the sidecar's user or group; a sidecar started without it has its own
connections captured again, each one dialling once more (a passthrough flow opened
thousands of connections a second until descriptors ran out): such a connection is
recognised by its source port and destination and refused."""

_CONNECTING: dict[Address, set[int]] = {}
"""The sidecar's own direct connects under way (their ports not known yet): their numbers,
by destination."""
_CONNECT_NUMBERS = itertools.count()
_SETTLED: list[asyncio.Future[None]] = []
"""Captured connections waiting for those connects to learn their ports."""

_LOOP_LOG = RateLimitedLog(logger)

OUTBOUND_NAME = "intercept_outbound"
"""The outbound capture listener's name in the access log, ``/stats`` and ``/metrics``."""
INBOUND_NAME = "intercept_inbound"
"""The inbound capture listener's name."""
MAX_DESTINATIONS = 1024
"""Distinct original destinations counted by name; later ones are counted as ``other``."""
_CHUNK = 64 * 1024


class DestinationCounts:
    """Flows per (direction, original destination, route), with bounded label cardinality."""

    def __init__(self, limit: int = MAX_DESTINATIONS) -> None:
        self.limit = limit
        self.flows: Counter[tuple[str, str, str]] = Counter()
        self._seen: set[str] = set()

    def count(self, direction: str, destination: str, route: str) -> None:
        """Count one flow."""
        if destination not in self._seen:
            if len(self._seen) >= self.limit:
                destination = "other"
            else:
                self._seen.add(destination)
        self.flows[(direction, destination, route)] += 1

    def to_list(self) -> list[dict[str, object]]:
        """A JSON-friendly view for ``/stats``."""
        return [
            {"direction": d, "original_destination": dst, "route": r, "flows": n}
            for (d, dst, r), n in sorted(self.flows.items())
        ]


def _is_own_connect(peer: tuple[object, ...], destination: Address) -> bool:
    """Whether a captured connection from ``peer`` to ``destination`` is one the sidecar
    made itself (:data:`_OWN_CONNECTS`): from one of its source ports, to the destination
    that connection dials."""
    port = peer[1] if len(peer) > 1 else None
    return isinstance(port, int) and _OWN_CONNECTS.get(port) == normalise(destination)


async def _own_connects_settled(destination: Address) -> None:
    """Wait while one of the sidecar's own connects to ``destination`` has not learnt its
    source port yet: a captured connection may be that one (the kernel completes the
    handshake with the capture listener before either side's task runs)."""
    destination = normalise(destination)
    pending = set(_CONNECTING.get(destination, ()))  # those under way now, not later ones
    while pending & _CONNECTING.get(destination, set()):
        settled = asyncio.get_running_loop().create_future()
        _SETTLED.append(settled)
        await settled


def _log_loop(listener: str, reason: str) -> None:
    """One WARNING (at most every 10 s) for the sidecar's own connections captured."""
    _LOOP_LOG.log(
        logging.WARNING,
        "loop",
        "%s: %s (quicmesh intercept install --proxy-uid/--proxy-gid, 1337 by default; "
        "docs/interception.md)",
        listener,
        reason,
    )


def _settle() -> None:
    """An own connect learnt its source port, or failed: the waiters look again."""
    waiters = list(_SETTLED)
    _SETTLED.clear()
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


class _CaptureListener:
    """What both capture listeners share: binding on every address, records, counting."""

    name = ""
    direction = ""

    def __init__(
        self,
        config: InterceptConfig,
        stats: ListenerStats,
        flows: FlowTracker,
        counts: DestinationCounts,
        log: Callable[[FlowRecord], None],
    ) -> None:
        self.config = config
        self.stats = stats
        self.counts = counts
        self._flows = flows
        self._log = log
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port this listener binds (on every IPv4 and IPv6 address)."""
        raise NotImplementedError

    async def start(self) -> None:
        """Bind the port on every address (IPv4 and IPv6).

        :raises OSError: the port cannot be bound.
        """
        self._server = await asyncio.start_server(self._handle, None, self.port, reuse_address=True)

    def close(self) -> None:
        """Stop accepting; flows already accepted carry on."""
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._flows.track():
            start, started = time.time(), time.monotonic()
            peer = writer.get_extra_info("peername")
            record = FlowRecord(
                start=start,
                duration=0.0,
                listener=self.name,
                direction=self.direction,
                downstream=format_address((peer[0], peer[1])) if peer else "",
                target="",
                transport="",
                peer_identity="",
                endpoint="",
                bytes_sent=0,
                bytes_received=0,
                outcome=Outcome.COMPLETED,
            )
            self.stats.connections_total += 1
            self.stats.connections_active += 1
            route = ""
            try:
                sock = writer.get_extra_info("socket")
                destination = original_destination(sock) if sock is not None else None
                if destination is not None and peer:
                    await _own_connects_settled(destination)
                if destination is not None and peer and _is_own_connect(peer, destination):
                    record.original_destination = format_address(destination)
                    record.outcome = Outcome.REFUSED
                    record.reason = (
                        f"the sidecar's own connection to {format_address(destination)} was "
                        "captured: run it with the user or group the intercept rules exempt"
                    )
                    route = "loop"
                    _log_loop(self.name, record.reason)
                    reset_connection(writer)
                    return
                if destination is None or self._is_own_port(destination):
                    record.outcome = Outcome.REFUSED
                    record.reason = (
                        "not a redirected connection (no original destination): "
                        f"port {self.port} only takes traffic the intercept rules send"
                    )
                    route = "not_redirected"
                    reset_connection(writer)
                    return
                record.original_destination = format_address(destination)
                route = await self._serve(destination, reader, writer, record)
            finally:
                self.stats.connections_active -= 1
                record.duration = time.monotonic() - started
                self.stats.flow_logged(record)
                self.counts.count(self.direction, record.original_destination or "none", route)
                self._log(record)

    def _is_own_port(self, destination: Address) -> bool:
        ports = {self.config.outbound_port, self.config.inbound_port}
        return destination[1] in ports

    async def _serve(
        self,
        destination: Address,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: FlowRecord,
    ) -> str:
        raise NotImplementedError

    async def _direct(
        self,
        destination: Address,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: FlowRecord,
    ) -> None:
        """Connect to ``destination`` ourselves and copy bytes both ways."""
        record.target = record.endpoint = format_address(destination)
        record.transport = "direct"
        timeout = self.config.connect_timeout
        port = None
        dialled = normalise(destination)
        number = next(_CONNECT_NUMBERS)
        _CONNECTING.setdefault(dialled, set()).add(number)
        try:
            up_reader, up_writer = await wait_within(asyncio.open_connection(*destination), timeout)
            port = up_writer.get_extra_info("sockname")[1]
            _OWN_CONNECTS[port] = dialled
        except (OSError, TimeoutError) as exc:
            why = (
                f"timed out after {timeout:g}s"
                if isinstance(exc, TimeoutError)
                else os_error_text(exc)
            )
            record.outcome = Outcome.UNREACHABLE
            record.reason = f"cannot reach {record.target}: {why or exc}"
            reset_connection(writer)
            return
        finally:
            under_way = _CONNECTING[dialled]
            under_way.discard(number)
            if not under_way:
                del _CONNECTING[dialled]
            _settle()
        self.stats.streams_total += 1
        self.stats.streams_active += 1
        counts = [0, 0]  # (downstream to destination, back): read while the flow runs
        if self.direction == "inbound":  # the downstream side is the peer, the "stream"
            self.stats.live.add(record, lambda: (counts[1], counts[0]))
        else:
            self.stats.live.add(record, lambda: (counts[0], counts[1]))
        try:
            sent, received, error = await pipe(
                reader,
                writer,
                up_reader,
                up_writer,
                idle_timeout=self.config.flow_idle_timeout,
                counts=counts,
            )
        finally:
            self.stats.streams_active -= 1
            _OWN_CONNECTS.pop(port, None)
        record.bytes_sent, record.bytes_received = sent, received
        if error:
            record.outcome, record.reason = Outcome.RESET, error


class CaptureOutboundListener(_CaptureListener):
    """Routes captured outbound connections by their original destination.

    :param config: the ``intercept`` section (its ``outbound_policy`` is read from
        the table, which the runtime rebuilds on every reload).
    :param table: returns the current destination table.
    :param clusters: looks up the current cluster by name.
    """

    name = OUTBOUND_NAME
    direction = "outbound"

    def __init__(
        self,
        config: InterceptConfig,
        table: Callable[[], DestinationTable],
        clusters: Callable[[str], Cluster],
        stats: ListenerStats,
        flows: FlowTracker,
        counts: DestinationCounts,
        log: Callable[[FlowRecord], None],
    ) -> None:
        super().__init__(config, stats, flows, counts, log)
        self._table = table
        self._clusters = clusters

    @property
    def port(self) -> int:
        """The outbound capture port."""
        return self.config.outbound_port

    async def _serve(
        self,
        destination: Address,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: FlowRecord,
    ) -> str:
        route: Route = self._table().route(destination)
        if route.kind is RouteKind.CLUSTER:
            cluster = self._clusters(route.cluster)
            record.target = route.target or cluster.config.target or ""
            record.transport = cluster.config.transport
            try:
                await proxy_to_cluster(
                    cluster,
                    reader,
                    writer,
                    record,
                    self.stats,
                    target=route.target,
                    endpoint=route.endpoint,
                    idle_timeout=self.config.flow_idle_timeout,
                )
            finally:
                cluster.stats.outcomes[record.outcome.value] += 1
        elif route.kind is RouteKind.PASSTHROUGH:
            await self._direct(destination, reader, writer, record)
        elif route.kind is RouteKind.TUNNEL:
            record.outcome = Outcome.REFUSED
            record.reason = (
                f"a connection to {format_address(destination)}, a peer sidecar's tunnel "
                "address, was captured: the sidecar's own, run it with the user or group "
                "the intercept rules exempt"
            )
            _log_loop(self.name, record.reason)
            reset_connection(writer)
        else:
            record.outcome = Outcome.REFUSED
            record.reason = (
                f"registry_only: {format_address(destination)} is not a service or endpoint "
                "of any cluster"
            )
            reset_connection(writer)
        return route.name


class CaptureInboundListener(_CaptureListener):
    """Connects captured inbound connections to their original destination on this host."""

    name = INBOUND_NAME
    direction = "inbound"

    @property
    def port(self) -> int:
        """The inbound capture port."""
        assert self.config.inbound_port is not None
        return self.config.inbound_port

    async def _serve(
        self,
        destination: Address,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: FlowRecord,
    ) -> str:
        await self._direct(normalise(destination), reader, writer, record)
        return "local"


async def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    *,
    idle_timeout: float | None = None,
    counts: list[int] | None = None,
) -> tuple[int, int, str]:
    """Copy bytes both ways between two TCP connections, with half-close.

    Returns (bytes downstream to upstream, bytes upstream to downstream, error).
    On an error, or once no byte moved either way for ``idle_timeout`` seconds (None:
    never), both connections are reset. ``counts``, if given, is counted into as the
    bytes move (the same two numbers), for the caller to read meanwhile.
    """
    if counts is None:
        counts = [0, 0]

    def handed_off() -> int:
        return sum(counts) - unwritten_bytes(up_writer) - unwritten_bytes(writer)

    moved, idle_watchers = idle_watch(idle_timeout, handed_off)

    async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter, index: int) -> None:
        while data := await source.read(_CHUNK):
            moved()
            counts[index] += len(data)
            sink.write(data)
            await sink.drain()
            moved()
        if sink.can_write_eof():
            sink.write_eof()

    error = ""
    try:
        await run_copies([copy(reader, up_writer, 0), copy(up_reader, writer, 1)], idle_watchers)
    except (OSError, ConnectionError, FlowIdle) as exc:
        error = str(exc) or type(exc).__name__
    if error:
        reset_connection(writer)
        reset_connection(up_writer)
    else:
        up_writer.close()
        writer.close()
    return counts[0], counts[1], error
