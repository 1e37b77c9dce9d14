"""Every transport checks its options when it is built, and the stream its writes.

Found by a review: ``QuicTransport(congestion_control="vegas")`` built, then failed
with aioquic's bare Exception at the first handshake (a listener logged one per
Initial); ``H2Transport(max_streams=0)`` or ``TcpTransport(receive_window=0)`` built
and hung the first flow; ``high_water="big"`` was a TypeError from the first write;
``MeshStream.write("text")`` raised only after accepting the stream and counting the
bytes; TLS-over-TCP's ``streams_opened`` left out refused and reset streams.
"""

from __future__ import annotations

import array
import re
from typing import Any

import pytest
from quic_helpers import require_engine
from test_contract import MESH, TARGET, TRANSPORT_NAMES, echo, run

import quicmesh
from quicmesh import ConfigError, MeshStream
from quicmesh.transport.base import transport_registry
from quicmesh.transport.quic.engine import get_engine


def build(name: str, **options: Any) -> quicmesh.Transport:
    return transport_registry().build(
        name, identity=MESH.client, trust=MESH.ca.trust_bundle, options=options
    )


BAD_OPTIONS = [
    # QUIC (the engine the host defaults to)
    ("quic", "congestion_control", "vegas"),
    ("quic", "congestion_control", 5),
    ("quic", "idle_timeout", "1s"),
    ("quic", "keepalive_interval", "1"),
    ("quic", "dead_after", [10]),
    ("quic", "max_probe_timeouts", 1.5),
    ("quic", "max_stream_rate", "fast"),
    ("quic", "max_early_data", -1),
    ("quic", "rebind_after_ptos", 0),
    ("quic", "receive_batch", "4"),
    ("quic", "max_datagram_size", "1200"),
    ("quic", "ack_eliciting_threshold", 1.0),
    ("quic", "send_window", 65536.5),
    ("quic", "mtu_discovery", "yes"),
    ("quic", "stateless_reset_key", 12345),
    ("quic", "qlog_dir", 3),
    ("quic", "engine", 3),
    ("quic", "engine", "bogus"),
    # HTTP/2
    ("h2", "high_water", "big"),
    ("h2", "high_water", -5),
    ("h2", "max_streams", 0),
    ("h2", "max_streams", "10"),
    ("h2", "stream_window", 0),
    ("h2", "stream_window", 2**31),
    ("h2", "connection_window", 1.5),
    ("h2", "handshake_timeout", 0),
    ("h2", "handshake_timeout", "10"),
    ("h2", "max_stream_rate", "fast"),
    # TLS over TCP
    ("tcp", "high_water", "big"),
    ("tcp", "high_water", -5),
    ("tcp", "receive_window", 0),
    ("tcp", "handshake_timeout", 0),
    ("tcp", "handshake_timeout", float("nan")),
    # auto
    ("auto", "broken_backoff", "x"),
    ("auto", "max_broken_backoff", "x"),
    ("auto", "fallback_delay", "x"),
    ("auto", "fallback_delay", float("inf")),
]


@pytest.mark.parametrize(("name", "option", "value"), BAD_OPTIONS)
def test_a_bad_option_is_a_one_line_config_error_naming_it(
    name: str, option: str, value: object
) -> None:
    with pytest.raises(ConfigError) as raised:
        build(name, **{option: value})
    message = str(raised.value)
    assert option in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("option", "value"),
    [("quic", {"max_datagram_size": 1400}), ("h2", {"max_streams": 8})],
)
def test_auto_refuses_a_transport_of_the_wrong_kind(option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{option} must be a "):
        quicmesh.AutoTransport(identity=MESH.client, trust=MESH.ca.trust_bundle, **{option: value})


@pytest.mark.parametrize("engine", ["aioquic", "native"])
@pytest.mark.parametrize("controller", ["vegas", "newreno", "BBR", ""])
def test_a_congestion_control_the_engine_does_not_have_is_refused_when_built(
    engine: str, controller: str
) -> None:
    """Both engines take the same names (``newreno`` was quinn's name, taken by the native
    engine only; aioquic raised a bare Exception at the handshake)."""
    require_engine(engine)
    with pytest.raises(ConfigError) as raised:
        quicmesh.QuicTransport(
            identity=MESH.client,
            trust=MESH.ca.trust_bundle,
            engine=engine,
            congestion_control=controller,
        )
    message = str(raised.value)
    assert message.startswith("congestion_control must be one of bbr, cubic, reno"), message
    assert engine in message and repr(controller) in message


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_every_congestion_control_an_engine_lists_builds(engine: str) -> None:
    require_engine(engine)
    for controller in get_engine(engine).congestion_controls():
        transport = quicmesh.QuicTransport(
            identity=MESH.client,
            trust=MESH.ca.trust_bundle,
            engine=engine,
            congestion_control=controller,
        )
        assert transport.congestion_control == controller


def test_the_registry_names_the_engine_option_an_unknown_engine_came_from() -> None:
    """(``QuicTransport(engine=...)`` itself raises the documented ValueError.)"""
    with pytest.raises(ConfigError) as raised:
        build("quic", engine="bogus")
    assert str(raised.value).startswith("quic transport: engine: unknown QUIC engine 'bogus'")


@pytest.mark.parametrize("name", TRANSPORT_NAMES)
def test_writing_a_str_is_a_type_error_before_anything_is_accepted_or_counted(
    name: str,
) -> None:
    async def handler(stream: MeshStream) -> None:
        with pytest.raises(TypeError, match="bytes-like object, not 'str'"):
            stream.write("not accepted")  # type: ignore[arg-type]
        stream.refuse(403, "the write did not accept the stream")

    async def main() -> None:
        server = MESH.transport(name, identity=MESH.server)
        listener = await server.listen(("127.0.0.1", 0), handler)
        conn = await MESH.transport(name).connect(listener.address)
        with pytest.raises(quicmesh.StreamRefused) as refused:
            await conn.open_stream(TARGET)
        assert refused.value.status == 403
        await conn.aclose()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("name", TRANSPORT_NAMES)
def test_write_counts_bytes_and_refuses_other_types_without_counting(name: str) -> None:
    async def main() -> None:
        server = MESH.transport(name, identity=MESH.server)
        listener = await server.listen(("127.0.0.1", 0), echo)
        conn = await MESH.transport(name).connect(listener.address)
        stream = await conn.open_stream(TARGET)
        for wrong in ("text", 5, None):
            with pytest.raises(TypeError):
                stream.write(wrong)  # type: ignore[arg-type]
        assert stream.bytes_sent == 0
        words = array.array("H", [1, 2, 3])  # 3 items, 6 bytes
        stream.write(memoryview(words))
        stream.write(bytearray(b"ab"))
        stream.write_eof()
        assert await stream.read() == words.tobytes() + b"ab"
        assert stream.bytes_sent == 8
        await conn.aclose()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("name", TRANSPORT_NAMES)
def test_streams_opened_counts_every_connect_sent_on_every_transport(name: str) -> None:
    """3 refused, 2 echoed, 1 reset by the peer: 6, on TLS-over-TCP too (which said 2),
    and still 6 once its flows' connections closed."""

    async def handler(stream: MeshStream) -> None:
        if stream.target.host.startswith("reset."):
            stream.accept()
            stream.abort()
            return
        await echo(stream)

    async def main() -> None:
        server = MESH.transport(name, identity=MESH.server)
        listener = await server.listen(
            ("127.0.0.1", 0), handler, authorize=lambda _peer, target: "deny." not in target
        )
        conn = await MESH.transport(name).connect(listener.address)
        for target in ["deny.svc:1"] * 3 + [TARGET] * 2 + ["reset.svc:1"]:
            try:
                stream = await conn.open_stream(target)
                stream.write_eof()
                await stream.read()
            except quicmesh.TunnelError:
                pass
        assert conn.stats()["streams_opened"] == 6
        await conn.aclose()
        assert conn.stats()["streams_opened"] == 6
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("name", ["quic", "h2", "tcp", "auto"])
@pytest.mark.parametrize(
    ("which", "value", "named"),
    [
        ("trust", MESH.ca, "DevCA (its trust_bundle?)"),
        ("trust", None, "NoneType"),
        ("identity", None, "NoneType"),
        ("identity", "client.pem", "str"),
    ],
)
def test_an_identity_or_trust_of_the_wrong_kind_is_refused_when_built(
    name: str, which: str, value: Any, named: str
) -> None:
    """A review (2026-12-07): ``H2Transport(identity=..., trust=ca)`` (the CA where its
    ``trust_bundle`` belongs) was built, then failed at ``listen`` with an internal
    ``AttributeError: 'DevCA' object has no attribute 'pem'``."""
    arguments: dict[str, Any] = {"identity": MESH.client, "trust": MESH.ca.trust_bundle}
    arguments[which] = value
    with pytest.raises(
        ConfigError, match=rf"^{which} must be a quicmesh\.\w+ .*not {re.escape(named)}$"
    ):
        quicmesh.TRANSPORTS[name](**arguments)
    transport = build(name)
    with pytest.raises(ConfigError, match=rf"^{which} must be"):
        transport.set_identity(**arguments)
