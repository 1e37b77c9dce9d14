"""``/stats`` in Envoy's text form, under Envoy's stat names, as Istio's agent reads it:
``/stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started)`` for its
readiness check, the LDS and CDS ``update_success`` counters, the listeners'
``downstream_cx_active``. Unit cases through :func:`route`; a running sidecar's in
test_sidecar_e2e.py and test_xds_conformance.py."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from quicmesh.sidecar.admin import route

from .conftest import StaticView

READINESS = "/stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started)"
"""pilot-agent's readiness query, as it sends it (status/util/stats.go)."""

UPDATES = (
    "/stats?usedonly&filter=^(cluster_manager\\.cds|listener_manager\\.lds)"
    "\\.(update_success|update_rejected)$"
)
"""pilot-agent's configuration query."""

SNAPSHOT: dict[str, Any] = {
    "ready": True,
    "draining": False,
    "uptime": 12.7,
    "reloads": {"ok": 2, "rejected": 1},
    "listeners": {
        "outbound_reviews": {
            "kind": "outbound",
            "address": "127.0.0.1:15001",
            "connections_active": 3,
            "connections_total": 40,
            "streams_active": 3,
            "streams_total": 41,
        },
        "mesh": {
            "kind": "inbound",
            "address": "[::]:15008",
            "connections_active": 7,
            "connections_total": 90,
            "streams_active": 2,
            "streams_total": 88,
        },
        "intercept_inbound": {"kind": "intercept_inbound", "address": "*:15006"},
    },
    "clusters": {
        "reviews": {
            "endpoints": {
                "127.0.0.1:15008": {
                    "health": "healthy",
                    "streams_active": 2,
                    "streams_total": 48,
                    "connect_failures": 1,
                    "connections_total": 3,
                    "connections": [{"id": "7"}],
                },
                "[::1]:15008": {"health": "ejected", "streams_total": 5},
                "10.0.0.9:15008": {"health": "removed", "streams_active": 1},
            }
        }
    },
}


def _get(snapshot: dict[str, Any], target: str) -> tuple[int, str]:
    response = route(StaticView(snapshot), "GET", target)
    return response.status, response.body.decode()  # type: ignore[union-attr]


def _parse_as_pilot_agent(text: str) -> dict[str, int]:
    """The agent's parseStats: each line ``name: value``, one ``:``, an unsigned value."""
    stats = {}
    for line in text.splitlines():
        name, value = line.split(":")  # (two parts, or the agent refuses the line)
        stats[name] = int(value.strip())
        assert stats[name] >= 0
    return stats


def test_the_readiness_query_reads_live_once_ready() -> None:
    status, body = _get(SNAPSHOT, READINESS)
    assert status == 200
    assert body == "listener_manager.workers_started: 1\nserver.state: 0\n"


def test_the_server_state_follows_the_sidecar() -> None:
    starting = dict(SNAPSHOT, ready=False)
    assert _parse_as_pilot_agent(_get(starting, READINESS)[1]) == {
        "listener_manager.workers_started": 0,
        "server.state": 3,  # INITIALIZING: the agent waits
    }
    draining = dict(SNAPSHOT, ready=False, draining=True)
    assert _parse_as_pilot_agent(_get(draining, READINESS)[1]) == {
        "listener_manager.workers_started": 1,
        "server.state": 1,  # DRAINING
    }


def test_configuration_updates_count_the_loads_of_a_file() -> None:
    stats = _parse_as_pilot_agent(_get(SNAPSHOT, UPDATES)[1])
    assert stats == {
        "cluster_manager.cds.update_rejected": 1,
        "cluster_manager.cds.update_success": 3,  # the first load and two reloads
        "listener_manager.lds.update_rejected": 1,
        "listener_manager.lds.update_success": 3,
    }


def test_configuration_updates_count_xds_responses_by_service() -> None:
    snapshot = dict(
        SNAPSHOT,
        xds={
            "updates": {"CDS": {"success": 4, "rejected": 2}, "LDS": {"success": 1, "rejected": 0}}
        },
    )
    stats = _parse_as_pilot_agent(_get(snapshot, UPDATES)[1])
    assert stats == {
        "cluster_manager.cds.update_rejected": 2,
        "cluster_manager.cds.update_success": 4,
        "listener_manager.lds.update_rejected": 0,
        "listener_manager.lds.update_success": 1,
    }
    no_answer_yet = dict(SNAPSHOT, xds={"updates": {}})
    assert (
        _parse_as_pilot_agent(_get(no_answer_yet, UPDATES)[1])[
            "listener_manager.lds.update_success"
        ]
        == 0
    )


def test_listener_and_cluster_stats_under_envoys_names() -> None:
    status, body = _get(SNAPSHOT, "/stats?format=text")
    assert status == 200
    stats = _parse_as_pilot_agent(body)
    assert list(stats) == sorted(stats)
    # Outbound: the application's connections; inbound: the peers' flows (tunnels).
    assert stats["listener.127.0.0.1_15001.downstream_cx_active"] == 3
    assert stats["listener.[__]_15008.downstream_cx_active"] == 2
    assert stats["listener.[__]_15008.downstream_cx_total"] == 88
    assert stats["listener.0.0.0.0_15006.downstream_cx_active"] == 0
    assert stats["server.total_connections"] == 5
    assert stats["server.uptime"] == 12
    assert stats["listener_manager.total_listeners_active"] == 3
    assert stats["cluster.reviews.upstream_rq_total"] == 53
    assert stats["cluster.reviews.upstream_rq_active"] == 3
    assert stats["cluster.reviews.upstream_cx_active"] == 1
    assert stats["cluster.reviews.upstream_cx_connect_fail"] == 1
    assert stats["cluster.reviews.membership_total"] == 2  # (the removed one is not)
    assert stats["cluster.reviews.membership_healthy"] == 1
    # The agent's drain poll (EXIT_ON_ZERO_ACTIVE_CONNECTIONS): a filter on the suffix.
    _, body = _get(SNAPSHOT, "/stats?usedonly&filter=downstream_cx_active")
    assert sum(_parse_as_pilot_agent(body).values()) == 3 + 2 + 0


def test_json_stays_the_default_and_usedonly_takes_any_format() -> None:
    status, body = _get(SNAPSHOT, "/stats")
    assert status == 200 and json.loads(body)["uptime"] == 12.7
    status, body = _get(SNAPSHOT, "/stats?usedonly&format=json")
    assert status == 200 and json.loads(body)["uptime"] == 12.7
    status, body = _get(SNAPSHOT, "/stats?format=yaml")
    assert status == 400
    assert "/stats format 'yaml': json (the default) or prometheus or text" in body
    status, body = _get(SNAPSHOT, "/stats?usedonly&format=text&format=json")
    assert status == 400
    status, body = _get(SNAPSHOT, "/stats?format=text&filter=(")
    assert status == 400 and "not a regular expression" in body


@given(
    st.dictionaries(
        st.text(st.characters(codec="ascii", exclude_characters=":\r\n"), min_size=1),
        st.fixed_dictionaries(
            {"health": st.sampled_from(["healthy", "unhealthy", "ejected", "removed"])},
            optional={
                "streams_total": st.integers(0, 2**40),
                "connect_failures": st.integers(0, 9),
            },
        ),
        max_size=5,
    ),
    st.booleans(),
    st.booleans(),
)
def test_every_line_is_one_the_agent_parses(
    endpoints: dict[str, Any], ready: bool, draining: bool
) -> None:
    snapshot = copy.deepcopy(SNAPSHOT)
    snapshot.update(ready=ready, draining=draining)
    snapshot["clusters"]["reviews"]["endpoints"] = endpoints
    status, body = _get(snapshot, "/stats?usedonly")
    assert status == 200 and body.endswith("\n")
    stats = _parse_as_pilot_agent(body)
    assert stats["server.state"] in (0, 1, 3)
    assert stats["cluster.reviews.membership_total"] == sum(
        1 for e in endpoints.values() if e["health"] != "removed"
    )


def test_listeners_on_one_address_add_up_as_envoys_shared_stats() -> None:
    # Found by a review: a QUIC and a TCP listener on one port wrote one name, the last
    # listed won, and a live flow on the other read 0 (the agent's drain poll then
    # stopped the sidecar mid-flow).
    listeners = {
        "mesh": {"kind": "inbound", "address": "127.0.0.1:15008", "streams_active": 1},
        "mesh_tcp": {"kind": "inbound", "address": "127.0.0.1:15008", "streams_active": 0},
    }
    _, body = _get(
        dict(SNAPSHOT, listeners=listeners), "/stats?usedonly&filter=downstream_cx_active$"
    )
    assert _parse_as_pilot_agent(body) == {"listener.127.0.0.1_15008.downstream_cx_active": 1}
