"""``quicmesh sidecar -c FILE --check`` refuses an overload limit the sidecar is over
already, as the start does (review 27: ``overload_max_rss: 1`` and
``overload_max_descriptors: 3`` passed ``--check``, then the start refused them), in one
line naming the file and the field as other configuration errors do."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from quicmesh.tls import DevCA

SCRIPT = shutil.which("quicmesh")


def _write(tmp_path: Path, limit: dict[str, Any]) -> Path:
    DevCA().save(tmp_path / "ca")
    listener = {"transports": ["quic", "h2"], "destinations": ["127.0.0.1:9080"]}
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "node": {"name": "b", "identity": "spiffe://mesh.local/b"},
                "tls": {"ca_dir": "ca"},
                "admin": {"address": "127.0.0.1:25000"},
                "listeners": {
                    "inbound": [
                        {"name": "mesh", "address": "127.0.0.1:25008", **listener},
                        {"name": "mesh2", "address": "127.0.0.1:25009", **listener, **limit},
                    ]
                },
            }
        )
    )
    return path


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    assert SCRIPT is not None, "the quicmesh console script is not on PATH: pip install -e ."
    return subprocess.run(
        [SCRIPT, "sidecar", "-c", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("limit", "said"),
    [
        (
            {"overload_max_rss": 1},
            "listeners.inbound[1].overload_max_rss: 1 MiB is below what the sidecar uses already (",
        ),
        (
            {"overload_max_descriptors": 3},
            "listeners.inbound[1].overload_max_descriptors: 3 is below what the sidecar uses "
            "already (",
        ),
    ],
)
def test_check_refuses_an_overload_limit_the_sidecar_is_over_already(
    tmp_path: Path, limit: dict[str, Any], said: str
) -> None:
    path = _write(tmp_path, limit)
    done = _check(path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"quicmesh sidecar: {path}: {said}"), line
    assert line.endswith("streams are refused from 90% of it)"), line


def test_check_passes_limits_the_sidecar_is_under(tmp_path: Path) -> None:
    path = _write(tmp_path, {"overload_max_rss": 1 << 20, "overload_max_descriptors": 1 << 20})
    done = _check(path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path}: ok"
