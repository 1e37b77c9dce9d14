"""End to end: the native engine splices sidecar flows (``splice``, on by default).

Two ``quicmesh sidecar`` processes as the README runs them; sidecar A's clusters and
sidecar B's inbound listeners run on the native engine, so both sides hand each
flow's TCP connection and QUIC stream to the engine after the CONNECT exchange.
``quicmesh_listener_streams_spliced`` proves the engine carried the flows; the
bytes, half-closes, resets, drain and access-log counts must be what the Python
pump gives. The backend here is a small threaded TCP app that speaks first (a
banner right after accept, so bytes reach B's sidecar before the stream is handed
over and A's stream together with the CONNECT's answer) and reports what it saw.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from quic_helpers import require_engine

from quicmesh import DevCA, QuicTransport
from quicmesh.sidecar.launch import LOOPBACK, SidecarProcess, free_port, free_ports, metric

from .conftest import IDENTITY_A, IDENTITY_B, addr, wait_until

BANNER = b"+READY\n"
HOLDING = b"+HOLDING\n"


class _App(socketserver.StreamRequestHandler):
    """One command line after the banner:

    * ``echo``: echo until EOF, then half-close;
    * ``download N``: send N bytes (a counter pattern) and half-close, then read until
      EOF and record what came (the other direction stays open after a FIN);
    * ``rst``: close with RST at once;
    * ``hold NAME``: say ``+HOLDING``, read until EOF or an error and record which
      (``eof`` / ``reset``).
    """

    server: _AppServer

    def handle(self) -> None:
        sock = self.connection
        sock.sendall(BANNER)
        line = self.rfile.readline().decode().split()
        if not line:
            return
        if line[0] == "echo":
            while data := self.rfile.read1(65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        elif line[0] == "download":
            sock.sendall(pattern(int(line[1])))
            sock.shutdown(socket.SHUT_WR)
            self.server.seen[line[2]] = self.rfile.read()
        elif line[0] == "rst":
            # Closed here, with RST (socketserver would half-close it first).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        elif line[0] == "hold":
            sock.sendall(HOLDING)  # the command is read: a reset now reaches the loop below
            try:
                while self.rfile.read1(65536):
                    pass
                self.server.seen[line[1]] = b"eof"
            except ConnectionResetError:
                self.server.seen[line[1]] = b"reset"
            self.server.seen_event.set()


class _AppServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # (socketserver's 5 overflows with 40 flows at once)

    def __init__(self) -> None:
        super().__init__((LOOPBACK, 0), _App)
        self.seen: dict[str, bytes] = {}
        self.seen_event = threading.Event()


def pattern(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


@pytest.fixture(scope="module")
def app() -> Iterator[_AppServer]:
    server = _AppServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class SpliceMesh:
    """Sidecar B (inbound listeners on both engines) and sidecar A (one cluster per case)."""

    def __init__(
        self, workdir: Path, app_port: int, clusters: dict[str, dict[str, Any]], name: str
    ) -> None:
        self.ports = dict(zip(("native", "aioquic", "native_off"), free_ports(3), strict=True))
        app = addr(app_port)
        inbound: list[dict[str, Any]] = [
            {
                "name": "mesh_native",
                "address": addr(self.ports["native"]),
                "transports": ["quic"],
                "engine": "native",
                "destinations": [app],
            },
            {
                "name": "mesh_aioquic",
                "address": addr(self.ports["aioquic"]),
                "transports": ["quic"],
                "engine": "aioquic",
                "destinations": [app],
            },
            {
                "name": "mesh_native_off",
                "address": addr(self.ports["native_off"]),
                "transports": ["quic"],
                "engine": "native",
                "splice": False,
                "destinations": [app],
            },
        ]
        self.b = SidecarProcess(
            f"b-{name}",
            {
                "node": {"name": "b", "identity": IDENTITY_B},
                "tls": {"ca_dir": str(workdir / "ca")},
                "admin": {"address": addr(free_port())},
                "drain": {"grace_period": "10s"},
                "listeners": {"inbound": inbound},
            },
            workdir,
        )
        self.listen = {name: free_port() for name in clusters}
        a_clusters = []
        for cluster, options in clusters.items():
            inbound_name = options.pop("to")
            a_clusters.append(
                {
                    "name": cluster,
                    "transport": "quic",
                    "target": app,
                    "endpoints": [addr(self.ports[inbound_name])],
                    **options,
                }
            )
        self.a = SidecarProcess(
            f"a-{name}",
            {
                "node": {"name": "a", "identity": IDENTITY_A},
                "tls": {"ca_dir": str(workdir / "ca")},
                "admin": {"address": addr(free_port())},
                "drain": {"grace_period": "10s"},
                "listeners": {
                    "outbound": [
                        {"name": name, "address": addr(port), "cluster": name}
                        for name, port in self.listen.items()
                    ]
                },
                "clusters": a_clusters,
            },
            workdir,
        )

    def __enter__(self) -> SpliceMesh:
        self.b.start()
        self.a.start()
        self.b.wait_ready()
        self.a.wait_ready()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.a.stop()
        self.b.stop()

    def spliced(self, side: str, listener: str) -> float:
        sidecar = self.a if side == "a" else self.b
        return metric(
            sidecar.metrics(), "quicmesh_listener_streams_spliced_total", listener=listener
        )


async def open_flow(port: int, command: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect through a listener and send the command at once (before any answer)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(command.encode() + b"\n")
    return reader, writer


async def echo(port: int, payload: bytes) -> bytes:
    """An echo flow: the payload follows the command immediately, then half-close."""
    reader, writer = await open_flow(port, "echo")
    try:

        async def send() -> None:
            for offset in range(0, len(payload), 65536):
                writer.write(payload[offset : offset + 65536])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        received = await asyncio.wait_for(reader.read(-1), 60)
        await sender
        return received
    finally:
        writer.close()


def sizes() -> list[int]:
    return [0, 1, 1000, 65_535, 65_536, 300_001, 1 << 20, 3 * (1 << 20) + 7]


def test_native_flows_are_spliced_on_both_sides_and_lose_nothing(
    workdir: Path, app: _AppServer
) -> None:
    require_engine("native")
    clusters = {
        "native": {"engine": "native", "to": "native"},
        "native_off": {"engine": "native", "to": "native", "splice": False},
    }
    with SpliceMesh(workdir, app.server_address[1], clusters, "splice") as mesh:
        payloads = [os.urandom(size) for size in sizes()] * 2

        async def main() -> list[bytes]:
            return await asyncio.gather(*(echo(mesh.listen["native"], p) for p in payloads))

        results = asyncio.run(main())
        for sent, got in zip(payloads, results, strict=True):
            assert got[: len(BANNER)] == BANNER
            assert hashlib.sha256(got[len(BANNER) :]).digest() == hashlib.sha256(sent).digest()
        flows = len(payloads)

        def counted() -> bool:
            lines = [r for r in mesh.a.access_log() if r["listener"] == "native"]
            served = [r for r in mesh.b.access_log() if r["listener"] == "mesh_native"]
            return len(lines) == flows and len(served) == flows

        wait_until(counted, what="both access logs")
        assert mesh.spliced("a", "native") == flows
        assert mesh.spliced("b", "mesh_native") == flows
        command = len(b"echo\n")
        out = sorted(r["bytes_sent"] for r in mesh.a.access_log() if r["listener"] == "native")
        back = sorted(r["bytes_received"] for r in mesh.a.access_log() if r["listener"] == "native")
        assert out == sorted(len(p) + command for p in payloads)
        assert back == sorted(len(p) + len(BANNER) for p in payloads)
        served = [r for r in mesh.b.access_log() if r["listener"] == "mesh_native"]
        # B's line counts from the destination's side: sent to it, received from it.
        assert sorted(r["bytes_sent"] for r in served) == out
        assert sorted(r["bytes_received"] for r in served) == back
        assert {r["outcome"] for r in served} == {"completed"}
        samples = mesh.a.metrics()
        assert metric(samples, "quicmesh_listener_bytes_received_total", listener="native") == (
            sum(out)
        )
        assert metric(samples, "quicmesh_cluster_bytes_received_total", cluster="native") == (
            sum(back)
        )
        assert metric(samples, "quicmesh_cluster_streams_active", cluster="native") == 0
        assert metric(samples, "quicmesh_listener_streams_active", listener="native") == 0

        # splice: false on the cluster: the same flows, copied by the sidecar (A), while
        # B (the same native listener) still splices.
        async def unspliced() -> list[bytes]:
            return await asyncio.gather(*(echo(mesh.listen["native_off"], p) for p in payloads[:4]))

        for sent, got in zip(payloads, asyncio.run(unspliced()), strict=False):
            assert got == BANNER + sent
        wait_until(lambda: mesh.spliced("b", "mesh_native") == flows + 4, what="B spliced the 4")
        assert mesh.spliced("a", "native_off") == 0


def test_half_close_both_ways_and_resets_both_ways(workdir: Path, app: _AppServer) -> None:
    require_engine("native")
    clusters = {"native": {"engine": "native", "to": "native"}}
    with SpliceMesh(workdir, app.server_address[1], clusters, "splice-rst") as mesh:
        port = mesh.listen["native"]

        async def download() -> tuple[bytes, bool]:
            # The backend's FIN comes first; our direction stays open and our bytes
            # still arrive after it (QUIC FIN -> shutdown(SHUT_WR), then TCP FIN -> FIN).
            reader, writer = await open_flow(port, "download 2000000 dl")
            got = await asyncio.wait_for(reader.read(-1), 60)
            writer.write(b"thanks after your FIN")
            await writer.drain()
            writer.write_eof()
            await asyncio.to_thread(wait_until, lambda: "dl" in app.seen, 10.0, "upload seen")
            writer.close()
            return got, app.seen["dl"] == b"thanks after your FIN"

        got, upload_arrived = asyncio.run(download())
        assert got == BANNER + pattern(2_000_000)
        assert upload_arrived

        async def backend_resets() -> str:
            reader, writer = await open_flow(port, "rst")
            try:
                data = await asyncio.wait_for(reader.read(-1), 20)
            except ConnectionResetError:
                return "reset"
            finally:
                writer.close()
            return f"clean end after {data!r}"

        assert asyncio.run(backend_resets()) == "reset"

        async def app_resets() -> None:
            reader, writer = await open_flow(port, "hold app-rst")
            answer = await asyncio.wait_for(reader.readexactly(len(BANNER + HOLDING)), 20)
            assert answer == BANNER + HOLDING
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

        app.seen_event.clear()
        asyncio.run(app_resets())
        wait_until(lambda: "app-rst" in app.seen, 20.0, "the backend saw the flow end")
        assert app.seen["app-rst"] == b"reset"

        def logged() -> list[dict[str, Any]]:
            a_lines = [r for r in mesh.a.access_log() if r["listener"] == "native"]
            b_lines = [r for r in mesh.b.access_log() if r["listener"] == "mesh_native"]
            return a_lines + b_lines if len(a_lines) == len(b_lines) == 3 else []

        lines = wait_until(logged, what="three flows logged by both")
        assert [r["outcome"] for r in lines] == ["completed", "reset", "reset"] * 2
        # Each side names the end that failed: A hears of the backend's reset as its
        # peer's destination reset, B of the client's as its peer's client reset (the
        # native engine said "destination connect error" both ways, and a reset of the
        # destination mid-flow is no connect error).
        reasons = [r["reason"] for r in lines]
        assert "destination TCP reset by peer" in reasons[1], reasons
        assert "client TCP reset by peer" in reasons[5], reasons
        assert "Connection reset by peer" in reasons[2] + reasons[4], reasons
        assert mesh.spliced("a", "native") == 3
        assert mesh.spliced("b", "mesh_native") == 3
        samples = mesh.a.metrics()
        assert metric(samples, "quicmesh_cluster_streams_active", cluster="native") == 0
        # The connection carried on: a new flow after the resets is fine.
        assert asyncio.run(echo(port, b"still here")) == BANNER + b"still here"


def test_mixed_engines_splice_only_on_the_native_side(workdir: Path, app: _AppServer) -> None:
    require_engine("native")
    clusters = {
        "native_to_aioquic": {"engine": "native", "to": "aioquic"},
        "aioquic_to_native": {"engine": "aioquic", "to": "native"},
    }
    with SpliceMesh(workdir, app.server_address[1], clusters, "splice-mixed") as mesh:
        payloads = [os.urandom(size) for size in (0, 5000, 700_000)]

        async def main() -> list[list[bytes]]:
            return [
                await asyncio.gather(*(echo(mesh.listen[name], p) for p in payloads))
                for name in clusters
            ]

        for results in asyncio.run(main()):
            assert results == [BANNER + p for p in payloads]
        flows = len(payloads)
        wait_until(lambda: mesh.spliced("b", "mesh_native") == flows, what="B's native listener")
        assert mesh.spliced("a", "native_to_aioquic") == flows
        assert mesh.spliced("a", "aioquic_to_native") == 0
        assert mesh.spliced("b", "mesh_aioquic") == 0


def test_drain_waits_for_spliced_flows_and_loses_nothing(workdir: Path, app: _AppServer) -> None:
    require_engine("native")
    clusters = {"native": {"engine": "native", "to": "native"}}
    with SpliceMesh(workdir, app.server_address[1], clusters, "splice-drain") as mesh:
        port = mesh.listen["native"]
        payloads = [os.urandom(200_000 + i) for i in range(8)]
        # The first flow dials: the 8 below start at once on its connection, each an
        # engine flow (run by the engine from accept to end).
        assert asyncio.run(echo(port, b"dial")) == BANNER + b"dial"

        async def main() -> list[bytes]:
            flows = [await open_flow(port, "echo") for _ in payloads]
            for reader, _ in flows:
                assert await asyncio.wait_for(reader.readexactly(len(BANNER)), 20) == BANNER
            # Every flow is established through both sidecars (the banner crossed
            # them, so both spliced it): drain both.
            await asyncio.to_thread(
                wait_until,
                lambda: mesh.b.stats()["listeners"]["mesh_native"]["streams_active"] == len(flows),
                10.0,
                "flows established",
            )
            mesh.a.signal(signal.SIGTERM)
            mesh.b.signal(signal.SIGTERM)
            await asyncio.to_thread(
                wait_until,
                lambda: mesh.a.request("GET", "/ready")[0] == 503,
                10.0,
                "A draining",
            )

            async def finish(flow: Any, payload: bytes) -> bytes:
                reader, writer = flow
                writer.write(payload)
                await writer.drain()
                writer.write_eof()
                data: bytes = await asyncio.wait_for(reader.read(-1), 60)
                writer.close()
                return data

            return await asyncio.gather(
                *(finish(f, p) for f, p in zip(flows, payloads, strict=True))
            )

        assert asyncio.run(main()) == payloads
        assert mesh.a.process is not None and mesh.a.process.wait(20) == 0
        assert mesh.b.process is not None and mesh.b.process.wait(20) == 0
        lines = [r for r in mesh.a.access_log() if r["listener"] == "native"]
        assert sorted(r["bytes_sent"] for r in lines) == sorted(
            len(p) + 5 for p in [b"dial", *payloads]
        )
        assert {r["outcome"] for r in lines} == {"completed"}
        assert "drained in" in mesh.a.stderr()


@pytest.mark.parametrize("client_engine", ["native", "aioquic"])
def test_a_client_closing_right_after_the_end_leaves_completed_flows(
    workdir: Path, app: _AppServer, client_engine: str
) -> None:
    # A mesh client (no sidecar) closes its connection the moment it has read the
    # echo's end: its close can overtake its acknowledgement of B's last bytes and
    # FIN. Every byte was delivered, so B's access log says completed (B's splice
    # once recorded such flows as reset); the same with splice: false.
    require_engine("native")
    require_engine(client_engine)
    rounds = 20
    clusters = {"native": {"engine": "native", "to": "native"}}
    with SpliceMesh(
        workdir, app.server_address[1], clusters, f"splice-closer-{client_engine}"
    ) as mesh:
        ca = DevCA.load(workdir / "ca")
        client = QuicTransport(
            identity=ca.issue(IDENTITY_A), trust=ca.trust_bundle, engine=client_engine
        )
        payload = b"p" * 100

        async def main(listener: str) -> None:
            for _ in range(rounds):
                connection = await client.connect((LOOPBACK, mesh.ports[listener]))
                stream = await connection.open_stream(addr(app.server_address[1]))
                stream.write(b"echo\n" + payload)
                stream.write_eof()
                assert await asyncio.wait_for(stream.read(-1), 20) == BANNER + payload
                connection.close()
                await connection.wait_closed()

        for listener in ("native", "native_off"):
            asyncio.run(main(listener))

            def served(name: str = f"mesh_{listener}") -> list[dict[str, Any]]:
                return [r for r in mesh.b.access_log() if r["listener"] == name]

            wait_until(lambda: len(served()) == rounds, what=f"{rounds} flows on {listener}")
            reset = [r["reason"] for r in served() if r["outcome"] != "completed"]
            assert not reset, f"{listener}: {len(reset)} of {rounds} not completed: {reset[0]}"
        assert mesh.spliced("b", "mesh_native") == rounds
        assert mesh.spliced("b", "mesh_native_off") == 0


def test_outbound_flows_run_in_the_engine_and_come_back_without_their_200(
    workdir: Path, app: _AppServer
) -> None:
    """Once a cluster's connection is up, its listener's flows are engine flows
    (``quicmesh_listener_engine_flows_total``), to either engine of B (both answer with
    the plain 200 the engine compares with), traced as any flow (the same ``flow_id`` in
    both access logs). A refused flow comes back to the sidecar with B's answer, read
    from its frame: the sidecar logs the refusal with B's reason and does not ask B
    again (B refuses each flow once)."""
    require_engine("native")
    refused_target = addr(free_port())  # not among B's destinations
    clusters = {
        "to_native": {"engine": "native", "to": "native"},
        "to_aioquic": {"engine": "native", "to": "aioquic"},
        "refused": {"engine": "native", "to": "native", "target": refused_target},
    }
    with SpliceMesh(workdir, app.server_address[1], clusters, "engine-flows") as mesh:
        payloads = [os.urandom(size) for size in (0, 1, 5000, 70_000, 300_000, 1 << 20)]
        for name in ("to_native", "to_aioquic"):
            port = mesh.listen[name]
            assert asyncio.run(echo(port, b"dial")) == BANNER + b"dial"  # the first dials

            async def main(port: int = port) -> list[bytes]:
                return await asyncio.gather(*(echo(port, p) for p in payloads))

            assert asyncio.run(main()) == [BANNER + p for p in payloads]
        samples = mesh.a.metrics()
        for name in ("to_native", "to_aioquic"):
            engine_flows = metric(samples, "quicmesh_listener_engine_flows_total", listener=name)
            assert engine_flows == len(payloads), name
            assert (
                metric(samples, "quicmesh_listener_engine_flows_returned_total", listener=name) == 0
            )
            assert metric(samples, "quicmesh_listener_streams_active", listener=name) == 0
            assert metric(samples, "quicmesh_cluster_streams_active", cluster=name) == 0

        def logged() -> bool:
            a_lines = [r for r in mesh.a.access_log() if r["listener"] == "to_native"]
            b_lines = [r for r in mesh.b.access_log() if r["listener"] == "mesh_native"]
            return len(a_lines) == len(b_lines) == len(payloads) + 1

        wait_until(logged, what="the flows to B's native listener, logged by both")
        # B's native listener ran the engine flows' CONNECTs (static QPACK table only)
        # as inbound engine flows too; its aioquic listener cannot.
        b_samples = mesh.b.metrics()
        engine_in = metric(
            b_samples, "quicmesh_listener_engine_flows_total", listener="mesh_native"
        )
        assert len(payloads) <= engine_in <= len(payloads) + 1
        assert (
            metric(b_samples, "quicmesh_listener_engine_flows_total", listener="mesh_aioquic") == 0
        )
        a_lines = [r for r in mesh.a.access_log() if r["listener"] == "to_native"]
        b_lines = [r for r in mesh.b.access_log() if r["listener"] == "mesh_native"]
        assert {r["flow_id"] for r in a_lines} == {r["flow_id"] for r in b_lines}
        assert {r["outcome"] for r in a_lines} == {"completed"}
        assert sorted(r["bytes_sent"] for r in a_lines) == sorted(
            len(p) + len(b"echo\n") for p in [b"dial", *payloads]
        )

        async def refused() -> bytes:
            try:
                reader, writer = await open_flow(mesh.listen["refused"], "echo")
            except ConnectionResetError:  # the reset came before the client saw its connect
                return b"reset"
            try:
                return await asyncio.wait_for(reader.read(-1), 20)
            except ConnectionResetError:
                return b"reset"
            finally:
                writer.close()

        assert asyncio.run(refused()) == b"reset"  # dials, then refused in Python
        assert asyncio.run(refused()) == b"reset"  # an engine flow, back with B's answer

        def refusals() -> list[dict[str, Any]]:
            lines = [r for r in mesh.a.access_log() if r["listener"] == "refused"]
            return lines if len(lines) == 2 else []

        lines = wait_until(refusals, what="both refusals logged")
        assert [r["outcome"] for r in lines] == ["refused", "refused"]
        assert all(refused_target in r["reason"] for r in lines), lines

        # B refused both CONNECTs (the dial's and the engine flow's: it was not asked
        # again, as it was before the engine handed the answer back) by policy, the
        # usual way: none became an inbound engine flow. (B logs a refusal before it
        # answers, so a CONNECT asked again would have been logged by now.)
        def b_refusals() -> list[dict[str, Any]]:
            lines = [r for r in mesh.b.access_log() if r["target"] == refused_target]
            return lines if len(lines) >= 2 else []

        b_lines = wait_until(b_refusals, what="B's refusals logged")
        assert len(b_lines) == 2, b_lines
        assert {r["outcome"] for r in b_lines} == {"refused"}
        assert (
            metric(
                mesh.a.metrics(),
                "quicmesh_listener_engine_flows_returned_total",
                listener="refused",
            )
            == 1
        )
        assert all("is not allowed" in r["reason"] for r in b_lines), b_lines
        b_samples = mesh.b.metrics()
        assert (
            metric(b_samples, "quicmesh_listener_engine_flows_total", listener="mesh_native")
            == engine_in
        )
        for gauge in ("streams_active", "connections_active"):
            name = f"quicmesh_listener_{gauge}"
            assert metric(b_samples, name, listener="mesh_native") == 0, gauge
        samples = mesh.a.metrics()
        assert metric(samples, "quicmesh_listener_engine_flows_total", listener="refused") == 0
        returned = "quicmesh_listener_engine_flows_returned_total"
        assert metric(samples, returned, listener="refused") == 1
        assert metric(samples, "quicmesh_cluster_streams_active", cluster="refused") == 0
        assert metric(samples, "quicmesh_cluster_streams_total", cluster="refused") == 0
        # A refusal is the endpoint's answer, not its failure.
        assert metric(samples, "quicmesh_cluster_connect_failures_total", cluster="refused") == 0


def test_engine_flows_at_the_peers_stream_limit_balance_their_counts(
    workdir: Path, app: _AppServer
) -> None:
    """40 flows at once on a connection B allows 4 streams: those that find no stream
    credit go the usual way (and wait for it; most of them here), the others run in the
    engine; every byte arrives and every gauge is back to 0 afterwards."""
    require_engine("native")
    clusters = {"native": {"engine": "native", "to": "native"}}
    mesh = SpliceMesh(workdir, app.server_address[1], clusters, "engine-flows-limit")
    mesh.b.config["listeners"]["inbound"][0]["max_streams"] = 4
    with mesh:
        port = mesh.listen["native"]
        assert asyncio.run(echo(port, b"dial")) == BANNER + b"dial"
        payloads = [os.urandom(20_000 + i) for i in range(40)]

        async def main() -> list[bytes]:
            return await asyncio.gather(*(echo(port, p) for p in payloads))

        assert asyncio.run(main()) == [BANNER + p for p in payloads]

        def logged() -> list[dict[str, Any]]:
            lines = [r for r in mesh.a.access_log() if r["listener"] == "native"]
            return lines if len(lines) == len(payloads) + 1 else []

        lines = wait_until(logged, what="every flow logged")
        assert {r["outcome"] for r in lines} == {"completed"}
        samples = mesh.a.metrics()
        engine_flows = metric(samples, "quicmesh_listener_engine_flows_total", listener="native")
        assert 1 <= engine_flows <= len(payloads)
        returned = "quicmesh_listener_engine_flows_returned_total"
        assert metric(samples, returned, listener="native") == 0  # no credit: never started
        assert mesh.spliced("a", "native") == len(payloads) + 1
        for gauge, label in (
            ("quicmesh_listener_streams_active", {"listener": "native"}),
            ("quicmesh_listener_connections_active", {"listener": "native"}),
            ("quicmesh_cluster_streams_active", {"cluster": "native"}),
        ):
            assert metric(samples, gauge, **label) == 0, gauge
        assert (
            mesh.a.stats()["clusters"]["native"]["endpoints"][addr(mesh.ports["native"])][
                "streams_active"
            ]
            == 0
        )


def test_a_reload_moves_accepting_between_python_and_the_engine(
    workdir: Path, app: _AppServer
) -> None:
    """A reload that turns the cluster's splicing off hands accepting back to Python
    (no engine flow after it), and one that adds a listener with a new native cluster
    starts it accepting in the engine (the new clusters decide, not the old ones)."""
    require_engine("native")
    clusters = {"native": {"engine": "native", "to": "native"}}
    with SpliceMesh(workdir, app.server_address[1], clusters, "engine-flows-reload") as mesh:
        port = mesh.listen["native"]

        def engine_flows(listener: str) -> float:
            return metric(
                mesh.a.metrics(), "quicmesh_listener_engine_flows_total", listener=listener
            )

        def reload(config: dict[str, Any], count: int) -> None:
            mesh.a.write_config(config)
            mesh.a.signal(signal.SIGHUP)
            wait_until(lambda: mesh.a.stats()["reloads"]["ok"] == count, what=f"reload {count}")

        assert asyncio.run(echo(port, b"dial")) == BANNER + b"dial"
        assert asyncio.run(echo(port, b"engine")) == BANNER + b"engine"
        assert engine_flows("native") == 1
        config = yaml.safe_load(yaml.safe_dump(mesh.a.config))
        config["clusters"][0]["splice"] = False
        new_port = free_port()
        config["listeners"]["outbound"].append(
            {"name": "added", "address": addr(new_port), "cluster": "added"}
        )
        config["clusters"].append({**config["clusters"][0], "name": "added", "splice": True})
        reload(config, 1)
        for _ in range(3):
            assert asyncio.run(echo(port, b"python")) == BANNER + b"python"
        assert engine_flows("native") == 1  # no more: the cluster no longer splices
        assert asyncio.run(echo(new_port, b"dial")) == BANNER + b"dial"
        assert asyncio.run(echo(new_port, b"engine")) == BANNER + b"engine"
        assert engine_flows("added") == 1
