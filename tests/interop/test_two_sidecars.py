"""The two-sidecar demo in its short mode: migration and 0-RTT through real processes.

Runs ``python -m interop.two_sidecars --quick`` as a user would and checks its
exit status and the checks it printed (each one compares bytes or reads the
sidecars' ``/metrics``). Without curl the script uses its Python clients only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_two_sidecars_quick(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "interop.two_sidecars", "--quick", "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "[FAIL]" not in report
    for check in (
        "A's QUIC connection migrated mid-transfer",
        "B saw A's new address and validated the path",
        "every flow through A and B completed (none reset)",
        "A resumed with 0-RTT and B accepted it: 1 of 1 accepted",
        "B redeemed A's session ticket (single use)",
        "python download via A: every byte intact",
    ):
        assert f"[ok] {check}" in report, report
    if shutil.which("curl"):
        assert "[ok] curl download via A: every byte intact" in report, report
        assert "[ok] curl download via restarted A: every byte intact" in report, report
    assert "every byte arrived intact" in report
