"""``quicmesh demo``: the tunnel end to end on loopback, no files needed.

Builds a development CA, then runs on 127.0.0.1:

    clients --TCP--> sidecar A (outbound) ==QUIC/H2/TCP mTLS==> sidecar B (inbound) --TCP--> app

The app echoes each flow back; every client checks that what comes back is
byte-for-byte what it sent. Prints progress and a summary table, and exits 0
only if every byte of every flow arrived intact.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

from . import TRANSPORTS, DevCA, MeshStream, splice
from .errors import QuicmeshError

TARGET_HOST = "reviews.default.svc"


@dataclass
class DemoStats:
    """Counters the demo prints at the end."""

    flows_ok: int = 0
    flows_failed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _echo_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    writer.close()


async def _demo(args: argparse.Namespace) -> DemoStats:
    ca = DevCA()
    ident_a = ca.issue("spiffe://mesh.local/ns/default/sa/productpage")
    ident_b = ca.issue("spiffe://mesh.local/ns/default/sa/reviews")
    transport_cls = TRANSPORTS[args.transport]
    extra = {"congestion_control": args.congestion_control} if args.transport == "quic" else {}

    app = await asyncio.start_server(_echo_app, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    target = f"{TARGET_HOST}:{app_port}"

    async def inbound(stream: MeshStream) -> None:
        # Sidecar B: only the app's port is an allowed destination.
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", app_port)
        except OSError as exc:
            stream.refuse(502, f"cannot reach the app: {exc.strerror}")
            return
        await splice(stream, reader, writer)

    def authorize(peer: str, dest: str) -> bool:
        return peer == ident_a.spiffe_id and dest == target

    b_transport = transport_cls(identity=ident_b, trust=ca.trust_bundle, **extra)
    listener = await b_transport.listen(("127.0.0.1", 0), inbound, authorize=authorize)
    a_transport = transport_cls(identity=ident_a, trust=ca.trust_bundle, **extra)
    peer = await a_transport.connect(listener.address)

    async def outbound(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Sidecar A: every accepted TCP connection becomes one tunnelled flow.
        try:
            stream = await peer.open_stream(target, headers={"x-quicmesh-demo": "1"})
        except QuicmeshError:
            writer.transport.abort()
            return
        await splice(stream, reader, writer)

    sidecar_a = await asyncio.start_server(outbound, "127.0.0.1", 0)
    a_port = sidecar_a.sockets[0].getsockname()[1]
    print(
        f"app 127.0.0.1:{app_port}  sidecar B {args.transport} "
        f"{listener.address[0]}:{listener.address[1]}"
        f"  sidecar A tcp 127.0.0.1:{a_port}  peer {peer.peer_identity}",
        flush=True,
    )

    stats = DemoStats()
    deadline = time.monotonic() + args.duration

    async def client(index: int) -> None:
        while time.monotonic() < deadline:
            payload = os.urandom(args.size)
            start = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", a_port)
                writer.write(payload)
                writer.write_eof()
                echoed = await reader.read(-1)
                writer.close()
            except OSError as exc:
                stats.flows_failed += 1
                stats.errors.append(f"flow {index}: {exc}")
                continue
            stats.bytes_sent += len(payload)
            stats.bytes_received += len(echoed)
            if hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest():
                stats.flows_ok += 1
                stats.latencies.append(time.monotonic() - start)
            else:
                stats.flows_failed += 1
                stats.errors.append(
                    f"flow {index}: {len(echoed)} of {len(payload)} bytes came back intact"
                )

    async def progress() -> None:
        while True:
            await asyncio.sleep(1.0)
            print(
                f"  flows ok {stats.flows_ok:6d}  failed {stats.flows_failed}  "
                f"MB echoed {stats.bytes_received / 1e6:8.1f}",
                flush=True,
            )

    reporter = asyncio.ensure_future(progress())
    try:
        await asyncio.gather(*(client(i) for i in range(args.flows)))
    finally:
        reporter.cancel()
    conn_stats = peer.stats()
    peer.close()
    await peer.wait_closed()
    sidecar_a.close()
    listener.close()
    await listener.wait_closed()
    app.close()
    print_summary(args, stats, conn_stats)
    return stats


def print_summary(
    args: argparse.Namespace, stats: DemoStats, conn_stats: dict[str, object]
) -> None:
    """The closing table."""
    lat = sorted(stats.latencies)
    p50 = statistics.median(lat) * 1000 if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
    rows = [
        ("transport", args.transport),
        ("flows ok / failed", f"{stats.flows_ok} / {stats.flows_failed}"),
        ("bytes sent / echoed", f"{stats.bytes_sent} / {stats.bytes_received}"),
        ("flow latency p50 / p99", f"{p50:.1f} ms / {p99:.1f} ms"),
        ("streams on the peer connection", str(conn_stats.get("streams_opened", "?"))),
        ("packets lost", str(conn_stats.get("packets_lost", "n/a"))),
        ("0-RTT / migrations", "0 / 0 (not yet implemented)"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for error in stats.errors[:5]:
        print(f"  error: {error}")


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 only if every flow came back intact."""
    if args.flows < 1 or args.duration <= 0 or args.size < 1:
        print("quicmesh demo: --flows, --duration and --size must be positive", file=sys.stderr)
        return 2
    stats = asyncio.run(_demo(args))
    ok = stats.flows_failed == 0 and stats.flows_ok > 0 and stats.bytes_sent == stats.bytes_received
    print("\nresult:", "every byte arrived intact" if ok else "FAILED: some flows lost bytes")
    return 0 if ok else 1
