"""Signals that reach a sidecar process while it starts.

The admin endpoint answers ("not ready: starting") before every listener is up; a
configuration tool that reloads as soon as it answers must not kill the sidecar.
"""

from __future__ import annotations

import signal
from pathlib import Path

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
