"""Cluster settings of issue 12: ``transport: auto``, ``fallback`` and ``liveness``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.sidecar.config import FallbackConfig, LivenessSettings
from tests.sidecar.test_sidecar_config import (
    DELETE,
    VALID,
    check_loads_or_clean_error,
    error_of,
    load,
    paths_of,
    yaml_values,
)


def auto_document(**cluster: Any) -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    document["clusters"][0].update(
        {
            "transport": "auto",
            "early_data": False,
            "fallback": {"delay": "250ms", "broken_backoff": "30s", "max_broken_backoff": "10m"},
            "liveness": {
                "keepalive_interval": "500ms",
                "max_probe_timeouts": 4,
                "dead_after": "8s",
            },
        }
    )
    document["clusters"][0].update(cluster)
    return document


def test_auto_cluster_loads() -> None:
    cluster = load(auto_document()).clusters[0]
    assert cluster.transport == "auto"
    assert cluster.fallback == FallbackConfig(delay=0.25, broken_backoff=30, max_broken_backoff=600)
    assert cluster.liveness == LivenessSettings(
        keepalive_interval=0.5, max_probe_timeouts=4, dead_after=8
    )


def test_defaults() -> None:
    document = auto_document()
    del document["clusters"][0]["fallback"]
    del document["clusters"][0]["liveness"]
    cluster = load(document).clusters[0]
    assert cluster.fallback == FallbackConfig(
        delay=0.3, broken_backoff=300, max_broken_backoff=3600
    )
    assert cluster.liveness == LivenessSettings(
        keepalive_interval=1.0, max_probe_timeouts=6, dead_after=10.0
    )


def test_liveness_checks_can_be_turned_off() -> None:
    off = {"keepalive_interval": "off", "max_probe_timeouts": "off", "dead_after": "off"}
    cluster = load(auto_document(liveness=off)).clusters[0]
    assert cluster.liveness == LivenessSettings(None, None, None)


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        (
            {"fallback": {"delay": "soon"}},
            "sidecar.yaml: clusters[0].fallback.delay: 'soon' is not a duration",
        ),
        (
            {"fallback": {"broken_backoff": "1m", "max_broken_backoff": "10s"}},
            "sidecar.yaml: clusters[0].fallback.max_broken_backoff: must be at least",
        ),
        (
            {"fallback": {"retries": 3}},
            "sidecar.yaml: clusters[0].fallback.retries: unknown field",
        ),
        (
            {"liveness": {"max_probe_timeouts": 0}},
            "sidecar.yaml: clusters[0].liveness.max_probe_timeouts: 0 is outside 1-1000",
        ),
        (
            {"liveness": {"dead_after": "0s"}},
            "sidecar.yaml: clusters[0].liveness.dead_after: must be greater than zero",
        ),
    ],
)
def test_errors_name_the_field(cluster: dict[str, Any], message: str) -> None:
    document = auto_document(**cluster)
    for key, value in cluster.items():
        if value is None:
            del document["clusters"][0][key]
    error = error_of(document)
    assert error.startswith(message), error


def test_early_data_on_an_auto_cluster_is_ignored_with_a_warning() -> None:
    config = load(auto_document(early_data=True))
    assert config.warnings == (
        "sidecar.yaml: clusters[0].early_data: applies to quic clusters only: ignored for auto",
    )


def test_options_of_other_transports_are_ignored_with_a_warning() -> None:
    config = load(auto_document(transport="quic"))
    assert config.warnings == (
        "sidecar.yaml: clusters[0].fallback: applies to auto clusters only: ignored for quic",
    )
    document = auto_document(transport="h2")
    del document["clusters"][0]["fallback"]
    config = load(document)
    warning = "sidecar.yaml: clusters[0].early_data: applies to quic clusters only: ignored for h2"
    assert warning in config.warnings
    # liveness applies to h2 too (PINGs and the kernel's keepalive), since 2026-12-07,
    # but for its probe-timeout count (TCP retransmits itself).
    assert [w for w in config.warnings if "liveness" in w] == [
        "sidecar.yaml: clusters[0].liveness.max_probe_timeouts: applies to quic clusters"
        " only: ignored for h2"
    ], config.warnings


AUTO_PATHS = paths_of(auto_document())


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(AUTO_PATHS), st.one_of(yaml_values, st.just(DELETE))),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_auto_clusters_load_or_fail_cleanly(mutations: list[tuple[Any, Any]]) -> None:
    import yaml

    document = auto_document()
    for path, value in mutations:
        node: Any = document
        try:
            for key in path[:-1]:
                node = node[key]
            if value is DELETE:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    check_loads_or_clean_error(yaml.safe_dump(document))
