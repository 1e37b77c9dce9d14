"""``quicmesh netem``: run a command across an emulated link.

::

    quicmesh netem --delay 20ms --loss 2% --rate 20mbit [--jitter 2ms] [--queue 60ms|25pkt]
                   [--burst 3 [--max-burst 3]] [--seed N] [--server-command CMD]
                   [--wait-port PORT] -- COMMAND...

COMMAND runs in the client namespace; the server side is reachable at the address in
``QUICMESH_NETEM_SERVER`` (the client's own address is in ``QUICMESH_NETEM_CLIENT``).
``--server-command`` starts a command (split like a shell would) in the server
namespace first; ``--wait-port`` waits until it accepts TCP connections on that port,
and fails at once if it exits first. ``--loss 2`` and ``--loss 2%`` are both 2 %, as
in the benchmarks (the library's :class:`LinkConfig` takes a fraction). Impairments
apply to both directions. The exit status is COMMAND's; 2 means bad arguments or no
root, 127 a command that is not found (COMMAND's or the server's), and the message is
one line.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from quicmesh.errors import ConfigError, QuicmeshError
from quicmesh.netem.config import (
    DirectionConfig,
    GilbertElliottConfig,
    LinkConfig,
    parse_duration,
    parse_percent,
    parse_queue,
    parse_rate,
)
from quicmesh.netem.link import Link, LinkStats
from quicmesh.netem.model import DirectionStats
from quicmesh.netem.system import missing_privileges
from quicmesh.sidecar.launch import terminate_as_exit

__all__ = ["main"]

PROG = "quicmesh netem"
_WAIT_PORT_TIMEOUT = 10.0
EXIT_NOT_FOUND = 127
"""A command that is not found, as a shell reports it."""
EXIT_NOT_EXECUTABLE = 126
"""A command found but not executable, as a shell reports it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _loss(text: str) -> float:
    """``--loss``: ``2`` and ``2%`` are both 2 %, as the benchmarks' loss options read
    them (a bare number read as a fraction made ``--loss 0.5`` 50 %)."""
    return parse_percent(text, bare="percent")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{port} is not a port number (1-65535)")
    return port


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Run COMMAND in a client network namespace joined to a server namespace "
        "by an emulated link (delay, jitter, loss, rate, queue). Needs root.",
        epilog="Both commands get the addresses in their environment: QUICMESH_NETEM_SERVER "
        "(the server's address, to connect to), QUICMESH_NETEM_CLIENT, and the namespaces' "
        "names in QUICMESH_NETEM_SERVER_NS and QUICMESH_NETEM_CLIENT_NS.",
    )
    add = parser.add_argument
    add("--delay", type=_typed(parse_duration), default=0.0, help="one-way delay, e.g. 20ms")
    add("--jitter", type=_typed(parse_duration), default=0.0, help="delay +/- this, e.g. 2ms")
    add("--reorder", action="store_true", help="let jitter reorder packets")
    add(
        "--loss",
        type=_typed(_loss),
        default=0.0,
        help="random loss in percent: 2 or 2%% (a bare number is a percentage, as in the "
        "benchmarks)",
    )
    add("--burst", type=float, metavar="PACKETS", help="make --loss bursty: mean burst length")
    add("--max-burst", type=int, metavar="PACKETS", help="cap on consecutive losses")
    add("--rate", type=_typed(parse_rate), help="bottleneck rate, e.g. 20mbit")
    add("--queue", type=_typed(parse_queue), help="drop-tail queue: 25pkt, 64kb or 60ms")
    add("--seed", type=int, default=0, help="seed of loss and jitter (default 0)")
    add("--mtu", type=int, default=1500, help="MTU of the link (default 1500)")
    add("--server-command", metavar="CMD", help="command to run in the server namespace")
    add(
        "--wait-port",
        type=_typed(_port),
        metavar="PORT",
        help="wait until the server accepts a (probe) connection on PORT",
    )
    add("--quiet", action="store_true", help="print neither addresses nor counters")
    add("command", nargs=argparse.REMAINDER, help="command for the client namespace")
    return parser


def _config(args: argparse.Namespace) -> LinkConfig:
    direction: dict[str, Any] = {
        "delay": args.delay,
        "jitter": args.jitter,
        "reorder": args.reorder,
        "loss": args.loss,
        "rate_bps": args.rate,
    }
    if args.queue is not None:
        if args.rate is None:
            raise ConfigError("--queue needs --rate")
        direction.update(args.queue)
    if args.wait_port is not None and not args.server_command:
        raise ConfigError("--wait-port needs --server-command (the server it waits for)")
    if args.max_burst is not None and args.burst is None:
        raise ConfigError("--max-burst needs --burst")
    if args.burst is not None:
        if not args.loss:
            raise ConfigError("--burst needs --loss (the long-run loss rate)")
        direction["burst"] = GilbertElliottConfig.from_loss_and_burst(
            args.loss, args.burst, args.max_burst
        )
        direction["loss"] = 0.0
    config = DirectionConfig(**direction)
    return LinkConfig(
        client_to_server=config, server_to_client=config, seed=args.seed, mtu=args.mtu
    )


def _describe(name: str, stats: DirectionStats) -> str:
    return (
        f"{name}: {stats.packets_in} packets in, {stats.packets_out} out, "
        f"{stats.dropped_by_loss} lost, {stats.dropped_by_queue} dropped by the queue "
        f"(max {stats.max_queue_packets} packets queued)"
    )


class _NotRunnable(QuicmeshError):
    """A command that cannot start; ``status`` is the shell's (126 or 127)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _check_runnable(what: str, argv: list[str], path: str | None) -> None:
    """Raise :class:`_NotRunnable` unless ``argv[0]`` is an executable file (looked up
    on ``path`` unless it has a slash), as the shell would run it. ``ip netns exec``
    would report it only from inside the namespace, in its own words, with status 1,
    and a server that failed so could go unnoticed when the client finished first."""
    name = argv[0]
    if shutil.which(name, path=path) is not None:
        return
    if "/" in name and os.path.exists(name):
        raise _NotRunnable(f"{what} {name!r}: not executable", EXIT_NOT_EXECUTABLE)
    raise _NotRunnable(f"{what} {name!r}: command not found", EXIT_NOT_FOUND)


def _ended(status: int) -> str:
    """``exited with status N`` or ``was killed by signal N`` (a negative returncode)."""
    return f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"


def _wait_for_port(
    link: Link, port: int, server: subprocess.Popen[Any], server_command: str
) -> None:
    """Poll until the server accepts a connection on ``port``; fail at once if the
    server exits first (it will never listen), or after 10 s."""
    deadline = time.monotonic() + _WAIT_PORT_TIMEOUT
    while True:
        status = server.poll()
        if status is not None:
            raise QuicmeshError(
                f"--server-command {server_command!r} {_ended(status)} "
                f"before listening on port {port}"
            )
        with link.entered("client"):
            probe = socket.socket()
        with probe:
            probe.settimeout(1.0)
            try:
                probe.connect((link.server_address, port))
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise QuicmeshError(f"the server did not listen on port {port} within 10 s")
        time.sleep(0.05)  # polling for an external process, bounded by the deadline


def main(argv: list[str]) -> int:
    """Run ``quicmesh netem`` with ``argv`` (the arguments after ``netem``)."""
    try:
        args = _build_parser().parse_args(argv)
        config = _config(args)
        server_argv = shlex.split(args.server_command) if args.server_command else None
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # shlex
        print(f"{PROG}: --server-command: {exc}", file=sys.stderr)
        return 2
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        command = [os.environ.get("SHELL", "/bin/sh")]
    reason = missing_privileges()
    if reason is not None:
        print(f"{PROG}: {reason}", file=sys.stderr)
        return 2
    try:
        # Before the link is built: a command that cannot start fails the run at once,
        # whichever side it is on (deterministically, not by when the other one ends).
        if server_argv:
            _check_runnable("--server-command", server_argv, os.environ.get("PATH"))
        _check_runnable("COMMAND", command, os.environ.get("PATH"))
    except _NotRunnable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.status
    try:
        with terminate_as_exit(), Link(config) as link:
            env = dict(os.environ)
            env["QUICMESH_NETEM_SERVER"] = link.server_address
            env["QUICMESH_NETEM_CLIENT"] = link.client_address
            env["QUICMESH_NETEM_SERVER_NS"] = link.server_ns
            env["QUICMESH_NETEM_CLIENT_NS"] = link.client_ns
            if not args.quiet:
                print(
                    f"{PROG}: client {link.client_address} (namespace {link.client_ns}), "
                    f"server {link.server_address} (namespace {link.server_ns})",
                    file=sys.stderr,
                    flush=True,
                )
            server = None
            if server_argv:
                server = link.popen("server", server_argv, env=env)
                if args.wait_port is not None:
                    _wait_for_port(link, args.wait_port, server, args.server_command)
            process = link.popen("client", command, env=env, start_new_session=False)
            try:
                status = process.wait()
            except KeyboardInterrupt:
                status = 130
            # A server that ended on its own with an error (one that could not start, say)
            # fails the run, whatever the client made of it; one still running is stopped
            # at tear-down as usual.
            server_status = server.poll() if server is not None else None
            stats: LinkStats = link.stats()
        if not args.quiet:
            print(
                f"{PROG}: " + _describe("client->server", stats.client_to_server), file=sys.stderr
            )
            print(
                f"{PROG}: " + _describe("server->client", stats.server_to_client), file=sys.stderr
            )
    except KeyboardInterrupt:
        return 130
    except QuicmeshError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if server_status:
        print(
            f"{PROG}: --server-command {args.server_command!r} {_ended(server_status)} "
            "(it ended on its own, with an error)",
            file=sys.stderr,
        )
        return status or 1
    return status if status >= 0 else 128 - status
