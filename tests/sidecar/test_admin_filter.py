"""The admin endpoint's ``filter=`` (Envoy's ``/stats?filter=``) on the Prometheus text
and the ``/stats`` JSON: unit cases through :func:`route` and properties of the two
filters. The end-to-end check through a running sidecar is in test_sidecar_e2e.py."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from quicmesh.sidecar.admin import filter_exposition, filter_snapshot, route

from .conftest import StaticView

EXPOSITION = b"""# HELP quicmesh_cluster_flows_total Flows.
# TYPE quicmesh_cluster_flows_total counter
quicmesh_cluster_flows_total{cluster="reviews",outcome="completed"} 5.0
quicmesh_cluster_flows_total{cluster="ratings",outcome="completed"} 2.0
# HELP quicmesh_ready 1 when ready.
# TYPE quicmesh_ready gauge
quicmesh_ready{node="a"} 1.0
"""


def View() -> StaticView:
    return StaticView(
        {
            "node": "a",
            "clusters": {
                "reviews": {"streams_total": 5, "endpoints": {"127.0.0.1:15008": {"ejections": 0}}},
                "ratings": {"streams_total": 2, "endpoints": {}},
            },
            "listeners": [{"name": "l1", "flows": 1}, {"name": "l2", "flows": 0}],
        },
        EXPOSITION,
    )


def test_filter_on_the_prometheus_text_keeps_matching_series_and_their_help() -> None:
    for path in ("/metrics", "/stats/prometheus", "/stats?format=prometheus&"):
        sep = "&" if "?" in path else "?"
        response = route(View(), "GET", f"{path.rstrip('&')}{sep}filter=reviews")
        assert response.status == 200  # type: ignore[union-attr]
        assert response.body == (  # type: ignore[union-attr]
            b"# HELP quicmesh_cluster_flows_total Flows.\n"
            b"# TYPE quicmesh_cluster_flows_total counter\n"
            b'quicmesh_cluster_flows_total{cluster="reviews",outcome="completed"} 5.0\n'
        )
    only_ready = route(View(), "GET", "/metrics?filter=%5Equicmesh_ready")  # ^, encoded
    assert only_ready.body.splitlines()[-1] == b'quicmesh_ready{node="a"} 1.0'  # type: ignore[union-attr]
    assert route(View(), "GET", "/metrics?filter=nothing_has_this").body == b""  # type: ignore[union-attr]
    assert route(View(), "GET", "/metrics?filter=").body == EXPOSITION  # type: ignore[union-attr]
    # One repetition, a character class, an optional part: taken.
    one = route(View(), "GET", "/metrics?filter=%5Equicmesh_cl.*ws_total%5C%7Bcolou%3Fr?")
    assert one.status == 200  # type: ignore[union-attr]


def test_filter_on_the_stats_json_keeps_matching_values_in_place() -> None:
    def stats(query: str) -> Any:
        response = route(View(), "GET", f"/stats?{query}")
        assert response.status == 200, response  # type: ignore[union-attr]
        return json.loads(response.body)  # type: ignore[union-attr]

    assert stats("filter=streams_total") == {
        "clusters": {"reviews": {"streams_total": 5}, "ratings": {"streams_total": 2}}
    }
    assert stats("filter=ejections") == {
        "clusters": {"reviews": {"endpoints": {"127.0.0.1:15008": {"ejections": 0}}}}
    }
    # An empty object is a value; list items are named by their index (those left keep
    # their order).
    assert stats("filter=ratings.endpoints") == {"clusters": {"ratings": {"endpoints": {}}}}
    assert stats("filter=listeners.1.name") == {"listeners": [{"name": "l2"}]}
    assert stats("filter=^node$") == {"node": "a"}
    assert stats("filter=nothing_has_this") == {}
    assert stats("format=json&filter=node") == {"node": "a"}


def test_a_bad_filter_is_a_400_naming_it() -> None:
    for query, words in (
        ("filter=(", b"stats filter '(' is not a regular expression: missing )"),
        ("filter=a&filter=b", b"stats filter given more than once"),
        (f"filter={'a' * 300}", b"is longer than 256 characters"),
        # Catastrophic backtracking in Python's re (14 s on one series for a review):
        ("filter=(.*)(.*)(.*)(.*)(.*)!", b"has more than one repetition"),
        ("filter=(a|aa)*!", b"repeats an alternation"),
        ("filter=(a%2B)%2Bb", b"nests one repetition in another"),
        ("filter=(a)%5C1", b"has a backreference"),
    ):
        for path in ("/stats", "/metrics"):
            response = route(View(), "GET", f"{path}?{query}")
            assert response.status == 400, (path, query)  # type: ignore[union-attr]
            assert words in response.body, response.body  # type: ignore[union-attr]
            assert response.body.count(b"\n") == 1  # type: ignore[union-attr]


_LABEL_VALUES = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=8
)
_NAMES = st.sampled_from(["flows", "bytes", "ready", "streams", "panic"])


@given(
    st.lists(
        st.tuples(_NAMES, st.booleans(), st.lists(_LABEL_VALUES, min_size=1, max_size=3)),
        min_size=1,
        max_size=4,
        unique_by=lambda family: family[0],
    ),
    st.data(),
)
def test_the_exposition_filter_keeps_exactly_the_matching_series(
    families: list[tuple[str, bool, list[str]]], data: st.DataObject
) -> None:
    registry = CollectorRegistry()
    for name, counter, values in families:
        metric = (Counter if counter else Gauge)(
            f"q_{name}", f"{name} help", ["v"], registry=registry
        )
        for value in values:
            metric.labels(value).inc()  # type: ignore[union-attr]
    text = generate_latest(registry)
    everything = _series(text)
    pattern = re.compile(
        data.draw(
            st.one_of(
                st.sampled_from([re.escape(s) for s in everything]),
                st.sampled_from(["q_", "total", "created", r'v="', "^q_flows", "$", "x{"]),
                _LABEL_VALUES.map(re.escape),
            )
        )
    )
    filtered = filter_exposition(text, pattern)
    assert _series(filtered) == [s for s in everything if pattern.search(s)]
    # Still Prometheus text, each kept sample under its own metric's HELP and TYPE.
    kept = {m.name for m in text_string_to_metric_families(filtered.decode()) if m.samples}
    announced = {m.name for m in text_string_to_metric_families(filtered.decode())}
    assert kept == announced
    lines = filtered.split(b"\n")
    helps = [line for line in lines if line.startswith(b"# HELP ")]
    types = [line for line in lines if line.startswith(b"# TYPE ")]
    assert len(helps) == len(kept) == len(types)


def _series(text: bytes) -> list[str]:
    """Each sample's ``name{labels}`` as the text has it, from prometheus_client's parse."""
    series = []
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
            series.append(f"{sample.name}{{{labels}}}" if labels else sample.name)
    return series


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_KEYS = st.text("abcxyz_:0123456789", min_size=1, max_size=4)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda inner: st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)


@given(_JSON, st.data())
def test_the_snapshot_filter_keeps_exactly_the_matching_values(
    snapshot: object, data: st.DataObject
) -> None:
    flat = _flatten(snapshot)
    pattern = re.compile(
        data.draw(
            st.sampled_from([re.escape(p) for p in flat] or ["a"])
            | st.sampled_from(["a", "^x", "[0-9]$", r"\.", ""])
        )
    )
    left = filter_snapshot(snapshot, pattern)
    expected = {path: value for path, value in flat.items() if pattern.search(path)}
    assert (_flatten(left) if expected else {}) == expected


def _flatten(value: object, name: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        flat: dict[str, object] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{name}.{key}" if name else key))
        return flat
    return {name: value} if name or not isinstance(value, dict) else {}
