"""Every benchmark plot has labelled axes with units, a legend and a title naming the link
and the loss; hol-p99's BBR series carry their values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

matplotlib = pytest.importorskip("matplotlib", reason="plots need matplotlib (quicmesh[plots])")
from matplotlib.figure import Figure  # noqa: E402

from quicmesh.bench import _hol_report, congestion  # noqa: E402

UNIT = re.compile(r"\(.+\)")


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the plot functions save, as they are when saved."""
    figures: list[Figure] = []
    original = Figure.savefig

    def record(self: Figure, *args: Any, **kwargs: Any) -> None:
        figures.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def check(figure: Figure, *title_words: str) -> str:
    title = figure._suptitle.get_text() if figure._suptitle is not None else ""
    for word in title_words:
        assert word in title, (word, title)
    for axis in figure.axes:
        if not axis.axison:
            continue
        for label in (axis.get_xlabel(), axis.get_ylabel()):
            assert UNIT.search(label), f"axis label without a unit: {label!r} ({title})"
        assert axis.get_title(), f"untitled panel in {title}"
        legend = axis.get_legend()
        assert legend is not None and legend.get_texts(), f"no legend in {axis.get_title()}"
    return title


def test_hol_plots(tmp_path: Path, saved: list[Figure]) -> None:
    variants = ["quic-bbr", "h2-bbr", "quic-cubic", "h2-cubic"]
    losses = [0.0, 0.01, 0.02]
    points = [
        {"variant": v, "loss": loss, "latency_ms": {"p99": 200.0 + 300 * i + 1000 * loss},
         "bulk_mbps_mean": 12.0 - i}
        for i, v in enumerate(variants) for loss in losses
    ]  # fmt: skip
    result = {
        "settings": {"slow_threshold_ms": {"loss 2%": 80.0}, "rtt": 0.04, "rate_bps": 20e6,
                     "queue": {"queue_delay": 0.06}},
        "points": points,
    }  # fmt: skip
    latencies = {"loss 2%": {v: [100.0 + i, 150.0, 400.0] for i, v in enumerate(variants)}}
    written = _hol_report.plot(result, latencies, tmp_path)
    assert [p.name for p in written] == ["hol-cdf.png", "hol-p99.png"]
    link = ("20 Mbit/s", "40 ms RTT", "60 ms drop-tail queue")
    check(saved[0], *link, "loss")
    check(saved[1], *link, "random loss")
    left = saved[1].axes[0]
    labels = {text.get_text() for text in left.texts}
    # Both BBR series can be read off: every point of each carries its value.
    assert {"200", "210", "220", "500", "510", "520"} <= labels


def test_congestion_plots(tmp_path: Path, saved: list[Figure]) -> None:
    row = {"goodput_bps": 18e6, "queueing_delay_median": 0.01}
    timeline = [[0.1 * i, 125_000 * i] for i in range(40)]
    windows = [{"start": 0.1 * i, "model_rate": 2.4e6, "sent_rate": 2.3e6} for i in range(20)]
    document = {
        "summary": {"table": {"quic-bbr": {"0.02": row}, "quic-cubic": {"0.02": row}}},
        "link": {"rate_bps": 20e6, "rtt": 0.04, "queue_delay": 0.06},
        "fairness": [{"loss": 0.01, "flows": [{"flow": "quic-bbr", "timeline": timeline},
                                              {"flow": "tcp-cubic", "timeline": timeline}]}],
        "cases": [{"loss": 0.02, "flows": [
            {"flow": "quic-bbr", "pacing": {"series": True, "window_series": windows}}]}],
    }  # fmt: skip
    written = congestion.plot(document, tmp_path)
    assert [p.name for p in written] == [
        "congestion-goodput.png",
        "congestion-fairness.png",
        "congestion-pacing.png",
    ]
    for figure in saved:
        check(figure, "20 Mbit/s", "RTT 40 ms", "queue 60 ms")
    assert "1 % loss" in saved[1].axes[0].get_title()
    assert "2 % loss" in saved[2].axes[0].get_title()


def test_hol_plot_tolerates_a_point_without_p99(tmp_path: Path, saved: list[Figure]) -> None:
    """A run that measured no answer has p99 None (``--duration 0`` crashed the plot)."""
    points = [
        {"variant": "quic-bbr", "loss": 0.0, "latency_ms": {"p99": None}, "bulk_mbps_mean": None},
        {"variant": "quic-bbr", "loss": 0.01, "latency_ms": {"p99": 300.0}, "bulk_mbps_mean": 9.0},
    ]
    result = {
        "settings": {"slow_threshold_ms": {}, "rtt": 0.04, "rate_bps": 20e6,
                     "queue": {"queue_delay": 0.06}},
        "points": points,
    }  # fmt: skip
    written = _hol_report.plot(result, {}, tmp_path)
    assert "hol-p99.png" in [p.name for p in written]
    assert {text.get_text() for text in saved[-1].axes[0].texts} == {"300"}


def test_hol_goodput_axis_has_headroom_over_its_top_point(
    tmp_path: Path, saved: list[Figure]
) -> None:
    """A review: the axis ended 0.1 Mbit/s above the highest point (its marker was cut)."""
    points = [
        {"variant": variant, "loss": loss, "latency_ms": {"p99": 200.0}, "bulk_mbps_mean": mbps}
        for variant, top in (("quic-bbr", 18.0), ("h2-bbr", 17.0))
        for loss, mbps in ((0.0, top), (0.02, top - 1))
    ]
    result = {
        "settings": {"slow_threshold_ms": {}, "rtt": 0.04, "rate_bps": 20e6,
                     "queue": {"queue_delay": 0.06}},
        "points": points,
    }  # fmt: skip
    _hol_report.plot(result, {}, tmp_path)
    bottom, top = saved[-1].axes[1].get_ylim()
    assert bottom == 0 and top >= 1.05 * 18.0, (bottom, top)
