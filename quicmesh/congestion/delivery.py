"""Per-packet delivery state and delivery-rate samples, sans-IO.

This is the rate-sampling algorithm that BBR relies on (draft-ietf-ccwg-bbr-01,
section 4.5, after draft-cheng-iccrg-delivery-rate-estimation). aioquic keeps no
such state, so it lives here, keyed by whatever identifies a packet to the caller
(the aioquic adaptor uses ``(epoch, packet_number)``).

When a packet is sent, the sampler records the connection's delivery counters in
it; when the packet is acknowledged, the difference between the counters now and
then, over the longer of the send and ACK intervals, is one delivery-rate sample.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(slots=True)
class PacketDeliveryState:
    """What the sampler remembers about one packet in flight.

    :param size: bytes the packet occupies in flight.
    :param sent_time: when it was sent.
    :param delivered: connection bytes delivered when it was sent.
    :param delivered_time: when ``delivered`` last grew, as of sending.
    :param first_sent_time: send time of the packet that started this sending interval.
    :param is_app_limited: whether the sender was application-limited when it was sent.
    :param tx_in_flight: bytes in flight just after it was sent (including itself).
    :param lost: connection bytes lost when it was sent.
    """

    size: int
    sent_time: float
    delivered: int
    delivered_time: float
    first_sent_time: float
    is_app_limited: bool
    tx_in_flight: int
    lost: int


@dataclass(slots=True)
class RateSample:
    """One delivery-rate sample, taken when a packet is acknowledged.

    :param delivery_rate: bytes per second over ``interval``; 0.0 when ``is_valid`` is false.
    :param is_valid: false when the interval was shorter than the path's minimum RTT,
        which would overestimate the rate (ACK compression), or than a microsecond,
        the resolution of RTT samples (no rate can be told from a shorter one).
    :param is_app_limited: the packet was sent while the sender was application-limited,
        so the sample may underestimate the path.
    :param interval: the longer of the send and ACK intervals, seconds.
    :param delivered: bytes delivered over ``interval``.
    :param prior_delivered: connection bytes delivered when the packet was sent.
    :param newly_acked: bytes this acknowledgement delivered.
    :param lost: bytes declared lost between sending and acknowledging the packet.
    :param tx_in_flight: bytes in flight when the packet was sent.
    :param rtt: acknowledgement time minus send time, seconds.
    """

    delivery_rate: float
    is_valid: bool
    is_app_limited: bool
    interval: float
    delivered: int
    prior_delivered: int
    newly_acked: int
    lost: int
    tx_in_flight: int
    rtt: float


class DeliveryRateSampler:
    """Connection-wide delivery counters and the per-packet state behind rate samples.

    :param now: the time the connection starts, seconds.
    """

    def __init__(self, *, now: float = 0.0) -> None:
        self.delivered = 0
        """Bytes acknowledged so far."""
        self.delivered_time = now
        """When ``delivered`` last grew."""
        self.first_sent_time = now
        self.lost = 0
        """Bytes declared lost so far."""
        self.bytes_in_flight = 0
        """Bytes sent and neither acknowledged, lost nor discarded."""
        self.app_limited_until = 0
        """Nonzero while application-limited: the ``delivered`` value at which that ends."""
        self.min_rtt = math.inf
        """The smallest RTT seen over the connection's lifetime."""
        self._packets: dict[Hashable, PacketDeliveryState] = {}

    def __len__(self) -> int:
        return len(self._packets)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._packets

    def mark_app_limited(self) -> None:
        """Note that the sender has less to send than the model allows.

        Packets sent until everything now in flight is delivered are marked
        application-limited, so their low rates do not lower the model's bandwidth.
        """
        self.app_limited_until = (self.delivered + self.bytes_in_flight) or 1

    def on_packet_sent(self, key: Hashable, *, size: int, now: float) -> PacketDeliveryState:
        """Record the delivery state of a packet being sent.

        :param key: identifies the packet until it is acknowledged, lost or discarded.
        :param size: bytes it counts in flight.
        :param now: the send time.
        """
        if self.bytes_in_flight == 0:
            self.first_sent_time = now
            self.delivered_time = now
        self.bytes_in_flight += size
        state = PacketDeliveryState(
            size=size,
            sent_time=now,
            delivered=self.delivered,
            delivered_time=self.delivered_time,
            first_sent_time=self.first_sent_time,
            is_app_limited=self.app_limited_until != 0,
            tx_in_flight=self.bytes_in_flight,
            lost=self.lost,
        )
        self._packets[key] = state
        return state

    def on_packet_acked(self, key: Hashable, *, now: float) -> RateSample | None:
        """Account for an acknowledged packet and return its rate sample.

        Returns ``None`` for a packet the sampler does not know (already
        acknowledged, declared lost or discarded).
        """
        packet = self._packets.pop(key, None)
        if packet is None:
            return None
        self.bytes_in_flight -= packet.size
        self.delivered += packet.size
        self.delivered_time = now
        self.first_sent_time = packet.sent_time
        if self.app_limited_until and self.delivered > self.app_limited_until:
            self.app_limited_until = 0

        # Microsecond resolution, as in Linux: float noise must not pass for a new minimum.
        rtt = max(round(now - packet.sent_time, 6), 0.0)
        self.min_rtt = min(self.min_rtt, rtt)
        send_elapsed = packet.sent_time - packet.first_sent_time
        ack_elapsed = now - packet.delivered_time
        interval = max(send_elapsed, ack_elapsed)
        delivered = self.delivered - packet.delivered
        # Shorter than the clock's resolution (as RTTs are rounded) is no interval at all.
        is_valid = interval >= max(self.min_rtt, 1e-6)
        return RateSample(
            delivery_rate=delivered / interval if is_valid else 0.0,
            is_valid=is_valid,
            is_app_limited=packet.is_app_limited,
            interval=interval,
            delivered=delivered,
            prior_delivered=packet.delivered,
            newly_acked=packet.size,
            lost=self.lost - packet.lost,
            tx_in_flight=packet.tx_in_flight,
            rtt=rtt,
        )

    def on_packet_lost(self, key: Hashable) -> PacketDeliveryState | None:
        """Account for a packet declared lost and return what was recorded for it."""
        packet = self._packets.pop(key, None)
        if packet is not None:
            self.bytes_in_flight -= packet.size
            self.lost += packet.size
        return packet

    def on_packet_discarded(self, key: Hashable) -> None:
        """Forget a packet that left flight without a verdict (its space was discarded,
        or it was retransmitted on a probe timeout)."""
        packet = self._packets.pop(key, None)
        if packet is not None:
            self.bytes_in_flight -= packet.size
