"""``quicmesh bench migration``: how long flows stall when the client's address changes.

What one run measures, on loopback through a relay that adds a one-way delay of
``--rtt``/2 in each direction (:mod:`quicmesh.bench.relay`):

* **Flows.** The client opens ``--flows`` tunnelled flows (default 4) on one peer
  connection; the server writes to each as fast as the flow allows (a download)
  until the client half-closes. The client timestamps every read.
  With ``--rate MBIT`` the server paces each download at that rate instead
  (:data:`PACED_WRITE` bytes at a time): on a link with no rate limit a flow sent
  as fast as it may is window-limited, so its reads come in bursts about one RTT
  apart and the longest gap cannot show a stall shorter than that; paced, the
  steady gap is the pacing interval (a few ms) and the stall is the interruption
  itself.
* **The event**, half-way through ``--duration``:

  - ``quic-migrate``: the client calls ``await conn.migrate()`` (new UDP socket,
    new connection ID; the old socket keeps reading for a while);
  - ``quic-rebind``: NAT rebinding, the relay's upstream socket changes port, the
    client does not know; the server validates the new path;
  - ``h2-rebind``: the same rebinding for the TCP relay of an HTTP/2 connection,
    which breaks it (as a NAT does to TCP): every flow on it is lost;
  - ``quic-death`` / ``h2-death``: the peer dies (``kill -9``): the relay closes
    its sockets, so the client's next datagram meets ICMP port unreachable (QUIC)
    or the TCP connection is reset (HTTP/2);
  - ``quic-hang`` / ``h2-hang``: the peer hangs (``SIGSTOP``) or the path
    blackholes: the relay drops everything both ways and closes nothing.
    QUIC's liveness checks (keepalive, probe timeouts) fail the connection;
    HTTP/2's keepalive PING fails it ``dead_after`` later (10 s by default;
    until 2026-12-07 it had none, and its flows waited: ``never`` within the run).

* **Result.** The stall: the longest gap between two reads (over all flows) from
  the event to the end, in milliseconds and in RTTs; next to it the longest gap
  before the event (the steady state, for reference), the flows lost and the
  bytes received. A broken connection's stall is reported as ``never resumed``.
  For the death and hang cases, ``reset ms``: from the event until the last flow
  failed (every flow must fail: its peer is gone), or ``never`` within
  :data:`FAILOVER_WAIT` seconds.

``--quick``: 1.5 s per case. ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from .. import DevCA, H2Transport, MeshStream, QuicTransport, Transport, TunnelError
from .._timeouts import wait_within
from ..errors import QuicmeshError
from ..outputs import output_file
from . import OneLineParser, cases_problem, positive_integer, positive_number
from ._engine import add_engine_argument, engine_problem
from .relay import TcpRelay, UdpRelay

CASES = ("quic-migrate", "quic-rebind", "h2-rebind")
"""The default cases: the client's address changes."""
FAILOVER_CASES = ("quic-death", "h2-death", "quic-hang", "h2-hang")
"""The peer dies or hangs (``--cases``; ``--failover`` runs these)."""
FAILOVER_WAIT = 15.0
"""Seconds a death or hang case waits for its flows to fail."""
TARGET = "bulk.bench.svc:9000"
CHUNK = 16 * 1024
PACED_WRITE = 1024
"""Bytes per write of a paced download (``--rate``)."""


@dataclass
class Row:
    """One case."""

    case: str
    rtt_ms: float
    flows: int
    flows_lost: int
    stall_ms: float | None
    """Longest gap in received bytes after the event; None: the flows never resumed."""
    stall_rtts: float | None
    steady_gap_ms: float
    """Longest gap before the event."""
    received_bytes: int
    reset_ms: float | None = None
    """(death, hang) From the event until the last flow failed; None: not all did."""
    rate_mbit: float | None = None
    """Each flow's paced download rate (``--rate``); None: as fast as the flow allows."""


def _downloader(rate: float | None) -> Callable[[MeshStream], Awaitable[None]]:
    """The server's handler: send until the client half-closes, as fast as the flow
    allows, or paced at ``rate`` bytes a second."""

    async def download(stream: MeshStream) -> None:
        loop = asyncio.get_running_loop()
        block = bytes(CHUNK if rate is None else PACED_WRITE)
        due = loop.time()
        reader = asyncio.ensure_future(stream.read())
        try:
            while not reader.done():
                stream.write(block)
                await stream.drain()
                if rate is not None:
                    # Due times, not sleeps after each write: a late write does not
                    # lower the rate, and a stalled flow catches up once it resumes.
                    due += len(block) / rate
                    await asyncio.sleep(max(0.0, due - loop.time()))
            stream.write_eof()
        except TunnelError:
            pass
        finally:
            reader.cancel()

    return download


async def _flow(
    conn: Any,
    reads: list[float],
    counter: list[int],
    stop: asyncio.Event,
    failures: list[float] | None = None,
) -> bool:
    """Client: read until ``stop``, then half-close and drain; False if the flow failed
    (when, in ``failures``)."""
    try:
        stream = await conn.open_stream(TARGET)
        closer = asyncio.ensure_future(stop.wait())
        while True:
            data = await stream.read(65536)
            if not data:
                break
            reads.append(time.perf_counter())
            counter[0] += len(data)
            if closer.done() and not stream.is_closing():
                stream.write_eof()
        return True
    except TunnelError:
        if failures is not None:
            failures.append(time.perf_counter())
        return False


def _longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *[t for t in times if start <= t <= end], end]
    return max(b - a for a, b in itertools.pairwise(points))


async def run_case(
    case: str,
    rtt: float,
    flows: int,
    duration: float,
    engine: str | None = None,
    rate_mbit: float | None = None,
) -> Row:
    """Run one case and measure it (``engine``: the QUIC engine of the quic cases;
    ``rate_mbit``: pace each download at this many Mbit/s)."""
    ca = DevCA()
    client_id = ca.issue("spiffe://mesh.local/ns/bench/sa/client")
    server_id = ca.issue("spiffe://mesh.local/ns/bench/sa/server")
    kind = H2Transport if case.startswith("h2") else QuicTransport
    server: Transport
    client: Transport
    if kind is QuicTransport:
        server = QuicTransport(identity=server_id, trust=ca.trust_bundle, engine=engine)
        client = QuicTransport(identity=client_id, trust=ca.trust_bundle, engine=engine)
    else:
        server = H2Transport(identity=server_id, trust=ca.trust_bundle)
        client = H2Transport(identity=client_id, trust=ca.trust_bundle)
    rate = rate_mbit * 1e6 / 8 if rate_mbit is not None else None
    listener = await server.listen(("127.0.0.1", 0), _downloader(rate))
    relay: UdpRelay | TcpRelay
    if kind is QuicTransport:
        relay = await UdpRelay(listener.address, delay=rtt / 2).start()
    else:
        relay = await TcpRelay(listener.address, delay=rtt / 2).start()
    reads: list[float] = []
    counter = [0]
    failures: list[float] = []
    stop = asyncio.Event()
    failover = case in FAILOVER_CASES
    conn: Any = await client.connect(relay.address)
    try:
        tasks = [
            asyncio.ensure_future(_flow(conn, reads, counter, stop, failures)) for _ in range(flows)
        ]
        start = time.perf_counter()
        await asyncio.sleep(duration / 2)
        event_at = time.perf_counter()
        if case == "quic-migrate":
            await conn.migrate()
        elif case.endswith("-death"):
            relay.close()
        elif case.endswith("-hang"):
            relay.freeze()
        elif isinstance(relay, UdpRelay):
            await relay.rebind()
        else:
            relay.rebind()
        if failover:
            await asyncio.wait(tasks, timeout=FAILOVER_WAIT)
        else:
            await asyncio.sleep(duration / 2)
        end = time.perf_counter()
        stop.set()
        if failover:
            conn.close()  # what is left of a hung connection
            done, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
            results = [t.result() if t in done else False for t in tasks]
        else:
            gathered = asyncio.gather(*tasks)
            # (Ctrl-C cancels the flows before this wait: their gathering's CancelledError
            # was an error nobody retrieved.)
            gathered.add_done_callback(lambda done: done.cancelled() or done.exception())
            results = await wait_within(gathered, 30)
    finally:
        conn.close()
        await conn.wait_closed()
        relay.close()
        listener.close()
        await listener.wait_closed()
    lost = sum(1 for ok in results if not ok)
    # Bytes already buffered may still be read after the event; a flow that then
    # fails did not resume.
    resumed = lost < flows and any(t > event_at for t in reads)
    stall = _longest_gap(reads, event_at, end) if resumed else None
    failed_in_time = [t for t in failures if t <= end]
    reset = max(failed_in_time) - event_at if len(failed_in_time) == flows else None
    return Row(
        case=case,
        rtt_ms=rtt * 1000,
        flows=flows,
        flows_lost=lost,
        stall_ms=stall * 1000 if stall is not None else None,
        stall_rtts=stall / rtt if stall is not None else None,
        steady_gap_ms=_longest_gap(reads, start + duration / 4, event_at) * 1000,
        received_bytes=counter[0],
        reset_ms=reset * 1000 if reset is not None else None,
        rate_mbit=rate_mbit,
    )


def format_table(rows: list[Row]) -> str:
    """The human-readable result table."""
    never = "the connection broke and no flow resumed"
    if all(row.case in FAILOVER_CASES for row in rows):  # (no address changes)
        event, since = "the peer dies or hangs", "the death or hang"
        never = f"no flow resumed; the end: when the last flow failed, {FAILOVER_WAIT:g} s at most"
    elif any(row.case in FAILOVER_CASES for row in rows):
        event, since = "the client address changes or the peer dies or hangs", "the event"
    else:
        event, since = "the client address changes", "the address change"
    rate = rows[0].rate_mbit
    pace = "as fast as each flow allows" if rate is None else f"each paced at {rate:g} Mbit/s"
    lines = [
        f"stall when {event} mid-transfer, RTT {rows[0].rtt_ms:g} ms, {rows[0].flows} flows"
        f" ({pace})",
        f"{'case':<13} {'stall ms':>9} {'RTTs':>6} {'steady gap ms':>14} "
        f"{'flows lost':>11} {'MB received':>12} {'reset ms':>9}",
    ]
    for row in rows:
        stall = f"{row.stall_ms:9.1f}" if row.stall_ms is not None else f"{'never':>9}"
        rtts = f"{row.stall_rtts:6.2f}" if row.stall_rtts is not None else f"{'-':>6}"
        if row.case not in FAILOVER_CASES:
            reset = f"{'-':>9}"
        else:
            reset = f"{row.reset_ms:9.1f}" if row.reset_ms is not None else f"{'never':>9}"
        lines.append(
            f"{row.case:<13} {stall} {rtts} {row.steady_gap_ms:>14.1f} "
            f"{row.flows_lost:>5} of {row.flows:<3} {row.received_bytes / 1e6:>12.1f} {reset}"
        )
    lines += COLUMNS.format(since=since, never=never).splitlines()
    return "\n".join(lines)


COLUMNS = """
stall ms: longest gap between two reads (any flow) from {since} to the end
  ('never': {never})
RTTs: that stall divided by the round-trip time
steady gap ms: longest gap between two reads before {since} (the normal pace, for reference)
flows lost: flows that failed; MB received: payload read by the client over all flows
reset ms: (death, hang) from the event until the client saw the last flow fail
  ('never': not all failed within the wait)"""
"""The legend printed under :func:`format_table`; ``since`` names the event the stall
is measured from (the address change, the peer's death or hang)."""


def main(argv: list[str] | None = None) -> int:
    """``quicmesh bench migration [--rtt MS] [--flows N] [--duration S] [--quick] [--json F]``."""
    parser = OneLineParser(prog="quicmesh bench migration", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rtt", type=positive_number, default=40.0, help="round-trip time, ms (40)"
    )
    parser.add_argument(
        "--flows", type=positive_integer, default=4, help="flows on the connection (4)"
    )
    parser.add_argument(
        "--duration", type=positive_number, default=None, help="seconds per case (4)"
    )
    parser.add_argument(
        "--cases",
        default=None,
        help=f"subset of {','.join(CASES + FAILOVER_CASES)} (default {','.join(CASES)})",
    )
    parser.add_argument("--failover", action="store_true", help=f"run {','.join(FAILOVER_CASES)}")
    parser.add_argument(
        "--repeat",
        type=positive_integer,
        default=1,
        help="run the cases this many times, interleaved (1)",
    )
    parser.add_argument(
        "--rate",
        type=positive_number,
        default=None,
        help="pace each flow's download at this many Mbit/s (default: as fast as it may;"
        " paced, the stall is not hidden by a window-limited flow's per-RTT bursts)",
    )
    parser.add_argument("--quick", action="store_true", help="1.5 s per case")
    parser.add_argument("--json", type=output_file, help="write the rows to this file")
    add_engine_argument(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    duration = args.duration if args.duration is not None else (1.5 if args.quick else 4.0)
    default = FAILOVER_CASES if args.failover else CASES
    given = args.cases if args.cases is not None else ",".join(default)
    cases = [c.strip() for c in given.split(",") if c.strip()]
    problem = cases_problem(cases, CASES + FAILOVER_CASES)
    if problem is not None:
        print(f"quicmesh bench migration: {problem}", file=sys.stderr)
        return 2
    problem = engine_problem(args.engine)
    if problem is not None:
        print(f"quicmesh bench migration: {problem}", file=sys.stderr)
        return 2
    try:
        rows = [
            asyncio.run(
                run_case(case, args.rtt / 1000, args.flows, duration, args.engine, args.rate)
            )
            for _ in range(args.repeat)
            for case in cases
        ]
    except QuicmeshError as exc:
        print(f"quicmesh bench migration: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"rows": [asdict(row) for row in rows]}, file, indent=2)
    failures = [
        row.case
        for row in rows
        if row.case.startswith("quic") and row.case not in FAILOVER_CASES and row.flows_lost
    ]
    if failures:
        print(f"QUIC flows lost in: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0
