"""Fixtures for the sidecar's end-to-end tests: a dev CA, an echo app, sidecar processes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from quicmesh.sidecar.launch import LOOPBACK, SidecarProcess, free_ports, held_port
from quicmesh.tls import DevCA

IDENTITY_A = "spiffe://mesh.local/ns/default/sa/productpage"
IDENTITY_B = "spiffe://mesh.local/ns/default/sa/reviews"
IDENTITY_OTHER = "spiffe://mesh.local/ns/default/sa/ratings"

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a saved development CA in ``ca/``."""
    path = tmp_path_factory.mktemp("sidecar")
    DevCA().save(path / "ca")
    return path


def addr(port: int) -> str:
    return f"{LOOPBACK}:{port}"


@contextlib.contextmanager
def dead_port() -> Iterator[int]:
    """A loopback port where nothing answers, held for the block: a TCP connect there is
    refused (bound, not listening) and a QUIC Initial draws ICMP port unreachable (the UDP
    socket bound there is connected elsewhere, so it takes no datagram from a client).
    A port merely freed (``free_port``) could meanwhile be given to a listener."""
    with held_port() as (tcp, udp):
        udp.connect((LOOPBACK, 9))
        yield int(tcp.getsockname()[1])


def b_config(workdir: Path, echo_port: int, **ports: int) -> dict[str, Any]:
    """Sidecar B: quic+h2 on ``mesh``, tcp on ``mesh_tcp``, and ``strict`` (only IDENTITY_OTHER)."""
    echo = addr(echo_port)
    return {
        "node": {"name": "b", "identity": IDENTITY_B},
        "tls": {"ca_dir": str(workdir / "ca")},
        "admin": {"address": addr(ports["admin"])},
        "drain": {"grace_period": "10s"},
        "listeners": {
            "inbound": [
                {
                    "name": "mesh",
                    "address": addr(ports["mesh"]),
                    "transports": ["quic", "h2"],
                    "destinations": [echo],
                    "policies": [{"identity": IDENTITY_A, "destinations": [echo]}],
                },
                {
                    "name": "mesh_tcp",
                    "address": addr(ports["mesh_tcp"]),
                    "transports": ["tcp"],
                    "destinations": [echo],
                },
                {
                    "name": "strict",
                    "address": addr(ports["strict"]),
                    "transports": ["quic"],
                    "destinations": [echo],
                    "policies": [{"identity": IDENTITY_OTHER, "destinations": [echo]}],
                },
            ]
        },
    }


class Mesh:
    """A running sidecar B and the ports of its listeners."""

    def __init__(self, workdir: Path, echo_port: int, name: str = "b") -> None:
        self.workdir = workdir
        self.echo_port = echo_port
        # Chosen together: free_port() twice may give the same number (a sidecar B that
        # then refused its own configuration failed every test of the module, once).
        names = ("admin", "mesh", "mesh_tcp", "strict")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.b = SidecarProcess(name, b_config(workdir, echo_port, **self.ports), workdir)

    def endpoint(self, transport: str) -> str:
        """B's tunnel address for a transport."""
        return addr(self.ports["mesh_tcp" if transport == "tcp" else "mesh"])

    def a_config(
        self,
        clusters: list[dict[str, Any]],
        listeners: dict[str, str] | None = None,
        **extra: Any,
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """A sidecar A with one outbound listener per cluster; returns config and ports."""
        *listening, admin = free_ports(len(clusters) + 1)
        ports = {c["name"]: port for c, port in zip(clusters, listening, strict=True)}
        config = {
            "node": {"name": "a", "identity": IDENTITY_A},
            "tls": {"ca_dir": str(self.workdir / "ca")},
            "admin": {"address": addr(admin)},
            "drain": {"grace_period": "10s"},
            "listeners": {
                "outbound": [
                    {"name": name, "address": addr(port), "cluster": name}
                    for name, port in ports.items()
                ]
            },
            "clusters": clusters,
            **extra,
        }
        return config, ports

    def cluster(self, name: str, transport: str, **options: Any) -> dict[str, Any]:
        """A cluster to B's echo destination."""
        config = {
            "name": name,
            "transport": transport,
            "target": addr(self.echo_port),
            "endpoints": [self.endpoint(transport)],
        }
        config.update(options)
        return config


@pytest.fixture(scope="module")
def mesh(workdir: Path, echo_port: int) -> Iterator[Mesh]:
    """A sidecar B shared by a test module."""
    m = Mesh(workdir, echo_port)
    m.b.start()
    m.b.wait_ready()
    yield m
    m.b.stop()


# -- clients ----------------------------------------------------------------------------


async def echo_flow(port: int, payload: bytes, chunk: int = 65536) -> bytes:
    """Send ``payload`` through a listener, half-close, and read everything back."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:

        async def send() -> None:
            for offset in range(0, len(payload), chunk):
                writer.write(payload[offset : offset + chunk])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        received = await reader.read(-1)
        await sender
        return received
    finally:
        writer.close()


class HeldFlow:
    """A flow that is established (first bytes echoed) and then held open."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sent = bytearray()

    @classmethod
    async def open(cls, port: int, hello: bytes = b"hello") -> HeldFlow:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        flow = cls(reader, writer)
        writer.write(hello)
        flow.sent += hello
        echoed = await asyncio.wait_for(reader.readexactly(len(hello)), 10)
        assert echoed == hello
        return flow

    async def finish(self, payload: bytes) -> bool:
        """Send the rest, half-close, and check everything came back."""
        self.writer.write(payload)
        self.sent += payload
        await self.writer.drain()
        self.writer.write_eof()
        rest = await asyncio.wait_for(self.reader.read(-1), 30)
        self.writer.close()
        return bytes(self.sent[5:]) == rest


async def refused(port: int) -> bool:
    """True if a flow through ``port`` gets no bytes back and is reset or closed."""
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return True
    try:
        writer.write(b"ping")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), 10)
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        writer.close()
    return data == b""


class StaticView:
    """An admin view (``quicmesh.sidecar.admin.AdminView``) answering with fixed data."""

    def __init__(self, snapshot: dict[str, Any], metrics: bytes = b"") -> None:
        self._snapshot = snapshot
        self._metrics = metrics

    def metrics_text(self) -> bytes:
        return self._metrics

    def snapshot(self) -> dict[str, Any]:
        return self._snapshot

    def config_dump(self) -> dict[str, Any]:
        return {}

    def is_ready(self) -> bool:
        return True

    def begin_drain(self) -> bool:
        return True

    async def migrate(self) -> dict[str, Any]:
        return {}
