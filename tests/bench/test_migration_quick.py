"""The migration benchmark: a tiny run on loopback through the delay relays.

No timing assertions: QUIC flows must all survive both the active migration and
the NAT rebinding, and the HTTP/2 baseline must lose its flows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quicmesh.bench import migration
from tests.quic_helpers import require_engine


def test_quick_run_on_the_native_engine_keeps_quic_flows(tmp_path: Path) -> None:
    """``--engine native``: the same cases with quinn under QuicTransport."""
    require_engine("native")
    report = tmp_path / "migration.json"
    argv = ["--quick", "--duration", "1", "--cases", "quic-migrate,quic-rebind"]
    assert migration.main([*argv, "--engine", "native", "--json", str(report)]) == 0
    rows = {row["case"]: row for row in json.loads(report.read_text())["rows"]}
    for case in ("quic-migrate", "quic-rebind"):
        assert rows[case]["flows_lost"] == 0
        assert rows[case]["stall_ms"] is not None


def test_quick_run_keeps_quic_flows_and_loses_h2_ones(tmp_path: Path) -> None:
    report = tmp_path / "migration.json"
    assert migration.main(["--quick", "--duration", "1", "--json", str(report)]) == 0
    rows = {row["case"]: row for row in json.loads(report.read_text())["rows"]}
    for case in ("quic-migrate", "quic-rebind"):
        assert rows[case]["flows_lost"] == 0
        assert rows[case]["stall_ms"] is not None
    assert rows["h2-rebind"]["flows_lost"] == rows["h2-rebind"]["flows"]
    assert rows["h2-rebind"]["stall_ms"] is None


def test_a_paced_run_reports_its_rate_and_keeps_quic_flows(tmp_path: Path) -> None:
    """``--rate``: each download paced; the console script, as a user runs it."""
    require_engine("native")
    report = tmp_path / "migration.json"
    done = subprocess.run(
        ["quicmesh", "bench", "migration", "--quick", "--duration", "1", "--rate", "4",
         "--cases", "quic-migrate,quic-rebind", "--engine", "native", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "(each paced at 4 Mbit/s)" in done.stdout.splitlines()[0]
    rows = json.loads(report.read_text())["rows"]
    assert [row["case"] for row in rows] == ["quic-migrate", "quic-rebind"]
    for row in rows:
        assert row["rate_mbit"] == 4 and row["flows_lost"] == 0
        # Paced at 500 kB/s a flow for about a second: not more than that went.
        assert 0 < row["received_bytes"] <= 4 * 1.5 * 500e3, row


@pytest.mark.parametrize(
    "argv",
    [["--rtt", "-1"], ["--flows", "0"], ["--cases", "tcp"], ["--rate", "0"], ["--cases", ""]],
)
def test_bad_options_exit_2(argv: list[str]) -> None:
    assert migration.main(argv) == 2


@pytest.mark.parametrize("bench", ["migration", "ttfb", "congestion", "hol"])
def test_an_unknown_engine_is_one_line_and_exit_2(bench: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quicmesh", "bench", bench, "--engine", "quiche"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        f"quicmesh bench {bench}: --engine: unknown QUIC engine 'quiche': "
        "valid engines are aioquic, native"
    ]
