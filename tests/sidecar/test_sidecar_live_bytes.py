"""Byte counters move as the bytes do, not at a flow's end (a review: a flow held open
showed nothing on either sidecar until it closed, on every transport and engine; Envoy
counts ``downstream_cx_rx_bytes_total`` and its kin as it reads).

Two ``quicmesh sidecar`` processes: a flow through each of A's clusters (QUIC on the
native engine, whose flows the engine carries from accept to end, and on aioquic, copied
in Python; h2; TLS-over-TCP) moves a known payload both ways through B's echo and stays
open, and A's listener and cluster and B's listener count every byte of it then; after the
flow ends they count it once, not again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from quic_helpers import require_engine

from quicmesh.sidecar.launch import SidecarProcess, metric

from .conftest import HeldFlow, Mesh, wait_until

PAYLOAD = bytes(range(256)) * 800  # 204,800 bytes, echoed back

CLUSTERS = {
    "quic_native": ("quic", {"engine": "native"}),
    "quic_aioquic": ("quic", {"engine": "aioquic"}),
    "h2": ("h2", {}),
    "tcp": ("tcp", {}),
}


@pytest.fixture(scope="module")
def sidecar_a(mesh: Mesh, workdir: Path) -> Iterator[tuple[SidecarProcess, dict[str, int]]]:
    clusters = [
        mesh.cluster(name, transport, **options) for name, (transport, options) in CLUSTERS.items()
    ]
    config, ports = mesh.a_config(clusters)
    a = SidecarProcess("live-bytes-a", config, workdir)
    a.start()
    a.wait_ready()
    yield a, ports
    a.stop()


def byte_counts(a: SidecarProcess, b: SidecarProcess, cluster: str) -> dict[str, float]:
    """A's listener and cluster and B's inbound listeners (all of them: B's ``mesh``
    serves QUIC and h2, ``mesh_tcp`` TLS-over-TCP), both ways."""
    on_a, on_b = a.metrics(), b.metrics()
    return {
        "a listener in": metric(on_a, "quicmesh_listener_bytes_received_total", listener=cluster),
        "a listener out": metric(on_a, "quicmesh_listener_bytes_sent_total", listener=cluster),
        "a cluster out": metric(on_a, "quicmesh_cluster_bytes_sent_total", cluster=cluster),
        "a cluster in": metric(on_a, "quicmesh_cluster_bytes_received_total", cluster=cluster),
        "b listeners in": metric(on_b, "quicmesh_listener_bytes_received_total"),
        "b listeners out": metric(on_b, "quicmesh_listener_bytes_sent_total"),
    }


@pytest.mark.parametrize("cluster", list(CLUSTERS))
def test_a_flow_held_open_is_counted_while_it_runs_and_once(
    mesh: Mesh, sidecar_a: tuple[SidecarProcess, dict[str, int]], cluster: str
) -> None:
    if cluster == "quic_native":
        require_engine("native")
    a, ports = sidecar_a
    durations_before = metric(
        a.metrics(), "quicmesh_listener_flow_duration_seconds_count", listener=cluster
    )
    before = byte_counts(a, mesh.b, cluster)
    moved = len(b"hello") + len(PAYLOAD)
    expected = {name: count + moved for name, count in before.items()}

    async def main() -> None:
        flow = await HeldFlow.open(ports[cluster])
        flow.writer.write(PAYLOAD)
        echoed = await asyncio.wait_for(flow.reader.readexactly(len(PAYLOAD)), 30)
        assert echoed == PAYLOAD
        # Every byte went both ways and the flow is open: counted on both sidecars now.
        running: dict[str, Any] = {}

        def counted() -> bool:
            running.update(byte_counts(a, mesh.b, cluster))
            return running == expected

        try:
            await asyncio.to_thread(wait_until, counted, 10.0, "the running flow's counts")
        except AssertionError:
            raise AssertionError(f"running counts {running}, not {expected}") from None
        assert await flow.finish(b"") is True  # (nothing more came back)

    asyncio.run(main())

    def logged() -> bool:
        return any(line["listener"] == cluster for line in a.access_log()[-4:])

    wait_until(logged, 20.0, "A logged the flow")
    wait_until(lambda: mesh.b.stats()["listeners"]["mesh"]["streams_active"] == 0, 20.0)
    assert byte_counts(a, mesh.b, cluster) == expected  # its end added nothing more
    # And its duration is in the listener's histogram (Envoy's downstream_cx_length_ms).
    on_a = a.metrics()
    name = "quicmesh_listener_flow_duration_seconds"
    assert metric(on_a, f"{name}_count", listener=cluster) == durations_before + 1
    assert metric(on_a, f"{name}_bucket", listener=cluster, le="+Inf") == durations_before + 1
    assert metric(on_a, f"{name}_bucket", listener=cluster, le="0.0005") <= durations_before
