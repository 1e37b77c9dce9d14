"""Outbound engine flows that fail: a peer that never answers, a client gone meanwhile, a
reload that removes the cluster. In process: an ``OutboundListener`` and its
``Cluster`` on the native engine, in front of real QUIC listeners on loopback."""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from quic_helpers import CA, CLIENT, SERVER, require_engine, run, until

from quicmesh import QuicTransport
from quicmesh.sidecar.accesslog import FlowRecord
from quicmesh.sidecar.cluster import Cluster
from quicmesh.sidecar.config import parse_config
from quicmesh.sidecar.flows import FlowTracker
from quicmesh.sidecar.outbound import OutboundListener
from quicmesh.sidecar.stats import ClusterStats, ListenerStats
from quicmesh.transport.stream import MeshStream


class Peer:
    """A native QUIC listener that echoes every stream, or (``silent``) takes the CONNECT
    and never answers; ``connects`` counts the CONNECTs it saw."""

    def __init__(self, silent: bool) -> None:
        self.silent = silent
        self.connects = 0
        self.listener: Any = None

    async def start(self) -> tuple[str, int]:
        transport = QuicTransport(identity=SERVER, trust=CA.trust_bundle, engine="native")
        self.listener = await transport.listen(("127.0.0.1", 0), self.handle)
        host, port = self.listener.address
        return host, port

    async def handle(self, stream: MeshStream) -> None:
        self.connects += 1
        if self.silent:
            await asyncio.Event().wait()  # (cancelled when the listener closes)
        stream.accept()
        while data := await stream.read(65536):
            stream.write(data)
        stream.write_eof()

    def close(self) -> None:
        self.listener.close()


class Outbound:
    """An outbound listener and its cluster (round robin over ``endpoints``)."""

    def __init__(self, endpoints: list[tuple[str, int]], **cluster: Any) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        document = {
            "node": {"name": "a", "identity": CLIENT.spiffe_id},
            "tls": {"ca_dir": "ca"},
            "admin": {"address": "127.0.0.1:15000"},
            "listeners": {
                "outbound": [{"name": "app", "address": f"127.0.0.1:{port}", "cluster": "c"}]
            },
            "clusters": [
                {
                    "name": "c",
                    "transport": "quic",
                    "engine": "native",
                    "target": "10.1.1.1:80",
                    "endpoints": [f"{host}:{port}" for host, port in endpoints],
                    "connect_timeout": "1s",
                    **cluster,
                }
            ],
        }
        config = parse_config(yaml.safe_dump(document), source="a.yaml", base_dir=Path("."))
        transport = QuicTransport(identity=CLIENT, trust=CA.trust_bundle, engine="native")
        self.cluster = Cluster(config.clusters[0], transport, ClusterStats("c"))
        self.clusters = {"c": self.cluster}
        self.records: list[FlowRecord] = []
        self.listener = OutboundListener(
            config.outbound[0],
            self.clusters.__getitem__,
            ListenerStats("app", "outbound"),
            FlowTracker(),
            self.records.append,
        )
        self.port = port

    async def start(self) -> None:
        self.cluster.start()
        await self.listener.start()

    async def close(self) -> None:
        self.listener.close()
        await self.cluster.close()


async def echo(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(-1), 20)
    except ConnectionResetError:
        return b"reset"
    finally:
        writer.close()


def test_an_unanswered_engine_flow_is_its_first_attempt() -> None:
    """A CONNECT the peer never answers is the flow's first attempt: the retry
    (``connect_retries: 1``) goes to the other endpoint, the silent one sees each flow's
    CONNECT once and counts one connect failure for it; a flow never waits for two
    timeouts."""
    require_engine("native")

    async def main() -> None:
        silent, answering = Peer(silent=True), Peer(silent=False)
        outbound = Outbound(
            [await silent.start(), await answering.start()],
            outlier_detection={"consecutive_connect_failures": 100},
        )
        await outbound.start()
        try:
            # The first flows dial both endpoints; then the listener's flows are engine
            # flows, every other one to the silent endpoint.
            assert await echo(outbound.port, b"dial") == b"dial"
            await until(lambda: outbound.listener.engine_accepting, 10)
            cluster_stats = outbound.cluster.stats
            connects, failures = silent.connects, cluster_stats.connect_failures
            retries = cluster_stats.retries  # (the dial may have tried the silent one)
            payloads = [bytes([n]) * 1000 for n in range(6)]
            results = await asyncio.gather(*(echo(outbound.port, p) for p in payloads))
            assert results == payloads
            stats = outbound.listener.stats
            await until(lambda: stats.streams_active == 0, 10)
            unanswered = silent.connects - connects
            assert unanswered >= 1
            assert stats.engine_flows_returned == unanswered  # each came back once
            assert cluster_stats.connect_failures - failures == unanswered
            assert cluster_stats.retries - retries == unanswered
            assert {r.outcome.value for r in outbound.records} == {"completed"}
        finally:
            await outbound.close()
            silent.close()
            answering.close()

    run(main())


def test_a_client_that_reset_while_its_connect_waited_is_not_opened_again() -> None:
    """The client resets while its engine flow waits for an answer that never comes:
    after the timeout the flow ends as reset, without a CONNECT to the other endpoint."""
    require_engine("native")

    async def main() -> None:
        silent, answering = Peer(silent=True), Peer(silent=False)
        outbound = Outbound([await silent.start(), await answering.start()])
        await outbound.start()
        try:
            assert await echo(outbound.port, b"dial") == b"dial"
            await until(lambda: outbound.listener.engine_accepting, 10)
            for _ in range(4):  # (round robin: one of two flows goes to the silent one)
                before = silent.connects, answering.connects
                _, writer = await asyncio.open_connection("127.0.0.1", outbound.port)
                await until(lambda b=before: (silent.connects, answering.connects) != b, 10)
                if silent.connects != before[0]:
                    break
                writer.close()
            else:
                pytest.fail("no flow went to the silent endpoint")
            records = len(outbound.records)
            answered = answering.connects
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST
            await until(lambda: len(outbound.records) > records, 10)
            record = outbound.records[-1]
            assert record.outcome.value == "reset", record
            assert answering.connects == answered
        finally:
            await outbound.close()
            silent.close()
            answering.close()

    run(main())


def test_a_lone_silent_endpoint_refuses_the_flow_after_one_connect() -> None:
    """With no other endpoint to retry on, the flow is refused with the timeout, after
    one CONNECT (the usual way's count), not opened again."""
    require_engine("native")

    async def main() -> None:
        answered = Peer(silent=False)
        outbound = Outbound([await answered.start()])
        await outbound.start()
        try:
            assert await echo(outbound.port, b"dial") == b"dial"
            await until(lambda: outbound.listener.engine_accepting, 10)
            answered.silent = True  # from now on the endpoint takes CONNECTs and says nothing
            before = answered.connects
            assert await echo(outbound.port, b"x") in (b"reset", b"")
            await until(lambda: len(outbound.records) == 2, 10)
            assert answered.connects == before + 1
            assert outbound.cluster.stats.connect_failures == 1
            record = outbound.records[-1]
            assert record.outcome.value == "connect_failed"
            assert record.reason.endswith("timed out after 1s"), record.reason
        finally:
            await outbound.close()
            answered.close()

    run(main())


def test_connections_accepted_as_a_reload_removes_the_cluster_are_reset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload that removes an outbound listener and its cluster (the cluster first):
    connections the engine accepted and had not reported yet are reset, with a warning,
    not left open without a handler."""
    require_engine("native")

    async def main() -> None:
        peer = Peer(silent=False)
        outbound = Outbound([await peer.start()])
        await outbound.start()
        clients: list[socket.socket] = []
        try:
            assert outbound.listener.engine_accepting
            acceptor = outbound.listener._engine[0].acceptor
            # Accepted by the engine while the event loop does not run (blocking calls).
            clients = [socket.create_connection(("127.0.0.1", outbound.port)) for _ in range(3)]
            readable, _, _ = select.select([acceptor._fd], [], [], 10)  # type: ignore[attr-defined]
            assert readable, "the engine reported no accepted connection"
            outbound.clusters.pop("c")
            outbound.listener.close()
            for client in clients:
                client.settimeout(10)
                with pytest.raises(ConnectionResetError):
                    client.sendall(b"x")
                    client.recv(10)
        finally:
            for client in clients:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
            await outbound.cluster.close()
            peer.close()

    with caplog.at_level(logging.WARNING):
        run(main())
    assert "cluster c is gone" in caplog.text
    assert "handler failed" not in caplog.text
    assert "Traceback" not in caplog.text
