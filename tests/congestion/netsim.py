"""A tiny deterministic network simulator for driving :class:`BbrModel`.

One sender paces packets at the model's rate and within its window into a
bottleneck link: seeded random (non-congestive) loss, then a FIFO queue bounded
in bytes (tail drop) drained at a fixed rate, then a fixed propagation delay
there and back. Every delivered packet is acknowledged individually; a packet is
declared lost once a packet sent three later is acknowledged (RFC 9002's packet
threshold), or after a timeout when nothing else is left to acknowledge.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from quicmesh.congestion.bbr import BbrModel, BbrState

PACKET_THRESHOLD = 3


@dataclass(frozen=True)
class Link:
    """A bottleneck: rate in bytes/s, two-way propagation delay, queue size, loss.

    ``ack_jitter`` delays each acknowledgement by up to that many seconds (in 6 steps),
    as delayed ACKs do, without reordering them.
    """

    rate: float = 20e6 / 8
    rtt: float = 0.040
    queue_seconds: float = 0.060
    loss: float = 0.0
    ack_jitter: float = 0.0005
    seed: int = 1

    @property
    def queue_bytes(self) -> float:
        return self.rate * self.queue_seconds

    @property
    def bdp(self) -> float:
        return self.rate * self.rtt


@dataclass
class Trace:
    """What happened during a run."""

    link: Link
    duration: float
    model: BbrModel
    acked: list[tuple[float, int]] = field(default_factory=list)
    """(ack time, bytes) per acknowledged packet."""
    queue_delays: list[tuple[float, float]] = field(default_factory=list)
    """(enqueue time, queueing delay) per packet that entered the queue."""
    states: list[tuple[float, BbrState]] = field(default_factory=list)
    """(time, new state) at each state change, starting with the initial state."""
    bw_estimates: list[tuple[float, float]] = field(default_factory=list)
    """(time, model.bw) after an acknowledgement, every 10 ms."""
    windows: list[tuple[float, BbrState, int]] = field(default_factory=list)
    """(time, state, model.congestion_window) after each event."""
    inflight_hi_changes: list[tuple[float, BbrState, float]] = field(default_factory=list)
    """(time, state, model.inflight_hi) each time the long-term bound changed."""

    def goodput(self, start: float, end: float | None = None) -> float:
        """Acknowledged bytes per second between ``start`` and ``end``."""
        end = self.duration if end is None else end
        total = sum(size for t, size in self.acked if start <= t < end)
        return total / (end - start)

    def entered(self, state: BbrState) -> list[float]:
        """The times the model entered ``state``."""
        return [t for t, s in self.states if s is state]

    def queue_delays_between(self, start: float, end: float) -> list[float]:
        return [d for t, d in self.queue_delays if start <= t < end]


def simulate(
    link: Link,
    duration: float,
    *,
    packet_size: int = 1200,
    model: BbrModel | None = None,
    model_seed: int = 7,
) -> Trace:
    """Run one bulk flow over ``link`` for ``duration`` simulated seconds."""
    if model is None:
        model = BbrModel(max_datagram_size=packet_size, rng=random.Random(model_seed))
    trace = Trace(link=link, duration=duration, model=model)
    trace.states.append((0.0, model.state))
    rng = random.Random(link.seed)
    serialization = packet_size / link.rate

    now = 0.0
    next_pn = 0
    next_send = 0.0
    link_free_at = 0.0
    last_ack_at = 0.0
    largest_acked = -1
    acks: deque[tuple[float, int]] = deque()  # FIFO link and fixed delay: in order
    outstanding: deque[int] = deque()
    sent_time: dict[int, float] = {}
    acked: set[int] = set()
    last_bw_sample = -1.0
    state = model.state
    inflight_hi = model.inflight_hi

    while now < duration:
        can_send = model.bytes_in_flight + packet_size <= model.congestion_window
        t_send = max(next_send, now) if can_send else math.inf
        t_ack = acks[0][0] if acks else math.inf
        if acks and t_ack <= t_send:
            now, pn = acks.popleft()
            model.on_packet_acked(pn, now=now)
            trace.acked.append((now, packet_size))
            acked.add(pn)
            largest_acked = max(largest_acked, pn)
            lost: list[int] = []
            while outstanding and (
                outstanding[0] in acked or outstanding[0] <= largest_acked - PACKET_THRESHOLD
            ):
                old = outstanding.popleft()
                del sent_time[old]
                if old in acked:
                    acked.discard(old)
                else:
                    lost.append(old)
            if lost:
                model.on_packets_lost(lost, now=now)
            if now - last_bw_sample >= 0.010:
                trace.bw_estimates.append((now, model.bw))
                last_bw_sample = now
        elif t_send < math.inf:
            now = t_send
            pn = next_pn
            next_pn += 1
            model.on_packet_sent(pn, size=packet_size, now=now)
            outstanding.append(pn)
            sent_time[pn] = now
            next_send = now + packet_size / model.pacing_rate
            if rng.random() >= link.loss:
                backlog = max(link_free_at - now, 0.0)
                if backlog * link.rate + packet_size <= link.queue_bytes:
                    start = max(link_free_at, now)
                    link_free_at = start + serialization
                    trace.queue_delays.append((now, start - now))
                    ack_at = link_free_at + link.rtt + rng.randrange(6) * link.ack_jitter / 5
                    last_ack_at = max(last_ack_at, ack_at)
                    acks.append((last_ack_at, pn))
        elif outstanding:
            # Window full and nothing left to acknowledge: a tail loss timeout.
            now = max(now, sent_time[outstanding[0]] + 3 * link.rtt)
            lost = [pn for pn in outstanding if pn not in acked]
            outstanding.clear()
            sent_time.clear()
            model.on_packets_lost(lost, now=now)
        else:
            raise AssertionError("the model allows no packet with nothing in flight")
        trace.windows.append((now, model.state, model.congestion_window))
        if model.inflight_hi != inflight_hi:
            inflight_hi = model.inflight_hi
            trace.inflight_hi_changes.append((now, model.state, inflight_hi))
        if model.state is not state:
            state = model.state
            trace.states.append((now, state))
    return trace
