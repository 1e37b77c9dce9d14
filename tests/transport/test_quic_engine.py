"""The QUIC engine interface (:mod:`quicmesh.transport.quic.engine`) and its registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from quicmesh import DevCA
from quicmesh._aioquic import MeshQuicConnection
from quicmesh.errors import ConfigError
from quicmesh.transport.quic import QuicTransport, engine
from quicmesh.transport.quic.aioquic_engine import AioquicEngine

CA = DevCA()
IDENTITY = CA.issue("spiffe://mesh.local/ns/default/sa/client")


@pytest.fixture
def registry() -> Iterator[None]:
    saved = dict(engine._ENGINES)
    yield
    engine._ENGINES.clear()
    engine._ENGINES.update(saved)


def test_aioquic_is_the_default_engine() -> None:
    transport = QuicTransport(identity=IDENTITY, trust=CA.trust_bundle)
    assert isinstance(transport.engine, AioquicEngine)
    assert transport.engine.name == "aioquic" and transport.engine.io == "datagrams"
    assert "aioquic" in engine.engine_names()


def test_unknown_engine_is_a_one_line_error_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError) as raised:
        QuicTransport(identity=IDENTITY, trust=CA.trust_bundle, engine="quiche")
    message = str(raised.value)
    assert "\n" not in message
    assert "'quiche'" in message and "aioquic" in message


def test_aioquic_connections_implement_the_engine_interface() -> None:
    transport = QuicTransport(identity=IDENTITY, trust=CA.trust_bundle)
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


class _SocketEngine:
    name = "socket-test"
    io = "socket"


def test_a_registered_engine_is_found_by_name(registry: None) -> None:
    engine.register_engine("socket-test", _SocketEngine)  # type: ignore[arg-type]
    assert "socket-test" in engine.engine_names()
    assert isinstance(engine.get_engine("socket-test"), _SocketEngine)
    # The asyncio driver runs datagram engines only, and says so.
    with pytest.raises(ConfigError, match="owns its sockets"):
        QuicTransport(identity=IDENTITY, trust=CA.trust_bundle, engine="socket-test")
