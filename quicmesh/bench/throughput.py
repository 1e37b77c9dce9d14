"""``quicmesh bench throughput``: bulk transfer per transport, against raw aioquic.

What one run measures, on loopback:

* **Direction: download.** The client opens a stream asking for N bytes; the
  server writes them and half-closes; the client reads to EOF. This is the
  direction of the reference, an HTTP/3 GET.
* **Cases.** For each stream count (``--streams``, default 1 and 16) the total
  size (``--size``, default 256 MiB) is split evenly over that many parallel
  streams on one connection (TcpTransport: one TLS connection per stream, by
  design). Every transport in ``--transports`` runs, plus **aioquic**: aioquic's
  own client and server (``aioquic.asyncio.serve``/``connect`` and
  ``H3Connection``), a GET answered with N bytes, no quicmesh code in the path,
  the same congestion control (cubic), initial flow-control windows and UDP
  socket buffers as QuicTransport. The reference server queues the whole body
  at once (aioquic has no backpressure API); the tunnel server writes 64 KiB
  and awaits ``drain()``, as a proxy would.
* **Processes.** Every server (the tunnel listeners and the reference) runs in
  one child process with its own event loop; the clients run in this process.
  CPU seconds are ``time.process_time()`` of each process over the timed part.
* **Timing.** From the first ``open_stream`` (GET) to the last byte, after the
  handshake. ``--repeat N`` runs every case N times; the table shows the median.
* **Verification.** The payload repeats a seeded 64 KiB block; the client
  compares every byte it reads with what belongs at that offset and checks the
  final length, so a broken run fails (exit code 1) instead of reporting a speed.

``--profile DIR`` writes a cProfile of each timed case, client and server side
(``DIR/<case>-client.prof``, ``DIR/<case>-server.prof``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import random
import re
import signal
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent

from .. import TRANSPORTS, DevCA, Identity, MeshStream, PeerConnection, TrustBundle
from ..errors import QuicmeshError
from ..outputs import output_dir, output_file
from ..sidecar.launch import die_with_parent, run_async, terminate_as_exit
from ..transport.base import default_quic_engine
from ..transport.quic import UDP_SOCKET_BUFFER
from ..tunnel.h3 import DEFAULT_CONNECTION_WINDOW, DEFAULT_STREAM_WINDOW
from . import OneLineParser
from ._spawned import ChildUnanswered, SpawnedChild

REFERENCE = "aioquic"
"""Name of the raw-aioquic reference in the table and the JSON output."""

DEFAULT_SIZE = 256 * 1024 * 1024
QUICK_SIZE = 16 * 1024 * 1024
DEFAULT_STREAMS = (1, 16)
CONGESTION_CONTROL = "cubic"
TARGET = "bulk.bench.svc:9000"
SIZE_HEADER = "x-bench-bytes"

BLOCK_SIZE = 64 * 1024
"""Period of the payload pattern, and the tunnel server's write size."""
READ_SIZE = 1024 * 1024
"""Largest read the tunnel client asks for."""
FRAME_SIZE = 16 * BLOCK_SIZE
"""Size of the DATA frames the reference server queues."""
PROGRESS_INTERVAL = 5.0
STALL_TIMEOUT = 10.0
"""Seconds without a received byte after which a case fails."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
}


MAX_SIZE = 1 << 40
"""The largest ``--size`` (1 TiB: far beyond any download this benchmark makes)."""


def parse_size(text: str) -> int:
    """Parse ``256MiB``, ``16M``, ``1.5GB`` or a plain byte count; always positive."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 256MiB, 16MB, 1048576)")
    number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if number > MAX_SIZE:  # (a 400-digit count was an OverflowError's traceback)
        raise ValueError(f"size must be at most {format_size(MAX_SIZE)}, not {text[:40]!r}")
    value = int(number)
    if value < 1:
        raise ValueError(f"size must be at least one byte, not {text!r}")
    return value


def format_size(size: int) -> str:
    """``268435456`` -> ``256 MiB``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def split_size(total: int, streams: int) -> list[int]:
    """Split ``total`` bytes over ``streams`` streams (the first ones take the remainder)."""
    base, extra = divmod(total, streams)
    return [base + (1 if i < extra else 0) for i in range(streams)]


# -- payload -------------------------------------------------------------------


def pattern_block(seed: int = 0) -> bytes:
    """The 64 KiB block every payload repeats (random, so compression cannot help)."""
    return random.Random(seed).randbytes(BLOCK_SIZE)


class PayloadChecker:
    """Checks, chunk by chunk, that a stream carries the pattern from offset 0.

    Comparison is ``bytes.startswith`` at an offset into a pre-built copy of
    the pattern: a memcmp, no copies.
    """

    def __init__(self, block: bytes, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.error: str | None = None
        self._period = len(block)
        self._window = block * (READ_SIZE // len(block) + 2)
        self._max_piece = len(self._window) - self._period

    def feed(self, data: bytes) -> None:
        """Check the next bytes of the stream."""
        if self.error is None:
            view = memoryview(data)
            for start in range(0, len(data), self._max_piece):
                piece = (
                    data
                    if len(data) <= self._max_piece
                    else bytes(view[start : start + self._max_piece])
                )
                offset = (self.received + start) % self._period
                if not self._window.startswith(piece, offset):
                    expected = self._window[offset : offset + len(piece)]
                    wrong = next(
                        i for i, (a, b) in enumerate(zip(piece, expected, strict=True)) if a != b
                    )
                    self.error = f"wrong byte at offset {self.received + start + wrong}"
                    break
        self.received += len(data)

    def finish(self) -> None:
        """Raise :class:`BenchmarkError` unless exactly the expected bytes arrived."""
        if self.error is None and self.received != self.expected:
            self.error = f"received {self.received} bytes, expected {self.expected}"
        if self.error is not None:
            raise BenchmarkError(self.error)


class BenchmarkError(QuicmeshError):
    """A case moved the wrong bytes (or none); the run reports no speed for it."""


# -- the raw aioquic reference -----------------------------------------------


def reference_configuration(
    *, is_client: bool, identity: Identity | None = None
) -> QuicConfiguration:
    """aioquic's configuration for the reference: cubic, QuicTransport's initial windows."""
    config = QuicConfiguration(
        alpn_protocols=H3_ALPN,
        is_client=is_client,
        congestion_control_algorithm=CONGESTION_CONTROL,
        max_data=DEFAULT_CONNECTION_WINDOW,
        max_stream_data=DEFAULT_STREAM_WINDOW,
    )
    if identity is not None:
        config.certificate = identity.certificate
        config.certificate_chain = identity.chain
        config.private_key = identity.private_key
    if is_client:
        # The reference measures data transfer; the handshake is outside the timing,
        # and SPIFFE certificates carry no name aioquic could check.
        config.verify_mode = ssl.CERT_NONE
    return config


class ReferenceServerProtocol(QuicConnectionProtocol):
    """A minimal HTTP/3 server: ``GET /<n>`` is answered with ``n`` pattern bytes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h3 = H3Connection(self._quic)
        self._body = pattern_block() * (FRAME_SIZE // BLOCK_SIZE)

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self._h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self._answer(h3_event)

    def _answer(self, event: HeadersReceived) -> None:
        headers = dict(event.headers)
        path = headers.get(b":path", b"")
        if headers.get(b":method") != b"GET" or not path[1:].isdigit():
            self._h3.send_headers(event.stream_id, [(b":status", b"404")], end_stream=True)
            return
        size = int(path[1:])
        self._h3.send_headers(
            event.stream_id,
            [(b":status", b"200"), (b"content-length", str(size).encode())],
        )
        # aioquic has no backpressure: the idiom (as in its examples) is to queue it all.
        sent = 0
        while size - sent > len(self._body):
            self._h3.send_data(event.stream_id, self._body, end_stream=False)
            sent += len(self._body)
        self._h3.send_data(event.stream_id, self._body[: size - sent], end_stream=True)


class ReferenceClientProtocol(QuicConnectionProtocol):
    """A minimal HTTP/3 client issuing ``GET /<n>`` and checking the body."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h3 = H3Connection(self._quic)
        self._checkers: dict[int, PayloadChecker] = {}
        self._done: dict[int, asyncio.Future[None]] = {}
        self._block = pattern_block()
        self.on_bytes: Callable[[int], None] = lambda n: None

    async def wait_connected(self) -> None:
        """aioquic's, except that a handshake given up (the case cancelled: SIGTERM) leaves
        no "Future exception was never retrieved" behind: aioquic shields the future it
        waits on, and the close() that follows fails that future with ConnectionError."""
        try:
            await super().wait_connected()
        except asyncio.CancelledError:
            if (waiter := self._connected_waiter) is not None:
                waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise

    async def get(self, size: int) -> None:
        """Fetch ``size`` bytes on a new request stream; raise BenchmarkError if they are wrong."""
        stream_id = self._quic.get_next_available_stream_id()
        self._checkers[stream_id] = PayloadChecker(self._block, size)
        self._done[stream_id] = self._loop.create_future()
        self._h3.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", b"bench"),
                (b":path", f"/{size}".encode()),
            ],
            end_stream=True,
        )
        self.transmit()
        await self._done[stream_id]
        self._checkers.pop(stream_id).finish()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            for done in self._done.values():
                if not done.done():
                    done.set_exception(BenchmarkError(f"connection closed: {event.reason_phrase}"))
        for h3_event in self._h3.handle_event(event):
            self._h3_event_received(h3_event)

    def _h3_event_received(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            status = dict(event.headers).get(b":status")
            if status != b"200":
                self._finish(event.stream_id, BenchmarkError(f"status {status!r}"))
            elif event.stream_ended:
                self._finish(event.stream_id, None)
        elif isinstance(event, DataReceived):
            self._checkers[event.stream_id].feed(event.data)
            self.on_bytes(len(event.data))
            if event.stream_ended:
                self._finish(event.stream_id, None)

    def _finish(self, stream_id: int, error: BenchmarkError | None) -> None:
        done = self._done[stream_id]
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def _tune_udp_socket(transport: asyncio.BaseTransport | None) -> None:
    """Give a reference socket the buffers QuicTransport asks for on its own sockets."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER)


# -- the server process ----------------------------------------------------------


@dataclass(frozen=True)
class ServerSetup:
    """What the server process needs (picklable: PEM bytes, names)."""

    transports: tuple[str, ...]
    cert_chain_pem: bytes
    key_pem: bytes
    trust_pem: bytes
    profile_dir: str | None


def _transport_options(name: str) -> dict[str, Any]:
    return {"congestion_control": CONGESTION_CONTROL} if name == "quic" else {}


async def _send_payload(stream: MeshStream) -> None:
    """Tunnel server handler: write the requested bytes, 64 KiB per ``drain()``."""
    try:
        size = int(stream.headers.get(SIZE_HEADER, ""))
    except ValueError:
        stream.refuse(400, f"missing or bad {SIZE_HEADER}")
        return
    block = pattern_block()
    remaining = size
    while remaining > 0:
        chunk = block if remaining >= len(block) else block[:remaining]
        stream.write(chunk)
        await stream.drain()
        remaining -= len(chunk)
    stream.write_eof()
    await stream.read(-1)
    stream.close()
    await stream.wait_closed()


async def _serve(setup: ServerSetup, control: Connection) -> None:
    loop = asyncio.get_running_loop()
    identity = Identity.from_pem(setup.cert_chain_pem, setup.key_pem)
    trust = TrustBundle.from_pem(setup.trust_pem)
    addresses: dict[str, tuple[str, int]] = {}
    listeners = []
    for name in setup.transports:
        transport = TRANSPORTS[name](identity=identity, trust=trust, **_transport_options(name))
        listener = await transport.listen(("127.0.0.1", 0), _send_payload)
        listeners.append(listener)
        addresses[name] = listener.address
    reference = await serve(
        "127.0.0.1",
        0,
        configuration=reference_configuration(is_client=False, identity=identity),
        create_protocol=ReferenceServerProtocol,
    )
    _tune_udp_socket(reference._transport)
    assert reference._transport is not None
    addresses[REFERENCE] = reference._transport.get_extra_info("sockname")[:2]

    stopped = loop.create_future()
    profiler: cProfile.Profile | None = None

    def on_command() -> None:
        nonlocal profiler
        try:
            command, label = control.recv()
        except (EOFError, OSError):
            # The parent is gone (killed): nobody will send "stop". The reader would
            # fire for ever on the closed pipe (a traceback per loop iteration before).
            loop.remove_reader(control.fileno())
            if not stopped.done():
                stopped.set_result(None)
            return
        if command == "begin" and setup.profile_dir is not None:
            profiler = cProfile.Profile()
            profiler.enable()
        if command == "end" and profiler is not None:
            profiler.disable()
            assert setup.profile_dir is not None
            profiler.dump_stats(os.path.join(setup.profile_dir, f"{label}-server.prof"))
            profiler = None
        try:
            control.send(time.process_time())
        except OSError:  # the parent is gone
            command = "stop"
        if command == "stop" and not stopped.done():
            loop.remove_reader(control.fileno())
            stopped.set_result(None)

    loop.add_reader(control.fileno(), on_command)
    control.send(addresses)
    await stopped
    for listener in listeners:
        listener.close()
        await listener.wait_closed()
    reference.close()


def _server_main(setup: ServerSetup, control: Connection, parent: int) -> None:
    """Entry point of the server process. A Ctrl-C reaches it too (the terminal signals
    the whole process group): it is left to the parent, which stops it (a traceback of
    the child's KeyboardInterrupt before). It dies with the parent ``parent`` (SIGTERM
    from the kernel, Linux), and stops when the control pipe closes anyway."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    asyncio.run(_serve(setup, control))


class ServerProcess:
    """The child process hosting every server; commands go over a pipe."""

    def __init__(self, setup: ServerSetup) -> None:
        try:
            self._child = SpawnedChild(_server_main, setup, "quicmesh-bench-server")
        except ChildUnanswered as exc:
            raise BenchmarkError(f"the server process failed to start: {exc}") from None
        self.addresses: dict[str, tuple[str, int]] = self._child.ready

    def command(self, command: str, label: str = "") -> float:
        """Send ``begin``/``end``; returns the server's process CPU time."""
        try:
            value: float = self._child.ask((command, label), 60)
        except ChildUnanswered:
            raise BenchmarkError(f"the server process did not answer {command!r}") from None
        return value

    def stop(self) -> None:
        """Stop the servers and wait for the process to end."""
        self._child.stop(("stop", ""))


# -- the client side -------------------------------------------------------------


@dataclass
class CaseResult:
    """One timed run of one case."""

    transport: str
    streams: int
    size: int
    seconds: float
    client_cpu: float
    server_cpu: float

    @property
    def megabytes_per_second(self) -> float:
        """Payload throughput in MB/s (10^6 bytes per second)."""
        return self.size / self.seconds / 1e6


@dataclass
class Progress:
    """Bytes received so far in the running case (for the progress line)."""

    received: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, count: int) -> None:
        self.received += count


async def _fetch_tunnel(connection: PeerConnection, size: int, progress: Progress) -> None:
    stream = await connection.open_stream(TARGET, headers={SIZE_HEADER: str(size)})
    stream.write_eof()
    checker = PayloadChecker(pattern_block(), size)
    while data := await stream.read(READ_SIZE):
        checker.feed(data)
        progress.add(len(data))
    checker.finish()
    stream.close()
    await stream.wait_closed()


async def _connect_tunnel(
    name: str, address: tuple[str, int], setup: ServerSetup
) -> PeerConnection:
    identity = Identity.from_pem(setup.cert_chain_pem, setup.key_pem)
    trust = TrustBundle.from_pem(setup.trust_pem)
    transport = TRANSPORTS[name](identity=identity, trust=trust, **_transport_options(name))
    return await transport.connect(address)


async def _close_tunnel(connection: PeerConnection, label: str) -> None:
    """Close after the timed part; a failure here is reported, the bytes were already checked."""
    try:
        connection.close()
        await connection.wait_closed()
    except (QuicmeshError, OSError) as exc:
        print(f"      warning: {label}: closing the connection failed: {exc!r}", flush=True)


async def _watch(task: asyncio.Task[None], progress: Progress, total: int) -> None:
    """Print progress while ``task`` runs; cancel it if no byte arrives for STALL_TIMEOUT,
    or if the watch itself is cancelled (Ctrl-C: its failure, once the connections
    closed under it, was an error nobody retrieved)."""
    try:
        await _watch_until_done(task, progress, total)
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _watch_until_done(task: asyncio.Task[None], progress: Progress, total: int) -> None:
    last_count, last_change, last_print = 0, time.perf_counter(), time.perf_counter()
    while not task.done():
        await asyncio.wait({task}, timeout=1.0)
        now = time.perf_counter()
        if progress.received != last_count:
            last_count, last_change = progress.received, now
        elif now - last_change > STALL_TIMEOUT and not task.done():
            task.cancel()
            raise BenchmarkError(
                f"stalled: no byte arrived for {STALL_TIMEOUT:g} s "
                f"({progress.received} of {total} bytes received)"
            )
        if now - last_print >= PROGRESS_INTERVAL and not task.done():
            last_print = now
            print(
                f"      ... {progress.received / 1e6:8.1f} MB of {total / 1e6:.1f}"
                f"  ({progress.received / 1e6 / (now - progress.started):.1f} MB/s)",
                flush=True,
            )
    task.result()


async def _run_case(
    name: str, sizes: list[int], server: ServerProcess, setup: ServerSetup, label: str
) -> CaseResult:
    progress = Progress()
    address = server.addresses[name]
    async with contextlib.AsyncExitStack() as stack:
        if name == REFERENCE:
            client = await stack.enter_async_context(
                connect(
                    address[0],
                    address[1],
                    configuration=reference_configuration(is_client=True),
                    create_protocol=ReferenceClientProtocol,
                )
            )
            assert isinstance(client, ReferenceClientProtocol)
            _tune_udp_socket(client._transport)
            client.on_bytes = progress.add
            fetches = [client.get(size) for size in sizes]
        else:
            connection = await _connect_tunnel(name, address, setup)
            stack.push_async_callback(_close_tunnel, connection, label)
            fetches = [_fetch_tunnel(connection, size, progress) for size in sizes]
        finished = 0.0

        async def timed() -> None:
            nonlocal finished
            await asyncio.gather(*fetches)
            finished = time.perf_counter()

        profiler = cProfile.Profile() if setup.profile_dir is not None else None
        server_cpu = server.command("begin", label)
        client_cpu = time.process_time()
        progress.started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            await _watch(asyncio.ensure_future(timed()), progress, sum(sizes))
        finally:
            if profiler is not None:
                profiler.disable()
            client_cpu = time.process_time() - client_cpu
            server_cpu = server.command("end", label) - server_cpu
    if profiler is not None:
        assert setup.profile_dir is not None
        profiler.dump_stats(os.path.join(setup.profile_dir, f"{label}-client.prof"))
    seconds = finished - progress.started
    return CaseResult(name, len(sizes), sum(sizes), seconds, client_cpu, server_cpu)


# -- the report ------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: the median of a case's repeats."""

    transport: str
    streams: int
    size: int
    megabytes_per_second: float
    ratio: float | None
    seconds: float
    client_cpu: float
    server_cpu: float
    runs: list[float]


def summarize(results: list[CaseResult], order: list[str]) -> list[Row]:
    """Median per (transport, streams), with the ratio to the reference's median."""
    rows: list[Row] = []
    for streams in sorted({r.streams for r in results}):
        reference: float | None = None
        for name in order:
            runs = [r for r in results if r.transport == name and r.streams == streams]
            if not runs:
                continue
            runs.sort(key=lambda r: r.megabytes_per_second)
            median = runs[len(runs) // 2]
            speed = statistics.median(r.megabytes_per_second for r in runs)
            if name == REFERENCE:
                reference = speed
            rows.append(
                Row(
                    transport=name,
                    streams=streams,
                    size=median.size,
                    megabytes_per_second=speed,
                    ratio=speed / reference if reference else None,
                    seconds=median.seconds,
                    client_cpu=median.client_cpu,
                    server_cpu=median.server_cpu,
                    runs=[round(r.megabytes_per_second, 2) for r in runs],
                )
            )
    return rows


def format_table(rows: list[Row]) -> str:
    """The table printed at the end (and pasted into docs/performance.md)."""
    header = (
        "transport",
        "streams",
        "MB/s",
        "vs aioquic",
        "seconds",
        "CPU client s",
        "CPU server s",
        "CPU s per GB",
    )
    lines = [header]
    for row in rows:
        cpu = row.client_cpu + row.server_cpu
        lines.append(
            (
                row.transport,
                str(row.streams),
                f"{row.megabytes_per_second:.1f}",
                "-" if row.ratio is None else f"{row.ratio:.2f}",
                f"{row.seconds:.2f}",
                f"{row.client_cpu:.2f}",
                f"{row.server_cpu:.2f}",
                f"{cpu / (row.size / 1e9):.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


# -- command line ----------------------------------------------------------------


def _parse_list(text: str, convert: Callable[[str], Any]) -> list[Any]:
    return [convert(item.strip()) for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    """Options of ``quicmesh bench throughput``."""
    parser = OneLineParser(
        prog="quicmesh bench throughput",
        description="Bulk download over each transport and over raw aioquic (HTTP/3 GET), "
        "on loopback, servers in a child process.",
    )
    parser.add_argument(
        "--size",
        default=None,
        help=f"total bytes per case, split over the streams (default {format_size(DEFAULT_SIZE)}, "
        f"--quick {format_size(QUICK_SIZE)}); suffixes KiB, MiB, GiB, KB, MB, GB",
    )
    parser.add_argument(
        "--streams",
        default=",".join(map(str, DEFAULT_STREAMS)),
        help="parallel streams per case, comma-separated (default 1,16)",
    )
    parser.add_argument(
        "--transports",
        default=",".join(TRANSPORTS),
        help=f"transports to run, comma-separated (default {','.join(TRANSPORTS)}); "
        "raw aioquic always runs as the reference",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the median is shown")
    parser.add_argument(
        "--json", metavar="PATH", type=output_file, help="also write the results as JSON"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"CI size: {format_size(QUICK_SIZE)} per case"
    )
    parser.add_argument(
        "--profile", metavar="DIR", type=output_dir, help="write a cProfile of every timed case"
    )
    return parser


@dataclass(frozen=True)
class Plan:
    """The validated options."""

    size: int
    streams: list[int]
    transports: list[str]
    repeat: int

    def cases(self) -> Iterator[tuple[int, int, str]]:
        """(repeat, streams, transport), the reference first within each group."""
        for repeat in range(self.repeat):
            for streams in self.streams:
                for name in [REFERENCE, *self.transports]:
                    yield repeat, streams, name


def _plan(args: argparse.Namespace) -> Plan:
    size = parse_size(args.size) if args.size else QUICK_SIZE if args.quick else DEFAULT_SIZE
    try:
        streams = _parse_list(args.streams, int)
    except ValueError:
        streams = []  # (int()'s message named no option)
    if not streams or min(streams) < 1:
        raise ValueError("--streams needs positive integers, e.g. 1,16")
    if max(streams) > size:
        raise ValueError("--size must be at least one byte per stream")
    transports = _parse_list(args.transports, str)
    unknown = [t for t in transports if t not in TRANSPORTS]
    if unknown or not transports:
        raise ValueError(f"--transports: choose from {', '.join(TRANSPORTS)}, not {unknown}")
    if args.repeat < 1:
        raise ValueError("--repeat must be at least 1")
    return Plan(size, streams, list(dict.fromkeys(transports)), args.repeat)


def main(argv: list[str]) -> int:
    """Run the benchmark; 0 when every case moved exactly the right bytes."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        plan = _plan(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    except ValueError as exc:
        print(f"quicmesh bench throughput: {exc}", file=sys.stderr)
        return 2
    if "quic" in plan.transports:
        try:
            default_quic_engine()  # the child's QuicTransport() would fail with a traceback
        except QuicmeshError as exc:
            print(f"quicmesh bench throughput: {exc}", file=sys.stderr)
            return 2
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    # ``kill PID`` (SIGTERM) becomes SystemExit: the finally below stops the server process.
    # While a case runs, the signal cancels it instead (run_async): a SystemExit raised in
    # whatever code runs broke aioquic's connect() half-way, and its clean-up raised KeyError.
    with terminate_as_exit():
        return _run(args, plan)


def _run(args: argparse.Namespace, plan: Plan) -> int:
    ca = DevCA()
    identity = ca.issue("spiffe://mesh.local/ns/bench/sa/throughput")
    setup = ServerSetup(
        transports=tuple(plan.transports),
        cert_chain_pem=identity.cert_chain_pem(),
        key_pem=identity.private_key_pem(),
        trust_pem=ca.trust_bundle.pem,
        profile_dir=args.profile,
    )
    total_cases = plan.repeat * len(plan.streams) * (len(plan.transports) + 1)
    print(
        f"throughput: {format_size(plan.size)} per case, download (server writes, client reads "
        f"and checks every byte), streams {plan.streams}, {CONGESTION_CONTROL}; servers in a "
        f"child process, clients in this one; {os.cpu_count()} CPUs",
        flush=True,
    )
    server = ServerProcess(setup)
    results: list[CaseResult] = []
    failures: list[str] = []
    try:
        for index, (repeat, streams, name) in enumerate(plan.cases(), 1):
            label = f"{name}-{streams}x-run{repeat + 1}"
            print(f"[{index}/{total_cases}] {name:8s} {streams:3d} streams ...", flush=True)
            sizes = split_size(plan.size, streams)
            try:
                result = run_async(_run_case(name, sizes, server, setup, label))
            except (QuicmeshError, OSError, asyncio.IncompleteReadError) as exc:
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                print(f"      FAILED: {exc}", flush=True)
                continue
            results.append(result)
            print(
                f"      {result.megabytes_per_second:8.1f} MB/s  {result.seconds:6.2f} s"
                f"  CPU client {result.client_cpu:.2f} s, server {result.server_cpu:.2f} s",
                flush=True,
            )
    finally:
        server.stop()

    rows = summarize(results, [REFERENCE, *plan.transports])
    print()
    print(format_table(rows))
    print(
        "\nMB/s = 10^6 payload bytes per second, median of "
        f"{plan.repeat} run(s); 'vs aioquic' = ratio to raw aioquic (HTTP/3 GET) at the same "
        "stream count; CPU = time.process_time() of the client process and of the server "
        "process (every server, reference included, runs in one child process)."
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "size": plan.size,
                    "direction": "download",
                    "congestion_control": CONGESTION_CONTROL,
                    "cpus": os.cpu_count(),
                    "rows": [asdict(row) for row in rows],
                    "runs": [asdict(result) for result in results],
                    "failures": failures,
                },
                out,
                indent=2,
            )
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0
