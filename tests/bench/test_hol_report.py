"""The head-of-line benchmark's statistics on synthetic measurements (no network)."""

from __future__ import annotations

import pytest

from quicmesh.bench import _hol_report as report


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 50) == pytest.approx(50.5)
    assert report.percentile(values, 99) == pytest.approx(99.01)
    assert report.percentile([7.0], 99) == 7.0
    assert report.percentile([], 50) is None


def test_goodput_interpolates_the_counter() -> None:
    series = [[0.0, 0], [1.0, 1_000_000], [2.0, 3_000_000]]
    assert report.goodput_mbps(series, 1, 0.5, 1.5) == pytest.approx(12.0)
    assert report.goodput_mbps(series, 1, 2.0, 2.0) == 0.0


def _raw() -> dict[str, object]:
    start = 100.0
    samples = []
    for i in range(100):
        scheduled = start + i * 0.02
        # request 20 ms, server 0, response 60 ms (+ 1 ms per sample for the tail)
        received = scheduled + 0.020
        done = received + 0.060 + i * 0.001
        samples.append([0, i, scheduled, scheduled, received, received, done])
    probes = [[start + t * 0.005, start + t * 0.005 + 0.02, start + t * 0.005 + 0.045]
              for t in range(800)]  # fmt: skip  # 25 ms one way: 20 ms + 5 ms queue
    return {
        "measure_start": start,
        "measure_end": start + 2.0,
        "finished": start + 4.0,
        "samples": samples,
        "unanswered": [[1, 0, start + 1.0, start + 1.0, None, None, None]],
        "bulk_series": [[start - 1, 0], [start + 4, 5_000_000]],
        "probes": probes,
    }


def test_summarize_run_counts_unanswered_and_splits_time() -> None:
    summary = report.summarize_run(
        _raw(), one_way_delay=0.020, rate_bps=20e6, response_size=8192, slow_threshold=0.080
    )["measure"]
    latency = summary["latency_ms"]
    assert latency["count"] == 101  # 100 answered + 1 unanswered at its lower bound
    assert latency["max"] == pytest.approx(3000.0)  # finished - scheduled of the unanswered
    assert summary["unanswered"] == 1
    assert summary["slow"] == 100 - 1 + 1  # 80 ms + i ms > 80 ms for i >= 1, plus unanswered
    assert summary["bulk_total_mbps"] == pytest.approx(8.0)
    split = summary["split_ms"]
    assert split["request"]["p50"] == pytest.approx(20.0)
    assert split["link_queue"]["p50"] == pytest.approx(5.0)
    # response 60 + i ms, minus 25 ms one way, minus 8192 B at 20 Mbit/s (3.3 ms)
    assert split["sender_and_recovery"]["p50"] == pytest.approx(60 + 49.5 - 25 - 3.2768, abs=0.01)


def test_markdown_renders_points() -> None:
    run = {
        "seed": 1,
        "summary": {"measure": report.summarize_run(
            _raw(), one_way_delay=0.020, rate_bps=20e6, response_size=8192, slow_threshold=0.080
        )["measure"]},
        "congestion_control": {"transport": "quic", "client": {"quic": "bbr"},
                               "server": {"quic": "bbr"}},
    }  # fmt: skip
    run["summary"]["measure"]["cpu"] = report.cpu_summary({}, {}, [], 0.0, 1.0)
    point = {"link": "loss 2%", "variant": "quic-bbr", "loss": 0.02, **report.aggregate([run])}
    result = {
        "settings": {
            "interactive_flows": 2, "request_size": 1024, "response_size": 8192,
            "interval": 0.02, "bulk_flows": 1, "measure": 2.0, "warmup": 1.0, "seeds": 1,
        },
        "points": [point],
        "stall": [],
    }  # fmt: skip
    text = report.markdown(result)
    assert "| loss 2% | quic-bbr | bbr/bbr (QUIC) |" in text
