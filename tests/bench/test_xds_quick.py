"""The xDS scale benchmark: a quick run through the console script, and its bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quicmesh.bench import xds


def test_quick_run_applies_every_cluster_and_endpoint(tmp_path: Path) -> None:
    report = tmp_path / "xds.json"
    result = subprocess.run(
        [sys.executable, "-m", "quicmesh", "bench", "xds", "--quick", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "| 100 | 1000 |" in result.stdout and "full / tenth" in result.stdout
    runs = json.loads(report.read_text())
    assert {(r["clusters"], r["endpoints"]) for r in runs} == {(10, 100), (100, 1000)}
    for run in runs:
        assert run["apply_seconds"] > 0 and run["update_seconds"] > 0
        assert run["rss_after_mib"] >= run["rss_baseline_mib"] > 0


@pytest.mark.parametrize(
    "argv", [["--clusters", "5"], ["--clusters", "100", "--endpoints", "10"], ["--repeat", "0"]]
)
def test_bad_options_exit_2(argv: list[str]) -> None:
    assert xds.main(argv) == 2
