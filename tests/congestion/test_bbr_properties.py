"""Property tests: any sequence of packet events leaves the model usable."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from quicmesh.congestion.bbr import BbrModel

MSS = 1200


class BbrEvents(RuleBasedStateMachine):
    """Sends, ACKs, losses and discards in any order, with time moving forward."""

    def __init__(self) -> None:
        super().__init__()
        self.model = BbrModel(max_datagram_size=MSS, rng=random.Random(0))
        self.now = 0.0
        self.next_key = 0
        self.in_flight: dict[int, int] = {}

    @rule(dt=st.floats(min_value=0.0, max_value=2.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @rule(size=st.integers(min_value=1, max_value=MSS), count=st.integers(1, 20))
    def send(self, size: int, count: int) -> None:
        for _ in range(count):
            self.model.on_packet_sent(self.next_key, size=size, now=self.now)
            self.in_flight[self.next_key] = size
            self.next_key += 1

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data())
    def ack_some(self, data: st.DataObject) -> None:
        keys = data.draw(st.lists(st.sampled_from(sorted(self.in_flight)), max_size=10))
        for key in keys:
            self.model.on_packet_acked(key, now=self.now)
            self.in_flight.pop(key, None)

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data())
    def lose_some(self, data: st.DataObject) -> None:
        keys = data.draw(st.lists(st.sampled_from(sorted(self.in_flight)), max_size=10))
        self.model.on_packets_lost(keys, now=self.now)
        for key in keys:
            self.in_flight.pop(key, None)

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data())
    def discard_some(self, data: st.DataObject) -> None:
        keys = data.draw(st.lists(st.sampled_from(sorted(self.in_flight)), max_size=10))
        self.model.on_packets_discarded(keys)
        for key in keys:
            self.in_flight.pop(key, None)

    @rule(key=st.integers(min_value=-5, max_value=-1))
    def unknown_packet_events(self, key: int) -> None:
        self.model.on_packet_acked(key, now=self.now)
        self.model.on_packets_lost([key], now=self.now)
        self.model.on_packets_discarded([key])

    @rule()
    def persistent_congestion(self) -> None:
        self.model.on_persistent_congestion()

    @rule()
    def app_limited(self) -> None:
        self.model.mark_app_limited()

    @invariant()
    def window_and_rate_stay_usable(self) -> None:
        assert self.model.congestion_window >= self.model.minimum_window
        assert self.model.pacing_rate > 0
        assert math.isfinite(self.model.pacing_rate)
        assert self.model.bytes_in_flight == sum(self.in_flight.values())


BbrEvents.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_bbr_events = BbrEvents.TestCase


def test_loss_threshold_must_be_a_rate() -> None:
    with pytest.raises(ValueError, match="loss_threshold"):
        BbrModel(max_datagram_size=MSS, loss_threshold=0.0)
