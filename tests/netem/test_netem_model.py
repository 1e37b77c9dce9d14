"""Sans-IO tests of the link model: no devices, no clock, seeded randomness."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.netem import DirectionConfig, DirectionModel, GilbertElliottConfig, PacketFate


@dataclass
class Trace:
    """What happened to each packet: fate, submit time, delivery time (None if dropped)."""

    fates: list[PacketFate]
    sent_at: list[float]
    delivered_at: dict[int, float]
    order: list[int]
    max_queue_bytes_seen: int
    max_queue_packets_seen: int


def simulate(
    model: DirectionModel, arrivals: list[tuple[float, int]], deliver_late: float = 0.0
) -> Trace:
    """Feed ``(time, size)`` arrivals; deliver every packet at its due time (+ ``deliver_late``).

    Each packet's first four bytes are its index, so deliveries can be matched to sends.
    """
    fates: list[PacketFate] = []
    delivered_at: dict[int, float] = {}
    order: list[int] = []
    max_bytes = max_packets = 0

    def deliver_until(limit: float) -> None:
        while (due := model.next_delivery_time()) is not None and due + deliver_late <= limit:
            now = due + deliver_late
            for packet in model.deliver(now):
                index = int.from_bytes(packet[:4], "big")
                delivered_at[index] = now
                order.append(index)

    for index, (now, size) in enumerate(arrivals):
        deliver_until(now)
        fates.append(model.submit(index.to_bytes(4, "big") + bytes(size - 4), now))
        max_bytes = max(max_bytes, model.queue_bytes)
        max_packets = max(max_packets, model.queue_packets)
    deliver_until(math.inf)
    return Trace(fates, [t for t, _ in arrivals], delivered_at, order, max_bytes, max_packets)


@st.composite
def arrival_lists(draw: st.DrawFn, max_size: int = 300) -> list[tuple[float, int]]:
    gaps = draw(
        st.lists(
            st.floats(min_value=0.0, max_value=0.01, allow_nan=False), min_size=1, max_size=max_size
        )
    )
    sizes = draw(st.lists(st.integers(28, 1500), min_size=len(gaps), max_size=len(gaps)))
    now, arrivals = 0.0, []
    for gap, size in zip(gaps, sizes, strict=True):
        now += gap
        arrivals.append((now, size))
    return arrivals


direction_configs = st.builds(
    DirectionConfig,
    delay=st.floats(0.0, 0.2),
    jitter=st.floats(0.0, 0.05),
    reorder=st.booleans(),
    loss=st.floats(0.0, 0.5),
    rate_bps=st.one_of(st.none(), st.floats(1e5, 1e8)),
)


@given(direction_configs, arrival_lists(), st.integers(0, 2**32))
@settings(max_examples=150, deadline=None)
def test_no_packet_is_delivered_before_its_delay(
    config: DirectionConfig, arrivals: list[tuple[float, int]], seed: int
) -> None:
    model = DirectionModel(config, seed)
    trace = simulate(model, arrivals)
    for index, delivered in trace.delivered_at.items():
        size = arrivals[index][1]
        serialisation = size * 8 / config.rate_bps if config.rate_bps else 0.0
        earliest = trace.sent_at[index] + max(0.0, config.delay - config.jitter) + serialisation
        assert delivered >= earliest - 1e-9
    scheduled = [i for i, fate in enumerate(trace.fates) if fate is PacketFate.SCHEDULED]
    assert sorted(trace.delivered_at) == scheduled
    assert model.in_flight == 0


@given(direction_configs, arrival_lists(), st.integers(0, 2**32))
@settings(max_examples=150, deadline=None)
def test_order_is_preserved_unless_reorder(
    config: DirectionConfig, arrivals: list[tuple[float, int]], seed: int
) -> None:
    trace = simulate(DirectionModel(config, seed), arrivals)
    if not config.reorder:
        assert trace.order == sorted(trace.order)


def test_jitter_with_reorder_does_reorder() -> None:
    config = DirectionConfig(delay=0.02, jitter=0.01, reorder=True)
    arrivals = [(i * 0.001, 100) for i in range(200)]
    trace = simulate(DirectionModel(config, 1), arrivals)
    assert trace.order != sorted(trace.order)
    assert sorted(trace.order) == list(range(200))


def test_jitter_without_reorder_only_adds_delay_where_it_would_reorder() -> None:
    config = DirectionConfig(delay=0.02, jitter=0.01)
    arrivals = [(i * 0.1, 100) for i in range(100)]  # far apart: jitter cannot reorder
    trace = simulate(DirectionModel(config, 3), arrivals)
    delays = [trace.delivered_at[i] - arrivals[i][0] for i in range(100)]
    assert min(delays) >= 0.01 and max(delays) <= 0.03
    assert max(delays) - min(delays) > 0.015  # spread over most of [10, 30] ms


@given(st.floats(0.01, 0.5), st.integers(0, 2**32), st.sampled_from([0.0, 0.01]))
@settings(max_examples=30, deadline=None)
def test_loss_rate_converges(loss: float, seed: int, delay: float) -> None:
    n = 20_000
    model = DirectionModel(DirectionConfig(loss=loss, delay=delay), seed)
    for i in range(n):
        model.submit(b"x" * 100, i * 0.001)
    observed = model.stats.dropped_by_loss / n
    sigma = math.sqrt(loss * (1 - loss) / n)
    assert abs(observed - loss) < 5 * sigma
    assert model.stats.loss_fraction == observed


@given(
    st.integers(1, 50),
    st.floats(1e5, 1e7),
    arrival_lists(max_size=400),
    st.integers(0, 2**32),
)
@settings(max_examples=150, deadline=None)
def test_packet_queue_never_exceeds_its_bound(
    limit: int, rate: float, arrivals: list[tuple[float, int]], seed: int
) -> None:
    model = DirectionModel(DirectionConfig(rate_bps=rate, queue_packets=limit), seed)
    trace = simulate(model, arrivals)
    assert trace.max_queue_packets_seen <= limit
    assert model.stats.max_queue_packets <= limit


@given(
    st.integers(3000, 100_000),
    st.floats(1e5, 1e7),
    arrival_lists(max_size=400),
)
@settings(max_examples=150, deadline=None)
def test_byte_queue_never_exceeds_its_bound(
    limit: int, rate: float, arrivals: list[tuple[float, int]]
) -> None:
    model = DirectionModel(DirectionConfig(rate_bps=rate, queue_bytes=limit))
    trace = simulate(model, arrivals)
    assert trace.max_queue_bytes_seen <= limit
    assert model.stats.max_queue_bytes <= limit


def test_queue_as_delay_at_the_rate() -> None:
    config = DirectionConfig(rate_bps=8e6, queue_delay=0.010)  # 10 ms at 1 MB/s = 10 kB
    assert config.queue_limit is not None and config.queue_limit.bytes == 10_000
    assert DirectionConfig(rate_bps=8e6).queue_limit.bytes == 100_000  # type: ignore[union-attr]
    assert DirectionConfig().queue_limit is None


def test_a_full_queue_drops_the_tail() -> None:
    model = DirectionModel(DirectionConfig(rate_bps=1e6, queue_packets=10))
    fates = [model.submit(bytes(1000), 0.0) for _ in range(20)]
    # One packet goes straight onto the link, ten wait, the rest are dropped.
    assert fates.count(PacketFate.SCHEDULED) == 11
    assert fates[11:] == [PacketFate.DROPPED_BY_QUEUE] * 9
    assert model.stats.dropped_by_queue == 9
    assert model.stats.max_queue_packets == 10


@given(st.floats(1e5, 1e9), st.integers(28, 1500), st.floats(0.0, 0.1))
@settings(max_examples=100, deadline=None)
def test_rate_limiter_serialises_at_the_rate(rate: float, size: int, delay: float) -> None:
    n = 50
    model = DirectionModel(DirectionConfig(rate_bps=rate, queue_packets=n, delay=delay))
    trace = simulate(model, [(0.0, size)] * n)
    times = [trace.delivered_at[i] for i in range(n)]
    per_packet = size * 8 / rate
    assert times[0] == pytest.approx(delay + per_packet)
    assert times[-1] - times[0] == pytest.approx((n - 1) * per_packet)


def test_late_delivery_does_not_slow_the_rate() -> None:
    """Releasing packets late (a coarse timer) does not drift the rate or the delay."""
    rate, size, n = 1e6, 1250, 200  # 10 ms per packet
    model = DirectionModel(DirectionConfig(rate_bps=rate, queue_packets=n, delay=0.02))
    trace = simulate(model, [(i * 0.005, size) for i in range(n)], deliver_late=0.001)
    last = trace.delivered_at[n - 1]
    assert last == pytest.approx(n * 0.01 + 0.02 + 0.001, abs=0.003)


@given(direction_configs, arrival_lists(), st.integers(0, 2**32))
@settings(max_examples=100, deadline=None)
def test_same_seed_same_drops_and_times(
    config: DirectionConfig, arrivals: list[tuple[float, int]], seed: int
) -> None:
    first = simulate(DirectionModel(config, seed), arrivals)
    second = simulate(DirectionModel(config, seed), arrivals)
    assert first.fates == second.fates
    assert first.delivered_at == second.delivered_at


def test_different_seeds_drop_differently() -> None:
    def drops(seed: int) -> list[PacketFate]:
        model = DirectionModel(DirectionConfig(loss=0.1), seed)
        return [model.submit(b"x" * 40, i * 0.001) for i in range(1000)]

    assert drops(1) != drops(2)


def test_jitter_does_not_change_which_packets_are_lost() -> None:
    arrivals = [(i * 0.001, 100) for i in range(2000)]
    plain = simulate(DirectionModel(DirectionConfig(loss=0.1), 5), arrivals)
    jittery = simulate(DirectionModel(DirectionConfig(loss=0.1, jitter=0.01), 5), arrivals)
    assert plain.fates == jittery.fates


@pytest.mark.parametrize(("loss", "burst"), [(0.02, 3.0), (0.05, 1.5), (0.10, 5.0)])
def test_gilbert_elliott_loss_and_burst_length(loss: float, burst: float) -> None:
    config = DirectionConfig(burst=GilbertElliottConfig.from_loss_and_burst(loss, burst))
    model = DirectionModel(config, 7)
    n = 200_000
    lost = [model.submit(b"x", 0.0) is PacketFate.DROPPED_BY_LOSS for _ in range(n)]
    runs, run = [], 0
    for was_lost in lost:
        if was_lost:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert sum(lost) / n == pytest.approx(loss, rel=0.1)
    assert sum(runs) / len(runs) == pytest.approx(burst, rel=0.1)


def test_gilbert_elliott_max_burst() -> None:
    burst = GilbertElliottConfig.from_loss_and_burst(0.02, 2.0, max_burst=3)
    model = DirectionModel(DirectionConfig(burst=burst), 11)
    run = longest = 0
    for _ in range(100_000):
        run = run + 1 if model.submit(b"x", 0.0) is PacketFate.DROPPED_BY_LOSS else 0
        longest = max(longest, run)
    assert longest == 3
    assert model.stats.loss_fraction == pytest.approx(0.02, rel=0.15)
