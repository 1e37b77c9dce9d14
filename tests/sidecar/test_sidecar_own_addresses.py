"""A sidecar's own listening addresses are never an inbound flow's destination: a peer
allowed ``127.0.0.1:*`` reached B's admin endpoint (``/stats``, ``POST /drain``) through
B's inbound listener before (found by a security review)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from quicmesh.sidecar.launch import SidecarProcess, free_port
from quicmesh.sidecar.policy import is_own_address, refusal_reason

from .conftest import Mesh, addr, b_config, echo_flow, refused, wait_until
from .test_sidecar_units import A, inbound

OWN = [("127.0.0.1", 15000), ("0.0.0.0", 15008), ("10.1.2.3", 15090)]


@pytest.mark.parametrize(
    ("host", "port", "own"),
    [
        ("127.0.0.1", 15000, True),
        ("127.9.9.9", 15000, True),  # any loopback address
        ("localhost", 15000, True),
        ("LOCALHOST.", 15000, True),
        ("::1", 15000, True),
        ("::ffff:127.0.0.1", 15000, True),
        ("::1%lo", 15000, True),  # a zone does not hide loopback
        ("0.0.0.0", 15000, True),
        ("10.9.9.9", 15008, True),  # a listener bound to every address
        ("10.1.2.3", 15090, True),
        ("10.1.2.4", 15090, False),
        ("127.0.0.1", 15001, False),
        ("db.example", 15000, False),  # a name is not resolved here
    ],
)
def test_own_addresses(host: str, port: int, own: bool) -> None:
    assert is_own_address(host, port, OWN) is own
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = refusal_reason(inbound(), A, target, OWN) or ""
    assert ("own listening address" in reason) is own


def test_a_peer_cannot_reach_the_sidecars_admin_endpoint(mesh: Mesh, tmp_path: Path) -> None:
    """B allows every loopback destination; a flow from A to B's admin port is refused
    (403 with the reason on both sides), a flow to the echo server still goes."""
    # B with every loopback port allowed, on its own ports.
    ports = {k: free_port() for k in ("admin", "mesh", "mesh_tcp", "strict")}
    wide_config = b_config(mesh.workdir, mesh.echo_port, **ports)
    for listener in wide_config["listeners"]["inbound"]:
        listener["destinations"] = ["127.0.0.1:*"]
        listener.pop("policies", None)
    wide = SidecarProcess("b-wide", wide_config, tmp_path)
    clusters = [
        mesh.cluster(
            "admin_of_b", "quic", target=addr(ports["admin"]), endpoints=[addr(ports["mesh"])]
        ),
        mesh.cluster("echo_of_b", "quic", endpoints=[addr(ports["mesh"])]),
    ]
    a_config, a_ports = mesh.a_config(clusters)
    a = SidecarProcess("a-own", a_config, tmp_path)
    wide.start()
    a.start()
    try:
        wide.wait_ready()
        a.wait_ready()
        assert asyncio.run(refused(a_ports["admin_of_b"]))
        b_line = wait_until(
            lambda: [r for r in wide.access_log() if r["outcome"] == "refused"],
            what="B's refusal",
        )[-1]
        assert "is this sidecar's own listening address" in b_line["reason"], b_line
        a_line = wait_until(
            lambda: [r for r in a.access_log() if r["listener"] == "admin_of_b"],
            what="A's refusal",
        )[-1]
        assert a_line["outcome"] == "refused" and "403" in a_line["reason"], a_line
        assert asyncio.run(echo_flow(a_ports["echo_of_b"], b"ping")).endswith(b"ping")
    finally:
        assert a.stop() == 0
        assert wide.stop() == 0
