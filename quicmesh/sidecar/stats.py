"""Counters the sidecar keeps per listener, cluster and endpoint.

Plain dataclasses that the listeners and clusters increment. They outlive a
reload (a cluster rebuilt under the same name keeps counting), and are the one
source of both ``/stats`` (JSON) and ``/metrics`` (Prometheus, see
:mod:`quicmesh.sidecar.metrics`).
"""

from __future__ import annotations

import bisect
import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..splice import IDLE_TIMEOUT_REASON
from .accesslog import FlowRecord, Outcome


class ClosedCounters(Counter[str]):
    """The counts of transports that closed, folded into one (:func:`retire_counters`)."""


def retire_counters(sources: list[Counter[str]], counters: Counter[str]) -> None:
    """A transport whose :attr:`~quicmesh.transport.base.Transport.counters` are among
    ``sources`` closed: its counts join one :class:`ClosedCounters` total at the front, so
    the sums stay and the list does not grow with every reload (it kept every transport
    a cluster or listener was ever rebuilt with)."""
    for index, source in enumerate(sources):
        if source is counters:
            del sources[index]
            break
    else:
        return
    if sources and isinstance(sources[0], ClosedCounters):
        sources[0].update(counters)
    else:
        sources.insert(0, ClosedCounters(counters))


def sum_counters(sources: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Transports' :attr:`~quicmesh.transport.base.Transport.counters` added up, key
    by key (every key any of them reports, in the order first seen)."""
    total: dict[str, int] = {}
    for counters in sources:
        for name, count in counters.items():
            total[name] = total.get(name, 0) + count
    return total


FLOW_DURATION_BUCKETS = (
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
"""Upper bounds, in seconds, of the flow-duration histogram's buckets: Envoy's default
histogram buckets (0.5 ms to an hour), as its ``downstream_cx_length_ms`` uses them."""


class DurationHistogram:
    """How long flows lasted, in :data:`FLOW_DURATION_BUCKETS` (Envoy's
    ``downstream_cx_length_ms``; a Prometheus histogram in ``/metrics``)."""

    def __init__(self) -> None:
        self._counts = [0] * (len(FLOW_DURATION_BUCKETS) + 1)  # the last one: above all
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(FLOW_DURATION_BUCKETS, seconds)
        self._counts[index] += 1
        self.sum += seconds
        self.count += 1

    def to_dict(self) -> dict[str, object]:
        """``buckets``: ``[upper bound, flows at most that long]`` pairs (cumulative, as
        Prometheus's ``le``), then ``sum`` (seconds) and ``count``."""
        cumulative, buckets = 0, []
        for bound, count in zip(FLOW_DURATION_BUCKETS, self._counts, strict=False):
            cumulative += count
            buckets.append([bound, cumulative])
        return {"buckets": buckets, "sum": round(self.sum, 6), "count": self.count}


MovedSoFar = Callable[[], tuple[int, int]]
"""A running flow's bytes so far, in its stream's terms: (to the stream, from it)."""


class LiveBytes:
    """The bytes running flows moved so far, so that byte counters move as the bytes
    do (Envoy counts ``downstream_cx_rx_bytes_total`` and its kin as it reads, not at a
    flow's end: a flow of an hour showed nothing for an hour, then all at once).

    Each running flow is a poll, read at each ``/stats`` or scrape; a flow's reading
    never goes below its last one (an engine's count leaves with its splice a moment
    before the flow's end is counted), and its owner counts the flow's totals in the
    same step as it drops the poll, so a counter never goes down."""

    def __init__(self) -> None:
        self._flows: dict[int, tuple[MovedSoFar, list[int]]] = {}

    def add(self, flow: object, moved: MovedSoFar) -> None:
        """Count ``flow``'s bytes as ``moved`` reports them until :meth:`discard`
        (``flow`` is any object that lives as long, compared by identity)."""
        self._flows[id(flow)] = (moved, [0, 0])

    def discard(self, flow: object) -> tuple[int, int]:
        """Stop counting ``flow``; its last reading, (to the stream, from it), read once
        more now (a flow that ended by an exception, whose totals are not counted, still
        counts what it moved, and no counter goes down)."""
        entry = self._flows.pop(id(flow), None)
        if entry is None:
            return 0, 0
        moved, last = entry
        with contextlib.suppress(Exception):  # (an engine gone: its last reading stands)
            now = moved()
            return max(last[0], now[0]), max(last[1], now[1])
        return last[0], last[1]

    def totals(self) -> tuple[int, int]:
        """(to the streams, from them) over the running flows."""
        to_stream = from_stream = 0
        for moved, last in self._flows.values():
            now = moved()
            last[0], last[1] = max(last[0], now[0]), max(last[1], now[1])
            to_stream += last[0]
            from_stream += last[1]
        return to_stream, from_stream

    def __len__(self) -> int:
        return len(self._flows)


@dataclass
class ListenerStats:
    """One listener's counters.

    For an outbound listener a *connection* is a local client's TCP connection and
    a *stream* the tunnel stream opened for it; for the inbound listener a *stream*
    is a flow from a peer sidecar and a *connection* the TCP connection to its
    destination.
    """

    name: str
    kind: str
    connections_total: int = 0
    connections_active: int = 0
    streams_total: int = 0
    streams_active: int = 0
    bytes_received: int = 0
    """Bytes from the downstream side (local client, or peer sidecar), of the flows that
    ended (:meth:`to_dict` adds the running flows' :attr:`live` bytes)."""
    bytes_sent: int = 0
    """Bytes to the downstream side, of the flows that ended."""
    live: LiveBytes = field(default_factory=LiveBytes)
    """The running flows' bytes so far."""
    streams_spliced: int = 0
    """Flows whose bytes the QUIC engine copied itself (``splice``), not the sidecar."""
    engine_flows: int = 0
    """Flows the native engine ran from accept to end (outbound) or from the CONNECT
    to the end (inbound), the CONNECT exchange included, Python only deciding, counting
    and logging them."""
    engine_flows_returned: int = 0
    """(outbound) Flows the engine started that came back to the sidecar without their
    plain 200 (a refusal, a reset, no answer in time), which then opened them again."""
    idle_timeouts: int = 0
    """Flows this listener reset for its ``flow_idle_timeout`` (Envoy's tcp_proxy
    ``idle_timeout`` counter)."""
    outcomes: Counter[str] = field(default_factory=Counter)
    flow_durations: DurationHistogram = field(default_factory=DurationHistogram)
    """How long the flows that ended lasted (those the listener took: not refusals
    before a flow began)."""
    quic_counters: list[Counter[str]] = field(default_factory=list)
    """(inbound) The :attr:`~quicmesh.transport.base.Transport.counters` of every
    transport this listener served with that counts (QUIC), across reloads: tickets,
    migrations, path validations, admission events."""
    overload: Callable[[], dict[str, object]] | None = None
    """(inbound) A view of the listener's limits and overload state (:mod:`.overload`)."""

    def flow_ended(
        self,
        outcome: Outcome,
        bytes_received: int,
        bytes_sent: int,
        reason: str = "",
        *,
        flow: object = None,
        duration: float | None = None,
    ) -> None:
        """Count a finished flow (``reason``: why it did not complete, if it did not;
        ``flow``: its key in :attr:`live`, if it was there; ``duration``: how long it
        lasted, seconds, for :attr:`flow_durations`)."""
        seen_received, seen_sent = self._downstream_terms(*self.live.discard(flow))
        self.outcomes[outcome.value] += 1
        if duration is not None:
            self.flow_durations.observe(duration)
        if outcome is Outcome.RESET and reason.startswith(IDLE_TIMEOUT_REASON):
            self.idle_timeouts += 1
        # (Its totals, or more where its running count showed more: a flow abandoned by
        # an exception has no totals, and its bytes were not to vanish from the counter.)
        self.bytes_received += max(bytes_received, seen_received)
        self.bytes_sent += max(bytes_sent, seen_sent)

    def flow_logged(self, record: FlowRecord) -> None:
        """Count the flow ``record`` describes, now it ended (:meth:`flow_ended` with its
        outcome, bytes, reason and duration; ``record`` was its key in :attr:`live`).
        Its ``bytes_sent`` went towards the destination: received from the downstream
        side, on either kind of listener."""
        self.flow_ended(
            record.outcome,
            record.bytes_sent,
            record.bytes_received,
            record.reason,
            flow=record,
            duration=record.duration,
        )

    def _downstream_terms(self, to_stream: int, from_stream: int) -> tuple[int, int]:
        """A flow's (to the stream, from it) as (received from, sent to) the downstream
        side: on an inbound listener the downstream side is the peer, at the stream."""
        if self.kind.endswith("inbound"):
            return from_stream, to_stream
        return to_stream, from_stream

    def moved(self) -> tuple[int, int]:
        """(bytes received, bytes sent) from and to the downstream side, running flows'
        bytes so far included."""
        received, sent = self._downstream_terms(*self.live.totals())
        return self.bytes_received + received, self.bytes_sent + sent

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly view (``quic`` only for a listener that served QUIC)."""
        bytes_received, bytes_sent = self.moved()
        view: dict[str, object] = {
            "kind": self.kind,
            "connections_total": self.connections_total,
            "connections_active": self.connections_active,
            "streams_total": self.streams_total,
            "streams_active": self.streams_active,
            "bytes_received": bytes_received,
            "bytes_sent": bytes_sent,
            "streams_spliced": self.streams_spliced,
            "engine_flows": self.engine_flows,
            "engine_flows_returned": self.engine_flows_returned,
            "idle_timeouts": self.idle_timeouts,
            "outcomes": dict(self.outcomes),
            "flow_duration_seconds": self.flow_durations.to_dict(),
        }
        if self.quic_counters:
            view["quic"] = sum_counters(self.quic_counters)
        if self.overload is not None:
            view["overload"] = self.overload()
        return view


@dataclass
class EndpointStats:
    """One endpoint's counters within a cluster."""

    streams_total: int = 0
    streams_active: int = 0
    connect_failures: int = 0
    ejections: int = 0
    connections_total: int = 0


@dataclass
class ClusterStats:
    """One cluster's counters."""

    name: str
    connections_total: int = 0
    streams_total: int = 0
    streams_active: int = 0
    bytes_sent: int = 0
    """Bytes sent into the tunnel by the flows that ended (see :meth:`moved`)."""
    bytes_received: int = 0
    """Bytes received from the tunnel by the flows that ended."""
    live: LiveBytes = field(default_factory=LiveBytes)
    """The running flows' bytes so far."""
    connect_failures: int = 0
    retries: int = 0
    overflows: Counter[str] = field(default_factory=Counter)
    connections_by_transport: Counter[str] = field(default_factory=Counter)
    """Peer connections opened, by the transport that carried them (``quic`` or
    ``h2`` for an ``auto`` cluster)."""
    quic_counters: list[Counter[str]] = field(default_factory=list)
    """The :attr:`~quicmesh.transport.base.Transport.counters` of every transport the
    cluster dialled with that counts (QUIC, auto), across reloads: 0-RTT, tickets,
    migrations, path validations."""
    outcomes: Counter[str] = field(default_factory=Counter)
    endpoints: dict[str, EndpointStats] = field(default_factory=dict)
    handshake_failures: Counter[str] = field(default_factory=Counter)
    """Connections the cluster could not make because a TLS handshake failed, by reason."""
    panic_flows: int = 0
    """Flows balanced over every endpoint, health ignored (panic mode; Envoy's
    ``lb_healthy_panic``)."""

    def moved(self) -> tuple[int, int]:
        """(bytes sent into the tunnel, bytes received from it), running flows' bytes so
        far included."""
        to_stream, from_stream = self.live.totals()
        return self.bytes_sent + to_stream, self.bytes_received + from_stream

    def endpoint(self, name: str) -> EndpointStats:
        """The counters of endpoint ``name`` (``host:port``), created on first use."""
        if name not in self.endpoints:
            self.endpoints[name] = EndpointStats()
        return self.endpoints[name]
