"""The interception benchmark: a tiny run (as root) and its option checks.

No timing is asserted (performance numbers belong to the benchmark's report):
the run must carry every connection through each path and report every case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quicmesh.bench import intercept


@pytest.mark.netns
def test_quick_run_reports_every_case(tmp_path: Path) -> None:
    report, picture = tmp_path / "intercept.json", tmp_path / "intercept.png"
    argv = ["--quick", "--connections", "5", "--rounds", "1", "--window", "0.05"]
    assert intercept.main([*argv, "--json", str(report), "--plot", str(picture)]) == 0
    data = json.loads(report.read_text())
    cases = {row["case"]: row for row in data["connections"]}
    assert set(cases) == set(intercept.CONNECTION_CASES)
    assert all(row["connections"] == 5 and len(row["samples_ms"]) == 5 for row in cases.values())
    lookups = {(row["style"], row["services"]) for row in data["lookups"]}
    assert lookups == {(s, n) for s in intercept.LOOKUP_STYLES for n in intercept.QUICK_SIZES}
    assert picture.stat().st_size > 10_000


@pytest.mark.netns
def test_a_lookup_cheaper_than_no_table_is_0_and_marked_below_the_resolution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A review: the lookup cost, a difference of two noisy timings, printed as -12 ns.
    # The timings are scripted (ns per packet per round): the set is within the noise.
    costs = {"none": [1000, 1030], "set": [995, 1005], "rules": [1500, 1520]}
    style = ""

    def table(kind: str, services: int) -> str:
        nonlocal style
        style = kind
        return ""

    def window(sender: object, seconds: float) -> float:
        measuring = seconds == 0.05  # (not the warm-up, a fifth of it)
        return (costs[style].pop(0) if measuring else 1) / 1e9

    monkeypatch.setattr(intercept, "render_lookup_table", table)
    monkeypatch.setattr(intercept, "_nft", lambda namespace, script: None)
    monkeypatch.setattr(intercept, "_send_window", window)
    rows = {row.style: row for row in intercept.measure_lookups((10,), 2, 0.05)}
    assert rows["set"].lookup_ns == 0 and not rows["set"].resolved
    assert rows["rules"].lookup_ns == pytest.approx(495) and rows["rules"].resolved
    report = intercept.format_report([], list(rows.values()))
    assert "-" not in report.split("rule lookup")[1].split("services:")[0]
    assert "        10 set          1000          0*\n" in report
    assert "        10 rules        1510        495\n" in report
    assert "  * below the resolution (30 ns: how much the cost with no table varied" in report


def test_lookup_tables_render_one_rule_or_one_set() -> None:
    rules = intercept.render_lookup_table("rules", 300)
    assert rules.count("udp dport 9080 accept") == 300
    assert intercept.service_address(299) == "10.96.1.43"
    sets = intercept.render_lookup_table("set", 300)
    assert sets.count("@services accept") == 1 and sets.count(" . 9080") == 300
    assert intercept.render_lookup_table("none", 300).count("{") == 1


@pytest.mark.parametrize("argv", [["--connections", "0"], ["--window", "0"], ["--rounds", "-1"]])
def test_bad_options_exit_2(argv: list[str]) -> None:
    assert intercept.main(argv) == 2
