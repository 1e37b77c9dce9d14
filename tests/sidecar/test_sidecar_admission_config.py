"""Issue 13: the inbound listener's QUIC admission keys (Retry, half-open caps,
handshake timeout, stateless reset key) load, reach the transport, and are
refused with a one-line error naming the field when wrong."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from quicmesh import ConfigError, DevCA, QuicTransport
from quicmesh.sidecar.config import parse_config
from quicmesh.sidecar.inbound import inbound_transport

BASE: dict[str, Any] = {
    "node": {"name": "a", "identity": "spiffe://mesh.local/ns/default/sa/a"},
    "tls": {"ca_dir": "ca"},
    "admin": {"address": "127.0.0.1:15000"},
    "listeners": {
        "inbound": [
            {
                "name": "mesh",
                "address": "127.0.0.1:15008",
                "transports": ["quic"],
                "destinations": ["127.0.0.1:9080"],
            }
        ]
    },
}


def _load(base_dir: Path, **inbound: Any) -> Any:
    document = copy.deepcopy(BASE)
    document["listeners"]["inbound"][0].update(inbound)
    return parse_config(yaml.safe_dump(document), source="s.yaml", base_dir=base_dir)


def test_admission_keys_reach_the_quic_transport(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        retry="always",
        retry_threshold=8,
        max_half_open=100,
        max_half_open_per_source=10,
        handshake_timeout="3s",
        stateless_reset_key="reset.key",
        max_stream_rate=250,
    ).inbound[0]
    assert config.stateless_reset_key == str(tmp_path / "reset.key")
    ca = DevCA()
    identity = ca.issue("spiffe://mesh.local/ns/default/sa/a")
    transport = inbound_transport("quic", identity, ca.trust_bundle, 64, config)
    assert isinstance(transport, QuicTransport)
    assert transport.admission.retry == "always"
    assert transport.admission.max_half_open_per_source == 10
    assert transport.admission.handshake_timeout == 3.0
    assert transport.stream_rates.rate == 250
    assert stat.S_IMODE(os.stat(tmp_path / "reset.key").st_mode) == 0o600
    again = inbound_transport("quic", identity, ca.trust_bundle, 64, config)
    assert isinstance(again, QuicTransport)
    assert again.stateless_reset_key == transport.stateless_reset_key


def test_defaults_protect() -> None:
    config = _load(Path("/etc/q")).inbound[0]
    assert (config.retry, config.max_half_open, config.handshake_timeout) == ("auto", 1024, 10.0)
    assert (config.max_stream_rate, config.max_connections_per_identity) == (1000, 256)
    assert config.denied_stream_rate == 10
    assert (config.max_buffered_per_connection, config.max_buffered_total) == (32, 1024)
    assert config.overload_max_loop_lag == 0.05


@pytest.mark.parametrize(("value", "seconds"), [("20ms", 0.02), ("1s", 1.0), ("0s", 0.0)])
def test_the_loop_lag_threshold_is_a_duration_and_zero_turns_it_off(
    value: str, seconds: float
) -> None:
    assert _load(Path("/etc/q"), overload_max_loop_lag=value).inbound[0].overload_max_loop_lag == (
        seconds
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("retry", "sometimes", "retry"),
        ("max_half_open", 0, "max_half_open"),
        ("handshake_timeout", "-1s", "handshake_timeout"),
        ("max_stream_rate", 0, "max_stream_rate"),
        ("denied_stream_rate", 0, "denied_stream_rate"),
        ("denied_stream_rate", "few", "denied_stream_rate"),
        ("max_connections_per_identity", 0, "max_connections_per_identity"),
        ("max_buffered_per_connection", "lots", "max_buffered_per_connection"),
        ("max_buffered_total", -5, "max_buffered_total"),
        ("overload_max_loop_lag", "soon", "overload_max_loop_lag"),
        ("overload_max_loop_lag", "-5ms", "overload_max_loop_lag"),
    ],
)
def test_bad_values_name_the_field(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(Path("/etc/q"), **{key: value})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_quic_keys_on_a_tcp_listener_are_refused() -> None:
    with pytest.raises(ConfigError, match="quic only"):
        _load(Path("/etc/q"), transports=["h2"], retry="always")


@pytest.mark.parametrize("transports", [["h2"], ["tcp"]])
@pytest.mark.parametrize("value", ["10ms", "0s"])
def test_the_loop_lag_threshold_on_a_listener_without_quic_is_refused(
    transports: list[str], value: str
) -> None:
    """Its action cuts QUIC stream credit, which H2 and TCP do not have: it was accepted
    there without effect, where max_stream_rate and the other QUIC keys are refused."""
    with pytest.raises(ConfigError) as info:
        _load(Path("/etc/q"), transports=transports, overload_max_loop_lag=value)
    assert str(info.value) == (
        "s.yaml: listeners.inbound[0].overload_max_loop_lag: applies to listeners serving quic only"
    )


def test_the_loop_lag_threshold_on_a_listener_serving_quic_and_h2_is_taken() -> None:
    config = _load(Path("/etc/q"), transports=["quic", "h2"], overload_max_loop_lag="20ms")
    assert config.inbound[0].overload_max_loop_lag == 0.02
