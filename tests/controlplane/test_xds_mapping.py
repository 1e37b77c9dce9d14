"""Envoy resources onto quicmesh's model: examples, refusals, and hypothesis over the mapping."""

from __future__ import annotations

import datetime
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quicmesh.errors import ConfigError
from quicmesh.sidecar.config import ClusterConfig, InboundListenerConfig
from quicmesh.tls import DevCA
from quicmesh.tunnel.connect import parse_target
from quicmesh.xds.bootstrap import parse_bootstrap
from quicmesh.xds.mapping import (
    EnvoyResources,
    MappedConfig,
    MappingError,
    map_cluster,
    map_listener,
    map_resources,
    with_static,
)
from quicmesh.xds.resources import Cluster, ClusterLoadAssignment, Listener, parse_message
from quicmesh.xds.testing.documents import (
    cla_doc,
    cluster_doc,
    inbound_listener_doc,
    outbound_listener_doc,
    static_cluster_doc,
)

IDENTITY = "spiffe://mesh.local/ns/default/sa/productpage"


_HC = {"timeout": "1s", "interval": "1s", "tcp_health_check": {}}


def _cluster(doc: dict[str, Any]) -> Cluster:
    return parse_message(doc, Cluster, "test")


def _cla(doc: dict[str, Any]) -> ClusterLoadAssignment:
    return parse_message(doc, ClusterLoadAssignment, "test")


def test_outbound_listener_and_quic_cluster() -> None:
    listener = parse_message(
        outbound_listener_doc("out", 15001, "reviews", "10.0.0.9:9080"), Listener, "t"
    )
    resources = EnvoyResources(
        listeners={"out": listener},
        clusters={"reviews": _cluster(cluster_doc("reviews", "quic", lb="LEAST_REQUEST"))},
        assignments={"reviews": _cla(cla_doc("reviews", [("127.0.0.1", 4001, "HEALTHY", None)]))},
    )
    mapped = map_resources(resources)
    assert mapped.warming == ()
    (out,) = mapped.outbound
    assert (out.name, out.address, out.cluster) == ("out", ("127.0.0.1", 15001), "reviews")
    (cluster,) = mapped.clusters
    assert cluster.transport == "quic"
    assert cluster.target == "10.0.0.9:9080"
    assert cluster.endpoints == (("127.0.0.1", 4001),)
    assert cluster.load_balancing == "least_request"


@pytest.mark.parametrize(
    ("idle_timeout", "expected"), [(None, 3600.0), ("30s", 30.0), ("0.5s", 0.5), ("0s", None)]
)
def test_a_tcp_proxy_idle_timeout_is_the_listeners_flow_idle_timeout(
    idle_timeout: str | None, expected: float | None
) -> None:
    doc = outbound_listener_doc("out", 15001, "reviews", "10.0.0.9:9080")
    if idle_timeout is not None:
        doc["filter_chains"][0]["filters"][0]["typed_config"]["idle_timeout"] = idle_timeout
    mapped = map_listener(parse_message(doc, Listener, "t"))
    assert not isinstance(mapped, InboundListenerConfig)
    assert mapped.config.flow_idle_timeout == expected


@pytest.mark.parametrize(
    ("idle_timeout", "expected"), [(None, 3600.0), ("90s", 90.0), ("0s", None)]
)
def test_a_connect_terminators_stream_idle_timeout_is_the_inbound_flow_idle_timeout(
    idle_timeout: str | None, expected: float | None
) -> None:
    """Every flow crosses the peer's inbound listener too: without a mapping there, an
    outbound ``idle_timeout: 0s`` still met the inbound side's hour."""
    doc = inbound_listener_doc("in", 15008, "UDP", ["127.0.0.1:9080"])
    manager = doc["filter_chains"][0]["filters"][0]["typed_config"]
    if idle_timeout is not None:
        manager["stream_idle_timeout"] = idle_timeout
    mapped = map_listener(parse_message(doc, Listener, "t"))
    assert isinstance(mapped, InboundListenerConfig)
    assert mapped.flow_idle_timeout == expected


@pytest.mark.parametrize("idle_timeout", ["-1s", "86401s"])
def test_a_tcp_proxy_idle_timeout_out_of_range_is_refused(idle_timeout: str) -> None:
    doc = outbound_listener_doc("out", 15001, "reviews", "10.0.0.9:9080")
    doc["filter_chains"][0]["filters"][0]["typed_config"]["idle_timeout"] = idle_timeout
    with pytest.raises(MappingError) as info:
        map_listener(parse_message(doc, Listener, "t"))
    assert f"tcp_proxy.idle_timeout: {idle_timeout.removesuffix('s')}s is outside" in str(
        info.value
    )


@pytest.mark.parametrize("name", ["a b", "x\nevil", "a;rm", "a" * 64, "-bad", ""])
def test_a_listener_name_that_is_not_a_quicmesh_name_is_refused(name: str) -> None:
    """The whole name is checked (not only its start): at most 63 letters, digits, _ . -"""
    listener = parse_message(
        outbound_listener_doc(name, 15001, "reviews", "10.0.0.9:9080"), Listener, "t"
    )
    with pytest.raises(MappingError, match="is not a quicmesh name"):
        map_listener(listener)


def test_a_listener_may_use_a_static_cluster_with_its_connect_target() -> None:
    """As in Envoy, an LDS listener may name a bootstrap's (or file's) static cluster;
    quicmesh keeps one CONNECT target a cluster, so it must be that cluster's."""
    static = ClusterConfig(
        name="fixed", transport="h2", target=parse_target("10.0.0.9:9080"), endpoints=()
    )
    listener = parse_message(
        outbound_listener_doc("out", 15001, "fixed", "10.0.0.9:9080"), Listener, "t"
    )
    resources = EnvoyResources(listeners={"out": listener})
    assert map_resources(resources).outbound == ()  # (no such cluster: it waits)
    mapped = map_resources(resources, static_clusters=[static])
    assert [o.cluster for o in mapped.outbound] == ["fixed"] and mapped.warming == ()
    assert mapped.clusters == ()  # (the static one is the file's to give: with_static)
    other = parse_message(outbound_listener_doc("out", 15001, "fixed", "h:1"), Listener, "t")
    with pytest.raises(MappingError, match=r"CONNECT target of static cluster 'fixed'"):
        map_resources(EnvoyResources(listeners={"out": other}), static_clusters=[static])
    # A static cluster no static listener uses has no target: the listeners give it one
    # (Envoy's usual shape: static clusters, listeners from LDS).
    bare = replace(static, target=None)
    mapped = map_resources(EnvoyResources(listeners={"out": other}), static_clusters=[bare])
    assert mapped.warming == () and [o.cluster for o in mapped.outbound] == ["fixed"]
    merged = with_static(MappedConfig((), (), (bare,)), mapped)
    assert [(c.name, c.target) for c in merged.clusters] == [("fixed", parse_target("h:1"))]


def test_eds_cluster_warms_until_its_endpoints_arrive() -> None:
    listener = parse_message(outbound_listener_doc("out", 15001, "c", "h:1"), Listener, "t")
    resources = EnvoyResources(
        listeners={"out": listener}, clusters={"c": _cluster(cluster_doc("c", "h2"))}
    )
    mapped = map_resources(resources)
    assert mapped.warming == ("c",)
    assert mapped.clusters == () and mapped.outbound == ()
    resources.assignments["c"] = _cla(cla_doc("c", []))
    mapped = map_resources(resources)
    assert mapped.warming == () and len(mapped.outbound) == 1
    assert mapped.clusters[0].endpoints == ()


def test_inbound_listeners_quic_and_h2() -> None:
    quic = map_listener(
        parse_message(
            inbound_listener_doc("in-quic", 15008, "UDP", ["127.0.0.1:8080"]), Listener, "t"
        )
    )
    h2 = map_listener(
        parse_message(inbound_listener_doc("in-h2", 15008, "TCP", ["10.0.0.0/8:*"]), Listener, "t")
    )
    assert not hasattr(quic, "target") and not hasattr(h2, "target")
    assert quic.transports == ("quic",)  # type: ignore[union-attr]
    assert h2.transports == ("h2",)  # type: ignore[union-attr]
    assert [d.text for d in h2.destinations] == ["10.0.0.0/8:*"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lb_policy": "MAGLEV"}, "lb_policy MAGLEV is not supported"),
        ({"dns_lookup_family": "V4_ONLY"}, "field 'dns_lookup_family' is not supported"),
        ({"type": "STRICT_DNS"}, "type STRICT_DNS is not supported"),
        (
            {"circuit_breakers": {"thresholds": [{"max_retries": 3}]}},
            "field 'max_retries' is not supported",
        ),
        (
            {"outlier_detection": {"consecutive_5xx": 3}},
            "field 'consecutive_5xx' is not supported",
        ),
        (
            {
                "health_checks": [
                    {"timeout": "1s", "interval": "1s", "http_health_check": {"path": "/"}}
                ]
            },
            "field 'http_health_check' is not supported",
        ),
    ],
)
def test_unsupported_cluster_fields_are_named(change: dict[str, Any], message: str) -> None:
    doc = cluster_doc("c", "quic")
    doc.update(change)
    with pytest.raises(MappingError) as info:
        map_cluster(_cluster(doc), "h:1", _cla(cla_doc("c", [])))
    assert message in str(info.value)
    assert str(info.value).startswith("Cluster 'c'")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"health_checks": [_HC | {"interval": "-5s"}]}, "health_checks[0].interval: -5s"),
        ({"health_checks": [_HC | {"interval": "0s"}]}, "health_checks[0].interval: 0s"),
        ({"health_checks": [_HC | {"timeout": "90000s"}]}, "health_checks[0].timeout: 90000s"),
        (
            {"outlier_detection": {"base_ejection_time": "-1s"}},
            "outlier_detection.base_ejection_time: -1s",
        ),
        ({"connect_timeout": "0s"}, "connect_timeout: 0s is outside (0, 86400s]"),
    ],
)
def test_a_duration_out_of_range_is_refused_as_the_yaml_configuration_does(
    change: dict[str, Any], message: str
) -> None:
    doc = cluster_doc("c", "quic")
    doc.update(change)
    with pytest.raises(MappingError) as info:
        map_cluster(_cluster(doc), "h:1", _cla(cla_doc("c", [])))
    assert message in str(info.value), info.value
    assert str(info.value).startswith("Cluster 'c'")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("type", 99, "type 99 (unknown) is not supported"),
        ("lb_policy", 42, "lb_policy 42 (unknown) is not supported"),
    ],
)
def test_an_enum_value_this_api_does_not_know_is_refused_by_number(
    field: str, value: int, message: str
) -> None:
    """protobuf keeps an enum value it does not know; the mapping names it by number (it
    raised ValueError from ``Name()``, which ended the ADS stream's task)."""
    cluster = _cluster(cluster_doc("c", "quic"))
    setattr(cluster, field, value)
    with pytest.raises(MappingError) as info:
        map_cluster(cluster, "h:1", _cla(cla_doc("c", [])))
    assert message in str(info.value)
    doc = cluster_doc("c", "quic")
    doc["circuit_breakers"] = {"thresholds": [{"max_connections": 3}]}
    cluster = _cluster(doc)
    cluster.circuit_breakers.thresholds[0].priority = 9
    with pytest.raises(MappingError, match=r"priority 9 \(unknown\) is not supported"):
        map_cluster(cluster, "h:1", _cla(cla_doc("c", [])))


def test_unequal_weights_and_unhealthy_endpoints() -> None:
    doc = cla_doc("c", [("127.0.0.1", 1, "HEALTHY", 1), ("127.0.0.1", 2, "HEALTHY", 3)])
    with pytest.raises(MappingError, match="load_balancing_weight differs"):
        map_cluster(_cluster(cluster_doc("c", "h2")), "h:1", _cla(doc))


# -- hypothesis ----------------------------------------------------------------------

HEALTH = ["UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING", "TIMEOUT", "DEGRADED"]
LB = {"ROUND_ROBIN": "round_robin", "LEAST_REQUEST": "least_request", "RANDOM": "random"}
TRANSPORTS = ["quic", "h2", "tcp"]

endpoints = st.lists(
    st.tuples(
        st.sampled_from(["127.0.0.1", "10.1.2.3", "::1"]),
        st.integers(1, 65535),
        st.sampled_from(HEALTH),
    ),
    max_size=12,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    transport=st.sampled_from(TRANSPORTS),
    lb=st.sampled_from(sorted(LB)),
    eps=endpoints,
    max_connections=st.none() | st.integers(1, 100000),
    max_requests=st.none() | st.integers(1, 1000000),
    failures=st.none() | st.integers(1, 1000),
    connect_ms=st.integers(1, 60000),
    health=st.booleans(),
)
def test_cluster_mapping_matches_the_envoy_fields(
    transport: str,
    lb: str,
    eps: list[tuple[str, int, str]],
    max_connections: int | None,
    max_requests: int | None,
    failures: int | None,
    connect_ms: int,
    health: bool,
) -> None:
    doc = cluster_doc("c", transport, lb=lb)
    doc["connect_timeout"] = f"{connect_ms / 1000}s"
    thresholds: dict[str, Any] = {}
    if max_connections is not None:
        thresholds["max_connections"] = max_connections
    if max_requests is not None:
        thresholds["max_requests"] = max_requests
    doc["circuit_breakers"] = {"thresholds": [thresholds]}
    if failures is not None:
        doc["outlier_detection"] = {"consecutive_local_origin_failure": failures}
    if health:
        doc["health_checks"] = [
            {
                "timeout": "1s",
                "interval": "2s",
                "unhealthy_threshold": 3,
                "healthy_threshold": 2,
                "tcp_health_check": {},
            }
        ]
    cla = cla_doc("c", [(h, p, s, None) for h, p, s in eps])
    mapped = map_cluster(_cluster(doc), "app:80", _cla(cla))
    assert isinstance(mapped, ClusterConfig)
    assert mapped.transport == transport
    assert mapped.load_balancing == LB[lb]
    assert mapped.target == "app:80"
    assert mapped.endpoints == tuple(
        (h, p) for h, p, s in eps if s not in ("UNHEALTHY", "DRAINING", "TIMEOUT")
    )
    assert mapped.circuit_breakers.max_connections == (max_connections or 64)
    assert mapped.circuit_breakers.max_concurrent_streams == (max_requests or 1024)
    assert mapped.outlier_detection.consecutive_connect_failures == (failures or 5)
    assert abs(mapped.connect_timeout - connect_ms / 1000) < 1e-6
    if health:
        assert mapped.health_check is not None
        assert (mapped.health_check.interval, mapped.health_check.unhealthy_threshold) == (2.0, 3)
    else:
        assert mapped.health_check is None


cluster_fields = sorted(
    f.name
    for f in Cluster.DESCRIPTOR.fields
    if f.name
    not in {
        "name",
        "type",
        "eds_cluster_config",
        "connect_timeout",
        "lb_policy",
        "load_assignment",
        "health_checks",
        "circuit_breakers",
        "typed_extension_protocol_options",
        "outlier_detection",
        "transport_socket",
        "cluster_type",
    }
    and f.type in (f.TYPE_BOOL, f.TYPE_UINT32, f.TYPE_STRING)
    and not f.is_repeated
)


@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(cluster_fields))
def test_every_other_scalar_cluster_field_is_refused_by_name(field: str) -> None:
    cluster = _cluster(cluster_doc("c", "h2"))
    descriptor = Cluster.DESCRIPTOR.fields_by_name[field]
    value: Any = {descriptor.TYPE_BOOL: True, descriptor.TYPE_UINT32: 7}.get(descriptor.type, "x")
    setattr(cluster, field, value)
    with pytest.raises(MappingError, match=f"field '{field}' is not supported"):
        map_cluster(cluster, "h:1", _cla(cla_doc("c", [])))


BOOTSTRAP_KEYS = st.sampled_from(
    [
        "node",
        "admin",
        "static_resources",
        "listeners",
        "clusters",
        "id",
        "name",
        "address",
        "socket_address",
        "port_value",
        "secrets",
        "type",
        "x",
    ]
)


def bootstrap_values(depth: int) -> st.SearchStrategy[Any]:
    """Values nested up to ``depth`` lists or mappings deep, built level by level (not
    with ``st.recursive``, whose check of its ``extend`` function reads the source file
    again and warns when the file was edited during the run)."""
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    values: st.SearchStrategy[Any] = leaves
    for _ in range(depth):
        values = (
            leaves
            | st.lists(values, max_size=4)
            | st.dictionaries(BOOTSTRAP_KEYS, values, max_size=4)
        )
    return values


@settings(max_examples=200, deadline=None)
@given(document=bootstrap_values(3))
def test_any_bootstrap_document_is_a_config_or_one_line_error(document: Any) -> None:
    if not isinstance(document, dict):
        document = {"static_resources": document}
    document.setdefault("static_resources", {})
    try:
        parse_bootstrap(document, source="envoy.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("envoy.yaml: ")
        assert "\n" not in str(exc)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 1e300])
def test_an_enum_given_a_float_out_of_range_is_a_one_line_error(value: float) -> None:
    # Found by a review: OverflowError out of protobuf's ParseDict (a traceback).
    document = {"static_resources": {"clusters": [{"name": "c", "lb_policy": value}]}}
    with pytest.raises(ConfigError, match=r"^envoy.yaml: "):
        parse_bootstrap(document, source="envoy.yaml")


# -- bootstrap files through the CLI ------------------------------------------------


def write_bootstrap(tmp_path: Path, **overrides: Any) -> Path:
    ca = DevCA()
    identity = ca.issue(IDENTITY)
    identity.save(tmp_path / "cert.pem", tmp_path / "key.pem")
    (tmp_path / "ca.pem").write_bytes(ca.trust_bundle.pem)
    document: dict[str, Any] = {
        "node": {"id": "a", "cluster": "mesh"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        "static_resources": {
            "listeners": [outbound_listener_doc("out", 15001, "reviews", "127.0.0.1:9080")],
            "clusters": [static_cluster_doc("reviews", "quic", [("127.0.0.1", 15008)])],
            "secrets": [
                {
                    "name": "default",
                    "tls_certificate": {
                        "certificate_chain": {"filename": str(tmp_path / "cert.pem")},
                        "private_key": {"filename": str(tmp_path / "key.pem")},
                    },
                },
                {
                    "name": "ROOTCA",
                    "validation_context": {"trusted_ca": {"filename": str(tmp_path / "ca.pem")}},
                },
            ],
        },
    }
    document["static_resources"].update(overrides)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quicmesh", "sidecar", "-c", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_envoy_bootstrap_checks_with_the_cli(tmp_path: Path) -> None:
    path = write_bootstrap(tmp_path)
    result = _check(path)
    assert result.returncode == 0, result.stderr
    from quicmesh.xds.bootstrap import load_any_config

    config = load_any_config(path)
    assert config.node.identity == IDENTITY and config.node.name == "a"
    assert config.clusters[0].transport == "quic"
    assert config.clusters[0].target == "127.0.0.1:9080"


def test_envoy_bootstrap_with_unsupported_field_fails_in_one_line(tmp_path: Path) -> None:
    cluster = {**static_cluster_doc("reviews", "quic", []), "respect_dns_ttl": True}
    path = write_bootstrap(tmp_path, clusters=[cluster])
    result = _check(path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "Cluster 'reviews': field 'respect_dns_ttl' is not supported" in lines[0]
    assert str(path) in lines[0]


def test_a_bootstrap_tcp_proxy_to_an_undefined_cluster_names_it(tmp_path: Path) -> None:
    listener = outbound_listener_doc("out", 15001, "ghost", "127.0.0.1:9080")
    path = write_bootstrap(tmp_path, listeners=[listener])
    result = _check(path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "tcp_proxy cluster 'ghost': no such cluster in" in lines[0], lines[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lb_policy": 42}, "Cluster 'reviews': lb_policy 42 (unknown) is not supported"),
        (
            {"health_checks": [_HC | {"interval": "-5s"}]},
            "Cluster 'reviews'.health_checks[0].interval: -5s is outside",
        ),
        (  # (passed --check; every flow then overflowed: review 27)
            {"circuit_breakers": {"thresholds": [{"max_pending_requests": 0}]}},
            "Cluster 'reviews'.circuit_breakers.thresholds[0].max_pending_requests: 0 is "
            "outside 1-1000000",
        ),
    ],
)
def test_a_bootstrap_value_out_of_range_fails_check_in_one_line(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    """(An unknown enum value was a traceback; a negative interval passed --check.)"""
    cluster = {**static_cluster_doc("reviews", "quic", [("127.0.0.1", 15008)]), **change}
    result = _check(write_bootstrap(tmp_path, clusters=[cluster]))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_missing_certificate_file_names_the_secret(tmp_path: Path) -> None:
    path = write_bootstrap(tmp_path)
    (tmp_path / "cert.pem").unlink()
    result = _check(path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{path}: Secret 'default'.tls_certificate.certificate_chain: " in lines[0]
    assert "cert.pem" in lines[0]


@pytest.mark.parametrize("broken", ["key", "bundle"])
def test_a_bad_key_or_trust_bundle_names_the_secrets_field(tmp_path: Path, broken: str) -> None:
    """A private key that does not match, or a missing trusted CA file, was named by
    quicmesh's YAML keys (``tls.cert, tls.key``, ``tls.trust_bundle``), not in the file."""
    path = write_bootstrap(tmp_path)
    if broken == "key":
        DevCA().issue(IDENTITY).save(tmp_path / "other.pem", tmp_path / "key.pem")
        field = "Secret 'default'.tls_certificate.certificate_chain, .private_key: "
    else:
        (tmp_path / "ca.pem").unlink()
        field = "Secret 'ROOTCA'.validation_context.trusted_ca: "
    result = _check(path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"{path}: {field}" in line, line
    assert "tls." not in line, line


def test_envoy_bootstrap_with_expired_certificate_fails_check(tmp_path: Path) -> None:
    path = write_bootstrap(tmp_path)
    ca = DevCA()
    now = datetime.datetime.now(datetime.UTC)
    ca.issue(
        IDENTITY,
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    ).save(tmp_path / "cert.pem", tmp_path / "key.pem")
    (tmp_path / "ca.pem").write_bytes(ca.trust_bundle.pem)
    result = _check(path)
    assert result.returncode == 2
    assert "our certificate" in result.stderr and "expired" in result.stderr


def test_the_bootstrap_example_in_docs_runs_check(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "docs" / "xds.md").read_text(encoding="utf-8")
    example = text.split("An example bootstrap")[1].split("```yaml\n")[1].split("```")[0]
    ca = DevCA()
    ca.issue("spiffe://mesh.local/ns/default/sa/productpage").save(
        tmp_path / "cert.pem", tmp_path / "key.pem"
    )
    (tmp_path / "ca.pem").write_bytes(ca.trust_bundle.pem)
    path = tmp_path / "envoy.yaml"
    path.write_text(example, encoding="utf-8")
    result = _check(path)
    assert result.returncode == 0, result.stderr
    from quicmesh.xds.bootstrap import load_any_config

    config = load_any_config(path)
    assert config.clusters[0].transport == "quic"
    assert config.clusters[0].load_balancing == "least_request"
    assert config.outbound[0].address == ("127.0.0.1", 15001)


@pytest.mark.parametrize(
    ("lds", "cds", "expected"),
    [
        (None, None, 15.0),
        ("4s", None, 4.0),
        ("4s", "2.5s", 4.0),
        ("0s", "2.5s", None),
        (None, "0s", None),
    ],
)
def test_a_bootstrap_initial_fetch_timeout_of_0s_waits_for_ever(
    tmp_path: Path, lds: str | None, cds: str | None, expected: float | None
) -> None:
    """As Envoy (Istio's bootstraps set 0s on both): 0s in either config source waits for
    ever; otherwise the longer of those given (quicmesh has one wait for both)."""
    from quicmesh.xds.bootstrap import load_any_config

    path = write_bootstrap(tmp_path)
    _with_ads(path)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    for source, value in (("lds_config", lds), ("cds_config", cds)):
        document["dynamic_resources"][source].pop("initial_fetch_timeout", None)
        if value is not None:
            document["dynamic_resources"][source]["initial_fetch_timeout"] = value
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    config = load_any_config(path)
    assert config.xds is not None and config.xds.initial_fetch_timeout == expected


def test_envoy_bootstrap_ads_keeps_the_cds_initial_fetch_timeout(tmp_path: Path) -> None:
    from quicmesh.xds.bootstrap import load_any_config

    path = write_bootstrap(tmp_path)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    document["static_resources"]["clusters"].append(
        static_cluster_doc("xds", "h2", [("127.0.0.1", 18000)])
    )
    grpc = [{"envoy_grpc": {"cluster_name": "xds"}}]
    document["dynamic_resources"] = {
        "ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "grpc_services": grpc},
        "cds_config": {"ads": {}, "initial_fetch_timeout": "2.5s"},
        "lds_config": {"ads": {}},
    }
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    config = load_any_config(path)
    assert config.xds is not None
    assert config.xds.address == ("127.0.0.1", 18000)
    assert config.xds.initial_fetch_timeout == 2.5
    del document["dynamic_resources"]["cds_config"]["initial_fetch_timeout"]
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    assert load_any_config(path).xds.initial_fetch_timeout == 15.0  # type: ignore[union-attr]


def test_two_listeners_of_one_cluster_disagreeing_on_the_target_are_named_plainly() -> None:
    listeners = {
        name: parse_message(outbound_listener_doc(name, port, "reviews", target), Listener, "t")
        for name, port, target in (("a", 15001, "10.0.0.9:9080"), ("b", 15002, "10.0.0.8:80"))
    }
    with pytest.raises(MappingError) as info:
        map_resources(EnvoyResources(listeners=listeners))
    message = str(info.value)
    assert "'10.0.0.8:80' differs from '10.0.0.9:9080'" in message, message
    assert "Target(" not in message


def test_a_typed_config_whose_bytes_do_not_decode_is_named() -> None:
    """A listener's filter whose typed_config does not decode: a MappingError naming the
    listener and the filter (it escaped as protobuf's DecodeError, NACKed as our bug)."""
    listener = parse_message(
        outbound_listener_doc("out", 15001, "reviews", "127.0.0.1:9080"), Listener, "test"
    )
    listener.filter_chains[0].filters[0].typed_config.value = b"\xff\xff\xff\xff"
    clusters = {"reviews": _cluster(static_cluster_doc("reviews", "quic", [("127.0.0.1", 1)]))}
    with pytest.raises(MappingError, match=r"Listener 'out'.*typed_config does not decode"):
        map_resources(EnvoyResources(listeners={"out": listener}, clusters=clusters))


def test_static_resources_named_twice_are_refused(tmp_path: Path) -> None:
    listeners = [outbound_listener_doc("out", port, "reviews", "127.0.0.1:9080") for port in (1, 2)]
    result = _check(write_bootstrap(tmp_path, listeners=listeners))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "bootstrap.static_resources.listeners[1]: name 'out' appears twice" in line


def test_a_bootstrap_cluster_with_a_tls_transport_socket_parses(tmp_path: Path) -> None:
    """docs/xds.md accepts the tls transport socket (quicmesh uses its own mutual TLS):
    its typed_config must parse (its message type was not loaded)."""
    cluster = static_cluster_doc("reviews", "quic", [("127.0.0.1", 15008)])
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "reviews",
        },
    }
    result = _check(write_bootstrap(tmp_path, clusters=[cluster]))
    assert result.returncode == 0, result.stderr


def test_a_serving_cluster_keeps_serving_while_its_update_warms() -> None:
    """A CDS update that has to warm again (another EDS service, whose endpoints are not
    here yet) keeps the version serving now, and its listener, until the new one is warm
    (as Envoy does); it dropped both, and the listener's port refused connections."""
    listener = parse_message(outbound_listener_doc("out", 15001, "c", "h:1"), Listener, "t")
    resources = EnvoyResources(
        listeners={"out": listener},
        clusters={"c": _cluster(cluster_doc("c", "h2"))},
        assignments={"c": _cla(cla_doc("c", [("127.0.0.1", 1, "HEALTHY", None)]))},
    )
    serving = {c.name: c for c in map_resources(resources).clusters}
    changed = cluster_doc("c", "quic")
    changed["eds_cluster_config"]["service_name"] = "c2"
    resources.clusters["c"] = _cluster(changed)
    mapped = map_resources(resources, serving)
    assert mapped.warming == ("c",)
    assert mapped.clusters == (serving["c"],) and [o.name for o in mapped.outbound] == ["out"]
    assert mapped.clusters[0].transport == "h2"  # the serving version
    # Without a serving version (first sync) it is held back as before.
    assert map_resources(resources).clusters == ()
    # Warm: the new version replaces it.
    resources.assignments["c2"] = _cla(cla_doc("c2", [("127.0.0.1", 2, "HEALTHY", None)]))
    warm = map_resources(resources, serving)
    assert warm.warming == () and warm.clusters[0].transport == "quic"


def _with_ads(path: Path) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    document["static_resources"]["clusters"].append(
        static_cluster_doc("xds", "h2", [("127.0.0.1", 18000)])
    )
    document["dynamic_resources"] = {
        "ads_config": {"grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
        "cds_config": {"ads": {}},
        "lds_config": {"ads": {}},
    }
    path.write_text(yaml.safe_dump(document), encoding="utf-8")


@pytest.mark.parametrize(
    ("clusters", "message"),
    [
        # A static EDS cluster fed over ADS: dropped with its listener (never bound).
        (
            [cluster_doc("reviews", "quic")],
            "Cluster 'reviews': a static cluster needs its endpoints inline (load_assignment)",
        ),
        # A static listener on a cluster CDS would give: dropped, never bound.
        ([], "tcp_proxy cluster 'reviews': no such cluster in bootstrap.static_resources"),
    ],
)
def test_a_static_listener_whose_cluster_is_not_static_is_refused_with_ads(
    tmp_path: Path, clusters: list[Any], message: str
) -> None:
    """With dynamic_resources these passed --check and the sidecar started without the
    listener (connections to its port refused), logging nothing."""
    path = write_bootstrap(tmp_path, clusters=clusters)
    _with_ads(path)
    result = _check(path)
    assert result.returncode == 2, result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert message in line, line


@pytest.mark.parametrize(
    ("static", "message"),
    [
        ([], "bootstrap.static_resources: expected a mapping, got list"),
        ({"listeners": {}}, "bootstrap.static_resources.listeners: expected a list, got dict"),
        (
            {"clusters": ["a"]},
            "bootstrap.static_resources.clusters[0]: expected a mapping, got str",
        ),
    ],
)
def test_a_bootstrap_section_of_the_wrong_shape_is_named(
    tmp_path: Path, static: Any, message: str
) -> None:
    """``static_resources: []`` parsed as an empty section, reported as missing secrets."""
    path = write_bootstrap(tmp_path)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    document["static_resources"] = static
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    result = _check(path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert message in line, line


@pytest.mark.parametrize(
    ("source", "fields", "message"),
    [
        ("lds_config", {"resource_api_version": "V3"}, None),
        ("cds_config", {"resource_api_version": "V3", "initial_fetch_timeout": "3s"}, None),
        ("lds_config", {"initial_fetch_timeout": "3s"}, None),
        (
            "lds_config",
            {"initial_fetch_timeout": "-1s"},
            "bootstrap.dynamic_resources.lds_config.initial_fetch_timeout: -1s is outside",
        ),
        (
            "cds_config",
            {"resource_api_version": "V2"},
            "bootstrap.dynamic_resources.cds_config.resource_api_version: only V3",
        ),
        (
            "cds_config",
            {"authorities": [{"name": "xds.example"}]},
            "field 'authorities' is not supported",
        ),
    ],
)
def test_config_source_fields_are_read_or_refused(
    tmp_path: Path, source: str, fields: dict[str, Any], message: str | None
) -> None:
    """Config-source fields other than ads, resource_api_version and
    initial_fetch_timeout are refused by name (they passed --check and were not read)."""
    path = write_bootstrap(tmp_path)
    _with_ads(path)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    document["dynamic_resources"][source].update(fields)
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    result = _check(path)
    if message is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert message in line, line


UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _with_tls(validation: dict[str, Any], *, combined: bool = True) -> Cluster:
    doc = cluster_doc("c", "quic")
    common = (
        {"combined_validation_context": {"default_validation_context": validation}}
        if combined
        else {"validation_context": validation}
    )
    doc["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": UPSTREAM_TLS, "common_tls_context": common},
    }
    return _cluster(doc)


def _mapped_identities(cluster: Cluster) -> tuple[str, ...]:
    return _mapped_cluster(cluster).server_identities


def test_a_clusters_subject_alt_names_are_its_server_identities() -> None:
    """Istio names a destination's service accounts in its cluster's TLS context
    (match_subject_alt_names, exact SPIFFE IDs): they become the cluster's
    server_identities, so a connection to an endpoint presenting another identity is
    refused (they were ignored: any identity the trust bundle vouched for was served)."""
    istio = _with_tls(
        {"match_subject_alt_names": [{"exact": "spiffe://mesh.local/ns/default/sa/reviews"}]}
    )
    assert _mapped_identities(istio) == ("spiffe://mesh.local/ns/default/sa/reviews",)
    typed = _with_tls(
        {
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": "spiffe://mesh.local/ns/a/sa/x"}},
                {"san_type": "URI", "matcher": {"prefix": "spiffe://mesh.local/ns/b/"}},
            ]
        },
        combined=False,
    )
    assert _mapped_identities(typed) == (
        "spiffe://mesh.local/ns/a/sa/x",
        "spiffe://mesh.local/ns/b/*",
    )
    assert _mapped_identities(_with_tls({})) == ()


@pytest.mark.parametrize(
    ("validation", "problem"),
    [
        (
            {"match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "a"}}]},
            "san_type DNS is not supported",
        ),
        ({"match_subject_alt_names": [{"safe_regex": {"regex": ".*"}}]}, "not safe_regex"),
        ({"match_subject_alt_names": [{"prefix": "spiffe://mesh.local/ns"}]}, "prefix"),
        ({"match_subject_alt_names": [{"exact": "spiffe://x/*"}]}, "exact"),
        ({"match_subject_alt_names": [{"exact": "reviews"}]}, "invalid SPIFFE ID"),
        (
            {"match_subject_alt_names": [{"exact": "spiffe://x/a", "ignore_case": True}]},
            "case-sensitive",
        ),
    ],
)
def test_a_subject_alt_name_matcher_quicmesh_cannot_hold_to_is_refused(
    validation: dict[str, Any], problem: str
) -> None:
    """Refused by name, rather than mapped to a cluster that would serve any identity."""
    with pytest.raises(MappingError, match="transport_socket") as info:
        _mapped_identities(_with_tls(validation))
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, 50), (0.0, 0), (0.4, 1), (25.0, 25), (100.0, 100)]
)
def test_a_clusters_panic_threshold_is_mapped(value: float | None, expected: int) -> None:
    """``common_lb_config.healthy_panic_threshold`` is the cluster's panic threshold
    (Envoy's default, 50, when unset); a value that is not a percent is refused."""
    doc = cluster_doc("c", "h2")
    if value is not None:
        doc["common_lb_config"] = {"healthy_panic_threshold": {"value": value}}
    assert _mapped_cluster(_cluster(doc)).healthy_panic_threshold == expected


def test_a_panic_threshold_that_is_not_a_percent_is_refused() -> None:
    doc = cluster_doc("c", "h2")
    doc["common_lb_config"] = {"healthy_panic_threshold": {"value": 150.0}}
    with pytest.raises(MappingError, match="healthy_panic_threshold 150 is not a percent"):
        _mapped_cluster(_cluster(doc))
    doc["common_lb_config"] = {"zone_aware_lb_config": {}}
    with pytest.raises(MappingError, match="zone_aware_lb_config"):
        _mapped_cluster(_cluster(doc))


def _mapped_cluster(cluster: Cluster) -> Any:
    """The cluster mapped, with one endpoint."""
    mapped = map_cluster(cluster, "h:1", _cla(cla_doc("c", [("127.0.0.1", 1, "HEALTHY", None)])))
    assert mapped is not None
    return mapped
