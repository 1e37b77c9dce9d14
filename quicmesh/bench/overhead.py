"""``quicmesh bench overhead``: what one proxy hop costs, quicmesh against native proxies.

Every path carries the same HTTP/1.1 load from a client to an nginx backend on
loopback (a 1 KB body and a large file):

* ``direct``: client to nginx, the baseline every added latency is taken from;
* ``quic-aioquic``, ``quic-native``, ``h2``, ``tcp``: two ``quicmesh sidecar``
  processes as in examples/ (client -> sidecar A outbound -> the transport ->
  sidecar B inbound -> nginx), mutual TLS, access logs off (on QUIC, sidecar
  B's ``max_stream_rate`` is raised from its default of 1000 new streams a
  second per peer identity, a churn limit that would otherwise cap the
  connection-per-request load, all of whose flows come from A's one identity);
  ``quic-native`` needs ``quicmesh._native`` and a sidecar that takes a
  cluster's ``engine: native`` (checked with ``quicmesh sidecar --check``); it
  runs with the sidecars' defaults, so the engine splices each flow itself
  (``splice``); ``quic-native-pump`` is the same with ``splice: false`` on both
  sidecars (the sidecar copies every byte in Python), for the comparison;
* ``stunnel``: a stunnel4 pair, mutual TLS, one TLS connection per flow;
* ``nghttpx``: an nghttpx pair, HTTP/1 in, one mutual-TLS HTTP/2 connection
  between the two, HTTP/1 to nginx;
* ``haproxy``: an haproxy pair in TCP mode with a plaintext hop, one TCP
  connection per flow on each leg: a floor, not a mesh (no encryption, no
  identity), for what any L4 relay pair that opens a connection per flow costs.

A quicmesh path may name the sidecars' event loop: ``h2/asyncio``,
``h2/uvloop`` (``quicmesh sidecar --event-loop``); plain ``h2`` is the
sidecar's default. ``quic-native/ackN`` runs the native engine with
``ack_eliciting_threshold: N`` on both sidecars (``ack1``: RFC 9000's ACK for
every second packet, no ACK_FREQUENCY frames): that setting's before/after in
one run. Load (h2load from nghttp2-client, ab from apache2-utils):

* keep-alive: h2load, 16 HTTP/1.1 connections, fixed total rates (100, 500,
  1000 rps; h2load's ``--rps`` per connection), latency of every request from
  ``--log-file`` (p50/p90/p99), after a warm-up in which the connections open;
* max rps: h2load, 16 keep-alive connections, no rate limit;
* connection per request: ``ab -c 8`` (a new TCP connection, and a new flow
  through the proxies, for every request);
* bulk: one download of the large file (256 MB; ``--quick``: 8 MB) in MB/s.

CPU is utime + stime from ``/proc/<pid>/stat`` of both proxy processes (with
their children and threads), over each timed part: vCPU per 1000 rps at the
highest fixed rate, CPU seconds per GB in the bulk download. Packets: when run
as root the whole benchmark re-runs itself in a private network namespace
(``unshare --net``), where nftables counters on the output hook count the
packets to and from the server proxy's port, both directions: packets on the
hop per request at the highest fixed rate and per new flow (ab), and of them
the QUIC datagrams. Without a namespace hop packets are not counted, and QUIC
datagrams are the host's UDP OutDatagrams (/proc/net/snmp), marked so.

Paths run one after the other in each round, in a rotated order, each started
afresh; ``--rounds`` (3) repeats them; the table shows medians over rounds and
ratios against the ``h2`` path and the ``nghttpx`` pair of the same run (and the
``haproxy`` pair when it ran).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._child import child_environment, python_command
from .._signals import scratch_directory, signal_handlers
from ..errors import QuicmeshError
from ..outputs import output_file
from ..sidecar.launch import terminate_as_exit
from . import OneLineParser, positive_number, source_state
from ._measure import (
    MeasureError,
    cpu_reading,
    parse_ab,
    parse_h2load_log,
    parse_h2load_summary,
    parse_nft_counters,
    percentile,
    process_tree,
    udp_datagrams_sent,
)

LOOPBACK = "127.0.0.1"
PATHS = (
    "direct",
    "quic-aioquic",
    "quic-native",
    "quic-native-pump",
    "h2",
    "tcp",
    "stunnel",
    "nghttpx",
    "haproxy",
)
"""Every path, in the default order."""
SIDECAR_PATHS = {
    "quic-aioquic": "quic",
    "quic-native": "quic",
    "quic-native-pump": "quic",
    "h2": "h2",
    "tcp": "tcp",
}
LOOPS = ("asyncio", "uvloop")

VARIANT_PATHS = ("quic-native",)
"""Paths that take a variant other than an event loop: ``ackN`` sets both
sidecars' ``ack_eliciting_threshold`` to N (0 to 1000)."""


def _ack_variant(text: str) -> int | None:
    """N of an ``ackN`` variant, or None."""
    digits = text.removeprefix("ack")
    if text.startswith("ack") and digits.isdigit() and int(digits) <= 1000:
        return int(digits)
    return None


SMALL_BYTES = 1024
CONNECTIONS = 16
"""Keep-alive connections of the fixed-rate and max-rps loads."""
AB_CONCURRENCY = 8
MAX_STREAM_RATE = 1_000_000
"""Sidecar B's ``max_stream_rate``: the default (1000 new streams a second per peer
identity, a churn limit) would cap the connection-per-request load, whose flows all
come from sidecar A's one identity, at 1000/s on the QUIC paths."""
IDENTITY_A = "spiffe://mesh.local/ns/bench/sa/client"
IDENTITY_B = "spiffe://mesh.local/ns/bench/sa/server"
NAMESPACE_ENV = "QUICMESH_BENCH_NETNS"
"""Set in the re-run inside the private network namespace."""

TOOLS = {
    "h2load": "nghttp2-client",
    "ab": "apache2-utils",
    "nginx": "nginx-light",
    "stunnel4": "stunnel4",
    "nghttpx": "nghttp2-proxy",
    "haproxy": "haproxy",
}
"""Programs the benchmark runs, and the Debian package of each."""


class BenchError(QuicmeshError):
    """Something the benchmark needs is missing or failed: one line for the user."""


@dataclass(frozen=True)
class Plan:
    """How long and how hard each load runs."""

    rates: tuple[int, ...]
    rate_seconds: float
    warmup_seconds: float
    max_seconds: float
    ab_seconds: float
    bulk_bytes: int
    rounds: int


FULL = Plan((100, 500, 1000), 6.0, 1.0, 5.0, 4.0, 256 * 10**6, 3)
QUICK = Plan((100, 1000), 1.0, 0.5, 1.0, 1.0, 8 * 10**6, 1)


def which(name: str) -> str | None:
    """A program on PATH or in /usr/sbin (Debian puts nginx and nghttpx there)."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


def require(name: str) -> str:
    """The program's path, or BenchError naming the apt package."""
    found = which(name)
    if found is None:
        raise BenchError(f"{name} is not installed: apt-get install {TOOLS[name]}")
    return found


def free_port() -> int:
    """A TCP and UDP port number free right now on loopback."""
    from ..sidecar.launch import free_port as both

    return both(LOOPBACK)


def free_port_pair() -> tuple[int, int]:
    """Two different port numbers, each free right now on loopback for TCP and UDP
    (chosen together: :func:`free_port` twice may give the same one)."""
    from ..sidecar.launch import free_ports

    first, second = free_ports(2, LOOPBACK)
    return first, second


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    """Bounded poll until ``port`` accepts TCP; BenchError if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} not listening on port {port} after {timeout:g}s")


def stop(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 5 s; waits."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the backend -----------------------------------------------------------------------


class Backend:
    """nginx (one worker) serving ``/small`` (1 KB) and ``/large``; without nginx, a
    Python HTTP/1.1 server (``--role backend``) serving the same files."""

    def __init__(self, workdir: Path, bulk_bytes: int) -> None:
        self.workdir = workdir
        self.root = workdir / "www"
        self.root.mkdir(exist_ok=True)
        (self.root / "small").write_bytes(os.urandom(SMALL_BYTES))
        with open(self.root / "large", "wb") as large:
            large.truncate(bulk_bytes)  # sparse zeros: nginx sends them with sendfile
        self.bulk_bytes = bulk_bytes
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.kind = "nginx" if which("nginx") else "python"

    def start(self) -> None:
        """Start the server and wait until it listens."""
        if self.kind == "nginx":
            conf = self.workdir / "nginx.conf"
            temp = self.workdir / "nginx-tmp"
            temp.mkdir(exist_ok=True)
            temps = " ".join(
                f"{kind}_temp_path {temp};"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            conf.write_text(
                "worker_processes 1; daemon off; master_process off;\n"
                f"pid {self.workdir / 'nginx.pid'}; error_log {self.workdir / 'nginx.err'} warn;\n"
                "events { worker_connections 8192; }\n"
                f"http {{ access_log off; {temps} keepalive_requests 10000000;\n"
                f"  sendfile on; server {{ listen {LOOPBACK}:{self.port}; root {self.root}; }} }}\n"
            )
            command = [require("nginx"), "-c", str(conf), "-p", str(self.workdir)]
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
        else:
            command = python_command(
                "-m", "quicmesh.bench.overhead", "--role", "backend",
                "--port", str(self.port), "--root", str(self.root),
            )  # fmt: skip
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, env=child_environment()
            )
        wait_listening(self.port, self.process, self.kind, 15.0)

    def stop(self) -> None:
        """Stop the server."""
        stop(self.process)


def serve_backend(port: int, root: Path) -> None:
    """The fallback backend: HTTP/1.1 GET of the files in ``root``, keep-alive unless
    the client is HTTP/1.0 without ``Connection: keep-alive`` (ab)."""
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request, *headers = head.decode("latin-1").split("\r\n")
                _, target, version = request.split(" ", 2)
                keep = version == "HTTP/1.1" or any(
                    h.lower().startswith("connection:") and "keep-alive" in h.lower()
                    for h in headers
                )
                path = root / target.lstrip("/")
                if path.parent != root or not path.is_file():
                    writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                else:
                    size = path.stat().st_size
                    writer.write(
                        f"HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n"
                        f"connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode()
                    )
                    with open(path, "rb") as body:
                        await loop.sendfile(writer.transport, body)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, LOOPBACK, port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- the paths -------------------------------------------------------------------------


@dataclass
class PathSpec:
    """One row: a path name and, for quicmesh paths, the sidecars' event loop."""

    name: str
    base: str
    loop: str | None = None
    variant: str | None = None
    """``ackN`` (a setting changed on both sidecars, :data:`VARIANT_PATHS`)."""

    @classmethod
    def parse(cls, text: str) -> PathSpec:
        """``h2``, ``h2/uvloop``, ``nghttpx``... ValueError names what is wrong."""
        base, _, loop = text.partition("/")
        if base not in PATHS:
            raise ValueError(f"unknown path {base!r}: choose from {', '.join(PATHS)}")
        if loop and base in VARIANT_PATHS and _ack_variant(loop) is not None:
            return cls(text, base, None, loop)
        if loop and base not in SIDECAR_PATHS:
            raise ValueError(f"{text!r}: only quicmesh paths take an event loop")
        if loop and loop not in LOOPS:
            raise ValueError(f"{text!r}: event loop must be one of {', '.join(LOOPS)}")
        return cls(text, base, loop or None)


class Unavailable(Exception):
    """The path cannot run here; the message says why (shown in its row)."""


class Proxies:
    """A running path: the port the client connects to and the proxies' processes."""

    def __init__(
        self, port: int, processes: list[subprocess.Popen[bytes]], hop_port: int | None = None
    ) -> None:
        self.port = port
        self.processes = processes
        self.hop_port = hop_port
        """The port the client proxy connects to on the server proxy (the hop)."""

    def pids(self) -> list[int]:
        """Both proxies with their children (nginx-style workers), right now."""
        pids: list[int] = []
        for process in self.processes:
            pids.extend(process_tree(process.pid))
        return pids

    def stop(self) -> None:
        """Stop every proxy."""
        for process in self.processes:
            stop(process)


class Lab:
    """The shared pieces of a run: the working directory, CA and certificates, backend."""

    def __init__(self, workdir: Path, backend: Backend, namespace: bool) -> None:
        from ..tls.ca import DevCA

        self.workdir = workdir
        self.backend = backend
        self.hop = HopCounter(namespace)
        self.ca_dir = workdir / "ca"
        ca = DevCA()
        ca.save(self.ca_dir)
        self.ca_pem = self.ca_dir / "ca.pem"
        for name, identity in (("client", IDENTITY_A), ("server", IDENTITY_B)):
            ca.issue(identity).save(workdir / f"{name}.pem", workdir / f"{name}-key.pem")
        self.native_reason = _native_unavailable(workdir, self.ca_dir)

    def start(self, spec: PathSpec) -> Proxies:
        """Start the path's proxies, wait until they are ready, count the hop's packets."""
        proxies = self._start(spec)
        self.hop.watch(proxies.hop_port)
        return proxies

    def _start(self, spec: PathSpec) -> Proxies:
        if spec.base == "direct":
            return Proxies(self.backend.port, [])
        if spec.base in SIDECAR_PATHS:
            if spec.base.startswith("quic-native") and self.native_reason:
                raise Unavailable(self.native_reason)
            return self._sidecars(spec)
        if spec.base == "stunnel":
            return self._stunnel()
        if spec.base == "haproxy":
            return self._haproxy()
        return self._nghttpx()

    def _sidecars(self, spec: PathSpec) -> Proxies:
        from ..sidecar.launch import SidecarProcess

        if spec.loop == "uvloop":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                raise Unavailable("uvloop is not installed: pip install uvloop") from None
        extra = ("--event-loop", spec.loop) if spec.loop else ()
        port_a, tunnel = free_port_pair()
        engine = engine_of(spec.base)
        config_a, config_b = sidecar_configs(
            SIDECAR_PATHS[spec.base],
            engine,
            str(self.ca_dir),
            port_a,
            tunnel,
            self.backend.port,
            splice=False if spec.base == "quic-native-pump" else None,
        )
        threshold = _ack_variant(spec.variant or "")
        if threshold is not None:
            config_a["clusters"][0]["ack_eliciting_threshold"] = threshold
            config_b["listeners"]["inbound"][0]["ack_eliciting_threshold"] = threshold
        tag = spec.name.replace("/", "-")
        sidecar_b = SidecarProcess(f"{tag}-b", config_b, self.workdir)
        sidecar_a = SidecarProcess(f"{tag}-a", config_a, self.workdir)
        try:
            sidecar_b.start(*extra)
            sidecar_a.start(*extra)
            sidecar_b.wait_ready(30.0)
            sidecar_a.wait_ready(30.0)
        except QuicmeshError as exc:
            for sidecar in (sidecar_a, sidecar_b):
                stop(sidecar.process)
            raise BenchError(f"{spec.name}: {exc}") from None
        assert sidecar_a.process is not None and sidecar_b.process is not None
        return Proxies(port_a, [sidecar_a.process, sidecar_b.process], tunnel)

    def _stunnel(self) -> Proxies:
        binary = which("stunnel4") or which("stunnel")
        if binary is None:
            raise Unavailable("not installed: apt-get install stunnel4")
        front, tunnel = free_port_pair()
        common = f"foreground = yes\npid =\ndebug = 3\noutput = {self.workdir / 'stunnel.log'}\n"
        verify = f"CAfile = {self.ca_pem}\nverifyChain = yes\n"
        server = (
            f"{common}[server]\naccept = {LOOPBACK}:{tunnel}\n"
            f"connect = {LOOPBACK}:{self.backend.port}\n"
            f"cert = {self.workdir / 'server.pem'}\nkey = {self.workdir / 'server-key.pem'}\n"
            f"{verify}"
        )
        client = (
            f"{common}[client]\nclient = yes\naccept = {LOOPBACK}:{front}\n"
            f"connect = {LOOPBACK}:{tunnel}\n"
            f"cert = {self.workdir / 'client.pem'}\nkey = {self.workdir / 'client-key.pem'}\n"
            f"{verify}"
        )
        commands = []
        for name, text, port in (("server", server, tunnel), ("client", client, front)):
            conf = self.workdir / f"stunnel-{name}.conf"
            conf.write_text(text)
            commands.append((f"stunnel {name}", [binary, str(conf)], port))
        return Proxies(front, _start_pair(commands), tunnel)

    def _nghttpx(self) -> Proxies:
        binary = which("nghttpx")
        if binary is None:
            raise Unavailable("not installed: apt-get install nghttp2-proxy")
        front, tunnel = free_port_pair()
        common = [
            "--conf=/dev/null", "--single-process", "--workers=1", "--no-ocsp",
            "--accesslog-file=/dev/null", f"--errorlog-file={self.workdir / 'nghttpx.log'}",
            "--log-level=WARN", "--no-via", "--backend-keep-alive-timeout=60s",
        ]  # fmt: skip
        server = [
            binary, *common, f"--frontend={LOOPBACK},{tunnel}",
            f"--backend={LOOPBACK},{self.backend.port}",
            "--verify-client", f"--verify-client-cacert={self.ca_pem}",
            str(self.workdir / "server-key.pem"), str(self.workdir / "server.pem"),
        ]  # fmt: skip
        client = [
            binary, *common, f"--frontend={LOOPBACK},{front};no-tls",
            f"--backend={LOOPBACK},{tunnel};;tls;proto=h2",
            f"--cacert={self.ca_pem}", "--insecure",
            f"--client-private-key-file={self.workdir / 'client-key.pem'}",
            f"--client-cert-file={self.workdir / 'client.pem'}",
        ]  # fmt: skip
        commands = [("nghttpx server", server, tunnel), ("nghttpx client", client, front)]
        return Proxies(front, _start_pair(commands), tunnel)

    def _haproxy(self) -> Proxies:
        binary = which("haproxy")
        if binary is None:
            raise Unavailable("not installed: apt-get install haproxy")
        front, tunnel = free_port_pair()
        # One thread each, as nginx and nghttpx run; maxconn bounds the descriptors haproxy
        # asks for (it refuses to start where it cannot raise the limit to match).
        common = (
            "global\n  nbthread 1\n  maxconn 4096\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n"
            "  timeout client 60s\n  timeout server 60s\n"
        )
        commands = []
        for name, listen, upstream in (
            ("server", tunnel, self.backend.port),
            ("client", front, tunnel),
        ):
            conf = self.workdir / f"haproxy-{name}.cfg"
            conf.write_text(
                f"{common}listen relay\n  bind {LOOPBACK}:{listen}\n"
                f"  server upstream {LOOPBACK}:{upstream}\n"
            )
            commands.append((f"haproxy {name}", [binary, "-f", str(conf)], listen))
        return Proxies(front, _start_pair(commands), tunnel)


def _start_pair(commands: list[tuple[str, list[str], int]]) -> list[subprocess.Popen[bytes]]:
    """Start a native proxy pair, server side first, each waited for on its port; the
    processes client first (the order they are stopped in). On a failure the ones
    already started are stopped."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for label, command, port in commands:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            processes.append(process)
            wait_listening(port, process, label, 15.0)
    except BenchError:
        for process in processes:
            stop(process)
        raise
    return processes[::-1]


def engine_of(path: str) -> str | None:
    """The QUIC engine a path's sidecars run, named in their configuration: the default
    (native where it is built) is not ``quic-aioquic``'s. None for the other transports."""
    if path.startswith("quic-native"):
        return "native"
    return "aioquic" if path == "quic-aioquic" else None


def sidecar_configs(
    transport: str,
    engine: str | None,
    ca_dir: str,
    port_a: int,
    tunnel: int,
    backend: int,
    *,
    splice: bool | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sidecar A (outbound listener on ``port_a``) and B (inbound on ``tunnel``,
    forwarding only to the backend), as in examples/ with access logs off;
    ``splice`` set on both (the cluster and the inbound listener) when given."""
    target = f"{LOOPBACK}:{backend}"
    cluster: dict[str, Any] = {
        "name": "backend",
        "transport": transport,
        "target": target,
        "endpoints": [f"{LOOPBACK}:{tunnel}"],
        "circuit_breakers": {"max_concurrent_streams": 4096, "max_pending_opens": 4096},
    }
    if engine is not None:
        cluster["engine"] = engine
    if splice is not None:
        cluster["splice"] = splice
    a = {
        "node": {"name": "bench-a", "identity": IDENTITY_A},
        "tls": {"ca_dir": ca_dir},
        "admin": {"address": f"{LOOPBACK}:{free_port()}"},
        "access_log": {"path": None},
        "listeners": {
            "outbound": [
                {"name": "backend", "address": f"{LOOPBACK}:{port_a}", "cluster": "backend"}
            ]
        },
        "clusters": [cluster],
    }
    b: dict[str, Any] = {
        "node": {"name": "bench-b", "identity": IDENTITY_B},
        "tls": {"ca_dir": ca_dir},
        "admin": {"address": f"{LOOPBACK}:{free_port()}"},
        "access_log": {"path": None},
        "listeners": {
            "inbound": [
                {
                    "name": "mesh",
                    "address": f"{LOOPBACK}:{tunnel}",
                    "transports": [transport],
                    "destinations": [target],
                    "policies": [{"identity": IDENTITY_A, "destinations": [target]}],
                }
            ]
        },
    }
    if transport == "quic":  # the key is refused on H2 and TCP listeners
        b["listeners"]["inbound"][0]["max_stream_rate"] = MAX_STREAM_RATE
    if engine is not None:
        b["listeners"]["inbound"][0]["engine"] = engine
    if splice is not None:
        b["listeners"]["inbound"][0]["splice"] = splice
    return a, b


def _native_unavailable(workdir: Path, ca_dir: Path) -> str:
    """Why ``quic-native`` cannot run here, or "" when it can: the extension must import
    and the sidecar must accept a cluster's ``engine: native`` (``--check``)."""
    try:
        import quicmesh._native  # noqa: F401
    except ImportError:
        return "not built (quicmesh._native does not import)"
    import yaml

    for config in sidecar_configs("quic", "native", str(ca_dir), 1, 2, 3):
        path = workdir / "engine-check.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        result = subprocess.run(
            python_command("-m", "quicmesh", "sidecar", "-c", str(path), "--check"),
            capture_output=True, text=True, env=child_environment(), timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit code {result.returncode}"
            reason = reason.rpartition(".yaml: ")[2].split(" (expected", 1)[0]
            return f"the sidecar does not take engine: native yet ({reason})"
    return ""


# -- the loads -------------------------------------------------------------------------


@dataclass
class Sample:
    """One path, one round."""

    latency_ms: dict[int, list[float]] = field(default_factory=dict)
    """Per fixed rate: p50, p90, p99 in ms."""
    achieved_rps: dict[int, float] = field(default_factory=dict)
    vcpu_per_krps: float = math.nan
    """Both proxies' CPU over the highest fixed rate, in vCPU per 1000 rps."""
    quic_datagrams_per_request: float = math.nan
    packets_per_request: float = math.nan
    """Packets on the hop (both directions, TCP and UDP) per request at the highest
    fixed rate."""
    max_rps: float = math.nan
    conn_per_request_rps: float = math.nan
    new_flow_packets: float = math.nan
    """Packets on the hop per ab request (a new connection, a new flow)."""
    quic_datagrams_per_new_flow: float = math.nan
    bulk_mbps: float = math.nan
    cpu_seconds_per_gb: float = math.nan
    failures: int = 0
    round: int = 0
    """Which round it was (added latency is against that round's direct path)."""


NFT_TABLE = "quicmesh_bench_overhead"


class HopCounter:
    """Packets on the hop between the two proxies, counted by nftables rules on the
    output hook (each loopback packet passes it once), per protocol: only inside the
    benchmark's private network namespace, never on the host's ruleset."""

    def __init__(self, enabled: bool) -> None:
        self.nft = which("nft") if enabled else None
        self.port: int | None = None

    def watch(self, port: int | None) -> None:
        """Count the packets to and from ``port`` (TCP and UDP) from now on."""
        self.port = port
        if self.nft is None or port is None:
            return
        # No client socket of this namespace may get the hop's port as its ephemeral port
        # (its packets would be counted as the hop's).
        with contextlib.suppress(OSError):
            Path("/proc/sys/net/ipv4/ip_local_reserved_ports").write_text(f"{port}\n")
        rules = "".join(
            f'add rule inet {NFT_TABLE} out {proto} {end} {port} counter comment "hop-{proto}"\n'
            for proto in ("tcp", "udp")
            for end in ("dport", "sport")
        )
        script = (
            f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
            f"add table inet {NFT_TABLE}\n"
            f"add chain inet {NFT_TABLE} out {{ type filter hook output priority 0; }}\n{rules}"
        )
        result = subprocess.run(
            [self.nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            self.nft = None  # counted as unknown from here on

    def read(self) -> tuple[int, int] | None:
        """``(tcp, udp)`` packets so far, or None when not counting."""
        if self.nft is None or self.port is None:
            return None
        result = subprocess.run(
            [self.nft, "-j", "list", "chain", "inet", NFT_TABLE, "out"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if result.returncode != 0:
            return None
        counts = parse_nft_counters(result.stdout)
        return counts.get("hop-tcp", 0), counts.get("hop-udp", 0)


@dataclass(frozen=True)
class Reading:
    """What changed over one load."""

    cpu: float
    wall: float
    hop_tcp: int | None
    """TCP segments on the hop (None: not counted)."""
    hop_udp: int | None
    """UDP datagrams on the hop; outside a namespace, the host's (all processes)."""


class Meter:
    """CPU of the proxies and the hop's packets around one load."""

    def __init__(self, proxies: Proxies, hop: HopCounter) -> None:
        self.pids = proxies.pids()
        self.hop = hop
        self.packets = hop.read()
        self.udp = udp_datagrams_sent()
        self.cpu = cpu_reading(self.pids)
        self.start = time.monotonic()

    def read(self) -> Reading:
        """The changes since creation."""
        cpu, wall = cpu_reading(self.pids) - self.cpu, time.monotonic() - self.start
        packets = self.hop.read()
        if packets is None or self.packets is None:
            return Reading(cpu, wall, None, udp_datagrams_sent() - self.udp)
        return Reading(cpu, wall, packets[0] - self.packets[0], packets[1] - self.packets[1])


def run_tool(command: list[str], timeout: float) -> str:
    """Run a load generator; its stdout, or BenchError with its last line."""
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(command[0]).name} did not finish within {timeout:g}s") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise BenchError(
            f"{Path(command[0]).name} failed ({result.returncode}): "
            f"{lines[-1] if lines else 'no output'}"
        )
    return result.stdout


def _ms(seconds: float) -> str:
    """A duration for h2load, which takes whole units (``1500ms``)."""
    return f"{max(1, round(seconds * 1000))}ms"


def _per(tcp: int | None, udp: int | None, requests: float) -> float:
    """Packets per request; NaN when a count is unknown."""
    if tcp is None or udp is None or requests <= 0:
        return math.nan
    return (tcp + udp) / requests


def measure(lab: Lab, spec: PathSpec, proxies: Proxies, plan: Plan) -> Sample:
    """Every load once against a started path."""
    h2load = require("h2load")
    url = f"http://{LOOPBACK}:{proxies.port}"
    sample = Sample()
    log = lab.workdir / "h2load.log"
    common = [h2load, "--h1", "-c", str(CONNECTIONS), "-t", "1"]
    # Warm-up: the tunnel's peer connection (a QUIC or TLS handshake) opens here.
    run_tool([*common, "-n", str(4 * CONNECTIONS), f"{url}/small"], 60)
    for rate in plan.rates:
        log.unlink(missing_ok=True)
        meter = Meter(proxies, lab.hop)
        out = run_tool(
            [
                *common, "--rps", f"{rate / CONNECTIONS:g}", "-D", _ms(plan.rate_seconds),
                "--warm-up-time", _ms(plan.warmup_seconds), "--log-file", str(log),
                f"{url}/small",
            ],
            plan.rate_seconds + plan.warmup_seconds + 60,
        )  # fmt: skip
        reading = meter.read()
        summary = parse_h2load_summary(out)
        sample.failures += summary.failed + summary.errored + summary.timeout
        latencies = parse_h2load_log(log.read_text())
        sample.latency_ms[rate] = [1000 * percentile(latencies, q) for q in (0.5, 0.9, 0.99)]
        sample.achieved_rps[rate] = summary.requests_per_second
        if rate == max(plan.rates):
            # CPU and packets over warm-up + main duration; requests of the main part
            # scaled up to the same span (the rate is fixed).
            requests = summary.requests_per_second * reading.wall
            if requests > 0:
                sample.vcpu_per_krps = 1000 * reading.cpu / requests
                sample.packets_per_request = _per(reading.hop_tcp, reading.hop_udp, requests)
                sample.quic_datagrams_per_request = _per(0, reading.hop_udp, requests)
    out = run_tool([*common, "-D", _ms(plan.max_seconds), f"{url}/small"], plan.max_seconds + 60)
    summary = parse_h2load_summary(out)
    sample.failures += summary.failed + summary.errored + summary.timeout
    sample.max_rps = summary.requests_per_second
    ab = require("ab")
    meter = Meter(proxies, lab.hop)
    out = run_tool(
        [ab, "-q", "-r", "-c", str(AB_CONCURRENCY), "-t", str(max(1, round(plan.ab_seconds))),
         "-n", "1000000", "-s", "10", f"{url}/small"],
        plan.ab_seconds + 60,
    )  # fmt: skip
    reading = meter.read()
    report = parse_ab(out)
    sample.failures += report.failed + report.non_2xx
    sample.conn_per_request_rps = report.requests_per_second
    if report.complete:
        sample.new_flow_packets = _per(reading.hop_tcp, reading.hop_udp, report.complete)
        sample.quic_datagrams_per_new_flow = _per(0, reading.hop_udp, report.complete)
    meter = Meter(proxies, lab.hop)
    out = run_tool([*common[:2], "-c", "1", "-n", "1", f"{url}/large"], 600)
    reading = meter.read()
    summary = parse_h2load_summary(out)
    if summary.succeeded != 1 or summary.data_bytes != lab.backend.bulk_bytes:
        sample.failures += 1
    else:
        sample.bulk_mbps = summary.data_bytes / summary.seconds / 1e6
        sample.cpu_seconds_per_gb = reading.cpu / (summary.data_bytes / 1e9)
    return sample


# -- the report ------------------------------------------------------------------------


def median(values: list[float]) -> float:
    """Median of the finite values; NaN if none."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


@dataclass
class Row:
    """A path's medians over the rounds."""

    path: str
    status: str = "ok"
    rounds: int = 0
    values: dict[str, float] = field(default_factory=dict)


def summarise(
    specs: list[PathSpec], samples: dict[str, list[Sample]], plan: Plan, why: dict[str, str]
) -> list[Row]:
    """Medians per path; added latency per round against that round's direct path."""
    direct = samples.get("direct", [])
    rows = []
    for spec in specs:
        runs = samples.get(spec.name, [])
        row = Row(spec.name, why.get(spec.name, "ok"), len(runs))
        if not runs:
            row.status = why.get(spec.name, "no run")
            rows.append(row)
            continue
        v = row.values
        for rate in plan.rates:
            for index, q in enumerate(("p50", "p90", "p99")):
                v[f"{q}_ms@{rate}"] = median([s.latency_ms[rate][index] for s in runs])
                if direct and spec.name != "direct":
                    # Paired by round: a round a path failed leaves its other rounds
                    # against their own (in order they shifted onto the next round's).
                    by_round = {d.round: d for d in direct}
                    added = [
                        s.latency_ms[rate][index] - by_round[s.round].latency_ms[rate][index]
                        for s in runs
                        if s.round in by_round
                    ]
                    v[f"added_{q}_ms@{rate}"] = median(added)
            v[f"rps@{rate}"] = median([s.achieved_rps[rate] for s in runs])
        v["vcpu_per_krps"] = median([s.vcpu_per_krps for s in runs])
        v["max_rps"] = median([s.max_rps for s in runs])
        v["conn_per_request_rps"] = median([s.conn_per_request_rps for s in runs])
        v["bulk_mbps"] = median([s.bulk_mbps for s in runs])
        v["cpu_s_per_gb"] = median([s.cpu_seconds_per_gb for s in runs])
        v["quic_datagrams_per_request"] = median([s.quic_datagrams_per_request for s in runs])
        v["quic_datagrams_per_new_flow"] = median([s.quic_datagrams_per_new_flow for s in runs])
        v["hop_packets_per_request"] = median([s.packets_per_request for s in runs])
        v["hop_packets_per_new_flow"] = median([s.new_flow_packets for s in runs])
        v["failures"] = float(sum(s.failures for s in runs))
        rows.append(row)
    return rows


RATIO_COLUMNS = (
    ("p90", "added_p90_ms@{top}", "lower"),
    ("vCPU", "vcpu_per_krps", "lower"),
    ("max", "max_rps", "higher"),
    ("cpr", "conn_per_request_rps", "higher"),
    ("MB/s", "bulk_mbps", "higher"),
    ("s/GB", "cpu_s_per_gb", "lower"),
)
"""Columns of the ratio tables: label, value key, which way is better."""
BASELINES = ("h2", "nghttpx", "haproxy")
"""Rows the others are divided by: issue 16's two (always shown), and the L4 floor
(shown when it ran)."""


def ratios(rows: list[Row], baseline: str, top: int) -> dict[str, dict[str, float]]:
    """Each row's value divided by the baseline row's, per ratio column."""
    base = next((r for r in rows if r.path == baseline and r.values), None)
    result: dict[str, dict[str, float]] = {}
    if base is None:
        return result
    for row in rows:
        if not row.values or row.path == "direct":
            continue
        cells = {}
        for label, key, _ in RATIO_COLUMNS:
            key = key.format(top=top)
            mine, theirs = row.values.get(key, math.nan), base.values.get(key, math.nan)
            cells[label] = mine / theirs if theirs and not math.isnan(theirs) else math.nan
        result[row.path] = cells
    return result


def _cell(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def render(rows: list[Row], plan: Plan, namespace: bool) -> str:
    """The tables as text (Markdown)."""
    top = max(plan.rates)
    lines = []
    rate_heads = " | ".join(f"added p50/p90/p99 ms @{r}" for r in plan.rates)
    lines.append(
        f"| path | {rate_heads} | vCPU/1000 rps (2 proxies) | max rps | conn-per-request rps "
        "| bulk MB/s | CPU s/GB (2 proxies) | QUIC dgrams/req | hop pkts/req | hop pkts/new flow |"
    )
    columns = 9 + len(plan.rates)
    lines.append("|" + "---|" * columns)
    for row in rows:
        if not row.values:
            lines.append(f"| {row.path} | {row.status} |" + " |" * (columns - 2))
            continue
        v = row.values
        cells = [row.path]
        for rate in plan.rates:
            if row.path == "direct":
                triple = [v[f"{q}_ms@{rate}"] for q in ("p50", "p90", "p99")]
                cells.append("(" + " / ".join(_cell(x) for x in triple) + ")")
            else:
                triple = [v.get(f"added_{q}_ms@{rate}", math.nan) for q in ("p50", "p90", "p99")]
                cell = " / ".join(("+" if x >= 0 else "") + _cell(x) for x in triple)
                achieved = v[f"rps@{rate}"]
                if achieved < 0.95 * rate:  # fell behind: the latency is queueing
                    cell += f" (only {achieved:,.0f} rps)"
                cells.append(cell)
        quic = row.path.startswith("quic")
        proxied = row.path != "direct"
        cells += [
            _cell(v["vcpu_per_krps"], 3) if proxied else "-",
            _cell(v["max_rps"], 0),
            _cell(v["conn_per_request_rps"], 0),
            _cell(v["bulk_mbps"], 1),
            _cell(v["cpu_s_per_gb"], 1) if proxied else "-",
            _cell(v["quic_datagrams_per_request"], 2) if quic else "-",
            _cell(v["hop_packets_per_request"], 2) if row.path != "direct" else "-",
            _cell(v["hop_packets_per_new_flow"], 2) if row.path != "direct" else "-",
        ]
        if v["failures"]:
            cells[0] += f" ({v['failures']:.0f} failed)"
        if row.status != "ok":
            cells[0] += f" ({row.status})"
        lines.append("| " + " | ".join(cells) + " |")
    for baseline in BASELINES:
        table = ratios(rows, baseline, top)
        if not table and baseline == "haproxy":
            continue
        if not table:
            lines.append(f"\n(no ratios against {baseline}: it did not run)")
            continue
        lines.append(f"\nRatios against {baseline} (same run; p90 = added p90 at {top} rps):\n")
        heads = " | ".join(f"{label} ({way})" for label, _, way in RATIO_COLUMNS)
        lines.append(f"| path | {heads} |")
        lines.append("|" + "---|" * (1 + len(RATIO_COLUMNS)))
        for path, ratio_cells in table.items():
            values = " | ".join(_cell(ratio_cells[label]) for label, _, _ in RATIO_COLUMNS)
            lines.append(f"| {path} | {values} |")
    if not namespace:
        lines.append(
            "\nNot in a private network namespace (run as root with unshare and nft for exact"
            " counts): hop packets are not counted, and QUIC datagrams are the host's UDP"
            " OutDatagrams (/proc/net/snmp), other processes' included."
        )
    return "\n".join(lines) + "\n"


# -- the command -----------------------------------------------------------------------


def _reexec_in_namespace(argv: list[str]) -> int | None:
    """As root with ``unshare``: run the benchmark again in a private network namespace
    (its own loopback and /proc/net/snmp). None when that is not possible."""
    unshare = shutil.which("unshare")
    if os.environ.get(NAMESPACE_ENV) or os.geteuid() != 0 or unshare is None:
        return None
    ip = which("ip")
    if ip is None:
        return None
    probe = subprocess.run(
        [unshare, "--net", ip, "link", "set", "lo", "up"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        return None
    env = child_environment()
    env[NAMESPACE_ENV] = "1"
    script = f'{ip} link set lo up && exec "$@"'
    command = [
        unshare, "--net", "sh", "-c", script, "sh",
        *python_command("-m", "quicmesh", "bench", "overhead", *argv),
    ]  # fmt: skip
    # The benchmark runs in the child, in a session of its own: ``kill PID`` (SIGTERM,
    # SIGHUP) and Ctrl-C reach this process only, which hands them on, once, so the
    # child stops its proxies and backend (the child ran on, orphaned, before).
    child = subprocess.Popen(command, env=env, start_new_session=True)
    taken = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    with signal_handlers(taken, lambda signum, frame: child.send_signal(signum)):
        return child.wait()


def build_parser() -> argparse.ArgumentParser:
    """The ``quicmesh bench overhead`` argument parser."""
    parser = OneLineParser(
        prog="quicmesh bench overhead",
        description=__doc__.split("\n")[0].split(": ", 1)[-1],
        epilog="Paths: "
        + ", ".join(PATHS)
        + " (quicmesh ones also as NAME/asyncio, NAME/uvloop; quic-native/ackN).",
    )
    parser.add_argument(
        "--paths", default=",".join(PATHS), help="comma-separated paths (default: all)"
    )
    parser.add_argument(
        "--engines",
        default=None,
        help="QUIC engines to run, aioquic,native (default both; short for the quic-* paths)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick 1)")
    parser.add_argument(
        "--rates", default=None, help="fixed keep-alive rates, rps (default 100,500,1000)"
    )
    parser.add_argument(
        "--seconds", type=positive_number, default=None, help="seconds per fixed rate (6)"
    )
    parser.add_argument(
        "--bulk", type=int, default=None, help="bulk download MB (default 256; --quick 8)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="rates 100,1000, 1 s loads, 8 MB, 1 round"
    )
    parser.add_argument(
        "--json", type=output_file, help="write the rows, ratios and settings to this file"
    )
    parser.add_argument(
        "--no-namespace",
        action="store_true",
        help="do not re-run in a private network namespace (root only)",
    )
    parser.add_argument(
        "--role", choices=("bench", "backend"), default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    return parser


MAX_RATE = 1_000_000
"""The highest ``--rates`` rate: h2load refused 1e22 and every round failed."""


def _plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    rates = plan.rates
    if args.rates:
        try:
            rates = tuple(int(r) for r in args.rates.split(","))
        except ValueError:
            raise BenchError(f"--rates {args.rates!r}: integers separated by commas") from None
        if not rates or min(rates) < 1 or max(rates) > MAX_RATE:
            raise BenchError(f"--rates: each rate must be 1 to {MAX_RATE:,} rps")
    rounds = plan.rounds if args.rounds is None else args.rounds
    if rounds < 1:
        raise BenchError("--rounds must be at least 1")
    seconds = plan.rate_seconds if args.seconds is None else args.seconds
    if seconds <= 0:
        raise BenchError("--seconds must be positive")
    bulk = plan.bulk_bytes if args.bulk is None else args.bulk * 10**6
    if bulk < 1:
        raise BenchError("--bulk must be at least 1 MB")
    return Plan(
        rates, seconds, plan.warmup_seconds, plan.max_seconds, plan.ab_seconds, bulk, rounds
    )


def _specs(args: argparse.Namespace) -> list[PathSpec]:
    try:
        specs = [PathSpec.parse(p.strip()) for p in args.paths.split(",") if p.strip()]
    except ValueError as exc:
        raise BenchError(f"--paths: {exc}") from None
    if args.engines is not None:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        bad = [e for e in engines if e not in ("aioquic", "native")]
        if bad:
            raise BenchError(f"--engines: unknown engine {bad[0]!r}: choose aioquic, native")
        specs = [
            s for s in specs if not s.base.startswith("quic-") or s.base.split("-")[1] in engines
        ]
    if not specs:
        raise BenchError("--paths: name at least one path")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BenchError("--paths: a path is named twice")
    return specs


def rotations(specs: list[PathSpec], rounds: int) -> Iterator[list[PathSpec]]:
    """The order of each round: the list rotated by one more place each time."""
    for index in range(rounds):
        shift = index % len(specs)
        yield specs[shift:] + specs[:shift]


def run(args: argparse.Namespace, report: Callable[[str], None]) -> dict[str, Any]:
    """Run every round; returns the JSON document (rows, ratios, settings)."""
    plan = _plan(args)
    specs = _specs(args)
    for tool in ("h2load", "ab"):
        require(tool)
    namespace = bool(os.environ.get(NAMESPACE_ENV))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = os.getloadavg()
    state = source_state()
    samples: dict[str, list[Sample]] = {}
    why: dict[str, str] = {}
    failed_rounds: dict[str, int] = {}
    with scratch_directory("quicmesh-bench-overhead-") as workdir:
        backend = Backend(workdir, plan.bulk_bytes)
        if backend.kind != "nginx":
            report("nginx is not installed (apt-get install nginx-light): the backend is a"
                   " Python HTTP/1.1 server, which limits every path's max rps")  # fmt: skip
        backend.start()
        try:
            lab = Lab(workdir, backend, namespace)
            for number, order in enumerate(rotations(specs, plan.rounds), 1):
                for spec in order:
                    if spec.name in why:
                        continue
                    try:
                        proxies = lab.start(spec)
                    except Unavailable as exc:
                        why[spec.name] = str(exc)
                        report(f"{spec.name}: skipped: {exc}")
                        continue
                    except BenchError as exc:
                        why[spec.name] = f"failed to start: {exc}"
                        report(f"{spec.name}: {why[spec.name]}")
                        continue
                    try:
                        sample = measure(lab, spec, proxies, plan)
                    except (BenchError, MeasureError) as exc:
                        # One path's failed round does not end the run; its row says so.
                        report(f"round {number} {spec.name}: failed: {exc}")
                        failed_rounds[spec.name] = failed_rounds.get(spec.name, 0) + 1
                        continue
                    finally:
                        proxies.stop()
                    sample.round = number
                    samples.setdefault(spec.name, []).append(sample)
                    top = max(plan.rates)
                    report(
                        f"round {number} {spec.name}: p90 {_cell(sample.latency_ms[top][1])} ms"
                        f" @{top}, max {_cell(sample.max_rps, 0)} rps,"
                        f" conn-per-request {_cell(sample.conn_per_request_rps, 0)} rps,"
                        f" bulk {_cell(sample.bulk_mbps, 1)} MB/s"
                        + (f", {sample.failures} failed" if sample.failures else "")
                    )
        finally:
            backend.stop()
    for name, count in failed_rounds.items():
        why.setdefault(name, f"{count} round(s) failed (see the lines above)")
    rows = summarise(specs, samples, plan, why)
    top = max(plan.rates)
    return {
        "started": started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "source": state,
        "backend": backend.kind,
        "network_namespace": namespace,
        "plan": asdict(plan),
        "rows": [asdict(r) for r in rows],
        "samples": {name: [asdict(s) for s in runs] for name, runs in samples.items()},
        "ratios": {b: ratios(rows, b, top) for b in BASELINES},
        "table": render(rows, plan, namespace),
    }


def _finite(value: Any) -> Any:
    """``value`` with NaN floats as None (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """``quicmesh bench overhead [--quick] [--rounds N] [--paths ...] [--json FILE]``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    if args.role == "backend":
        serve_backend(args.port, Path(args.root))
        return 0
    try:
        _plan(args), _specs(args)
        for tool in ("h2load", "ab"):
            require(tool)
    except BenchError as exc:
        print(f"quicmesh bench overhead: {exc}", file=sys.stderr)
        return 2
    if not args.no_namespace:
        code = _reexec_in_namespace(argv)
        if code is not None:
            return code
    try:
        # ``kill PID`` becomes SystemExit: the proxies and the backend are stopped.
        with terminate_as_exit():
            result = run(args, lambda line: print(line, file=sys.stderr, flush=True))
    except (QuicmeshError, MeasureError) as exc:
        print(f"quicmesh bench overhead: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(
        f"quicmesh bench overhead: {result['started']}, load average before"
        f" {result['load_average_before'][0]:.2f}, after {result['load_average_after'][0]:.2f};"
        f" backend {result['backend']}; {result['plan']['rounds']} round(s), medians"
        + ("; private network namespace" if result["network_namespace"] else "")
    )
    print(result["table"], end="")
    if args.json:
        Path(args.json).write_text(json.dumps(_finite(result), indent=2) + "\n")
    if not result["samples"]:  # (every path skipped or failed: it exited 0)
        print("quicmesh bench overhead: no path was measured (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
