"""``quicmesh demo`` as a user runs it: the console script, from awkward working directories.

The demo's sidecars are child processes; a child that imported the wrong quicmesh
(a ``quicmesh/`` folder in the working directory) used to crash with a traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quicmesh._child import PACKAGE_ROOT, child_environment, python_command
from quicmesh.errors import QuicmeshError
from quicmesh.sidecar.launch import SidecarProcess, free_port

SCRIPT = shutil.which("quicmesh")
SHADOW = 'raise ImportError("the working directory\'s quicmesh was imported")\n'


def run_demo(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    assert SCRIPT is not None, "the quicmesh console script is not on PATH: pip install -e ."
    return subprocess.run(
        [SCRIPT, "demo", "--duration", "1.5", "--flows", "2", "--size", "2000", *argv],
        cwd=cwd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_demo_runs_from_a_folder_whose_quicmesh_would_shadow_the_package(tmp_path: Path) -> None:
    shadow = tmp_path / "quicmesh"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(SHADOW)
    (shadow / "__main__.py").write_text(SHADOW)
    result = run_demo(tmp_path, "--transport", "h2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "result: every byte arrived intact" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_children_import_this_quicmesh() -> None:
    env = child_environment({"PYTHONPATH": "/elsewhere"})
    probe = "import quicmesh, sys; sys.stdout.write(quicmesh.__file__)"
    result = subprocess.run(
        python_command("-c", probe), cwd="/", env={**os.environ, **env},
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert Path(result.stdout).resolve() == PACKAGE_ROOT / "quicmesh" / "__init__.py"
    assert python_command("-m", "x")[:2] == [sys.executable, "-P"]


def test_a_child_failure_is_one_line(tmp_path: Path) -> None:
    config = {
        "node": {"name": "a", "identity": "spiffe://mesh.local/ns/default/sa/a"},
        "tls": {"ca_dir": str(tmp_path / "no-such-ca")},
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "listeners": {"outbound": [{"name": "o", "address": "127.0.0.1:1", "cluster": "c"}]},
        "clusters": [{"name": "c", "transport": "h2", "target": "127.0.0.1:2",
                      "endpoints": ["127.0.0.1:3"]}],
    }  # fmt: skip
    sidecar = SidecarProcess("a", config, tmp_path)
    sidecar.start()
    with pytest.raises(QuicmeshError) as info:
        sidecar.wait_ready()
    assert sidecar.stop() == 2
    message = str(info.value)
    assert "\n" not in message and message.startswith("sidecar a exited with 2: ")
    assert "no-such-ca" in message
    # A traceback (what a crashed child leaves) comes down to its last line.
    sidecar.stderr_path.write_text(
        'Traceback (most recent call last):\n  File "x", line 1\nImportError: cannot import\n'
    )
    assert sidecar.last_error() == "ImportError: cannot import"
