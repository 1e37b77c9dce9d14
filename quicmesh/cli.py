"""The ``quicmesh`` command: ``demo``, ``sidecar``, ``intercept``, ``bench``, ``netem``.

``main(argv) -> int`` never lets a traceback reach the user for bad input: errors
are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import QuicmeshError

BENCHMARKS = ("throughput", "hol", "congestion", "ttfb", "migration", "intercept")
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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser(
        "demo", help="loopback demo: app <- sidecar B <- QUIC <- sidecar A <- clients"
    )
    demo.add_argument("--transport", choices=("quic", "h2", "tcp"), default="quic")
    demo.add_argument("--flows", type=int, default=32, help="concurrent client flows (default 32)")
    demo.add_argument("--duration", type=float, default=5.0, help="seconds of load (default 5)")
    demo.add_argument(
        "--size", type=int, default=16384, help="bytes each request sends (default 16384)"
    )
    demo.add_argument("--congestion-control", choices=("reno", "cubic", "bbr"), default="cubic")
    bench = sub.add_parser(
        "bench", help=f"run a benchmark: {', '.join(BENCHMARKS)}", add_help=False
    )
    bench.add_argument("name", help=f"one of: {', '.join(BENCHMARKS)}")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    netem = sub.add_parser(
        "netem", help="run a command behind an emulated link (root)", add_help=False
    )
    netem.add_argument("args", nargs=argparse.REMAINDER)
    sidecar = sub.add_parser(
        "sidecar", help="run a sidecar proxy: quicmesh sidecar -c FILE", add_help=False
    )
    sidecar.add_argument("args", nargs=argparse.REMAINDER)
    intercept = sub.add_parser(
        "intercept",
        help="install or remove transparent-interception rules (nftables, root)",
        add_help=False,
    )
    intercept.add_argument("args", nargs=argparse.REMAINDER)
    return parser


PASSTHROUGH = ("sidecar", "intercept")
"""Subcommands whose arguments go untouched to their own parser (``-c`` included)."""


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Cut ``argv`` after a passthrough subcommand: argparse would claim its options."""
    for index, arg in enumerate(argv):
        if not arg.startswith("-"):
            if arg in PASSTHROUGH:
                return argv[: index + 1], argv[index + 1 :]
            break
    return argv, None


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    argv, passthrough = _split_passthrough(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if passthrough is not None:
        args.args = passthrough
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args)
        if args.command == "bench":
            if args.name not in BENCHMARKS:
                return _fail(
                    f"quicmesh bench: unknown benchmark {args.name!r}: "
                    f"choose one of {', '.join(BENCHMARKS)}"
                )
            module = importlib.import_module(f"quicmesh.bench.{args.name}")
            return int(module.main(args.args))
        if args.command == "netem":
            from .netem.cli import main as netem_main

            return netem_main(args.args)
        if args.command == "sidecar":
            from .sidecar.cli import main as sidecar_main

            return sidecar_main(args.args)
        if args.command == "intercept":
            from .intercept.cli import main as intercept_main

            return intercept_main(args.args)
    except QuicmeshError as exc:
        return _fail(f"quicmesh {args.command}: {exc}")
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
