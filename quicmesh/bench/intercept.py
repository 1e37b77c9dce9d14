"""``quicmesh bench intercept``: what transparent interception costs, and how rule lookup scales.

Two measurements, both as root in network namespaces made for the run
(:class:`quicmesh.intercept.lab.InterceptLab`):

* **Per connection.** Sidecar A (app namespace) reaches sidecar B (service
  namespace) over QUIC on a veth pair; B forwards to an echo server. A client in
  the app namespace opens a TCP connection, writes 64 bytes, reads the echo and
  closes, sequentially, for three cases:

  - ``direct``: to an echo server in the service namespace on a port excluded
    from capture (no mesh at all: the floor);
  - ``explicit``: to A's explicit outbound listener (127.0.0.1), the way an
    application joins the mesh today;
  - ``intercepted``: to a service VIP nobody owns (10.96.0.11:7007), which the
    nft rules redirect to A's capture port; A reads SO_ORIGINAL_DST and routes it
    to the same cluster.

  The peer connection is pooled and warm, so a connection costs one tunnel
  stream, not a handshake. Rounds of ``--connections`` connections per case are
  interleaved (direct, explicit, intercepted, direct, ...) and repeated
  ``--rounds`` times. Latency is the median over every connection of a case;
  CPU per connection is the CPU time (user + system, from /proc) sidecars A
  and B used during the case's rounds divided by its connections.
* **Rule lookup.** In a namespace of its own, a filter chain on the output hook
  holds N services (10, 1,000, 10,000) either as one nft set lookup
  (``ip daddr . udp dport @services``, what quicmesh's sets and a map-based
  ruleset use) or as one rule per service (``ip daddr X udp dport Y``, the
  iptables/kube-proxy style). A loop sends 1-byte UDP datagrams to loopback whose
  destination matches no service (the worst case for rules, which are all
  evaluated), for ``--window`` seconds per case; the cost per packet minus the
  cost with no table is the lookup cost (0 at least; one no higher than the spread
  of the no-table samples, the run's resolution, is marked ``*``). Cases (none,
  set, rules) and sizes are interleaved and repeated ``--rounds`` times; the
  median is reported. The NAT chains ``quicmesh intercept`` installs match this
  way on the first packet of each connection.

Ratios are against baselines measured in the same run: ``intercepted /
explicit`` and ``explicit / direct`` for connections, ``rules / set`` for
lookups. ``--quick``: fewer connections and rounds, 10 and 1,000 services only.
``--json FILE`` writes every sample; ``--plot FILE`` draws both parts (needs
matplotlib).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._signals import scratch_directory, signals_deferred
from ..errors import QuicmeshError
from ..intercept import lab as L
from ..intercept.lab import InterceptLab, NamespacedSidecar
from ..netem import system
from ..outputs import output_file
from ..sidecar.launch import terminate_as_exit
from ..tls import DevCA
from . import OneLineParser
from ._measure import CpuReading, cpu_reading

CONNECTION_CASES = ("direct", "explicit", "intercepted")
LOOKUP_STYLES = ("none", "set", "rules")
SIZES = (10, 1000, 10000)
QUICK_SIZES = (10, 1000)
PAYLOAD = b"x" * 64
EXPLICIT_PORT = 15100
VIP = ("10.96.0.11", L.ECHO_PORT)
IDENTITY_A = "spiffe://mesh.local/ns/bench/sa/client"
IDENTITY_B = "spiffe://mesh.local/ns/bench/sa/server"
SINK_PORT = 40000


@dataclass
class ConnectionRow:
    """One connection case over all rounds."""

    case: str
    connections: int
    median_ms: float
    p90_ms: float
    cpu_ms_per_connection_a: float
    cpu_ms_per_connection_b: float
    samples_ms: list[float] = field(default_factory=list, repr=False)


@dataclass
class LookupRow:
    """One (style, services) case over all rounds: nanoseconds per packet."""

    style: str
    services: int
    median_ns_per_packet: float
    lookup_ns: float
    """Median per-packet cost minus the median with no table (same size's rounds), 0 at
    least: a difference of two noisy timings, it came out negative on a quick run."""
    resolution_ns: float
    """The spread (max - min) of every no-table sample of the run: a lookup cost up to
    this much is not told apart from noise."""
    samples_ns: list[float] = field(default_factory=list, repr=False)

    @property
    def resolved(self) -> bool:
        """Whether ``lookup_ns`` is above the run's resolution (no table is 0 by
        definition: resolved)."""
        return self.style == "none" or self.lookup_ns > self.resolution_ns


# -- per connection -----------------------------------------------------------------


def _sidecar_configs(workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    tunnel = f"{L.SERVICE_ADDRESS}:15008"
    a = {
        "node": {"name": "a", "identity": IDENTITY_A},
        "tls": {"ca_dir": str(workdir / "ca")},
        "admin": {"address": "127.0.0.1:15000"},
        "access_log": {"path": None},
        "intercept": {"outbound_policy": "registry_only", "inbound_port": None},
        "listeners": {
            "outbound": [
                {"name": "explicit", "address": f"127.0.0.1:{EXPLICIT_PORT}", "cluster": "echo"}
            ]
        },
        "clusters": [
            {
                "name": "echo",
                "transport": "quic",
                "target": f"127.0.0.1:{L.ECHO_PORT}",
                "endpoints": [tunnel],
                "services": [f"{VIP[0]}:{VIP[1]}"],
            }
        ],
    }
    destinations = [f"127.0.0.1:{L.ECHO_PORT}"]
    b = {
        "node": {"name": "b", "identity": IDENTITY_B},
        "tls": {"ca_dir": str(workdir / "ca")},
        "admin": {"address": "127.0.0.1:15000"},
        "access_log": {"path": None},
        "listeners": {
            "inbound": [
                {
                    "name": "mesh",
                    "address": tunnel,
                    "transports": ["quic"],
                    "destinations": destinations,
                    "policies": [{"identity": IDENTITY_A, "destinations": destinations}],
                }
            ]
        },
    }
    return a, b


def _cpu_reading(sidecar: NamespacedSidecar) -> CpuReading:
    assert sidecar.process is not None
    return cpu_reading([sidecar.process.pid])


def _one_connection(lab: InterceptLab, address: tuple[str, int]) -> float:
    start = time.perf_counter()
    with lab.entered(lab.app_ns):
        sock = socket.create_connection(address, timeout=10)
    with sock:
        sock.sendall(PAYLOAD)
        received = b""
        while len(received) < len(PAYLOAD):
            data = sock.recv(4096)
            if not data:
                raise QuicmeshError(f"connection to {address} closed after {len(received)} bytes")
            received += data
    return time.perf_counter() - start


def measure_connections(connections: int, rounds: int) -> list[ConnectionRow]:
    """Interleaved rounds of the three connection cases in a fresh lab."""
    addresses = {
        "direct": (L.OTHER_ADDRESS, L.EXCLUDED_ECHO_PORT),
        "explicit": ("127.0.0.1", EXPLICIT_PORT),
        "intercepted": VIP,
    }
    samples: dict[str, list[float]] = {case: [] for case in CONNECTION_CASES}
    cpu: dict[str, list[float]] = {case: [0.0, 0.0] for case in CONNECTION_CASES}
    with scratch_directory("quicmesh-bench-intercept-") as workdir:
        DevCA().save(workdir / "ca")
        a_config, b_config = _sidecar_configs(workdir)
        with InterceptLab() as lab:
            b = lab.sidecar("b", b_config, workdir, lab.service_ns)
            a = lab.sidecar("a", a_config, workdir, lab.app_ns)
            done = lab.intercept(
                lab.app_ns, "install", "--no-inbound", "--exclude-ports", str(L.EXCLUDED_ECHO_PORT)
            )
            if done.returncode != 0:
                raise QuicmeshError(done.stderr.strip())
            for case in CONNECTION_CASES:  # warm up: peer connection, caches
                for _ in range(5):
                    _one_connection(lab, addresses[case])
            for _ in range(rounds):
                for case in CONNECTION_CASES:
                    before = (_cpu_reading(a), _cpu_reading(b))
                    for _ in range(connections):
                        samples[case].append(_one_connection(lab, addresses[case]))
                    cpu[case][0] += _cpu_reading(a) - before[0]
                    cpu[case][1] += _cpu_reading(b) - before[1]
    rows = []
    for case in CONNECTION_CASES:
        values = sorted(samples[case])
        total = len(values)
        rows.append(
            ConnectionRow(
                case=case,
                connections=total,
                median_ms=statistics.median(values) * 1000,
                p90_ms=values[int(0.9 * (total - 1))] * 1000,
                cpu_ms_per_connection_a=cpu[case][0] / total * 1000,
                cpu_ms_per_connection_b=cpu[case][1] / total * 1000,
                samples_ms=[v * 1000 for v in samples[case]],
            )
        )
    return rows


# -- rule lookup --------------------------------------------------------------------


def service_address(index: int) -> str:
    """The ``index``-th synthetic service VIP (10.96.0.0/16 upwards)."""
    return f"10.{96 + index // 65536}.{index // 256 % 256}.{index % 256}"


def render_lookup_table(style: str, services: int) -> str:
    """An nft script: ``services`` services as one set lookup or one rule each."""
    lines = ["table inet quicmesh_bench {}", "delete table inet quicmesh_bench"]
    if style == "none":
        return "\n".join(lines) + "\n"
    lines.append("table inet quicmesh_bench {")
    rule_lines = []
    if style == "set":
        elements = ", ".join(f"{service_address(i)} . 9080" for i in range(services))
        lines.append(
            f"  set services {{ type ipv4_addr . inet_service; elements = {{ {elements} }}; }}"
        )
        rule_lines.append("    ip daddr . udp dport @services accept")
    else:
        rule_lines += [
            f"    ip daddr {service_address(i)} udp dport 9080 accept" for i in range(services)
        ]
    lines += [
        "  chain output {",
        "    type filter hook output priority 0; policy accept;",
        *rule_lines,
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _nft(namespace: str, script: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", namespace, "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise QuicmeshError(f"nft: {done.stderr.strip().splitlines()[0]}")


def _send_window(sender: socket.socket, window: float) -> float:
    """Seconds per datagram over ``window`` seconds of sending."""
    count = 0
    start = time.perf_counter()
    deadline = start + window
    address = ("127.0.0.1", SINK_PORT)
    while True:
        for _ in range(50):
            sender.sendto(b"x", address)
        count += 50
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / count


def measure_lookups(sizes: tuple[int, ...], rounds: int, window: float) -> list[LookupRow]:
    """Interleaved rounds of (size, style) cases in a namespace of their own."""
    namespace = f"qmicpt-{os.getpid()}-bench-{uuid.uuid4().hex[:6]}"
    samples: dict[tuple[str, int], list[float]] = {
        (style, n): [] for n in sizes for style in LOOKUP_STYLES
    }
    try:
        with signals_deferred():  # made in full before a signal ends the run (and deletes it)
            system.ip("netns", "add", namespace)
        system.ip("link", "set", "dev", "lo", "up", namespace=namespace)
        with system.in_namespace(namespace):
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sink, sender:
            sink.bind(("127.0.0.1", SINK_PORT))
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for _ in range(rounds):
                for services in sizes:
                    for style in LOOKUP_STYLES:
                        _nft(namespace, render_lookup_table(style, services))
                        _send_window(sender, window / 5)  # warm up
                        samples[(style, services)].append(_send_window(sender, window) * 1e9)
    finally:
        with signals_deferred():  # (a second signal killed `ip` half-way)
            system.delete_namespace(namespace)
    # The no-table case is the same at every size: all its samples show the noise.
    floors = [sample for services in sizes for sample in samples[("none", services)]]
    resolution = max(floors) - min(floors)
    rows = []
    for services in sizes:
        floor = statistics.median(samples[("none", services)])
        for style in LOOKUP_STYLES:
            median = statistics.median(samples[(style, services)])
            rows.append(
                LookupRow(
                    style=style,
                    services=services,
                    median_ns_per_packet=median,
                    lookup_ns=max(0.0, median - floor),
                    resolution_ns=resolution,
                    samples_ns=samples[(style, services)],
                )
            )
    return rows


# -- report -------------------------------------------------------------------------


def format_report(connections: list[ConnectionRow], lookups: list[LookupRow]) -> str:
    """The two tables and the ratios, as text."""
    out = ["per connection (64-byte echo, sequential; CPU = sidecar process time):"]
    out.append(
        f"  {'case':<12} {'conns':>6} {'median ms':>10} {'p90 ms':>8} "
        f"{'A cpu ms/conn':>14} {'B cpu ms/conn':>14}"
    )
    by_case = {row.case: row for row in connections}
    for row in connections:
        out.append(
            f"  {row.case:<12} {row.connections:>6} {row.median_ms:>10.3f} {row.p90_ms:>8.3f} "
            f"{row.cpu_ms_per_connection_a:>14.3f} {row.cpu_ms_per_connection_b:>14.3f}"
        )
    if {"explicit", "intercepted", "direct"} <= set(by_case):
        explicit, intercepted = by_case["explicit"], by_case["intercepted"]
        out.append(
            f"  intercepted / explicit: latency x{intercepted.median_ms / explicit.median_ms:.3f}"
            f" (+{(intercepted.median_ms - explicit.median_ms) * 1000:.0f} us), sidecar A CPU x"
            f"{_ratio(intercepted.cpu_ms_per_connection_a, explicit.cpu_ms_per_connection_a)}"
        )
        out.append(
            f"  explicit / direct: latency x{explicit.median_ms / by_case['direct'].median_ms:.2f}"
        )
    out.append("rule lookup (UDP datagrams to loopback, matching no service):")
    out.append(f"  {'services':>8} {'style':<6} {'ns/packet':>10} {'lookup ns':>10}")
    for lookup in lookups:
        out.append(
            f"  {lookup.services:>8} {lookup.style:<6} {lookup.median_ns_per_packet:>10.0f} "
            f"{lookup.lookup_ns:>10.0f}" + ("" if lookup.resolved else "*")
        )
    if not all(lookup.resolved for lookup in lookups):
        out.append(
            f"  * below the resolution ({lookups[0].resolution_ns:.0f} ns: how much the cost "
            "with no table varied over the run): not told apart from 0"
        )
    sizes = sorted({row.services for row in lookups})
    by = {(row.style, row.services): row for row in lookups}
    for services in sizes:
        rules, sets = by[("rules", services)], by[("set", services)]
        out.append(
            f"  {services} services: rules / set per packet x"
            f"{rules.median_ns_per_packet / sets.median_ns_per_packet:.2f}"
        )
    return "\n".join(out)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base > 0 else "n/a"


def plot(connections: list[ConnectionRow], lookups: list[LookupRow], path: str) -> None:
    """Draw connection latency by case and lookup cost by number of services."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    cases = [row.case for row in connections]
    medians = [row.median_ms for row in connections]
    p90s = [row.p90_ms - row.median_ms for row in connections]
    left.bar(cases, medians, yerr=[[0] * len(p90s), p90s], capsize=4, label="median (bar: p90)")
    left.set_ylabel("connection + 64-byte echo (ms)")
    left.set_xlabel("how the client reaches the echo server")
    left.set_title("Latency per connection")
    left.legend()
    for style, marker in (("set", "o"), ("rules", "s"), ("none", "x")):
        rows = sorted((r for r in lookups if r.style == style), key=lambda r: r.services)
        right.plot(
            [r.services for r in rows],
            [r.median_ns_per_packet / 1000 for r in rows],
            marker=marker,
            label={
                "set": "nft set (one lookup)",
                "rules": "one rule per service (iptables style)",
                "none": "no table (baseline)",
            }[style],
        )
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("number of services")
    right.set_ylabel("time per packet (µs)")
    right.set_title("Rule lookup: output hook, non-matching packet")
    right.legend()
    figure.suptitle(f"quicmesh bench intercept ({os.cpu_count()} CPUs)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """``quicmesh bench intercept [--quick] [--connections N] [--rounds N] [--window S]``."""
    parser = OneLineParser(
        prog="quicmesh bench intercept", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--connections", type=int, default=None, help="per case per round (200)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5)")
    parser.add_argument("--window", type=float, default=None, help="seconds per lookup case (0.5)")
    parser.add_argument("--quick", action="store_true", help="30 connections, 2 rounds, 0.1 s")
    parser.add_argument("--json", type=output_file, help="write every sample to this file")
    parser.add_argument(
        "--plot", type=output_file, help="write a PNG plot to this file (needs matplotlib)"
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    connections = args.connections if args.connections is not None else (30 if args.quick else 200)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    window = args.window if args.window is not None else (0.1 if args.quick else 0.5)
    if connections < 1 or rounds < 1 or not 0 < window <= 60:
        print(
            "quicmesh bench intercept: need --connections >= 1, --rounds >= 1, 0 < --window <= 60",
            file=sys.stderr,
        )
        return 2
    reason = system.missing_privileges()
    if reason is not None:
        print(f"quicmesh bench intercept: {reason}", file=sys.stderr)
        return 2  # (as `quicmesh netem`: 2 is bad arguments or no root)
    try:
        # kill (SIGTERM) runs the lab's tear-down too: namespaces, sidecars, rules.
        with terminate_as_exit():
            connection_rows = measure_connections(connections, rounds)
            lookup_rows = measure_lookups(QUICK_SIZES if args.quick else SIZES, rounds, window)
    except QuicmeshError as exc:
        print(f"quicmesh bench intercept: {exc}", file=sys.stderr)
        return 1
    print(format_report(connection_rows, lookup_rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {
                    "connections": [asdict(r) for r in connection_rows],
                    "lookups": [asdict(r) for r in lookup_rows],
                },
                file,
                indent=2,
            )
    if args.plot:
        try:
            plot(connection_rows, lookup_rows, str(args.plot))
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install 'quicmesh[plots]')")
        else:
            print(f"plot: {args.plot}")
    return 0
