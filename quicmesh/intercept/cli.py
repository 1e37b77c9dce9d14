"""``quicmesh intercept install|remove``: write or remove the capture rules.

Exit codes: 0 on success, 2 for bad options, 1 when the rules cannot be written
(no ``nft``, no CAP_NET_ADMIN, no such namespace): one line on stderr each time.
``--dry-run`` prints the ``nft -f`` script and needs no privileges.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

from . import nft
from .rules import (
    DEFAULT_EXCLUDE_CIDRS,
    DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT,
    DEFAULT_PROXY_ID,
    InterceptRules,
    parse_cidrs,
    parse_ids,
    parse_port_ranges,
    render_install,
    render_remove,
)

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _typed(parse: Callable[[str], T]) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _some(parse: Callable[[str], tuple[T, ...]]) -> Callable[[str], tuple[T, ...]]:
    """An ``--include-*`` list that may not be empty: left out it means "all", and an
    empty value (an unset shell variable) would mean the same, the opposite of what a
    list of nothing says (Istio's istio-iptables captures nothing then)."""

    def parse_some(text: str) -> tuple[T, ...]:
        items = parse(text)
        if not items:
            raise ValueError("lists nothing: leave the option out to capture all")
        return items

    parse_some.__name__ = parse.__name__
    return parse_some


def _port(text: str) -> int:
    ranges = parse_port_ranges(text)
    if len(ranges) != 1 or ranges[0][0] != ranges[0][1]:
        raise ValueError(f"{text!r} is not one port (1-65535)")
    return ranges[0][0]


def _netns_name(text: str) -> str:
    """A name ``ip netns`` takes: not empty (an unset shell variable would otherwise
    install the rules in the current namespace, the host's), no ``/``, not ``.`` or ``..``,
    no white space."""
    if not text:
        raise ValueError("the namespace name is empty (leave --netns out for the current one)")
    if "/" in text or text in (".", "..") or any(c.isspace() or c == "\0" for c in text):
        raise ValueError(f"{text!r} is not a network namespace name")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``quicmesh intercept`` argument parser."""
    parser = _Parser(
        prog="quicmesh intercept",
        description="Write or remove the nftables rules that send a network namespace's TCP "
        "traffic through its sidecar (table 'inet quicmesh'). Needs CAP_NET_ADMIN and nft.",
    )
    sub = parser.add_subparsers(dest="action", required=True, parser_class=_Parser)
    install = sub.add_parser(
        "install", help="install or replace the capture rules (atomic, idempotent)"
    )
    remove = sub.add_parser("remove", help="remove the capture rules (nothing is left)")
    for command in (install, remove):
        command.add_argument(
            "--dry-run", action="store_true", help="print the nft script instead of running it"
        )
        command.add_argument(
            "--netns",
            metavar="NAME",
            type=_typed(_netns_name),
            help="a named network namespace (default: the current one)",
        )
    install.add_argument(
        "--outbound-port",
        type=_typed(_port),
        default=DEFAULT_OUTBOUND_PORT,
        help=f"the sidecar's outbound capture port (default {DEFAULT_OUTBOUND_PORT})",
    )
    install.add_argument(
        "--inbound-port",
        type=_typed(_port),
        default=DEFAULT_INBOUND_PORT,
        help=f"the sidecar's inbound capture port (default {DEFAULT_INBOUND_PORT})",
    )
    install.add_argument(
        "--no-inbound", action="store_true", help="do not capture inbound connections"
    )
    install.add_argument(
        "--proxy-uid",
        type=_typed(parse_ids),
        default=(DEFAULT_PROXY_ID,),
        metavar="IDS",
        help=f"user IDs whose traffic is never captured: the sidecar's (default "
        f"{DEFAULT_PROXY_ID}; '' for none)",
    )
    install.add_argument(
        "--proxy-gid",
        type=_typed(parse_ids),
        default=(DEFAULT_PROXY_ID,),
        metavar="IDS",
        help=f"group IDs whose traffic is never captured (default {DEFAULT_PROXY_ID}; '' for none)",
    )
    install.add_argument(
        "--include-cidrs",
        type=_typed(_some(parse_cidrs)),
        default=(),
        metavar="CIDRS",
        help="capture outbound traffic only to these destinations (default: all)",
    )
    install.add_argument(
        "--exclude-cidrs",
        type=_typed(parse_cidrs),
        default=parse_cidrs(",".join(DEFAULT_EXCLUDE_CIDRS)),
        metavar="CIDRS",
        help="never capture outbound traffic to these (default "
        f"{','.join(DEFAULT_EXCLUDE_CIDRS)}; a list given replaces it: keep fe80::/10 in it;"
        " loopback and the host's own addresses are never captured)",
    )
    install.add_argument(
        "--include-ports",
        type=_typed(_some(parse_port_ranges)),
        default=(),
        metavar="PORTS",
        help="capture outbound traffic only to these destination ports (default: all)",
    )
    install.add_argument(
        "--exclude-ports",
        type=_typed(parse_port_ranges),
        default=(),
        metavar="PORTS",
        help="never capture outbound traffic to these destination ports, e.g. 5432,8000-8080",
    )
    install.add_argument(
        "--inbound-ports",
        type=_typed(_some(parse_port_ranges)),
        default=(),
        metavar="PORTS",
        help="capture inbound traffic only to these local ports (default: all)",
    )
    install.add_argument(
        "--exclude-inbound-ports",
        type=_typed(parse_port_ranges),
        default=((22, 22),),
        metavar="PORTS",
        help="never capture inbound traffic to these local ports (default 22; add the "
        "sidecar's TCP tunnel port if it serves h2 or tcp)",
    )
    return parser


def rules_from_args(args: argparse.Namespace) -> InterceptRules:
    """The :class:`InterceptRules` the ``install`` options describe.

    :raises ValueError: the options contradict each other.
    """
    return InterceptRules(
        outbound_port=args.outbound_port,
        inbound_port=None if args.no_inbound else args.inbound_port,
        proxy_uids=args.proxy_uid,
        proxy_gids=args.proxy_gid,
        include_cidrs=args.include_cidrs,
        exclude_cidrs=args.exclude_cidrs,
        include_ports=args.include_ports,
        exclude_ports=args.exclude_ports,
        inbound_ports=args.inbound_ports,
        exclude_inbound_ports=args.exclude_inbound_ports,
    )


def main(argv: list[str]) -> int:
    """Run ``quicmesh intercept``; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.action == "install":
        try:
            script = render_install(rules_from_args(args))
        except ValueError as exc:
            print(f"quicmesh intercept install: {exc}", file=sys.stderr)
            return 2
    else:
        script = render_remove()
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    try:
        nft.apply(script, args.netns)
    except nft.InterceptError as exc:
        print(f"quicmesh intercept {args.action}: {exc}", file=sys.stderr)
        return 1
    where = f"network namespace {args.netns}" if args.netns else "this network namespace"
    done = "installed" if args.action == "install" else "removed"
    print(f"quicmesh intercept: rules {done} in {where} (table inet quicmesh)")
    return 0
