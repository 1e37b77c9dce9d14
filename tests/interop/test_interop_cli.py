"""``python -m interop.run`` as a user runs it: --help, a bad name, and one small matrix.

The matrix run plays the native engine against ngtcp2 (both roles, ``handshake``)
and writes the generated section into a copy of a document. Skipped without
ngtcp2 or the native extension unless ``QUICMESH_REQUIRE_INTEROP`` is set (CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from interop.peers import PEERS, REPO
from interop.run import MATRIX_END, MATRIX_START


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "interop.run", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def test_help_names_the_engines_option() -> None:
    result = _run("--help")
    assert result.returncode == 0
    assert "--engines" in result.stdout and "aioquic,native" in result.stdout


def test_an_unknown_engine_is_a_one_line_error() -> None:
    result = _run("--engines", "picoquic", "--no-install", "--no-write")
    assert result.returncode == 2
    assert "--engines: unknown picoquic (known: aioquic, native)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("option", ["--engines", "--peers", "--tests"])
def test_an_option_naming_nothing_is_a_usage_error(option: str) -> None:
    result = _run(option, " , ", "--no-install", "--no-write")
    assert result.returncode == 2
    assert f"{option} names nothing" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_whose_peers_are_all_missing_says_so_and_fails(tmp_path: Path) -> None:
    """It printed an empty matrix and "0 passed, 0 failed" with status 0."""
    if PEERS["qh3"].available():
        pytest.skip("qh3 is installed here")
    result = _run(
        "--peers", "qh3", "--engines", "aioquic", "--no-install", "--logs", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    assert "skipping qh3: not installed" in result.stderr
    assert "no peer stack can run: nothing to test" in result.stderr
    assert MATRIX_START not in result.stdout


@pytest.mark.parametrize("option", ["--logs", "--output"])
def test_a_path_that_cannot_be_written_is_a_usage_error_before_the_run(option: str) -> None:
    result = _run("--engines", "native", "--no-install", option, "/proc/nope/x")
    assert result.returncode == 2, result.stdout
    assert f"argument {option}: /proc/nope/x cannot be written" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_partial_run_prints_its_matrix_and_leaves_the_committed_one(tmp_path: Path) -> None:
    """Without ``--output`` only a run of everything writes docs/interop.md: the documented
    one-peer example replaced the whole committed matrix with its 2x2 table."""
    committed = (REPO / "docs" / "interop.md").read_text()
    result = _run(
        "--engines", "aioquic", "--peers", "quicmesh", "--tests", "handshake", "--quick",
        "--no-install", "--logs", str(tmp_path / "logs"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert MATRIX_START in result.stdout and "| quicmesh → quicmesh |" in result.stdout
    # The matrix names the command that made it, with the options that chose the subset.
    assert (
        "Run: `python -m interop.run --quick --engines aioquic --peers quicmesh --tests handshake`"
        in result.stdout
    )
    assert (REPO / "docs" / "interop.md").read_text() == committed


def test_a_native_matrix_against_ngtcp2_is_written(tmp_path: Path) -> None:
    available = PEERS["ngtcp2"].available() and PEERS["quicmesh-native"].available()
    if not available:
        if os.environ.get("QUICMESH_REQUIRE_INTEROP"):
            pytest.fail(
                "QUICMESH_REQUIRE_INTEROP is set but ngtcp2 or the native engine is missing"
            )
        pytest.skip("needs ngtcp2's gtlsclient/gtlsserver and the native extension")
    doc = tmp_path / "interop.md"
    doc.write_text(f"# notes kept\n\n{MATRIX_START}\nold\n{MATRIX_END}\n\ntail kept\n")
    result = _run(
        "--engines",
        "native",
        "--peers",
        "ngtcp2",
        "--tests",
        "handshake",
        "--quick",
        "--no-install",
        "--logs",
        str(tmp_path / "logs"),
        "--output",
        str(doc),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed, 0 failed, 0 unsupported" in result.stdout
    text = doc.read_text()
    assert text.startswith("# notes kept") and text.rstrip().endswith("tail kept")
    assert "old" not in text
    assert "| quicmesh-native → ngtcp2 | ✓ |" in text
    assert "| ngtcp2 → quicmesh-native | ✓ |" in text
    assert "load average" in text
    assert (tmp_path / "logs" / "ngtcp2_quicmesh-native" / "handshake" / "result.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-m", "interop.run", "--seed", "x"], "argument --seed: invalid int value"),
        (["-m", "interop.h2_nghttpx", "--logs", "/etc/passwd"], "/etc/passwd is a file"),
    ],
)
def test_interop_usage_errors_are_one_line(argv: list[str], message: str) -> None:
    # Found by a review: argparse's usage block, and a FileExistsError traceback.
    done = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
