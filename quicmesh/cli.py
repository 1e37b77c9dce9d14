"""The ``quicmesh`` command: ``demo``, ``sidecar``, ``intercept``, ``bench``, ``netem``.

``main(argv) -> int`` never lets a traceback reach the user for bad input: errors
are one line on stderr and exit code 2. ``sidecar``, ``bench NAME`` and ``netem``
hand everything after their name to their own parser, so their options and
``--help`` are theirs.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import logging
import os
import re
import select
import signal
import sys

from . import __version__
from .congestion import CONGESTION_CONTROLS, default_congestion_control
from .errors import QuicmeshError

BENCHMARKS = (
    "throughput",
    "hol",
    "congestion",
    "ttfb",
    "migration",
    "intercept",
    "xds",
    "attack",
    "overhead",
)
"""Benchmark modules under quicmesh.bench, each with ``main(argv) -> int``."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (subcommands ``demo``, ``bench``, ``netem``)."""
    parser = _Parser(
        prog="quicmesh", description="Service-mesh traffic between sidecars over QUIC."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    parser.add_argument("--version", action="version", version=f"quicmesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser(
        "demo", help="loopback demo: app <- sidecar B <- QUIC <- sidecar A <- clients"
    )
    demo.add_argument(
        "--transport",
        choices=("quic", "h2", "tcp"),
        default="quic",
        help="how sidecar A reaches sidecar B (default quic)",
    )
    demo.add_argument("--flows", type=int, default=32, help="concurrent client flows (default 32)")
    demo.add_argument("--duration", type=float, default=5.0, help="seconds of load (default 5)")
    demo.add_argument(
        "--size", type=int, default=16384, help="bytes each request sends (default 16384)"
    )
    demo.add_argument(
        "--congestion-control",
        choices=CONGESTION_CONTROLS,
        default=None,
        help="QUIC congestion control of sidecar A's clusters "
        f"(default: like the host's TCP, here {default_congestion_control()})",
    )
    demo.add_argument(
        "--xds",
        action="store_true",
        help="drive both sidecars from an ADS server and change clusters (quic and h2), "
        "endpoints and certificates under load",
    )
    # The passthrough subcommands: main() hands their arguments to their own parsers.
    sub.add_parser(
        "bench",
        help=f"run a benchmark: quicmesh bench {{{','.join(BENCHMARKS)}}} [--help]",
        add_help=False,
    )
    sub.add_parser(
        "netem",
        help="run a command behind an emulated link (root): quicmesh netem --help",
        add_help=False,
    )
    sub.add_parser("sidecar", help="run a sidecar proxy: quicmesh sidecar -c FILE", add_help=False)
    sub.add_parser(
        "fuzz",
        help="fuzz the parsers that meet the network or a file (atheris): quicmesh fuzz --help",
        add_help=False,
    )
    sub.add_parser(
        "intercept",
        help="install or remove transparent-interception rules (nftables, root)",
        add_help=False,
    )
    return parser


PASSTHROUGH = ("sidecar", "intercept", "bench", "netem", "fuzz")
"""Subcommands whose arguments go untouched to their own parser (``-c``, ``--help`` included)."""


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Cut ``argv`` after a passthrough subcommand: argparse would claim its options."""
    for index, arg in enumerate(argv):
        if not arg.startswith("-"):
            if arg in PASSTHROUGH:
                return argv[: index + 1], argv[index + 1 :]
            break
    return argv, None


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
"""The exit code when standard output was closed under us (``| head``): what a shell
reports for ``cat`` or ``git`` ended by SIGPIPE, without their message."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        if not _standard_output_gone():
            raise  # not standard output's: a socket's, say
        # The reader went away (``quicmesh demo | head -2``): stop quietly, as ``cat``
        # does; standard output goes nowhere now, so that its flush at exit is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _standard_output_gone() -> bool:
    """Whether nobody reads standard output any more (a pipe whose reader closed: the
    kernel reports an error condition on its write end)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _main(argv: list[str]) -> int:
    argv, passthrough = _split_passthrough(argv)
    for arg in itertools.takewhile(lambda a: a.startswith("-"), argv):
        # argparse names the missing command before an unknown option before it (it
        # takes combined short flags and prefixes of long ones: so does this).
        known = re.fullmatch(r"-[vh]+", arg) or (
            arg.startswith("--")
            and len(arg) > 2
            and any(name.startswith(arg) for name in ("--help", "--version", "--verbose"))
        )
        if not known:
            return _fail(f"quicmesh: unrecognized arguments: {arg}")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "demo" and args.xds:
        # The xDS demo switches its cluster between quic and h2 and keeps the
        # congestion control of its control plane's clusters: say so, not ignore them.
        if args.transport == "tcp":
            return _fail("quicmesh demo: --xds switches between quic and h2: not --transport tcp")
        if args.congestion_control is not None:
            return _fail("quicmesh demo: --congestion-control does not apply to --xds")
    if passthrough is not None:
        args.args = passthrough
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        if args.command == "demo" and args.xds:
            from .xds.demo import run_xds_demo

            return run_xds_demo(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args)
        if args.command == "bench":
            return _bench(args.args)
        if args.command == "netem":
            from .netem.cli import main as netem_main

            return netem_main(args.args)
        if args.command == "sidecar":
            from .sidecar.cli import main as sidecar_main

            return sidecar_main(args.args)
        if args.command == "fuzz":
            from .fuzz import main as fuzz_main

            return fuzz_main(args.args)
        if args.command == "intercept":
            from .intercept.cli import main as intercept_main

            return intercept_main(args.args)
    except QuicmeshError as exc:
        return _fail(f"quicmesh {args.command}: {exc}")
    except KeyboardInterrupt:
        return 130
    return 2


def _bench(argv: list[str]) -> int:
    if not argv:
        return _fail(f"quicmesh bench: name a benchmark: one of {', '.join(BENCHMARKS)}")
    if argv[0] in ("-h", "--help"):
        print(_bench_usage(), end="")
        return 0
    name = argv[0]
    if name not in BENCHMARKS:
        return _fail(
            f"quicmesh bench: unknown benchmark {name!r}: choose one of {', '.join(BENCHMARKS)}"
        )
    try:
        module = importlib.import_module(f"quicmesh.bench.{name}")
    except ImportError as exc:
        return _fail(f"quicmesh bench {name}: cannot be loaded: {exc}")
    return int(module.main(argv[1:]))


def _bench_usage() -> str:
    """``quicmesh bench --help``: each benchmark with the first line of its docstring."""
    lines = [
        f"usage: quicmesh bench {{{','.join(BENCHMARKS)}}} [OPTIONS]",
        "",
        "Run one benchmark; `quicmesh bench NAME --help` lists its options.",
        "",
    ]
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"quicmesh.bench.{name}")
        except ImportError as exc:
            summary = f"(cannot be loaded: {exc})"
        else:
            first = (module.__doc__ or "").strip().splitlines()[0]
            summary = first.split("``: ", 1)[-1]
        lines.append(f"  {name:<11} {summary}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
