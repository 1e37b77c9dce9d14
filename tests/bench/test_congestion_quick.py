"""The congestion benchmark: a tiny run on the link emulator, and its reporting.

No timing assertions: the run only proves that every flow kind connects, moves
data and lands in the JSON document, the tables and the plots.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from quicmesh.bench import congestion


@pytest.mark.netns
def test_tiny_run_writes_every_output(tmp_path: Path) -> None:
    argv = [
        "--losses", "1", "--flows", "quic-bbr,quic-cubic,tcp-bbr", "--fairness", "tcp-cubic",
        "--duration", "1", "--fairness-duration", "1", "--fairness-loss", "1",
        "--out", str(tmp_path),
        # quicmesh's BBRv3 model (the pacing report below) runs on aioquic only.
        "--engine", "aioquic",
    ]  # fmt: skip
    assert congestion.main(argv) == 0
    document = json.loads((tmp_path / "congestion.json").read_text())
    assert document["link"] == {
        "rate_bps": 20e6,
        "rtt": 0.04,
        "queue_delay": 0.06,
        "loss_applies_to": "both directions",
    }
    assert [case["loss"] for case in document["cases"]] == [0.01] * 3
    flows = [case["flows"][0] for case in document["cases"]]
    assert [flow["flow"] for flow in flows] == ["quic-bbr", "quic-cubic", "tcp-bbr"]
    for flow in flows:
        assert flow["goodput_bps"] > 0
        assert flow["rtt_samples"] > 0
        assert flow["queueing_delay_median"] >= 0
        assert flow["min_rtt"] > 0
        # The link carried the payload plus headers: less than one payload byte per
        # link byte, and a lone flow cannot keep the link busier than all the time.
        assert 0.5 < flow["payload_per_link_byte"] < 1.0
        assert 0.0 < flow["utilisation"] <= 1.05
    assert flows[2]["controller"] == "bbr"  # the kernel confirmed TCP_CONGESTION
    assert "median_sent_over_model" in flows[0]["pacing"]
    assert "pacing" not in flows[1]
    for case in document["cases"]:
        assert set(case["link"]) == {"client_to_server", "server_to_client"}
        assert case["link"]["client_to_server"]["packets_in"] > 0
        assert set(case["cpu"]) == {"sender_thread", "receiver_process_total", "forwarder"}
    (fairness,) = document["fairness"]
    assert [flow["flow"] for flow in fairness["flows"]] == ["quic-bbr", "tcp-cubic"]
    summary = document["summary"]
    assert set(summary["table"]) == {"quic-bbr", "quic-cubic", "tcp-bbr"}
    shares = [flow["share"] for flow in summary["fairness"][0]["flows"]]
    assert sum(shares) == pytest.approx(1.0)
    table = (tmp_path / "congestion.md").read_text()
    assert "| 1 % |" in table and "quic-bbr" in table
    if importlib.util.find_spec("matplotlib") is None:  # plots are an optional extra
        assert not list(tmp_path.glob("congestion-*.png"))
        return
    for name in ("goodput", "fairness", "pacing"):
        assert (tmp_path / f"congestion-{name}.png").stat().st_size > 0


def _flow(name: str, goodput: float, delay: float | None) -> dict[str, Any]:
    return {
        "flow": name,
        "goodput_bps": goodput,
        "goodput_second_half_bps": goodput,
        "queueing_delay_median": delay,
        "queueing_delay_p95": delay,
    }


def _document(quic_bbr: float, tcp_bbr: float, delay: float) -> dict[str, Any]:
    return {
        "link": {"rate_bps": 20e6, "rtt": 0.04, "queue_delay": 0.06},
        "duration": 20.0,
        "quic_datagram_size": 1200,
        "cases": [
            {
                "loss": 0.02,
                "flows": [
                    {
                        **_flow("quic-bbr", quic_bbr, delay),
                        "utilisation": 0.97,
                        "payload_per_link_byte": 0.955,
                    }
                ],
            },
            {"loss": 0.02, "flows": [_flow("tcp-bbr", tcp_bbr, 0.03)]},
        ],
        "fairness": [
            {"loss": 0.0, "flows": [_flow("quic-bbr", 12e6, 0.01), _flow("tcp-cubic", 6e6, 0.01)]}
        ],
    }


@pytest.mark.parametrize(
    ("quic_bbr", "tcp_bbr", "delay", "met"),
    [
        (17e6, 16e6, 0.010, True),
        (17e6, 18e6, 0.010, False),  # below kernel TCP BBR
        (15e6, 14e6, 0.010, False),  # below 80 % of the link
        (17e6, 16e6, 0.050, False),  # queueing delay above one RTT
    ],
)
def test_summary_checks_the_target(
    quic_bbr: float, tcp_bbr: float, delay: float, met: bool
) -> None:
    document = _document(quic_bbr, tcp_bbr, delay)
    document["summary"] = congestion.summarize(document, 20e6)
    assert document["summary"]["target"]["met"] is met
    (fairness,) = document["summary"]["fairness"]
    assert [round(flow["share"], 3) for flow in fairness["flows"]] == [0.667, 0.333]
    text = congestion.markdown(document)
    assert ("Target met." in text) is met
    assert "| 2 % |" in text
    # Link use where the run measured it, "-" where it did not (tcp-bbr here).
    assert "| 2 % | 97.0 % busy, 95.5 % payload | - |" in text


def test_the_dagger_legend_is_printed_only_under_a_cell_that_carries_one() -> None:
    # A review: the "†" line was printed under every goodput table, daggers or none.
    document = _document(17e6, 16e6, 0.010)
    document["summary"] = congestion.summarize(document, 20e6)
    assert "†" not in congestion.markdown(document)
    document["cases"][1]["flows"][0]["loop_lag_p99"] = 2 * congestion.STARVED_LOOP_LAG
    document["summary"] = congestion.summarize(document, 20e6)
    text = congestion.markdown(document)
    assert "| 2 % | 17.0 (85 %) | 16.0 (80 %) † |" in text
    assert "\n† the sender's event loop woke up more than 10 ms late" in text


def test_link_use_separates_overhead_from_idle_time() -> None:
    # 1000 payload bytes per 1100 link bytes; 2 MB/s of goodput on a 20 Mbit/s link.
    use = congestion.link_use(2e6, 1000, 1100, 20e6)
    assert use["payload_per_link_byte"] == pytest.approx(1000 / 1100)
    assert use["utilisation"] == pytest.approx(2e6 / (2.5e6 * 1000 / 1100))
    assert congestion.link_use(2e6, 0, 1100, 20e6) == {}
    assert congestion.link_use(2e6, 1000, 0, 20e6) == {}


def test_goodput_interpolates_the_receiver_timeline() -> None:
    timeline = [(10.0, 0), (11.0, 1000), (12.0, 3000)]
    assert congestion.goodput_between(timeline, 10.5, 11.5) == pytest.approx(1500.0)
    assert congestion.goodput_between(timeline, 9.0, 13.0) == pytest.approx(750.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--flows", "quic-vegas"],
        ["--losses", "150"],
        ["--duration", "0"],
        ["--repeat", "0"],
        ["--datagram-size", "1000"],
        ["--rtt", "100"],  # seconds: over a minute (a review)
        ["--flows", "none", "--fairness", "none"],  # (empty tables, exit 0: a review)
    ],
)
def test_bad_options_exit_2(argv: list[str]) -> None:
    assert congestion.main(argv) == 2


def test_flow_kinds_parse() -> None:
    kind = congestion.FlowKind.parse("tcp-bbr")
    assert (kind.protocol, kind.controller, kind.name) == ("tcp", "bbr", "tcp-bbr")
    with pytest.raises(ValueError, match="unknown flow"):
        congestion.FlowKind.parse("udp-bbr")
