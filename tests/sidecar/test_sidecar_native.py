"""End to end over the native QUIC engine: two ``quicmesh sidecar`` processes.

Sidecar B serves a QUIC listener on the native engine (``engine: native``) next
to its aioquic one; sidecar A reaches the echo app behind B through a native
cluster to the native listener, and through a native cluster to the aioquic
listener (the engines interoperate). Both run as the README runs them
(``python -m quicmesh sidecar -c FILE``). Skipped with the reason where the
extension is not built, failed then under ``QUICMESH_REQUIRE_NATIVE=1``.
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

from quic_helpers import require_engine

from quicmesh.sidecar.launch import SidecarProcess, free_port, metric

from .conftest import Mesh, addr, echo_flow, wait_until


def flows_counted(sidecar: SidecarProcess, cluster: str, expected: int) -> bool:
    return metric(sidecar.metrics(), "quicmesh_cluster_flows_total", cluster=cluster) == expected


def test_flows_cross_two_sidecars_over_the_native_engine(workdir: Path, echo_port: int) -> None:
    require_engine("native")
    mesh = Mesh(workdir, echo_port, name="b-native")
    native_port = free_port()
    mesh.b.config["listeners"]["inbound"].append(
        {
            "name": "mesh_native",
            "address": addr(native_port),
            "transports": ["quic"],
            "engine": "native",
            "destinations": [addr(echo_port)],
        }
    )
    clusters = [
        mesh.cluster("native", "quic", engine="native", endpoints=[addr(native_port)]),
        mesh.cluster("native_to_aioquic", "quic", engine="native"),
    ]
    config, ports = mesh.a_config(clusters)
    a = SidecarProcess("a-native", config, workdir)
    mesh.b.start()
    try:
        mesh.b.wait_ready()
        a.start()
        a.wait_ready()
        payloads = [os.urandom(1000 + 50_021 * i) for i in range(12)]

        async def main() -> list[list[bytes]]:
            return [
                await asyncio.gather(*(echo_flow(ports[name], p) for p in payloads))
                for name in ports
            ]

        for results in asyncio.run(main()):
            assert results == payloads
        for cluster in ports:
            counted = functools.partial(flows_counted, a, cluster, len(payloads))
            wait_until(counted, what=f"{cluster}: flows counted")
            samples = a.metrics()
            assert metric(samples, "quicmesh_peer_connection_rtt_seconds", cluster=cluster) > 0
            endpoints = a.stats()["clusters"][cluster]["endpoints"].values()
            connections = [c for e in endpoints for c in e["connections"]]
            # The native engine's connections report its UDP batching (GSO) counters.
            assert connections and all(c["send_calls"] > 0 for c in connections)
            lines = [r for r in a.access_log() if r["listener"] == cluster]
            assert {r["outcome"] for r in lines} == {"completed"}
            assert {r["transport"] for r in lines} == {"quic"}
            assert {r["peer_identity"] for r in lines} == {
                "spiffe://mesh.local/ns/default/sa/reviews"
            }
        served = [r for r in mesh.b.access_log() if r["listener"] == "mesh_native"]
        assert len(served) == len(payloads)
        assert {r["peer_identity"] for r in served} == {
            "spiffe://mesh.local/ns/default/sa/productpage"
        }
    finally:
        assert a.stop() == 0
        assert mesh.b.stop() == 0
