"""Thin adaptor running ``nft``: apply a script, read the quicmesh table back.

``nft`` runs as a child process, inside a named network namespace when asked
(``ip netns exec``). Failures become :class:`InterceptError` with one line
naming what is missing or what ``nft`` said.
"""

from __future__ import annotations

import shutil
import subprocess

from ..errors import QuicmeshError
from .rules import TABLE

_CAP_NET_ADMIN = 12
_TIMEOUT = 60.0


class InterceptError(QuicmeshError):
    """The capture rules could not be written, read or removed."""


def missing_privileges() -> str | None:
    """Why this process cannot write nft rules (one line), or ``None`` if it can."""
    if shutil.which("nft") is None:
        return "needs the nft command (Debian package nftables), which is not on PATH"
    if not _has_capability(_CAP_NET_ADMIN):
        return "needs CAP_NET_ADMIN to change nftables rules (run as root)"
    return None


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def _argv(netns: str | None, *args: str) -> list[str]:
    prefix = ["ip", "netns", "exec", netns] if netns is not None else []
    return [*prefix, "nft", *args]


def _run(argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InterceptError(f"{' '.join(argv)}: {exc}") from None


def apply(script: str, netns: str | None = None) -> None:
    """Run ``nft -f -`` with ``script`` (one transaction: all of it or nothing).

    :raises InterceptError: privileges are missing or nft rejected the script.
    """
    reason = missing_privileges()
    if reason is not None:
        raise InterceptError(reason)
    result = _run(_argv(netns, "-f", "-"), script)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        message = lines[0] if lines else f"exit status {result.returncode}"
        where = f" in network namespace {netns}" if netns else ""
        raise InterceptError(f"nft{where}: {message}")


def list_table(netns: str | None = None) -> str | None:
    """The quicmesh table as ``nft list table`` prints it, or ``None`` if it is absent."""
    reason = missing_privileges()
    if reason is not None:
        raise InterceptError(reason)
    result = _run(_argv(netns, "list", "table", "inet", TABLE))
    if result.returncode != 0:
        return None
    return result.stdout


def list_ruleset(netns: str | None = None) -> str:
    """The whole ruleset of the namespace (``nft list ruleset``)."""
    reason = missing_privileges()
    if reason is not None:
        raise InterceptError(reason)
    result = _run(_argv(netns, "list", "ruleset"))
    if result.returncode != 0:
        raise InterceptError(f"nft list ruleset: {result.stderr.strip()}")
    return result.stdout
