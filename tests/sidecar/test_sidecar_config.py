"""The configuration loader: valid documents load, invalid ones give one clear line.

Hypothesis feeds random and mutated YAML documents: the loader either returns a
config or raises ConfigError whose message is one line starting with the file name.
"""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quic_helpers import require_engine

from quicmesh.errors import ConfigError
from quicmesh.sidecar.config import (
    SidecarConfig,
    destination_matches,
    load_config,
    load_endpoints_file,
    parse_address,
    parse_config,
    parse_destination,
    parse_duration,
    rules_overlap,
)
from quicmesh.transport.base import default_quic_engine
from quicmesh.tunnel.connect import parse_target

SOURCE = "sidecar.yaml"

VALID: dict[str, Any] = {
    "node": {"name": "a", "identity": "spiffe://mesh.local/ns/default/sa/a"},
    "tls": {"ca_dir": "ca", "ticket_cache": "tickets.json"},
    "admin": {"address": "127.0.0.1:15000"},
    "access_log": {"path": "-"},
    "drain": {"grace_period": "5s"},
    "listeners": {
        "outbound": [{"name": "app", "address": "127.0.0.1:15001", "cluster": "reviews"}],
        "inbound": [
            {
                "name": "mesh",
                "address": "127.0.0.1:15008",
                "transports": ["quic", "h2"],
                "destinations": ["127.0.0.1:9080", "10.0.0.0/8:*"],
                "policies": [
                    {
                        "identity": "spiffe://mesh.local/ns/default/*",
                        "destinations": ["127.0.0.1:9080"],
                    }
                ],
                "connect_timeout": "2s",
                "max_streams": 64,
                "early_data": False,
                "engine": "aioquic",
            }
        ],
    },
    "clusters": [
        {
            "name": "reviews",
            "transport": "quic",
            "target": "127.0.0.1:9080",
            "endpoints": ["127.0.0.1:15008", "[::1]:15008"],
            "load_balancing": "least_request",
            "congestion_control": "bbr",
            "max_datagram_size": 1452,
            "early_data": True,
            "engine": "aioquic",
            "health_check": {
                "interval": "1s",
                "timeout": "500ms",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
            },
            "outlier_detection": {
                "consecutive_connect_failures": 3,
                "base_ejection_time": "10s",
                "max_ejection_percent": 50,
            },
            "circuit_breakers": {
                "max_connections": 4,
                "max_concurrent_streams": 100,
                "max_pending_opens": 10,
            },
            "connect_timeout": 2,
            "idle_timeout": "1m",
            "connect_retries": 2,
        }
    ],
}


def load(document: Any) -> SidecarConfig:
    return parse_config(yaml.safe_dump(document), source=SOURCE, base_dir=Path("/etc/q"))


def error_of(document: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(document)
    return str(info.value)


def test_the_full_example_loads() -> None:
    config = load(VALID)
    cluster = config.cluster("reviews")
    assert cluster.endpoints == (("127.0.0.1", 15008), ("::1", 15008))
    assert cluster.congestion_control == "bbr"
    assert cluster.max_datagram_size == 1452
    assert cluster.health_check is not None and cluster.health_check.timeout == 0.5
    assert cluster.idle_timeout == 60.0
    assert config.tls.ca_dir == "/etc/q/ca"
    assert config.tls.ticket_cache == "/etc/q/tickets.json"
    assert cluster.early_data is True
    assert config.inbound[0].transports == ("quic", "h2")
    assert config.inbound[0].early_data is False
    assert config.to_dict()["clusters"][0]["endpoints"] == ["127.0.0.1:15008", "[::1]:15008"]


def test_defaults() -> None:
    document = copy.deepcopy(VALID)
    document["clusters"][0] = {
        "name": "reviews",
        "transport": "h2",
        "target": "reviews:9080",
        "endpoints": ["127.0.0.1:15008"],
    }
    cluster = load(document).cluster("reviews")
    assert cluster.load_balancing == "round_robin"
    assert cluster.health_check is None
    assert cluster.connect_retries == 1
    assert cluster.outlier_detection.consecutive_connect_failures == 5
    assert cluster.early_data is False
    del document["tls"]["ticket_cache"]
    del document["listeners"]["inbound"][0]["early_data"]
    config = load(document)
    assert config.tls.ticket_cache is None
    assert config.inbound[0].early_data is True


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 3600.0),
        ("30s", 30.0),
        ("500ms", 0.5),
        (90, 90.0),
        ("1m", 60.0),
        ("off", None),
        (False, None),
        (0, None),
        ("0s", None),
        (86400, 86400.0),
    ],
)
def test_flow_idle_timeout_on_every_listener_kind(value: object, seconds: float | None) -> None:
    """Envoy's ``tcp_proxy`` ``idle_timeout``: an hour unless given, ``off`` or 0 for none."""
    document = copy.deepcopy(VALID)
    document["intercept"] = {"outbound_port": 16001, "inbound_port": 16006}
    if value is not None:
        document["listeners"]["outbound"][0]["flow_idle_timeout"] = value
        document["listeners"]["inbound"][0]["flow_idle_timeout"] = value
        document["intercept"]["flow_idle_timeout"] = value
    config = load(document)
    assert config.intercept is not None
    assert config.outbound[0].flow_idle_timeout == seconds
    assert config.inbound[0].flow_idle_timeout == seconds
    assert config.intercept.flow_idle_timeout == seconds


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (-1, "duration -1 is outside 0-86400 seconds"),
        ("86401s", "duration '86401s' is outside 0-86400 seconds"),
        ("never", "'never' is not a duration"),
        (True, "expected a duration"),
        ("1h", "unknown unit 'h'"),
    ],
)
def test_a_flow_idle_timeout_out_of_range_is_one_line(value: object, problem: str) -> None:
    document = copy.deepcopy(VALID)
    document["listeners"]["outbound"][0]["flow_idle_timeout"] = value
    message = error_of(document)
    assert message.startswith("sidecar.yaml: listeners.outbound[0].flow_idle_timeout: ")
    assert problem in message
    assert "\n" not in message


def test_a_reload_applies_an_inbound_flow_idle_timeout_in_place() -> None:
    """Each flow reads it when it starts: a running listener takes a new value."""
    old = load(VALID).inbound[0]
    document = copy.deepcopy(VALID)
    document["listeners"]["inbound"][0]["flow_idle_timeout"] = "5m"
    assert old.start_keys_changed(load(document).inbound[0]) == []


def mutate(path: list[Any], value: Any) -> dict[str, Any]:
    document = copy.deepcopy(VALID)
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return document


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ["clusters", 0, "endpoints", 1],
            "127.0.0.1:70000",
            "sidecar.yaml: clusters[0].endpoints[1]: port 70000 is outside 1-65535",
        ),
        (
            ["clusters", 0, "transport"],
            "udp",
            "sidecar.yaml: clusters[0].transport: 'udp' is not one of quic, h2, tcp, auto",
        ),
        (  # (silently dropped, before: most likely a typo for another one)
            ["clusters", 0, "endpoints"],
            ["127.0.0.1:15008", "127.0.0.1:15009", "127.0.0.1:15008"],
            "sidecar.yaml: clusters[0].endpoints[2]: 127.0.0.1:15008 is given twice",
        ),
        (
            ["clusters", 0, "services"],
            ["10.96.0.9:80", "10.96.0.9:80"],
            "sidecar.yaml: clusters[0].services[1]: 10.96.0.9:80 is given twice",
        ),
        (["node", "identity"], "http://x", "sidecar.yaml: node.identity: invalid SPIFFE ID"),
        (["node"], DELETE, "sidecar.yaml: node: is required"),
        (["clusters", 0, "colour"], "red", "sidecar.yaml: clusters[0].colour: unknown field"),
        (
            ["clusters", 0, "max_datagram_size"],
            1500,
            "sidecar.yaml: clusters[0].max_datagram_size:",
        ),
        (
            ["listeners", "outbound", 0, "cluster"],
            "nope",
            "sidecar.yaml: listeners.outbound[0].cluster: no cluster named 'nope'",
        ),
        (
            ["clusters", 0, "health_check", "interval"],
            "soon",
            "sidecar.yaml: clusters[0].health_check.interval: 'soon' is not a duration",
        ),
        (
            ["listeners", "inbound", 0, "transports"],
            ["h2", "tcp"],
            "sidecar.yaml: listeners.inbound[0].transports: h2 and tcp both listen on TCP",
        ),
        (
            ["listeners", "inbound", 0, "destinations", 1],
            "10.0.0.0/33:*",
            "sidecar.yaml: listeners.inbound[0].destinations[1]: '10.0.0.0/33' is not",
        ),
        (
            ["listeners", "outbound", 0, "address"],
            "127.0.0.1:15008",
            "sidecar.yaml: listeners.inbound[0]: TCP port 15008 is also used by "
            "listeners.outbound[0]",
        ),
        (
            ["clusters", 0, "circuit_breakers", "max_connections"],
            0,
            "sidecar.yaml: clusters[0].circuit_breakers.max_connections: 0 is outside 1-100000",
        ),
        (
            ["clusters", 0, "circuit_breakers", "max_pending_opens"],
            0,
            "sidecar.yaml: clusters[0].circuit_breakers.max_pending_opens: 0 is outside 1-1000000",
        ),
        (
            ["clusters", 0, "early_data"],
            "yes",
            "sidecar.yaml: clusters[0].early_data: expected true or false",
        ),
        (
            ["listeners", "inbound", 0, "transports"],
            ["h2"],
            "sidecar.yaml: listeners.inbound[0].early_data: applies to listeners serving quic",
        ),
        (
            ["tls", "ticket_cache"],
            7,
            "sidecar.yaml: tls.ticket_cache: expected a non-empty string",
        ),
        (
            ["clusters", 0, "name"],
            "c" * 64,
            "sidecar.yaml: clusters[0].name: '" + "c" * 57 + "...' is not a name (1-63 letters",
        ),
    ],
)
def test_errors_name_file_field_and_problem(path: list[Any], value: Any, message: str) -> None:
    error = error_of(mutate(path, value))
    assert error.startswith(message), error
    assert "\n" not in error


@pytest.mark.parametrize(
    ("rule", "unreachable"),
    [
        ("127.0.0.1:9080", False),
        ("10.1.2.3:443", False),  # inside 10.0.0.0/8:*
        ("10.0.0.0/7:*", False),  # overlaps it
        ("127.0.0.1:9081", True),  # another port
        ("192.168.0.0/16:*", True),
        ("reviews.local:9080", True),  # names match names only
        ("[::1]:9080", True),
    ],
)
def test_a_policy_destination_outside_the_listeners_is_warned(rule: str, unreachable: bool) -> None:
    """The listener's allow-list is checked first, so such a rule allows nothing (it was
    loaded silently)."""
    document = mutate(["listeners", "inbound", 0, "policies", 0, "destinations"], [rule])
    expected = (
        (
            "sidecar.yaml: listeners.inbound[0].policies[0].destinations[0]: "
            f"{rule} is outside the listener's destinations: no flow can reach it",
        )
        if unreachable
        else ()
    )
    assert load(document).warnings == expected


@given(
    first=st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "192.168.1.0/24", "::1"]),
    second=st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "192.168.1.0/24", "::1"]),
    first_port=st.sampled_from(["80", "443", "*"]),
    second_port=st.sampled_from(["80", "443", "*"]),
    host=st.sampled_from(["10.1.2.3", "10.200.0.1", "192.168.1.9", "::1", "127.0.0.1"]),
    port=st.sampled_from([80, 443]),
)
def test_rules_overlap_when_some_target_matches_both(
    first: str, second: str, first_port: str, second_port: str, host: str, port: int
) -> None:
    """A target matching both rules implies rules_overlap (so no reachable rule is warned)."""
    wrap = lambda h, p: f"[{h}]:{p}" if ":" in h else f"{h}:{p}"  # noqa: E731
    a = parse_destination(wrap(first, first_port))
    b = parse_destination(wrap(second, second_port))
    if destination_matches(a, host, port) and destination_matches(b, host, port):
        assert rules_overlap(a, b) and rules_overlap(b, a)
    assert rules_overlap(a, b) == rules_overlap(b, a)


@pytest.mark.parametrize("transport", ["h2", "tcp"])
def test_quic_only_options_are_ignored_with_a_warning_on_other_transports(transport: str) -> None:
    # examples/README.md: switching a cluster's transport is a one-line change.
    document = mutate(["clusters", 0, "transport"], transport)
    config = load(document)
    assert config.clusters[0].transport == transport
    assert [w.split(": ")[1] for w in config.warnings] == [
        "clusters[0].congestion_control",
        "clusters[0].max_datagram_size",
        "clusters[0].early_data",
        "clusters[0].engine",
    ]
    assert config.warnings[0] == (
        "sidecar.yaml: clusters[0].congestion_control: applies to quic clusters only: "
        f"ignored for {transport}"
    )
    # Still checked: a typo is an error whatever the transport.
    document["clusters"][0]["congestion_control"] = "bbrr"
    assert "clusters[0].congestion_control" in error_of(document)
    assert load(VALID).warnings == ()


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"^sidecar.yaml: line \d+ column \d+: invalid YAML"):
        parse_config("node:\n  name: [a\n  b: c\n", source=SOURCE)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("admin: {address: '127.0.0.1:1'}\nadmin: {address: '127.0.0.1:2'}\n", 2),
        ("clusters:\n  - name: a\n    early_data: true\n    early_data: false\n", 4),
    ],
)
def test_a_key_given_twice_is_refused_with_its_line(text: str, line: int) -> None:
    """PyYAML keeps the last of two equal keys: a second block or option replaced the
    first without a word ("a typo never silently becomes a default")."""
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="sidecar.yaml")
    assert str(error.value).startswith(f"sidecar.yaml: line {line} column ")
    assert "is given twice" in str(error.value)


def _nested_aliases(width: int, depth: int) -> str:
    """A "billion laughs": each level a list of ``width`` aliases of the level below."""
    lines = ["l0: &l0 [x]"]
    for level in range(1, depth + 1):
        aliases = ", ".join([f"*l{level - 1}"] * width)
        lines.append(f"l{level}: &l{level} [{aliases}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # Found by a review: 1,175 bytes took 11 s and 181 MiB to refuse, growing as N**3.
        (_nested_aliases(80, 3), "aliases expand the document to "),
        (_nested_aliases(2, 20), "aliases expand the document to "),
        ("a: &x [*x]\n", "an alias refers to a node that holds it"),
        # A lone surrogate escaped into a string: a traceback when written or encoded.
        ('node: {name: "\\uD800"}\n', "not Unicode text (a lone surrogate)"),
        ('"\\uDC80": 1\n', "not Unicode text (a lone surrogate)"),
    ],
)
def test_yaml_that_no_configuration_needs_is_refused_in_one_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text, source=SOURCE)
    assert str(error.value).startswith(f"{SOURCE}: ") and problem in str(error.value)
    assert "\n" not in str(error.value)


def test_shared_blocks_by_alias_are_still_taken() -> None:
    from quicmesh.sidecar.config import load_yaml

    assert load_yaml(_nested_aliases(10, 3))["l3"][9][9] == [["x"]] * 10
    # Defaults merged into thousands of entries grow linearly: taken (the first version
    # of the limit refused this, 260,065 nodes expanded; review).
    defaults = "defaults: &d {" + ", ".join(f"k{i}: {i}" for i in range(30)) + "}\n"
    items = "".join(f"  - {{<<: *d, name: n{i}}}\n" for i in range(4000))
    merged = load_yaml(defaults + "items:\n" + items)["items"]
    assert len(merged) == 4000 and merged[-1]["k29"] == 29


def test_a_merged_key_may_still_be_overridden() -> None:
    from quicmesh.sidecar.config import load_yaml

    assert load_yaml("b: &b {x: 1, y: 1}\nc:\n  <<: *b\n  x: 2\n")["c"] == {"x": 2, "y": 1}


def test_empty_file() -> None:
    with pytest.raises(ConfigError, match="the file is empty"):
        parse_config("", source=SOURCE)


def test_endpoints_file(tmp_path: Path) -> None:
    (tmp_path / "eps.yaml").write_text("- 127.0.0.1:1\n- 127.0.0.1:2\n")
    document = mutate(["clusters", 0, "endpoints"], DELETE)
    document["clusters"][0]["endpoints_file"] = "eps.yaml"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(document))
    config = load_config(tmp_path / "s.yaml")
    assert config.cluster("reviews").endpoints == (("127.0.0.1", 1), ("127.0.0.1", 2))
    (tmp_path / "eps.yaml").write_text("endpoints: [127.0.0.1:0]\n")
    with pytest.raises(ConfigError, match=r"eps.yaml: endpoints\[0\]: port 0 is outside"):
        load_endpoints_file(tmp_path / "eps.yaml")
    # Loaded with the configuration, the error names it and the key too (it did not).
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "s.yaml")
    assert str(raised.value).startswith(f"{tmp_path / 's.yaml'}: clusters[0].endpoints_file: ")
    assert "eps.yaml: endpoints[0]: port 0 is outside" in str(raised.value)
    # An empty file (a rewrite in place seen halfway) is refused, not read as no
    # endpoints (a running cluster lost all of them); [] says none.
    for empty in ("", "# being rewritten\n"):
        (tmp_path / "eps.yaml").write_text(empty)
        with pytest.raises(ConfigError, match=r"eps.yaml: the endpoints file is empty: write \[\]"):
            load_endpoints_file(tmp_path / "eps.yaml")
    # With the configuration too (at start, and on a reload, which would otherwise
    # drop a running cluster's endpoints as the watcher did).
    with pytest.raises(
        ConfigError, match=r"clusters\[0\].endpoints_file: .*the endpoints file is empty"
    ):
        load_config(tmp_path / "s.yaml")
    (tmp_path / "eps.yaml").write_text("[]\n")
    assert load_endpoints_file(tmp_path / "eps.yaml") == ()
    (tmp_path / "eps.yaml").unlink()
    with pytest.raises(ConfigError, match=r"s.yaml: clusters\[0\].endpoints_file: .*eps.yaml"):
        load_config(tmp_path / "s.yaml")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"^/nonexistent/s\.yaml: cannot read"):
        load_config("/nonexistent/s.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"), [(5, 5.0), ("250ms", 0.25), ("2s", 2.0), ("1.5m", 90.0), (".5", 0.5)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


# -- hypothesis ---------------------------------------------------------------------------


def check_loads_or_clean_error(text: str) -> None:
    try:
        parse_config(text, source=SOURCE, base_dir=Path("/etc/q"))
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{SOURCE}: "), message
        assert "\n" not in message and "\r" not in message, message
        assert len(message) < 1000


yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        ["127.0.0.1:15008", "[::1]:1", "quic", "h2", "tcp", "5s", "*", "10.0.0.0/8:*", "x:0"]
    ),
)


def yaml_nested(depth: int) -> st.SearchStrategy[Any]:
    """YAML values nested up to ``depth`` lists or mappings deep (scalars first, so that
    shrinking goes toward them). Built level by level rather than with ``st.recursive``,
    whose check that ``extend`` uses its argument reads the source file again: a file
    edited while the tests ran made it warn (HypothesisDeprecationWarning, an error here)."""
    values: st.SearchStrategy[Any] = yaml_scalars
    for _ in range(depth):
        values = st.one_of(
            yaml_scalars,
            st.lists(values, max_size=4),
            st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), values, max_size=4),
        )
    return values


yaml_values = yaml_nested(3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_values)
def test_random_documents_never_crash(document: Any) -> None:
    check_loads_or_clean_error(yaml.safe_dump(document))


def paths_of(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths_of(value, (*prefix, index))
    return found


ALL_PATHS = paths_of(VALID)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(ALL_PATHS), st.one_of(yaml_values, st.just(DELETE))),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_documents_load_or_fail_cleanly(mutations: list[tuple[Any, Any]]) -> None:
    document = copy.deepcopy(VALID)
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


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes(text: str) -> None:
    check_loads_or_clean_error(text)


@pytest.mark.parametrize("port", ["\u00b2", "\u00b9", "\u0663", "8\u00b0"])
def test_a_port_of_non_ascii_digits_is_refused_as_not_a_number(port: str) -> None:
    # str.isdigit() accepts superscripts and Arabic-Indic digits; int() refuses some of them
    # with its own message ("invalid literal for int()"), and takes others as a number.
    with pytest.raises(ValueError, match=r"^port .* is not a number$"):
        parse_address(f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    "target", ["10.0.0.999:80", "x:065535", "reviews:0", "-bad-.svc:80", "1.2.3:80"]
)
def test_a_cluster_target_the_tunnel_would_refuse_is_refused_at_load(target: str) -> None:
    # The tunnel's grammar decides: before, these passed the config's address parser
    # and failed every flow, which the cluster counted as connect failures.
    document = copy.deepcopy(VALID)
    document["clusters"][0]["target"] = target
    assert error_of(document).startswith("sidecar.yaml: clusters[0].target: target ")


_AUTHORITY_ALPHABET = st.sampled_from("abcxyz019.-:[]_ \t")


@given(
    st.text(_AUTHORITY_ALPHABET, max_size=24) | st.from_regex(r"\A[a-z0-9.]{1,12}:0?[0-9]{1,6}\Z")
)
def test_an_address_parses_exactly_when_the_tunnel_would_accept_it(text: str) -> None:
    # One host:port grammar: a configured address (listener, endpoint, admin) is
    # refused exactly when the tunnel's parse_target refuses it (white space aside).
    try:
        target = parse_target(text.strip())
    except ValueError:
        with pytest.raises(ValueError):
            parse_address(text)
    else:
        assert parse_address(text) == (target.host, target.port)


@pytest.mark.parametrize("address", ["10.0.0.999:80", "x:065535", "1.2.3:80", "a_b:80"])
def test_an_address_the_tunnel_refuses_is_refused(address: str) -> None:
    with pytest.raises(ValueError):
        parse_address(address)


@pytest.mark.parametrize("rule", ["10.0.0.999:80", "a_b.svc:*", "1.2.3:443", "-x.svc:80"])
def test_a_destination_no_target_can_match_is_refused(rule: str) -> None:
    with pytest.raises(ValueError, match=r"is not a host name, IP address or CIDR block$"):
        parse_destination(rule)


def test_a_destination_name_is_read_like_a_target_host() -> None:
    rule = parse_destination("Reviews.Default.svc.:9080")
    assert (rule.host, rule.port) == ("reviews.default.svc", 9080)
    target = parse_target("reviews.default.svc:9080")
    assert destination_matches(rule, target.host, target.port)


# -- QUIC engine ------------------------------------------------------------------------


def test_quic_engine_per_cluster_and_per_listener() -> None:
    config = load(VALID)
    assert config.cluster("reviews").engine == "aioquic"
    assert config.inbound[0].engine == "aioquic"
    document = mutate(["clusters", 0, "engine"], DELETE)
    del document["listeners"]["inbound"][0]["engine"]
    defaulted = load(document)
    assert defaulted.cluster("reviews").engine == default_quic_engine()  # the default
    assert defaulted.inbound[0].engine == default_quic_engine()
    assert error_of(mutate(["clusters", 0, "engine"], "quiche")) == (
        "sidecar.yaml: clusters[0].engine: 'quiche' is not one of aioquic, native"
    )
    assert error_of(mutate(["listeners", "inbound", 0, "engine"], "picoquic")) == (
        "sidecar.yaml: listeners.inbound[0].engine: 'picoquic' is not one of aioquic, native"
    )
    h2_only = mutate(["listeners", "inbound", 0, "transports"], ["h2"])
    del h2_only["listeners"]["inbound"][0]["early_data"]
    assert error_of(h2_only) == (
        "sidecar.yaml: listeners.inbound[0].engine: applies to listeners serving quic only"
    )


def test_datagram_size_and_ack_threshold_per_cluster_and_per_listener() -> None:
    """The inbound listener sets its QUIC datagram size too (not only clusters), and
    both set the native engine's ack_eliciting_threshold; the transports get them."""
    from quicmesh.sidecar.inbound import inbound_transport
    from quicmesh.sidecar.runtime import cluster_transport
    from quicmesh.tls.ca import DevCA

    config = load(VALID)
    assert config.inbound[0].max_datagram_size == 1200
    assert config.inbound[0].ack_eliciting_threshold == 1
    assert config.cluster("reviews").ack_eliciting_threshold == 1
    document = mutate(["listeners", "inbound", 0, "max_datagram_size"], 1452)
    document["listeners"]["inbound"][0]["ack_eliciting_threshold"] = 9
    document["clusters"][0]["ack_eliciting_threshold"] = 4
    tuned = load(document)
    assert tuned.inbound[0].max_datagram_size == 1452
    assert tuned.inbound[0].ack_eliciting_threshold == 9
    assert tuned.cluster("reviews").ack_eliciting_threshold == 4
    ca = DevCA()
    identity = ca.issue("spiffe://mesh.local/ns/default/sa/x")
    listener = inbound_transport("quic", identity, ca.trust_bundle, 16, tuned.inbound[0])
    assert listener.engine_limits().max_datagram_size == 1452  # type: ignore[attr-defined]
    assert listener.engine_limits().ack_eliciting_threshold == 9  # type: ignore[attr-defined]
    cluster = cluster_transport(tuned.cluster("reviews"), identity, ca.trust_bundle)
    assert cluster.engine_limits().ack_eliciting_threshold == 4  # type: ignore[attr-defined]
    assert error_of(mutate(["listeners", "inbound", 0, "max_datagram_size"], 9000)) == (
        "sidecar.yaml: listeners.inbound[0].max_datagram_size: 9000 is outside 1200-1452"
    )
    assert error_of(mutate(["clusters", 0, "ack_eliciting_threshold"], -1)) == (
        "sidecar.yaml: clusters[0].ack_eliciting_threshold: -1 is outside 0-1048576"
    )
    h2_only = mutate(["listeners", "inbound", 0, "transports"], ["h2"])
    for key in ("early_data", "engine"):
        del h2_only["listeners"]["inbound"][0][key]
    h2_only["listeners"]["inbound"][0]["max_datagram_size"] = 1452
    assert error_of(h2_only) == (
        "sidecar.yaml: listeners.inbound[0].max_datagram_size: "
        "applies to listeners serving quic only"
    )


def test_a_ticket_cache_with_native_clusters_warns_that_they_keep_tickets_in_memory() -> None:
    # rustls 0.23 cannot export a client session: a native cluster's tickets are never
    # in tls.ticket_cache (docs/design.md), and the sidecar says so at load.
    require_engine("native")
    document = mutate(["clusters", 0, "engine"], "native")
    assert load(document).warnings == (
        "sidecar.yaml: tls.ticket_cache: applies to aioquic clusters only: reviews on the "
        "native engine keep their session tickets in memory (a restarted sidecar resumes "
        "no session on them)",
    )
    del document["tls"]["ticket_cache"]
    assert load(document).warnings == ()
    h2 = mutate(["clusters", 0, "transport"], "h2")
    h2["clusters"][0]["engine"] = "native"
    assert not any("ticket_cache" in w for w in load(h2).warnings)
    assert load(VALID).warnings == ()  # aioquic clusters use the file


def test_native_engine_loads_where_built_and_is_one_line_error_where_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from quicmesh.transport.quic import engine, native_engine

    document = mutate(["clusters", 0, "engine"], "native")
    document["listeners"]["inbound"][0]["engine"] = "native"
    if native_engine.native_available():
        config = load(document)
        assert config.cluster("reviews").engine == config.inbound[0].engine == "native"
    monkeypatch.setattr(native_engine, "_NATIVE", None)
    monkeypatch.delitem(engine._ENGINES, "native", raising=False)
    message = error_of(document)
    assert "\n" not in message
    assert message.startswith("sidecar.yaml: ")
    assert "engine: the native QUIC engine is not built" in message
    assert "pip install -e ." in message
    # Not a quic cluster: checked, ignored with a warning, whether built or not.
    h2 = mutate(["clusters", 0, "transport"], "h2")
    h2["clusters"][0]["engine"] = "native"
    del h2["listeners"]["inbound"][0]["engine"]
    assert load(h2).cluster("reviews").engine == "native"


@pytest.mark.parametrize(
    ("first", "second", "clash"),
    [
        ("127.0.0.2:25301", "127.0.0.3:25301", False),  # two addresses: both bind
        ("127.0.0.2:25301", "[::1]:25301", False),
        ("127.0.0.2:25301", "127.0.0.2:25301", True),
        ("0.0.0.0:25301", "127.0.0.3:25301", True),  # every address takes it
        ("localhost:25301", "127.0.0.3:25301", True),  # a name: maybe the same
        ("127.0.0.2:25301", "127.0.0.2:25302", False),
    ],
)
def test_listeners_share_a_port_only_on_distinct_addresses(
    first: str, second: str, clash: bool
) -> None:
    """Two listeners on one port were refused whatever their addresses, though two IP
    addresses bind apart (as Envoy allows)."""
    document = copy.deepcopy(VALID)
    document["listeners"]["outbound"] = [
        {"name": "one", "address": first, "cluster": "reviews"},
        {"name": "two", "address": second, "cluster": "reviews"},
    ]
    if clash:
        assert (
            "listeners.outbound[1]: TCP port 25301 is also used by listeners.outbound[0]"
            in error_of(document)
        )
    else:
        assert [out.name for out in load(document).outbound] == ["one", "two"]


def test_the_complete_example_of_the_docs_checks_without_a_warning(tmp_path: Path) -> None:
    """docs/config.md's "A complete example", copied as it is, passes ``--check`` with
    nothing to warn about (it named a ticket cache, which its native cluster ignores)."""
    import subprocess
    import sys

    from quicmesh.tls import DevCA

    docs = (Path(__file__).parents[2] / "docs" / "config.md").read_text()
    example = docs.split("## A complete example", 1)[1].split("```yaml\n", 1)[1].split("```")[0]
    (tmp_path / "sidecar.yaml").write_text(example)
    DevCA().save(tmp_path / "ca")
    run = subprocess.run(
        [sys.executable, "-m", "quicmesh", "sidecar", "-c", "sidecar.yaml", "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "warning" not in run.stderr.lower(), run.stderr


def test_a_port_clash_between_sections_names_both_by_their_whole_path() -> None:
    document = copy.deepcopy(VALID)
    document["intercept"] = {"outbound_port": 15001}
    assert error_of(document) == (
        "sidecar.yaml: intercept.outbound_port: TCP port 15001 is also used by "
        "listeners.outbound[0]"
    )


@pytest.mark.parametrize(("value", "seconds"), [(None, 15.0), ("0s", None), (0, None), ("2s", 2.0)])
def test_xds_initial_fetch_timeout_of_0s_waits_for_ever(
    value: object, seconds: float | None
) -> None:
    """As Envoy's (Istio's bootstraps set 0s): no wait limit at all."""
    document: dict[str, Any] = {
        "node": VALID["node"],
        "tls": {"ca_dir": "ca"},
        "admin": VALID["admin"],
        "xds": {"address": "127.0.0.1:18000"},
    }
    if value is not None:
        document["xds"]["initial_fetch_timeout"] = value
    config = load(document)
    assert config.xds is not None and config.xds.initial_fetch_timeout == seconds


def test_a_cluster_name_given_twice_names_the_second_one() -> None:
    """Said "clusters: [1].name: ..." before (a review, 2026-12-07)."""
    document = copy.deepcopy(VALID)
    document["clusters"].append(copy.deepcopy(document["clusters"][0]))
    with pytest.raises(ConfigError) as error:
        parse_config(yaml.safe_dump(document), source="sidecar.yaml")
    assert str(error.value) == "sidecar.yaml: clusters[1].name: duplicate cluster 'reviews'"


@given(
    address=st.ip_addresses(v=4),
    rule=st.sampled_from(
        [
            "10.0.0.0/8:*",
            "127.0.0.1:*",
            "0.0.0.0/0:443",
            "[::/0]:*",
            "[::1]:*",
            "[::ffff:10.0.0.0/104]:*",
            "[::ffff:127.0.0.1]:*",
        ]
    ),
    port=st.sampled_from([80, 443]),
)
def test_an_ipv4_mapped_target_is_matched_as_its_ipv4_address(
    address: ipaddress.IPv4Address, rule: str, port: int
) -> None:
    """An IPv4-mapped target "[::ffff:a.b.c.d]" reaches a.b.c.d: IPv4 rules decide it,
    IPv6 ones never match it (until 2026-12-07 "[::/0]" let it past an IPv4 allow-list
    that left loopback out)."""
    parsed = parse_destination(rule)
    mapped = str(ipaddress.IPv6Address(f"::ffff:{address}"))
    assert destination_matches(parsed, mapped, port) == destination_matches(
        parsed, str(address), port
    )


@pytest.mark.parametrize(
    ("address", "warned"),
    [
        ("127.0.0.1:15001", False),
        ("[::1]:15001", False),
        ("localhost:15001", False),
        ("0.0.0.0:15001", True),
        ("[::]:15001", True),
        ("10.1.2.3:15001", True),
    ],
)
def test_an_outbound_listener_other_hosts_reach_is_warned(address: str, warned: bool) -> None:
    """An outbound listener sends what it takes into the mesh as this sidecar's identity:
    one bound beyond loopback (any host that reaches it may use that identity) is said so
    at load and by --check, as the admin's address is (it was silent)."""
    document = copy.deepcopy(VALID)
    document["listeners"]["outbound"][0]["address"] = address
    expected = (
        [
            f"sidecar.yaml: listeners.outbound[0].address: {address} takes flows from other"
            " hosts too, and sends them to the mesh as this sidecar's identity (a"
            " workload's listener belongs on 127.0.0.1)"
        ]
        if warned
        else []
    )
    assert [w for w in load(document).warnings if "outbound" in w] == expected


@pytest.mark.parametrize(
    ("rule", "ipv4"),
    [("[::ffff:10.0.0.0/104]:*", "10.0.0.0/8:*"), ("[::ffff:10.0.0.1]:80", "10.0.0.1:80")],
)
def test_a_rule_written_ipv4_mapped_is_its_ipv4_rule(rule: str, ipv4: str) -> None:
    """A rule in IPv4-mapped form names the IPv4 addresses it maps, as targets are read
    (until 2026-12-07 it matched no target once those were read as IPv4)."""
    mapped, plain = parse_destination(rule), parse_destination(ipv4)
    assert mapped.network == plain.network and mapped.port == plain.port
    for host in ("10.0.0.1", "::ffff:10.0.0.1", "10.9.9.9", "11.0.0.1"):
        assert destination_matches(mapped, host, 80) == destination_matches(plain, host, 80)
    assert destination_matches(mapped, "::ffff:10.0.0.1", 80)


@pytest.mark.parametrize("where", ["policy", "server_identities"])
def test_a_trust_domains_own_id_is_refused_as_an_identity_to_match(where: str) -> None:
    """No peer may present ``spiffe://mesh.local`` (a leaf's ID has a path, X509-SVID
    5.2, refused at every handshake since 2026-12-07): a rule naming it matched nothing
    and loaded silently."""
    document = copy.deepcopy(VALID)
    if where == "policy":
        document["listeners"]["inbound"][0]["policies"][0]["identity"] = "spiffe://mesh.local"
        field = "listeners.inbound[0].policies[0].identity"
    else:
        document["clusters"][0]["server_identities"] = ["spiffe://mesh.local"]
        field = "clusters[0].server_identities[0]"
    assert error_of(document) == (
        f"sidecar.yaml: {field}: spiffe://mesh.local names a trust domain, not a workload:"
        " no peer can present it (give a workload's ID, or a pattern such as"
        " 'spiffe://mesh.local/*')"
    )


def test_a_drain_minimum_is_read_and_bounded_by_the_grace_period() -> None:
    """``drain.min_duration`` (Istio's terminationDrainDuration) defaults to none, and
    one longer than the grace period, which bounds the whole drain, is a one-line error."""
    assert load(VALID).drain.min_duration == 0.0
    document = copy.deepcopy(VALID)
    document["drain"] = {"grace_period": "5s", "min_duration": "2s"}
    drain = load(document).drain
    assert (drain.grace_period, drain.min_duration) == (5.0, 2.0)
    document["drain"] = {"min_duration": "11s"}  # (the grace period's default: 10 s)
    assert error_of(document) == (
        f"{SOURCE}: drain.min_duration: 11s is longer than drain.grace_period (10s),"
        " which bounds the whole drain"
    )
