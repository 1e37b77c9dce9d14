"""Durations short enough to keep a core busy are refused at load, with the usual one
line naming the file and the field (review 27): a cluster's ``idle_timeout`` (the pool
swept every half of it: 1 ms spun a core), ``liveness.keepalive_interval`` (1 us PINGed
without pause) and ``health_check.interval`` (5 ms made a handshake round after round).
And the sweep itself has a floor, for library callers that bypass the loader."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from quicmesh.errors import ConfigError
from quicmesh.sidecar.cluster import SWEEP_INTERVAL, sweep_interval
from quicmesh.sidecar.config import (
    MIN_HEALTH_CHECK_INTERVAL,
    MIN_IDLE_TIMEOUT,
    MIN_KEEPALIVE_INTERVAL,
    SidecarConfig,
    parse_config,
)

CLUSTER: dict[str, Any] = {
    "name": "reviews",
    "transport": "quic",
    "target": "127.0.0.1:9080",
    "endpoints": ["127.0.0.1:15008"],
    "engine": "aioquic",
}

BASE: dict[str, Any] = {
    "node": {"name": "a", "identity": "spiffe://mesh.local/ns/default/sa/a"},
    "tls": {"ca_dir": "ca"},
    "admin": {"address": "127.0.0.1:15000"},
    "listeners": {
        "outbound": [{"name": "app", "address": "127.0.0.1:15001", "cluster": "reviews"}]
    },
    "clusters": [CLUSTER],
}


def _load(**cluster: Any) -> SidecarConfig:
    document = copy.deepcopy(BASE)
    document["clusters"][0].update(cluster)
    return parse_config(yaml.safe_dump(document), source="s.yaml", base_dir=Path("/etc/q"))


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        (
            {"idle_timeout": "1ms"},
            "s.yaml: clusters[0].idle_timeout: 1ms is below the minimum of 100ms",
        ),
        (
            {"idle_timeout": 0.05},
            "s.yaml: clusters[0].idle_timeout: 0.05s is below the minimum of 100ms",
        ),
        (
            {"liveness": {"keepalive_interval": "1us"}},
            "s.yaml: clusters[0].liveness.keepalive_interval: 1us is below the minimum of 10ms",
        ),
        (
            {"health_check": {"interval": "5ms", "timeout": "1s"}},
            "s.yaml: clusters[0].health_check.interval: 5ms is below the minimum of 100ms",
        ),
    ],
)
def test_a_duration_below_its_minimum_is_refused_in_one_line(
    cluster: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(**cluster)
    assert str(info.value) == message


def test_the_minimums_themselves_load() -> None:
    config = _load(
        idle_timeout="100ms",
        liveness={"keepalive_interval": "10ms"},
        health_check={"interval": "100ms", "timeout": "1s"},
    )
    cluster = config.clusters[0]
    assert cluster.idle_timeout == MIN_IDLE_TIMEOUT
    assert cluster.liveness.keepalive_interval == MIN_KEEPALIVE_INTERVAL
    assert cluster.health_check is not None
    assert cluster.health_check.interval == MIN_HEALTH_CHECK_INTERVAL


def test_zero_is_still_refused_as_not_positive() -> None:
    with pytest.raises(ConfigError) as info:
        _load(idle_timeout=0)
    assert str(info.value) == "s.yaml: clusters[0].idle_timeout: must be greater than zero"


def test_keepalive_off_is_still_off() -> None:
    assert (
        _load(liveness={"keepalive_interval": "off"}).clusters[0].liveness.keepalive_interval
        is None
    )


@pytest.mark.parametrize(
    ("idle_timeout", "interval"),
    [
        (1e-6, MIN_IDLE_TIMEOUT / 2),
        (0.001, MIN_IDLE_TIMEOUT / 2),
        (0.5, 0.25),
        (60.0, SWEEP_INTERVAL),
    ],
)
def test_the_sweep_interval_has_a_floor(idle_timeout: float, interval: float) -> None:
    """A library caller's ClusterConfig(idle_timeout=1e-6) made the sweep loop sleep
    0.5 us between sweeps."""
    assert sweep_interval(idle_timeout) == interval
