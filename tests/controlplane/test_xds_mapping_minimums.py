"""Values a cluster from xDS (or an Envoy bootstrap) may not take, as the YAML file may
not (review 27): ``max_pending_requests: 0`` refused every flow that had to dial, so no
connection was ever made (the YAML loader refuses ``max_pending_opens: 0``), and a health
check ``interval`` under the YAML file's minimum kept a core busy."""

from __future__ import annotations

from typing import Any

import pytest

from quicmesh.sidecar.config import ClusterConfig
from quicmesh.xds.mapping import MappingError, map_cluster
from quicmesh.xds.resources import Cluster, ClusterLoadAssignment, parse_message
from quicmesh.xds.testing.documents import cla_doc, cluster_doc


def _map(change: dict[str, Any]) -> ClusterConfig | None:
    doc = cluster_doc("c", "quic")
    doc.update(change)
    cluster = parse_message(doc, Cluster, "test")
    return map_cluster(cluster, "h:1", parse_message(cla_doc("c", []), ClusterLoadAssignment, "t"))


def test_max_pending_requests_0_is_refused_naming_the_field() -> None:
    with pytest.raises(MappingError) as info:
        _map({"circuit_breakers": {"thresholds": [{"max_pending_requests": 0}]}})
    assert str(info.value) == (
        "Cluster 'c'.circuit_breakers.thresholds[0].max_pending_requests: 0 is outside 1-1000000"
    )


def test_max_pending_requests_1_is_taken() -> None:
    mapped = _map({"circuit_breakers": {"thresholds": [{"max_pending_requests": 1}]}})
    assert mapped is not None and mapped.circuit_breakers.max_pending_opens == 1


@pytest.mark.parametrize("interval", ["0.005s", "0.099s"])
def test_a_health_check_interval_below_the_minimum_is_refused(interval: str) -> None:
    check = {"timeout": "1s", "interval": interval, "tcp_health_check": {}}
    with pytest.raises(MappingError) as info:
        _map({"health_checks": [check]})
    seconds = interval.removesuffix("s")
    assert str(info.value) == (
        f"Cluster 'c'.health_checks[0].interval: {seconds}s is below the minimum of 100ms"
    )


def test_a_health_check_interval_at_the_minimum_is_taken() -> None:
    check = {"timeout": "1s", "interval": "0.1s", "tcp_health_check": {}}
    mapped = _map({"health_checks": [check]})
    assert mapped is not None and mapped.health_check is not None
    assert mapped.health_check.interval == 0.1
