"""``quicmesh bench hol``: head-of-line blocking between flows sharing one peer connection.

What one run measures, on an emulated link (:mod:`quicmesh.netem`, needs root):

* **Flows.** Over ONE peer connection (``tcp``: one TLS connection per flow, the
  per-flow reference): one bulk flow the server sends continuously (download), and
  ``--flows`` interactive flows, each sending a 1 KiB request every 20 ms, open loop,
  answered by an 8 KiB response. Latency is from the request's scheduled send time to
  the last response byte read, on the client's clock.
* **Link.** 40 ms RTT, 20 Mbit/s each way, a drop-tail queue of 60 ms at the rate,
  random loss 0, 0.5, 1, 2, 5 % (``--rtt``, ``--rate``, ``--queue``, ``--loss``), plus
  the QUIC Interop Runner's network as profile ``interop-runner``: 10 Mbit/s, 15 ms
  one way, 25-packet queue, 2 % loss in bursts of at most 3 packets.
* **Transports and congestion control, like with like.** ``quic-bbr`` and
  ``quic-cubic`` (quicmesh's controller on both ends), ``h2-bbr`` / ``h2-cubic`` and
  ``tcp-bbr`` / ``tcp-cubic`` (the kernel's, set with the
  ``net.ipv4.tcp_congestion_control`` sysctl in both namespaces). What actually ran
  is recorded for both sides of every run: QUIC's from each side's connection, the
  kernel's from ``ss -tin`` on the live sockets of each namespace. ``h2lowbuf-*`` is
  h2 with 16 KiB socket write buffer and TCP_NOTSENT_LOWAT instead of 64/128 KiB
  (an experiment that shows how much of h2's latency waits in sender buffers).
* **Processes.** The server and the client are separate processes inside their
  namespaces (own interpreter each); the forwarder is a third. At 20 Mbit/s the
  forwarder moves about 3.5k packets/s, far below its ~100k packets/s.
* **Where the time goes.** The client also sends UDP probes every 5 ms that the
  server echoes with its timestamp (same clock: namespaces share CLOCK_MONOTONIC), so
  each response's time splits into the link's delay (propagation + bottleneck queue,
  from the probe that arrived nearest to it) and the rest: sender-side buffering plus
  waiting for retransmissions.
* **Stall isolation** (no loss): two bulk flows and the interactive flows; bulk-0's
  reader stops half-way; the others' latency and goodput are compared before/after.

Output in ``--out DIR``: ``hol.json`` (settings, every run, pooled points),
``hol.md`` (tables), ``hol-samples.json.gz`` (every latency), ``hol-cdf.png`` and
``hol-p99.png`` (if matplotlib is installed). ``--quick`` runs a reduced plan in
under two minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .._child import child_environment, python_command
from .._signals import scratch_directory, signals_deferred
from ..netem import (
    GilbertElliottConfig,
    Link,
    LinkConfig,
    Side,
    parse_duration,
    parse_queue,
    parse_rate,
)
from ..netem.system import NetemError, missing_privileges, write_sysctl
from ..sidecar.launch import terminate_as_exit
from ..tls import DevCA
from ..transport.base import default_quic_engine
from . import (
    MAX_RTT_SECONDS,
    OneLineParser,
    loss_percentages,
    source_state,
    tried_output_dir,
)
from . import _hol_report as report
from ._engine import add_engine_argument, engine_problem
from ._hol_worker import MIN_INTERVAL, PARENT_VARIABLE, WorkerConfig

TRANSPORT_VARIANTS = ("quic-bbr", "quic-cubic", "h2-bbr", "h2-cubic", "tcp-bbr", "tcp-cubic")
"""Default transports, each with its congestion control (QUIC's own, or the kernel's)."""
KNOWN_TRANSPORTS = ("quic", "h2", "tcp", "h2lowbuf")
CONGESTION_CONTROLS = ("bbr", "cubic", "reno")
DEFAULT_LOSSES = (0.0, 0.005, 0.01, 0.02, 0.05)
INTEROP_PROFILE = "interop-runner"
STALL_SETTLE = 1.0
"""Seconds after the stall before the 'stalled' phase is measured (the window drains)."""
RUN_OVERHEAD = 2.5
"""Seconds each run spends outside warm-up and measurement (link, processes, handshake)."""


@dataclass(frozen=True)
class LinkProfile:
    """One emulated network: a name, its config builder arguments, and its base RTT."""

    name: str
    one_way_delay: float
    rate_bps: float
    loss: float | None
    """Random loss, or None for a profile with its own loss model."""
    queue: dict[str, Any]
    burst: GilbertElliottConfig | None = None

    def config(self, seed: int) -> LinkConfig:
        """The link for one seed."""
        return LinkConfig.symmetric(
            delay=self.one_way_delay,
            loss=self.loss or 0.0,
            burst=self.burst,
            rate_bps=self.rate_bps,
            seed=seed,
            **self.queue,
        )

    @property
    def rtt(self) -> float:
        """Base round-trip time (propagation only)."""
        return 2 * self.one_way_delay


def interop_runner_profile() -> LinkProfile:
    """The QUIC Interop Runner's network: 10 Mbit/s, 15 ms, 25 packets, 2 % loss in bursts <= 3."""
    return LinkProfile(
        name=INTEROP_PROFILE,
        one_way_delay=0.015,
        rate_bps=10e6,
        loss=None,
        queue={"queue_packets": 25},
        burst=GilbertElliottConfig.from_loss_and_burst(0.02, mean_burst=2.0, max_burst=3),
    )


@dataclass(frozen=True)
class Variant:
    """A transport with its congestion control, e.g. ``quic-bbr`` or ``h2-cubic``."""

    transport: str
    congestion_control: str

    @property
    def name(self) -> str:
        return f"{self.transport}-{self.congestion_control}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        transport, _, cc = text.strip().partition("-")
        if transport not in KNOWN_TRANSPORTS or cc not in CONGESTION_CONTROLS:
            raise ValueError(
                f"not a transport variant: {text!r} (write TRANSPORT-CC, TRANSPORT one of "
                f"{', '.join(KNOWN_TRANSPORTS)}, CC one of {', '.join(CONGESTION_CONTROLS)})"
            )
        return cls(transport, cc)

    def worker_fields(self) -> dict[str, Any]:
        return {
            "transport": "h2" if self.transport == "h2lowbuf" else self.transport,
            "congestion_control": self.congestion_control,
            "small_tcp_buffers": self.transport == "h2lowbuf",
        }


@dataclass(frozen=True)
class RunSpec:
    """One run: experiment, link, variant, seed."""

    experiment: str
    """``hol`` or ``stall``."""
    profile: LinkProfile
    variant: Variant
    seed: int


@dataclass
class Settings:
    """The options every run shares."""

    interactive_flows: int
    request_size: int
    response_size: int
    interval: float
    warmup: float
    measure: float
    grace: float
    seeds: int
    stall_measure: float
    engine: str = field(default_factory=default_quic_engine)
    """The QUIC engine of the quic variants (both ends; default: native where its
    extension is built, else aioquic)."""
    send_window: int | None = None
    """(native engine) quinn's send_window on both ends (None: its default)."""


# -- planning -------------------------------------------------------------------------


def build_plan(args: argparse.Namespace, settings: Settings) -> list[RunSpec]:
    """Every run, interleaving variants within each (link, seed) so drift hits all alike."""
    one_way = args.rtt / 2
    profiles = [
        LinkProfile(f"loss {loss * 100:g}%", one_way, args.rate, loss, args.queue)
        for loss in args.loss
    ]
    if args.interop:
        profiles.append(interop_runner_profile())
    plan: list[RunSpec] = []
    for seed in range(1, settings.seeds + 1):
        for profile in profiles:
            variants = list(args.transports)
            if profile.loss is not None and profile.loss in args.lowbuf_loss:
                variants += [v for v in args.lowbuf if v not in variants]
            plan += [RunSpec("hol", profile, v, seed) for v in variants]
    if args.stall:
        clean = LinkProfile("loss 0%", one_way, args.rate, 0.0, args.queue)
        plan += [RunSpec("stall", clean, v, 1) for v in args.stall_transports]
    return plan


def estimate_seconds(plan: list[RunSpec], settings: Settings) -> float:
    """Rough wall time of the plan."""
    total = 0.0
    for spec in plan:
        measure = settings.stall_measure if spec.experiment == "stall" else settings.measure
        total += RUN_OVERHEAD + settings.warmup + measure
    return total


# -- one run --------------------------------------------------------------------------


class _LineReader:
    """Reads a child's stdout lines in a thread, so the parent can wait with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.rest: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, word: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line is None:
                return False
            if line.strip() == word:
                return True
            self.rest.append(line)

    def remaining(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.rest.append(line)
        return "".join(self.rest)


_SS_CC = re.compile(r"\b(bbr|cubic|reno)\b")


def socket_congestion_controls(link: Link, side: Side) -> list[str]:
    """The congestion control of every established TCP socket in a namespace (``ss -tin``)."""
    process = link.popen(
        side,
        ["ss", "-tin", "state", "established"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        return []
    return [m.group(1) for line in output.splitlines() if (m := _SS_CC.search(line))]


class HostCpuSampler:
    """Samples the machine's busy and total CPU time (``/proc/stat``) every 0.5 s in a thread."""

    def __init__(self) -> None:
        self.samples: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HostCpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                with open("/proc/stat") as file:
                    fields = [int(v) for v in file.readline().split()[1:9]]
            except (OSError, ValueError):
                return
            idle = fields[3] + fields[4]
            self.samples.append([time.monotonic(), sum(fields) - idle, sum(fields)])
            if self._stop.wait(0.5):
                return


class RunError(Exception):
    """A run failed; the message says which side and why."""


def execute(spec: RunSpec, settings: Settings, ca_dir: str, scratch: Path) -> dict[str, Any]:
    """Run one spec on a fresh link; return its raw client data and what ran."""
    stall = spec.experiment == "stall"
    measure = settings.stall_measure if stall else settings.measure
    config = WorkerConfig(
        ca_dir=ca_dir,
        server_address=Link.server_address,
        interactive_flows=settings.interactive_flows,
        bulk_flows=2 if stall else 1,
        request_size=settings.request_size,
        response_size=settings.response_size,
        interval=settings.interval,
        warmup=settings.warmup,
        measure=measure,
        grace=settings.grace,
        stall_flow=0 if stall else None,
        stall_after=measure / 2,
        seed=spec.seed,
        transport_options=(
            {"engine": settings.engine, "send_window": settings.send_window}
            if spec.variant.transport == "quic"
            else {}
        ),
        **spec.variant.worker_fields(),
    )
    result_path = scratch / "client.json"
    with contextlib.suppress(FileNotFoundError):
        result_path.unlink()
    with (
        (scratch / "server.err").open("w+") as server_err,
        (scratch / "client.err").open("w+") as client_err,
    ):
        return _execute(spec, settings, config, measure, server_err, client_err, result_path)


def _execute(
    spec: RunSpec,
    settings: Settings,
    config: WorkerConfig,
    measure: float,
    server_err: IO[str],
    client_err: IO[str],
    result_path: Path,
) -> dict[str, Any]:
    argv = python_command("-m", "quicmesh.bench._hol_worker")
    env = child_environment()
    # The workers ask the kernel to stop them when the thread that starts them ends
    # (die_with_parent): a bench killed outright (SIGKILL) leaves no client behind,
    # still sending and collecting samples. Only the main thread lives as long as we do.
    if threading.current_thread() is threading.main_thread():
        env[PARENT_VARIABLE] = str(os.getpid())
    kernel_cc = spec.variant.congestion_control
    host_sampler = HostCpuSampler()
    with Link(spec.profile.config(spec.seed)) as link, host_sampler:
        sysctl = {}
        sides: tuple[Side, Side] = ("client", "server")
        for side in sides:
            namespace = link.namespace(side)
            # Only the kernel's allowed algorithms can be a namespace's default (cubic
            # is not, here: EPERM); the workers set TCP_CONGESTION per socket anyway.
            with contextlib.suppress(PermissionError):
                write_sysctl(namespace, "net.ipv4.tcp_congestion_control", kernel_cc)
            sysctl[side] = _read_sysctl(link, side, "net.ipv4.tcp_congestion_control")
        server = link.popen(
            "server",
            [*argv, "server", config.to_json()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=server_err,
            text=True,
            env=env,
        )
        assert server.stdout is not None and server.stdin is not None
        server_lines = _LineReader(server.stdout)
        if not server_lines.wait_for("ready", 20.0):
            raise RunError(f"server did not start: {_tail(server_err)}")
        client = link.popen(
            "client",
            [*argv, "client", config.to_json(), str(result_path)],
            stdout=subprocess.PIPE,
            stderr=client_err,
            text=True,
            env=env,
        )
        assert client.stdout is not None
        client_lines = _LineReader(client.stdout)
        sockets: dict[str, list[str]] = {"client": [], "server": []}
        if client_lines.wait_for("measuring", 20.0 + settings.warmup):
            time.sleep(measure / 2)
            if spec.variant.transport != "quic":
                for side in sides:
                    sockets[side] = socket_congestion_controls(link, side)
        try:
            client.wait(timeout=measure + settings.grace + 30.0)
        except subprocess.TimeoutExpired:
            client.kill()
            raise RunError("client did not finish in time") from None
        server.stdin.close()
        server_output = server_lines.remaining(10.0)
        link_stats = link.stats()
    host_sampler.stop()
    if client.returncode != 0 or not result_path.exists():
        raise RunError(f"client failed (exit {client.returncode}): {_tail(client_err)}")
    raw = json.loads(result_path.read_text())
    try:
        server_result = json.loads(server_output.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        server_result = {"error": _tail(server_err)}
    quic_seen = {
        "client": raw["connection"].get("congestion_control"),
        "server": next(
            (c.get("congestion_control") for c in server_result.get("connections", [])), None
        ),
    }
    cc = {
        "transport": "quic" if spec.variant.transport == "quic" else "tcp",
        "client": {
            "quic": quic_seen["client"],
            "sysctl": sysctl["client"],
            "setsockopt": None if spec.variant.transport == "quic" else kernel_cc,
            "sockets": sockets["client"],
        },
        "server": {
            "quic": quic_seen["server"],
            "sysctl": sysctl["server"],
            "setsockopt": None if spec.variant.transport == "quic" else kernel_cc,
            "sockets": sockets["server"],
        },
    }
    return {
        "raw": raw,
        "host_cpu": host_sampler.samples,
        "server": server_result,
        "congestion_control": cc,
        "link_stats": {
            "client_to_server": asdict(link_stats.client_to_server),
            "server_to_client": asdict(link_stats.server_to_client),
        },
    }


def _read_sysctl(link: Link, side: Side, key: str) -> str:
    from ..netem import system

    path = "/proc/sys/" + key.replace(".", "/")
    with system.in_namespace(link.namespace(side)), open(path) as file:
        return file.read().strip()


def _tail(file: IO[str], lines: int = 8) -> str:
    file.flush()
    file.seek(0)
    text = file.read().strip().splitlines()
    return " | ".join(text[-lines:]) or "(no output)"


def check_congestion_control(spec: RunSpec, cc: dict[str, Any]) -> list[str]:
    """Problems with what actually ran, compared with what was asked (empty if none)."""
    want = spec.variant.congestion_control
    problems = []
    for side in ("client", "server"):
        seen = cc[side]
        if spec.variant.transport == "quic":
            if seen["quic"] != want:
                problems.append(f"{side} QUIC ran {seen['quic']}, not {want}")
        else:
            if not seen["sockets"]:
                problems.append(f"{side}: no TCP socket seen by ss to check")
            elif set(seen["sockets"]) != {want}:
                problems.append(f"{side} sockets ran {sorted(set(seen['sockets']))}, not {want}")
    return problems


def summarize(spec: RunSpec, run: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Statistics of one run (windows: the measurement, or the two stall phases)."""
    raw = run["raw"]
    measure = raw["measure_end"] - raw["measure_start"]
    windows = None
    if spec.experiment == "stall":
        half = measure / 2
        windows = {"before": (0.0, half), "stalled": (half + STALL_SETTLE, measure)}
    summary = report.summarize_run(
        raw,
        one_way_delay=spec.profile.one_way_delay,
        rate_bps=spec.profile.rate_bps,
        response_size=settings.response_size,
        slow_threshold=2 * spec.profile.rtt,
        windows=windows,
    )
    for name, (offset_start, offset_end) in (windows or {"measure": (0.0, measure)}).items():
        summary[name]["cpu"] = report.cpu_summary(
            raw.get("monitor", {}),
            run["server"].get("monitor", {}),
            run["host_cpu"],
            raw["measure_start"] + offset_start,
            raw["measure_start"] + offset_end,
        )
    return summary


# -- the command ----------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal, one line per run otherwise."""

    def __init__(self, total: int, estimate: float, stream: IO[str] = sys.stderr) -> None:
        self.total = total
        self.estimate = estimate
        self.stream = stream
        self.started = time.monotonic()
        self.tty = stream.isatty()

    def update(self, done: int, label: str) -> None:
        elapsed = time.monotonic() - self.started
        remaining = elapsed / done * (self.total - done) if done else self.estimate
        width = 24
        filled = int(width * done / max(1, self.total))
        bar = "#" * filled + "-" * (width - filled)
        text = (
            f"[{bar}] {done}/{self.total} {label:<34} "
            f"{_clock(elapsed)} elapsed, ~{_clock(remaining)} left"
        )
        if self.tty:
            self.stream.write("\r" + text[:150].ljust(150))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _variants(text: str) -> tuple[Variant, ...]:
    try:
        return tuple(Variant.parse(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        return parse_duration(text)
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rtt(text: str) -> float:
    """``--rtt``: a duration (``40ms``; a bare number is seconds), above 0 and at most
    :data:`MAX_RTT_SECONDS` (``1e9`` was refused by the link after the run had begun)."""
    value = _seconds(text)
    if not 0 < value <= MAX_RTT_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be above 0 and at most {MAX_RTT_SECONDS:g}s, not {text!r} (40ms, or 0.04)"
        )
    return value


def _interval(text: str) -> float:
    """``--interval``: at least :data:`MIN_INTERVAL` (with 0 the client sent requests
    without ever yielding, and its memory grew until it was killed)."""
    value = _seconds(text)
    if not value >= MIN_INTERVAL:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_INTERVAL * 1e3:g}ms, not {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    """A duration above 0 (``--duration 0`` ran for 40 s and measured nothing)."""
    value = _seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text!r}")
    return value


MIN_SEND_WINDOW = 16 * 1024
MAX_SEND_WINDOW = 1 << 40


def _send_window(text: str) -> int:
    """``--send-window`` bytes, 16 KiB to 1 TiB (0 was taken, and every QUIC case failed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}") from None
    if not MIN_SEND_WINDOW <= value <= MAX_SEND_WINDOW:
        raise argparse.ArgumentTypeError(
            f"must be {MIN_SEND_WINDOW} (16 KiB) to {MAX_SEND_WINDOW} (1 TiB) bytes, not {text!r}"
        )
    return value


def _rate(text: str) -> float:
    try:
        return parse_rate(text)
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _queue(text: str) -> dict[str, Any]:
    try:
        return parse_queue(text)
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """Options of ``quicmesh bench hol``."""
    parser = OneLineParser(
        prog="quicmesh bench hol",
        description="Head-of-line blocking: interactive latency next to a bulk flow on one "
        "peer connection, per transport and congestion control, on an emulated lossy link.",
    )
    parser.add_argument(
        "--out",
        type=tried_output_dir,
        default=Path("hol-results"),
        help="output folder (default: hol-results)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="reduced plan for checks (under 2 minutes)"
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only re-render hol.md and the plots from --out's hol.json and samples",
    )
    parser.add_argument(
        "--loss",
        type=loss_percentages,
        default=None,
        help="random loss rates in %% (default 0,0.5,1,2,5; quick 0,2)",
    )
    parser.add_argument(
        "--no-interop",
        dest="interop",
        action="store_false",
        default=None,
        help=f"skip the {INTEROP_PROFILE} profile",
    )
    parser.add_argument(
        "--interop",
        dest="interop",
        action="store_true",
        help=f"add the {INTEROP_PROFILE} profile (default, not with --quick)",
    )
    parser.add_argument(
        "--transports",
        type=_variants,
        default=None,
        help="TRANSPORT-CC list (default: "
        + ",".join(TRANSPORT_VARIANTS)
        + "; quick: quic-bbr,h2-bbr)",
    )
    parser.add_argument(
        "--lowbuf",
        type=_variants,
        default=None,
        help="sender-buffer experiment variants (default: h2lowbuf-bbr,"
        "h2lowbuf-cubic; quick: none)",
    )
    parser.add_argument(
        "--lowbuf-loss",
        type=loss_percentages,
        default=(0.0, 0.02),
        help="loss rates at which --lowbuf variants run (default: 0,2)",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per point (default 3; quick 1)"
    )
    parser.add_argument("--flows", type=int, default=2, help="interactive flows (default 2)")
    parser.add_argument(
        "--interval",
        type=_interval,
        default=0.020,
        help="time between requests per flow, at least 1ms (default 20ms)",
    )
    parser.add_argument(
        "--request-size", type=int, default=1024, help="bytes of each request (default 1024)"
    )
    parser.add_argument(
        "--response-size", type=int, default=8192, help="bytes of each response (default 8192)"
    )
    parser.add_argument(
        "--warmup", type=_seconds, default=None, help="seconds before measuring (default 2s)"
    )
    parser.add_argument(
        "--duration",
        type=_positive_seconds,
        default=None,
        help="seconds measured per run (default 8s; quick 10s)",
    )
    parser.add_argument(
        "--grace",
        type=_seconds,
        default=3.0,
        help="how long to wait for the last answers (default 3s)",
    )
    parser.add_argument(
        "--rtt", type=_rtt, default=0.040, help="base RTT (default 40ms; a bare number is seconds)"
    )
    parser.add_argument("--rate", type=_rate, default=20e6, help="link rate (default 20mbit)")
    parser.add_argument(
        "--queue",
        type=_queue,
        default={"queue_delay": 0.060},
        help="bottleneck queue (default 60ms; e.g. 25pkt, 64kb)",
    )
    parser.add_argument(
        "--no-stall", dest="stall", action="store_false", help="skip the stall-isolation experiment"
    )
    parser.add_argument(
        "--stall-transports",
        type=_variants,
        default=None,
        help="variants for the stall experiment (default quic-bbr,h2-bbr)",
    )
    parser.add_argument(
        "--stall-duration",
        type=_positive_seconds,
        default=None,
        help="measured seconds of a stall run (default 10s; quick 6s)",
    )
    add_engine_argument(parser)
    parser.add_argument(
        "--send-window",
        type=_send_window,
        default=None,
        help="native engine: QuicTransport(send_window=BYTES) on both ends, 16 KiB to 1 TiB "
        "(default quinn's)",
    )
    return parser


def _apply_defaults(args: argparse.Namespace) -> Settings:
    quick = args.quick
    if args.loss is None:
        args.loss = (0.0, 0.02) if quick else DEFAULT_LOSSES
    if args.interop is None:
        args.interop = not quick
    if args.transports is None:
        names = ("quic-bbr", "h2-bbr") if quick else TRANSPORT_VARIANTS
        args.transports = tuple(Variant.parse(n) for n in names)
    if not args.transports:  # (it ran 0 of 0 and exited 1 saying nothing, a review)
        raise ValueError("argument --transports: no transport given")
    if args.lowbuf is None:
        args.lowbuf = () if quick else _variants("h2lowbuf-bbr,h2lowbuf-cubic")
    if args.stall_transports is None:
        args.stall_transports = _variants("quic-bbr,h2-bbr")
    seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    if seeds < 1:
        raise ValueError(f"argument --seeds: must be at least 1, not {seeds}")
    if args.flows < 1:
        raise ValueError(f"argument --flows: must be at least 1, not {args.flows}")
    warmup = args.warmup if args.warmup is not None else 2.0
    measure = args.duration if args.duration is not None else (10.0 if quick else 8.0)
    stall = args.stall_duration if args.stall_duration is not None else (6.0 if quick else 10.0)
    problem = engine_problem(args.engine)
    if problem is not None:
        raise ValueError(problem)
    if args.send_window is not None and args.engine != "native":
        raise ValueError("--send-window applies to --engine native only")
    if args.request_size < 24 or args.response_size < 40:
        raise ValueError("--request-size must be >= 24 and --response-size >= 40 bytes")
    return Settings(
        interactive_flows=args.flows,
        request_size=args.request_size,
        response_size=args.response_size,
        interval=args.interval,
        warmup=warmup,
        measure=measure,
        grace=args.grace,
        seeds=seeds,
        stall_measure=stall,
        engine=args.engine,
        send_window=args.send_window,
    )


def main(argv: list[str]) -> int:
    """Run the benchmark; write JSON, markdown and plots to ``--out``. Returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.replot:
        return replot(args.out)
    try:
        settings = _apply_defaults(args)
    except ValueError as exc:
        print(f"quicmesh bench hol: {exc}", file=sys.stderr)
        return 2
    reason = missing_privileges()
    if reason is not None:
        print(f"quicmesh bench hol: the link emulator {reason}", file=sys.stderr)
        return 2  # (as `quicmesh netem`: 2 is bad arguments or no root)
    # ``kill PID`` and ``timeout`` (SIGTERM) become SystemExit: the link's tear-down
    # stops the workers and deletes the namespaces, and the scratch directory with the
    # CA's key is removed, as after Ctrl-C.
    with terminate_as_exit():
        return _run(args, settings)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    plan = build_plan(args, settings)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(plan), estimate_seconds(plan, settings))
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    interrupted: int | None = None
    source = source_state()
    try:
        with scratch_directory("quicmesh-hol-") as scratch:
            ca_dir = scratch / "ca"
            DevCA().save(ca_dir)
            for index, spec in enumerate(plan):
                label = f"{spec.experiment} {spec.profile.name} {spec.variant.name} s{spec.seed}"
                progress.update(index, label)
                try:
                    run = execute(spec, settings, str(ca_dir), scratch)
                except (RunError, NetemError, OSError) as exc:
                    failures.append({**_spec_dict(spec), "error": str(exc)})
                    continue
                problems = check_congestion_control(spec, run["congestion_control"])
                runs.append(
                    {
                        **_spec_dict(spec),
                        "congestion_control": run["congestion_control"],
                        "congestion_control_problems": problems,
                        "summary": summarize(spec, run, settings),
                        "handshake_s": run["raw"]["handshake"],
                        "client_connection": run["raw"]["connection"],
                        "server_connections": run["server"].get("connections", []),
                        "link_stats": run["link_stats"],
                        "errors": run["raw"]["errors"],
                    }
                )
            progress.update(len(plan), "done")
            progress.finish()
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ctrl-C, or SIGTERM/SIGHUP (terminate_as_exit): the link is torn down by now.
        # (Around the scratch directory's removal too: a signal held during it acted
        # after the loop's handler, and a finished run was lost.)
        interrupted = 130 if isinstance(exc, KeyboardInterrupt) else _exit_status(exc)
        progress.finish()
        print("interrupted; writing what was measured", file=sys.stderr)
    with signals_deferred():  # what was measured is written whole, then a signal acts
        result = assemble(args, settings, runs, failures, source)
        write_outputs(result, runs, out)
    for failure in failures:
        print(
            f"FAILED {failure['experiment']} {failure['link']} {failure['variant']} "
            f"seed {failure['seed']}: {failure['error']}",
            file=sys.stderr,
        )
    for run in runs:
        for problem in run["congestion_control_problems"]:
            print(
                f"WARNING {run['link']} {run['variant']} seed {run['seed']}: {problem}",
                file=sys.stderr,
            )
    if interrupted is not None:
        return interrupted  # (as every other command: a partial run is not a complete one)
    return 1 if failures or not runs else 0


def _exit_status(exc: SystemExit) -> int:
    """The status a SystemExit asks for (``128 + signal`` from terminate_as_exit)."""
    return exc.code if isinstance(exc.code, int) else 1


def _spec_dict(spec: RunSpec) -> dict[str, Any]:
    return {
        "experiment": spec.experiment,
        "link": spec.profile.name,
        "loss": spec.profile.loss,
        "variant": spec.variant.name,
        "transport": spec.variant.transport,
        "seed": spec.seed,
        "rtt": spec.profile.rtt,
    }


def assemble(
    args: argparse.Namespace,
    settings: Settings,
    runs: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    source: dict[str, Any],
) -> dict[str, Any]:
    """The JSON document: settings, pooled points, stall phases, every run (without samples).

    :param source: :func:`~quicmesh.bench.source_state` taken when the runs started.
    """
    points = []
    keys: list[tuple[str, str]] = []
    for run in runs:
        key = (run["link"], run["variant"])
        if run["experiment"] == "hol" and key not in keys:
            keys.append(key)
    for link, variant in keys:
        group = [
            r
            for r in runs
            if r["experiment"] == "hol" and r["link"] == link and r["variant"] == variant
        ]
        points.append(
            {"link": link, "variant": variant, "loss": group[0]["loss"], **report.aggregate(group)}
        )
    stall = []
    for run in runs:
        if run["experiment"] != "stall":
            continue
        phases = {}
        for phase in ("before", "stalled"):
            data = run["summary"][phase]
            phases[phase] = {k: v for k, v in data.items() if k != "latencies"}
        stall.append(
            {
                "variant": run["variant"],
                "congestion_control": run["congestion_control"],
                "phases": phases,
            }
        )
    return {
        "benchmark": "hol",
        "quick": bool(args.quick),
        "settings": {
            **asdict(settings),
            "bulk_flows": 1,
            "rtt": args.rtt,
            "rate_bps": args.rate,
            "queue": args.queue,
            "loss": list(args.loss),
            "interop_runner": bool(args.interop),
            "slow_threshold_ms": {run["link"]: round(2e3 * run["rtt"], 3) for run in runs},
            "kernel": os.uname().release,
            "source": source,
        },
        "points": points,
        "stall": stall,
        "runs": [
            {
                **r,
                "summary": {
                    w: {k: v for k, v in s.items() if k != "latencies"}
                    for w, s in r["summary"].items()
                },
            }
            for r in runs
        ],
        "failures": failures,
    }


def replot(out: Path) -> int:
    """Re-render ``hol.md`` and the plots of an earlier run in ``out``."""
    try:
        result = json.loads((out / "hol.json").read_text())
        with gzip.open(out / "hol-samples.json.gz", "rt") as file:
            latencies = json.load(file)
    except (OSError, ValueError) as exc:
        print(f"quicmesh bench hol: cannot read the results in {out}: {exc}", file=sys.stderr)
        return 1
    try:
        markdown = report.markdown(result)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # Not what `bench hol` writes (another file, one from an older version).
        print(
            f"quicmesh bench hol: {out / 'hol.json'} is not a result of this benchmark: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    (out / "hol.md").write_text(markdown)
    try:
        written = report.plot(result, latencies, out)
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'quicmesh[plots]')")
        written = []
    print(f"wrote {out / 'hol.md'}" + "".join(f", {p}" for p in written))
    return 0


def write_outputs(result: dict[str, Any], runs: list[dict[str, Any]], out: Path) -> None:
    """hol.json, hol.md, hol-samples.json.gz and the plots (or a note without matplotlib)."""
    (out / "hol.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "hol.md").write_text(report.markdown(result))
    latencies: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        if run["experiment"] == "hol":
            pooled = latencies.setdefault(run["link"], {}).setdefault(run["variant"], [])
            pooled += run["summary"]["measure"]["latencies"]
    with gzip.open(out / "hol-samples.json.gz", "wt") as file:
        json.dump(latencies, file)
    try:
        written = report.plot(result, latencies, out) if latencies else []
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'quicmesh[plots]')")
        written = []
    print(report.markdown(result))
    print(f"wrote {out / 'hol.json'}, {out / 'hol.md'}" + "".join(f", {p}" for p in written))
