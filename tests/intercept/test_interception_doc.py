"""docs/interception.md's sidecar configuration is valid as written, and its dry run matches."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from quicmesh.tls import DevCA

DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "interception.md"


def test_the_documented_config_passes_check(tmp_path: Path) -> None:
    block = re.search(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None
    text = re.sub(r"^   ", "", block.group(1), flags=re.M)
    (tmp_path / "sidecar.yaml").write_text(text)
    DevCA().save(tmp_path / "ca")
    (tmp_path / "echo-endpoints.yaml").write_text(
        yaml.safe_dump({"endpoints": ["10.79.0.2:15008"], "services": ["10.96.0.11:7007"]})
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "quicmesh",
            "sidecar",
            "-c",
            str(tmp_path / "sidecar.yaml"),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_the_documented_chains_are_what_dry_run_prints() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "quicmesh", "intercept", "install", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    doc = DOC.read_text()
    for line in done.stdout.splitlines():
        if line.startswith("    ") or "chain " in line or "set proxy" in line:
            assert line.strip() in doc, line
