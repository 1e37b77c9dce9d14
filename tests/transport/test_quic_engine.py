"""The QUIC engine interface (:mod:`quicmesh.transport.quic.engine`) and its registry."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from quic_helpers import require_engine

from quicmesh import DevCA
from quicmesh._aioquic import MeshQuicConnection
from quicmesh.errors import ConfigError
from quicmesh.transport.base import (
    BUILT_IN_DEFAULT_ENGINE,
    DEFAULT_ENGINE_VARIABLE,
    default_quic_engine,
)
from quicmesh.transport.quic import QuicTransport, engine, native_engine
from quicmesh.transport.quic.aioquic_engine import AioquicEngine

CA = DevCA()
IDENTITY = CA.issue("spiffe://mesh.local/ns/default/sa/client")


@pytest.fixture
def registry() -> Iterator[None]:
    saved = dict(engine._ENGINES)
    yield
    engine._ENGINES.clear()
    engine._ENGINES.update(saved)


def test_the_default_engine_is_native_unless_the_environment_names_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_engine("native")
    monkeypatch.delenv(DEFAULT_ENGINE_VARIABLE, raising=False)
    assert default_quic_engine() == BUILT_IN_DEFAULT_ENGINE == "native"
    transport = QuicTransport(identity=IDENTITY, trust=CA.trust_bundle)
    assert isinstance(transport.engine, native_engine.NativeEngine)
    assert transport.engine.name == "native" and transport.engine.io == "socket"
    monkeypatch.setenv(DEFAULT_ENGINE_VARIABLE, "aioquic")
    assert default_quic_engine() == "aioquic"
    transport = QuicTransport(identity=IDENTITY, trust=CA.trust_bundle)
    assert isinstance(transport.engine, AioquicEngine)
    assert transport.engine.name == "aioquic" and transport.engine.io == "datagrams"
    assert "aioquic" in engine.engine_names()
    explicit = QuicTransport(identity=IDENTITY, trust=CA.trust_bundle, engine="native")
    assert explicit.engine.name == "native"


FALLBACK = """
import logging, sys
sys.modules["quicmesh._native"] = None  # the extension is not built: importing it fails
logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s")
from quicmesh import DevCA
from quicmesh.sidecar.config import parse_config
from quicmesh.transport.base import default_quic_engine
from quicmesh.transport.quic import QuicTransport
ca = DevCA()
identity = ca.issue("spiffe://mesh.local/ns/default/sa/client")
print("default", default_quic_engine(), default_quic_engine())
print("transport", QuicTransport(identity=identity, trust=ca.trust_bundle).engine.name)
config = parse_config(sys.stdin.read(), source="sidecar.yaml")
print("config", config.clusters[0].engine, config.inbound[0].engine)
"""

FALLBACK_CONFIG = """
node: {name: a, identity: "spiffe://mesh.local/ns/default/sa/a"}
tls: {ca_dir: ca}
admin: {address: "127.0.0.1:15000"}
listeners:
  inbound:
    - {name: mesh, address: "127.0.0.1:15008", transports: [quic], destinations: ["127.0.0.1:9080"]}
clusters:
  - {name: reviews, transport: quic, target: "127.0.0.1:9080", endpoints: ["127.0.0.1:15008"]}
"""


def _without_the_extension(*, variable: str | None) -> subprocess.CompletedProcess[str]:
    """:data:`FALLBACK` run on :data:`FALLBACK_CONFIG` as on a machine without
    ``quicmesh._native``, with ``QUICMESH_QUIC_ENGINE`` set to ``variable`` (None:
    unset); it must succeed."""
    env = {k: v for k, v in os.environ.items() if k != DEFAULT_ENGINE_VARIABLE}
    if variable is not None:
        env[DEFAULT_ENGINE_VARIABLE] = variable
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK],
        input=FALLBACK_CONFIG,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_without_the_extension_the_default_falls_back_to_aioquic_logged_once() -> None:
    """A machine without Rust: no ``quicmesh._native``; QuicTransport() and a sidecar
    config without ``engine`` run on aioquic, and the fallback is logged once."""
    done = _without_the_extension(variable=None)
    assert done.stdout.splitlines() == [
        "default aioquic aioquic",
        "transport aioquic",
        "config aioquic aioquic",
    ]
    logged = [line for line in done.stderr.splitlines() if "QUIC engine is not built" in line]
    assert len(logged) == 1 and logged[0].startswith("LOG INFO "), done.stderr


def test_native_named_by_the_environment_without_the_extension_is_a_warning() -> None:
    """QUICMESH_QUIC_ENGINE=native on a machine without the extension ran aioquic with a
    note below every log level a user sees; a WARNING now, once (still aioquic: refusing
    refused h2-only configurations and the benchmarks' --help)."""
    done = _without_the_extension(variable="native")
    assert done.stdout.splitlines()[0] == "default aioquic aioquic"
    logged = [line for line in done.stderr.splitlines() if "QUIC engine is not built" in line]
    assert len(logged) == 1, done.stderr
    assert logged[0].startswith("LOG WARNING QUICMESH_QUIC_ENGINE=native, but "), logged


def test_an_unknown_engine_in_the_environment_is_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(FALLBACK_CONFIG)
    for command in (["bench", "hol", "--help"], ["sidecar", "--config", str(config), "--check"]):
        done = subprocess.run(
            ["quicmesh", *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, DEFAULT_ENGINE_VARIABLE: "quiche"},
        )
        assert done.returncode != 0
        assert done.stderr.strip().splitlines() == [
            f"quicmesh {command[0]}: environment: QUICMESH_QUIC_ENGINE='quiche' is not a "
            "QUIC engine (one of aioquic, native)"
        ], done.stderr


def test_unknown_engine_is_a_one_line_error_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError) as raised:
        QuicTransport(identity=IDENTITY, trust=CA.trust_bundle, engine="quiche")
    message = str(raised.value)
    assert "\n" not in message
    assert "'quiche'" in message and "valid engines are aioquic, native" in message


def test_aioquic_connections_implement_the_engine_interface() -> None:
    transport = QuicTransport(identity=IDENTITY, trust=CA.trust_bundle, engine="aioquic")
    quic = transport.engine.connect(
        transport.engine_limits(),
        engine.EngineTls(identity=IDENTITY, trust=CA.trust_bundle),
        ("127.0.0.1", 4433),
    )
    assert isinstance(quic, MeshQuicConnection)
    assert isinstance(quic, engine.DatagramConnection)
    assert quic.is_client and quic.log_id == quic.host_cid.hex()
    assert set(engine.ENGINE_STATS) <= set(quic.stats())
    assert quic.stats()["packets_lost"] == 0
    assert "bbr" in transport.engine.congestion_controls()


class _DatagramEngine:
    name = "datagram-test"
    io = "datagrams"


def test_a_registered_engine_is_found_by_name(registry: None) -> None:
    engine.register_engine("datagram-test", _DatagramEngine)  # type: ignore[arg-type]
    assert "datagram-test" in engine.engine_names()
    assert isinstance(engine.get_engine("datagram-test"), _DatagramEngine)
    # The transport runs aioquic as its datagram engine, and says so for another one.
    with pytest.raises(ConfigError, match="only datagram engine"):
        QuicTransport(identity=IDENTITY, trust=CA.trust_bundle, engine="datagram-test")


def test_native_without_the_extension_is_a_one_line_error_saying_how_to_build_it(
    registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine._ENGINES.pop("native", None)
    monkeypatch.setattr(native_engine, "_NATIVE", None)
    with pytest.raises(ConfigError) as raised:
        QuicTransport(identity=IDENTITY, trust=CA.trust_bundle, engine="native")
    message = str(raised.value)
    assert "\n" not in message
    assert "not built" in message and "pip install -e ." in message and "aioquic" in message
    assert "native" not in engine.engine_names()


def test_native_engine_is_registered_and_its_connections_are_socket_connections() -> None:
    require_engine("native")
    assert "native" in engine.engine_names()
    transport = QuicTransport(identity=IDENTITY, trust=CA.trust_bundle, engine="native")
    assert isinstance(transport.engine, native_engine.NativeEngine)
    assert transport.engine.io == "socket"
    assert transport.engine.congestion_controls() == ["bbr", "cubic", "reno"]

    async def main() -> None:
        quic = transport.engine.connect(
            transport.engine_limits(),
            engine.EngineTls(identity=IDENTITY, trust=CA.trust_bundle),
            ("127.0.0.1", 9),
        )
        assert isinstance(quic, engine.SocketConnection)
        assert not isinstance(quic, engine.DatagramConnection)
        assert quic.is_client and not quic.early and quic.resumed_identity() is None
        assert set(engine.ENGINE_STATS) <= set(quic.stats())
        quic.close()

    asyncio.run(main())


def test_native_engine_refuses_an_unknown_congestion_control() -> None:
    """When the transport is built (until 2026-12-07 at connect;
    test_option_checks.py has both engines)."""
    require_engine("native")
    with pytest.raises(ConfigError, match="not 'vegas'"):
        QuicTransport(
            identity=IDENTITY, trust=CA.trust_bundle, engine="native", congestion_control="vegas"
        )
