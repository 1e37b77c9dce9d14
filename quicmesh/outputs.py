"""Output paths given on a command line (``--json FILE``, ``--out DIR``...), checked
when the arguments are parsed: a path that cannot be written is a usage error (exit 2,
one line) before a run, not a traceback after it, with its results lost."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .errors import os_error_text


def output_file(text: str) -> Path:
    """An ``argparse`` type: a file that can be written (created, or replaced later). It
    is tried now: opened for appending (nothing is cut), or created and removed again."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    existed = path.exists()
    try:
        with open(path, "a", encoding="utf-8"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"{text} cannot be written: {os_error_text(exc)}"
        ) from None
    return path


def output_dir(text: str) -> Path:
    """An ``argparse`` type: a directory to write into, made now (with its parents) if it
    does not exist, and tried with a file created and removed."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
    probe = path / f".quicmesh-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"{text} cannot be written: {os_error_text(exc)}"
        ) from None
    return path
