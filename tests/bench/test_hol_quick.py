"""The head-of-line benchmark end to end at a tiny size, on a real emulated link.

No timing thresholds: this proves the benchmark runs every side in its namespace,
records the congestion control both ends actually used, and writes a JSON document
of the expected shape with sane values.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from quicmesh.bench import hol


def _check_distribution(latency: dict[str, Any]) -> None:
    assert latency["count"] > 0
    values = [latency[key] for key in ("p50", "p90", "p99", "max")]
    assert all(v is not None and v > 0 for v in values)
    assert values == sorted(values)


@pytest.mark.netns
@pytest.mark.timeout(180)
def test_tiny_run_writes_expected_json(tmp_path: Path) -> None:
    argv = [
        "--out", str(tmp_path), "--loss", "2", "--no-interop",
        "--transports", "quic-bbr,h2-cubic", "--lowbuf", "",
        "--seeds", "1", "--warmup", "0.5", "--duration", "1.5", "--grace", "1",
        "--stall-transports", "quic-bbr", "--stall-duration", "3",
    ]  # fmt: skip
    assert hol.main(argv) == 0
    result = json.loads((tmp_path / "hol.json").read_text())

    assert result["benchmark"] == "hol"
    assert result["failures"] == []
    assert result["settings"]["interactive_flows"] == 2
    assert {(p["link"], p["variant"]) for p in result["points"]} == {
        ("loss 2%", "quic-bbr"),
        ("loss 2%", "h2-cubic"),
    }
    for point in result["points"]:
        assert point["loss"] == pytest.approx(0.02)
        _check_distribution(point["latency_ms"])
        # Latency cannot beat the propagation RTT (40 ms) nor exceed the run.
        assert point["latency_ms"]["p50"] > 40
        assert point["latency_ms"]["max"] < 10_000
        assert point["samples"] == point["latency_ms"]["count"]
        assert 0 <= point["slow"] <= point["samples"]
        assert 0 < point["bulk_mbps_mean"] < 20.5  # the link carries at most 20 Mbit/s
        assert set(point["split_ms"]) >= {"link_queue", "sender_and_recovery", "response"}

    # The congestion control both sides actually ran is recorded, and is what was asked.
    runs = {r["variant"]: r for r in result["runs"] if r["experiment"] == "hol"}
    quic = runs["quic-bbr"]["congestion_control"]
    assert quic["client"]["quic"] == quic["server"]["quic"] == "bbr"
    h2 = runs["h2-cubic"]["congestion_control"]
    assert set(h2["client"]["sockets"]) == set(h2["server"]["sockets"]) == {"cubic"}
    assert all(r["congestion_control_problems"] == [] for r in result["runs"])
    # The link really dropped about 2 % (a loose bound: few packets in a tiny run).
    stats = runs["quic-bbr"]["link_stats"]["server_to_client"]
    assert 0 < stats["dropped_by_loss"] < 0.1 * stats["packets_in"]

    [stall] = result["stall"]
    assert stall["variant"] == "quic-bbr"
    assert set(stall["phases"]) == {"before", "stalled"}
    assert len(stall["phases"]["before"]["bulk_mbps"]) == 2
    _check_distribution(stall["phases"]["before"]["latency_ms"])

    markdown = (tmp_path / "hol.md").read_text()
    assert "| loss 2% | quic-bbr |" in markdown and "Stall isolation" in markdown
    with gzip.open(tmp_path / "hol-samples.json.gz", "rt") as file:
        samples = json.load(file)
    assert (
        len(samples["loss 2%"]["quic-bbr"])
        == runs["quic-bbr"]["summary"]["measure"]["latency_ms"]["count"]
    )
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "hol-cdf.png").stat().st_size > 0
        assert (tmp_path / "hol-p99.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--transports", "udp-bbr"],
        ["--transports", "quic-vegas"],
        ["--loss", "150"],
        ["--rtt", "1e9"],  # (refused by the link once the run had begun, a review)
        ["--rtt", "0"],
        ["--transports="],  # (ran 0 of 0 and exited 1 saying nothing, a review)
    ],
)
def test_bad_options_exit_2(argv: list[str], tmp_path: Path) -> None:
    assert hol.main([*argv, "--out", str(tmp_path)]) == 2
