"""Starting quicmesh's own Python child processes so they import the same quicmesh.

A child started as ``python -m quicmesh ...`` puts its working directory first
on ``sys.path``. Run from a folder that holds a ``quicmesh/`` directory (the
clone itself, next to an editable install), that directory shadows the
installed package: the child fails with ``ImportError: cannot import name ...
(unknown location)``. :func:`python_command` starts children with ``-P`` (no
unsafe path entry, Python 3.11+), and :func:`child_environment` puts the
directory the parent's quicmesh came from on ``PYTHONPATH`` unless a
site-packages directory already provides it, so the child imports the parent's
code whatever its working directory holds.
"""

from __future__ import annotations

import os
import site
import sys
from collections.abc import Mapping
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
"""The directory holding the ``quicmesh`` package this process runs."""


def python_command(*args: str) -> list[str]:
    """``[python, -P, *args]``: this interpreter, without the working directory on its path."""
    return [sys.executable, "-P", *args]


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (by default this process's environment) for a child started with
    :func:`python_command`: ``PYTHONPATH`` leads to this process's quicmesh."""
    env = dict(os.environ if base is None else base)
    if _installed_in_site_packages():
        return env
    entries = [e for e in env.get("PYTHONPATH", "").split(os.pathsep) if e]
    if str(PACKAGE_ROOT) not in entries:
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *entries])
    return env


def _installed_in_site_packages() -> bool:
    directories = [*site.getsitepackages(), site.getusersitepackages()]
    return any(Path(d).resolve() == PACKAGE_ROOT for d in directories if d)
