"""The sans-IO model of one link direction: loss, rate limiter with drop-tail queue, delay line.

:class:`DirectionModel` never touches a device or a clock. It is fed packets with
:meth:`DirectionModel.submit` (``packet, now``), asked which packets are due with
:meth:`DirectionModel.deliver` (``now``) and when the next one will be due with
:meth:`DirectionModel.next_delivery_time`. All randomness comes from two
``random.Random`` instances seeded from the link seed and the direction name, one
for loss and one for jitter, so changing the jitter does not change which packets
are lost. The forwarder process (:mod:`quicmesh.netem.forwarder`) is a thin loop
around two of these.

The stages, in order, like a sender behind a bottleneck and then a long wire:

1. *Loss*: Bernoulli with probability ``loss``, or a Gilbert-Elliott chain.
2. *Rate limiter*: the bottleneck serialises one packet at a time at ``rate_bps``;
   a packet that arrives while it is busy waits in a FIFO bounded in packets or bytes
   (drop-tail: a packet that does not fit is dropped).
3. *Delay line*: after serialisation a packet is released ``delay`` (plus jitter)
   later. Without ``reorder`` a packet is never released before its predecessor.
"""

from __future__ import annotations

import collections
import enum
import heapq
import random
from dataclasses import dataclass

from quicmesh.netem.config import DirectionConfig

__all__ = ["DirectionModel", "DirectionStats", "PacketFate"]


class PacketFate(enum.Enum):
    """What :meth:`DirectionModel.submit` did with a packet."""

    SCHEDULED = "scheduled"
    """Accepted; it will be delivered later."""
    DROPPED_BY_LOSS = "dropped_by_loss"
    """Lost by the random (or bursty) loss model."""
    DROPPED_BY_QUEUE = "dropped_by_queue"
    """Dropped because the bottleneck queue was full."""


@dataclass
class DirectionStats:
    """Counters for one direction (all since the link came up)."""

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    dropped_by_loss: int = 0
    dropped_by_queue: int = 0
    dropped_by_device: int = 0
    """Packets the forwarder could not write to the receiving TUN (filled in by it)."""
    max_queue_packets: int = 0
    max_queue_bytes: int = 0

    @property
    def loss_fraction(self) -> float:
        """Fraction of packets in that the loss model dropped."""
        return self.dropped_by_loss / self.packets_in if self.packets_in else 0.0


class _GilbertElliott:
    """The state of a Gilbert-Elliott chain; one step per packet."""

    def __init__(
        self,
        p_good_to_bad: float,
        p_bad_to_good: float,
        loss_in_good: float,
        loss_in_bad: float,
        max_burst: int | None,
        rng: random.Random,
    ) -> None:
        self._p_good_to_bad = p_good_to_bad
        self._p_bad_to_good = p_bad_to_good
        self._loss_in_good = loss_in_good
        self._loss_in_bad = loss_in_bad
        self._max_burst = max_burst
        self._rng = rng
        self._bad = False
        self._run = 0

    def lose(self) -> bool:
        """Advance the chain by one packet; return whether that packet is lost."""
        if self._max_burst is not None and self._run >= self._max_burst:
            self._bad = False
        elif self._bad:
            if self._rng.random() < self._p_bad_to_good:
                self._bad = False
        elif self._rng.random() < self._p_good_to_bad:
            self._bad = True
        loss = self._loss_in_bad if self._bad else self._loss_in_good
        lost = self._rng.random() < loss
        self._run = self._run + 1 if lost else 0
        return lost


class DirectionModel:
    """Loss, rate limit with drop-tail queue and delay for one direction.

    :param config: what to apply.
    :param seed: seeds the loss and jitter generators (any ``random.seed`` value;
        the link passes ``"<seed>:<direction>"``).

    Times are seconds on any monotonic clock; successive calls must not go back in time.
    """

    def __init__(self, config: DirectionConfig, seed: int | str = 0) -> None:
        self.config = config
        self.stats = DirectionStats()
        self._loss_rng = random.Random(f"{seed}:loss")
        self._jitter_rng = random.Random(f"{seed}:jitter")
        burst = config.burst
        self._burst = (
            None
            if burst is None
            else _GilbertElliott(
                burst.p_good_to_bad,
                burst.p_bad_to_good,
                burst.loss_in_good,
                burst.loss_in_bad,
                burst.max_burst,
                self._loss_rng,
            )
        )
        limit = config.queue_limit
        self._queue_packet_limit = None if limit is None else limit.packets
        self._queue_byte_limit = None if limit is None else limit.bytes
        self._seconds_per_byte = None if config.rate_bps is None else 8.0 / config.rate_bps
        # Bottleneck: when it finishes the last scheduled packet, and the start times
        # and sizes of packets waiting for it (in order; start times never decrease).
        self._busy_until = float("-inf")
        self._waiting: collections.deque[tuple[float, int]] = collections.deque()
        self._waiting_bytes = 0
        # Delay line: a heap of (release time, sequence number, packet).
        self._delay_line: list[tuple[float, int, bytes]] = []
        self._sequence = 0
        self._last_release = float("-inf")

    @property
    def queue_packets(self) -> int:
        """Packets waiting for the bottleneck as of the last call."""
        return len(self._waiting)

    @property
    def queue_bytes(self) -> int:
        """Bytes waiting for the bottleneck as of the last call."""
        return self._waiting_bytes

    @property
    def in_flight(self) -> int:
        """Packets accepted and not yet delivered."""
        return len(self._delay_line)

    def submit(self, packet: bytes, now: float) -> PacketFate:
        """Offer a packet that arrived at ``now``; it is scheduled or dropped.

        :param packet: the packet (an IP datagram; only its length matters here).
        :param now: arrival time in seconds.
        """
        size = len(packet)
        stats = self.stats
        stats.packets_in += 1
        stats.bytes_in += size
        if self._lost():
            stats.dropped_by_loss += 1
            return PacketFate.DROPPED_BY_LOSS
        release = now
        if self._seconds_per_byte is not None:
            self._drain_waiting(now)
            if self._queue_full(size, now):
                stats.dropped_by_queue += 1
                return PacketFate.DROPPED_BY_QUEUE
            start = max(now, self._busy_until)
            self._busy_until = start + size * self._seconds_per_byte
            release = self._busy_until
            if start > now:
                self._waiting.append((start, size))
                self._waiting_bytes += size
                stats.max_queue_packets = max(stats.max_queue_packets, len(self._waiting))
                stats.max_queue_bytes = max(stats.max_queue_bytes, self._waiting_bytes)
        release += self._delay()
        if not self.config.reorder:
            release = max(release, self._last_release)
            self._last_release = release
        heapq.heappush(self._delay_line, (release, self._sequence, packet))
        self._sequence += 1
        return PacketFate.SCHEDULED

    def deliver(self, now: float) -> list[bytes]:
        """Remove and return the packets due at or before ``now``, in release order."""
        line = self._delay_line
        due: list[bytes] = []
        while line and line[0][0] <= now:
            due.append(heapq.heappop(line)[2])
        if due:
            self.stats.packets_out += len(due)
            self.stats.bytes_out += sum(map(len, due))
        self._drain_waiting(now)
        return due

    def next_delivery_time(self) -> float | None:
        """When the next packet is due, or ``None`` if nothing is in flight."""
        return self._delay_line[0][0] if self._delay_line else None

    def _lost(self) -> bool:
        if self._burst is not None:
            return self._burst.lose()
        loss = self.config.loss
        return loss > 0.0 and self._loss_rng.random() < loss

    def _delay(self) -> float:
        jitter = self.config.jitter
        if not jitter:
            return self.config.delay
        return max(0.0, self.config.delay + self._jitter_rng.uniform(-jitter, jitter))

    def _drain_waiting(self, now: float) -> None:
        waiting = self._waiting
        while waiting and waiting[0][0] <= now:
            self._waiting_bytes -= waiting.popleft()[1]

    def _queue_full(self, size: int, now: float) -> bool:
        if self._busy_until <= now:
            return False  # the bottleneck is idle: the packet starts at once
        if self._queue_packet_limit is not None and len(self._waiting) >= self._queue_packet_limit:
            return True
        return (
            self._queue_byte_limit is not None
            and self._waiting_bytes + size > self._queue_byte_limit
        )
