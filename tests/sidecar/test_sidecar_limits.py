"""Issue 13, finding 5: inbound stream limits and the overload manager.

One peer identity may hold at most ``max_streams_per_identity`` inbound streams,
all peers ``max_streams_total``; past 90 % of a watched resource (memory,
descriptors) new streams are refused with 503, past 98 % the newest flows are
reset. Refusals happen before any destination connection is opened and are
counted for ``/metrics``. Real QUIC on loopback against the inbound listener.
"""

from __future__ import annotations

import asyncio
import copy
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from quic_helpers import CA, CLIENT, SERVER, run

import quicmesh
from quicmesh import QuicTransport
from quicmesh.sidecar.config import parse_config
from quicmesh.sidecar.flows import FlowTracker
from quicmesh.sidecar.inbound import InboundListener
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


async def _inbound(**limits: Any) -> tuple[InboundListener, Any]:
    listener = InboundListener(
        _config(**limits),
        SERVER,
        CA.trust_bundle,
        ListenerStats(name="mesh", kind="inbound"),
        FlowTracker(),
        lambda record: None,
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
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
        app.close()

    run(main())


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
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
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
