"""One side of a head-of-line benchmark run, as a process inside a link namespace.

``python -m quicmesh.bench._hol_worker server|client CONFIG_JSON`` is started by
:mod:`quicmesh.bench.hol` through :meth:`quicmesh.netem.Link.popen`, so that each side
has its own interpreter (and GIL) and its sockets live in its own namespace.

The server accepts one kind of flow per target name:

* ``bulk-N.hol.bench:9000``: the server writes a seeded random 64 KiB block again and
  again (awaiting ``drain()`` after each) until the client goes away.
* ``rpc-N.hol.bench:9000``: the client writes 1 KiB requests; the server answers
  each with an 8 KiB response. A request carries its sequence number, its scheduled
  and actual send times; the response adds when the server read the request and when
  it handed the response to the stream.

It also echoes UDP probes (``port + 1``) stamped with its clock, so the client can
tell the link's one-way delay (propagation plus bottleneck queue, no sender buffers)
at any moment. Both processes read the same ``CLOCK_MONOTONIC`` (namespaces share
it), so one-way times are exact differences.

The client opens every flow on one :class:`~quicmesh.PeerConnection`, sends each
interactive flow's requests open loop (one every ``interval`` s, whether or not the
previous one was answered, so a stalled flow is not sampled less), samples the bulk
byte counters every 100 ms, and writes everything raw to a JSON file; the parent
computes the statistics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from .. import TRANSPORTS, DevCA, MeshStream, Transport
from .._timeouts import wait_within
from ..errors import QuicmeshError
from ..sidecar.launch import die_with_parent

REQUEST_HEADER = struct.Struct("<Qdd")
"""Request: sequence number, scheduled send time, actual send time."""
RESPONSE_HEADER = struct.Struct("<Qdddd")
"""Response: the request's three fields, then server read time and server write time."""
PROBE = struct.Struct("<dd")
"""UDP probe: client send time; the echo adds the server's time."""
BULK_BLOCK = 64 * 1024
BULK_READ = 256 * 1024
TARGET_PORT = 9000
SAMPLE_INTERVAL = 0.1
"""Seconds between samples of the bulk byte counters."""
PROBE_INTERVAL = 0.005
"""Seconds between UDP probes."""
MIN_INTERVAL = 0.001
"""Shortest ``interval`` between requests: with 0 the sender never yields to the loop."""
PARENT_VARIABLE = "QUICMESH_HOL_PARENT"
"""Set (to the parent's pid) in a worker's environment: the worker then dies with it."""


@dataclass
class WorkerConfig:
    """What both sides need to know about one run (passed as JSON on the command line)."""

    transport: str
    """``quic``, ``h2`` or ``tcp``."""
    congestion_control: str
    """QUIC's controller (both sides); TCP's is set per namespace by the parent."""
    ca_dir: str
    server_address: str
    port: int = 9443
    interactive_flows: int = 2
    bulk_flows: int = 1
    request_size: int = 1024
    response_size: int = 8192
    interval: float = 0.020
    warmup: float = 2.0
    measure: float = 8.0
    grace: float = 3.0
    stall_flow: int | None = None
    """Bulk flow whose reader stops at ``stall_after`` s into the measurement."""
    stall_after: float = 0.0
    small_tcp_buffers: bool = False
    """h2/tcp only: shrink the socket write buffer and TCP_NOTSENT_LOWAT (an experiment)."""
    seed: int = 0
    transport_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.interval >= MIN_INTERVAL:
            raise ValueError(f"interval must be at least {MIN_INTERVAL} s, got {self.interval}")

    def to_json(self) -> str:
        """The command-line form."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


SMALL_WRITE_BUFFER_HIGH = 16 * 1024
SMALL_WRITE_BUFFER_LOW = 4 * 1024
SMALL_NOTSENT_LOWAT = 16 * 1024


def make_transport(config: WorkerConfig, role: str) -> Transport:
    """The transport for one side, with an identity issued by the run's CA."""
    ca = DevCA.load(config.ca_dir)
    identity = ca.issue(f"spiffe://{ca.trust_domain}/ns/bench/sa/hol-{role}")
    options = dict(config.transport_options)
    if config.transport == "quic":
        options["congestion_control"] = config.congestion_control
    else:
        _tune_tcp(config)
    return TRANSPORTS[config.transport](identity=identity, trust=ca.trust_bundle, **options)


def _tune_tcp(config: WorkerConfig) -> None:
    """Per-socket kernel congestion control, and the small-buffer experiment, for h2/tcp.

    H2Transport and TcpTransport have no parameter for either (yet), and a network
    namespace may only default to the kernel's *allowed* algorithms (here ``reno bbr``:
    ``cubic`` gives EPERM), so the adaptor's per-connection socket tuning hook is
    wrapped to set ``TCP_CONGESTION`` on every socket, client and server side.
    """
    from ..transport import _tcp

    if config.small_tcp_buffers:
        _tcp.WRITE_BUFFER_HIGH = SMALL_WRITE_BUFFER_HIGH
        _tcp.WRITE_BUFFER_LOW = SMALL_WRITE_BUFFER_LOW
        _tcp.NOTSENT_LOWAT = SMALL_NOTSENT_LOWAT
    original = _tcp._tune_socket
    algorithm = config.congestion_control.encode()

    def tune_socket(transport: asyncio.Transport) -> None:
        original(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, algorithm)

    _tcp._tune_socket = tune_socket


def _kernel_congestion_control() -> str:
    """The TCP congestion control new sockets get in this thread's namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return raw.split(b"\0", 1)[0].decode()


def _connection_stats(stream: MeshStream) -> dict[str, Any]:
    # The server side has no public handle on its PeerConnection; the stream's channel
    # is that connection (a cross-check of what congestion control actually ran).
    channel = getattr(stream, "_channel", None)
    stats = getattr(channel, "stats", None)
    if stats is None:
        return {}
    try:
        return dict(stats())
    except Exception:  # a closed connection may not answer; stats are best effort
        return {}


SNAPSHOT_RETRY = 0.25
"""Seconds between the server's attempts to record its connections' stats, while none
has answered."""

LAG_INTERVAL = 0.005
"""Seconds the event-loop lag monitor sleeps; its oversleep is the loop's lag."""


class LoopMonitor:
    """Samples the event loop's lag (oversleep of a 5 ms sleep) and this process's CPU time.

    On a busy machine a benchmark's latency can be the CPU's, not the network's; this
    records which.
    """

    def __init__(self) -> None:
        self.lag: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, float]] = []
        self.queues: list[tuple[float, int, int, int, int]] = []
        """``(time, udp_rx, udp_tx, tcp_rx, tcp_tx)``: bytes in this namespace's sockets."""

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_cpu = 0.0
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            now = loop.time()
            self.lag.append((round(before, 4), round(now - before - LAG_INTERVAL, 5)))
            if now - last_cpu >= 0.5:
                self.cpu.append((now, time.process_time()))
                last_cpu = now
            if not self.queues or now - self.queues[-1][0] >= QUEUE_INTERVAL:
                self.queues.append((round(now, 4), *socket_queues()))

    def to_dict(self) -> dict[str, Any]:
        return {"lag": self.lag, "cpu": self.cpu, "queues": self.queues}


QUEUE_INTERVAL = 0.05
"""Seconds between samples of the socket queues."""


def socket_queues() -> tuple[int, int, int, int]:
    """Bytes queued in this network namespace's sockets: UDP rx, UDP tx, TCP rx, TCP tx.

    From ``/proc/net/udp`` and ``/proc/net/tcp`` (``tx_queue:rx_queue``). UDP rx is
    datagrams the kernel holds that the application has not read yet (a receiver that
    cannot keep up); TCP rx is bytes received in order and not read; TCP tx is bytes
    written and not yet acknowledged (unsent plus in flight).
    """
    totals = []
    for name in ("udp", "tcp"):
        rx = tx = 0
        try:
            with open(f"/proc/net/{name}") as file:
                next(file)
                for line in file:
                    fields = line.split()
                    if len(fields) > 4:
                        tx_hex, _, rx_hex = fields[4].partition(":")
                        tx += int(tx_hex, 16)
                        rx += int(rx_hex, 16)
        except (OSError, ValueError, StopIteration):
            pass
        totals += [rx, tx]
    return totals[0], totals[1], totals[2], totals[3]


# -- server --------------------------------------------------------------------------


class _Server:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.block = random.Random(config.seed).randbytes(BULK_BLOCK)
        self.padding = random.Random(config.seed + 1).randbytes(config.response_size)
        self.flows: dict[str, int] = {}
        self.connection_stats: list[dict[str, Any]] = []
        self._tracked: list[MeshStream] = []

    async def handle(self, stream: MeshStream) -> None:
        name = stream.target.split(".", 1)[0]
        self._tracked.append(stream)
        try:
            if name.startswith("bulk-"):
                await self._bulk(stream)
            elif name.startswith("rpc-"):
                await self._interactive(stream)
            else:
                stream.refuse(404, "unknown flow")
        except (QuicmeshError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if not stream.closed:
                stream.abort()

    async def _bulk(self, stream: MeshStream) -> None:
        sent = 0
        try:
            while not stream.is_closing():
                stream.write(self.block)
                sent += len(self.block)
                await stream.drain()
        finally:
            self.flows[stream.target] = sent

    async def _interactive(self, stream: MeshStream) -> None:
        size = self.config.request_size
        padding = self.padding[RESPONSE_HEADER.size :]
        answered = 0
        try:
            while True:
                request = await stream.readexactly(size)
                received = time.monotonic()
                seq, scheduled, sent = REQUEST_HEADER.unpack_from(request)
                written = time.monotonic()
                stream.write(
                    RESPONSE_HEADER.pack(seq, scheduled, sent, received, written) + padding
                )
                answered += 1
                await stream.drain()
        finally:
            self.flows[stream.target] = answered

    def snapshot_connections(self) -> None:
        """Record each connection's stats once, from the first of its streams that
        answers (a stream whose connection does not answer leaves the next one of the
        same connection to try)."""
        seen: set[int] = set()
        for stream in self._tracked:
            channel = id(getattr(stream, "_channel", None))
            if channel in seen:
                continue
            stats = _connection_stats(stream)
            if stats:
                seen.add(channel)
                self.connection_stats.append(stats)


class _ProbeEcho(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and len(data) >= 8:
            self.transport.sendto(data[:8] + struct.pack("<d", time.monotonic()), addr)


async def run_server(config: WorkerConfig) -> dict[str, Any]:
    """Serve until stdin closes; return what the server saw."""
    loop = asyncio.get_running_loop()
    server = _Server(config)
    transport = make_transport(config, "server")
    listener = await transport.listen((config.server_address, config.port), server.handle)
    probe_transport, _ = await loop.create_datagram_endpoint(
        _ProbeEcho, local_addr=(config.server_address, config.port + 1)
    )
    stop = asyncio.Event()

    def wait_for_stdin() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_stdin, daemon=True).start()
    monitor = LoopMonitor()
    monitor_task = asyncio.ensure_future(monitor.run())
    print("ready", flush=True)
    # Snapshot connection state in the middle of the measurement and at the end.
    snapshot_at = config.warmup + config.measure / 2
    with contextlib.suppress(TimeoutError):
        await wait_within(stop.wait(), snapshot_at + 1.0)
    server.snapshot_connections()
    while not server.connection_stats and not stop.is_set():
        # No connection answered yet (a client that started late on a loaded machine):
        # try again until one does or the run ends.
        with contextlib.suppress(TimeoutError):
            await wait_within(stop.wait(), SNAPSHOT_RETRY)
        server.snapshot_connections()
    await stop.wait()
    monitor_task.cancel()
    probe_transport.close()
    listener.close()
    with contextlib.suppress(TimeoutError):
        await wait_within(listener.wait_closed(), 2.0)
    return {
        "kernel_congestion_control": _kernel_congestion_control(),
        "quic_congestion_control": getattr(transport, "congestion_control", None),
        "connections": server.connection_stats,
        "flows": server.flows,
        "monitor": monitor.to_dict(),
    }


# -- client --------------------------------------------------------------------------


class _ProbeClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= PROBE.size:
            sent, echoed = PROBE.unpack_from(data)
            self.samples.append((sent, echoed, time.monotonic()))


class _Client:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.samples: list[list[float | None]] = []
        self.bulk_bytes: list[int] = [0] * config.bulk_flows
        self.bulk_series: list[list[float]] = []
        self.stalled_at: float | None = None
        self.errors: list[str] = []
        self._pending: list[dict[int, list[float | None]]] = [
            {} for _ in range(config.interactive_flows)
        ]
        self._padding = random.Random(config.seed + 2).randbytes(config.request_size)

    async def bulk_reader(self, index: int, stream: MeshStream, stall_at: float | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if stall_at is not None and loop.time() >= stall_at:
                    self.stalled_at = loop.time()
                    await asyncio.Event().wait()  # stop reading, for good
                data = await stream.read(BULK_READ)
                if not data:
                    return
                self.bulk_bytes[index] += len(data)
        except QuicmeshError as exc:
            self.errors.append(f"bulk-{index}: {exc}")

    async def interactive_sender(
        self, index: int, stream: MeshStream, start: float, end: float
    ) -> None:
        loop = asyncio.get_running_loop()
        pending = self._pending[index]
        padding = self._padding[REQUEST_HEADER.size :]
        seq = 0
        scheduled = start
        while scheduled < end:
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic()
            pending[seq] = [index, seq, scheduled, sent, None, None, None]
            try:
                stream.write(REQUEST_HEADER.pack(seq, scheduled, sent) + padding)
            except QuicmeshError as exc:
                self.errors.append(f"rpc-{index}: {exc}")
                return
            seq += 1
            scheduled = start + seq * self.config.interval

    async def interactive_reader(self, index: int, stream: MeshStream) -> None:
        pending = self._pending[index]
        size = self.config.response_size
        try:
            while True:
                response = await stream.readexactly(size)
                done = time.monotonic()
                seq, _scheduled, _sent, received, written = RESPONSE_HEADER.unpack_from(response)
                sample = pending.pop(seq, None)
                if sample is None:
                    continue
                sample[4], sample[5], sample[6] = received, written, done
                self.samples.append(sample)
        except (QuicmeshError, asyncio.IncompleteReadError) as exc:
            if not isinstance(exc, asyncio.IncompleteReadError):
                self.errors.append(f"rpc-{index}: {exc}")

    def unanswered(self) -> list[list[float | None]]:
        return [sample for pending in self._pending for sample in pending.values()]

    async def sample_bulk(self) -> None:
        while True:
            self.bulk_series.append([time.monotonic(), *self.bulk_bytes])
            await asyncio.sleep(SAMPLE_INTERVAL)


async def run_client(config: WorkerConfig) -> dict[str, Any]:
    """Run the flows over one peer connection and return the raw measurements."""
    loop = asyncio.get_running_loop()
    client = _Client(config)
    transport = make_transport(config, "client")
    began = time.monotonic()
    connection = await transport.connect((config.server_address, config.port))
    handshake = time.monotonic() - began
    probe_transport, probes = await loop.create_datagram_endpoint(
        _ProbeClient, remote_addr=(config.server_address, config.port + 1)
    )
    bulk = [
        await connection.open_stream(f"bulk-{i}.hol.bench:{TARGET_PORT}")
        for i in range(config.bulk_flows)
    ]
    interactive = [
        await connection.open_stream(f"rpc-{i}.hol.bench:{TARGET_PORT}")
        for i in range(config.interactive_flows)
    ]
    for stream in (*bulk, *interactive):
        await stream.wait_accepted()
    warmup_start = time.monotonic()
    measure_start = warmup_start + config.warmup
    measure_end = measure_start + config.measure
    stall_at = None if config.stall_flow is None else measure_start + config.stall_after
    tasks = [
        asyncio.ensure_future(
            client.bulk_reader(i, s, stall_at if i == config.stall_flow else None)
        )
        for i, s in enumerate(bulk)
    ]
    tasks.append(asyncio.ensure_future(client.sample_bulk()))
    for index, stream in enumerate(interactive):
        tasks.append(asyncio.ensure_future(client.interactive_reader(index, stream)))
    rng = random.Random(config.seed)
    senders = [
        asyncio.ensure_future(
            client.interactive_sender(
                index, stream, warmup_start + rng.uniform(0, config.interval), measure_end
            )
        )
        for index, stream in enumerate(interactive)
    ]

    async def probe() -> None:
        while True:
            probe_transport.sendto(PROBE.pack(time.monotonic(), 0.0))
            await asyncio.sleep(PROBE_INTERVAL)

    tasks.append(asyncio.ensure_future(probe()))
    monitor = LoopMonitor()
    tasks.append(asyncio.ensure_future(monitor.run()))
    await asyncio.sleep(max(0.0, measure_start - time.monotonic()))
    print("measuring", flush=True)
    await asyncio.gather(*senders)
    # Wait (bulk still running) for the last answers, up to the grace period.
    deadline = time.monotonic() + config.grace
    while client.unanswered() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    finished = time.monotonic()
    try:
        stats = dict(connection.stats())
    except Exception as exc:  # stats are a cross-check; never lose the run for them
        stats = {"error": repr(exc)}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    probe_transport.close()
    for stream in (*bulk, *interactive):
        stream.abort()
    connection.close()
    with contextlib.suppress(TimeoutError, QuicmeshError):
        await wait_within(connection.wait_closed(), 2.0)
    return {
        "handshake": handshake,
        "warmup_start": warmup_start,
        "measure_start": measure_start,
        "measure_end": measure_end,
        "finished": finished,
        "stalled_at": client.stalled_at,
        "samples": client.samples,
        "unanswered": client.unanswered(),
        "bulk_series": client.bulk_series,
        "probes": probes.samples,
        "connection": stats,
        "kernel_congestion_control": _kernel_congestion_control(),
        "quic_congestion_control": getattr(transport, "congestion_control", None),
        "errors": client.errors,
        "monitor": monitor.to_dict(),
    }


def main(argv: list[str]) -> int:
    """``server|client CONFIG_JSON [RESULT_FILE]``: run one side; the result goes to
    RESULT_FILE (client) or stdout after ``ready`` (server). With ``PARENT_VARIABLE`` set
    it first asks the kernel for SIGTERM when the benchmark ends, however it ends: a
    client left behind kept sending, and collecting samples, without bound."""
    parent = os.environ.pop(PARENT_VARIABLE, "")
    if parent.isdigit():
        die_with_parent(int(parent))
    role, config = argv[0], WorkerConfig.from_json(argv[1])
    if role == "server":
        result = asyncio.run(run_server(config))
        print(json.dumps(result), flush=True)
        return 0
    result = asyncio.run(run_client(config))
    with tempfile.NamedTemporaryFile("w", dir=_directory(argv[2]), delete=False) as file:
        json.dump(result, file)
    os.replace(file.name, argv[2])
    return 0


def _directory(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
