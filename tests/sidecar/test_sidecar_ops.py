"""Operating a sidecar: flow ids matched across the hop, W3C traceparent, log reopening.

Real sidecar processes on loopback (see ``test_sidecar_e2e``); synchronised by
polling the access logs and files with a deadline, never by sleeping.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from pathlib import Path

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from quicmesh import DevCA, QuicTransport
from quicmesh.sidecar.launch import SidecarProcess
from tests.quic_helpers import QUIC_ENGINES, require_engine

from .conftest import IDENTITY_A, Mesh, addr, echo_flow, wait_until

W3C_EXAMPLE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("transport", ["quic", "h2", "tcp"])
def test_both_sidecars_log_the_same_flow_id(mesh: Mesh, transport: str) -> None:
    config, ports = mesh.a_config([mesh.cluster("echo", transport)])
    a = SidecarProcess(f"a-flowid-{transport}", config, mesh.workdir)
    a.start()
    try:
        a.wait_ready()

        async def flows() -> None:
            for size in (10, 20, 30):
                payload = os.urandom(size)
                assert await echo_flow(ports["echo"], payload) == payload

        asyncio.run(flows())
        lines_a = wait_until(lambda: a.access_log()[2:] and a.access_log(), what="3 lines on A")
        ids = {line["flow_id"] for line in lines_a}
        assert len(ids) == 3 and all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)

        def b_lines() -> list[dict[str, object]]:
            return [line for line in mesh.b.access_log() if line["flow_id"] in ids]

        lines_b = wait_until(lambda: b_lines()[2:] and b_lines(), what="3 lines on B")
        for line in lines_b:
            match = next(x for x in lines_a if x["flow_id"] == line["flow_id"])
            assert line["direction"] == "inbound" and match["direction"] == "outbound"
            assert line["bytes_sent"] == match["bytes_sent"]
            # downstream: the peer sidecar's address as B sees it (A's side of the hop).
            assert re.fullmatch(r"127\.0\.0\.1:\d+", str(line["downstream"])), line
            assert line["transport"] == transport
    finally:
        assert a.stop() == 0


def test_a_w3c_traceparent_from_any_client_becomes_the_flow_id(mesh: Mesh) -> None:
    ca = DevCA.load(mesh.workdir / "ca")
    client = QuicTransport(identity=ca.issue(IDENTITY_A), trust=ca.trust_bundle)

    async def main() -> None:
        connection = await client.connect(("127.0.0.1", mesh.ports["mesh"]))
        try:
            stream = await connection.open_stream(
                addr(mesh.echo_port), {"traceparent": W3C_EXAMPLE}
            )
            stream.write(b"traced")
            stream.write_eof()
            assert await stream.read(-1) == b"traced"
            await stream.wait_closed()
        finally:
            connection.close()
            await connection.wait_closed()

    asyncio.run(main())
    line = wait_until(
        lambda: [x for x in mesh.b.access_log() if x["flow_id"] == W3C_EXAMPLE[3:35]],
        what="the traced flow on B",
    )[0]
    assert line["outcome"] == "completed" and line["peer_identity"] == IDENTITY_A


def test_sigusr1_reopens_the_access_log_and_keeps_running(mesh: Mesh, tmp_path: Path) -> None:
    log = tmp_path / "a-access.log"
    config, ports = mesh.a_config(
        [mesh.cluster("echo", "quic")], access_log={"path": str(log), "format": "text"}
    )
    a = SidecarProcess("a-usr1", config, tmp_path)
    a.start()
    try:
        a.wait_ready()
        assert asyncio.run(echo_flow(ports["echo"], b"before")) == b"before"
        wait_until(lambda: log.exists() and log.read_text().count("\n") == 1, what="line 1")
        log.rename(tmp_path / "a-access.log.1")  # what logrotate does
        a.signal(signal.SIGUSR1)
        wait_until(log.exists, what="the access log reopened at its path")
        assert asyncio.run(echo_flow(ports["echo"], b"after")) == b"after"
        wait_until(lambda: log.read_text().count("\n") == 1, what="line 2 in the new file")
        status, _ = a.request("GET", "/ready")
        assert status == 200
    finally:
        assert a.stop() == 0
    rotated = (tmp_path / "a-access.log.1").read_text().splitlines()
    current = log.read_text().splitlines()
    assert len(rotated) == 1 and len(current) == 1
    assert " outbound echo 127.0.0.1:" in current[0] and " completed 5 5 " in current[0]
    assert "reopened the access log" in a.stderr()
    assert not any(line.startswith("{") for line in current)


def connection_attempt(datagram: bytes) -> bytes | None:
    """The Destination Connection ID of a QUIC Initial (aioquic's header parser):
    a client picks a new random one for each connection and keeps it in the
    Initials it retransmits, so distinct ones count connection attempts, whatever
    the engine (aioquic uses a socket per connection, the native engine one
    socket per transport, so source ports do not tell)."""
    try:
        header = pull_quic_header(Buffer(data=datagram), host_cid_length=8)
    except ValueError:
        return None
    if header.packet_type != QuicPacketType.INITIAL:
        return None
    return header.destination_cid


@pytest.mark.parametrize("engine", QUIC_ENGINES)
def test_failed_health_checks_log_one_line_and_no_asyncio_noise(mesh: Mesh, engine: str) -> None:
    require_engine(engine)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a peer that never answers
    silent.bind(("127.0.0.1", 0))
    silent.settimeout(10)
    with silent:
        dead = addr(silent.getsockname()[1])
        cluster = mesh.cluster(
            "echo",
            "quic",
            endpoints=[dead],
            engine=engine,
            health_check={"interval": "100ms", "timeout": "200ms", "unhealthy_threshold": 1},
        )
        config, _ = mesh.a_config([cluster])
        a = SidecarProcess(f"a-health-{engine}", config, mesh.workdir)
        a.start()
        try:
            a.wait_ready()
            # Each health check is a new QUIC connection: wait for six (five of them
            # timed out: more than enough garbage for asyncio to complain of).
            attempts: set[bytes] = set()
            while len(attempts) < 6:
                datagram, _ = silent.recvfrom(65536)
                attempt = connection_attempt(datagram)
                if attempt is not None:
                    attempts.add(attempt)
            wait_until(lambda: "is unhealthy" in a.stderr(), what="the endpoint marked unhealthy")
        finally:
            assert a.stop() == 0
    stderr = a.stderr()
    assert "never retrieved" not in stderr and "Traceback" not in stderr, stderr
    unhealthy = [line for line in stderr.splitlines() if "is unhealthy" in line]
    assert len(unhealthy) == 1 and "timed out after 0.2s" in unhealthy[0]
