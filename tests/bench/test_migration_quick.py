"""The migration benchmark: a tiny run on loopback through the delay relays.

No timing assertions: QUIC flows must all survive both the active migration and
the NAT rebinding, and the HTTP/2 baseline must lose its flows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quicmesh.bench import migration


def test_quick_run_keeps_quic_flows_and_loses_h2_ones(tmp_path: Path) -> None:
    report = tmp_path / "migration.json"
    assert migration.main(["--quick", "--duration", "1", "--json", str(report)]) == 0
    rows = {row["case"]: row for row in json.loads(report.read_text())["rows"]}
    for case in ("quic-migrate", "quic-rebind"):
        assert rows[case]["flows_lost"] == 0
        assert rows[case]["stall_ms"] is not None
    assert rows["h2-rebind"]["flows_lost"] == rows["h2-rebind"]["flows"]
    assert rows["h2-rebind"]["stall_ms"] is None


@pytest.mark.parametrize("argv", [["--rtt", "-1"], ["--flows", "0"], ["--cases", "tcp"]])
def test_bad_options_exit_2(argv: list[str]) -> None:
    assert migration.main(argv) == 2
