"""``quicmesh demo``: two real sidecar processes on loopback, no files needed.

Writes a development CA and two sidecar configurations into a temporary
directory, then runs on 127.0.0.1::

    TCP clients  --> sidecar A (outbound) ==QUIC|H2|TCP mTLS==> sidecar B (inbound) --> echo app
    HTTP clients --> sidecar A (outbound) ==QUIC|H2|TCP mTLS==> sidecar B (inbound) --> HTTP app

Sidecars A and B are ``quicmesh sidecar -c FILE`` child processes. Concurrent
TCP flows send random bytes that the echo app returns; an HTTP client
(``http.client``) posts bodies the HTTP app echoes and fetches generated bodies
it can verify. Progress is printed every second; the summary table comes from
the clients' own measurements and from the sidecars' ``/metrics``. The demo
exits 0 only if every byte of every flow and request arrived intact and both
sidecars drained cleanly.

Over QUIC the demo also shows the two things QUIC adds: halfway through the
load, sidecar A's peer connections migrate to new local ports (``POST
/migrate``) with flows in flight; and for the last part of the run sidecar A is
restarted (drained, exit 0, started again) and reconnects with 0-RTT from the
session tickets it kept in its ticket cache file (both apps are replay-safe, so
its clusters set ``early_data: true``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import http.server
import json
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ._signals import scratch_directory
from .errors import QuicmeshError
from .sidecar.launch import (
    LOOPBACK,
    HandlerTasks,
    SidecarProcess,
    free_ports,
    metric,
    run_async,
    terminate_as_exit,
)
from .tls import DevCA

IDENTITY_A = "spiffe://mesh.local/ns/default/sa/productpage"
IDENTITY_B = "spiffe://mesh.local/ns/default/sa/reviews"


@dataclass
class Tally:
    """What one kind of client achieved."""

    ok: int = 0
    failed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        """Count a failed flow or request."""
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(message)


# -- the applications behind sidecar B -------------------------------------------


async def echo_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def blob(size: int, seed: int) -> bytes:
    """The body ``GET /blob?size=N&seed=S`` returns: reproducible by the client."""
    return random.Random(seed).randbytes(size)


class HttpApp(http.server.BaseHTTPRequestHandler):
    """``POST /echo`` returns the body; ``GET /blob?size=N&seed=S`` returns :func:`blob`."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self._reply(body)

    def do_GET(self) -> None:
        query = dict(p.split("=", 1) for p in self.path.partition("?")[2].split("&") if "=" in p)
        self._reply(blob(int(query.get("size", "0")), int(query.get("seed", "0"))))

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-sha256", hashlib.sha256(body).hexdigest())
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


# -- configurations --------------------------------------------------------------


@dataclass
class Ports:
    """Every loopback port the demo uses."""

    echo_app: int
    http_app: int
    admin_a: int = 0
    admin_b: int = 0
    tunnel_b: int = 0
    echo_a: int = 0
    http_a: int = 0

    def __post_init__(self) -> None:
        # Those not given (0), chosen together: one at a time, two could be the same.
        names = [
            n
            for n in ("admin_a", "admin_b", "tunnel_b", "echo_a", "http_a")
            if not getattr(self, n)
        ]
        for name, port in zip(names, free_ports(len(names)), strict=True):
            setattr(self, name, port)


def sidecar_configs(
    args: argparse.Namespace, ports: Ports, ca_dir: str, ticket_cache: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The configurations of sidecar A (outbound) and sidecar B (inbound).

    :param ticket_cache: (QUIC) the file where A keeps its session tickets; its
        clusters then send 0-RTT (both demo apps are safe to replay).
    """
    echo_target = f"{LOOPBACK}:{ports.echo_app}"
    http_target = f"{LOOPBACK}:{ports.http_app}"
    b = {
        "node": {"name": "sidecar-b", "identity": IDENTITY_B},
        "tls": {"ca_dir": ca_dir},
        "admin": {"address": f"{LOOPBACK}:{ports.admin_b}"},
        "drain": {"grace_period": "10s"},
        "listeners": {
            "inbound": [
                {
                    "name": "mesh",
                    "address": f"{LOOPBACK}:{ports.tunnel_b}",
                    "transports": [args.transport],
                    "destinations": [echo_target, http_target],
                    "policies": [
                        {"identity": IDENTITY_A, "destinations": [echo_target, http_target]}
                    ],
                }
            ]
        },
    }

    if ticket_cache is not None and args.transport == "quic":
        (inbound,) = cast(dict[str, Any], b["listeners"])["inbound"]
        inbound["engine"] = "aioquic"  # counts the tickets it issues and redeems

    def cluster(name: str, target: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "name": name,
            "transport": args.transport,
            "target": target,
            "endpoints": [f"{LOOPBACK}:{ports.tunnel_b}"],
            "load_balancing": "least_request",
            "health_check": {"interval": "2s", "timeout": "1s"},
            "circuit_breakers": {"max_concurrent_streams": 4096, "max_pending_opens": 4096},
        }
        if args.transport == "quic":
            if args.congestion_control is not None:  # None: the host's TCP default
                config["congestion_control"] = args.congestion_control
            config["early_data"] = ticket_cache is not None
            if ticket_cache is not None:
                # The ticket file is aioquic's: the native engine keeps a client's
                # tickets in memory (docs/design.md).
                config["engine"] = "aioquic"
        return config

    tls_a: dict[str, str] = {"ca_dir": ca_dir}
    if ticket_cache is not None and args.transport == "quic":
        tls_a["ticket_cache"] = ticket_cache
    a = {
        "node": {"name": "sidecar-a", "identity": IDENTITY_A},
        "tls": tls_a,
        "admin": {"address": f"{LOOPBACK}:{ports.admin_a}"},
        "drain": {"grace_period": "10s"},
        "listeners": {
            "outbound": [
                {"name": "echo", "address": f"{LOOPBACK}:{ports.echo_a}", "cluster": "echo"},
                {"name": "web", "address": f"{LOOPBACK}:{ports.http_a}", "cluster": "web"},
            ]
        },
        "clusters": [cluster("echo", echo_target), cluster("web", http_target)],
    }
    return a, b


# -- the load --------------------------------------------------------------------


async def _tcp_client(port: int, size: int, deadline: float, tally: Tally) -> None:
    while time.monotonic() < deadline:
        payload = os.urandom(size)
        start = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(payload)
            writer.write_eof()
            echoed = await reader.read(-1)
            writer.close()
        except OSError as exc:
            tally.fail(f"tcp flow: {exc}")
            continue
        tally.bytes_sent += len(payload)
        tally.bytes_received += len(echoed)
        if echoed == payload:
            tally.ok += 1
            tally.latencies.append(time.monotonic() - start)
        else:
            tally.fail(f"tcp flow: {len(echoed)} of {len(payload)} bytes came back intact")


def _http_request(port: int, size: int, index: int) -> tuple[int, int, str]:
    """One HTTP request through sidecar A; returns bytes sent, received, and an error."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        if index % 2:
            body = os.urandom(size)
            conn.request("POST", "/echo", body=body, headers={"connection": "close"})
            expected = body
        else:
            seed = random.randrange(1 << 30)
            conn.request("GET", f"/blob?size={size}&seed={seed}", headers={"connection": "close"})
            body, expected = b"", blob(size, seed)
        response = conn.getresponse()
        received = response.read()
    finally:
        conn.close()
    if response.status != 200:
        return len(body), len(received), f"status {response.status}"
    if (
        received != expected
        or response.getheader("x-sha256") != hashlib.sha256(expected).hexdigest()
    ):
        return len(body), len(received), f"body of {len(received)} bytes does not match"
    return len(body), len(received), ""


async def _http_client(port: int, size: int, deadline: float, tally: Tally) -> None:
    index = 0
    while time.monotonic() < deadline:
        index += 1
        start = time.monotonic()
        try:
            sent, received, error = await asyncio.to_thread(_http_request, port, size, index)
        except (OSError, http.client.HTTPException) as exc:
            tally.fail(f"http request: {exc or type(exc).__name__}")
            continue
        tally.bytes_sent += sent
        tally.bytes_received += received
        if error:
            tally.fail(f"http request: {error}")
        else:
            tally.ok += 1
            tally.latencies.append(time.monotonic() - start)


async def _progress(flows: Tally, requests: Tally, started: float) -> None:
    while True:
        await asyncio.sleep(1.0)
        moved = (flows.bytes_received + requests.bytes_received) / 1e6
        print(
            f"  {time.monotonic() - started:5.1f}s  tcp flows ok {flows.ok:6d}"
            f" failed {flows.failed}"
            f"  http requests ok {requests.ok:5d} failed {requests.failed}  MB back {moved:8.1f}",
            flush=True,
        )


async def _load(
    args: argparse.Namespace, ports: Ports, seconds: float, flows: Tally, requests: Tally
) -> None:
    """Run every client for ``seconds``; each finishes the flow or request it is in."""
    deadline = time.monotonic() + seconds
    await asyncio.gather(
        *(_tcp_client(ports.echo_a, args.size, deadline, flows) for _ in range(args.flows)),
        *(
            _http_client(ports.http_a, args.size, deadline, requests)
            for _ in range(_http_workers(args))
        ),
    )


async def _migrate_after(sidecar: SidecarProcess, delay: float, outcome: dict[str, Any]) -> None:
    """``POST /migrate`` on ``sidecar`` after ``delay`` seconds, while clients are busy."""
    await asyncio.sleep(delay)
    status, body = await asyncio.to_thread(sidecar.request, "POST", "/migrate")
    report = json.loads(body) if status == 200 else {}
    outcome.update(report)
    in_flight = sum(c.get("streams_active", 0) for c in report.get("connections", []))
    print(
        f"  migrated sidecar A's QUIC connections to new local ports: {report.get('migrated', 0)}"
        f" moved, {report.get('failed', 0)} failed, {in_flight} streams in flight",
        flush=True,
    )


RESUMED_SHARE = 0.3
"""Share of ``--duration`` run after sidecar A's restart (QUIC: the 0-RTT part)."""


# -- the whole demo --------------------------------------------------------------


async def _demo(args: argparse.Namespace, workdir: Path) -> int:
    ca_dir = workdir / "ca"
    DevCA().save(ca_dir)
    echo_handlers = HandlerTasks()  # cancelled and awaited at the end (Ctrl-C: no noise)
    echo_server = await asyncio.start_server(echo_handlers.wrap(echo_app), LOOPBACK, 0)
    http_server = http.server.ThreadingHTTPServer((LOOPBACK, 0), HttpApp)
    http_server.daemon_threads = True
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    ports = Ports(
        echo_app=echo_server.sockets[0].getsockname()[1],
        http_app=int(http_server.server_address[1]),
    )
    quic = args.transport == "quic"
    tickets = str(workdir / "sidecar-a-tickets.json")
    config_a, config_b = sidecar_configs(args, ports, str(ca_dir), tickets if quic else None)
    sidecar_b = SidecarProcess("sidecar-b", config_b, workdir)
    sidecar_a = SidecarProcess("sidecar-a", config_a, workdir)
    exits: list[int] = []
    runs_a: list[dict[Any, float]] = []
    migration: dict[str, Any] = {}
    flows, requests = Tally(), Tally()
    try:
        sidecar_b.start()
        sidecar_a.start()
        await asyncio.to_thread(sidecar_b.wait_ready)
        await asyncio.to_thread(sidecar_a.wait_ready)
        first = args.duration * (1 - RESUMED_SHARE) if quic else args.duration
        print(
            f"apps: echo {LOOPBACK}:{ports.echo_app}, http {LOOPBACK}:{ports.http_app}\n"
            f"sidecar B: inbound {args.transport} {LOOPBACK}:{ports.tunnel_b}, "
            f"admin http://{LOOPBACK}:{ports.admin_b}/metrics\n"
            f"sidecar A: tcp {LOOPBACK}:{ports.echo_a} -> echo, http {LOOPBACK}:{ports.http_a}"
            f" -> web, admin http://{LOOPBACK}:{ports.admin_a}/metrics\n"
            f"load: {args.flows} TCP flows of {args.size} bytes and {_http_workers(args)} HTTP "
            f"clients for {args.duration:g}s"
            + (
                f"; A migrates at {first / 2:.1f}s and restarts (0-RTT) at {first:.1f}s"
                if quic
                else ""
            ),
            flush=True,
        )
        started = time.monotonic()
        reporter = asyncio.ensure_future(_progress(flows, requests, started))
        try:
            load = _load(args, ports, first, flows, requests)
            if quic:
                await asyncio.gather(load, _migrate_after(sidecar_a, first / 2, migration))
                runs_a.append(await asyncio.to_thread(sidecar_a.metrics))
                exits.append(await asyncio.to_thread(sidecar_a.stop))
                sidecar_a.start()
                await asyncio.to_thread(sidecar_a.wait_ready)
                print(
                    f"  restarted sidecar A (drained, exit {exits[-1]}): it resumes with the "
                    "session tickets in its ticket cache",
                    flush=True,
                )
                await _load(args, ports, args.duration - first, flows, requests)
            else:
                await load
        finally:
            reporter.cancel()
        runs_a.append(await asyncio.to_thread(sidecar_a.metrics))
        metrics_b = await asyncio.to_thread(sidecar_b.metrics)
    finally:
        exits.append(await asyncio.to_thread(sidecar_a.stop))
        exit_b = await asyncio.to_thread(sidecar_b.stop)
        await echo_handlers.close(echo_server)
        http_server.shutdown()
        http_server.server_close()
    print_summary(args, flows, requests, runs_a, metrics_b, (exits, exit_b))
    ok = (
        flows.failed == 0
        and requests.failed == 0
        and flows.ok > 0
        and requests.ok > 0
        and flows.bytes_sent == flows.bytes_received
        and all(code == 0 for code in exits)
        and exit_b == 0
    )
    if quic and (migration.get("migrated", 0) < 1 or _counter(runs_a, "zero_rtt", "accepted") < 1):
        print("\nnote: the migration or the 0-RTT resumption did not happen (see the table)")
    if not ok:
        for name, process, codes in (("A", sidecar_a, exits), ("B", sidecar_b, [exit_b])):
            if any(code != 0 for code in codes):
                print(f"  sidecar {name} exited with {codes[-1]}: {process.last_error()}")
    print("\nresult:", "every byte arrived intact" if ok else "FAILED: see the errors above")
    return 0 if ok else 1


def _http_workers(args: argparse.Namespace) -> int:
    return max(2, int(args.flows) // 4)


def _percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered) * 1000:.1f} ms / {p99 * 1000:.1f} ms"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _counter(runs: list[Samples], family: str, value: str) -> int:
    """A labelled QUIC counter of sidecar A's clusters, over all its runs (``result`` or
    ``cause`` label ``value``)."""
    name = f"quicmesh_cluster_{family}_total"
    label = "cause" if family == "migrations" else "result"
    return int(sum(metric(run, name, **{label: value}) for run in runs))


def print_summary(
    args: argparse.Namespace,
    flows: Tally,
    requests: Tally,
    runs_a: list[Samples],
    metrics_b: Samples,
    exits: tuple[list[int], int],
) -> None:
    """The closing table: the clients' view, then the sidecars' own metrics.

    :param runs_a: sidecar A's ``/metrics`` at the end of each of its runs (before
        and after its restart): counters are added up over them.
    """

    def a(name: str, **labels: str) -> int:
        return int(sum(metric(run, name, **labels) for run in runs_a))

    def b(name: str, **labels: str) -> int:
        return int(metric(metrics_b, name, **labels))

    quic = args.transport == "quic"
    last = runs_a[-1] if runs_a else {}
    rtts = [v for (n, _), v in last.items() if n == "quicmesh_peer_connection_rtt_seconds"]
    rows = [
        ("transport", args.transport),
        ("tcp flows ok / failed", f"{flows.ok} / {flows.failed}"),
        ("tcp bytes sent / echoed", f"{flows.bytes_sent} / {flows.bytes_received}"),
        ("tcp flow latency p50 / p99", _percentiles(flows.latencies)),
        ("http requests ok / failed", f"{requests.ok} / {requests.failed}"),
        ("http latency p50 / p99", _percentiles(requests.latencies)),
        ("A: flows completed", str(a("quicmesh_cluster_flows_total", outcome="completed"))),
        (
            "A: streams / peer connections",
            f"{a('quicmesh_cluster_streams_total')} / {a('quicmesh_cluster_connections_total')}",
        ),
        (
            "A: bytes into / out of tunnel",
            f"{a('quicmesh_cluster_bytes_sent_total')} / "
            f"{a('quicmesh_cluster_bytes_received_total')}",
        ),
        (
            "A: connect failures / overflows",
            f"{a('quicmesh_cluster_connect_failures_total')} / "
            f"{a('quicmesh_cluster_circuit_breaker_overflows_total')}",
        ),
        ("A: peer RTT (smoothed)", f"{max(rtts) * 1000:.2f} ms" if rtts else "n/a"),
    ]
    if quic:
        rows += [
            ("A: packets lost", str(a("quicmesh_peer_connection_packets_lost_total"))),
            (
                "A: migrations (POST /migrate)",
                f"{_counter(runs_a, 'migrations', 'active')}, path validations on B ok / failed "
                f"{b('quicmesh_listener_path_validations_total', result='ok')} / "
                f"{b('quicmesh_listener_path_validations_total', result='failed')}",
            ),
            (
                "A: 0-RTT attempted / accepted / rejected",
                " / ".join(
                    str(_counter(runs_a, "zero_rtt", r))
                    for r in ("attempted", "accepted", "rejected")
                )
                + f" ({a('quicmesh_peer_connection_zero_rtt_packets_sent_total')} 0-RTT packets"
                " after the restart)",
            ),
            (
                "B: session tickets issued / redeemed",
                f"{b('quicmesh_listener_session_tickets_total', result='issued')} / "
                f"{b('quicmesh_listener_session_tickets_total', result='redeemed')}",
            ),
        ]
    else:
        rows += [("A: 0-RTT / migrations", "n/a (QUIC only)")]
    rows += [
        (
            "B: streams accepted / refused",
            f"{b('quicmesh_listener_streams_total')}"
            f" / {b('quicmesh_listener_flows_total', outcome='refused')}",
        ),
        (
            "sidecar exit codes A / B",
            f"{' then '.join(str(code) for code in exits[0])} / {exits[1]}",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for error in (flows.errors + requests.errors)[:5]:
        print(f"  error: {error}")


MAX_DURATION = 86400.0
"""The longest ``--duration`` (NaN and infinity are not durations either)."""
MAX_FLOWS = 10_000
"""The most ``--flows`` (each is a task and two connections on one machine)."""
MAX_SIZE = 64 * 2**20
"""The largest ``--size`` (each flow holds its payload in memory)."""


def load_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the demo's ``--flows``, ``--duration`` and ``--size``, if
    anything: the one line to print."""
    if (
        not 1 <= args.flows <= MAX_FLOWS
        or not 1 <= args.size <= MAX_SIZE
        or not 0 < args.duration <= MAX_DURATION
    ):
        return (
            "quicmesh demo: --flows and --size must be positive, --duration seconds within "
            f"0-{MAX_DURATION:g} (at most {MAX_FLOWS} flows of {MAX_SIZE} bytes)"
        )
    return None


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 only if every flow and request came back intact."""
    problem = load_problem(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    # ``kill PID`` (SIGTERM) becomes SystemExit: the finally blocks stop both sidecars
    # and the temporary directory goes (and the sidecars die with this process anyway).
    with terminate_as_exit(), scratch_directory("quicmesh-demo-") as workdir:
        try:
            return int(run_async(_demo(args, Path(workdir))))
        except QuicmeshError as exc:
            print(f"quicmesh demo: {exc}", file=sys.stderr)
            return 1
