"""BBR against a simulated bottleneck: startup, drain, ProbeRTT, loss and queues.

The path is the issue's: 20 Mbit/s, 40 ms RTT, 60 ms of queue (unless a test
says otherwise). Every run is deterministic (seeded loss, seeded model).
"""

from __future__ import annotations

import math
import statistics

import pytest

from quicmesh.congestion.bbr import BbrModel, BbrState, _delivery_slope

from .netsim import Link, simulate

LINK = Link()


def test_startup_finds_bottleneck_bandwidth_within_a_few_rtts() -> None:
    trace = simulate(LINK, 1.5)
    found = [t for t, bw in trace.bw_estimates if abs(bw - LINK.rate) <= 0.15 * LINK.rate]
    assert found, "the bandwidth estimate never came within 15 % of the bottleneck"
    assert found[0] <= 10 * LINK.rtt
    # ... and stays there.
    assert all(abs(bw - LINK.rate) <= 0.15 * LINK.rate for t, bw in trace.bw_estimates if t > 0.5)
    drain = trace.entered(BbrState.DRAIN)
    assert drain and drain[0] <= 12 * LINK.rtt


def test_timers_start_with_the_first_packet() -> None:
    # aioquic creates the controller before it has a clock; the event loop's clock
    # is far from zero by the first packet. Dated from zero, the ProbeRTT timer had
    # long expired and every connection began in ProbeRTT instead of Startup.
    model = BbrModel(max_datagram_size=1200)
    start = 8817.5
    for number in range(10):
        model.on_packet_sent(number, size=1200, now=start)
    for number in range(10):
        model.on_packet_acked(number, now=start + LINK.rtt)
    assert model.state is BbrState.STARTUP
    assert model.congestion_window >= 20 * 1200


def test_drain_empties_the_startup_queue() -> None:
    trace = simulate(LINK, 1.5)
    (drain_start,) = trace.entered(BbrState.DRAIN)
    probe_bw_start = next(t for t, s in trace.states if s.is_probe_bw)
    startup_peak = max(trace.queue_delays_between(0.0, drain_start))
    assert startup_peak > 0.25 * LINK.rtt, "startup built no queue to drain"
    assert probe_bw_start - drain_start <= 3 * LINK.rtt
    after = trace.queue_delays_between(probe_bw_start, probe_bw_start + LINK.rtt)
    assert max(after) < 0.1 * LINK.rtt


def test_probe_rtt_happens_periodically_in_a_long_flow() -> None:
    trace = simulate(LINK, 17.0)
    entries = trace.entered(BbrState.PROBE_RTT)
    assert len(entries) >= 2
    gaps = [b - a for a, b in zip([0.0, *entries], entries, strict=False)]
    assert all(4.5 <= gap <= 10.5 for gap in gaps), gaps
    # Each ProbeRTT lasts at least 200 ms plus a round, and not much more.
    for entry in entries:
        leave = next(t for t, s in trace.states if t > entry and s is not BbrState.PROBE_RTT)
        assert 0.2 <= leave - entry <= 0.2 + 4 * LINK.rtt
    assert trace.model.min_rtt == pytest.approx(LINK.rtt, abs=0.002)
    # Inflight was cut to about half a BDP, so the queue was empty.
    probe_rtt_windows = [w for t, s, w in trace.windows if s is BbrState.PROBE_RTT]
    assert min(probe_rtt_windows) <= 0.5 * LINK.bdp + 2 * 1200
    assert max(w for t, s, w in trace.windows if t > 2.0) >= 2 * LINK.bdp


@pytest.mark.parametrize(
    ("loss", "minimum_share"),
    [(0.0, 0.95), (0.005, 0.9), (0.01, 0.9), (0.02, 0.8), (0.05, 0.7)],
)
def test_random_loss_does_not_collapse_the_rate(loss: float, minimum_share: float) -> None:
    trace = simulate(Link(loss=loss), 15.0)
    share = trace.goodput(2.0) / LINK.rate
    assert share >= minimum_share, f"{share:.1%} of the bottleneck at {loss:.1%} loss"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_loss_outside_a_probe_leaves_inflight_hi_alone(seed: int) -> None:
    # A cluster of random losses while cruising is not the answer to a probe: if it
    # set inflight_hi, cruising (at 85 % of it) would hold the window under one BDP
    # for the rest of the flow. Only probing rounds may lower the long-term bound.
    trace = simulate(Link(loss=0.02, seed=seed), 20.0, packet_size=1452)
    quiet = (BbrState.PROBE_BW_CRUISE, BbrState.PROBE_RTT)
    previous = math.inf
    lowered_while_quiet = []
    for when, state, value in trace.inflight_hi_changes:
        if value < previous and state in quiet:
            lowered_while_quiet.append((when, state, value))
        previous = value
    assert lowered_while_quiet == []
    assert trace.goodput(2.0) >= 0.95 * LINK.rate


def test_queueing_delay_stays_bounded_on_a_deep_buffer() -> None:
    # One second of buffer: only BBR's own model keeps the queue short.
    trace = simulate(Link(queue_seconds=1.0), 15.0)
    delays = trace.queue_delays_between(1.0, 15.0)
    assert statistics.median(delays) < LINK.rtt
    assert max(delays) < 2 * LINK.rtt
    assert trace.goodput(1.0) >= 0.95 * LINK.rate


def test_late_ack_timestamps_do_not_build_a_standing_queue() -> None:
    # ACKs processed up to 10 ms late (a busy event loop) inflate some bandwidth
    # samples; the standing-queue check brings max_bw back to the bottleneck.
    trace = simulate(Link(ack_jitter=0.010), 20.0)
    delays = trace.queue_delays_between(2.0, 20.0)
    assert statistics.median(delays) < 0.25 * LINK.rtt
    assert trace.goodput(2.0) >= 0.93 * LINK.rate
    assert trace.model.bw_corrections > 0


def test_bottleneck_rate_fit_shrugs_off_one_late_ack() -> None:
    # Three round trips of ACKs from a busy 20 Mbit/s bottleneck, the last one read
    # 3 ms late by a busy event loop.
    rate = LINK.rate
    deliveries = [(i * 0.001, round(i * 0.001 * rate)) for i in range(121)]
    late, delivered = deliveries[-1]
    deliveries[-1] = (late + 0.003, delivered)
    first_to_last = (deliveries[-1][1] - deliveries[0][1]) / (deliveries[-1][0] - deliveries[0][0])
    assert first_to_last < 0.98 * rate
    fitted = _delivery_slope(deliveries)
    assert fitted == pytest.approx(rate, rel=0.005)
    assert _delivery_slope(deliveries[:1]) is None
    assert _delivery_slope([(1.0, 0), (1.0, 1200)]) is None
