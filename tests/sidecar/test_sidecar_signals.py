"""Signals that reach a sidecar process while it starts.

The admin endpoint answers ("not ready: starting") before every listener is up; a
configuration tool that reloads as soon as it answers must not kill the sidecar.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import yaml

from quicmesh._child import child_environment, python_command
from quicmesh.sidecar.launch import SidecarProcess, free_port, metric

from .conftest import b_config, wait_until


def _answers(sidecar: SidecarProcess) -> bool:
    try:
        sidecar.request("GET", "/ready", timeout=1.0)
    except OSError:
        return False
    return True


def test_a_reload_and_a_log_reopen_asked_during_start_up_happen_once_it_started(
    workdir: Path, echo_port: int, tmp_path: Path
) -> None:
    """SIGHUP or SIGUSR1 before start-up ended killed the process (their handlers were
    installed after it, and both signals' default action ends a process); SIGTERM was
    already handled from the start. Now each waits for the start and is then done."""
    ports = {name: free_port() for name in ("admin", "mesh", "mesh_tcp", "strict")}
    sidecar = SidecarProcess("b-signals", b_config(workdir, echo_port, **ports), tmp_path)
    sidecar.start()
    try:
        wait_until(lambda: _answers(sidecar), what="the admin endpoint")
        sidecar.signal(signal.SIGHUP)
        sidecar.signal(signal.SIGUSR1)
        sidecar.wait_ready()
        wait_until(
            lambda: metric(sidecar.metrics(), "quicmesh_config_reloads_total", result="ok") == 1,
            what="the reload asked during start-up",
        )
        assert sidecar.process is not None and sidecar.process.poll() is None
    finally:
        assert sidecar.stop() == 0, sidecar.stderr()


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(
        next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16
    )
    return bool(mask & (1 << (signum - 1)))


def test_signals_while_the_configuration_is_read_wait_for_the_start(
    workdir: Path, echo_port: int, tmp_path: Path
) -> None:
    """Found by a review: a SIGHUP or SIGUSR1 in the first half second (imports, the
    configuration read, the event loop built) killed the sidecar without a word. The
    configuration here is a FIFO, so that the read waits while the signals arrive (then
    a file, for the reload)."""
    ports = {name: free_port() for name in ("admin", "mesh", "mesh_tcp", "strict")}
    sidecar = SidecarProcess("b-early", b_config(workdir, echo_port, **ports), tmp_path)
    fifo = tmp_path / "b-early.fifo"
    os.mkfifo(fifo)
    text = yaml.safe_dump(sidecar.config, sort_keys=False)
    with open(sidecar.stderr_path, "ab") as err:
        sidecar.process = subprocess.Popen(
            python_command("-m", "quicmesh", "sidecar", "-c", str(fifo)),
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=child_environment(),
        )
    try:
        pid = sidecar.process.pid
        wait_until(lambda: _catches(pid, signal.SIGUSR1), what="the signal handlers")
        sidecar.signal(signal.SIGHUP)
        sidecar.signal(signal.SIGUSR1)
        fifo.write_text(text)  # returns once the sidecar has opened it and taken it
        sidecar.config_path.write_text(text)
        os.replace(sidecar.config_path, fifo)  # what the reload reads
        sidecar.wait_ready()
        wait_until(
            lambda: metric(sidecar.metrics(), "quicmesh_config_reloads_total", result="ok") == 1,
            what="the reload asked while the configuration was read",
        )
        assert sidecar.process.poll() is None
    finally:
        assert sidecar.stop() == 0, sidecar.stderr()


def test_sigterm_while_the_configuration_is_read_stops_the_sidecar(tmp_path: Path) -> None:
    """A sidecar stuck reading its configuration (a FIFO without a writer, a hung
    mount) stops on SIGTERM, as before the early handlers: only SIGHUP and SIGUSR1 are
    kept for later (review of their first version, which kept SIGTERM too)."""
    fifo = tmp_path / "stuck.fifo"
    os.mkfifo(fifo)
    sidecar = subprocess.Popen(
        python_command("-m", "quicmesh", "sidecar", "-c", str(fifo)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=child_environment(),
    )
    try:
        wait_until(lambda: _catches(sidecar.pid, signal.SIGHUP), what="the early handlers")
        sidecar.send_signal(signal.SIGTERM)
        _, err = sidecar.communicate(timeout=10)
        assert sidecar.returncode == -signal.SIGTERM, err
    finally:
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait()
