"""Dead peers, hung peers and blocked UDP between real sidecar processes (issue 12).

Each test builds a :class:`~quicmesh.netem.Link` (two network namespaces joined
by the emulator, a perfect link): sidecar A, its outbound listener and the
application's flows in the client namespace; peer sidecars and an echo app in
the server namespace, each a ``python -m quicmesh sidecar`` process. UDP is
blocked with an nftables table inside the server namespace only. Nothing
sleeps to synchronise: state is polled (A's admin ``/stats``) with deadlines;
the bounds in seconds are the ones issue 12 asks for.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from quic_helpers import require_engine

from quicmesh import ConnectError, DevCA, QuicTransport
from quicmesh.netem import Link
from quicmesh.sidecar.launch import SidecarProcess, metric

pytestmark = pytest.mark.netns

IDENTITY_A = "spiffe://mesh.local/ns/default/sa/productpage"
IDENTITY_B = "spiffe://mesh.local/ns/default/sa/reviews"
ECHO_PORT = 9080
OUTBOUND_PORT = 15001
ADMIN_PORT = 15000
PEER_PORTS = (15008, 15018)
"""Inbound ports of the peer sidecars B1 and B2 (UDP and TCP, one number each)."""

T = TypeVar("T")


# -- the set-up ---------------------------------------------------------------------


class Echo:
    """An echo app in the server namespace that notes when each connection ended."""

    def __init__(self) -> None:
        self.ended: list[float] = []

    async def serve(self, host: str) -> None:
        writers: set[asyncio.StreamWriter] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.add(writer)
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
                await writer.drain()
            except OSError:
                pass
            finally:
                self.ended.append(time.monotonic())
                writer.close()

        server = await asyncio.start_server(handle, host, ECHO_PORT)
        try:
            async with server:
                await server.serve_forever()
        finally:
            # Cancelled at the link's tear-down: the connections' sockets are closed by a
            # callback of this loop, which must run before the loop closes (else each is
            # left to the garbage collector, with a ResourceWarning in a later test).
            for writer in writers:
                writer.close()
            await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


class Mesh:
    """Sidecar A (client namespace) and peers B1, B2 (server namespace) on one link."""

    def __init__(self, link: Link, workdir: Path) -> None:
        self.link = link
        self.workdir = workdir
        self.ca_dir = workdir / "ca"
        DevCA().save(self.ca_dir)
        self.peers: dict[int, SidecarProcess] = {}
        self.a: SidecarProcess | None = None

    def _start(self, side: str, sidecar: SidecarProcess) -> None:
        sidecar.write_config()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        with open(sidecar.stdout_path, "ab") as out, open(sidecar.stderr_path, "ab") as err:
            sidecar.process = self.link.popen(
                side,  # type: ignore[arg-type]
                [sys.executable, "-m", "quicmesh", "sidecar", "-c", str(sidecar.config_path)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        with self.link.entered(side):  # type: ignore[arg-type]
            sidecar.wait_ready(30.0)

    def start_peer(self, port: int) -> SidecarProcess:
        host = self.link.server_address
        config = {
            "node": {"name": f"b{port}", "identity": IDENTITY_B},
            "tls": {"ca_dir": str(self.ca_dir)},
            "admin": {"address": f"{host}:{port + 1}"},
            "listeners": {
                "inbound": [
                    {
                        "name": "mesh",
                        "address": f"{host}:{port}",
                        "transports": ["quic", "h2"],
                        "destinations": [f"{host}:{ECHO_PORT}"],
                    }
                ]
            },
        }
        peer = SidecarProcess(f"b{port}", config, self.workdir)
        self._start("server", peer)
        self.peers[port] = peer
        return peer

    def start_a(self, transport: str, ports: tuple[int, ...], **cluster: Any) -> SidecarProcess:
        server = self.link.server_address
        client = self.link.client_address
        config = {
            "node": {"name": "a", "identity": IDENTITY_A},
            "tls": {"ca_dir": str(self.ca_dir)},
            "admin": {"address": f"{client}:{ADMIN_PORT}"},
            "listeners": {
                "outbound": [
                    {"name": "app", "address": f"{client}:{OUTBOUND_PORT}", "cluster": "b"}
                ]
            },
            "clusters": [
                {
                    "name": "b",
                    "transport": transport,
                    "target": f"{server}:{ECHO_PORT}",
                    "endpoints": [f"{server}:{port}" for port in ports],
                    "connect_timeout": "2s",
                    **cluster,
                }
            ],
        }
        self.a = SidecarProcess("a", config, self.workdir)
        self._start("client", self.a)
        return self.a

    def stats(self) -> dict[str, Any]:
        assert self.a is not None
        with self.link.entered("client"):
            return self.a.stats()["clusters"]["b"]  # type: ignore[no-any-return]

    def block_udp(self) -> None:
        """Drop every UDP datagram arriving in the server namespace (no ICMP answer)."""
        script = (
            "table inet qm_issue12 {\n"
            "  chain input { type filter hook input priority 0; policy accept;\n"
            "    meta l4proto udp drop\n"
            "  }\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", self.link.server_ns, "nft", "-f", "-"],
            input=script.encode(),
            check=True,
        )

    def unblock_udp(self) -> None:
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.link.server_ns,
                "nft",
                "delete",
                "table",
                "inet",
                "qm_issue12",
            ],
            check=True,
        )


def poll(predicate: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def mesh(tmp_path: Path) -> Any:
    with Link() as link:
        echo = Echo()
        link.run_in_thread("server", echo.serve, link.server_address)
        built = Mesh(link, tmp_path)
        built.echo = echo  # type: ignore[attr-defined]
        try:
            yield built
        finally:
            for sidecar in [built.a, *built.peers.values()]:
                if sidecar is not None and sidecar.process is not None:
                    sidecar.signal(signal.SIGCONT)
                    sidecar.process.kill()
                    sidecar.process.wait()


# -- flows from the application, in the client namespace -------------------------------


class Flow:
    """One application TCP connection through A's outbound listener, held open."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, link: Link) -> Flow:
        with link.entered("client"):
            reader, writer = await asyncio.open_connection(link.client_address, OUTBOUND_PORT)
        flow = cls(reader, writer)
        assert await flow.echo(b"hello") == b"hello"
        return flow

    async def echo(self, data: bytes) -> bytes:
        self.writer.write(data)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(len(data)), 10)

    async def wait_reset(self, timeout: float) -> float:
        """Seconds until the connection is reset (an EOF is a failure: the flow
        must not look complete)."""
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            raise AssertionError(f"expected a reset, got {data!r}")
        return time.monotonic() - started

    def close(self) -> None:
        self.writer.close()


async def transfer(link: Link, size: int) -> tuple[float, bool]:
    """A whole flow: ``size`` bytes there and back; time to first byte, all bytes intact."""
    payload = os.urandom(size)
    started = time.monotonic()
    with link.entered("client"):
        reader, writer = await asyncio.open_connection(link.client_address, OUTBOUND_PORT)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    first = await asyncio.wait_for(reader.read(1), 10)
    first_byte = time.monotonic() - started
    rest = await asyncio.wait_for(reader.read(), 30)
    await sender
    writer.close()
    received = first + rest
    return first_byte, hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def run(coroutine: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 120))  # type: ignore[arg-type]


# -- the tests ----------------------------------------------------------------------


def test_kill_9_resets_the_flows_of_the_dead_peer_and_only_those(mesh: Mesh) -> None:
    b1 = mesh.start_peer(PEER_PORTS[0])
    mesh.start_peer(PEER_PORTS[1])
    mesh.start_a("quic", PEER_PORTS, load_balancing="round_robin")
    name1 = f"{mesh.link.server_address}:{PEER_PORTS[0]}"
    echo: Echo = mesh.echo  # type: ignore[attr-defined]

    async def main() -> None:
        flows = [await Flow.open(mesh.link) for _ in range(6)]
        endpoints = mesh.stats()["endpoints"]
        on_b1 = endpoints[name1]["streams_active"]
        assert 1 <= on_b1 <= 5, endpoints  # some flows on each peer
        ended_before = len(echo.ended)
        assert b1.process is not None
        b1.process.kill()  # SIGKILL
        killed = time.monotonic()
        results = await asyncio.gather(
            *(flow.wait_reset(3.0) for flow in flows), return_exceptions=True
        )
        reset = [r for r in results if isinstance(r, float)]
        survivors = [f for f, r in zip(flows, results, strict=True) if not isinstance(r, float)]
        assert len(reset) == on_b1, results
        assert all(t < 3.0 for t in reset), reset
        # The destination's ends of those flows ended too (the peer's kernel closed them).
        ended = echo.ended[ended_before:]
        assert len(ended) >= on_b1 and all(t - killed < 3.0 for t in ended[:on_b1])
        # The other flows are untouched.
        for flow in survivors:
            assert await flow.echo(b"still here") == b"still here"
        # New flows succeed on the other endpoint.
        for _ in range(4):
            _, intact = await transfer(mesh.link, 100_000)
            assert intact
        for flow in survivors:
            flow.close()

    run(main())


def test_a_stopped_peer_is_declared_dead_and_replaced(mesh: Mesh) -> None:
    b1 = mesh.start_peer(PEER_PORTS[0])
    mesh.start_a("quic", PEER_PORTS[:1])
    name1 = f"{mesh.link.server_address}:{PEER_PORTS[0]}"

    async def main() -> None:
        flow = await Flow.open(mesh.link)
        assert mesh.stats()["endpoints"][name1]["connections_total"] == 1
        b1.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            # Keepalive PINGs go unanswered: the connection is failed, its flow reset.
            await flow.wait_reset(9.0)
            # The scenario: the peer stays stopped for 10 s in all.
            await asyncio.sleep(max(0.0, 10.0 - (time.monotonic() - stopped)))
        finally:
            b1.signal(signal.SIGCONT)
        _, intact = await transfer(mesh.link, 100_000)
        assert intact
        assert mesh.stats()["endpoints"][name1]["connections_total"] == 2

    run(main())


@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_a_flow_caught_by_a_dead_peer_is_not_dialled_to_it_again(mesh: Mesh, engine: str) -> None:
    """A review (2026-12-07): a flow whose CONNECT was on its way when the peer hung was
    opened again on a new connection to the same peer once the liveness checks failed
    the old one, and waited out the whole connect timeout there (8 s for 5 s on engine
    flows). The endpoint is now taken as failed: the flow ends with the reason (the
    one endpoint here: no other to retry on) well within the connect timeout."""
    require_engine(engine)
    b1 = mesh.start_peer(PEER_PORTS[0])
    mesh.start_a("quic", PEER_PORTS[:1], engine=engine, connect_timeout="60s")

    async def main() -> None:
        warm = await Flow.open(mesh.link)  # the pooled connection is up
        warm.close()
        b1.signal(signal.SIGSTOP)
        try:
            with mesh.link.entered("client"):
                reader, writer = await asyncio.open_connection(
                    mesh.link.client_address, OUTBOUND_PORT
                )
            writer.write(b"hello")
            # The connect timeout is 60 s: only a flow failed with its connection ends
            # within the wait.
            await Flow(reader, writer).wait_reset(30.0)
            writer.close()
        finally:
            b1.signal(signal.SIGCONT)
        a = mesh.a
        assert a is not None
        record = poll(
            lambda: [r for r in a.access_log() if r["outcome"] == "connect_failed"],
            10.0,
            "the failed flow's access-log record",
        )[-1]
        assert "peer unresponsive" in record["reason"], record

    run(main())


def completed(sidecar: SidecarProcess | None) -> list[dict[str, Any]]:
    """The access-log records of the flows ``sidecar`` completed."""
    assert sidecar is not None
    return [r for r in sidecar.access_log() if r["outcome"] == "completed"]


def test_blocked_udp_falls_back_to_h2_and_back_to_quic(mesh: Mesh) -> None:
    mesh.start_peer(PEER_PORTS[0])
    mesh.start_a(
        "auto",
        PEER_PORTS[:1],
        fallback={"delay": "300ms", "broken_backoff": "3s"},
        idle_timeout="30s",
    )

    def by_transport() -> dict[str, int]:
        return mesh.stats()["connections_by_transport"]  # type: ignore[no-any-return]

    async def main() -> None:
        # 1. UDP dropped from the start: flows succeed over h2 within 1 s, every byte.
        mesh.block_udp()
        for _ in range(3):
            first_byte, intact = await transfer(mesh.link, 1_000_000)
            assert intact and first_byte < 1.0, first_byte
        assert by_transport().get("h2", 0) >= 1
        assert by_transport().get("quic", 0) == 0
        poll(lambda: mesh.stats()["fallback"]["endpoints_quic_broken"] == 1, 10, "QUIC marked")
        assert mesh.a is not None
        with mesh.link.entered("client"):
            samples = mesh.a.metrics()
        assert metric(samples, "quicmesh_cluster_endpoints_quic_broken", cluster="b") == 1
        assert metric(samples, "quicmesh_cluster_quic_marked_broken_total", cluster="b") == 1
        assert metric(samples, "quicmesh_cluster_connections_by_transport_total", via="h2") >= 1
        assert metric(samples, "quicmesh_cluster_fallbacks_total", cluster="b") >= 1
        # The access log says which transport carried each flow (it said "auto").
        poll(lambda: len(completed(mesh.a)) >= 3, 10, "three flows logged")
        assert {r["transport"] for r in completed(mesh.a)} == {"h2"}
        # 2. UDP restored: once the backoff expires, new connections are QUIC again.
        mesh.unblock_udp()
        deadline = time.monotonic() + 20
        while by_transport().get("quic", 0) == 0:
            assert time.monotonic() < deadline, mesh.stats()
            _, intact = await transfer(mesh.link, 10_000)
            assert intact
            await asyncio.sleep(0.2)  # pacing the probe flows, not synchronisation
        # 3. UDP dropped mid-life: the QUIC connection is failed, its flow reset,
        #    and h2 replaces it while the mark lasts.
        flow = await Flow.open(mesh.link)
        mesh.block_udp()
        await flow.wait_reset(10.0)
        h2_before = by_transport().get("h2", 0)
        for _ in range(3):
            first_byte, intact = await transfer(mesh.link, 1_000_000)
            assert intact and first_byte < 1.0, first_byte
        assert by_transport().get("h2", 0) == h2_before + 1
        assert mesh.stats()["fallback"]["quic_marked_broken"] >= 2, mesh.stats()
        poll(
            lambda: {r["transport"] for r in completed(mesh.a)} == {"h2", "quic"},
            10,
            "flows over both transports logged",
        )
        mesh.unblock_udp()

    run(main())


def test_a_closed_udp_port_fails_the_connect_at_once(mesh: Mesh) -> None:
    ca = DevCA()
    client = QuicTransport(identity=ca.issue(IDENTITY_A), trust=ca.trust_bundle)

    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(ConnectError, match="unreachable"):
            await client.connect((mesh.link.server_address, PEER_PORTS[0]), timeout=5)
        return time.monotonic() - started

    elapsed = mesh.link.run_in_thread("client", main).result(30)
    # "unreachable" (above), not the handshake's timeout, shows that the ICMP error
    # ended the wait; the bound is only a generous "well before the 5 s timeout" (a
    # loaded CI machine took 0.26 s for the loopback case where 0.1 s was asked).
    assert elapsed < 2.5, elapsed
