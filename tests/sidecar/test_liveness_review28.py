"""Sidecar liveness on every cluster transport (a review, 2026-12-07).

* An ``h2`` cluster, or an ``auto`` cluster that fell back to HTTP/2, kept a hung
  peer's flows open for ever (QUIC resets them in seconds): its connections now PING
  a silent peer and fail after ``liveness.dead_after``.
* A cluster ``idle_timeout`` at or below ``liveness.keepalive_interval`` (the QUIC
  max_idle_timeout) dropped a live flow quiet for that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quicmesh.sidecar.launch import LOOPBACK, SidecarProcess, free_ports
from tests.quic_helpers import QUIC_ENGINES, require_engine
from tests.sidecar.conftest import IDENTITY_A, IDENTITY_B, HeldFlow, addr, wait_until


def peer_config(workdir: Path, echo_port: int, port: int, admin: int, transports: list[str]) -> Any:
    return {
        "node": {"name": "b", "identity": IDENTITY_B},
        "tls": {"ca_dir": str(workdir / "ca")},
        "admin": {"address": addr(admin)},
        "listeners": {
            "inbound": [
                {
                    "name": "mesh",
                    "address": addr(port),
                    "transports": transports,
                    "destinations": [addr(echo_port)],
                }
            ]
        },
    }


def client_config(
    workdir: Path, echo_port: int, port: int, out: int, admin: int, **cluster: Any
) -> Any:
    return {
        "node": {"name": "a", "identity": IDENTITY_A},
        "tls": {"ca_dir": str(workdir / "ca")},
        "admin": {"address": addr(admin)},
        "listeners": {"outbound": [{"name": "app", "address": addr(out), "cluster": "b"}]},
        "clusters": [
            {"name": "b", "target": addr(echo_port), "endpoints": [addr(port)], **cluster}
        ],
    }


@contextlib.contextmanager
def sidecars(*processes: SidecarProcess) -> Iterator[None]:
    try:
        for process in processes:
            process.start()
            process.wait_ready(30)
        yield
    finally:
        for process in processes:
            if process.process is not None and process.process.poll() is None:
                process.signal(signal.SIGCONT)
                process.stop()


@pytest.mark.parametrize("transport", ["h2", "auto"])
def test_a_hung_peer_fails_the_flows_of_an_h2_connection(
    workdir: Path, echo_port: int, transport: str, tmp_path: Path
) -> None:
    """Peer B listens on HTTP/2 only, its UDP port swallowing datagrams (so an auto
    cluster falls back to HTTP/2). B hangs (SIGSTOP) with a flow held and data on its
    way: A's liveness (PING after 0.5 s of silence, dead 2 s later) resets the flow,
    where it stayed open (more than 30 s) until 2026-12-07."""
    port, out, admin_a, admin_b = free_ports(4)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind((LOOPBACK, port))  # UDP black-holed: no QUIC, no ICMP
        b = SidecarProcess("b", peer_config(workdir, echo_port, port, admin_b, ["h2"]), tmp_path)
        liveness = {"keepalive_interval": "500ms", "dead_after": "2s"}
        a_config = client_config(
            workdir, echo_port, port, out, admin_a, transport=transport, liveness=liveness
        )
        a = SidecarProcess("a", a_config, tmp_path)
        with sidecars(b, a):

            async def main() -> Any:
                flow = await HeldFlow.open(out)
                assert a.stats()["clusters"]["b"]["connections_by_transport"] == {"h2": 1}
                b.signal(signal.SIGSTOP)
                flow.writer.write(b"more data while the peer hangs")
                await flow.writer.drain()
                try:
                    return await asyncio.wait_for(flow.reader.read(100), 30)
                except ConnectionResetError:
                    return "reset"
                finally:
                    flow.writer.close()

            assert asyncio.run(main()) in ("reset", b"")
            record = wait_until(lambda: a.access_log(), what="A's access log")[-1]
            assert record["outcome"] == "reset"
            assert "peer unresponsive" in record["reason"]


@pytest.mark.parametrize("engine", QUIC_ENGINES)
def test_a_quiet_flow_outlives_a_cluster_idle_timeout_below_the_keepalive_interval(
    workdir: Path, echo_port: int, engine: str, tmp_path: Path
) -> None:
    """idle_timeout 500ms, keepalive_interval 1s (the default): the connection PINGs
    within half the idle timeout, so a flow quiet for 1.5 s carries on."""
    require_engine(engine)
    port, out, admin_a, admin_b = free_ports(4)
    b_config = peer_config(workdir, echo_port, port, admin_b, ["quic"])
    b_config["listeners"]["inbound"][0]["engine"] = engine
    b = SidecarProcess("b", b_config, tmp_path)
    a_config = client_config(
        workdir,
        echo_port,
        port,
        out,
        admin_a,
        transport="quic",
        engine=engine,
        idle_timeout="500ms",
    )
    a = SidecarProcess("a", a_config, tmp_path)
    with sidecars(b, a):

        async def main() -> bool:
            flow = await HeldFlow.open(out)
            await asyncio.sleep(1.5)  # the quiet period under test, not synchronisation
            return await flow.finish(b"still here")

        assert asyncio.run(main())
