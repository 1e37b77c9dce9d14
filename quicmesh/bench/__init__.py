"""Benchmarks: ``python -m quicmesh.bench <name>`` or ``quicmesh bench <name>``.

Each benchmark prints ratios against a baseline measured in the same run, since
these machines are noisy; none of them asserts a speed.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any


def source_state() -> dict[str, Any]:
    """The git commit of the code about to run and its locally modified files (best
    effort: empty outside a git checkout). Take it when a run starts: a commit made
    during a long run must not be credited with its numbers."""
    root = Path(__file__).resolve().parents[2]
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        state["commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "quicmesh"],
            capture_output=True, text=True, timeout=5,
        ).stdout  # fmt: skip
        state["modified"] = sorted(
            line[3:] for line in status.splitlines() if line.startswith(" M")
        )
    return state
