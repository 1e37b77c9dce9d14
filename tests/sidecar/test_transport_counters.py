"""The sidecar reads a transport's counters through the interface (``Transport.counters``):
an inbound listener's ``/stats`` view and ``/metrics`` carry every key its QUIC
transport counts, the admission events included."""

from __future__ import annotations

import asyncio
import copy
import random
import socket
from pathlib import Path
from typing import Any

import yaml

from quicmesh import DevCA
from quicmesh.sidecar.config import parse_config
from quicmesh.sidecar.flows import FlowTracker
from quicmesh.sidecar.inbound import InboundListener
from quicmesh.sidecar.launch import free_port, metric, parse_metrics
from quicmesh.sidecar.metrics import _ADMISSION_EVENTS, Metrics
from quicmesh.sidecar.stats import ListenerStats
from quicmesh.transport._admission import ADMISSION_COUNTERS

CONFIG: dict[str, Any] = {
    "node": {"name": "a", "identity": "spiffe://mesh.local/ns/default/sa/a"},
    "tls": {"ca_dir": "ca"},
    "admin": {"address": "127.0.0.1:15000"},
    "listeners": {
        "inbound": [
            {
                "name": "mesh",
                "transports": ["quic"],
                "destinations": ["127.0.0.1:9080"],
            }
        ]
    },
}


def forged_initial(rng: random.Random, size: int = 1200) -> bytes:
    """A version-1 Initial header whose payload decrypts to nothing."""
    head = bytes([0xC3]) + (1).to_bytes(4, "big")
    head += bytes([8]) + rng.randbytes(8) + bytes([8]) + rng.randbytes(8) + b"\x00"
    remaining = size - len(head) - 2
    return head + (remaining | 0x4000).to_bytes(2, "big") + rng.randbytes(remaining)


def test_metrics_export_every_admission_event_of_the_transport() -> None:
    assert _ADMISSION_EVENTS == ADMISSION_COUNTERS


def test_inbound_listener_view_carries_the_quic_admission_counters(tmp_path: Path) -> None:
    document = copy.deepcopy(CONFIG)
    document["listeners"]["inbound"][0]["address"] = f"127.0.0.1:{free_port()}"
    config = parse_config(yaml.safe_dump(document), source="s.yaml", base_dir=tmp_path)
    ca = DevCA()
    identity = ca.issue("spiffe://mesh.local/ns/default/sa/a")

    async def main() -> None:
        stats = ListenerStats("mesh", "inbound")
        listener = InboundListener(
            config.inbound[0], identity, ca.trust_bundle, stats, FlowTracker(), lambda _: None
        )
        await listener.start()
        try:
            (transport,) = listener._transports
            address = listener._listeners[0].address
            rng = random.Random(3)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for _ in range(20):
                    sock.sendto(forged_initial(rng), address)
            while transport.counters["initials_undecryptable"] < 5:
                await asyncio.sleep(0.01)
            view: Any = stats.to_dict()
            assert view["quic"]["initials_undecryptable"] >= 5
            assert view["quic"]["tickets_issued"] == 0
            snapshot = {
                "node": "a",
                "ready": True,
                "draining": False,
                "reloads": {},
                "listeners": {"mesh": view},
                "clusters": {},
            }
            samples = parse_metrics(Metrics(lambda: snapshot).exposition().decode())
            exported = metric(
                samples, "quicmesh_listener_quic_admission_total", event="initials_undecryptable"
            )
            assert exported == view["quic"]["initials_undecryptable"]
        finally:
            listener.close()
            await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))
