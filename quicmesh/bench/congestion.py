"""``quicmesh bench congestion``: bulk goodput and queueing delay per congestion controller.

Every case runs on the link emulator (:mod:`quicmesh.netem`, needs root): two network
namespaces joined by a 20 Mbit/s bottleneck with 20 ms one-way delay (40 ms RTT) and a
drop-tail queue of 60 ms at the link rate, the same impairments in both directions
(so random loss hits ACKs too). One link is built per loss rate; every flow kind runs
on it in turn, so QUIC and kernel TCP see the same link in the same run.

**Flows.** A flow is one bulk upload from the client namespace to the server
namespace for ``--duration`` seconds:

* ``quic-reno``, ``quic-cubic``, ``quic-bbr``: a :class:`~quicmesh.QuicTransport`
  client with that ``congestion_control`` connects to a QuicTransport listener,
  opens one tunnel stream (``open_stream``) and writes 64 KiB chunks, awaiting
  ``drain()`` after each, as a proxy does. Goodput is tunnelled payload.
* ``tcp-cubic``, ``tcp-bbr``: **plain kernel TCP** (no TLS, no HTTP/2: the baseline
  is the kernel's congestion control, not quicmesh's H2 framing), with the
  controller set per socket (``TCP_CONGESTION``) and checked after connecting.

**Measured.** *Goodput*: payload bytes the receiver read between the moment the
sender started writing and the deadline, over that time (slow start included). The
receiver runs in its own process (its own event loop and GIL) and samples its byte
counts every 50 ms. *Queueing delay*: the sender's smoothed RTT (QUIC: aioquic's,
from ``PeerConnection.stats()``; TCP: ``tcpi_rtt`` from ``TCP_INFO``), sampled every
10 ms, minus the flow's minimum RTT (QUIC: aioquic's ``rtt_min``; TCP:
``tcpi_min_rtt``); the table shows the median and the 95th percentile. For
``quic-bbr`` the sender also samples the BBR model (pacing rate, bandwidth, window,
state) and the bytes it put on the wire, to check that pacing holds at the model's
rate (``pacing`` in the JSON: sent rate over model rate per 100 ms window, in windows
where the sender was not window-limited).

**Fairness.** ``quic-bbr`` against ``tcp-cubic``, then against ``tcp-bbr``, started
together on the loss-free link for ``--fairness-duration`` seconds; each flow's share
of the goodput, over the whole run and over its second half.

**Sanity.** Per case the JSON keeps the emulator's counters (drops by the loss
model, by the queue, by the TUN device when the forwarder fell behind, the deepest
queue) and the CPU seconds of the sender thread, the receiver process and the
forwarder process, so a CPU-starved run can be told from a congestion-control result.

Output in ``--out DIR``: ``congestion.json``, ``congestion.md`` (the tables) and,
with matplotlib (the ``plots`` extra), ``congestion-goodput.png``,
``congestion-fairness.png`` and ``congestion-pacing.png``. ``--quick`` runs loss 0 and
2 % for 4 s per flow and 6 s per fairness pair (about 1.5 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .. import DevCA, Identity, QuicTransport, TrustBundle
from .._signals import signals_deferred
from .._timeouts import wait_within
from ..congestion import BbrCongestionControl, congestion_controller
from ..errors import QuicmeshError
from ..netem import SERVER_ADDRESS, Link, LinkConfig, LinkStats
from ..netem.system import missing_privileges
from ..sidecar.launch import die_with_parent, terminate_as_exit
from ..transport.base import default_quic_engine
from ..transport.stream import MeshStream
from . import (
    OneLineParser,
    loss_percentages,
    positive_number,
    rtt_seconds,
    source_state,
    tried_output_dir,
)
from ._engine import add_engine_argument, engine_problem
from ._spawned import ChildUnanswered, SpawnedChild

RATE_BPS = 20e6
"""The bottleneck rate, bits per second."""
RTT = 0.040
"""The base round-trip time (two one-way delays), seconds."""
QUEUE_DELAY = 0.060
"""The bottleneck's drop-tail queue, in seconds at the link rate."""
LOSSES = (0.0, 0.005, 0.01, 0.02, 0.05)
QUICK_LOSSES = (0.0, 0.02)
FLOWS = ("quic-reno", "quic-cubic", "quic-bbr", "tcp-cubic", "tcp-bbr")
FAIRNESS_OPPONENTS = ("tcp-cubic", "tcp-bbr")
FAIRNESS_FLOW = "quic-bbr"
DURATION = 20.0
QUICK_DURATION = 4.0
FAIRNESS_DURATION = 30.0
QUICK_FAIRNESS_DURATION = 6.0
PAUSE = 1.0
"""Seconds between cases, so the queue is empty when the next flow starts."""
FLOW_END_TIMEOUT = 5.0
"""Longest a QUIC sender waits, after its deadline, for the receiver to read its stream
to the end before closing the connection anyway."""

TARGET = "bulk.bench.svc:9000"
FLOW_HEADER = "x-bench-flow"
CHUNK = b"\xa5" * (64 * 1024)
RECEIVER_SAMPLE_INTERVAL = 0.05
RTT_SAMPLE_INTERVAL = 0.010
PACING_WINDOW = 0.100
"""Length of the windows in which the sent rate is compared with the model's rate."""
LINGER_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: closing a TCP sender resets it instead of flushing its buffer."""

STARVED_LOOP_LAG = 0.010
"""A sender whose event loop wakes up later than this (99th percentile) was short of CPU."""
TARGET_SHARE_OF_LINK = 0.80
TARGET_LOSS = 0.02


class BenchmarkError(QuicmeshError):
    """A case could not run (a flow failed to connect, the receiver died, ...)."""


@dataclass(frozen=True)
class FlowKind:
    """``quic-bbr`` -> protocol ``quic``, controller ``bbr``."""

    protocol: str
    controller: str

    @property
    def name(self) -> str:
        """The flow kind as written on the command line."""
        return f"{self.protocol}-{self.controller}"

    @classmethod
    def parse(cls, text: str) -> FlowKind:
        """Parse ``quic-reno|quic-cubic|quic-bbr|tcp-cubic|tcp-bbr``."""
        protocol, _, controller = text.strip().partition("-")
        allowed = {"quic": ("reno", "cubic", "bbr"), "tcp": ("reno", "cubic", "bbr")}
        if controller not in allowed.get(protocol, ()):
            raise ValueError(f"unknown flow {text!r}: choose from {', '.join(FLOWS)}")
        return cls(protocol, controller)


# -- the receiver process ----------------------------------------------------------


@dataclass(frozen=True)
class ReceiverSetup:
    """What the receiver process needs (picklable)."""

    cert_chain_pem: bytes
    key_pem: bytes
    trust_pem: bytes
    engine: str = field(default_factory=default_quic_engine)
    """The QUIC engine of the receiving listener (the senders' too; default: native
    where its extension is built, else aioquic)."""


class _Counters:
    """Bytes received per flow label, sampled over time."""

    def __init__(self) -> None:
        self.received: dict[str, int] = {}
        self.timelines: dict[str, list[tuple[float, int]]] = {}
        self.active: set[str] = set()

    def begin(self, label: str) -> None:
        self.received[label] = 0
        self.timelines[label] = [(time.monotonic(), 0)]
        self.active.add(label)

    def add(self, label: str, count: int) -> None:
        if label in self.received:  # not yet reported
            self.received[label] += count

    def end(self, label: str) -> None:
        self.sample(label)
        self.active.discard(label)

    def sample(self, label: str) -> None:
        if label in self.timelines:
            self.timelines[label].append((time.monotonic(), self.received[label]))

    async def run_sampler(self) -> None:
        while True:
            await asyncio.sleep(RECEIVER_SAMPLE_INTERVAL)
            for label in self.active:
                self.sample(label)

    def report(self, label: str) -> list[tuple[float, int]]:
        if label in self.active:
            self.end(label)
        self.received.pop(label, None)
        return self.timelines.pop(label, [])


async def _receive(setup: ReceiverSetup, control: Connection) -> None:
    loop = asyncio.get_running_loop()
    counters = _Counters()
    identity = Identity.from_pem(setup.cert_chain_pem, setup.key_pem)
    trust = TrustBundle.from_pem(setup.trust_pem)

    async def on_stream(stream: MeshStream) -> None:
        label = stream.headers.get(FLOW_HEADER, "?")
        counters.begin(label)
        try:
            while data := await stream.read(1 << 20):
                counters.add(label, len(data))
        except QuicmeshError:
            pass  # the sender closes its connection at the deadline
        finally:
            counters.end(label)
            stream.close()

    tcp_flows: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}

    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tcp_flows[writer] = asyncio.current_task()  # type: ignore[assignment]
        label = (await reader.readline()).decode().strip()
        counters.begin(label)
        try:
            while data := await reader.read(1 << 20):
                counters.add(label, len(data))
        except OSError:
            pass  # the sender resets its connection at the deadline
        finally:
            counters.end(label)
            writer.close()
            tcp_flows.pop(writer, None)

    quic = QuicTransport(
        identity=identity, trust=trust, congestion_control="cubic", engine=setup.engine
    )
    listener = await quic.listen((SERVER_ADDRESS, 0), on_stream)
    tcp_server = await asyncio.start_server(on_tcp, SERVER_ADDRESS, 0, limit=1 << 20)
    tcp_port = tcp_server.sockets[0].getsockname()[1]
    sampler = asyncio.create_task(counters.run_sampler())
    stopped = loop.create_future()

    def on_command() -> None:
        try:
            command, argument = control.recv()
        except EOFError:
            command, argument = "stop", None
        if command == "report":
            control.send((counters.report(argument), time.process_time()))
        elif not stopped.done():
            stopped.set_result(None)

    loop.add_reader(control.fileno(), on_command)
    control.send({"quic": listener.address[1], "tcp": tcp_port})
    await stopped
    loop.remove_reader(control.fileno())
    sampler.cancel()
    listener.close()
    tcp_server.close()
    # Flows still running (an interrupted run) end by their connection's abort, not by
    # the loop's cancelling them at its end: asyncio 3.11 logs a cancelled connection
    # handler as an "Exception in callback".
    running = list(tcp_flows.values())
    for writer in list(tcp_flows):
        writer.transport.abort()
    with contextlib.suppress(asyncio.TimeoutError):
        await wait_within(asyncio.gather(*running, return_exceptions=True), 2.0)
    with contextlib.suppress(asyncio.TimeoutError):
        await wait_within(listener.wait_closed(), 2.0)


def _receiver_main(setup: ReceiverSetup, control: Connection, parent: int) -> None:
    """Entry point of the receiver process. Ctrl-C reaches the whole process group: the
    parent stops this process (``Receiver.stop``), which ignores the interrupt itself.
    It dies with the parent ``parent`` however that ends (SIGTERM from the kernel, Linux)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    asyncio.run(_receive(setup, control))


class Receiver:
    """The receiver process in the server namespace; commands go over a pipe."""

    def __init__(self, link: Link, setup: ReceiverSetup) -> None:
        try:
            self._child = SpawnedChild(
                _receiver_main,
                setup,
                "quicmesh-bench-receiver",
                started_in=lambda: link.entered("server"),  # created in the server namespace
            )
        except ChildUnanswered as exc:
            raise BenchmarkError(f"the receiver process failed to start: {exc}") from None
        ports: dict[str, int] = self._child.ready
        self.quic_address = (SERVER_ADDRESS, ports["quic"])
        self.tcp_address = (SERVER_ADDRESS, ports["tcp"])

    def report(self, label: str) -> tuple[list[tuple[float, int]], float]:
        """The byte-count timeline of flow ``label`` and the process's CPU seconds."""
        try:
            timeline, cpu = self._child.ask(("report", label), 30)
        except ChildUnanswered:
            raise BenchmarkError("the receiver process stopped answering") from None
        return [(float(t), int(n)) for t, n in timeline], float(cpu)

    def stop(self) -> None:
        """Stop the receiver and wait for it."""
        self._child.stop(("stop", None))


# -- the senders (in the client namespace) -----------------------------------------


@dataclass
class SenderResult:
    """What a sender measured about its own flow."""

    label: str
    kind: str
    started: float
    finished: float
    bytes_written: int
    queueing_delays: list[float]
    min_rtt: float | None
    controller: str
    detail: dict[str, Any]


def tcp_info(sock: socket.socket) -> dict[str, float]:
    """Smoothed RTT, minimum RTT (s), retransmitted segments and pacing rate (bytes/s)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    rtt_us = struct.unpack_from("<I", info, 68)[0]
    total_retrans = struct.unpack_from("<I", info, 100)[0]
    pacing_rate = struct.unpack_from("<Q", info, 104)[0]
    segs_out = struct.unpack_from("<I", info, 136)[0]
    min_rtt_us = struct.unpack_from("<I", info, 148)[0]
    return {
        "rtt": rtt_us / 1e6,
        "min_rtt": min_rtt_us / 1e6,
        "total_retrans": total_retrans,
        "segs_out": segs_out,
        "pacing_rate": float(pacing_rate),
    }


async def _tcp_flow(
    kind: FlowKind, label: str, address: tuple[str, int], duration: float
) -> SenderResult:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, kind.controller.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
        actual = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
        controller = actual.split(b"\0", 1)[0].decode()
        if controller != kind.controller:
            raise BenchmarkError(f"{label}: the kernel uses {controller}, not {kind.controller}")
        await loop.sock_sendall(sock, label.encode() + b"\n")
        rtts: list[float] = []
        lags: list[float] = []
        written = 0
        started = time.monotonic()
        deadline = started + duration

        async def sample() -> None:
            while True:
                rtts.append(tcp_info(sock)["rtt"])
                await _sleep_measuring_lag(lags)

        sampler = asyncio.create_task(sample())
        try:
            while time.monotonic() < deadline:
                await loop.sock_sendall(sock, CHUNK)
                written += len(CHUNK)
        finally:
            sampler.cancel()
        finished = time.monotonic()
        info = tcp_info(sock)
    finally:
        sock.close()
    min_rtt = info["min_rtt"]
    return SenderResult(
        label=label,
        kind=kind.name,
        started=started,
        finished=finished,
        bytes_written=written,
        queueing_delays=[max(rtt - min_rtt, 0.0) for rtt in rtts if rtt > 0],
        min_rtt=min_rtt,
        controller=controller,
        detail={
            "retransmitted_segments": info["total_retrans"],
            "segments": info["segs_out"],
            **_lag_summary(lags),
        },
    )


async def _sleep_measuring_lag(lags: list[float]) -> None:
    """Sleep one RTT sample interval; record how late the event loop woke up."""
    before = time.monotonic()
    await asyncio.sleep(RTT_SAMPLE_INTERVAL)
    lags.append(time.monotonic() - before - RTT_SAMPLE_INTERVAL)


def _lag_summary(lags: Sequence[float]) -> dict[str, float | None]:
    """How late the sender's event loop ran: a busy CPU shows here first."""
    return {
        "loop_lag_median": statistics.median(lags) if lags else None,
        "loop_lag_p99": _percentile(lags, 0.99) if lags else None,
    }


class _BbrProbe:
    """Samples a QUIC connection's BBR model and its bytes on the wire."""

    def __init__(self, connection: Any) -> None:
        self._protocol = connection
        controller = congestion_controller(connection.quic)
        assert isinstance(controller, BbrCongestionControl)
        self._model = controller.model
        self.samples: list[tuple[float, float, float, int, int, int, str]] = []

    def sample(self, now: float) -> None:
        model = self._model
        self.samples.append(
            (
                now,
                model.pacing_rate,
                model.bw,
                model.congestion_window,
                model.bytes_in_flight,
                self._protocol.bytes_sent,
                model.state.value,
            )
        )

    def summary(self, mss: int = 1200) -> dict[str, Any]:
        """The pacing check: sent rate over the model's rate per window."""
        windows: list[dict[str, Any]] = []
        start = 0
        for index, sample in enumerate(self.samples):
            if sample[0] - self.samples[start][0] < PACING_WINDOW:
                continue
            window = self.samples[start : index + 1]
            elapsed = window[-1][0] - window[0][0]
            sent = window[-1][5] - window[0][5]
            expected = sum(
                a[1] * (b[0] - a[0]) for a, b in itertools.pairwise(window)
            )  # the model's rate, integrated
            window_limited = any(s[4] + 2 * mss > s[3] for s in window)
            states = {s[6] for s in window}
            windows.append(
                {
                    "start": window[0][0],
                    "seconds": elapsed,
                    "sent_rate": sent / elapsed,
                    "model_rate": expected / elapsed,
                    "ratio": sent / expected if expected > 0 else None,
                    "window_limited": window_limited,
                    "states": sorted(states),
                }
            )
            start = index
        paced: list[float] = [
            w["ratio"] for w in windows if not w["window_limited"] and w["ratio"] is not None
        ]
        return {
            "windows": len(windows),
            "pacing_limited_windows": len(paced),
            "median_sent_over_model": statistics.median(paced) if paced else None,
            "p10_sent_over_model": _percentile(paced, 0.10) if paced else None,
            "p90_sent_over_model": _percentile(paced, 0.90) if paced else None,
            "series": [
                {
                    "t": s[0],
                    "pacing_rate": s[1],
                    "bw": s[2],
                    "cwnd": s[3],
                    "in_flight": s[4],
                    "bytes_sent": s[5],
                    "state": s[6],
                }
                for s in self.samples[:: max(1, round(PACING_WINDOW / RTT_SAMPLE_INTERVAL) // 2)]
            ],
            "window_series": windows,
        }


async def _quic_flow(
    kind: FlowKind,
    label: str,
    address: tuple[str, int],
    duration: float,
    identity: Identity,
    trust: TrustBundle,
    datagram_size: int | None,
    engine: str | None = None,
) -> SenderResult:
    transport = QuicTransport(
        identity=identity,
        trust=trust,
        congestion_control=kind.controller,
        max_datagram_size=datagram_size or 1200,
        engine=engine,
    )
    connection = await transport.connect(address)
    try:
        stream = await connection.open_stream(TARGET, headers={FLOW_HEADER: label})
        # quicmesh's BBRv3 model runs on aioquic; the native engine runs its own BBR model
        # in Rust (native/src/bbr.rs), whose state is not visible from here.
        model = kind.controller == "bbr" and transport.engine.name == "aioquic"
        probe = _BbrProbe(connection) if model else None
        rtts: list[float] = []
        lags: list[float] = []
        written = 0
        started = time.monotonic()
        deadline = started + duration

        async def sample() -> None:
            while True:
                stats = connection.stats()
                if stats["rtt"] is not None:
                    rtts.append(stats["rtt"])
                if probe is not None:
                    probe.sample(time.monotonic())
                await _sleep_measuring_lag(lags)

        sampler = asyncio.create_task(sample())
        try:
            while time.monotonic() < deadline:
                stream.write(CHUNK)
                written += len(CHUNK)
                await stream.drain()
        finally:
            sampler.cancel()
        finished = time.monotonic()
        stats = connection.stats()
        # End the stream and let the receiver read it to the end before closing: closed
        # at once, the connection's CONNECTION_CLOSE met the bottleneck queue this flow
        # had just filled and was dropped there, and the receiver, still waiting for
        # ACKs, logged "peer unresponsive" 10 s later, into the next flow's run.
        stream.write_eof()
        with contextlib.suppress(asyncio.TimeoutError, QuicmeshError):
            await wait_within(stream.read(), FLOW_END_TIMEOUT)
    finally:
        connection.close()
        with contextlib.suppress(asyncio.TimeoutError, QuicmeshError):
            await wait_within(connection.wait_closed(), 2.0)
    min_rtt = stats["rtt_min"]
    detail: dict[str, Any] = {
        "packets_sent": stats["packets_sent"],
        "packets_lost": stats["packets_lost"],
        "final_cwnd": stats["cwnd"],
        **_lag_summary(lags),
    }
    if probe is not None:
        detail["pacing"] = probe.summary()
    return SenderResult(
        label=label,
        kind=kind.name,
        started=started,
        finished=finished,
        bytes_written=written,
        queueing_delays=[max(rtt - min_rtt, 0.0) for rtt in rtts],
        min_rtt=min_rtt,
        controller=kind.controller,
        detail=detail,
    )


async def run_senders(
    flows: Sequence[tuple[FlowKind, str]],
    receiver: Receiver,
    duration: float,
    identity: Identity,
    trust: TrustBundle,
    datagram_size: int | None = None,
    engine: str | None = None,
) -> tuple[list[SenderResult], float]:
    """Run the flows together; returns their results and the thread's CPU seconds."""
    cpu = time.thread_time()
    coroutines = [
        _quic_flow(
            kind, label, receiver.quic_address, duration, identity, trust, datagram_size, engine
        )
        if kind.protocol == "quic"
        else _tcp_flow(kind, label, receiver.tcp_address, duration)
        for kind, label in flows
    ]
    results = await asyncio.gather(*coroutines)
    return list(results), time.thread_time() - cpu


# -- one case ----------------------------------------------------------------------


def goodput_between(timeline: Sequence[tuple[float, int]], start: float, end: float) -> float:
    """Bytes per second received between ``start`` and ``end`` (linear interpolation)."""
    return (_bytes_at(timeline, end) - _bytes_at(timeline, start)) / (end - start)


def _bytes_at(timeline: Sequence[tuple[float, int]], when: float) -> float:
    if not timeline or when <= timeline[0][0]:
        return 0.0
    for (t0, n0), (t1, n1) in itertools.pairwise(timeline):
        if t0 <= when <= t1:
            return n0 + (n1 - n0) * ((when - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return float(timeline[-1][1])


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def _forwarder_cpu() -> float:
    """CPU seconds of this process's forwarder children (``quicmesh.netem.forwarder``)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and b"quicmesh.netem.forwarder" in cmdline:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _stats_delta(before: LinkStats, after: LinkStats) -> dict[str, dict[str, int]]:
    result = {}
    for direction in ("client_to_server", "server_to_client"):
        old, new = getattr(before, direction), getattr(after, direction)
        result[direction] = {
            "packets_in": new.packets_in - old.packets_in,
            "dropped_by_loss": new.dropped_by_loss - old.dropped_by_loss,
            "dropped_by_queue": new.dropped_by_queue - old.dropped_by_queue,
            "dropped_by_device": new.dropped_by_device - old.dropped_by_device,
            "max_queue_packets": new.max_queue_packets,
            "bytes_in": new.bytes_in - old.bytes_in,
            "bytes_out": new.bytes_out - old.bytes_out,
        }
    return result


def link_use(goodput: float, received: int, link_bytes: int, rate_bps: float) -> dict[str, float]:
    """Where a lone flow's share of the bottleneck went.

    :param goodput: the flow's goodput while its sender wrote, bytes/s.
    :param received: every payload byte the receiver read on the flow.
    :param link_bytes: the IP bytes the bottleneck carried towards the receiver
        during the case (the emulator drops lost packets before the queue, so they
        take none of its time).
    :param rate_bps: the bottleneck's rate.

    ``payload_per_link_byte`` is what headers, retransmissions and the handshake
    leave of each byte on the link; ``utilisation`` is the share of the link's time
    the flow kept it busy, ``goodput / (rate * payload_per_link_byte)``. A transport
    with more per-packet overhead needs a higher utilisation for the same goodput.
    """
    if not link_bytes or not received or rate_bps <= 0:
        return {}
    payload = received / link_bytes
    return {
        "payload_per_link_byte": payload,
        "utilisation": goodput / (rate_bps / 8 * payload),
    }


@dataclass
class Bench:
    """The fixed parts of a run: link shape, credentials, durations."""

    rate_bps: float
    rtt: float
    queue_delay: float
    seed: int
    identity: Identity
    trust: TrustBundle
    setup: ReceiverSetup
    datagram_size: int | None = None

    def link_config(self, loss: float) -> LinkConfig:
        """The emulated link at ``loss`` (both directions)."""
        return LinkConfig.symmetric(
            delay=self.rtt / 2,
            loss=loss,
            rate_bps=self.rate_bps,
            queue_delay=self.queue_delay,
            seed=self.seed,
        )

    def run_case(
        self, link: Link, receiver: Receiver, kinds: Sequence[FlowKind], duration: float
    ) -> dict[str, Any]:
        """Run ``kinds`` together for ``duration``; one result dict per flow and the counters."""
        flows = [(kind, f"{kind.name}#{index}") for index, kind in enumerate(kinds)]
        before = link.stats()
        forwarder_before = _forwarder_cpu()
        future = link.run_in_thread(
            "client",
            run_senders,
            flows,
            receiver,
            duration,
            self.identity,
            self.trust,
            self.datagram_size,
            self.setup.engine,
        )
        senders, sender_cpu = future.result(timeout=duration + 60)
        time.sleep(0.2)  # the last packets reach the receiver
        after = link.stats()
        results = []
        receiver_cpu = 0.0
        link_stats = _stats_delta(before, after)
        for sender in senders:
            timeline, receiver_cpu = receiver.report(sender.label)
            goodput = goodput_between(timeline, sender.started, sender.finished)
            use = (
                link_use(
                    goodput,
                    timeline[-1][1] if timeline else 0,
                    link_stats["client_to_server"]["bytes_out"],
                    self.rate_bps,
                )
                if len(senders) == 1
                else {}
            )
            midpoint = (sender.started + sender.finished) / 2
            delays = sender.queueing_delays
            results.append(
                {
                    "flow": sender.kind,
                    "controller": sender.controller,
                    "seconds": sender.finished - sender.started,
                    "goodput_bps": 8 * goodput,
                    "goodput_second_half_bps": 8
                    * goodput_between(timeline, midpoint, sender.finished),
                    "share_of_link": 8 * goodput / self.rate_bps,
                    "min_rtt": sender.min_rtt,
                    "queueing_delay_median": statistics.median(delays) if delays else None,
                    "queueing_delay_p95": _percentile(delays, 0.95) if delays else None,
                    "rtt_samples": len(delays),
                    "timeline": [
                        (round(t - sender.started, 3), n)
                        for t, n in timeline
                        if sender.started <= t <= sender.finished + 0.5
                    ],
                    **use,
                    **sender.detail,
                }
            )
        return {
            "flows": results,
            "link": link_stats,
            "cpu": {
                "sender_thread": sender_cpu,
                "receiver_process_total": receiver_cpu,
                "forwarder": _forwarder_cpu() - forwarder_before,
            },
        }


def _format_progress(loss: float, case: dict[str, Any]) -> str:
    parts = []
    for flow in case["flows"]:
        delay = flow["queueing_delay_median"]
        parts.append(
            f"{flow['flow']}: {flow['goodput_bps'] / 1e6:5.2f} Mbit/s"
            + (f", queue {delay * 1e3:5.1f} ms" if delay is not None else "")
        )
    cpu = case["cpu"]
    lags = [f["loop_lag_p99"] for f in case["flows"] if f.get("loop_lag_p99") is not None]
    if lags:
        parts.append(f"loop lag p99 {max(lags) * 1e3:.0f} ms")
    return (
        f"  loss {loss * 100:g}%  "
        + "; ".join(parts)
        + f"  [cpu s: sender {cpu['sender_thread']:.1f}, fwd {cpu['forwarder']:.1f}]"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every case; returns the JSON document."""
    ca = DevCA()
    identity = ca.issue("spiffe://mesh.local/ns/bench/sa/congestion")
    bench = Bench(
        rate_bps=args.rate,
        rtt=args.rtt,
        queue_delay=args.queue,
        seed=args.seed,
        datagram_size=args.datagram_size,
        identity=identity,
        trust=ca.trust_bundle,
        setup=ReceiverSetup(
            cert_chain_pem=identity.cert_chain_pem(),
            key_pem=identity.private_key_pem(),
            trust_pem=ca.trust_bundle.pem,
            engine=args.engine,
        ),
    )
    document: dict[str, Any] = {
        "command": "quicmesh bench congestion " + " ".join(args.argv),
        "link": {
            "rate_bps": args.rate,
            "rtt": args.rtt,
            "queue_delay": args.queue,
            "loss_applies_to": "both directions",
        },
        "duration": args.duration,
        "tcp": "plain kernel TCP sockets, TCP_CONGESTION per socket",
        "quic": "QuicTransport, one tunnel stream, 64 KiB writes with drain()",
        "quic_engine": args.engine,
        "quic_datagram_size": args.datagram_size
        or QuicTransport(identity=identity, trust=ca.trust_bundle)
        .configuration(is_client=True)
        .max_datagram_size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source_state(),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "cases": [],
        "fairness": [],
    }
    for loss in args.losses:
        with Link(bench.link_config(loss)) as link:
            receiver = Receiver(link, bench.setup)
            try:
                for kind in args.flows:
                    for repeat in range(args.repeat):
                        case = bench.run_case(link, receiver, [kind], args.duration)
                        case.update(loss=loss, repeat=repeat)
                        document["cases"].append(case)
                        print(_format_progress(loss, case), flush=True)
                        time.sleep(PAUSE)
                if loss == 0.0 or (args.fairness_loss is not None and loss == args.fairness_loss):
                    for opponent in args.fairness:
                        kinds = [FlowKind.parse(FAIRNESS_FLOW), opponent]
                        case = bench.run_case(link, receiver, kinds, args.fairness_duration)
                        case.update(loss=loss)
                        document["fairness"].append(case)
                        print(_format_progress(loss, case), flush=True)
                        time.sleep(PAUSE)
            finally:
                receiver.stop()
    document["summary"] = summarize(document, args.rate)
    return document


# -- reporting ---------------------------------------------------------------------


def summarize(document: dict[str, Any], rate_bps: float) -> dict[str, Any]:
    """Median over repeats per (flow, loss), the fairness shares and the target verdict."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for case in document["cases"]:
        for flow in case["flows"]:
            groups.setdefault((flow["flow"], case["loss"]), []).append(flow)
    for (name, loss), flows in groups.items():
        delays = [
            f["queueing_delay_median"] for f in flows if f["queueing_delay_median"] is not None
        ]
        p95 = [f["queueing_delay_p95"] for f in flows if f["queueing_delay_p95"] is not None]
        lags = [f["loop_lag_p99"] for f in flows if f.get("loop_lag_p99") is not None]
        use = {
            key: statistics.median(values) if values else None
            for key in ("utilisation", "payload_per_link_byte")
            for values in [[f[key] for f in flows if key in f]]
        }
        table.setdefault(name, {})[f"{loss:g}"] = {
            **use,
            "loop_lag_p99": statistics.median(lags) if lags else None,
            "goodput_bps": statistics.median(f["goodput_bps"] for f in flows),
            "queueing_delay_median": statistics.median(delays) if delays else None,
            "queueing_delay_p95": statistics.median(p95) if p95 else None,
        }
    fairness = []
    for case in document["fairness"]:
        flows = case["flows"]
        total = sum(f["goodput_bps"] for f in flows) or 1.0
        total_half = sum(f["goodput_second_half_bps"] for f in flows) or 1.0
        fairness.append(
            {
                "loss": case["loss"],
                "flows": [
                    {
                        "flow": f["flow"],
                        "goodput_bps": f["goodput_bps"],
                        "share": f["goodput_bps"] / total,
                        "share_second_half": f["goodput_second_half_bps"] / total_half,
                        "queueing_delay_median": f["queueing_delay_median"],
                    }
                    for f in flows
                ],
                "link_utilisation": total / rate_bps,
            }
        )
    target: dict[str, Any] = {"loss": TARGET_LOSS}
    bbr = table.get("quic-bbr", {}).get(f"{TARGET_LOSS:g}")
    tcp_bbr = table.get("tcp-bbr", {}).get(f"{TARGET_LOSS:g}")
    if bbr is not None:
        goodput = float(bbr["goodput_bps"] or 0.0)
        delay = bbr["queueing_delay_median"]
        target["quic_bbr_share_of_link"] = goodput / rate_bps
        target["at_least_80_percent"] = goodput >= TARGET_SHARE_OF_LINK * rate_bps
        if tcp_bbr is not None:
            target["at_least_tcp_bbr"] = goodput >= float(tcp_bbr["goodput_bps"] or 0.0)
        rtt = document["link"]["rtt"]
        target["median_queueing_delay_under_one_rtt"] = delay is not None and delay < rtt
        target["met"] = all(v for k, v in target.items() if k.startswith(("at_", "median_")))
    return {"table": table, "fairness": fairness, "target": target}


def _mbit(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def markdown(document: dict[str, Any]) -> str:
    """The tables of ``congestion.md``."""
    summary = document["summary"]
    table = summary["table"]
    flows = [name for name in FLOWS if name in table] + sorted(set(table) - set(FLOWS))
    losses = sorted({float(loss) for rows in table.values() for loss in rows})
    link = document["link"]
    lines = [
        f"Link: {link['rate_bps'] / 1e6:g} Mbit/s, RTT {link['rtt'] * 1e3:g} ms, "
        f"drop-tail queue {link['queue_delay'] * 1e3:g} ms, random loss in both directions; "
        f"{document['duration']:g} s per flow; QUIC datagrams of "
        f"{document['quic_datagram_size']} bytes; QUIC engine "
        f"{document.get('quic_engine', 'aioquic')}.",
        "",
        "Goodput, Mbit/s (share of the link rate):",
        "",
    ]
    rate = link["rate_bps"]
    lines += _loss_table(
        table,
        flows,
        losses,
        lambda row: (
            f"{_mbit(row['goodput_bps'])} ({100 * row['goodput_bps'] / rate:.0f} %)" + _starved(row)
        ),
    )
    if any(_starved(row) for rows in table.values() for row in rows.values()):
        lines += [
            "",
            f"† the sender's event loop woke up more than {STARVED_LOOP_LAG * 1e3:g} ms late "
            "(99th percentile): the CPU, not the congestion controller, may have limited it.",
        ]
    lines += [
        "",
        "Queueing delay (smoothed RTT minus minimum RTT), median / 95th percentile, ms:",
        "",
    ]
    lines += _loss_table(
        table,
        flows,
        losses,
        lambda row: f"{_ms(row['queueing_delay_median'])} / {_ms(row['queueing_delay_p95'])}",
    )
    lines += [
        "",
        "Link use: the share of the bottleneck's time the flow kept busy, and the payload "
        "each link byte carried (after IP, UDP/TCP, QUIC and HTTP/3 headers, "
        "retransmissions and the handshake):",
        "",
    ]
    lines += _loss_table(
        table,
        flows,
        losses,
        lambda row: (
            "-"
            if row.get("utilisation") is None
            else f"{100 * row['utilisation']:.1f} % busy, "
            f"{100 * row['payload_per_link_byte']:.1f} % payload"
        ),
    )
    if summary["fairness"]:
        lines += [
            "",
            "Fairness (two flows sharing the link, started together):",
            "",
            "| loss | flow | goodput, Mbit/s | share | share, second half | queueing delay, ms |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for case in summary["fairness"]:
            for flow in case["flows"]:
                lines.append(
                    f"| {case['loss'] * 100:g} % | {flow['flow']} | {_mbit(flow['goodput_bps'])} "
                    f"| {100 * flow['share']:.0f} % | {100 * flow['share_second_half']:.0f} % "
                    f"| {_ms(flow['queueing_delay_median'])} |"
                )
    pacing = _pacing_rows(document)
    if pacing:
        lines += [
            "",
            "Pacing of quic-bbr (bytes sent over the model's pacing rate, per 100 ms window "
            "in which the sender was not window-limited):",
            "",
            "| loss | windows | median | 10th-90th percentile |",
            "|---:|---:|---:|---:|",
        ]
        for loss, row in pacing:
            if row["median_sent_over_model"] is None:
                lines.append(f"| {loss * 100:g} % | 0 | - | - |")
                continue
            lines.append(
                f"| {loss * 100:g} % | {row['pacing_limited_windows']} of {row['windows']} "
                f"| {row['median_sent_over_model']:.3f} "
                f"| {row['p10_sent_over_model']:.3f}-{row['p90_sent_over_model']:.3f} |"
            )
    target = summary["target"]
    if "met" in target:
        lines += [
            "",
            f"Target at {TARGET_LOSS * 100:g} % loss: quic-bbr carries "
            f"{100 * target['quic_bbr_share_of_link']:.0f} % of the link "
            f"(>= 80 %: {'yes' if target['at_least_80_percent'] else 'no'}"
            + (
                f"; >= tcp-bbr: {'yes' if target['at_least_tcp_bbr'] else 'no'}"
                if "at_least_tcp_bbr" in target
                else ""
            )
            + f"; median queueing delay under one RTT: "
            f"{'yes' if target['median_queueing_delay_under_one_rtt'] else 'no'}). "
            f"Target {'met' if target['met'] else 'NOT met'}.",
        ]
    return "\n".join(lines) + "\n"


def _loss_table(
    table: dict[str, dict[str, dict[str, Any]]],
    flows: Sequence[str],
    losses: Sequence[float],
    cell: Callable[[dict[str, Any]], str],
) -> list[str]:
    """A markdown table, a row per loss rate and a column per flow; "-" where none ran."""
    lines = ["| loss | " + " | ".join(flows) + " |", "|---:|" + "---:|" * len(flows)]
    for loss in losses:
        rows = [table[name].get(f"{loss:g}") for name in flows]
        cells = ["-" if row is None else cell(row) for row in rows]
        lines.append(f"| {loss * 100:g} % | " + " | ".join(cells) + " |")
    return lines


def _starved(row: dict[str, Any]) -> str:
    lag = row.get("loop_lag_p99")
    return " †" if lag is not None and lag > STARVED_LOOP_LAG else ""


def _pacing_rows(document: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    rows = []
    for case in document["cases"]:
        for flow in case["flows"]:
            if "pacing" in flow:
                rows.append((case["loss"], flow["pacing"]))
    return rows


def plot(document: dict[str, Any], out: Path) -> list[Path]:
    """Write the PNG plots; returns their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'quicmesh[plots]'): no plots")
        return []
    written = []
    summary = document["summary"]
    table = summary["table"]
    rate = document["link"]["rate_bps"]
    rtt = document["link"]["rtt"]
    link = (
        f"{rate / 1e6:g} Mbit/s, RTT {rtt * 1e3:g} ms, queue "
        f"{document['link']['queue_delay'] * 1e3:g} ms"
    )
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for name in [n for n in FLOWS if n in table] + sorted(set(table) - set(FLOWS)):
        rows = sorted((float(loss), row) for loss, row in table[name].items())
        losses = [100 * loss for loss, _ in rows]
        style = "-" if name.startswith("quic") else "--"
        top.plot(losses, [r["goodput_bps"] / 1e6 for _, r in rows], style, marker="o", label=name)
        bottom.plot(
            losses,
            [1e3 * (r["queueing_delay_median"] or 0.0) for _, r in rows],
            style,
            marker="o",
            label=name,
        )
    top.axhline(rate / 1e6, color="grey", linewidth=0.8)
    top.axhline(TARGET_SHARE_OF_LINK * rate / 1e6, color="grey", linewidth=0.8, linestyle=":")
    top.set_ylabel("goodput (Mbit/s)")
    top.set_xlabel("random loss (%, both directions)")
    top.set_ylim(bottom=0)
    top.legend(fontsize="small")
    top.set_title("bulk goodput (grey: link rate, dotted: target share)")
    bottom.axhline(rtt * 1e3, color="grey", linewidth=0.8, linestyle=":")
    bottom.set_ylabel("median queueing delay (ms)")
    bottom.set_xlabel("random loss (%, both directions)")
    bottom.set_title("queueing delay at the bottleneck (dotted: one RTT)")
    bottom.legend(fontsize="small")
    bottom.set_ylim(bottom=0)
    figure.suptitle(f"Goodput and queueing vs random loss: {link}")
    figure.tight_layout()
    path = out / "congestion-goodput.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)

    if document["fairness"]:
        cases = document["fairness"]
        figure, axes = plt.subplots(len(cases), 1, figsize=(7, 3 * len(cases)), squeeze=False)
        for axis, case in zip(axes[:, 0], cases, strict=True):
            for flow in case["flows"]:
                times, rates = _rate_series(flow["timeline"])
                axis.plot(times, [r * 8 / 1e6 for r in rates], label=flow["flow"])
            axis.set_ylabel("goodput (Mbit/s, 0.5 s windows)")
            axis.set_xlabel("time (s)")
            axis.set_title(
                f"{' vs '.join(f['flow'] for f in case['flows'])}, "
                f"{case.get('loss', 0) * 100:g} % loss"
            )
            axis.set_ylim(0, rate / 1e6 * 1.1)
            axis.legend(fontsize="small")
        figure.suptitle(f"Sharing the link: {link}")
        figure.tight_layout()
        path = out / "congestion-fairness.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    pacing = [(loss, row) for loss, row in _pacing_rows(document) if row["series"]]
    if pacing:
        figure, axes = plt.subplots(len(pacing), 1, figsize=(7, 2.2 * len(pacing)), squeeze=False)
        for axis, (loss, row) in zip(axes[:, 0], pacing, strict=True):
            windows = row["window_series"]
            t0 = windows[0]["start"] if windows else 0.0
            axis.plot(
                [w["start"] - t0 for w in windows],
                [w["model_rate"] * 8 / 1e6 for w in windows],
                label="model pacing rate",
            )
            axis.plot(
                [w["start"] - t0 for w in windows],
                [w["sent_rate"] * 8 / 1e6 for w in windows],
                label="sent (UDP payload)",
                linewidth=0.8,
            )
            axis.set_ylim(0, rate / 1e6 * 1.6)
            axis.set_ylabel("rate (Mbit/s)")
            axis.set_xlabel("time (s, 100 ms windows)")
            axis.set_title(f"quic-bbr at {loss * 100:g} % loss", fontsize="small")
            axis.legend(fontsize="x-small", loc="lower right")
        figure.suptitle(f"BBR's pacing rate and what was sent: {link}")
        figure.tight_layout()
        path = out / "congestion-pacing.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _rate_series(timeline: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    times, rates = [], []
    start = 0
    for index, (t, n) in enumerate(timeline):
        t0, n0 = timeline[start]
        if t - t0 >= 0.5:
            times.append(t)
            rates.append((n - n0) / (t - t0))
            start = index
    return times, rates


# -- command line ------------------------------------------------------------------


def _loss(text: str) -> float:
    """One loss percentage below 100 %, as a fraction."""
    if "," in text:
        raise argparse.ArgumentTypeError(f"one percentage, not a list: {text!r}")
    (value,) = loss_percentages(text)
    return value


def _flow_list(text: str) -> list[FlowKind]:
    if text.strip() in ("", "none"):
        return []
    try:
        return [FlowKind.parse(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``quicmesh bench congestion`` options."""
    parser = OneLineParser(
        prog="quicmesh bench congestion",
        description="Bulk goodput and queueing delay per congestion controller on an "
        "emulated link (needs root).",
    )
    parser.add_argument(
        "--out",
        type=tried_output_dir,
        default=Path("congestion-results"),
        help="output folder (default: congestion-results)",
    )
    parser.add_argument("--quick", action="store_true", help="loss 0 and 2 %%, short flows")
    parser.add_argument("--losses", type=loss_percentages, help="e.g. 0,0.5,1,2,5 (percent)")
    parser.add_argument("--flows", type=_flow_list, help=f"default {','.join(FLOWS)}")
    parser.add_argument(
        "--fairness",
        type=_flow_list,
        help=f"opponents of {FAIRNESS_FLOW} (default {','.join(FAIRNESS_OPPONENTS)}; none)",
    )
    parser.add_argument(
        "--fairness-loss",
        type=_loss,
        help="also run fairness at this loss %% (in [0, 100); added to --losses if missing)",
    )
    parser.add_argument("--duration", type=positive_number, help=f"seconds per flow ({DURATION:g})")
    parser.add_argument(
        "--fairness-duration",
        type=positive_number,
        help=f"seconds of each fairness run ({FAIRNESS_DURATION:g}; "
        f"--quick {QUICK_FAIRNESS_DURATION:g})",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per (flow, loss); median")
    parser.add_argument(
        "--rate",
        type=positive_number,
        default=RATE_BPS,
        help=f"link rate, bit/s (default {RATE_BPS:g})",
    )
    parser.add_argument(
        "--rtt",
        type=rtt_seconds,
        default=RTT,
        help=f"round-trip time, seconds (default {RTT:g})",
    )
    parser.add_argument(
        "--queue",
        type=positive_number,
        default=QUEUE_DELAY,
        help=f"bottleneck queue, seconds at the link rate (default {QUEUE_DELAY:g})",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the link's loss and the payloads (default 1)"
    )
    parser.add_argument(
        "--datagram-size",
        type=int,
        help="QUIC max_datagram_size, 1200-1452 (default: QuicTransport's, 1200)",
    )
    add_engine_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.repeat < 1:
        print(
            f"quicmesh bench congestion: argument --repeat: must be at least 1, not {args.repeat}",
            file=sys.stderr,
        )
        return 2
    if args.datagram_size is not None and not 1200 <= args.datagram_size <= 1452:
        print(
            "quicmesh bench congestion: argument --datagram-size: must be 1200 to 1452 "
            f"(QuicTransport's max_datagram_size), not {args.datagram_size}",
            file=sys.stderr,
        )
        return 2
    problem = engine_problem(args.engine)
    if problem is not None:
        print(f"quicmesh bench congestion: {problem}", file=sys.stderr)
        return 2
    args.argv = argv
    args.losses = args.losses or list(QUICK_LOSSES if args.quick else LOSSES)
    args.flows = args.flows if args.flows is not None else [FlowKind.parse(f) for f in FLOWS]
    if args.fairness is None:
        args.fairness = [FlowKind.parse(f) for f in FAIRNESS_OPPONENTS]
    if not args.flows and not args.fairness:  # (empty tables and plot, exit 0: a review)
        print(
            "quicmesh bench congestion: nothing to run: --flows and --fairness are both none",
            file=sys.stderr,
        )
        return 2
    if args.fairness_loss is not None and args.fairness_loss not in args.losses:
        # Fairness runs inside the loop over --losses: without its loss there, it never ran.
        args.losses = sorted([*args.losses, args.fairness_loss])
    args.duration = args.duration or (QUICK_DURATION if args.quick else DURATION)
    args.fairness_duration = args.fairness_duration or (
        QUICK_FAIRNESS_DURATION if args.quick else FAIRNESS_DURATION
    )
    reason = missing_privileges()
    if reason is not None:  # (it was the link's error, exit 1; 2 as `quicmesh netem`)
        print(f"quicmesh bench congestion: the link emulator {reason}", file=sys.stderr)
        return 2
    try:
        # ``kill PID`` and ``timeout`` (SIGTERM) become SystemExit: the receiver is
        # stopped and the link's namespaces deleted on the way out, as after Ctrl-C.
        with terminate_as_exit():
            document = run(args)
            table = markdown(document)
            with signals_deferred():  # the measurements are written whole, then a signal acts
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "congestion.json").write_text(json.dumps(document, indent=1) + "\n")
                (args.out / "congestion.md").write_text(table)
            print()
            print(table)
            for path in plot(document, args.out):
                print(f"wrote {path}")
            print(f"wrote {args.out / 'congestion.json'} and {args.out / 'congestion.md'}")
    except QuicmeshError as exc:
        print(f"quicmesh bench congestion: {exc}", file=sys.stderr)
        return 1
    return 0
