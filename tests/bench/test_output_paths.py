"""Output paths on the command line are checked when the arguments are parsed: a path
that cannot be written is a one-line usage error before a run (it was a traceback after
it, the run's results lost)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from quicmesh.outputs import output_dir, output_file

BAD_FILE = "/proc/nope/results.json"
BAD_DIR = "/proc/nope"


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "intercept", "--quick", "--json", BAD_FILE],
        ["bench", "ttfb", "--quick", "--json", BAD_FILE],
        ["bench", "migration", "--quick", "--json", BAD_FILE],
        ["bench", "throughput", "--quick", "--json", BAD_FILE],
        ["bench", "throughput", "--quick", "--profile", BAD_DIR],
        ["bench", "xds", "--quick", "--json", BAD_FILE],
        ["bench", "overhead", "--quick", "--json", BAD_FILE],
        ["bench", "hol", "--quick", "--out", BAD_DIR],
        ["bench", "congestion", "--quick", "--out", "/etc/hostname"],
        ["fuzz", "--seconds", "1", "--target", "connect", "--crashes", "/etc/hostname"],
        ["fuzz", "--seconds", "1", "--target", "connect", "--corpus", BAD_DIR],
    ],
)
def test_an_output_path_that_cannot_be_written_is_a_usage_error(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quicmesh", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if argv[-2] in line]
    assert errors and ("cannot be written" in errors[-1] or "not a directory" in errors[-1]), (
        result.stderr
    )
    assert "input kept" not in result.stdout + result.stderr  # (no crash reported)


def test_a_file_is_tried_without_cutting_or_leaving_one(tmp_path: Path) -> None:
    kept = tmp_path / "kept.json"
    kept.write_text("earlier results")
    assert output_file(str(kept)) == kept and kept.read_text() == "earlier results"
    new = tmp_path / "new.json"
    assert output_file(str(new)) == new and not new.exists()
    for bad in (str(tmp_path), str(tmp_path / "missing" / "x.json"), ""):
        with pytest.raises(argparse.ArgumentTypeError):
            output_file(bad)


def test_a_directory_is_made_and_tried(tmp_path: Path) -> None:
    made = tmp_path / "a" / "b"
    assert output_dir(str(made)) == made and made.is_dir() and not any(made.iterdir())
    (tmp_path / "file").write_text("x")
    for bad in (str(tmp_path / "file"), str(tmp_path / "file" / "sub"), ""):
        with pytest.raises(argparse.ArgumentTypeError):
            output_dir(bad)
