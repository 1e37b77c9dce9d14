"""README.md says what QUIC costs against h2, with figures docs/performance.md carries, and its
command lines are ones the console script accepts."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PERFORMANCE = (REPO / "docs" / "performance.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match is not None, f"README.md has no section {title!r}"
    return match.group(1)


def _current_throughput() -> dict[tuple[str, int], list[str]]:
    table = PERFORMANCE.split("Current figures", 1)[1].split("\n\n", 2)[1]
    rows: dict[tuple[str, int], list[str]] = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0], int(cells[1]))] = cells
    return rows


def test_readme_says_what_quic_costs_with_the_performance_figures() -> None:
    costs = _section("What QUIC costs today")
    assert "(docs/performance.md)" in costs and "(docs/hol.md)" in costs
    rows = _current_throughput()
    for streams in (1, 16):
        quic, h2 = rows[("quic", streams)], rows[("h2", streams)]
        cpu_quic, cpu_h2 = float(quic[7]), float(h2[7])
        assert f"{cpu_quic:.0f} " in costs and f"{cpu_h2:g}" in costs
        assert f"{float(quic[2]):.0f} " in costs and f"{float(h2[2]):.0f}" in costs
    ratios = [float(rows[("quic", n)][7]) / float(rows[("h2", n)][7]) for n in (1, 16)]
    assert f"{min(ratios):.0f} to {max(ratios):.0f} times h2's" in costs


COMMANDS = [
    line.split("#")[0].strip()
    for line in _section("Commands").splitlines()
    if line.startswith("    quicmesh ")
]


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_commands_parse(command: str) -> None:
    words = shlex.split(command)[1:]
    name = words[0]
    argv = [name, "throughput", "--help"] if words[1:2] != ["--help"] else [name, "--help"]
    if name == "bench" and words[1:2] == ["overhead"]:
        argv = [name, "overhead", "--help"]
    if name != "bench":
        argv = [name, "--help"]
    result = subprocess.run(
        [sys.executable, "-m", "quicmesh", *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for option in (w for w in words if w.startswith("--")):
        assert option in result.stdout, f"{option} of {command!r} is not in {argv} --help"
