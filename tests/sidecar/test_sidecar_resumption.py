"""0-RTT and connection migration through two real sidecar processes.

Sidecar B (module fixture ``mesh``) keeps running; each test starts its own
sidecar A. Synchronisation is by events in the traffic itself (bytes echoed so
far) and by polling the sidecars' ``/metrics`` with a deadline, never by sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from quicmesh.sidecar.launch import SidecarProcess, metric

from .conftest import LOOPBACK, Mesh, echo_flow, wait_until


@pytest.fixture(scope="module")
def aioquic_mesh(workdir: Path, echo_port: int) -> Iterator[Mesh]:
    """A sidecar B whose QUIC listeners run on aioquic, whatever the default engine."""
    m = Mesh(workdir, echo_port, name="b-aioquic")
    for listener in m.b.config["listeners"]["inbound"]:
        if "quic" in listener["transports"]:
            listener["engine"] = "aioquic"
    m.b.start()
    m.b.wait_ready()
    yield m
    m.b.stop()


def test_a_restarted_sidecar_resumes_with_0rtt(aioquic_mesh: Mesh, tmp_path: Path) -> None:
    # The ticket file is aioquic's: the native engine keeps a client's tickets in memory
    # (rustls 0.23 cannot export a session; docs/design.md), and counts no tickets.
    mesh = aioquic_mesh
    tickets = tmp_path / "tickets.json"
    cluster = mesh.cluster("echo", "quic", early_data=True, engine="aioquic")
    config, ports = mesh.a_config([cluster])
    config["tls"]["ticket_cache"] = str(tickets)
    a = SidecarProcess("a-0rtt", config, mesh.workdir)
    a.start()
    try:
        a.wait_ready()
        first = os.urandom(20_000)
        assert asyncio.run(echo_flow(ports["echo"], first)) == first
        tickets_metric = "quicmesh_cluster_session_tickets_total"
        wait_until(
            lambda: metric(a.metrics(), tickets_metric, result="received"),
            what="a session ticket from B",
        )
        # No ticket yet when the first connection was made: a full handshake.
        assert metric(a.metrics(), "quicmesh_cluster_zero_rtt_total", result="attempted") == 0
        assert a.stop() == 0
        assert json.loads(tickets.read_text()), "the ticket cache file is empty"
        redeemed_before = metric(
            mesh.b.metrics(), "quicmesh_listener_session_tickets_total", result="redeemed"
        )
        accepted_before = metric(
            mesh.b.metrics(), "quicmesh_listener_zero_rtt_total", result="accepted"
        )

        a.start()  # the same configuration: the same ticket cache file
        a.wait_ready()
        payloads = [os.urandom(1000 + 7919 * i) for i in range(8)]

        async def main() -> list[bytes]:
            return await asyncio.gather(*(echo_flow(ports["echo"], p) for p in payloads))

        assert asyncio.run(main()) == payloads
        samples = a.metrics()
        for result, count in (("attempted", 1), ("accepted", 1), ("rejected", 0)):
            assert metric(samples, "quicmesh_cluster_zero_rtt_total", result=result) == count
        assert metric(samples, "quicmesh_cluster_connections_total", cluster="echo") == 1
        # The CONNECTs and first bytes went in 0-RTT packets.
        assert metric(samples, "quicmesh_peer_connection_zero_rtt_packets_sent_total") > 0
        assert (
            metric(mesh.b.metrics(), "quicmesh_listener_session_tickets_total", result="redeemed")
            == redeemed_before + 1
        )
        # B counts the 0-RTT it took too.
        assert (
            metric(mesh.b.metrics(), "quicmesh_listener_zero_rtt_total", result="accepted")
            == accepted_before + 1
        )
        lines = wait_until(
            lambda: (
                [r for r in a.access_log() if r["listener"] == "echo"][8:]
                and [r for r in a.access_log() if r["listener"] == "echo"]
            ),
            what="nine flows logged",
        )
        assert {r["outcome"] for r in lines} == {"completed"}
        assert sum(r["bytes_received"] for r in lines) == len(first) + sum(map(len, payloads))
    finally:
        a.stop()


def test_0rtt_is_off_by_default(mesh: Mesh, tmp_path: Path) -> None:
    config, ports = mesh.a_config([mesh.cluster("echo", "quic")])
    config["tls"]["ticket_cache"] = str(tmp_path / "tickets.json")
    a = SidecarProcess("a-no-0rtt", config, mesh.workdir)
    try:
        for _ in range(2):
            a.start()
            a.wait_ready()
            payload = os.urandom(5000)
            assert asyncio.run(echo_flow(ports["echo"], payload)) == payload
            samples = a.metrics()
            assert metric(samples, "quicmesh_cluster_zero_rtt_total", result="attempted") == 0
            assert metric(samples, "quicmesh_peer_connection_zero_rtt_packets_sent_total") == 0
            assert a.stop() == 0
    finally:
        a.stop()


class Transfer:
    """Concurrent echo flows that report how many bytes came back so far.

    Each flow sends the first three quarters of its payload, then waits for
    :attr:`resume` before the rest, so the transfer cannot end before the test
    has done what it does mid-transfer (a fast engine finished the whole
    transfer while the test was still asking for the migration).
    """

    def __init__(self, port: int, flows: int, size: int) -> None:
        self.port = port
        self.payloads = [os.urandom(size) for _ in range(flows)]
        self.received = 0
        self.total = flows * size
        self.resume = asyncio.Event()
        self._progress: list[tuple[int, asyncio.Event]] = []

    def reached(self, amount: int) -> asyncio.Event:
        """An event set once ``amount`` bytes came back over all flows."""
        event = asyncio.Event()
        self._progress.append((amount, event))
        return event

    async def flow(self, payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port)

        async def send() -> None:
            held_at = len(payload) * 3 // 4
            for offset in range(0, len(payload), 65536):
                if offset >= held_at and not self.resume.is_set():
                    await self.resume.wait()
                writer.write(payload[offset : offset + 65536])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        received = bytearray()
        while data := await reader.read(65536):
            received += data
            self.received += len(data)
            for amount, event in self._progress:
                if self.received >= amount:
                    event.set()
        await sender
        writer.close()
        return bytes(received)


def test_migration_mid_transfer_loses_no_byte(mesh: Mesh) -> None:
    config, ports = mesh.a_config([mesh.cluster("echo", "quic")])
    a = SidecarProcess("a-migrate", config, mesh.workdir)
    a.start()
    try:
        a.wait_ready()

        def b_counter(name: str, **labels: str) -> float:
            return metric(mesh.b.metrics(), name, listener="mesh", **labels)

        validations_before = b_counter("quicmesh_listener_path_validations_total", result="ok")
        moves_before = b_counter("quicmesh_listener_migrations_total", cause="peer_address_change")

        async def main() -> tuple[list[bytes], dict[str, object], int, Transfer]:
            transfer = Transfer(ports["echo"], flows=4, size=1536 * 1024)
            quarter = transfer.reached(transfer.total // 4)
            tasks = [asyncio.ensure_future(transfer.flow(p)) for p in transfer.payloads]
            await asyncio.wait_for(quarter.wait(), 60)
            status, body = await asyncio.to_thread(a.request, "POST", "/migrate")
            assert status == 200, body
            at_migration = transfer.received
            transfer.resume.set()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            return results, json.loads(body), at_migration, transfer

        results, report, at_migration, transfer = asyncio.run(main())
        digests = [hashlib.sha256(r).digest() for r in results]
        assert digests == [hashlib.sha256(p).digest() for p in transfer.payloads]
        assert at_migration < transfer.total, "the transfer had finished before the migration"
        assert report["migrated"] == 1 and report["failed"] == 0, report
        (moved,) = report["connections"]  # type: ignore[misc]
        assert moved["cluster"] == "echo" and moved["streams_active"] == 4, moved
        # A counts a flow once its splice has closed the local connection and flushed the
        # tunnel, a few event-loop turns after this client read the EOF: reading /metrics
        # at once raced with that (3 of 4 counted). Wait for the count, then read the rest.
        samples = wait_until(
            lambda: (
                (m := a.metrics())
                and metric(m, "quicmesh_cluster_flows_total", outcome="completed") >= 4
                and m
            ),
            what="A counted the four flows",
        )
        assert metric(samples, "quicmesh_cluster_migrations_total", cause="active") == 1
        assert metric(samples, "quicmesh_cluster_flows_total", outcome="completed") == 4
        assert metric(samples, "quicmesh_cluster_connections_total", cluster="echo") == 1
        # B saw the client's address change and validated the new path.
        wait_until(
            lambda: (
                b_counter("quicmesh_listener_path_validations_total", result="ok")
                > validations_before
            ),
            what="B validated A's new path",
        )
        assert (
            b_counter("quicmesh_listener_migrations_total", cause="peer_address_change")
            == moves_before + 1
        )
    finally:
        assert a.stop() == 0
