"""``quicmesh bench attack``: good traffic through a QUIC listener under attack (issue 13).

A listener (QuicTransport with its default admission limits, echo handler) runs
in a child process; the parent sends good traffic all along, one flow of 1 KiB
every 20 ms on a pooled connection plus a fresh handshake every 0.5 s, and
records each flow's latency and failures. Each probe runs in its own attacker
process, between a baseline phase and an after phase of the same length:

* ``initials``: forged version-1 Initials (random connection IDs, nothing that
  decrypts), 10,000 in 10 s (``--quick``: 2,000 in 2 s);
* ``qpack``: 16 QPACK bombs (a 3.9 KB dynamic-table entry referenced 60,000
  times in one 60 KB header block) on one authenticated connection;
* ``churn``: one identity opening and resetting streams at 9,000/s in all
  (``--churn-rate``), from several attacker processes (``--attackers``, 3) that
  share the identity's certificate, one connection each (one Python process
  reaches about 3,000 streams/s; h2load cannot present a client certificate).
  Each attacker obeys the listener's stream credit (MAX_STREAMS), as aioquic
  does; the line it prints gives the rate offered and the streams it opened.

It prints p50/p99 of the good flows per phase, failures, the listener's CPU
and peak RSS per phase, and PASS when the during-phase p99 is within 3x of the
baseline's and no good flow failed. The machine may be shared: say so next to
any figure. With ``--sidecars`` the probes hit two full sidecars as in
examples/ instead (sidecar A outbound, sidecar B inbound over QUIC, an echo app
behind B): good traffic is a TCP flow through A every 20 ms, the attacks go to
B's QUIC port, and the CPU and RSS are sidecar B's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pylsqpack

from .. import DevCA, Identity, MeshStream, QuicTransport, _aioquic
from .._signals import scratch_directory
from .._timeouts import wait_within
from ..errors import QuicmeshError
from ..sidecar.launch import run_async, terminate_as_exit
from ..transport._stream_rate import DEFAULT_STREAM_RATE
from ..transport.base import QUIC_ENGINE_NAMES, default_quic_engine
from ..tunnel.h3 import H3TunnelSession
from . import OneLineParser, positive_integer, positive_number
from ._engine import engine_problem

TARGET = "echo.bench:1"
ATTACKER_PATH = "ns/bench/sa/attacker"
"""The attackers' SPIFFE ID path: an identity of the mesh's CA that sidecar B's
policy allows nowhere (unless ``--churn-allowed``)."""
PROBES = ("initials", "qpack", "churn")


async def _echo(stream: MeshStream) -> None:
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()
    stream.write_eof()


async def _serve(ca_dir: str, stream_rate: float) -> None:
    ca = DevCA.load(ca_dir)
    identity = ca.issue(f"spiffe://{ca.trust_domain}/ns/bench/sa/server")
    transport = QuicTransport(
        identity=identity,
        trust=ca.trust_bundle,
        max_stream_rate=stream_rate or None,
    )
    listener = await transport.listen(("127.0.0.1", 0), _echo)
    print(listener.address[1], flush=True)
    while True:
        await asyncio.sleep(1)
        print(
            f"counters {dict((k, v) for k, v in transport.counters.items() if v)}",
            file=sys.stderr,
            flush=True,
        )


def _prefix_int(value: int, prefix: int, first: int = 0) -> bytes:
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes([first | value])
    out = [first | mask]
    value -= mask
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint(value: int) -> bytes:
    if value < 64:
        return bytes([value])
    if value < 16384:
        return (value | 0x4000).to_bytes(2, "big")
    return (value | 0x80000000).to_bytes(4, "big")


QPACK_TABLE_CAPACITY = 4096
"""The dynamic-table capacity a bomb sets (the most quicmesh's decoder allows)."""


def qpack_bomb(entry: int = 3900, references: int = 60000) -> tuple[bytes, bytes]:
    """Encoder-stream bytes inserting one ``entry``-byte field, and an HTTP/3 HEADERS
    frame (``:method CONNECT``, ``:authority x:1``) referring to it ``references`` times."""
    insert, block = qpack_bomb_block(entry, references)
    return insert, _varint(1) + _varint(len(block)) + block


def qpack_bomb_block(entry: int, references: int) -> tuple[bytes, bytes]:
    """The encoder-stream bytes and the bare header block of :func:`qpack_bomb`."""
    insert = _prefix_int(QPACK_TABLE_CAPACITY, 5, 0x20)  # Set Dynamic Table Capacity
    insert += _prefix_int(6, 5, 0x40) + b"x-bomb"  # Insert with Literal Name
    insert += _prefix_int(entry, 7) + b"a" * entry
    # Required Insert Count 1 (encoded 2), base 1; :method CONNECT (static 15);
    # :authority (static 0) with a literal value; then the indexed references.
    block = _prefix_int(2, 8) + b"\x00" + bytes([0xC0 | 15])
    block += _prefix_int(0, 4, 0x50) + _prefix_int(3, 7) + b"x:1"
    block += b"\x80" * references
    return insert, block


def forged_initial(rng: random.Random, size: int = 1200) -> bytes:
    """A version-1 Initial header with random connection IDs; nothing decrypts."""
    head = bytes([0xC3]) + (1).to_bytes(4, "big")
    head += bytes([8]) + rng.randbytes(8) + bytes([8]) + rng.randbytes(8) + b"\x00"
    remaining = size - len(head) - 2
    return head + (remaining | 0x4000).to_bytes(2, "big") + rng.randbytes(remaining)


async def _attack(
    probe: str, port: int, ca_dir: str, duration: float, count: int, target: str = TARGET
) -> None:
    address = ("127.0.0.1", port)
    if probe == "initials":
        rng = random.Random(13)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        start = time.monotonic()
        for index in range(count):
            sock.sendto(forged_initial(rng), address)
            delay = start + duration * (index + 1) / count - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        print(f"sent {count} forged Initials", flush=True)
        return
    ca = DevCA.load(ca_dir)
    identity = Identity.from_files(Path(ca_dir) / "attacker.pem", Path(ca_dir) / "attacker.key")
    # The qpack and churn attackers write frames straight into aioquic's connection
    # (conn.quic), so they run on aioquic whatever the default engine; the listener
    # and the good traffic run on the default one.
    attacker = QuicTransport(identity=identity, trust=ca.trust_bundle, engine="aioquic")
    conn = await attacker.connect(address)
    if probe == "qpack":
        quic = conn.quic
        insert, frame = qpack_bomb()
        session = cast(H3TunnelSession, conn.session)
        encoder_stream = session.h3._local_encoder_stream_id
        assert encoder_stream is not None
        quic.send_stream_data(encoder_stream, insert)
        for _ in range(count):
            quic.send_stream_data(quic.get_next_available_stream_id(), frame)
            conn.transmit()
            await asyncio.sleep(duration / count)
        print(f"sent {count} QPACK bombs", flush=True)
        await asyncio.sleep(1)
        return
    # Rapid reset, as HTTP/2's CVE-2023-44487: every 10 ms, send a CONNECT
    # HEADERS frame (and a byte) on each new stream the credit allows, and reset
    # the streams of the previous tick. Frames are queued straight into the QUIC
    # connection and go out packed many to a datagram, so one process can offer
    # 9,000 streams/s. Like any aioquic client it sends no stream beyond the
    # listener's MAX_STREAMS: what it could not open is counted as held back.
    quic = conn.quic
    # The connection's stream scheduler shows aioquic's packet writer only the streams
    # it was told about (quicmesh._aioquic.ActiveStreamScheduler): a reset or
    # STOP_SENDING queued straight into aioquic must be announced to it, or the frame
    # never leaves and the listener never frees the stream's slot.
    scheduler = cast(H3TunnelSession, conn.session).scheduler
    encoder = pylsqpack.Encoder()
    _, block = encoder.encode(0, [(b":method", b"CONNECT"), (b":authority", target.encode())])
    frame = _varint(1) + _varint(len(block)) + block + _varint(0) + _varint(1) + b"x"
    opened = held = 0
    previous: list[int] = []
    start = time.monotonic()
    deadline = start + duration
    tick = 0.01
    while (now := time.monotonic()) < deadline:
        for stream_id in previous:
            # H3_REQUEST_CANCELLED, both ways; a stream the listener already
            # refused and finished is gone.
            with contextlib.suppress(ValueError, RuntimeError):
                quic.reset_stream(stream_id, 0x10C)
            with contextlib.suppress(ValueError, RuntimeError):
                quic.stop_stream(stream_id, 0x10C)
            scheduler.activate(stream_id)
        previous = []
        due = int((now - start) * count) - opened - held
        for _ in range(max(0, due)):
            stream_id = quic.get_next_available_stream_id()
            if not _aioquic.can_open_bidi_stream(quic):
                held += 1
                continue
            quic.send_stream_data(stream_id, frame)
            previous.append(stream_id)
            opened += 1
        conn.transmit()
        await asyncio.sleep(tick)
    print(
        f"offered {count:.0f}/s, opened {opened} streams ({opened / duration:.0f}/s),"
        f" {held} held back by the listener's stream credit",
        flush=True,
    )


@dataclass
class Phase:
    """Good traffic during one phase."""

    name: str
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    handshakes: int = 0
    cpu: float = 0.0
    rss: int = 0
    lag: float | None = None
    """(--sidecars) The largest event-loop delay sidecar B reported, seconds."""
    cuts: int = 0
    """(--sidecars) Rate cuts sidecar B's overload action made during the phase."""

    def quantile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _proc_cpu_rss(pid: int) -> tuple[float, int]:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{pid}/status") as status:
            rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        return cpu, rss * 1024
    except (OSError, StopIteration, IndexError, ValueError):
        return 0.0, 0


async def _good_traffic(
    phase: Phase, client: QuicTransport, conn: object, port: int, seconds: float, pid: int
) -> None:
    loop = asyncio.get_running_loop()
    cpu_before, _ = _proc_cpu_rss(pid)
    end = loop.time() + seconds
    payload = os.urandom(1024)
    next_handshake = loop.time()
    tasks: list[asyncio.Task[None]] = []

    async def one_flow() -> None:
        started = loop.time()
        try:
            stream = await wait_within(conn.open_stream(TARGET), 5)  # type: ignore[attr-defined]
            stream.write(payload)
            stream.write_eof()
            data = await wait_within(stream.read(), 5)
            if data != payload:
                raise ValueError("corrupted echo")
            phase.latencies.append(loop.time() - started)
        except Exception:
            phase.failures += 1

    async def one_handshake() -> None:
        try:
            fresh = await client.connect(("127.0.0.1", port), timeout=5)
            fresh.close()
            phase.handshakes += 1
        except Exception:
            phase.failures += 1

    while loop.time() < end:
        tasks.append(loop.create_task(one_flow()))
        if loop.time() >= next_handshake:
            tasks.append(loop.create_task(one_handshake()))
            next_handshake += 0.5
        await asyncio.sleep(0.02)
        phase.rss = max(phase.rss, _proc_cpu_rss(pid)[1])
    await asyncio.gather(*tasks)
    phase.cpu = _proc_cpu_rss(pid)[0] - cpu_before


async def _overload_of(admin_port: int) -> dict[str, Any]:
    """Sidecar B's inbound overload view from its admin ``/stats`` (empty if unreadable)."""
    try:
        reader, writer = await wait_within(asyncio.open_connection("127.0.0.1", admin_port), 2)
        try:
            writer.write(b"GET /stats HTTP/1.0\r\nHost: b\r\n\r\n")
            raw = await wait_within(reader.read(), 2)
        finally:
            writer.close()
        stats = json.loads(raw.partition(b"\r\n\r\n")[2])
        for listener in stats["listeners"].values():
            if "overload" in listener:
                return cast(dict[str, Any], listener["overload"])
    except (OSError, TimeoutError, ValueError, KeyError):
        pass
    return {}


async def _good_tcp_traffic(
    phase: Phase, port: int, seconds: float, pid: int, admin_port: int
) -> None:
    """Good flows through sidecar A: a new TCP connection to its outbound
    listener every 20 ms, 1 KiB echoed by the app behind sidecar B; sidecar B's
    event-loop delay read from its admin endpoint every half second."""
    loop = asyncio.get_running_loop()
    cpu_before, _ = _proc_cpu_rss(pid)
    cuts_before = (await _overload_of(admin_port)).get("rate_cuts", 0)
    next_poll = loop.time() + 0.5
    end = loop.time() + seconds
    payload = os.urandom(1024)
    tasks: list[asyncio.Task[None]] = []

    async def one_flow() -> None:
        started = loop.time()
        try:
            reader, writer = await wait_within(asyncio.open_connection("127.0.0.1", port), 5)
            try:
                writer.write(payload)
                writer.write_eof()
                data = await wait_within(reader.read(), 5)
            finally:
                writer.close()
            if data != payload:
                raise ValueError("corrupted echo")
            phase.latencies.append(loop.time() - started)
        except Exception:
            phase.failures += 1

    async def poll() -> None:
        overload = await _overload_of(admin_port)
        if "loop_lag" in overload:
            phase.lag = max(phase.lag or 0.0, overload["loop_lag"])
            phase.cuts = overload.get("rate_cuts", 0) - cuts_before

    while loop.time() < end:
        tasks.append(loop.create_task(one_flow()))
        if loop.time() >= next_poll:
            next_poll += 0.5
            tasks.append(loop.create_task(poll()))
        await asyncio.sleep(0.02)
        phase.rss = max(phase.rss, _proc_cpu_rss(pid)[1])
    await asyncio.gather(*tasks)
    await poll()
    phase.cpu = _proc_cpu_rss(pid)[0] - cpu_before


async def _run_sidecar_probe(probe: str, args: argparse.Namespace, workdir: Path) -> list[Phase]:
    """The probe against two sidecars as in examples/ (A outbound, B inbound
    QUIC, an echo app behind B): good traffic through A, attacks on B's port."""
    from ..demo import Ports as DemoPorts
    from ..demo import echo_app, sidecar_configs
    from ..sidecar.launch import LOOPBACK, SidecarProcess

    app = await asyncio.start_server(echo_app, LOOPBACK, 0)
    sidecars: list[SidecarProcess] = []
    try:
        for attempt in range(3):
            # free_port() numbers can be taken by another process before a sidecar
            # binds them (a busy machine): start again with new ones.
            ports = DemoPorts(echo_app=app.sockets[0].getsockname()[1], http_app=1)
            options = argparse.Namespace(transport="quic", congestion_control=None)
            config_a, config_b = sidecar_configs(options, ports, str(workdir))
            inbound = config_b["listeners"]["inbound"][0]
            inbound["max_stream_rate"] = int(args.max_stream_rate or 1000000)
            # Both sidecars' QUIC on the chosen engine (B's listener, A's clusters).
            inbound["engine"] = args.engine
            for cluster in config_a["clusters"]:
                cluster["engine"] = args.engine
            if args.max_loop_lag is not None:
                inbound["overload_max_loop_lag"] = f"{args.max_loop_lag:g}ms"
            if args.churn_allowed:
                # The attacker's identity may reach the echo app: its streams are
                # forwarded (a TCP connection to the app each) before it resets them.
                args.target = f"{LOOPBACK}:{ports.echo_app}"
                attacker_id = f"spiffe://{DevCA.load(str(workdir)).trust_domain}/{ATTACKER_PATH}"
                inbound["policies"].append({"identity": attacker_id, "destinations": [args.target]})
            sidecar_b = SidecarProcess(f"sidecar-b-{probe}-{attempt}", config_b, workdir)
            sidecar_a = SidecarProcess(f"sidecar-a-{probe}-{attempt}", config_a, workdir)
            sidecars += [sidecar_a, sidecar_b]
            try:
                sidecar_b.start()
                sidecar_a.start()
                await asyncio.to_thread(sidecar_b.wait_ready)
                await asyncio.to_thread(sidecar_a.wait_ready)
                break
            except QuicmeshError:
                _stop(sidecar_a, sidecar_b)
                if attempt == 2:
                    raise
        assert sidecar_b.process is not None
        pid = sidecar_b.process.pid

        async def good(phase: Phase, seconds: float) -> None:
            await _good_tcp_traffic(phase, ports.echo_a, seconds, pid, ports.admin_b)

        phases = await _probe_phases(probe, args, workdir, ports.tunnel_b, good)
        samples = await asyncio.to_thread(sidecar_b.metrics)
        counts = {
            dict(labels)["event"]: int(value)
            for (name, labels), value in samples.items()
            if name == "quicmesh_listener_quic_admission_total" and value
        }
        print(f"  sidecar B ({args.engine}) admission: {counts or 'nothing counted'}")
        return phases
    finally:
        _stop(*sidecars)
        app.close()


def _stop(*sidecars: Any) -> None:
    for sidecar in sidecars:
        if sidecar.process is not None and sidecar.process.poll() is None:
            sidecar.process.kill()
        if sidecar.process is not None:
            sidecar.process.wait()


async def _probe_phases(
    probe: str,
    args: argparse.Namespace,
    workdir: Path,
    port: int,
    good: Callable[[Phase, float], Awaitable[None]],
) -> list[Phase]:
    """Good traffic before, during (the attacker processes running) and after."""
    phases = [Phase("before"), Phase("during"), Phase("after")]
    await good(phases[0], args.phase)
    count = {"initials": args.initials, "qpack": 16, "churn": 0}[probe]
    processes = args.attackers if probe == "churn" else 1
    if probe == "churn":
        count = int(args.churn_rate / processes)
    attackers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "quicmesh.bench.attack",
            "--role",
            "attacker",
            "--probe",
            probe,
            "--port",
            str(port),
            "--ca",
            str(workdir),
            "--duration",
            str(args.attack),
            "--count",
            str(count),
            "--target",
            args.target,
            stdout=asyncio.subprocess.PIPE,
            # A remote attacker spends none of the node's CPU: here it shares the
            # machine, so it yields to the processes under test (--attacker-nice).
            preexec_fn=lambda: os.nice(args.attacker_nice),
            # Stopped by this process, not by a Ctrl-C meant for it (a child in its
            # start-up printed "Fatal Python error"; one signalled alone ran on).
            start_new_session=True,
        )
        for _ in range(processes)
    ]
    opened = 0
    try:
        await good(phases[1], args.attack)
        for attacker in attackers:
            output, _ = await attacker.communicate()
            line = " ".join(output.decode().split("\n")).strip()
            print(f"  attacker: {line}, nice {args.attacker_nice}")
            if match := re.search(r"opened (\d+) streams", line):
                opened += int(match.group(1))
    finally:
        for attacker in attackers:
            if attacker.returncode is None:
                attacker.kill()
                await attacker.wait()  # (not left to the loop's end: "Event loop is closed")
    if probe == "churn":
        print(
            f"  one identity, {processes} connections: offered {args.churn_rate:.0f}/s,"
            f" opened {opened / args.attack:.0f}/s"
            + (
                (" (allowed to the echo app)" if args.churn_allowed else " (allowed nowhere)")
                if args.sidecars
                else ""
            )
        )
    await good(phases[2], args.phase)
    return phases


async def _run_probe(probe: str, args: argparse.Namespace, workdir: Path) -> list[Phase]:
    if args.sidecars:
        return await _run_sidecar_probe(probe, args, workdir)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "quicmesh.bench.attack",
            "--role",
            "server",
            "--ca",
            str(workdir),
            "--max-stream-rate",
            str(args.max_stream_rate),
        ],
        stdout=subprocess.PIPE,
        stderr=open(workdir / "server.stderr.log", "wb"),  # noqa: SIM115 (the child's now)
        text=True,
        start_new_session=True,  # (stopped by this process, as the attackers)
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        if not first.strip().isdigit():
            code = server.wait()
            lines = (workdir / "server.stderr.log").read_text(errors="replace").splitlines()
            last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
            raise QuicmeshError(f"the listener process exited with {code}: {last}")
        port = int(first)
        ca = DevCA.load(workdir)
        client = QuicTransport(
            identity=ca.issue(f"spiffe://{ca.trust_domain}/ns/bench/sa/good"), trust=ca.trust_bundle
        )
        conn = await client.connect(("127.0.0.1", port))

        async def good(phase: Phase, seconds: float) -> None:
            await _good_traffic(phase, client, conn, port, seconds, server.pid)

        phases = await _probe_phases(probe, args, workdir, port, good)
        conn.close()
        return phases
    finally:
        server.kill()
        server.wait()


MAX_STREAM_RATE = 1_000_000.0
"""The largest ``--max-stream-rate`` (streams/s per identity)."""


def _number_in(low: float, high: float, *, integer: bool = False) -> Callable[[str], float]:
    """An ``argparse`` type: a finite number (a whole one with ``integer``) within
    ``low``..``high`` (``nan`` and negatives ended in a traceback in the child)."""

    def convert(text: str) -> float:
        try:
            value: float = int(text) if integer else float(text)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        if math.isnan(value) or not low <= value <= high or math.isinf(value):
            upper = "" if math.isinf(high) else f" and at most {high:g}"
            raise argparse.ArgumentTypeError(f"must be at least {low:g}{upper}, not {text!r}")
        return value

    return convert


def main(argv: list[str]) -> int:
    """Run the probes (or one side of them, with ``--role``)."""
    parser = OneLineParser(prog="quicmesh bench attack", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s phases, 2,000 Initials")
    parser.add_argument("--probe", choices=PROBES, action="append", help="(repeatable) default all")
    parser.add_argument(
        "--phase",
        type=positive_number,
        help="seconds before and after (default 5; --quick 2)",
    )
    parser.add_argument(
        "--attack", type=positive_number, help="seconds of attack (default 10; --quick 2)"
    )
    parser.add_argument(
        "--initials",
        type=_number_in(0, 10**9, integer=True),
        help="Initial packets the flood sends (default 10000; --quick 2000)",
    )
    parser.add_argument(
        "--churn-rate",
        type=positive_number,
        default=9000.0,
        help="streams/s one identity offers in all (default 9000)",
    )
    parser.add_argument(
        "--attackers",
        type=positive_integer,
        default=1,
        help="churn attacker processes (default 1)",
    )
    parser.add_argument(
        "--churn-allowed",
        action="store_true",
        help="(--sidecars) sidecar B's policy lets the churning identity reach the echo app, so"
        " its streams are forwarded before it resets them (default: the policy allows it"
        " nowhere and each stream is refused with 403)",
    )
    parser.add_argument(
        "--max-stream-rate",
        type=_number_in(0, MAX_STREAM_RATE),
        default=DEFAULT_STREAM_RATE,
        help="the listener's max_stream_rate: new streams/s per identity (0: unlimited;"
        f" default {DEFAULT_STREAM_RATE:g})",
    )
    parser.add_argument(
        "--attacker-nice",
        type=_number_in(0, 19, integer=True),
        default=19,
        metavar="N",
        help="niceness of the attacker processes (default 19: a remote attacker costs the"
        " node no CPU; 0 to let it compete with the sidecars for this machine's cores)",
    )
    parser.add_argument(
        "--max-loop-lag",
        type=_number_in(0, math.inf),
        metavar="MS",
        help="(--sidecars) sidecar B's overload_max_loop_lag in ms (0: off; default: the"
        " sidecar's, 50 ms)",
    )
    parser.add_argument(
        "--sidecars",
        action="store_true",
        help="attack two full sidecars as in examples/ (good traffic: TCP through A to an"
        " echo app behind B; probes on B's QUIC port) instead of a bare QUIC listener",
    )
    default_engine = default_quic_engine()
    parser.add_argument(
        "--engine",
        choices=QUIC_ENGINE_NAMES,
        default=default_engine,
        help="(--sidecars) the QUIC engine of both sidecars (B's listener, A's clusters;"
        f" default here: {default_engine}); the attackers stay aioquic clients",
    )
    parser.add_argument(
        "--role", choices=("bench", "server", "attacker"), default="bench", help=argparse.SUPPRESS
    )  # (the benchmark's own child processes)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", default=TARGET, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "server":
        asyncio.run(_serve(args.ca, args.max_stream_rate))
        return 0
    if args.role == "attacker":
        asyncio.run(
            _attack(args.probe[0], args.port, args.ca, args.duration, args.count, args.target)
        )
        print(f"(attacker CPU {time.process_time():.2f} s)", flush=True)
        return 0
    problem = engine_problem(args.engine)
    if args.churn_allowed and not args.sidecars:
        problem = "--churn-allowed applies to --sidecars only"
    if problem is not None:
        print(f"quicmesh bench attack: {problem}", file=sys.stderr)
        return 2
    # --quick gives defaults; a value given explicitly stays (as in ``bench xds``).
    for option, default, quick_default in (
        ("phase", 5.0, 2.0),
        ("attack", 10.0, 2.0),
        ("initials", 10000, 2000),
    ):
        if getattr(args, option) is None:
            setattr(args, option, quick_default if args.quick else default)
    probes = args.probe or list(PROBES)
    who = "sidecar B" if args.sidecars else "listener"
    failed = False
    # ``kill PID`` (SIGTERM) and SIGHUP become SystemExit, 128 + the signal (while a
    # probe runs they cancel it first, run_async): the probe's finally blocks stop the
    # listener, the attackers and the sidecars, and the scratch directory with the CA's
    # private key goes (the signal's default left both).
    with terminate_as_exit(), scratch_directory("quicmesh-bench-attack-") as workdir:
        ca = DevCA()
        ca.save(workdir)
        ca.issue(f"spiffe://{ca.trust_domain}/{ATTACKER_PATH}").save(
            workdir / "attacker.pem", workdir / "attacker.key"
        )
        for probe in probes:
            print(f"probe {probe}:")
            try:
                phases = run_async(_run_probe(probe, args, workdir))
            except QuicmeshError as exc:
                print(f"quicmesh bench attack: probe {probe}: {exc}", file=sys.stderr)
                return 1
            for phase in phases:
                print(
                    f"  {phase.name:<7} flows {len(phase.latencies):4d}  failures {phase.failures}"
                    f"  handshakes {phase.handshakes:3d}  p50 {phase.quantile(0.5):7.2f} ms"
                    f"  p99 {phase.quantile(0.99):7.2f} ms  {who} CPU {phase.cpu:5.2f} s"
                    f"  peak RSS {phase.rss / 2**20:6.1f} MiB"
                    + (
                        f"  loop lag {phase.lag * 1000:5.0f} ms  rate cuts {phase.cuts}"
                        if phase.lag is not None
                        else ""
                    )
                )
            base, during = phases[0].quantile(0.99), phases[1].quantile(0.99)
            ratio = during / base if base else float("inf")
            failures = sum(p.failures for p in phases)
            ok = ratio <= 3.0 and failures == 0
            failed |= not ok
            verdict = "PASS" if ok else "FAIL"
            print(f"  {verdict}: p99 during/before {ratio:.2f}x (target <= 3x), {failures} failed")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average {load} (1/5/15 min; the machine may be shared)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
