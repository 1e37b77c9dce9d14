"""Issue 12's measurements, tiny runs: peer death and hang (migration bench), and time to
first byte with UDP blocked (ttfb bench). Bounds are the issue's, not performance figures."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from quicmesh.bench import migration, ttfb


def test_dead_and_hung_peers_reset_quic_flows(tmp_path: Path) -> None:
    report = tmp_path / "failover.json"
    argv = ["--quick", "--rtt", "20", "--cases", "quic-death,h2-death,quic-hang"]
    assert migration.main([*argv, "--json", str(report)]) == 0
    rows = {row["case"]: row for row in json.loads(report.read_text())["rows"]}
    for case in ("quic-death", "h2-death", "quic-hang"):
        assert rows[case]["flows_lost"] == rows[case]["flows"]
        assert rows[case]["reset_ms"] is not None
    assert rows["quic-death"]["reset_ms"] < 3000  # ICMP port unreachable
    assert rows["quic-hang"]["reset_ms"] < migration.FAILOVER_WAIT * 1000


def test_the_failover_legend_measures_from_the_death_or_hang() -> None:
    # A review: it said "from the address change", which a failover case has none of.
    script = shutil.which("quicmesh")
    assert script is not None, "the quicmesh console script is not on PATH: pip install -e ."
    argv = ["--failover", "--cases", "quic-death", "--flows", "1", "--duration", "0.4"]
    done = subprocess.run(
        [script, "bench", "migration", *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stall when the peer dies or hangs" in done.stdout
    assert "address change" not in done.stdout and "the change" not in done.stdout
    assert "from the death or hang to the end" in done.stdout
    assert "before the death or hang" in done.stdout


def test_failover_options_are_checked() -> None:
    assert migration.main(["--cases", "quic-death,nope"]) == 2
    assert migration.main(["--repeat", "0"]) == 2


@pytest.mark.netns
def test_udp_blocked_ttfb_falls_back(tmp_path: Path) -> None:
    report = tmp_path / "ttfb.json"
    assert ttfb.main(["--udp-blocked", "--quick", "--json", str(report)]) == 0
    rows = {row["case"]: row for row in json.loads(report.read_text())["rows"]}
    assert set(rows) == set(ttfb.UDP_BLOCKED_CASES)
    # A fresh AutoTransport waits the 300 ms fallback delay, then HTTP/2 gets through;
    # once QUIC is marked broken it goes to HTTP/2 at once.
    assert 300 <= rows["auto-udp-blocked"]["median_ms"] < 1000
    assert rows["auto-udp-marked"]["median_ms"] < rows["auto-udp-blocked"]["median_ms"] - 200
