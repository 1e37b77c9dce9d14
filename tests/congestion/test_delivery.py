"""Delivery-rate samples and the windowed max filter."""

from __future__ import annotations

import pytest

from quicmesh.congestion.delivery import DeliveryRateSampler
from quicmesh.congestion.filters import WindowedMaxFilter


def test_steady_flow_samples_its_rate() -> None:
    # 1000 bytes every 1 ms, each acknowledged 50 ms later: 1 MB/s.
    sampler = DeliveryRateSampler()
    samples = []
    for i in range(200):
        sampler.on_packet_sent(i, size=1000, now=i * 0.001)
        if i >= 50:
            rs = sampler.on_packet_acked(i - 50, now=i * 0.001)
            assert rs is not None
            samples.append(rs)
    late = [rs for rs in samples[60:] if rs.is_valid]
    assert late
    assert all(rs.delivery_rate == pytest.approx(1e6, rel=0.03) for rs in late)
    assert all(rs.rtt == pytest.approx(0.050) for rs in samples)
    assert sampler.bytes_in_flight == 50 * 1000


def test_first_sample_spans_the_round_trip() -> None:
    sampler = DeliveryRateSampler(now=0.0)
    sampler.on_packet_sent("a", size=1000, now=0.0)
    rs = sampler.on_packet_acked("a", now=0.1)
    assert rs is not None and rs.is_valid
    assert (rs.delivered, rs.interval, rs.newly_acked) == (1000, 0.1, 1000)
    assert rs.delivery_rate == pytest.approx(10_000)
    assert sampler.min_rtt == pytest.approx(0.1)


def test_an_interval_below_a_microsecond_gives_no_rate() -> None:
    # An ACK read in the same microsecond as the send (a clock's float noise): the
    # RTT rounds to 0, and 1000 bytes over 5e-324 s would be an infinite rate.
    sampler = DeliveryRateSampler(now=0.0)
    sampler.on_packet_sent("a", size=1000, now=0.0)
    rs = sampler.on_packet_acked("a", now=5e-324)
    assert rs is not None
    assert not rs.is_valid
    assert rs.delivery_rate == 0.0


def test_app_limited_marks_packets_until_delivered() -> None:
    sampler = DeliveryRateSampler()
    sampler.on_packet_sent(0, size=1000, now=0.0)
    sampler.mark_app_limited()
    sampler.on_packet_sent(1, size=1000, now=0.001)
    rs0 = sampler.on_packet_acked(0, now=0.05)
    rs1 = sampler.on_packet_acked(1, now=0.051)
    assert rs0 is not None and not rs0.is_app_limited
    assert rs1 is not None and rs1.is_app_limited
    sampler.on_packet_sent(2, size=1000, now=0.06)
    rs2 = sampler.on_packet_acked(2, now=0.11)
    assert rs2 is not None and not rs2.is_app_limited


def test_lost_and_discarded_packets_leave_flight() -> None:
    sampler = DeliveryRateSampler()
    for i in range(3):
        sampler.on_packet_sent(i, size=500, now=0.0)
    assert sampler.on_packet_lost(0) is not None
    sampler.on_packet_discarded(1)
    assert sampler.bytes_in_flight == 500
    assert sampler.lost == 500
    rs = sampler.on_packet_acked(2, now=0.05)
    assert rs is not None and rs.lost == 500
    assert sampler.on_packet_acked(2, now=0.06) is None
    assert sampler.on_packet_lost(0) is None
    assert len(sampler) == 0


def test_windowed_max_filter_forgets_after_two_periods() -> None:
    f = WindowedMaxFilter()
    assert f.update(5.0) == 5.0
    assert f.update(3.0) == 5.0
    f.advance()
    assert f.update(4.0) == 5.0
    f.advance()
    assert f.best == 4.0
    f.advance()
    assert f.best == 0.0
    f.reset(2.0)
    assert f.best == 2.0
