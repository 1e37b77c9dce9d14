"""Benchmarks: ``python -m quicmesh.bench <name>`` or ``quicmesh bench <name>``.

Each benchmark prints ratios against a baseline measured in the same run, since
these machines are noisy; none of them asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError
from ..netem.config import parse_percent
from ..outputs import output_dir


class OneLineParser(argparse.ArgumentParser):
    """The benchmarks' argument parser: a bad option is one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


MAX_RTT_SECONDS = 60.0
"""The longest ``--rtt`` a benchmark takes (a minute: ``1e9`` reached the link emulator,
which refused it after the run had begun, naming its own one-way delay)."""


def rtt_seconds(text: str) -> float:
    """An ``argparse`` type: a round-trip time in seconds (``0.04``), above 0 and at
    most :data:`MAX_RTT_SECONDS`."""
    value = positive_number(text)
    if value > MAX_RTT_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_RTT_SECONDS:g} seconds, not {text!r} (0.04 is 40 ms)"
        )
    return value


def positive_number(text: str) -> float:
    """An ``argparse`` type: a finite number above 0 (``nan`` ran a benchmark for ever,
    ``inf`` and negatives no better)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text!r}")
    return value


def loss_percentages(text: str) -> tuple[float, ...]:
    """An ``argparse`` type: a benchmark's loss rates, ``0,0.5,2%``, as fractions. A bare
    number is a percentage, as ``quicmesh netem --loss`` reads it (one parser for both:
    :func:`~quicmesh.netem.config.parse_percent`); each below 100 %."""
    values = []
    for part in text.split(","):
        try:
            value = parse_percent(part.strip(), bare="percent")
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value >= 1:
            raise argparse.ArgumentTypeError(f"loss must be below 100 %, not {part.strip()!r}")
        values.append(value)
    return tuple(values)


def positive_integer(text: str) -> int:
    """An ``argparse`` type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return value


def cases_problem(cases: list[str], known: tuple[str, ...]) -> str | None:
    """What is wrong with a benchmark's ``--cases`` (one line naming it, for the
    parser's error), or None: ``cases`` empty or naming one not in ``known``."""
    if not cases:
        return f"argument --cases: no case given: choose from {','.join(known)}"
    unknown = [case for case in cases if case not in known]
    if unknown:
        return f"argument --cases: unknown case {unknown[0]!r}: choose from {','.join(known)}"
    return None


def tried_output_dir(text: str) -> Path:
    """An ``argparse`` type: ``--out DIR``, tried as :func:`~quicmesh.outputs.output_dir`
    tries it, then left as it was: the directories made for the trial are removed again
    (the run makes them when it writes), so that a run refused after its arguments were
    read (no root) leaves nothing behind."""
    path = Path(text)
    made = [directory for directory in (path, *path.parents) if not directory.exists()]
    try:
        return output_dir(text)
    finally:
        for directory in made:  # the deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()


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
