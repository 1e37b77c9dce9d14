"""Fixtures for the xDS tests: the test ADS server and sidecars driven by it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quicmesh.sidecar.launch import LOOPBACK, SidecarProcess, free_port
from quicmesh.tls import DevCA
from quicmesh.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE
from quicmesh.xds.testing import AdsServer
from quicmesh.xds.testing import documents as docs

IDENTITY_A = "spiffe://mesh.local/ns/default/sa/productpage"
IDENTITY_B = "spiffe://mesh.local/ns/default/sa/reviews"


def addr(port: int) -> str:
    return f"{LOOPBACK}:{port}"


@pytest.fixture
def ads() -> Iterator[AdsServer]:
    """A running test ADS server."""
    server = AdsServer()
    server.start()
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("xds-ca")
    DevCA().save(path / "ca")
    return path / "ca"


def xds_sidecar(
    name: str,
    identity: str,
    ca: Path,
    workdir: Path,
    server: AdsServer,
    xds: dict[str, Any] | None = None,
    **tls: Any,
) -> SidecarProcess:
    """A sidecar with no listeners of its own: everything comes from ``server``;
    ``xds``: more keys of its ``xds`` section."""
    config = {
        "node": {"name": name, "identity": identity},
        "tls": {"ca_dir": str(ca), **tls},
        "admin": {"address": addr(free_port())},
        "drain": {"grace_period": "10s"},
        "xds": {"address": server.address, "cluster": "mesh", **(xds or {})},
    }
    return SidecarProcess(name, config, workdir)


def inbound_resources(port: int, destinations: list[str], prefix: str = "in") -> list[Any]:
    """B's tunnel listeners on ``port``: QUIC (UDP, HTTP/3) and H2 (TCP)."""
    return [
        docs.listener(docs.inbound_listener_doc(f"{prefix}-quic", port, "UDP", destinations)),
        docs.listener(docs.inbound_listener_doc(f"{prefix}-h2", port, "TCP", destinations)),
    ]


def push_outbound(
    server: AdsServer,
    version: str,
    *,
    node: str,
    listeners: list[tuple[str, int, str, str]],
    clusters: list[tuple[str, str]],
    endpoints: dict[str, list[int]],
) -> None:
    """CDS, EDS and LDS for one node: ``listeners`` (name, port, cluster, target),
    ``clusters`` (name, transport), ``endpoints`` (cluster -> ports on loopback)."""
    server.set_resources(
        CLUSTER_TYPE,
        [docs.cluster(docs.cluster_doc(n, t)) for n, t in clusters],
        version,
        node=node,
    )
    server.set_resources(
        ENDPOINT_TYPE,
        [
            docs.assignment(docs.cla_doc(n, [(LOOPBACK, p, "HEALTHY", None) for p in ports]))
            for n, ports in endpoints.items()
        ],
        version,
        node=node,
    )
    server.set_resources(
        LISTENER_TYPE,
        [docs.listener(docs.outbound_listener_doc(n, p, c, t)) for n, p, c, t in listeners],
        version,
        node=node,
    )


def push_echo(
    server: AdsServer,
    version: str,
    ports: dict[str, int],
    echo_port: int,
    transport: str = "quic",
    node: str = "a",
) -> None:
    """:func:`push_outbound` of one listener ``out`` through cluster ``echo`` (on
    ``transport``) to B's tunnel port, tunnelling to the echo server."""
    push_outbound(
        server,
        version,
        node=node,
        listeners=[("out", ports["out"], "echo", addr(echo_port))],
        clusters=[("echo", transport)],
        endpoints={"echo": [ports["b"]]},
    )


@pytest.fixture
def pair(
    ads: AdsServer, ca_dir: Path, tmp_path: Path, echo_port: int
) -> Iterator[tuple[SidecarProcess, SidecarProcess, dict[str, int]]]:
    """Sidecars A and B, both driven only by ``ads``; B's tunnel listeners pushed."""
    ports = {"b": free_port(), "b2": free_port(), "out": free_port(), "out2": free_port()}
    ads.set_resources(
        LISTENER_TYPE,
        inbound_resources(ports["b"], [addr(echo_port)])
        + inbound_resources(ports["b2"], [addr(echo_port)], prefix="in2"),
        "b1",
        node="b",
    )
    ads.set_resources(CLUSTER_TYPE, [], "b1", node="b")
    a = xds_sidecar("a", IDENTITY_A, ca_dir, tmp_path, ads)
    b = xds_sidecar("b", IDENTITY_B, ca_dir, tmp_path, ads)
    b.start()
    a.start()
    yield a, b, ports
    try:
        assert a.stop() == 0
    finally:
        assert b.stop() == 0
