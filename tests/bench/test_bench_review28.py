"""``quicmesh bench hol`` and ``bench congestion`` stopped from outside, and hol's --interval.

``kill PID`` and ``timeout`` send SIGTERM: the benchmarks must then tear their link down
(no ``qmnetem-<pid>-*`` namespace left), remove hol's scratch directory (it holds a CA
key) and leave no worker running; a benchmark killed outright (SIGKILL) must still take
its hol workers with it. Each runs the command line in a child process, as a user does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from process_helpers import descendants, running

from quicmesh.bench._hol_worker import WorkerConfig

REPO = Path(__file__).resolve().parents[2]
"""The checkout under test: ``python -m quicmesh`` run from here imports its code."""


def _start(argv: list[str], tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """``python -m quicmesh ARGV`` with its temporary files under ``tmp_path/tmp``."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    process = subprocess.Popen(
        [sys.executable, "-m", "quicmesh", *argv],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, scratch


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (an outside process's state) until true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:g} s")
        time.sleep(0.1)


def _namespaces_of(pid: int) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [name for name in names if name.startswith(f"qmnetem-{pid}-")]


@pytest.fixture
def cleanup() -> Iterator[list[subprocess.Popen[str]]]:
    """Whatever a failed run left: its processes killed, its own namespaces deleted
    (only ``qmnetem-<pid of a benchmark started here>-*``, never another test's)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        for pid in descendants(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
        process.communicate()
    for process in started:
        for name in _namespaces_of(process.pid):
            subprocess.run(["ip", "netns", "delete", name], check=False)


HOL = [
    "bench", "hol", "--quick", "--no-stall", "--loss", "0", "--transports", "quic-bbr",
    "--seeds", "1", "--warmup", "0.5", "--duration", "120", "--grace", "1",
]  # fmt: skip


def _hol_workers(bench: int) -> list[int]:
    return [pid for pid in descendants(bench) if "_hol_worker" in _command_line(pid)]


def _wait_for_hol_client(process: subprocess.Popen[str]) -> list[int]:
    def client_running() -> bool:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        return any(" client " in _command_line(pid) for pid in _hol_workers(process.pid))

    _until(client_running, 90, "the hol client worker did not start")
    return _hol_workers(process.pid)


@pytest.mark.netns
@pytest.mark.timeout(240)
def test_hol_sigterm_tears_down_link_scratch_and_workers(
    tmp_path: Path, cleanup: list[subprocess.Popen[str]]
) -> None:
    process, scratch = _start([*HOL, "--out", str(tmp_path / "out")], tmp_path)
    cleanup.append(process)
    workers = _wait_for_hol_client(process)
    assert _namespaces_of(process.pid)
    assert [p.name for p in scratch.iterdir()] != []  # the scratch dir with the CA key

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 128 + signal.SIGTERM, output
    assert _namespaces_of(process.pid) == []
    assert list(scratch.iterdir()) == []
    assert [pid for pid in workers if running(pid)] == []


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_ttfb_termination_tears_its_link_down(
    signum: int, tmp_path: Path, cleanup: list[subprocess.Popen[str]]
) -> None:
    """``kill`` or ``timeout`` (SIGTERM), or a hung-up terminal (SIGHUP), ended the ttfb
    benchmark at once and left both namespaces of its link (a review); Ctrl-C did not."""
    process, _ = _start(["bench", "ttfb", "--quick", "--trials", "50"], tmp_path)
    cleanup.append(process)
    _until(lambda: bool(_namespaces_of(process.pid)), 60, "the ttfb link was not set up")
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, output
    assert _namespaces_of(process.pid) == []


_SUBREAPER_DRIVER = """
import ctypes, json, os, signal, subprocess, sys, time
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]  # tests/bench, tests
from process_helpers import descendants
from test_bench_review28 import _command_line

libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the bench's orphans become ours
bench = subprocess.Popen(
    [sys.executable, "-m", "quicmesh", *sys.argv[2:]],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)
print(bench.pid, flush=True)


def has_socket(pid):  # the worker's main() runs (die_with_parent first), not its imports
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


deadline = time.monotonic() + 90
workers = []
while not (len(workers) == 2 and all(has_socket(pid) for pid in workers)):
    if bench.poll() is not None or time.monotonic() > deadline:
        print(json.dumps({"error": "the hol workers did not start"}), flush=True)
        sys.exit(1)
    time.sleep(0.1)
    workers = [p for p in descendants(bench.pid) if "_hol_worker" in _command_line(p)]
others = [p for p in descendants(bench.pid) if p not in workers]
bench.kill()  # SIGKILL: no finally block runs; only the kernel can stop the workers
bench.wait()
ended = {}
deadline = time.monotonic() + 60
while len(ended) < len(workers) and time.monotonic() < deadline:
    for pid in workers:
        if pid not in ended:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ended[pid] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1
    time.sleep(0.05)
for pid in [*workers, *others]:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
print(json.dumps({"workers": len(workers), "signals": sorted(ended.values())}), flush=True)
"""


@pytest.mark.netns
@pytest.mark.timeout(240)
def test_hol_workers_die_with_a_killed_benchmark(tmp_path: Path) -> None:
    # A subreaper process runs the bench, so that the orphaned workers become its
    # children and it can read how they ended: by the kernel's SIGTERM the moment the
    # bench died (die_with_parent), not on their own later, or never.
    driver = subprocess.run(
        [sys.executable, "-c", _SUBREAPER_DRIVER, str(Path(__file__).parent),
         *HOL, "--out", str(tmp_path / "out")],
        cwd=REPO,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=200,
    )  # fmt: skip
    lines = driver.stdout.splitlines()
    try:
        assert driver.returncode == 0, driver.stdout + driver.stderr
        result = json.loads(lines[-1])
        assert result["workers"] == 2, driver.stdout  # server and client
        assert result["signals"] == [signal.SIGTERM, signal.SIGTERM], driver.stdout
    finally:
        if lines and lines[0].isdigit():
            for name in _namespaces_of(int(lines[0])):
                subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.netns
@pytest.mark.timeout(240)
def test_congestion_sigterm_tears_down_link_and_receiver(
    tmp_path: Path, cleanup: list[subprocess.Popen[str]]
) -> None:
    argv = [
        "bench", "congestion", "--losses", "0", "--flows", "quic-bbr", "--fairness", "none",
        "--duration", "120", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    process, _ = _start(argv, tmp_path)
    cleanup.append(process)

    def receiver_running() -> bool:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        return bool(_namespaces_of(process.pid)) and any(
            "multiprocessing" in _command_line(pid) for pid in descendants(process.pid)
        )

    _until(receiver_running, 90, "the congestion receiver did not start")
    children = descendants(process.pid)

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 128 + signal.SIGTERM, output
    assert _namespaces_of(process.pid) == []
    assert [pid for pid in children if running(pid)] == []


@pytest.mark.parametrize("interval", ["0", "0ms", "0.5ms", "-1ms"])
def test_hol_interval_below_one_millisecond_is_refused(interval: str, tmp_path: Path) -> None:
    # With 0 the client worker sent requests without ever yielding; its memory grew
    # about 140 MB/s and the run never ended. (--replot: code that takes the interval
    # then only re-renders an empty folder instead of starting such a run.)
    argv = ["bench", "hol", "--interval", interval, "--replot", "--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "quicmesh", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("quicmesh bench hol: ")
    assert "--interval" in result.stderr


def test_hol_worker_refuses_a_zero_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        WorkerConfig(transport="quic", congestion_control="bbr", ca_dir="x", server_address="x",
                     interval=0.0)  # fmt: skip
