"""The benchmarks that build network namespaces, run without root as a user would: one
line naming the need for root and exit 2, as ``quicmesh netem`` (they exited 1), and
nothing left behind (``bench hol`` and ``bench congestion`` made ``--out`` first).

As root the console script runs as nobody under ``setpriv``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = shutil.which("quicmesh")
NOBODY = 65534


def _as_nobody(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The ``quicmesh`` console script with ``argv``, in ``cwd``, not as root."""
    assert SCRIPT is not None, "the quicmesh console script is not on PATH: pip install -e ."
    command = [SCRIPT, *argv]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed"
        # CAP_DAC_READ_SEARCH (read and search only) is kept so that nobody reaches an
        # interpreter installed under a private home (/root is 0700 here); it is none of
        # the privileges the benchmarks need, and the user ID is nobody's.
        command = [
            setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", *command,
        ]  # fmt: skip
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory nobody may write in (where the benchmark would write)."""
    tmp_path.chmod(0o777)
    return tmp_path


@pytest.mark.parametrize("name", ["ttfb", "hol", "congestion", "intercept"])
def test_without_root_a_benchmark_says_so_in_one_line_and_exits_2(name: str, workdir: Path) -> None:
    done = _as_nobody(["bench", name, "--quick"], workdir)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"quicmesh bench {name}: ") and "needs root" in line, line


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "hol", "--quick"],  # (--out's default, hol-results, in the current folder)
        ["bench", "hol", "--quick", "--out", "results/hol"],
        ["bench", "congestion", "--quick"],
        ["bench", "congestion", "--quick", "--out", "results/congestion"],
    ],
)
def test_a_run_refused_without_root_leaves_no_output_directory(
    argv: list[str], workdir: Path
) -> None:
    done = _as_nobody(argv, workdir)
    assert done.returncode == 2 and "needs root" in done.stderr, done.stdout + done.stderr
    assert not list(workdir.iterdir())
