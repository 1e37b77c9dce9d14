"""``quicmesh sidecar -c sidecar.yaml``: run a sidecar until SIGTERM (or ``POST /drain``).

Exit codes: 0 after a clean drain, 2 for an invalid configuration (one line on
stderr naming the file, field and problem), 1 when the sidecar cannot start
(an address in use). SIGHUP reloads the configuration file; SIGTERM and SIGINT
drain (a second one ends the grace period at once, closing the flows still live);
SIGUSR1 reopens the access log file (for logrotate, as Envoy does).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from ..errors import ConfigError, QuicmeshError

logger = logging.getLogger("quicmesh.sidecar")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _config_path(text: str) -> str:
    """``-c``'s value: not empty (an unset shell variable; it was read as ``.``)."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``quicmesh sidecar`` argument parser."""
    parser = _Parser(prog="quicmesh sidecar", description="Run a quicmesh sidecar proxy.")
    parser.add_argument(
        "-c",
        "--config",
        required=True,
        type=_config_path,
        help="the sidecar's YAML configuration, or an Envoy bootstrap (static_resources)",
    )
    parser.add_argument(
        "--xds",
        metavar="HOST:PORT",
        help="take listeners, clusters, endpoints and secrets from this ADS server",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration and the sidecar's certificate, then exit",
    )
    parser.add_argument(
        "--event-loop",
        default="auto",
        choices=("auto", "asyncio", "uvloop"),
        help="the event loop: uvloop (pip install uvloop, or quicmesh[uvloop]), asyncio's"
        " own, or auto (default: uvloop when it is installed, else asyncio)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="level of the sidecar's own log on stderr (default info)",
    )
    return parser


class _EarlySignals:
    """SIGHUP and SIGUSR1 that arrive while the sidecar loads its configuration and
    builds its event loop, kept for the loop's handlers to act on once they are in
    place: until then one (a config tool's, logrotate's) killed the process. SIGTERM and
    SIGINT keep their default until then: they stop a sidecar stuck reading its
    configuration (a FIFO, a hung mount)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._keep)

    def _keep(self, signum: int, frame: object) -> None:
        self.received.append(signum)


def main(argv: list[str]) -> int:
    """Run the sidecar; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    early = None if args.check else _EarlySignals()
    try:
        config = _load(args.config, args.xds)
    except ConfigError as exc:
        print(f"quicmesh sidecar: {exc}", file=sys.stderr)
        return 2
    if args.check:
        try:
            file_warnings = _check_certificate(config)
        except ConfigError as exc:
            print(f"quicmesh sidecar: {exc}", file=sys.stderr)
            return 2
        for warning in [*getattr(config, "warnings", ()), *file_warnings]:
            print(f"quicmesh sidecar: warning: {warning}", file=sys.stderr)
        print(f"{args.config}: ok")
        return 0
    _configure_logging(args.log_level)
    try:
        loop_factory = event_loop_factory(args.event_loop)
    except QuicmeshError as exc:
        print(f"quicmesh sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_run(config, args.config, early))
    except ConfigError as exc:
        print(f"quicmesh sidecar: {exc}", file=sys.stderr)
        return 2
    except QuicmeshError as exc:
        print(f"quicmesh sidecar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``--event-loop``: uvloop's, or None for asyncio's own.

    :raises QuicmeshError: ``uvloop`` was asked for and does not import.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise QuicmeshError(
                "--event-loop uvloop: uvloop is not installed (pip install uvloop)"
            ) from None
        return None
    logger.info("event loop: uvloop")
    return uvloop.new_event_loop


def _load(path: str, xds: str | None) -> object:
    """quicmesh YAML, or an Envoy bootstrap (``static_resources``/``dynamic_resources``),
    with ``--xds`` as its ``xds.address``: a quicmesh file gets it before it is
    validated (a file for xDS needs no listeners)."""
    from dataclasses import replace

    from ..xds.bootstrap import load_any_config
    from .config import SidecarConfig, XdsConfig, parse_address

    if xds is None:
        return load_any_config(path)
    try:
        address = parse_address(xds)
    except ValueError as exc:
        raise ConfigError(f"--xds: {exc}") from None
    config = load_any_config(path, xds_address=xds)
    assert isinstance(config, SidecarConfig)
    current = config.xds or XdsConfig(address=address)
    return replace(config, xds=replace(current, address=address))


def _check_certificate(config: object) -> list[str]:
    """Load the identity and check it as ``/ready`` would and as every TLS library and
    QUIC engine the configuration uses loads it, the files the sidecar writes, and the
    overload limits as the start does; ConfigError says what is wrong; returns
    warnings."""
    from ..tls.check import check_own_certificate
    from .certs import check_transports_take_identity, load_identity
    from .config import SidecarConfig, check_files
    from .inbound import check_overload_limits

    assert isinstance(config, SidecarConfig)
    identity, trust = load_identity(config)
    check_own_certificate(identity, trust, config.source)
    asyncio.run(check_transports_take_identity(config, identity, trust))
    warnings = check_files(config)
    check_overload_limits(config)
    return warnings


def _configure_logging(level: str) -> None:
    # The sidecar's own loggers, and the xDS client's (it is part of the sidecar).
    for name in ("quicmesh.sidecar", "quicmesh.xds"):
        logging.getLogger(name).setLevel(level.upper())
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")


async def _run(config: object, path: str, early: _EarlySignals | None = None) -> int:
    from .acceptor import report_loop_exception
    from .config import SidecarConfig
    from .runtime import Sidecar

    assert isinstance(config, SidecarConfig)
    sidecar = Sidecar(config, config_path=path)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(report_loop_exception)
    # Every signal the sidecar takes is handled from before start-up (the admin answers
    # "starting" meanwhile), so none kills the process with listeners half open: a
    # SIGTERM drains once started, a SIGHUP reloads then, a SIGUSR1 reopens the logs then.
    started = False
    pending: set[str] = set()
    reloads: set[asyncio.Task[bool]] = set()
    stop_signals = 0

    def stop() -> None:
        nonlocal stop_signals
        stop_signals += 1
        pending.add("stop")
        if started:
            if stop_signals > 1:  # a second SIGTERM or SIGINT: the operator insists
                sidecar.end_grace_period()
            elif not sidecar.begin_drain():  # POST /drain began one (a preStop hook)
                logger.info("draining already: a second SIGTERM or SIGINT ends the grace period")

    def reload() -> None:
        if not started:
            pending.add("reload")
            return
        task = loop.create_task(sidecar.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def reopen_logs() -> None:
        if not started:
            pending.add("reopen")
            return
        sidecar.reopen_logs()

    # Drain (SIGTERM, SIGINT), reload (SIGHUP), reopen the access log (SIGUSR1).
    handlers = {
        signal.SIGTERM: stop,
        signal.SIGINT: stop,
        signal.SIGHUP: reload,
        signal.SIGUSR1: reopen_logs,
    }
    for signum, handler in handlers.items():
        loop.add_signal_handler(signum, handler)
    for received in early.received if early is not None else ():
        handlers[signal.Signals(received)]()
    await sidecar.start()
    started = True
    if config.xds is not None:
        from ..xds.client import AdsClient

        sidecar.attach_xds(AdsClient(sidecar, config.xds))
    if "stop" in pending:
        sidecar.begin_drain()
    else:
        if "reopen" in pending:
            sidecar.reopen_logs()
        if "reload" in pending:
            reload()
    await sidecar.wait_drained()
    return 0
