"""The default congestion control follows the host's TCP (``net.ipv4.tcp_congestion_control``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quicmesh import DevCA, QuicTransport
from quicmesh.congestion import (
    CONGESTION_CONTROLS,
    congestion_control_like,
    default_congestion_control,
)
from quicmesh.congestion.host import HOST_TCP_SETTING
from quicmesh.sidecar.config import ClusterConfig, parse_config

CA = DevCA()
IDENTITY = CA.issue("spiffe://mesh.local/ns/default/sa/a")

CONFIG = """
node: {name: a, identity: spiffe://mesh.local/ns/default/sa/a}
tls: {ca_dir: ca}
admin: {address: 127.0.0.1:15000}
listeners:
  outbound: [{name: web, address: 127.0.0.1:15001, cluster: web}]
clusters:
  - {name: web, transport: quic, target: 127.0.0.1:80, endpoints: [127.0.0.1:15008]}
"""


@pytest.mark.parametrize(
    "tcp, quic",
    [("bbr\n", "bbr"), ("bbr2", "bbr"), ("cubic\n", "cubic"), ("reno", "reno"),
     ("vegas", "cubic"), ("dctcp", "cubic"), ("", "cubic"), (" BBR ", "bbr")],
)  # fmt: skip
def test_like_with_like(tcp: str, quic: str) -> None:
    assert congestion_control_like(tcp) == quic


@given(st.text(max_size=40))
def test_any_setting_maps_to_a_quic_controller(text: str) -> None:
    assert congestion_control_like(text) in CONGESTION_CONTROLS


def test_reads_the_setting_and_falls_back_to_cubic(tmp_path: Path) -> None:
    setting = tmp_path / "tcp_congestion_control"
    setting.write_text("reno\n")
    assert default_congestion_control(setting) == "reno"
    assert default_congestion_control(tmp_path / "missing") == "cubic"


def test_transport_and_sidecar_defaults_follow_this_host() -> None:
    expected = congestion_control_like(HOST_TCP_SETTING.read_text())
    transport = QuicTransport(identity=IDENTITY, trust=CA.trust_bundle)
    assert transport.congestion_control == expected
    assert transport.configuration(is_client=True).congestion_control_algorithm == expected
    config = parse_config(CONFIG, source="a.yaml")
    assert config.clusters[0].congestion_control == expected
    assert ClusterConfig("c", "quic", "127.0.0.1:80", ()).congestion_control == expected
    explicit = parse_config(
        CONFIG.replace("transport: quic", "transport: quic, congestion_control: reno"),
        source="a.yaml",
    )
    assert explicit.clusters[0].congestion_control == "reno"


PROBE = """
from quicmesh import DevCA, QuicTransport
from quicmesh.sidecar.config import parse_config
ca = DevCA()
transport = QuicTransport(identity=ca.issue("spiffe://mesh.local/x"), trust=ca.trust_bundle)
config = parse_config(open(0).read(), source="a.yaml")
print(transport.congestion_control, config.clusters[0].congestion_control)
"""


@pytest.mark.netns
@pytest.mark.parametrize("tcp", ["reno", "bbr"])  # this kernel refuses cubic in a netns
def test_defaults_follow_the_namespace_tcp_setting(tcp: str) -> None:
    # A fresh network namespace has its own net.ipv4.tcp_congestion_control.
    script = f'echo {tcp} > {HOST_TCP_SETTING} && exec "$0" -c "$1"'
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", script, sys.executable, PROBE],
        input=CONFIG, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [tcp, tcp]
