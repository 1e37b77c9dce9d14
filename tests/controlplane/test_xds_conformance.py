"""ADS conformance: a real sidecar process against the test ADS server over gRPC.

Checks the client's side of the xDS protocol as the server sees it (versions,
nonces, ACK/NACK with error_detail), warming, removal, reconnect and keeping the
last good configuration, and that flows go where the control plane says.
Synchronisation is on what the server received and on the sidecar's admin
endpoint, with deadlines; never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Any

from sidecar.conftest import echo_flow, refused, wait_until  # tests/sidecar/conftest.py

from quicmesh.sidecar.launch import LOOPBACK, SidecarProcess, free_port
from quicmesh.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SECRET_TYPE
from quicmesh.xds.testing import AdsServer
from quicmesh.xds.testing import documents as docs

from .conftest import IDENTITY_A, addr, push_echo, push_outbound, xds_sidecar


def _flow_ok(port: int) -> bool:
    payload = os.urandom(20000)
    return asyncio.run(echo_flow(port, payload)) == payload


def test_versions_nonces_and_acks(
    ads: AdsServer, pair: tuple[SidecarProcess, SidecarProcess, dict[str, int]], echo_port: int
) -> None:
    a, b, ports = pair
    push_outbound(
        ads,
        "1",
        node="a",
        listeners=[("out", ports["out"], "echo", addr(echo_port))],
        clusters=[("echo", "quic")],
        endpoints={"echo": [ports["b"]]},
    )
    b.wait_ready()
    a.wait_ready()
    assert _flow_ok(ports["out"])
    requests = [r for r in ads.requests if r.node_id == "a" or r.stream in _streams(ads, "a")]
    first = requests[0]
    assert first.node_id == "a" and first.version_info == "" and first.response_nonce == ""
    for type_url in (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE):
        acks = [r for r in requests if r.type_url == type_url and r.version_info == "1"]
        assert acks, f"no ACK of version 1 for {type_url}"
        assert all(r.response_nonce and not r.is_nack for r in acks)
    eds = [r for r in requests if r.type_url == ENDPOINT_TYPE]
    assert eds[0].resource_names == ("echo",)
    sds = [r for r in requests if r.type_url == SECRET_TYPE]
    assert sds and sds[0].resource_names == ("default", "ROOTCA")
    xds = a.stats()["xds"]
    assert xds["synced"] and xds["connected"] and xds["nacks"] == 0
    assert xds["versions"]["LDS"] == "1" and xds["versions"]["CDS"] == "1"


def test_not_ready_until_the_first_clusters_have_endpoints(
    ads: AdsServer, pair: tuple[SidecarProcess, SidecarProcess, dict[str, int]], echo_port: int
) -> None:
    # As Envoy's initialization: LDS and CDS applied is not enough while the
    # listener's cluster waits for its endpoints (the listener is not bound yet).
    a, b, ports = pair
    ads.set_resources(CLUSTER_TYPE, [docs.cluster(docs.cluster_doc("echo", "quic"))], "1", node="a")
    ads.set_resources(
        LISTENER_TYPE,
        [docs.listener(docs.outbound_listener_doc("out", ports["out"], "echo", addr(echo_port)))],
        "1",
        node="a",
    )
    wait_until(lambda: _warming(a) == ["echo"], what="echo warming")
    status, body = a.request("GET", "/ready")
    assert status == 503 and b"endpoints of echo" in body, body
    # Istio's agent, asking as it asks Envoy, waits too (server.state 3: INITIALIZING).
    status, body = a.request("GET", AGENT_READINESS)
    assert (status, body) == (200, b"listener_manager.workers_started: 0\nserver.state: 3\n")
    assert asyncio.run(refused(ports["out"]))
    ads.set_resources(
        ENDPOINT_TYPE,
        [docs.assignment(docs.cla_doc("echo", [(LOOPBACK, ports["b"], "HEALTHY", None)]))],
        "1",
        node="a",
    )
    b.wait_ready()
    a.wait_ready()
    assert _flow_ok(ports["out"])
    assert a.request("GET", AGENT_READINESS)[1] == (
        b"listener_manager.workers_started: 1\nserver.state: 0\n"
    )


AGENT_READINESS = "/stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started)"
"""Istio's agent's readiness query, as it sends it to Envoy (status/util/stats.go)."""


def test_ready_without_endpoints_after_the_initial_fetch_timeout(
    ads: AdsServer, ca_dir: Path, tmp_path: Path, echo_port: int
) -> None:
    a = xds_sidecar("a", IDENTITY_A, ca_dir, tmp_path, ads, xds={"initial_fetch_timeout": "1s"})
    ads.set_resources(CLUSTER_TYPE, [docs.cluster(docs.cluster_doc("echo", "quic"))], "1", node="a")
    ads.set_resources(
        LISTENER_TYPE,
        [docs.listener(docs.outbound_listener_doc("out", free_port(), "echo", addr(echo_port)))],
        "1",
        node="a",
    )
    a.start()
    try:
        a.wait_ready()
        assert a.stats()["xds"]["warming"] == ["echo"]
        assert "no endpoints for echo after 1 s: ready without them" in a.stderr()
    finally:
        assert a.stop() == 0


def _warming(sidecar: SidecarProcess) -> list[str] | None:
    try:
        return sidecar.stats()["xds"]["warming"]
    except OSError:  # the admin listener is not up yet
        return None


def _streams(ads: AdsServer, node: str) -> set[int]:
    return {r.stream for r in ads.requests if r.node_id == node}


def test_unsupported_field_is_nacked_and_last_good_config_kept(
    ads: AdsServer, pair: tuple[SidecarProcess, SidecarProcess, dict[str, int]], echo_port: int
) -> None:
    a, b, ports = pair
    push_outbound(
        ads,
        "1",
        node="a",
        listeners=[("out", ports["out"], "echo", addr(echo_port))],
        clusters=[("echo", "h2")],
        endpoints={"echo": [ports["b"]]},
    )
    b.wait_ready()
    a.wait_ready()
    bad = docs.cluster_doc("echo", "quic")
    bad["respect_dns_ttl"] = True
    ads.set_resources(CLUSTER_TYPE, [docs.cluster(bad)], "2", node="a")
    streams = _streams(ads, "a")
    requests = ads.wait_for(
        lambda rs: any(r.is_nack and r.type_url == CLUSTER_TYPE for r in rs), timeout=20
    )
    nack = next(r for r in requests if r.is_nack and r.stream in streams)
    assert nack.version_info == "1"  # the last version accepted
    assert nack.response_nonce
    assert "Cluster 'echo': field 'respect_dns_ttl' is not supported" in nack.error_detail
    # The last good configuration (h2) still carries flows.
    assert _flow_ok(ports["out"])
    stats = a.stats()
    assert stats["xds"]["nacks"] == 1 and stats["xds"]["versions"]["CDS"] == "1"
    # The counters Istio's agent reads for "configuration received", under Envoy's names.
    status, body = a.request("GET", "/stats?usedonly&filter=update_(success|rejected)$")
    assert status == 200
    assert body.decode().splitlines() == [
        "cluster_manager.cds.update_rejected: 1",
        "cluster_manager.cds.update_success: 1",
        "listener_manager.lds.update_rejected: 0",
        "listener_manager.lds.update_success: 1",
    ]
    assert stats["clusters"]["echo"]["transport"] == "h2"
    assert "respect_dns_ttl" in stats["xds"]["last_error"]


def test_warming_and_removal(
    ads: AdsServer, pair: tuple[SidecarProcess, SidecarProcess, dict[str, int]], echo_port: int
) -> None:
    a, b, ports = pair
    push_outbound(
        ads,
        "1",
        node="a",
        listeners=[("out", ports["out"], "echo", addr(echo_port))],
        clusters=[("echo", "quic")],
        endpoints={"echo": [ports["b"]]},
    )
    b.wait_ready()
    a.wait_ready()
    # A second cluster and listener, but no endpoints for it yet: it warms.
    ads.set_resources(
        CLUSTER_TYPE,
        [docs.cluster(docs.cluster_doc(n, "quic")) for n in ("echo", "late")],
        "2",
        node="a",
    )
    ads.set_resources(
        LISTENER_TYPE,
        [
            docs.listener(docs.outbound_listener_doc("out", ports["out"], "echo", addr(echo_port))),
            docs.listener(
                docs.outbound_listener_doc("out2", ports["out2"], "late", addr(echo_port))
            ),
        ],
        "2",
        node="a",
    )
    wait_until(lambda: a.stats()["xds"]["versions"]["LDS"] == "2", what="LDS 2 applied")
    wait_until(
        lambda: ads.requests_of(ENDPOINT_TYPE)[-1].resource_names == ("echo", "late"),
        what="EDS subscription grows",
    )
    stats = a.stats()
    assert stats["xds"]["warming"] == ["late"]
    assert "late" not in stats["clusters"] and "out2" not in stats["listeners"]
    assert asyncio.run(refused(ports["out2"]))
    assert _flow_ok(ports["out"])
    # Its endpoints arrive: the cluster and its listener go live.
    ads.set_resources(
        ENDPOINT_TYPE,
        [
            docs.assignment(docs.cla_doc("echo", [(LOOPBACK, ports["b"], "HEALTHY", None)])),
            docs.assignment(docs.cla_doc("late", [(LOOPBACK, ports["b"], "HEALTHY", None)])),
        ],
        "2",
        node="a",
    )
    wait_until(lambda: "out2" in a.stats()["listeners"], what="out2 live")
    assert a.stats()["xds"]["warming"] == []
    assert _flow_ok(ports["out2"])
    # Removal: LDS and CDS without them.
    push_outbound(
        ads,
        "3",
        node="a",
        listeners=[("out", ports["out"], "echo", addr(echo_port))],
        clusters=[("echo", "quic")],
        endpoints={"echo": [ports["b"]]},
    )
    wait_until(lambda: "late" not in a.stats()["clusters"], what="cluster late removed")
    wait_until(lambda: "out2" not in a.stats()["listeners"], what="listener out2 removed")
    assert asyncio.run(refused(ports["out2"]))
    # (The EDS request that drops it may follow the removal by a moment.)
    wait_until(
        lambda: ads.requests_of(ENDPOINT_TYPE)[-1].resource_names == ("echo",),
        what="EDS subscription shrinks",
    )
    assert _flow_ok(ports["out"])


def test_reconnect_with_last_good_config_while_away(
    ads: AdsServer, pair: tuple[SidecarProcess, SidecarProcess, dict[str, int]], echo_port: int
) -> None:
    a, b, ports = pair
    push_outbound(
        ads,
        "7",
        node="a",
        listeners=[("out", ports["out"], "echo", addr(echo_port))],
        clusters=[("echo", "quic")],
        endpoints={"echo": [ports["b"]]},
    )
    b.wait_ready()
    a.wait_ready()
    ads.stop(0)
    wait_until(lambda: not a.stats()["xds"]["connected"], what="A sees the stream end")
    # The control plane is away: the last good configuration keeps serving, still ready.
    assert _flow_ok(ports["out"])
    assert a.request("GET", "/ready")[0] == 200
    before = len(ads.requests)
    ads.start()  # same port
    requests = ads.wait_for(
        lambda rs: any(
            r.type_url == LISTENER_TYPE and r.version_info == "7" and not r.response_nonce
            for r in rs[before:]
        ),
        timeout=30,
    )
    new_streams = {r.stream for r in requests[before:] if r.node_id == "a"}
    resumed = {
        r.type_url: r.version_info
        for r in requests[before:]
        if r.stream in new_streams and not r.response_nonce
    }
    # On the new stream the client says which versions it already has.
    assert resumed[LISTENER_TYPE] == resumed[CLUSTER_TYPE] == resumed[ENDPOINT_TYPE] == "7"
    wait_until(lambda: a.stats()["xds"]["connected"], timeout=20, what="A reconnected")
    assert a.stats()["xds"]["streams"] >= 2
    assert _flow_ok(ports["out"])


def test_an_unknown_enum_value_is_nacked_and_the_stream_carries_on(
    ads: AdsServer, pair: tuple[SidecarProcess, SidecarProcess, dict[str, int]], echo_port: int
) -> None:
    """A value a newer API adds (protobuf keeps it) is NACKed by number; the stream, the
    running configuration and a clean stop are unaffected (it ended the stream's task, and
    the sidecar then hung on SIGTERM: the pair's stops assert exit code 0)."""
    a, b, ports = pair
    push_echo(ads, "1", ports, echo_port, "h2")
    b.wait_ready()
    a.wait_ready()
    bad = docs.cluster(docs.cluster_doc("echo", "quic"))
    bad.lb_policy = 42
    ads.set_resources(CLUSTER_TYPE, [bad], "2", node="a")
    streams = _streams(ads, "a")
    requests = ads.wait_for(
        lambda rs: any(r.is_nack and r.type_url == CLUSTER_TYPE for r in rs), timeout=20
    )
    nack = next(r for r in requests if r.is_nack and r.stream in streams)
    assert "Cluster 'echo': lb_policy 42 (unknown) is not supported" in nack.error_detail
    assert _flow_ok(ports["out"])
    # The same stream takes the next version.
    push_echo(ads, "3", ports, echo_port)
    wait_until(lambda: a.stats()["xds"]["versions"]["CDS"] == "3", what="CDS 3 applied")
    assert a.stats()["clusters"]["echo"]["transport"] == "quic"
    assert _streams(ads, "a") == streams
    assert _flow_ok(ports["out"])


def test_connected_once_the_stream_is_open_before_any_response(
    ads: AdsServer, ca_dir: Path, tmp_path: Path
) -> None:
    """``xds.connected`` says the stream is open, also while the control plane has sent
    nothing for this node (it said so only from the first response)."""
    a = xds_sidecar("lonely", IDENTITY_A, ca_dir, tmp_path, ads)
    a.start()
    try:
        ads.wait_for(lambda rs: any(r.node_id == "lonely" for r in rs), timeout=20)
        wait_until(lambda: _xds(a).get("connected") is True, what="connected")
        assert _xds(a)["versions"]["LDS"] == "" and not _xds(a)["synced"]
    finally:
        assert a.stop() == 0


def _xds(sidecar: SidecarProcess) -> dict[str, Any]:
    try:
        return dict(sidecar.stats()["xds"])
    except OSError:  # the admin listener is not up yet
        return {}


def test_a_listener_whose_cluster_is_missing_is_listed_as_warming(
    ads: AdsServer, pair: tuple[SidecarProcess, SidecarProcess, dict[str, int]], echo_port: int
) -> None:
    a, _, ports = pair
    ads.set_resources(CLUSTER_TYPE, [], "1", node="a")
    ads.set_resources(
        LISTENER_TYPE,
        [docs.listener(docs.outbound_listener_doc("out", ports["out"], "ghost", addr(echo_port)))],
        "1",
        node="a",
    )
    wait_until(lambda: _warming(a) == ["ghost (missing)"], what="ghost listed as warming")
    assert "out" not in a.stats()["listeners"]
    assert asyncio.run(refused(ports["out"]))


def test_the_files_own_listeners_and_clusters_stay_beside_the_control_planes(
    ads: AdsServer,
    pair: tuple[SidecarProcess, SidecarProcess, dict[str, int]],
    ca_dir: Path,
    tmp_path: Path,
    echo_port: int,
) -> None:
    """As Envoy's static resources: a listener and cluster of the file stay when LDS
    and CDS arrive (they were dropped), xDS cannot replace them by name, and an LDS
    listener may use the file's cluster (it waited forever for CDS to give it)."""
    _, b, ports = pair
    static_port = free_port()
    sidecar = xds_sidecar("c", IDENTITY_A, ca_dir, tmp_path, ads)
    sidecar.config["listeners"] = {
        "outbound": [{"name": "fixed", "address": addr(static_port), "cluster": "fixed-echo"}]
    }
    sidecar.config["clusters"] = [
        {
            "name": "fixed-echo",
            "transport": "h2",
            "target": addr(echo_port),
            "endpoints": [addr(ports["b"])],
        }
    ]
    sidecar.start()
    try:
        b.wait_ready()
        push_echo(ads, "1", ports, echo_port, node="c")
        sidecar.wait_ready()
        assert _flow_ok(ports["out"]) and _flow_ok(static_port)
        assert {"fixed", "out"} <= set(sidecar.stats()["listeners"])
        # A cluster named as the file's is refused, the file's kept.
        push_outbound(
            ads,
            "2",
            node="c",
            listeners=[("out", ports["out"], "echo", addr(echo_port))],
            clusters=[("echo", "quic"), ("fixed-echo", "quic")],
            endpoints={"echo": [ports["b"]], "fixed-echo": [ports["b"]]},
        )
        streams = _streams(ads, "c")
        requests = ads.wait_for(
            lambda rs: any(r.is_nack and r.stream in streams for r in rs), timeout=20
        )
        nacks = [r.error_detail for r in requests if r.is_nack and r.stream in streams]
        assert any("Cluster 'fixed-echo': a static cluster" in n for n in nacks), nacks
        assert sidecar.stats()["clusters"]["fixed-echo"]["transport"] == "h2"
        assert _flow_ok(static_port)
        # An LDS listener on the file's cluster (its CONNECT target) takes flows.
        on_static = free_port()
        push_outbound(
            ads,
            "3",
            node="c",
            listeners=[
                ("out", ports["out"], "echo", addr(echo_port)),
                ("on-static", on_static, "fixed-echo", addr(echo_port)),
            ],
            clusters=[("echo", "quic")],
            endpoints={"echo": [ports["b"]]},
        )
        wait_until(lambda: "on-static" in sidecar.stats()["listeners"], what="on-static bound")
        assert _flow_ok(on_static) and _flow_ok(static_port)
    finally:
        assert sidecar.stop() == 0


def test_a_sighup_on_an_xds_driven_sidecar_applies_nothing_and_rejects_nothing(
    ads: AdsServer, pair: tuple[SidecarProcess, SidecarProcess, dict[str, int]], echo_port: int
) -> None:
    a, b, ports = pair
    push_echo(ads, "1", ports, echo_port)
    b.wait_ready()
    a.wait_ready()

    def reloads() -> dict[str, float]:
        samples = a.metrics()
        return {
            result: samples.get(
                ("quicmesh_config_reloads_total", frozenset({("result", result)})), 0.0
            )
            for result in ("ok", "rejected")
        }

    before = reloads()
    a.signal(signal.SIGHUP)
    wait_until(lambda: "a reload applies nothing" in a.stderr(), what="the reload's warning")
    assert reloads() == before and before["rejected"] == 0
    assert "ERROR" not in a.stderr()
    assert _flow_ok(ports["out"])


def test_a_rejected_first_listener_update_still_ends_the_wait_for_ready(
    ads: AdsServer, ca_dir: Path, tmp_path: Path, echo_port: int
) -> None:
    """As Envoy's initialization: a first LDS the sidecar NACKs counts as fetched (it was
    unready for ever, whatever initial_fetch_timeout said)."""
    a = xds_sidecar("a", IDENTITY_A, ca_dir, tmp_path, ads)
    bad = docs.outbound_listener_doc("out", free_port(), "echo", addr(echo_port))
    bad["listener_filters"] = [{"name": "envoy.filters.listener.tls_inspector"}]
    ads.set_resources(CLUSTER_TYPE, [], "1", node="a")
    ads.set_resources(LISTENER_TYPE, [docs.listener(bad)], "1", node="a")
    a.start()
    try:
        a.wait_ready()
        xds = a.stats()["xds"]
        assert xds["nacks"] == 1 and xds["versions"]["LDS"] == ""
        assert "listener_filters" in xds["last_error"]
    finally:
        assert a.stop() == 0


def test_an_unreachable_control_plane_leaves_the_sidecar_ready_after_the_timeout(
    ca_dir: Path, tmp_path: Path
) -> None:
    """No LDS or CDS within initial_fetch_timeout (the control plane down): ready with the
    static resources, as Envoy; and one warning for the outage, not one an attempt."""
    with contextlib.closing(socket.socket()) as nobody:
        nobody.bind((LOOPBACK, 0))  # bound, not listening: every connect is refused
        down = addr(nobody.getsockname()[1])
        a = SidecarProcess(
            "a-no-control-plane",
            {
                "node": {"name": "a", "identity": IDENTITY_A},
                "tls": {"ca_dir": str(ca_dir)},
                "admin": {"address": addr(free_port())},
                "xds": {"address": down, "initial_fetch_timeout": "1s"},
            },
            tmp_path,
        )
        a.start()
        try:
            a.wait_ready()
            wait_until(
                lambda: a.stats()["xds"]["stream_failures"] >= 4, 30.0, "four failed attempts"
            )
            stderr = a.stderr()
            assert "no CDS and LDS from the control plane after 1 s: ready without them" in stderr
            ended = [line for line in stderr.splitlines() if "ADS stream to" in line]
            assert len(ended) == 1, ended
            assert a.stats()["xds"]["connected"] is False
        finally:
            assert a.stop() == 0


def test_the_backoff_starts_again_once_a_stream_carried_a_response(
    ads: AdsServer, ca_dir: Path, tmp_path: Path
) -> None:
    """As Envoy: a stream that delivered responses was a working one, so the reconnect
    after it waits the first delay (0.25 s with jitter), not what an earlier outage grew
    (before, only a stream that lived 30 s reset it)."""
    a = xds_sidecar("a", IDENTITY_A, ca_dir, tmp_path, ads)
    ads.set_resources(CLUSTER_TYPE, [], "1", node="a")
    ads.set_resources(LISTENER_TYPE, [], "1", node="a")
    a.start()
    try:
        a.wait_ready()
        ads.stop(0)
        wait_until(lambda: a.stats()["xds"]["stream_failures"] >= 5, 30.0, "an outage")
        ads.start()  # the same port: the sidecar comes back within its grown delay
        wait_until(lambda: a.stats()["xds"]["acks"] >= 4, 30.0, "the stream answered again")
        before = a.stats()["xds"]["stream_failures"]
        ads.stop(0)
        wait_until(lambda: a.stats()["xds"]["stream_failures"] > before, 30.0, "the stream end")
        delays = [
            float(line.rsplit("reconnecting in ", 1)[1].rstrip("s"))
            for line in a.stderr().splitlines()
            if "ADS stream to" in line and "reconnecting in" in line
        ]
        assert delays[-1] <= 0.375, delays
    finally:
        assert a.stop() == 0
