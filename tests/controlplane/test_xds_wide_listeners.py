"""An outbound listener bound beyond loopback is warned about however it comes: from
the configuration file (tests/sidecar/test_sidecar_config.py), from an Envoy bootstrap's
static resources (at load and by ``--check``), and from the control plane (as it is
applied, once). Before 2026-12-07 only the configuration file's was."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from quicmesh.sidecar.launch import LOOPBACK, free_port
from quicmesh.xds.resources import CLUSTER_TYPE, LISTENER_TYPE
from quicmesh.xds.testing import AdsServer
from quicmesh.xds.testing import documents as docs

from .test_xds_mapping import _check, write_bootstrap
from .test_xds_review28 import answered, driven, empty_lds_cds

WARNING = "takes flows from other hosts too, and sends them to the mesh as this sidecar's identity"


def _listener_on(host: str, port: int, cluster: str = "reviews") -> dict[str, object]:
    doc = docs.outbound_listener_doc("out", port, cluster, "127.0.0.1:9080")
    doc["address"] = {"socket_address": {"address": host, "port_value": port}}
    return doc


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_a_bootstrap_listener_beyond_loopback_is_warned_by_check(
    tmp_path: Path, host: str, warned: bool
) -> None:
    path = write_bootstrap(tmp_path, listeners=[_listener_on(host, 15001)])
    result = _check(path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if WARNING in line]
    if warned:
        assert len(lines) == 1, result.stderr
        assert "Listener 'out': 0.0.0.0:15001 takes flows" in lines[0], lines[0]
        assert str(path) in lines[0]
    else:
        assert lines == [], result.stderr


def test_a_control_plane_listener_beyond_loopback_is_warned_once(
    ads: AdsServer, ca_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = docs.cluster(docs.static_cluster_doc("reviews", "quic", [(LOOPBACK, 9)]))
    wide, narrow = free_port(), free_port()

    async def main() -> None:
        empty_lds_cds(ads, "1")
        async with driven(ads.address, ca_dir) as (sidecar, client):
            await asyncio.wait_for(client.synced.wait(), 20)
            ads.set_resources(CLUSTER_TYPE, [cluster], "2", node="a")
            for version, listener in (
                ("2", _listener_on(LOOPBACK, narrow)),
                ("3", _listener_on("0.0.0.0", wide)),
                ("4", _listener_on("0.0.0.0", wide)),  # the same again: no second warning
            ):
                seen = len(ads.requests_of(LISTENER_TYPE))
                ads.set_resources(LISTENER_TYPE, [docs.listener(listener)], version, node="a")
                ack = await answered(ads, LISTENER_TYPE, version, seen)
                assert not ack.is_nack, ack.error_detail
                warned = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
                expected = 0 if version == "2" else 1
                assert len(warned) == expected, (version, warned)
            assert warned == [
                f"Listener 'out' from the control plane: 0.0.0.0:{wide} {WARNING} "
                "(a workload's listener belongs on 127.0.0.1)"
            ]
            assert [o.address for o in sidecar.config.outbound] == [("0.0.0.0", wide)]

    with caplog.at_level(logging.WARNING, logger="quicmesh"):
        asyncio.run(asyncio.wait_for(main(), 90))
