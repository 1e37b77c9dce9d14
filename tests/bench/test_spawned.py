"""The benchmarks' helper processes (``quicmesh.bench._spawned``) leave nothing behind.

``kill PID`` reaching a benchmark while its receiver was still starting left that child
(and multiprocessing's resource tracker beside it) running after the benchmark had
exited: the child ended only when the kernel's parent-death signal reached it. Each
test here runs a parent in a child process, as ``quicmesh bench`` runs, and looks at
its descendants the moment it has exited.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from process_helpers import descendants, running

from quicmesh._child import child_environment

TARGETS = textwrap.dedent(
    """
    import os, sys, time
    from quicmesh.sidecar.launch import die_with_parent

    def never_ready(setup, control, parent):
        die_with_parent(parent)
        print("child", os.getpid(), flush=True)
        time.sleep(600)

    def echo(setup, control, parent):
        die_with_parent(parent)
        control.send(setup)
        while True:
            message = control.recv()
            if message == "stop":
                return
            control.send(message)
    """
)

PARENT = textwrap.dedent(
    """
    import os, sys
    from quicmesh.bench._spawned import SpawnedChild
    from quicmesh.sidecar.launch import terminate_as_exit
    import targets

    with terminate_as_exit():
        if sys.argv[1] == "start":
            SpawnedChild(targets.never_ready, None, "never-ready")
        elif sys.argv[1] == "two":
            first = SpawnedChild(targets.echo, 1, "first")
            second = SpawnedChild(targets.echo, 2, "second")
            first.stop("stop")
            assert second.ask("still here", 10) == "still here"
            second.stop("stop")
            print("both stopped", flush=True)
        else:
            child = SpawnedChild(targets.echo, "hello", "echo")
            assert child.ready == "hello"
            assert child.ask("ping", 10) == "ping"
            print("answered", flush=True)
            child.stop("stop")
            print("stopped", flush=True)
            sys.stdin.readline()  # alive until the test has looked
    """
)


def _parent(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    (tmp_path / "targets.py").write_text(TARGETS)
    env = child_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-c", PARENT, mode],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.timeout(120)
def test_sigterm_while_the_child_starts_leaves_no_process(tmp_path: Path) -> None:
    parent = _parent(tmp_path, "start")
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.startswith("child "), line + parent.stdout.read()
        child = int(line.split()[1])
        children = descendants(parent.pid)
        assert child in children
        assert len(children) == 2  # the child and the resource tracker

        parent.send_signal(signal.SIGTERM)
        output, _ = parent.communicate(timeout=60)
    finally:
        parent.kill()

    assert parent.returncode == 128 + signal.SIGTERM, output
    assert [pid for pid in children if running(pid)] == []
    assert "Traceback" not in output, output


@pytest.mark.timeout(120)
def test_a_stopped_child_and_its_tracker_are_gone_before_stop_returns(tmp_path: Path) -> None:
    parent = _parent(tmp_path, "ask")
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline() == "answered\n"
        children = descendants(parent.pid)
        assert len(children) == 2  # the child and the resource tracker
        assert parent.stdout.readline() == "stopped\n"
        # The parent still runs (it waits for a line on stdin): its children do not.
        assert [pid for pid in children if running(pid)] == []
        output, _ = parent.communicate("\n", timeout=60)
    finally:
        parent.kill()
    assert parent.returncode == 0, output


@pytest.mark.timeout(120)
def test_stopping_one_child_does_not_wait_for_another(tmp_path: Path) -> None:
    # Found by a review: stopping the resource tracker waited for it, and it ends only
    # once every child holding its pipe has: stop() hung while another child ran.
    parent = _parent(tmp_path, "two")
    try:
        output, _ = parent.communicate("", timeout=60)
    finally:
        parent.kill()
    assert (parent.returncode, output) == (0, "both stopped\n"), output
