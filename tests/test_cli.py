"""The ``quicmesh`` command as a user runs it: the console script and ``python -m quicmesh``
in a subprocess, never ``main()`` in-process (which would miss the top-level parser)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import quicmesh
from quicmesh.bench import migration, ttfb
from quicmesh.cli import BENCHMARKS, EXIT_BROKEN_PIPE

SCRIPT = shutil.which("quicmesh")


def run(*argv: str, script: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the command line in a child process, with this checkout on its path."""
    if script:
        assert SCRIPT is not None, "the quicmesh console script is not on PATH: pip install -e ."
        command = [SCRIPT, *argv]
    else:
        command = [sys.executable, "-m", "quicmesh", *argv]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


BOTH = pytest.mark.parametrize("script", [False, True], ids=["python-m", "script"])


@BOTH
def test_version(script: bool) -> None:
    result = run("--version", script=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"quicmesh {quicmesh.__version__}"


@pytest.mark.parametrize("argv", [["--vers"], ["--verb", "--version"], ["-vv", "--version"]])
def test_options_argparse_takes_before_the_command_still_work(argv: list[str]) -> None:
    # The check naming an unknown leading option refused argparse's prefixes (review).
    result = run(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"quicmesh {quicmesh.__version__}"


@BOTH
def test_top_level_help_lists_every_subcommand(script: bool) -> None:
    result = run("--help", script=script)
    assert result.returncode == 0, result.stderr
    for command in ("demo", "sidecar", "bench", "netem", "fuzz"):
        assert command in result.stdout


@BOTH
@pytest.mark.parametrize("command", ["netem", "bench", "sidecar", "demo", "fuzz"])
def test_every_subcommand_has_help(script: bool, command: str) -> None:
    result = run(command, "--help", script=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: quicmesh " + command)


def test_netem_options_reach_its_parser() -> None:
    # Parsed before the privilege check: a bad value is named whatever the user's rights.
    result = run("netem", "--delay", "20parsecs", "--loss", "2%", "--", "true")
    assert result.returncode == 2
    assert "--delay" in result.stderr and "unrecognized" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    help_text = run("netem", "--help").stdout
    for option in ("--delay", "--loss", "--rate", "--jitter", "--queue", "--server-command"):
        assert option in help_text


@pytest.mark.netns
def test_netem_runs_the_readme_line() -> None:
    script = 'test -n "$QUICMESH_NETEM_SERVER" && ip -o -4 addr show netem0'
    result = run(
        "netem", "--delay", "20ms", "--loss", "2%", "--rate", "20mbit", "--", "sh", "-c", script,
        script=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "inet 10.77.0.1/30" in result.stdout
    assert "client->server" in result.stderr


def test_bench_help_names_every_benchmark() -> None:
    result = run("bench", "--help", script=True)
    assert result.returncode == 0, result.stderr
    for name in BENCHMARKS:
        assert f"  {name} " in result.stdout
    assert "cannot be loaded" not in result.stdout


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_has_help(name: str) -> None:
    result = run("bench", name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: quicmesh bench {name}")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench"], "name a benchmark: one of throughput"),
        (["bench", "nonsense"], "unknown benchmark 'nonsense'"),
        (["bench", "ttfb", "--trials", "many"], "--trials"),
        (["netem", "--rate", "fast"], "--rate"),
        (["netem", "--wait-port", "70000", "--", "true"], "70000 is not a port number"),
        (["bench", "congestion", "--datagram-size", "70000"], "--datagram-size: must be 1200"),
        (["bench", "xds", "--quick", "--clusters", "0"], "need --clusters >= 10"),
        (["demo", "--flows", "0"], "--flows and --size must be positive"),
        (["demo", "--flows", "100000000"], "(at most 10000 flows of 67108864 bytes)"),
        (["demo", "--size", "99999999999999"], "(at most 10000 flows of 67108864 bytes)"),
        (["demo", "--xds", "--size", "99999999999999"], "at most 10000 flows of 67108864"),
        (["demo", "--duration", "nan"], "--duration seconds within 0-86400"),
        (["demo", "--xds", "--duration", "nan"], "--duration seconds within 0-86400"),
        (["demo", "--duration", "inf"], "--duration seconds within 0-86400"),
        (["demo", "--congestion-control", "vegas"], "invalid choice"),
        # The xDS demo ran h2 for tcp and ignored the congestion control, silently.
        (["demo", "--xds", "--transport", "tcp"], "--xds switches between quic and h2"),
        (["demo", "--xds", "--congestion-control", "reno"], "does not apply to --xds"),
        (["sidecar"], "-c/--config"),
        (["sidecar", "-c", ""], "argument -c/--config: the path is empty"),
        (["fuzz", "--seconds", "-1"], "quicmesh fuzz: --seconds must be at least 1, not -1"),
        (["fuzz", "--target", "nope"], "quicmesh fuzz: argument --target: invalid choice"),
        (["bench", "attack", "--probe", "nope"], "argument --probe: invalid choice"),
        (["bench", "hol", "--loss", "abc"], "--loss: cannot read percentage 'abc'"),
        (["bench", "xds", "--frob"], "quicmesh bench xds: unrecognized arguments: --frob"),
        (["bench", "intercept", "--frob"], "unrecognized arguments: --frob"),
        (["sidecar", "-c", "/dev/zero", "--check"], "/dev/zero: larger than 16 MiB"),
        (["frobnicate"], "invalid choice"),
        (["--bogus"], "quicmesh: unrecognized arguments: --bogus"),  # said "required: command"
        (["bench", "throughput", "--streams", "a"], "--streams needs positive integers"),
        # NaN ran a benchmark for ever or printed nan figures (review).
        (["bench", "migration", "--duration", "nan"], "--duration: must be a finite number"),
        (["bench", "migration", "--rtt", "nan"], "--rtt: must be a finite number above 0"),
        (["bench", "overhead", "--seconds", "nan"], "--seconds: must be a finite number"),
        (["bench", "attack", "--phase", "-1"], "--phase: must be a finite number above 0"),
        (["bench", "attack", "--attackers", "0"], "--attackers: must be at least 1, not '0'"),
        (["bench", "ttfb", "--rtt", "nan"], "--rtt: must be a finite number above 0"),
        (["bench", "congestion", "--rate", "inf"], "--rate: must be a finite number above 0"),
        # Found after the run (a traceback, the report printed before it).
        (["bench", "intercept", "--plot", "/nonexistent/i.png"], "--plot: /nonexistent/i.png"),
    ],
)
def test_bad_arguments_are_one_line(argv: list[str], message: str) -> None:
    result = run(*argv)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _options_without_help(help_text: str) -> list[str]:
    options = help_text.split("options:", 1)[1]
    # argparse puts an option's help on its line or the next one; an option with no help
    # is followed directly by the next option.
    lines = [line for line in options.splitlines() if line.strip()]
    return [
        line.strip()
        for line, following in zip(lines, [*lines[1:], ""], strict=True)
        if line.startswith("  -")
        and len(line.split("  ")) <= 2
        and following.lstrip().startswith("-")
    ]


def test_every_demo_option_has_help_text() -> None:
    result = run("demo", "--help", script=True)
    assert result.returncode == 0
    assert _options_without_help(result.stdout) == []
    options = result.stdout.split("options:", 1)[1]
    for option in ("--transport", "--flows", "--duration", "--size", "--congestion-control"):
        assert option in options


@pytest.mark.parametrize(
    "argv",
    [
        ["sidecar"],
        ["netem"],
        ["fuzz"],
        ["intercept", "install"],
        ["intercept", "remove"],
        *(["bench", name] for name in BENCHMARKS),
    ],
    ids=lambda argv: " ".join(argv),
)
def test_every_option_of_every_command_has_help_text(argv: list[str]) -> None:
    result = run(*argv, "--help")
    assert result.returncode == 0, result.stderr
    assert _options_without_help(result.stdout) == []


def test_benchmark_tables_explain_their_columns() -> None:
    rows = [migration.Row("quic-migrate", 40.0, 4, 0, 12.0, 0.3, 5.0, 1000)]
    table = migration.format_table(rows)
    for column in ("stall ms:", "RTTs:", "steady gap ms:", "flows lost:"):
        assert column in table
    ttfb_rows = [ttfb.Row("h2", 50.0, 3, 150.0, 149.0, 151.0, 3.0, 3, "n/a")]
    table = ttfb.format_table(ttfb_rows)
    for column in ("median / min / max ms:", "RTTs:", "expected:"):
        assert column in table


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--help"],
        ["intercept", "install", "--dry-run"],
        ["demo", "--flows", "2", "--duration", "1"],
    ],
)
def test_a_closed_standard_output_ends_the_command_quietly(argv: list[str]) -> None:
    # As `quicmesh demo | head -2` does: a BrokenPipeError traceback before.
    assert SCRIPT is not None, "the quicmesh console script is not on PATH: pip install -e ."
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [SCRIPT, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(write_end)
    assert done.returncode == EXIT_BROKEN_PIPE, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_netem_as_root_without_cap_sys_admin_says_so_in_one_line() -> None:
    # Found by a review: only the user ID was checked, and root in a default container
    # ran every case into `mount --make-shared` failures.
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed"
    drop = [setpriv, "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
    done = subprocess.run(
        [*drop, sys.executable, "-m", "quicmesh", "netem", "--delay", "5ms", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    expected = "needs CAP_SYS_ADMIN" if os.geteuid() == 0 else "needs root"
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_broken_pipe_that_is_not_standard_outputs_is_not_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A socket's EPIPE escaping a command was taken for a closed standard output: exit
    # 141 without a word, and standard output sent to /dev/null for the process (review).
    import socket

    from quicmesh import cli

    ours, theirs = socket.socketpair()
    theirs.close()

    def command(argv: list[str]) -> int:
        while True:
            ours.send(b"x" * 65536)

    monkeypatch.setattr(cli, "_main", command)
    try:
        with pytest.raises(BrokenPipeError):
            cli.main([])
    finally:
        ours.close()
