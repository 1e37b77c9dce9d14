"""A wheel-only install works: build the wheel, install it into a fresh venv, run the demo.

This is the slowest test of the suite that needs no root (about 30-60 s: a plain
``python -m venv``, ``pip install`` of the wheel, whose dependencies come from
PyPI or pip's cache, and a short ``quicmesh demo``). It proves what an editable
install or this checkout on ``PYTHONPATH`` cannot: that the wheel carries every
module and data file the console script needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH and no active virtualenv: only the venv's own packages count."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_a_wheel_only_install_runs_the_demo(tmp_path: Path) -> None:
    # Build from a copy, so the checkout gets no build/ folder.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "quicmesh", source / "quicmesh",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                  str(tmp_path / "dist"), str(source)])  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("quicmesh-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    packaged = {Path(n).parent.as_posix() for n in names if n.startswith("quicmesh/")}
    on_disk = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "quicmesh").rglob("*.py")}
    assert on_disk <= packaged, f"missing from the wheel: {sorted(on_disk - packaged)}"
    assert "quicmesh/py.typed" in names
    assert metadata["Author-email"] and metadata["License"] == "BSD-3-Clause"
    assert "License :: OSI Approved :: BSD License" in metadata.get_all("Classifier")
    assert metadata["Requires-Python"] == ">=3.11"

    venv = tmp_path / "venv"
    created = _run([sys.executable, "-m", "venv", str(venv)])  # plain: no system packages
    assert created.returncode == 0, created.stderr
    python, script = venv / "bin" / "python", venv / "bin" / "quicmesh"
    installed = _run([str(python), "-m", "pip", "install", "-q",
                      "--disable-pip-version-check", str(wheel)], env=_clean_env())  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]

    where = _run([str(python), "-c", "import quicmesh; print(quicmesh.__file__)"],
                 env=_clean_env(), cwd=tmp_path)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    version = _run([str(script), "--version"], env=_clean_env(), cwd=tmp_path)
    assert version.stdout.strip() == "quicmesh 0.1.0", version.stderr
    demo = _run(
        [str(script), "demo", "--duration", "1.5", "--flows", "2", "--size", "2000"],
        env=_clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "result: every byte arrived intact" in demo.stdout
