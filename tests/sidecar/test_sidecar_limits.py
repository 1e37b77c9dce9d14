"""Issue 13, finding 5: inbound stream limits and the overload manager.

One peer identity may hold at most ``max_streams_per_identity`` inbound streams,
all peers ``max_streams_total``; past 90 % of a watched resource (memory,
descriptors) new streams are refused with 503, past 98 % the newest flows are
reset. Refusals happen before any destination connection is opened and are
counted for ``/metrics``. Real QUIC on loopback against the inbound listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from quic_helpers import CA, CLIENT, SERVER, require_engine, run

import quicmesh
from quicmesh import QuicTransport
from quicmesh.sidecar import inbound
from quicmesh.sidecar.accesslog import FlowRecord, Outcome
from quicmesh.sidecar.config import parse_config
from quicmesh.sidecar.flows import FlowTracker
from quicmesh.sidecar.inbound import InboundListener, inbound_transport, receive_windows
from quicmesh.sidecar.overload import OverloadManager
from quicmesh.sidecar.stats import ListenerStats

BASE: dict[str, Any] = {
    "node": {"name": "b", "identity": SERVER.spiffe_id},
    "tls": {"ca_dir": "ca"},
    "admin": {"address": "127.0.0.1:15000"},
    "listeners": {
        "inbound": [
            {
                "name": "mesh",
                "address": "127.0.0.1:15008",
                "transports": ["quic"],
                "destinations": ["127.0.0.1:*"],
            }
        ]
    },
}


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _config(**inbound: Any) -> Any:
    document = copy.deepcopy(BASE)
    document["listeners"]["inbound"][0].update(inbound)
    document["listeners"]["inbound"][0]["address"] = f"127.0.0.1:{_free_udp_port()}"
    return parse_config(yaml.safe_dump(document), source="s.yaml", base_dir=Path(".")).inbound[0]


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _inbound(
    log: Callable[[FlowRecord], None] = lambda record: None, **limits: Any
) -> tuple[InboundListener, Any]:
    listener = InboundListener(
        _config(**limits),
        SERVER,
        CA.trust_bundle,
        ListenerStats(name="mesh", kind="inbound"),
        FlowTracker(),
        log,
    )
    await listener.start()
    address = listener._listeners[0].address
    return listener, address


def test_one_identity_cannot_hold_more_than_its_streams() -> None:
    async def main() -> None:
        app = await _echo_server()
        target = f"127.0.0.1:{app.sockets[0].getsockname()[1]}"
        listener, address = await _inbound(max_streams_per_identity=3)
        conn = await QuicTransport(identity=CLIENT, trust=CA.trust_bundle).connect(address)
        held = [await conn.open_stream(target) for _ in range(3)]
        with pytest.raises(quicmesh.StreamRefused) as refused:
            await conn.open_stream(target)
        assert refused.value.status == 503
        assert "max_streams_per_identity (3)" in str(refused.value)
        assert listener.overload.refusals["per_identity"] == 1
        # A held stream still works; once one ends, the identity may open another.
        held[0].write(b"ping")
        held[0].write_eof()
        assert await held[0].read() == b"ping"
        await held[0].wait_closed()
        await asyncio.wait_for(_until_streams(listener, 2), 10)
        again = await conn.open_stream(target)
        again.write(b"again")
        again.write_eof()
        assert await again.read() == b"again"
        for stream in held[1:]:
            stream.abort()
        await _close(listener, conn)
        app.close()

    run(main())


async def _close(listener: InboundListener, *conns: Any) -> None:
    """Close the client connections, then the listener, waiting for each."""
    for conn in conns:
        conn.close()
        await conn.wait_closed()
    listener.close()
    await listener.wait_closed()


async def _until_streams(listener: InboundListener, count: int) -> None:
    while listener.overload.streams > count:
        await asyncio.sleep(0.01)


def test_overloaded_listener_refuses_new_streams_with_503() -> None:
    async def main() -> None:
        app = await _echo_server()
        target = f"127.0.0.1:{app.sockets[0].getsockname()[1]}"
        # Fewer descriptors allowed than this process already has open: overloaded.
        listener, address = await _inbound(overload_max_descriptors=8)
        assert listener.overload.state == "shed"
        conn = await QuicTransport(identity=CLIENT, trust=CA.trust_bundle).connect(address)
        with pytest.raises(quicmesh.StreamRefused) as refused:
            await conn.open_stream(target)
        assert refused.value.status == 503 and "overloaded" in str(refused.value)
        assert listener.stats.to_dict()["overload"]["refusals"] == {"overloaded": 1}  # type: ignore[index]
        await _close(listener, conn)
        app.close()

    run(main())


def test_overload_states_follow_the_fullest_resource() -> None:
    manager = OverloadManager(
        max_streams_per_identity=2, max_streams_total=3, max_rss=1000, max_descriptors=100
    )
    assert manager.update(rss=500, descriptors=10) == "normal"
    assert manager.update(rss=500, descriptors=91) == "stop_accepting"
    assert manager.update(rss=985, descriptors=10) == "shed"
    assert manager.admit("a") is not None  # overloaded
    manager.update(rss=0, descriptors=0)
    assert manager.admit("a") is None and manager.admit("a") is None
    assert manager.admit("a") is not None  # per identity
    assert manager.admit("b") is None
    assert manager.admit("c") is not None  # total
    manager.release("a")
    assert manager.admit("c") is None
    assert dict(manager.refusals) == {"overloaded": 1, "per_identity": 1, "total": 1}


async def _until(condition: Any, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


async def _roundtrip(conn: Any, target: str) -> None:
    stream = await conn.open_stream(target)
    stream.write(b"ok")
    stream.write_eof()
    assert await asyncio.wait_for(stream.read(), 10) == b"ok"


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_one_identity_cannot_hold_more_than_its_connections(engine: str) -> None:
    require_engine(engine)

    async def main() -> None:
        app = await _echo_server()
        target = f"127.0.0.1:{app.sockets[0].getsockname()[1]}"
        listener, address = await _inbound(max_connections_per_identity=2, engine=engine)
        client = QuicTransport(identity=CLIENT, trust=CA.trust_bundle)
        conns = [await client.connect(address) for _ in range(3)]
        for conn in conns[:2]:
            await _roundtrip(conn, target)
        # The third connection's first stream is refused and the connection closed.
        with pytest.raises(quicmesh.StreamRefused) as refused:
            await conns[2].open_stream(target)
        assert refused.value.status == 503
        assert "max_connections_per_identity (2)" in str(refused.value)
        await _until(lambda: conns[2].is_closed)
        # Connections kept idle beyond the limit are closed by the sampler.
        idle = [await client.connect(address) for _ in range(2)]
        await _until(lambda: all(c.is_closed for c in idle))
        # The identity's first two connections carry on.
        for conn in conns[:2]:
            assert not conn.is_closed
            await _roundtrip(conn, target)
        assert listener.overload.refusals["connections_per_identity"] == 3
        await _close(listener, *conns)
        app.close()

    run(main())


def test_half_open_connections_do_not_count_against_an_identitys_connections() -> None:
    # max_connections_per_identity counts handshaken connections only: a half-open
    # one has no verified identity yet, and is bounded by max_half_open(_per_source).
    async def main() -> None:
        app = await _echo_server()
        target = f"127.0.0.1:{app.sockets[0].getsockname()[1]}"
        listener, address = await _inbound(max_connections_per_identity=1)
        flights = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(5):  # real first flights that never finish
                quic = QuicConnection(
                    configuration=QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
                )
                quic.connect(address, now=0.0)
                for data, _ in quic.datagrams_to_send(now=0.0):
                    flights.sendto(data, address)
            conn = await QuicTransport(identity=CLIENT, trust=CA.trust_bundle).connect(address)
            await _roundtrip(conn, target)
            listener._sample()  # the sampler's pass over connections per identity
            assert not conn.is_closed
            await _roundtrip(conn, target)
            assert listener.overload.refusals["connections_per_identity"] == 0
            conn.close()
            await conn.wait_closed()
        finally:
            flights.close()
            listener.close()
            await listener.wait_closed()
            app.close()

    run(main())


MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("cap_mib", "stream_window", "connection_window"),
    [(None, MIB, 16 * MIB), (4, MIB, 2 * MIB), (1, MIB // 2, MIB // 2), (0.01, 65536, 65536)],
)
def test_max_buffered_per_connection_sets_the_receive_windows(
    cap_mib: float | None, stream_window: int, connection_window: int
) -> None:
    """What one peer connection can make the listener buffer on the receive side
    is bounded by flow control: the QUIC and H2 receive windows are set to half
    of ``max_buffered_per_connection`` (default 32 MiB: the transports' own 16 MiB)."""
    if cap_mib is not None and cap_mib < 1:
        assert receive_windows(int(cap_mib * MIB)) == (stream_window, connection_window)
        return
    limits = {} if cap_mib is None else {"max_buffered_per_connection": cap_mib}
    config = _config(transports=["quic", "h2"], **limits)
    for name in ("quic", "h2"):
        transport: Any = inbound_transport(name, SERVER, CA.trust_bundle, 128, config)
        assert (transport.stream_window, transport.connection_window) == (
            stream_window,
            connection_window,
        )


async def _firehose_app() -> asyncio.Server:
    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"y" * 65536
        with contextlib.suppress(OSError):
            while True:
                writer.write(chunk)
                await writer.drain()

    return await asyncio.start_server(firehose, "127.0.0.1", 0)


def test_a_peer_that_stops_reading_gets_its_fullest_flows_reset() -> None:
    """A peer opens streams to a destination that sends without end and reads
    none of it: past ``max_buffered_per_connection`` the listener resets the
    connection's fullest flows (counted, logged once per 10 s)."""

    async def main() -> None:
        app = await _firehose_app()
        target = f"127.0.0.1:{app.sockets[0].getsockname()[1]}"
        listener, address = await _inbound(max_buffered_per_connection=1)
        # A connection window above all 32 stream windows: every stream is answered
        # (its response is not stuck behind the other flows' bytes), so the listener
        # holds a chunk or so of each flow, well past the 1 MiB (how much of a chunk
        # a stalled flow holds is how much its last read found).
        client = QuicTransport(identity=CLIENT, trust=CA.trust_bundle, connection_window=64 * MIB)
        conn = await client.connect(address)
        streams = []
        for _ in range(32):
            # The fullest flow may be one just opened (its response is behind the
            # others' bytes in the connection's window): reset before it is answered.
            with contextlib.suppress(quicmesh.StreamReset):
                streams.append(await conn.open_stream(target))
        await _until(lambda: listener.overload.buffer_resets > 0, 20)
        metrics = listener.stats.to_dict()["overload"]
        assert metrics["buffer_resets"] >= 1  # type: ignore[index]
        for stream in streams:
            stream.abort()
        await _close(listener, conn)
        app.close()

    run(main())


def test_policy_answers_are_remembered_within_a_bound_until_a_reload() -> None:
    """The inbound listener keeps its policy answers per (identity, destination): at
    most MAX_REMEMBERED_REFUSALS of them, and a new configuration starts afresh."""
    client = "spiffe://mesh.local/ns/default/sa/client"
    only_client = [{"identity": client, "destinations": ["127.0.0.1:*"]}]
    listener = InboundListener(
        _config(policies=only_client),
        SERVER,
        CA.trust_bundle,
        ListenerStats(name="mesh", kind="inbound"),
        FlowTracker(),
        lambda record: None,
    )
    config = listener.config
    assert listener._refusal(config, client, "127.0.0.1:80") is None
    assert listener._refusal(config, "spiffe://mesh.local/ns/x/sa/y", "127.0.0.1:80")
    for port in range(1, inbound.MAX_REMEMBERED_REFUSALS + 50):
        assert listener._refusal(config, client, f"127.0.0.1:{port}") is None
    assert len(listener._refusals) <= inbound.MAX_REMEMBERED_REFUSALS
    listener.config = _config(policies=[{"identity": client, "destinations": ["10.0.0.0/8:*"]}])
    assert listener._refusal(listener.config, client, "127.0.0.1:80")
    # An answer asked with a configuration that was replaced is not remembered.
    assert listener._refusal(config, client, "127.0.0.1:81") is None
    assert listener._refusal(listener.config, client, "127.0.0.1:81")


@pytest.mark.parametrize("splice", [True, False], ids=["engine-connects", "python-connects"])
def test_a_flow_the_peer_resets_while_its_destination_connects_ends_at_once(
    splice: bool,
) -> None:
    """A peer's RESET_STREAM while the sidecar is still connecting to the destination
    (one whose accept queue is full: the connect hangs) ends the flow then, logged as
    reset by the peer; it neither holds the destination's slot until
    ``connect_timeout`` nor is answered 502 and blamed on the destination."""
    require_engine("native")
    records: list[Any] = []

    async def main() -> None:
        with socket.socket() as full:
            full.bind(("127.0.0.1", 0))
            full.listen(0)
            queued = socket.create_connection(full.getsockname())  # fills the accept queue
            listener = InboundListener(
                _config(splice=splice, connect_timeout="60s"),
                SERVER,
                CA.trust_bundle,
                ListenerStats(name="mesh", kind="inbound"),
                FlowTracker(),
                records.append,
            )
            await listener.start()
            address = listener._listeners[0].address
            client = QuicTransport(identity=CLIENT, trust=CA.trust_bundle, engine="aioquic")
            conn: Any = await client.connect(address)
            target = f"127.0.0.1:{full.getsockname()[1]}"
            stream = await conn.open_stream(target, wait_response=False)
            while listener.stats.streams_active == 0:
                await asyncio.sleep(0.01)
            conn.quic.reset_stream(stream.stream_id, 0x10C)  # RESET_STREAM alone
            conn.h3_session.scheduler.activate(stream.stream_id)
            conn.transmit()
            while listener.stats.streams_active:  # (60 s before: the connect's timeout)
                await asyncio.sleep(0.01)
            await _close(listener, conn)
            queued.close()

    run(main(), timeout=30)
    (record,) = records
    assert record.outcome.value == "reset", record
    assert "reset by peer (error code 0x10c)" in record.reason, record.reason


def test_a_draining_listener_tells_its_connections_to_go_away() -> None:
    """Connections open when the drain begins hear a GOAWAY at once and their flows carry
    on; one made after it has its streams refused (503) and hears a GOAWAY with the
    first refusal, so that its peer opens no more flows on it."""

    async def main() -> None:
        app = await _echo_server()
        target = f"127.0.0.1:{app.sockets[0].getsockname()[1]}"
        listener, address = await _inbound()
        client = QuicTransport(identity=CLIENT, trust=CA.trust_bundle)
        before = await client.connect(address)
        held = await before.open_stream(target)
        listener.begin_drain()
        await _until(lambda: before.going_away)
        after = await client.connect(address)
        with pytest.raises(quicmesh.StreamRefused) as refused:
            await after.open_stream(target)
        assert refused.value.status == 503
        await _until(lambda: after.going_away)
        held.write(b"still")
        held.write_eof()
        assert await held.read() == b"still"
        await _close(listener, before, after)
        app.close()

    run(main())


def test_a_request_refused_before_the_listener_saw_it_is_an_access_log_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer's malformed CONNECT (a target without a port: 400 from the transport) is
    counted and logged as a refused flow, naming the peer and the status."""
    import quicmesh.tunnel.h3 as h3_session

    monkeypatch.setattr(
        h3_session,
        "connect_request_fields",
        lambda target, headers: [(b":method", b"CONNECT"), (b":authority", b"x.svc")],
    )
    records: list[FlowRecord] = []

    async def main() -> None:
        listener, address = await _inbound(records.append)
        conn = await QuicTransport(identity=CLIENT, trust=CA.trust_bundle).connect(address)
        with pytest.raises(quicmesh.StreamRefused):
            await conn.open_stream("x.svc:80")
        await _close(listener, conn)
        (record,) = records
        assert record.outcome is Outcome.REFUSED and record.reason.startswith("400 ")
        assert record.peer_identity == CLIENT.spiffe_id and record.direction == "inbound"
        assert listener.stats.outcomes["refused"] == 1

    run(main())
