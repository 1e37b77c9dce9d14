"""``quicmesh bench attack`` stopped with ``kill PID`` in the middle of a probe: exit
143 and nothing left behind. It took no SIGTERM handler: the signal's default left the
scratch directory, with the development CA's private key, and the listener process
(its own session, so nobody else stopped it) ran on.

As tests/test_cli_signals_and_options.py: the console script in a subprocess, the
signal sent once the attack is seen under way (an attacker process), never after a
fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from quic_helpers import poll_until

QUICMESH = shutil.which("quicmesh") or "quicmesh"
NOISE = ("Traceback", "ERROR", "never retrieved", "Exception ignored", "was never awaited")


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line names ``text`` (the scratch directory: the
    listener's and the attackers' ``--ca DIR``, the sidecars' ``-c DIR/...``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _attacking(scratch_parent: Path) -> bool:
    """Whether an attacker process of the run (in ``scratch_parent``) is running."""
    for pid in _processes_mentioning(str(scratch_parent)):
        with contextlib.suppress(OSError):
            if b"attacker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


@pytest.fixture
def scratch_parent(tmp_path: Path) -> Iterator[Path]:
    """The run's TMPDIR; whatever process still names it is killed after the test."""
    yield tmp_path
    for pid in _processes_mentioning(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("sidecars", [False, True], ids=["listener", "sidecars"])
def test_sigterm_during_an_attack_exits_143_and_leaves_nothing(
    sidecars: bool, scratch_parent: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    args = ["bench", "attack", "--probe", "initials", "--phase", "1", "--attack", "60"]
    args += ["--initials", "600000"] + (["--sidecars"] if sidecars else [])
    env = {k: v for k, v in os.environ.items() if k != "QUICMESH_QUIC_ENGINE"}
    # (Standard error to a file: a child left behind would hold a pipe open.)
    stderr_path = tmp_path_factory.mktemp("stderr") / "stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [QUICMESH, *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={**env, "TMPDIR": str(scratch_parent)},
            start_new_session=True,
        )
    try:
        poll_until(lambda: _attacking(scratch_parent), 90, "no attacker process started")
        os.kill(process.pid, signal.SIGTERM)  # the command's own process only
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    err = stderr_path.read_text()
    assert code == 143, err
    assert not any(word in err for word in NOISE), err
    poll_until(lambda: not _processes_mentioning(str(scratch_parent)), 20, "a process was left")
    assert list(scratch_parent.iterdir()) == []  # the scratch directory, with its CA key
