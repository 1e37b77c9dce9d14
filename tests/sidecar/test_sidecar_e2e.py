"""End to end: real sidecar processes over each transport, with real loopback sockets.

Sidecar B (module fixture ``mesh``) serves quic+h2 and tcp tunnels in front of an
echo app; each test starts the sidecar A it needs with ``python -m quicmesh sidecar``.
Synchronisation is by events (an echoed byte proves a flow is established) or by
polling ``/ready``, ``/stats`` and the access log with a deadline, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.admin.v3 import clusters_pb2
from google.protobuf import json_format

from quicmesh.sidecar.launch import SidecarProcess, free_port, metric, parse_metrics
from quicmesh.tls import DevCA
from quicmesh.transport.base import default_quic_engine

from .conftest import (
    IDENTITY_A,
    IDENTITY_B,
    HeldFlow,
    Mesh,
    addr,
    b_config,
    dead_port,
    echo_flow,
    refused,
    wait_until,
)

TRANSPORTS = ["quic", "h2", "tcp"]


@pytest.fixture(scope="module")
def main_a(mesh: Mesh) -> Iterator[tuple[SidecarProcess, dict[str, int]]]:
    """Sidecar A with one listener per scenario."""
    with dead_port() as dead_one, dead_port() as dead_two:
        yield from _main_a(mesh, addr(dead_one), addr(dead_two))


def _main_a(
    mesh: Mesh, dead: str, forbidden: str
) -> Iterator[tuple[SidecarProcess, dict[str, int]]]:
    clusters = [
        *(mesh.cluster(f"echo_{t}", t, load_balancing="least_request") for t in TRANSPORTS),
        *(
            mesh.cluster(
                f"eject_{t}",
                t,
                endpoints=[dead, mesh.endpoint(t)],
                load_balancing="round_robin",
                connect_timeout="1s",
                connect_retries=1,
                outlier_detection={"consecutive_connect_failures": 1, "base_ejection_time": "60s"},
            )
            for t in TRANSPORTS
        ),
        mesh.cluster("breaker", "quic", circuit_breakers={"max_concurrent_streams": 2}),
        mesh.cluster("echo_bbr", "quic", congestion_control="bbr"),
        mesh.cluster("forbidden", "quic", target=forbidden),
        mesh.cluster("stranger", "quic", endpoints=[addr(mesh.ports["strict"])]),
    ]
    config, ports = mesh.a_config(clusters)
    a = SidecarProcess("a-main", config, mesh.workdir)
    a.start()
    a.wait_ready()
    yield a, ports
    assert a.stop() == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_concurrent_flows_arrive_intact(
    main_a: tuple[SidecarProcess, dict[str, int]], mesh: Mesh, transport: str
) -> None:
    a, ports = main_a
    payloads = [os.urandom(1000 + 997 * i) for i in range(48)]

    async def main() -> list[bytes]:
        return await asyncio.gather(*(echo_flow(ports[f"echo_{transport}"], p) for p in payloads))

    results = asyncio.run(main())
    assert [len(r) for r in results] == [len(p) for p in payloads]
    assert results == payloads
    cluster = f"echo_{transport}"
    wait_until(
        lambda: metric(a.metrics(), "quicmesh_cluster_flows_total", cluster=cluster) == 48,
        what="48 flows counted",
    )
    samples = a.metrics()
    total = sum(len(p) for p in payloads)
    assert metric(samples, "quicmesh_cluster_bytes_sent_total", cluster=cluster) == total
    assert metric(samples, "quicmesh_cluster_bytes_received_total", cluster=cluster) == total
    assert metric(samples, "quicmesh_cluster_streams_total", cluster=cluster) == 48
    assert metric(samples, "quicmesh_listener_connections_total", listener=cluster) == 48
    if transport != "tcp":
        # Many streams, few connections: a new one only at the peer's stream limit.
        assert metric(samples, "quicmesh_cluster_connections_total", cluster=cluster) <= 2
    if transport == "quic":
        assert metric(samples, "quicmesh_peer_connection_rtt_seconds", cluster=cluster) > 0
        assert metric(samples, "quicmesh_peer_connection_cwnd_bytes", cluster=cluster) > 0
    lines = [r for r in a.access_log() if r["listener"] == cluster]
    assert len(lines) == 48
    assert {r["outcome"] for r in lines} == {"completed"}
    assert {r["transport"] for r in lines} == {transport}
    assert {r["peer_identity"] for r in lines} == {"spiffe://mesh.local/ns/default/sa/reviews"}
    assert sum(r["bytes_sent"] for r in lines) == total
    # Envoy's ?filter= (a regex searched in each stat's name), on both formats.
    status, body = a.request("GET", f"/stats/prometheus?filter=cluster_flows_total.*{cluster}")
    assert status == 200
    filtered = parse_metrics(body.decode())
    assert {name for name, _ in filtered} == {"quicmesh_cluster_flows_total"}
    assert [dict(labels)["cluster"] for _, labels in filtered] == [cluster]
    status, body = a.request("GET", f"/stats?filter=^clusters\\.{cluster}\\.streams_total$")
    assert status == 200
    assert json.loads(body) == {"clusters": {cluster: {"streams_total": 48}}}
    status, body = a.request("GET", "/stats?filter=(")
    assert status == 400 and b"not a regular expression" in body
    # Envoy's /clusters and /listeners (text).
    status, body = a.request("GET", "/clusters")
    lines = body.decode().splitlines()
    assert status == 200
    assert f"{cluster}::{mesh.endpoint(transport)}::rq_total::48" in lines
    assert f"{cluster}::{mesh.endpoint(transport)}::health_flags::healthy" in lines
    status, body = a.request("GET", "/clusters?format=json")  # as istioctl reads it
    assert status == 200
    statuses = json_format.Parse(body, clusters_pb2.Clusters()).cluster_statuses
    (hosts,) = [c.host_statuses for c in statuses if c.name == cluster]
    (rq_total,) = [m.value for h in hosts for m in h.stats if m.name == "rq_total"]
    assert rq_total == 48
    status, body = a.request("GET", "/listeners")
    assert status == 200 and f"{cluster}::{addr(ports[cluster])}" in body.decode().splitlines()
    # Envoy's stat names in its text form, as Istio's agent asks for them.
    status, body = a.request("GET", "/stats?usedonly&filter=^(server\\.state|cluster\\.echo_)")
    lines = body.decode().splitlines()
    assert status == 200 and "server.state: 0" in lines
    assert f"cluster.{cluster}.upstream_rq_total: 48" in lines


def test_bbr_cluster_carries_flows_with_bbr(
    main_a: tuple[SidecarProcess, dict[str, int]],
) -> None:
    a, ports = main_a
    payloads = [os.urandom(50_000 + i) for i in range(8)]

    async def main() -> list[bytes]:
        return await asyncio.gather(*(echo_flow(ports["echo_bbr"], p) for p in payloads))

    assert asyncio.run(main()) == payloads
    cluster = a.stats()["clusters"]["echo_bbr"]
    connections = [c for e in cluster["endpoints"].values() for c in e["connections"]]
    assert connections
    assert {c["congestion_control"] for c in connections} == {"bbr"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_down_endpoint_is_ejected_and_traffic_moves(
    main_a: tuple[SidecarProcess, dict[str, int]], mesh: Mesh, transport: str
) -> None:
    a, ports = main_a
    cluster = f"eject_{transport}"
    payloads = [os.urandom(5000) for _ in range(10)]

    async def main() -> list[bytes]:
        return [await echo_flow(ports[cluster], p) for p in payloads]

    assert asyncio.run(main()) == payloads
    samples = a.metrics()
    healthy = mesh.endpoint(transport)
    dead = next(
        dict(labels)["endpoint"]
        for (name, labels), _ in samples.items()
        if name == "quicmesh_endpoint_health"
        and dict(labels)["cluster"] == cluster
        and dict(labels)["endpoint"] != healthy
    )
    assert (
        metric(samples, "quicmesh_endpoint_health", cluster=cluster, endpoint=dead, state="ejected")
        == 1
    )
    assert (
        metric(
            samples, "quicmesh_endpoint_health", cluster=cluster, endpoint=healthy, state="healthy"
        )
        == 1
    )
    assert metric(samples, "quicmesh_endpoint_ejections_total", cluster=cluster, endpoint=dead) == 1
    assert (
        metric(samples, "quicmesh_endpoint_streams_total", cluster=cluster, endpoint=healthy) == 10
    )
    assert metric(samples, "quicmesh_cluster_connect_failures_total", cluster=cluster) == 1
    assert metric(samples, "quicmesh_cluster_retries_total", cluster=cluster) == 1


def test_circuit_breaker_overflow_is_refused_and_counted(
    main_a: tuple[SidecarProcess, dict[str, int]],
) -> None:
    a, ports = main_a

    async def main() -> tuple[bool, list[bool]]:
        held = [await HeldFlow.open(ports["breaker"]) for _ in range(2)]
        overflowed = await refused(ports["breaker"])
        finished = [await flow.finish(b"bye" * 1000) for flow in held]
        return overflowed, finished

    overflowed, finished = asyncio.run(main())
    assert overflowed
    assert finished == [True, True]
    samples = a.metrics()
    assert (
        metric(
            samples,
            "quicmesh_cluster_circuit_breaker_overflows_total",
            cluster="breaker",
            limit="max_concurrent_streams",
        )
        == 1
    )
    lines = wait_until(
        lambda: [r for r in a.access_log() if r["listener"] == "breaker"][2:] and a.access_log(),
        what="three breaker flows logged",
    )
    outcomes = sorted(r["outcome"] for r in lines if r["listener"] == "breaker")
    assert outcomes == ["completed", "completed", "overflow"]


def test_a_destination_the_peer_cannot_reach_is_logged_unreachable_on_both_sides(
    workdir: Path,
) -> None:
    """B answers a flow whose destination refuses its connect 502: both sidecars log the
    flow ``destination_unreachable`` (A logged it ``refused``, as a policy's 403), on
    every transport and with the native engine's outbound engine flows."""
    with dead_port() as dead:
        unreachable = Mesh(workdir, dead, name="b-unreachable")
        unreachable.b.start()
        unreachable.b.wait_ready()
        try:
            config, ports = unreachable.a_config(
                [unreachable.cluster(f"dead_{t}", t) for t in TRANSPORTS]
            )
            a = SidecarProcess("a-unreachable", config, workdir)
            a.start()
            a.wait_ready()
            try:
                for transport in TRANSPORTS:
                    assert asyncio.run(refused(ports[f"dead_{transport}"])), transport
                for transport in TRANSPORTS:
                    line = wait_until(
                        lambda t=transport: [
                            r for r in a.access_log() if r["listener"] == f"dead_{t}"
                        ],
                        what=f"A's access-log line ({transport})",
                    )[0]
                    assert line["outcome"] == "destination_unreachable", line
                    assert "502" in line["reason"], line
                    assert line["peer_identity"] == IDENTITY_B
                b_lines = wait_until(
                    lambda: (
                        [
                            r
                            for r in unreachable.b.access_log()
                            if r["outcome"] == "destination_unreachable"
                        ]
                        if len(unreachable.b.access_log()) >= len(TRANSPORTS)
                        else []
                    ),
                    what="B's access-log lines",
                )
                assert len(b_lines) == len(TRANSPORTS)
                samples = a.metrics()
                for transport in TRANSPORTS:
                    assert (
                        metric(
                            samples,
                            "quicmesh_listener_flows_total",
                            listener=f"dead_{transport}",
                            outcome="destination_unreachable",
                        )
                        == 1
                    ), transport
            finally:
                assert a.stop() == 0
        finally:
            unreachable.b.stop()


@pytest.mark.parametrize(
    ("listener", "b_listener", "reason"),
    [
        ("forbidden", "mesh", "is not allowed by listener mesh"),
        ("stranger", "strict", "spiffe://mesh.local/ns/default/sa/productpage is not allowed"),
    ],
)
def test_refused_destination_or_identity_is_reset_with_a_reason(
    main_a: tuple[SidecarProcess, dict[str, int]],
    mesh: Mesh,
    listener: str,
    b_listener: str,
    reason: str,
) -> None:
    a, ports = main_a
    assert asyncio.run(refused(ports[listener]))
    a_line = wait_until(
        lambda: [r for r in a.access_log() if r["listener"] == listener],
        what="A's access-log line",
    )[0]
    assert a_line["outcome"] == "refused"
    assert "403" in a_line["reason"] and reason in a_line["reason"]
    assert a_line["peer_identity"] == IDENTITY_B  # (the refusing peer: it was sometimes empty)
    b_line = wait_until(
        lambda: [
            r
            for r in mesh.b.access_log()
            if r["listener"] == b_listener and r["outcome"] == "refused"
        ],
        what="B's access-log line",
    )[-1]
    assert reason in b_line["reason"]
    assert b_line["peer_identity"] == "spiffe://mesh.local/ns/default/sa/productpage"
    samples = mesh.b.metrics()
    assert (
        metric(samples, "quicmesh_listener_flows_total", listener=b_listener, outcome="refused")
        >= 1
    )


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "node": {"name": "a", "identity": "spiffe://mesh.local/a"},
                "tls": {"ca_dir": "ca"},
                "admin": {"address": "127.0.0.1:15000"},
                "listeners": {
                    "outbound": [{"name": "x", "address": "127.0.0.1:1", "cluster": "c"}]
                },
                "clusters": [
                    {
                        "name": "c",
                        "transport": "quic",
                        "target": "a:1",
                        "endpoints": ["127.0.0.1:1", "127.0.0.1:70000"],
                    }
                ],
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "quicmesh", "sidecar", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"quicmesh sidecar: {path}: clusters[0].endpoints[1]: port 70000 is outside 1-65535"
    )
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("limit", "said"),
    [
        ({"overload_max_rss": 1}, "overload_max_rss: 1 MiB is below what the sidecar uses"),
        ({"overload_max_descriptors": 3}, "overload_max_descriptors: 3 is below what the"),
    ],
)
def test_an_overload_limit_the_sidecar_is_over_already_is_refused_at_start(
    tmp_path: Path, limit: dict[str, int], said: str
) -> None:
    """A limit below what the sidecar uses at start refused every stream while /ready
    said ready; the start now fails in one line naming the file and the field."""
    DevCA().save(tmp_path / "ca")
    path = tmp_path / "sidecar.yaml"
    inbound = {
        "name": "mesh",
        "address": f"127.0.0.1:{free_port()}",
        "transports": ["quic"],
        "destinations": ["127.0.0.1:9"],
        **limit,
    }
    path.write_text(
        yaml.safe_dump(
            {
                "node": {"name": "b", "identity": "spiffe://mesh.local/b"},
                "tls": {"ca_dir": str(tmp_path / "ca")},
                "admin": {"address": f"127.0.0.1:{free_port()}"},
                "listeners": {"inbound": [inbound]},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "quicmesh", "sidecar", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr  # (a configuration error)
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("quicmesh sidecar:")]
    assert line.startswith(f"quicmesh sidecar: {path}: listeners.inbound[0].{said}"), line
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("transport", ["quic", "h2"])
def test_drain_on_sigterm_loses_nothing(workdir: Path, echo_port: int, transport: str) -> None:
    mesh = Mesh(workdir, echo_port, name=f"b-drain-{transport}")
    mesh.b.start()
    config, ports = mesh.a_config([mesh.cluster("echo", transport)])
    a = SidecarProcess(f"a-drain-{transport}", config, workdir)
    a.start()
    try:
        mesh.b.wait_ready()
        a.wait_ready()
        payloads = [os.urandom(60_000) for _ in range(16)]

        async def main() -> tuple[list[bool], bool]:
            held = await asyncio.gather(*(HeldFlow.open(ports["echo"]) for _ in payloads))
            # Every flow is established through both sidecars: now drain both.
            a.signal(signal.SIGTERM)
            mesh.b.signal(signal.SIGTERM)
            for sidecar in (a, mesh.b):  # (B too: a loaded machine was slow to signal it,
                # B served the late flow, and the test read its echo until its timeout)
                await asyncio.to_thread(
                    wait_until, lambda s=sidecar: s.request("GET", "/ready")[0] == 503, 10.0,
                    f"{sidecar.name} draining",
                )  # fmt: skip
            late = await refused(ports["echo"])
            results = await asyncio.gather(
                *(f.finish(p) for f, p in zip(held, payloads, strict=True))
            )
            return list(results), late

        results, late = asyncio.run(main())
        assert results == [True] * len(payloads)
        assert late, "a new connection during the drain must be refused"
        assert a.process is not None and a.process.wait(15) == 0
        assert mesh.b.process is not None and mesh.b.process.wait(15) == 0
        completed = [r for r in a.access_log() if r["outcome"] == "completed"]
        assert len(completed) == len(payloads)
        assert "drained in" in a.stderr()
        # B told A first (an HTTP/3 or HTTP/2 GOAWAY), so that A opens new flows
        # elsewhere; A's flows under way carried on (above).
        assert "told 1 peer connection(s) to go away (GOAWAY)" in mesh.b.stderr()
    finally:
        a.stop()
        mesh.b.stop()


@contextlib.contextmanager
def _quic_pair(
    workdir: Path, echo_port: int, name: str, **a_settings: Any
) -> Iterator[tuple[SidecarProcess, dict[str, int]]]:
    """Sidecars ``a-NAME`` and ``b-NAME`` up, A's cluster ``echo`` on QUIC to B, with
    ``a_settings`` in A's configuration; both stopped after."""
    mesh = Mesh(workdir, echo_port, name=f"b-{name}")
    mesh.b.start()
    config, ports = mesh.a_config([mesh.cluster("echo", "quic")])
    config.update(a_settings)
    a = SidecarProcess(f"a-{name}", config, workdir)
    a.start()
    try:
        mesh.b.wait_ready()
        a.wait_ready()
        yield a, ports
    finally:
        a.stop()
        mesh.b.stop()


def test_a_draining_sidecar_still_carries_the_applications_new_outbound_flows(
    workdir: Path, echo_port: int
) -> None:
    """A drain is inbound only, as Istio's: while live flows finish, the application's
    new outbound connections are carried (they were refused from the drain's start, so
    a request being served that had to call out failed)."""
    with _quic_pair(workdir, echo_port, "drain-outbound", drain={"grace_period": "60s"}) as (
        a,
        ports,
    ):

        async def main() -> None:
            held = await HeldFlow.open(ports["echo"])  # keeps the drain waiting
            assert a.request("POST", "/drain")[0] == 202
            await asyncio.to_thread(
                wait_until, lambda: "draining: 1 live flows" in a.stderr(), 10.0, "A draining"
            )
            late = await HeldFlow.open(ports["echo"])  # (echoed "hello": carried)
            assert await late.finish(b"a call out while draining") is True
            assert await held.finish(b"done") is True
            assert a.process is not None
            assert await asyncio.to_thread(a.process.wait, 15) == 0

        asyncio.run(main())
        assert [r["outcome"] for r in a.access_log() if r["listener"] == "echo"] == [
            "completed",
            "completed",
        ]


def test_a_second_sigterm_ends_the_grace_period_at_once(workdir: Path, echo_port: int) -> None:
    """Found by a review: with a long grace period (up to a day) and a flow that does
    not end, further signals did nothing; an operator's way out was kill -9."""
    with _quic_pair(workdir, echo_port, "second-sigterm", drain={"grace_period": "3600s"}) as (
        a,
        ports,
    ):

        async def main() -> None:
            held = await HeldFlow.open(ports["echo"])  # never finished
            assert json.loads(a.request("GET", "/server_info")[1])["state"] == "LIVE"
            # A drain the admin began (a preStop hook), then the kubelet's SIGTERM: the
            # first signal does not cut the grace period (review of the first version).
            assert a.request("POST", "/drain")[0] == 202
            await asyncio.to_thread(
                wait_until, lambda: "draining: 1 live flows" in a.stderr(), 10.0, "A draining"
            )
            assert json.loads(a.request("GET", "/server_info")[1])["state"] == "DRAINING"
            a.signal(signal.SIGTERM)
            await asyncio.to_thread(
                wait_until, lambda: "draining already" in a.stderr(), 10.0, "the SIGTERM"
            )
            held.writer.write(b"still carried")
            assert await asyncio.wait_for(held.reader.readexactly(13), 10) == b"still carried"
            a.signal(signal.SIGINT)
            assert a.process is not None
            assert await asyncio.to_thread(a.process.wait, 15) == 0
            held.writer.close()

        asyncio.run(main())
        assert "asked again to stop: ending the grace period now" in a.stderr()
        assert "grace period ended early: closing 1 live flows" in a.stderr()
        assert "drained in" in a.stderr() and "Traceback" not in a.stderr()
        (line,) = [r for r in a.access_log() if r["listener"] == "echo"]
        assert line["outcome"] == "reset", line
        assert line["reason"].startswith("cut by the drain (grace period ended early)"), line
        # Which engine the clusters and listeners that name none run on, said at start.
        assert f"QUIC engine where none is named: {default_quic_engine()}" in a.stderr()


def test_drain_listeners_as_istios_agent_sends_it(workdir: Path, echo_port: int) -> None:
    """Envoy's ``POST /drain_listeners?inboundonly&graceful`` (what Istio's agent sends
    before it stops the proxy) is the sidecar's drain: the outbound side keeps carrying
    the application's new flows, live ones finish, the process exits 0."""
    with _quic_pair(workdir, echo_port, "drain-listeners", drain={"grace_period": "60s"}) as (
        a,
        ports,
    ):

        async def main() -> None:
            held = await HeldFlow.open(ports["echo"])
            assert a.request("POST", "/drain_listeners?drain_time_s=1")[0] == 400
            assert json.loads(a.request("GET", "/server_info")[1])["state"] == "LIVE"
            assert a.request("POST", "/drain_listeners?inboundonly&graceful") == (200, b"OK\n")
            await asyncio.to_thread(
                wait_until, lambda: "draining: 1 live flows" in a.stderr(), 10.0, "A draining"
            )
            assert json.loads(a.request("GET", "/server_info")[1])["state"] == "DRAINING"
            late = await HeldFlow.open(ports["echo"])
            assert await late.finish(b"a call out while draining") is True
            assert await held.finish(b"done") is True
            assert a.process is not None
            assert await asyncio.to_thread(a.process.wait, 15) == 0

        asyncio.run(main())
        outcomes = [r["outcome"] for r in a.access_log() if r["listener"] == "echo"]
        assert outcomes == ["completed", "completed"]


def test_drain_listeners_without_inboundonly_stops_the_outbound_listeners_at_once(
    workdir: Path, echo_port: int
) -> None:
    """Without ``inboundonly`` Envoy drains every listener: the outbound one takes no new
    connection from the drain's start, while the flow it carries finishes."""
    with _quic_pair(workdir, echo_port, "drain-all", drain={"grace_period": "60s"}) as (a, ports):

        async def main() -> None:
            held = await HeldFlow.open(ports["echo"])
            assert a.request("POST", "/drain_listeners?graceful") == (200, b"OK\n")
            assert await refused(ports["echo"])
            assert await held.finish(b"finished after the listener closed") is True
            assert a.process is not None
            assert await asyncio.to_thread(a.process.wait, 15) == 0

        asyncio.run(main())
        assert [r["outcome"] for r in a.access_log() if r["listener"] == "echo"] == ["completed"]


BATCH = 20
"""Flows opened together during a graceful drain."""


def test_a_graceful_drain_serves_new_inbound_flows_for_its_minimum(
    workdir: Path, echo_port: int
) -> None:
    """``/drain_listeners?inboundonly&graceful`` on the serving side B, as Istio's agent
    sends it: its peers are told to go away, yet for ``drain.min_duration`` the flows
    that still reach it (A, with no other endpoint, dials it again) are served, not
    refused with 503 (they were, from the drain's start); after it, they are refused,
    and B exits once its live flow is done."""
    mesh = Mesh(workdir, echo_port, name="b-graceful")
    # (The minimum leaves a loaded machine time for the flows below: they take well
    # under a second here.)
    mesh.b.config["drain"] = {"grace_period": "60s", "min_duration": "8s"}
    mesh.b.start()
    config, ports = mesh.a_config([mesh.cluster("echo", "quic")])
    a = SidecarProcess("a-graceful", config, workdir)
    a.start()
    b = mesh.b
    try:
        b.wait_ready()
        a.wait_ready()

        async def main() -> None:
            held = await HeldFlow.open(ports["echo"])  # keeps B's drain waiting
            assert b.request("POST", "/drain_listeners?inboundonly&graceful") == (200, b"OK\n")
            await asyncio.to_thread(
                wait_until, lambda: "(graceful: inbound flows taken" in b.stderr(), 10.0, "B"
            )
            for _ in range(3):
                late = await HeldFlow.open(ports["echo"])
                assert await late.finish(b"served while B drains") is True

            # Together (found by a review): each new connection was told to go away at
            # its first flow, so the flows crossing that GOAWAY were refused on two new
            # connections in turn, and A answered 503. Told at the period's end now.
            async def flow() -> bool:
                return await (await HeldFlow.open(ports["echo"])).finish(b"many at once")

            assert await asyncio.gather(*(flow() for _ in range(BATCH))) == [True] * BATCH
            await asyncio.to_thread(
                wait_until, lambda: "graceful period over" in b.stderr(), 20.0, "the minimum"
            )
            assert await refused(ports["echo"])
            assert await held.finish(b"done") is True
            assert b.process is not None
            assert await asyncio.to_thread(b.process.wait, 15) == 0

        asyncio.run(main())
    finally:
        a.stop()
        b.stop()
    outcomes = [r["outcome"] for r in b.access_log() if r["listener"] == "mesh"]
    assert outcomes.count("completed") == 4 + BATCH, outcomes
    assert "draining" in outcomes, outcomes  # the flow after the minimum
    assert "told 1 peer connection(s) to go away" in b.stderr()
    assert "Traceback" not in b.stderr()


@pytest.mark.parametrize(
    "calls",
    [
        ["/drain_listeners?graceful"],
        # Found by a review: a second call during the graceful period closed them at once.
        ["/drain_listeners?inboundonly&graceful", "/drain_listeners?graceful"],
    ],
    ids=["one-call", "after-inboundonly"],
)
def test_a_graceful_drain_of_every_listener_closes_the_outbound_ones_after_its_minimum(
    workdir: Path, echo_port: int, calls: list[str]
) -> None:
    """``/drain_listeners?graceful`` without ``inboundonly``: Envoy's graceful drain
    period applies to the outbound listeners too, which take new connections for
    ``drain.min_duration`` and stop then, not at once."""
    drain = {"grace_period": "60s", "min_duration": "6s"}
    with _quic_pair(workdir, echo_port, f"graceful-all-{len(calls)}", drain=drain) as (a, ports):

        async def main() -> None:
            held = await HeldFlow.open(ports["echo"])
            for call in calls:
                assert a.request("POST", call) == (200, b"OK\n")
            late = await HeldFlow.open(ports["echo"])
            assert await late.finish(b"taken in the graceful period") is True
            await asyncio.to_thread(
                wait_until, lambda: "graceful period over" in a.stderr(), 20.0, "the minimum"
            )
            assert await refused(ports["echo"])
            assert await held.finish(b"finished after the listener closed") is True
            assert a.process is not None
            assert await asyncio.to_thread(a.process.wait, 15) == 0

        asyncio.run(main())
        outcomes = [r["outcome"] for r in a.access_log() if r["listener"] == "echo"]
        assert outcomes == ["completed", "completed"]


def test_a_drain_without_graceful_ends_a_graceful_period_at_once(
    workdir: Path, echo_port: int
) -> None:
    """Envoy's ``/drain_listeners`` without ``graceful`` stops the listeners at once:
    during a graceful period (an hour here) it ends that period (found by a review: it
    ran on), while a SIGTERM, the usual stop, leaves it to run."""
    drain = {"grace_period": "7200s", "min_duration": "3600s"}
    with _quic_pair(workdir, echo_port, "graceful-ended", drain=drain) as (a, ports):

        async def main() -> None:
            held = await HeldFlow.open(ports["echo"])
            assert a.request("POST", "/drain_listeners?graceful") == (200, b"OK\n")
            a.signal(signal.SIGTERM)
            await asyncio.to_thread(
                wait_until, lambda: "draining already" in a.stderr(), 10.0, "the SIGTERM"
            )
            late = await HeldFlow.open(ports["echo"])
            assert await late.finish(b"taken: the graceful period runs on") is True
            assert a.request("POST", "/drain_listeners") == (200, b"OK\n")
            assert await refused(ports["echo"])
            assert "asked to drain without graceful" in a.stderr()
            assert await held.finish(b"still carried") is True
            assert a.request("POST", "/quitquitquit") == (200, b"OK\n")  # (the minimum: 1 h)
            assert a.process is not None
            assert await asyncio.to_thread(a.process.wait, 15) == 0

        asyncio.run(main())
        outcomes = [r["outcome"] for r in a.access_log() if r["listener"] == "echo"]
        assert outcomes == ["completed", "completed"]


def test_quitquitquit_stops_the_sidecar_now(workdir: Path, echo_port: int) -> None:
    """Envoy's ``POST /quitquitquit``: however long the grace period, the live flow is
    cut (logged as such) and the process exits 0 at once."""
    with _quic_pair(workdir, echo_port, "quit", drain={"grace_period": "3600s"}) as (a, ports):

        async def main() -> None:
            held = await HeldFlow.open(ports["echo"])  # never finished
            assert a.request("POST", "/quitquitquit") == (200, b"OK\n")
            assert a.process is not None
            assert await asyncio.to_thread(a.process.wait, 15) == 0
            held.writer.close()

        asyncio.run(main())
        said = a.stderr()
        assert "asked to quit: ending the grace period now" in said
        assert said.index("draining: 1 live flows") < said.index("asked to quit")
        assert "Traceback" not in a.stderr()
        (line,) = [r for r in a.access_log() if r["listener"] == "echo"]
        assert line["outcome"] == "reset", line
        assert line["reason"].startswith("cut by the drain (grace period ended early)"), line


def test_a_drain_lasts_its_minimum_and_carries_the_applications_calls_meanwhile(
    workdir: Path, echo_port: int
) -> None:
    """``drain.min_duration`` (Istio's terminationDrainDuration): an idle sidecar told to
    drain keeps its outbound listeners for that long, so an application that is
    stopping too can still call out (it exited at once, refusing them; a review), and
    a second SIGTERM still ends it at once."""
    drain = {"grace_period": "60s", "min_duration": "60s"}
    with _quic_pair(workdir, echo_port, "drain-minimum", drain=drain) as (a, ports):

        async def main() -> None:
            a.signal(signal.SIGTERM)
            await asyncio.to_thread(
                wait_until,
                lambda: "draining: 0 live flows, grace period 60s, for at least 60s" in a.stderr(),
                10.0,
                "A draining",
            )
            for _ in range(2):
                late = await HeldFlow.open(ports["echo"])
                assert await late.finish(b"a call out while draining") is True
            assert a.process is not None and a.process.poll() is None  # (still draining)
            a.signal(signal.SIGTERM)
            assert await asyncio.to_thread(a.process.wait, 15) == 0

        asyncio.run(main())
        outcomes = [r["outcome"] for r in a.access_log() if r["listener"] == "echo"]
        assert outcomes == ["completed", "completed"]
        assert "asked again to stop: ending the grace period now" in a.stderr()


def test_certs_shows_the_chain_presented_and_the_roots(workdir: Path, echo_port: int) -> None:
    """``GET /certs`` in Envoy's shape: the development CA's root from its file, the
    certificate the sidecar issued itself (the serial ``/stats`` reports, its SPIFFE ID),
    whole days to expiry; never a private key."""
    with _quic_pair(workdir, echo_port, "certs") as (a, _ports):
        status, body = a.request("GET", "/certs")
        assert status == 200 and b"PRIVATE KEY" not in body
        (entry,) = json.loads(body)["certificates"]
        root = DevCA.load(workdir / "ca").trust_bundle.certificates[0]
        (ca,) = entry["ca_cert"]
        assert ca["path"] == str(workdir / "ca" / "ca.pem")
        assert ca["serial_number"] == format(root.serial_number, "x")
        assert ca["expiration_time"] == root.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        (leaf,) = entry["cert_chain"]
        assert leaf["serial_number"] == a.stats()["certificate"]["serial"]
        assert leaf["subject_alt_names"] == [{"uri": IDENTITY_A}]
        assert leaf["path"].startswith("<issued by the development CA in ")
        expires = datetime.datetime.strptime(leaf["expiration_time"], "%Y-%m-%dT%H:%M:%S%z")
        left = (expires - datetime.datetime.now(datetime.UTC)).days
        assert leaf["days_until_expiration"] in (str(left), str(left + 1))  # (whole days)
        assert expires > datetime.datetime.now(datetime.UTC)


def test_logging_levels_change_what_the_sidecar_logs(workdir: Path, echo_port: int) -> None:
    """``POST /logging?level=warning`` on a running sidecar: its drain's INFO lines
    (which every other drain test reads) are no longer written."""
    with _quic_pair(workdir, echo_port, "logging") as (a, _ports):
        status, body = a.request("POST", "/logging")
        assert status == 200 and b"  quicmesh.sidecar: info\n" in body
        status, body = a.request("POST", "/logging?level=warning")
        assert status == 200 and b"  quicmesh.sidecar: warning\n" in body
        assert a.request("POST", "/logging?level=chatty")[0] == 400
        a.signal(signal.SIGTERM)
        assert a.process is not None and a.process.wait(15) == 0
        assert "draining:" not in a.stderr() and "drained in" not in a.stderr()


def test_a_drain_ends_when_the_access_log_cannot_be_written(workdir: Path, echo_port: int) -> None:
    """A full disk under the access log (``/dev/full``): the flow is carried, the lines
    are lost with a warning, and SIGTERM still drains and exits 0 (the line left in the
    file's buffer failed again at close, and the drain never ended)."""
    with _quic_pair(workdir, echo_port, "full-log", access_log={"path": "/dev/full"}) as (
        a,
        ports,
    ):

        async def flow() -> bool:
            return await (await HeldFlow.open(ports["echo"])).finish(b"on a full disk")

        assert asyncio.run(flow())
        a.signal(signal.SIGTERM)
        assert a.process is not None and a.process.wait(15) == 0
        assert "cannot write the access log" in a.stderr()
        assert "drained in" in a.stderr() and "Traceback" not in a.stderr()


def _connection_ids(stats: dict[str, Any]) -> set[str]:
    """The labels of cluster ``echo``'s peer connections in a /stats answer."""
    endpoints = stats["clusters"]["echo"]["endpoints"].values()
    return {c["id"] for endpoint in endpoints for c in endpoint["connections"]}


def test_reload_keeps_live_flows_and_refuses_bad_configs(mesh: Mesh, tmp_path: Path) -> None:
    endpoints_file = tmp_path / "endpoints.yaml"
    endpoints_file.write_text(yaml.safe_dump([mesh.endpoint("quic")]))
    config, ports = mesh.a_config(
        [
            mesh.cluster("echo", "quic"),
            mesh.cluster("watched", "quic", endpoints=None, endpoints_file=str(endpoints_file)),
        ]
    )
    del config["clusters"][1]["endpoints"]
    a = SidecarProcess("a-reload", config, mesh.workdir)
    a.start()
    try:
        a.wait_ready()

        def reloads(result: str) -> int:
            return int(a.stats()["reloads"][result])

        async def main() -> list[bool]:
            held = [await HeldFlow.open(ports["echo"]) for _ in range(8)]
            before = _connection_ids(await asyncio.to_thread(a.stats))
            # Rebuild the cluster on another transport: live QUIC flows must survive.
            new = yaml.safe_load(yaml.safe_dump(config))
            new["clusters"][0] = mesh.cluster("echo", "h2")
            a.write_config(new)
            a.signal(signal.SIGHUP)
            await asyncio.to_thread(wait_until, lambda: reloads("ok") == 1, 10.0, "reload")
            # The retired cluster's connection still carries the held flows: it stays in
            # the cluster's view (it left /stats and /metrics with the reload).
            view = (await asyncio.to_thread(a.stats))["clusters"]["echo"]
            assert view["connections_active"] >= 1
            carried = [c for ep in view["endpoints"].values() for c in ep["connections"]]
            assert sum(c["streams_active"] for c in carried) == 8
            assert len({c["id"] for c in carried}) == len(carried)  # no id twice
            assert {c.get("cluster_transport") for c in carried if c["streams_active"]} == {"quic"}
            # The old connections keep their labels, and the new version's take none of
            # them (each pool counted from 1: a new connection took an old one's series,
            # its counters went back, and the live old one was renamed "1-retired1").
            assert {c["id"] for c in carried if c["streams_active"]} <= before
            fresh = os.urandom(50_000)
            assert await echo_flow(ports["echo"], fresh) == fresh
            after = _connection_ids(await asyncio.to_thread(a.stats))
            assert after - before, after  # the new version's connection, a label of its own
            assert before <= after  # (the old connections still carry the held flows)
            return [await f.finish(os.urandom(100_000)) for f in held]

        assert asyncio.run(main()) == [True] * 8
        lines = wait_until(
            lambda: (
                [r for r in a.access_log() if r["listener"] == "echo"][8:]
                and [r for r in a.access_log() if r["listener"] == "echo"]
            ),
            what="nine flows logged",
        )
        assert sorted(r["transport"] for r in lines) == ["h2"] + ["quic"] * 8
        assert {r["outcome"] for r in lines} == {"completed"}

        # An invalid configuration is refused and the running one kept.
        a.config_path.write_text("clusters: [\n")
        a.signal(signal.SIGHUP)
        wait_until(lambda: reloads("rejected") == 1, what="rejected reload")
        assert "reload rejected" in a.stderr() and "invalid YAML" in a.stderr()
        payload = os.urandom(10_000)
        assert asyncio.run(echo_flow(ports["echo"], payload)) == payload
        # What cannot change on reload is refused, naming what changed.
        renamed = yaml.safe_load(yaml.safe_dump(config))
        renamed["node"]["name"] = "renamed"
        a.write_config(renamed)
        a.signal(signal.SIGHUP)
        wait_until(lambda: reloads("rejected") == 2, what="node change refused")
        assert "node changed: node and tls cannot change on reload: restart" in a.stderr()

        # A watched endpoints file: a change applies, an invalid one is refused.
        def watched(key: str = "endpoints") -> list[str]:
            _, body = a.request("GET", "/config_dump")
            dump: dict[str, Any] = yaml.safe_load(body)
            return list(next(c for c in dump["clusters"] if c["name"] == "watched")[key])

        def endpoints() -> list[str]:
            return watched()

        both = [mesh.endpoint("quic"), addr(mesh.ports["strict"])]
        endpoints_file.write_text(yaml.safe_dump({"endpoints": both, "services": ["10.96.0.7:80"]}))
        wait_until(lambda: endpoints() == both, what="endpoints file applied")
        assert watched("file_services") == ["10.96.0.7:80"]  # the live ones, not the start's
        endpoints_file.write_text("- 127.0.0.1:99999\n")
        wait_until(lambda: reloads("rejected") == 3, what="bad endpoints file refused")
        assert endpoints() == both
        assert "port 99999 is outside 1-65535" in a.stderr()
    finally:
        assert a.stop() == 0


@pytest.mark.parametrize("transport", ["quic", "h2"])
def test_a_reload_renaming_an_outbound_listener_at_its_address_applies(
    mesh: Mesh, transport: str
) -> None:
    """LDS renames listeners at the same port: the new one could not bind the address
    the removed one still held (the reload was refused, "address already in use").
    The removed one lets go first; a flow it accepted carries on."""
    config, ports = mesh.a_config([mesh.cluster("echo", transport)])
    a = SidecarProcess(f"a-rename-{transport}", config, mesh.workdir)
    a.start()
    try:
        a.wait_ready()

        async def main() -> bool:
            held = await HeldFlow.open(ports["echo"])
            renamed = yaml.safe_load(yaml.safe_dump(config))
            renamed["listeners"]["outbound"][0]["name"] = "echo-v2"
            a.write_config(renamed)
            a.signal(signal.SIGHUP)
            await asyncio.to_thread(
                wait_until, lambda: a.stats()["reloads"]["ok"] == 1, 10.0, "renaming reload"
            )
            payload = os.urandom(20_000)
            assert await echo_flow(ports["echo"], payload) == payload
            return await held.finish(os.urandom(10_000))

        assert asyncio.run(main())
        assert set(a.stats()["listeners"]) >= {"echo-v2"}
        assert "echo" not in a.stats()["listeners"]
        records = wait_until(lambda: len(a.access_log()) >= 2 and a.access_log(), what="logs")
        assert sorted(r["listener"] for r in records) == ["echo", "echo-v2"]

        # A reload that renames it again but fails (another listener's port is taken)
        # changes nothing: the listener it had closed listens again.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            failing = yaml.safe_load(yaml.safe_dump(config))
            failing["listeners"]["outbound"][0]["name"] = "echo-v3"
            failing["listeners"]["outbound"].append(
                {"name": "other", "address": addr(taken.getsockname()[1]), "cluster": "echo"}
            )
            a.write_config(failing)
            a.signal(signal.SIGHUP)
            wait_until(lambda: a.stats()["reloads"]["rejected"] == 1, what="failed reload")
        payload = os.urandom(5_000)
        assert asyncio.run(echo_flow(ports["echo"], payload)) == payload
        assert "echo-v2" in a.stats()["listeners"] and "echo-v3" not in a.stats()["listeners"]
    finally:
        assert a.stop() == 0


def test_a_reload_changing_what_a_running_inbound_listener_cannot_apply_is_refused(
    mesh: Mesh, tmp_path: Path
) -> None:
    """An inbound listener applies its destinations, policies, connect_timeout, splice
    and denied_stream_rate on reload; its transports, engine and limits are made when it
    starts. A reload that changed those at the same address was counted as applied and
    shown in /config_dump, while the listener kept its old settings (or, for transports,
    failed to bind its own port). It is refused now, naming the keys; a live change
    applies; the same change with a new address starts a new listener there."""
    ports = {k: free_port() for k in ("admin", "mesh", "mesh_tcp", "strict")}
    config = b_config(mesh.workdir, mesh.echo_port, **ports)
    b = SidecarProcess("b-reload", config, tmp_path)
    b.start()
    try:
        b.wait_ready()

        def reloads(result: str) -> int:
            return int(b.stats()["reloads"][result])

        def reload_with(**changes: Any) -> None:
            new = yaml.safe_load(yaml.safe_dump(config))
            new["listeners"]["inbound"][0].update(changes)
            b.write_config(new)
            b.signal(signal.SIGHUP)

        reload_with(max_streams=2, engine="aioquic")
        wait_until(lambda: reloads("rejected") == 1, what="rejected reload")
        assert (
            ": listeners.inbound mesh: max_streams, engine cannot change on a running listener"
            in b.stderr()
        )
        reload_with(connect_timeout="2s")
        wait_until(lambda: reloads("ok") == 1, what="live reload")
        moved = free_port()
        reload_with(address=addr(moved), max_streams=2, engine="aioquic")
        wait_until(lambda: reloads("ok") == 2, what="reload to a new address")
        _, body = b.request("GET", "/config_dump")
        mesh_listener = yaml.safe_load(body)["inbound"][0]
        assert (mesh_listener["address"], mesh_listener["max_streams"]) == (addr(moved), 2)
    finally:
        assert b.stop() == 0


def test_migrations_are_at_most_one_a_second(mesh: Mesh) -> None:
    """Found by a review: four clients looping on POST /migrate made 250 a second, each
    keeping its old sockets for a while: 6,000 descriptors for 5 peer connections."""
    config, ports = mesh.a_config([mesh.cluster("echo", "quic")])
    a = SidecarProcess("a-migrate-rate", config, mesh.workdir)
    a.start()
    try:
        a.wait_ready()
        assert asyncio.run(echo_flow(ports["echo"], b"x")) == b"x"  # a connection to move
        first = a.request("POST", "/migrate")
        admin = http.client.HTTPConnection(*a.admin, timeout=5)
        try:
            admin.request("POST", "/migrate")
            second = admin.getresponse()
            body = second.read()
        finally:
            admin.close()
        assert first[0] == 200 and json.loads(first[1])["migrated"] == 1, first
        assert second.status == 429 and b"at most one every 1s" in body, body
        # When to ask again, for a script to back off by (a review, 2026-12-07).
        assert second.getheader("retry-after") == "1"
    finally:
        assert a.stop() == 0
