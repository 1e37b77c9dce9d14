"""``quicmesh bench ttfb``: time to the first response byte on a new peer connection.

What one run measures, behind the link emulator (:mod:`quicmesh.netem`, root)
with a fixed round-trip time (``--rtt``, default 50 ms, no loss):

* **Flow.** The client sidecar opens a *new* peer connection to the server
  sidecar, opens one tunnelled flow, writes a 64-byte request and waits for the
  first byte of the answer; the server writes 64 bytes as soon as it has read
  the request. The clock runs from just before ``connect()`` to that first byte.
* **Cases.**

  - ``h2``: TCP + TLS 1.3 (mutual) + HTTP/2 CONNECT (:class:`~quicmesh.H2Transport`).
  - ``quic-1rtt``: a full QUIC handshake (mutual TLS), then the CONNECT.
  - ``quic-0rtt``: resumption with a ticket from an earlier connection,
    ``early_data=True``: the CONNECT and the request travel in 0-RTT packets.
  - ``auto-udp-blocked``: an :class:`~quicmesh.AutoTransport` (QUIC, HTTP/2
    raced after 300 ms) while nftables in the server namespace drops every UDP
    datagram; a fresh transport per trial, so every trial races.
  - ``auto-udp-marked``: the same, once QUIC is marked broken for the address
    (one transport, warmed by a first connection): straight to HTTP/2.
  - ``h2-udp-blocked``: HTTP/2 alone under the same block, the baseline.

  ``--udp-blocked`` runs the last three.

  Every flow uses ``open_stream(..., wait_response=False)``, so the request
  follows its CONNECT at once in every case.
* **Result.** The median over ``--trials`` connections, in milliseconds and in
  round trips (median / RTT), with the expected count for comparison. The path's
  own round trip is measured too, before the cases: the median of
  :data:`PATH_SAMPLES` 64-byte UDP echoes through the same link between the same
  two namespaces, on the same event loop (the link emulator's forwarder adds
  milliseconds to the nominal RTT on a busy machine); ``path RTTs`` is the median
  divided by it, the protocol's own count without the forwarder's delay. The server
  and client live in two network namespaces joined by the emulated link; both
  run on one event loop in this process.

``--quick``: 20 ms RTT, 3 trials. ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, cast

from .. import AutoTransport, DevCA, H2Transport, MeshStream, QuicTransport, Transport
from .._timeouts import wait_within
from ..errors import QuicmeshError
from ..netem.system import missing_privileges
from ..outputs import output_file
from ..sidecar.launch import terminate_as_exit
from . import OneLineParser, cases_problem, positive_integer, positive_number
from ._engine import add_engine_argument, engine_problem

REQUEST = b"G" * 64
RESPONSE = b"R" * 64
TARGET = "ttfb.bench.svc:80"
CASES = ("h2", "quic-1rtt", "quic-0rtt")
UDP_BLOCKED_CASES = ("h2-udp-blocked", "auto-udp-blocked", "auto-udp-marked")
EXPECTED_RTTS = {
    "h2": 3,
    "quic-1rtt": 2,
    "quic-0rtt": 1,
    "h2-udp-blocked": 3,
    "auto-udp-blocked": 3,
    "auto-udp-marked": 3,
}
"""Round trips before the first response byte, by protocol design."""
PATH_SAMPLES = 20
"""UDP echoes that measure the path's round trip."""


@dataclass
class Row:
    """One case: median time to first byte over the trials."""

    case: str
    rtt_ms: float
    trials: int
    median_ms: float
    min_ms: float
    max_ms: float
    rtts: float
    expected_rtts: int
    early_data: str
    path_rtt_ms: float | None = None
    """The measured round trip of the path (median of UDP echoes through the link)."""
    path_rtts: float | None = None
    """The median divided by :attr:`path_rtt_ms`."""


async def _respond(stream: MeshStream) -> None:
    await stream.readexactly(len(REQUEST))
    stream.write(RESPONSE)
    await stream.drain()
    await stream.read()
    stream.write_eof()


async def _one_flow(
    transport: Transport, address: tuple[str, int], early: bool, client_side: _Side
) -> tuple[float, str]:
    start = time.perf_counter()
    with client_side():
        if isinstance(transport, QuicTransport):
            conn: Any = await transport.connect(address, early_data=early)
        else:
            conn = await transport.connect(address)
    stream = await conn.open_stream(TARGET, wait_response=False)
    stream.write(REQUEST)
    first = await stream.read(1)
    elapsed = time.perf_counter() - start
    if first != RESPONSE[:1]:
        raise QuicmeshError(f"unexpected first byte {first!r}")
    await stream.readexactly(len(RESPONSE) - 1)
    stream.write_eof()
    await stream.read()
    early_data = conn.early_data
    conn.close()
    await conn.wait_closed()
    return elapsed, early_data


_Side = Callable[[], AbstractContextManager[None]]


async def measure(
    rtt: float,
    trials: int,
    cases: list[str],
    server_side: _Side,
    client_side: _Side,
    host: str,
    block_udp: Callable[[bool], None] | None = None,
    engine: str | None = None,
) -> list[Row]:
    """Run every case ``trials`` times against listeners bound on ``host``.

    :param block_udp: turns the UDP block on and off (the ``*-udp-*`` cases).
    :param engine: the QUIC engine of the ``quic-*`` cases (both ends).
    """
    path_rtt = await measure_path_rtt(host, server_side, client_side)
    ca = DevCA()
    client_id = ca.issue("spiffe://mesh.local/ns/bench/sa/client")
    server_id = ca.issue("spiffe://mesh.local/ns/bench/sa/server")
    rows = []
    for case in cases:
        if case in UDP_BLOCKED_CASES:
            if block_udp is None:
                raise QuicmeshError(f"{case} needs the link emulator (UDP blocking)")
            block_udp(True)
            try:
                times = await _measure_blocked(
                    case, trials, ca, client_id, server_id, host, [server_side, client_side]
                )
            finally:
                block_udp(False)
            rows.append(_row(case, rtt, trials, times, "none", path_rtt))
            continue
        server: Transport
        client: Transport
        if case == "h2":
            server = H2Transport(identity=server_id, trust=ca.trust_bundle)
            client = H2Transport(identity=client_id, trust=ca.trust_bundle)
        else:
            server = QuicTransport(identity=server_id, trust=ca.trust_bundle, engine=engine)
            client = QuicTransport(identity=client_id, trust=ca.trust_bundle, engine=engine)
        with server_side():
            listener = await server.listen((host, 0), _respond)
        try:
            early = case == "quic-0rtt"
            if early:
                # One full handshake first, for the ticket; each trial leaves a new one.
                await _one_flow(client, listener.address, False, client_side)
                await _wait_for_ticket(client, listener.address)
            times = []
            outcome = "none"
            for _ in range(trials):
                elapsed, outcome = await _one_flow(client, listener.address, early, client_side)
                times.append(elapsed)
                if early:
                    await _wait_for_ticket(client, listener.address)
            if early and outcome != "accepted":
                raise QuicmeshError(f"0-RTT was {outcome}, not accepted")
        finally:
            listener.close()
            await listener.wait_closed()
        rows.append(_row(case, rtt, trials, times, outcome, path_rtt))
    return rows


class _Echo(asyncio.DatagramProtocol):
    """Sends every datagram back to where it came from."""

    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(data, addr)


class _EchoClient(asyncio.DatagramProtocol):
    """Resolves :attr:`waiter` with the arrival time of the next datagram."""

    waiter: asyncio.Future[float] | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(time.perf_counter())


async def measure_path_rtt(
    host: str, server_side: _Side, client_side: _Side, samples: int = PATH_SAMPLES
) -> float | None:
    """The median round trip of ``samples`` 64-byte UDP echoes from the client's side to
    ``host`` on the server's side, one at a time; None when one is lost (the emulated
    link has no loss, so that means the path is not UDP-clean)."""
    loop = asyncio.get_running_loop()
    with server_side():
        echo, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(host, 0))
    port = echo.get_extra_info("sockname")[1]
    try:
        with client_side():
            client, protocol = await loop.create_datagram_endpoint(
                _EchoClient, remote_addr=(host, port)
            )
        try:
            times = []
            for _ in range(samples):
                protocol.waiter = loop.create_future()
                start = time.perf_counter()
                client.sendto(REQUEST)
                try:
                    arrived = await wait_within(protocol.waiter, 5.0)
                except TimeoutError:
                    return None
                times.append(arrived - start)
            return statistics.median(times)
        finally:
            client.close()
    finally:
        echo.close()


def _row(
    case: str,
    rtt: float,
    trials: int,
    times: list[float],
    outcome: str,
    path_rtt: float | None = None,
) -> Row:
    median = statistics.median(times)
    return Row(
        case=case,
        rtt_ms=rtt * 1000,
        trials=trials,
        median_ms=median * 1000,
        min_ms=min(times) * 1000,
        max_ms=max(times) * 1000,
        rtts=median / rtt,
        expected_rtts=EXPECTED_RTTS[case],
        early_data=outcome,
        path_rtt_ms=None if path_rtt is None else path_rtt * 1000,
        path_rtts=None if path_rtt is None else median / path_rtt,
    )


async def _measure_blocked(
    case: str,
    trials: int,
    ca: DevCA,
    client_id: Any,
    server_id: Any,
    host: str,
    sides: list[_Side],
) -> list[float]:
    """One UDP-blocked case: the server accepts QUIC and HTTP/2 on one port number."""
    server_side, client_side = sides
    server = AutoTransport(identity=server_id, trust=ca.trust_bundle)
    with server_side():
        listener = await server.listen((host, 0), _respond)

    def client() -> Transport:
        if case == "h2-udp-blocked":
            return H2Transport(identity=client_id, trust=ca.trust_bundle)
        return AutoTransport(identity=client_id, trust=ca.trust_bundle)

    clients: list[Transport] = []
    try:
        shared = client()
        clients.append(shared)
        if case == "auto-udp-marked":
            assert isinstance(shared, AutoTransport)
            # The first connection races; its QUIC attempt, given 1 s, marks QUIC broken.
            with client_side():
                warm = await shared.connect(listener.address, timeout=1.0)
            warm.close()
            deadline = time.monotonic() + 10
            while not shared.stats()["endpoints_quic_broken"]:
                if time.monotonic() > deadline:
                    raise QuicmeshError("QUIC was not marked broken with UDP blocked")
                await asyncio.sleep(0.01)
        times = []
        for _ in range(trials):
            transport = shared if case != "auto-udp-blocked" else client()
            if transport is not shared:
                clients.append(transport)
            elapsed, _ = await _one_flow(transport, listener.address, False, client_side)
            times.append(elapsed)
        return times
    finally:
        for transport in clients:
            await transport.aclose()
        listener.close()
        await listener.wait_closed()


async def _wait_for_ticket(client: Transport, address: tuple[str, int]) -> None:
    assert isinstance(client, QuicTransport)
    if client.engine.name == "native":
        return  # rustls keeps the tickets; they arrive with the handshake, before any answer
    deadline = time.monotonic() + 10
    while client.ticket_cache.count(address) == 0:
        if time.monotonic() > deadline:
            raise QuicmeshError("the server sent no session ticket")
        await asyncio.sleep(0.005)


def run_on_link(rtt: float, trials: int, cases: list[str], engine: str | None = None) -> list[Row]:
    """Measure behind a netem link with ``rtt`` (needs root)."""
    from ..netem import Link, LinkConfig

    with Link(LinkConfig.symmetric(delay=rtt / 2)) as link:

        def block_udp(on: bool) -> None:
            _block_udp(link.server_ns, on)

        return asyncio.run(
            measure(
                rtt,
                trials,
                cases,
                server_side=lambda: link.entered("server"),
                client_side=lambda: link.entered("client"),
                host=link.server_address,
                block_udp=block_udp,
                engine=engine,
            )
        )


NFT_TABLE = "quicmesh_bench_udp_block"


def _block_udp(namespace: str, on: bool) -> None:
    """Drop (or stop dropping) every UDP datagram arriving in ``namespace``."""
    import subprocess

    if on:
        script = (
            f"table inet {NFT_TABLE} {{\n"
            "  chain input { type filter hook input priority 0; policy accept;\n"
            "    meta l4proto udp drop\n"
            "  }\n"
            "}\n"
        )
        argv = ["ip", "netns", "exec", namespace, "nft", "-f", "-"]
    else:
        script = ""
        argv = ["ip", "netns", "exec", namespace, "nft", "delete", "table", "inet", NFT_TABLE]
    result = subprocess.run(argv, input=script.encode(), capture_output=True, check=False)
    if result.returncode != 0:
        raise QuicmeshError(f"nft failed: {result.stderr.decode(errors='replace').strip()}")


def format_table(rows: list[Row]) -> str:
    """The human-readable result table."""
    path = rows[0].path_rtt_ms
    measured = "not measured" if path is None else f"{path:.1f} ms"
    lines = [
        f"time to first byte on a new connection, RTT {rows[0].rtt_ms:g} ms "
        f"(path measured: {measured}), median of {rows[0].trials}",
        f"{'case':<16} {'median ms':>10} {'min':>8} {'max':>8} {'RTTs':>6} {'expected':>9}"
        f" {'path RTTs':>10}",
    ]
    for row in rows:
        path_rtts = "-" if row.path_rtts is None else f"{row.path_rtts:.2f}"
        lines.append(
            f"{row.case:<16} {row.median_ms:>10.1f} {row.min_ms:>8.1f} {row.max_ms:>8.1f} "
            f"{row.rtts:>6.2f} {row.expected_rtts:>9} {path_rtts:>10}"
        )
    lines += COLUMNS.splitlines()
    return "\n".join(lines)


COLUMNS = """
median / min / max ms: from just before connect() to the first response byte
RTTs: the median divided by the round-trip time (handshake plus request round trips)
path RTTs: the median divided by the path's measured round trip (median of UDP echoes
  through the same link, same event loop: the emulator's forwarder delay taken out)
expected: the round trips the protocol needs (h2: TCP + TLS + request = 3, quic-1rtt: 2,
  quic-0rtt: 1; the UDP-blocked cases end on HTTP/2: 3, plus for auto-udp-blocked the
  300 ms before HTTP/2 is raced); RTTs above it are time spent on CPU or waiting for timers"""
"""The legend printed under :func:`format_table`."""


MAX_RTT_MS = 60_000.0
"""The longest ``--rtt`` (a minute: ``1e9`` reached the link emulator, which refused it
naming its own one-way delay)."""


def _rtt_ms(text: str) -> float:
    value = positive_number(text)
    if value > MAX_RTT_MS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_RTT_MS:g} ms, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``quicmesh bench ttfb [--rtt MS] [--trials N] [--cases ...] [--quick] [--json FILE]``."""
    parser = OneLineParser(prog="quicmesh bench ttfb", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rtt",
        type=_rtt_ms,
        default=None,
        help=f"round-trip time, ms (50; above 0, at most {MAX_RTT_MS:g})",
    )
    parser.add_argument(
        "--trials", type=positive_integer, default=None, help="connections per case (10)"
    )
    parser.add_argument(
        "--cases",
        default=None,
        help=f"subset of {','.join(CASES + UDP_BLOCKED_CASES)} (default {','.join(CASES)})",
    )
    parser.add_argument(
        "--udp-blocked", action="store_true", help=f"run {','.join(UDP_BLOCKED_CASES)}"
    )
    parser.add_argument("--quick", action="store_true", help="20 ms RTT, 3 trials")
    parser.add_argument("--json", type=output_file, help="write the rows to this file")
    add_engine_argument(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    rtt_ms = args.rtt if args.rtt is not None else (20.0 if args.quick else 50.0)
    trials = args.trials if args.trials is not None else (3 if args.quick else 10)
    default = UDP_BLOCKED_CASES if args.udp_blocked else CASES
    given = args.cases if args.cases is not None else ",".join(default)
    cases = [c.strip() for c in given.split(",") if c.strip()]
    problem = cases_problem(cases, CASES + UDP_BLOCKED_CASES)
    if problem is not None:
        print(f"quicmesh bench ttfb: {problem}", file=sys.stderr)
        return 2
    problem = engine_problem(args.engine)
    if problem is not None:
        print(f"quicmesh bench ttfb: {problem}", file=sys.stderr)
        return 2
    reason = missing_privileges()
    if reason is not None:  # (it was the link's error, exit 1; 2 as `quicmesh netem`)
        print(f"quicmesh bench ttfb: the link emulator {reason}", file=sys.stderr)
        return 2
    try:
        # ``kill PID`` and ``timeout`` (SIGTERM, SIGHUP) become SystemExit, so that the
        # link's tear-down deletes its namespaces, as after Ctrl-C (they were left).
        with terminate_as_exit():
            rows = run_on_link(rtt_ms / 1000, trials, cases, args.engine)
    except QuicmeshError as exc:
        print(f"quicmesh bench ttfb: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"rows": [asdict(row) for row in rows]}, file, indent=2)
    return 0
