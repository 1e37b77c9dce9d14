"""Reloads that churn clusters, endpoints and listeners (an xDS control plane does it all
day) keep no counters of what is gone: the per-name and per-endpoint stats and the
transports' counters grew by one entry for every cluster, endpoint address and rebuild
ever seen (about 5.7 KiB a push of five new names), while /stats showed only the live
ones. Totals of what is still there are kept (a counter never goes back)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from quicmesh import DevCA, H2Transport, MeshStream
from quicmesh.sidecar.cluster import SWEEP_INTERVAL
from quicmesh.sidecar.config import (
    ClusterConfig,
    InboundListenerConfig,
    format_address,
    parse_config,
    parse_destination,
)
from quicmesh.sidecar.launch import LOOPBACK, free_port
from quicmesh.sidecar.metrics import SnapshotCollector
from quicmesh.sidecar.runtime import Sidecar
from quicmesh.sidecar.stats import ClosedCounters, retire_counters, sum_counters
from quicmesh.splice import FlowIdle, IdleClock

from .conftest import IDENTITY_A, IDENTITY_B


def test_retired_counters_fold_into_one_total() -> None:
    live, first, second = Counter(a=1), Counter(a=2, b=1), Counter(b=5)
    sources: list[Counter[str]] = [first, live, second]
    retire_counters(sources, first)
    retire_counters(sources, second)
    retire_counters(sources, Counter(a=100))  # (not among them: nothing changes)
    assert len(sources) == 2 and isinstance(sources[0], ClosedCounters)
    assert sources[1] is live
    assert sum_counters(sources) == {"a": 3, "b": 6}


def _cluster(name: str, endpoint_port: int, connect_timeout: float) -> ClusterConfig:
    return ClusterConfig(
        name=name,
        transport="quic",
        target="app.local:80",
        endpoints=((LOOPBACK, endpoint_port),),
        connect_timeout=connect_timeout,
    )


def test_reloads_keep_no_counters_of_clusters_endpoints_and_listeners_gone(
    workdir: Path,
) -> None:
    async def main() -> None:
        text = (
            f"node: {{name: a, identity: '{IDENTITY_A}'}}\n"
            f"tls: {{ca_dir: '{workdir / 'ca'}'}}\n"
            f"admin: {{address: '{LOOPBACK}:{free_port()}'}}\n"
            "listeners: {inbound: [{name: in-base, address: "
            f"'{LOOPBACK}:{free_port()}', transports: [h2], destinations: ['{LOOPBACK}:9']}}]}}\n"
        )
        base = parse_config(text, source="churn.yaml")
        sidecar = Sidecar(base, None)
        await sidecar.start()
        for push in range(30):
            # "stable" is rebuilt each time (its connect_timeout changes) on a new endpoint
            # address; "gone-N" and the inbound listener "in-N" live for one push only.
            clusters = (
                _cluster("stable", 20000 + push, 1.0 + push),
                _cluster(f"gone-{push}", 21000 + push, 5.0),
            )
            inbound = replace(
                base.inbound[0],
                name=f"in-{push}",
                address=(LOOPBACK, free_port()),
            )
            await sidecar.apply_config(replace(base, clusters=clusters, inbound=(inbound,)))
        deadline = asyncio.get_running_loop().time() + 30
        # (The retired clusters close, and the removed listeners drain, in the background.)
        while sidecar.retired_clusters or sidecar._background_tasks:
            assert asyncio.get_running_loop().time() < deadline, "retired things never closed"
            await asyncio.sleep(0.05)
        try:
            assert set(sidecar.cluster_stats) == {"stable", "gone-29"}
            stable = sidecar.cluster_stats["stable"]
            assert list(stable.endpoints) == [f"{LOOPBACK}:20029"]
            assert len(stable.quic_counters) <= 2  # the live transport's, one folded total
            assert set(sidecar.listener_stats) == {"in-29"}
        finally:
            sidecar.begin_drain()
            await sidecar.wait_drained()

    asyncio.run(asyncio.wait_for(main(), 60))


def _sidecar_text(workdir: Path) -> str:
    return (
        f"node: {{name: a, identity: '{IDENTITY_A}'}}\n"
        f"tls: {{ca_dir: '{workdir / 'ca'}'}}\n"
        f"admin: {{address: '{LOOPBACK}:{free_port()}'}}\n"
        "listeners: {outbound: [{name: foo, address: "
        f"'{LOOPBACK}:{free_port()}', cluster: bad}}]}}\n"
        f"clusters: [{{name: bad, transport: h2, target: 'app:80', endpoints: ['{LOOPBACK}:9']}}]\n"
    )


def test_a_removed_cluster_leaves_its_handshake_failures_in_the_sidecars_counter(
    workdir: Path,
) -> None:
    """quicmesh_handshake_failures_total{role="client"} is the sidecar's: a cluster that
    goes takes its own counters, not what the sidecar counted (the counter went back)."""

    async def main() -> None:
        base = parse_config(_sidecar_text(workdir), source="a.yaml")
        sidecar = Sidecar(base, None)
        await sidecar.start()
        try:
            sidecar.cluster_stats["bad"].handshake_failures["peer_certificate_untrusted"] += 3
            await sidecar.apply_config(replace(base, outbound=(), clusters=()))
            while sidecar.retired_clusters or sidecar._background_tasks:
                await asyncio.sleep(0.05)
            assert "bad" not in sidecar.cluster_stats
            client = sidecar.snapshot()["handshake_failures"]["client"]
            assert client == {"peer_certificate_untrusted": 3}
        finally:
            sidecar.begin_drain()
            await sidecar.wait_drained()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_listener_name_moving_from_outbound_to_inbound_keeps_its_new_counters(
    workdir: Path,
) -> None:
    """An LDS listener whose filter changes keeps its name: the removed outbound one must
    not take the new inbound one's counters with it."""

    async def main() -> None:
        base = parse_config(_sidecar_text(workdir), source="a.yaml")
        sidecar = Sidecar(base, None)
        await sidecar.start()
        try:
            swapped = replace(
                base,
                outbound=(),
                clusters=(),
                inbound=(_inbound_listener("foo"),),
            )
            await sidecar.apply_config(swapped)
            assert sidecar.listener_stats["foo"] is sidecar.inbound["foo"].stats
            assert sidecar.listener_stats["foo"].kind == "inbound"
        finally:
            sidecar.begin_drain()
            await sidecar.wait_drained()

    asyncio.run(asyncio.wait_for(main(), 60))


def _inbound_listener(name: str) -> InboundListenerConfig:
    return InboundListenerConfig(
        name=name,
        address=(LOOPBACK, free_port()),
        transports=("h2",),
        destinations=(parse_destination(f"{LOOPBACK}:9"),),
    )


def test_the_idle_clock_expires_one_timeout_after_the_last_bytes() -> None:
    """Bytes handed on with the last move are no progress at the deadline: one timeout
    after them, not two (the Python copy waited twice as long as the native engine)."""

    async def main() -> float:
        handed_off = [0]
        clock = IdleClock(1.0, lambda: handed_off[0])
        loop = asyncio.get_running_loop()
        handed_off[0] += 4  # a write handed on ...
        clock.moved()  # ... and marked at once
        last = loop.time()
        with pytest.raises(FlowIdle):
            await clock.expired()
        return loop.time() - last

    assert asyncio.run(main()) < 1.8


def test_an_endpoint_gone_keeps_its_counters_while_a_flow_there_is_counted(
    workdir: Path,
) -> None:
    """The sweep drops a removed endpoint's counters once its pool is empty, but not while a
    flow there is still counted (its end reported later): they went then, and the flow's
    end made them again at streams_active -1; and it looks again until they can go."""

    async def main() -> None:
        text = _sidecar_text(workdir).replace(
            "endpoints: ['127.0.0.1:9']", "endpoints: ['127.0.0.1:9', '127.0.0.1:10']"
        )
        sidecar = Sidecar(parse_config(text, source="a.yaml"), None)
        await sidecar.start()
        try:
            cluster = sidecar.clusters["bad"]
            gone = cluster.endpoints[(LOOPBACK, 9)]
            cluster.stats.endpoint(gone.name).streams_active += 1  # a flow there, counted
            cluster.set_endpoints(((LOOPBACK, 10),))
            await asyncio.sleep(2.5 * SWEEP_INTERVAL)  # two sweeps, that must keep them
            assert gone in cluster.retired
            assert cluster.stats.endpoints[gone.name].streams_active == 1
            cluster.stats.endpoint(gone.name).streams_active -= 1  # its end
            deadline = asyncio.get_running_loop().time() + 10
            while gone.name in cluster.stats.endpoints:
                assert asyncio.get_running_loop().time() < deadline, "counters kept for ever"
                await asyncio.sleep(0.1)
            assert gone not in cluster.retired
        finally:
            sidecar.begin_drain()
            await sidecar.wait_drained()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("rebuilt", [False, True], ids=["endpoints-only", "rebuilt"])
def test_an_endpoint_a_reload_removed_shows_removed_while_its_flow_runs_on(
    workdir: Path, rebuilt: bool
) -> None:
    """An endpoint a reload removed while a flow ran on it is ``removed`` in /stats and
    quicmesh_endpoint_health until the flow ends. When the reload rebuilt the cluster
    (another key changed too) it showed ``healthy``: the retired version's own view of
    it was taken as it was."""

    async def main() -> None:
        ca = DevCA.load(workdir / "ca")
        server = H2Transport(identity=ca.issue(IDENTITY_B), trust=ca.trust_bundle)
        hold = asyncio.Event()

        async def held(stream: MeshStream) -> None:
            stream.accept()
            await hold.wait()

        listeners = [await server.listen((LOOPBACK, 0), held) for _ in range(2)]
        gone, kept = (format_address(listener.address) for listener in listeners)
        text = _sidecar_text(workdir).replace(f"['{LOOPBACK}:9']", f"['{gone}']")
        base = parse_config(text, source="a.yaml")
        sidecar = Sidecar(base, None)
        await sidecar.start()
        first = sidecar.clusters["bad"]
        try:
            flow = await first.open_flow()
            cluster = replace(base.clusters[0], endpoints=(listeners[1].address,))
            if rebuilt:
                cluster = replace(cluster, load_balancing="random")
            await sidecar.apply_config(replace(base, clusters=(cluster,)))
            assert (sidecar.clusters["bad"] is not first) is rebuilt
            endpoints = sidecar.snapshot()["clusters"]["bad"]["endpoints"]
            assert endpoints[gone]["health"] == "removed"
            assert endpoints[gone]["streams_active"] == 1
            assert endpoints[kept]["health"] == "healthy"
            states = {
                sample.labels["endpoint"]: sample.labels["state"]
                for family in SnapshotCollector(sidecar.snapshot).collect()
                if family.name == "quicmesh_endpoint_health"
                for sample in family.samples
                if sample.value == 1.0
            }
            assert states == {gone: "removed", kept: "healthy"}
            flow.stream.abort()
            first.flow_finished(flow, 0, 0)
        finally:
            hold.set()
            sidecar.begin_drain()
            await sidecar.wait_drained()
            for listener in listeners:
                listener.close()
                await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 60))
