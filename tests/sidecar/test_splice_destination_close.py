"""A destination that answers and closes while the client still sends: the same outcome
on every engine and transport (a failure-injection review: the native engine's B side
logged the flow ``reset`` with "[Errno 107] Transport endpoint is not connected", where
the Python copies, aioquic's QUIC, h2 and TLS-over-TCP, and A's side logged it
``completed``).

Two ``quicmesh sidecar`` processes. Sidecar B serves the destinations on QUIC (one listener
on each engine), h2 and TLS-over-TCP; sidecar A has one cluster per listener and
destination. The destination reads the request, answers and closes:

* ``fin``: an orderly close. The client's later bytes reach a closed socket, whose kernel
  answers them with RST (pending on B's socket as EPIPE: its peer's FIN came first, Linux's
  ``tcp_reset`` in CLOSE_WAIT). Written once, then the client's FIN: B's
  ``shutdown(SHUT_WR)`` meets ENOTCONN, and the flow ended normally on both sides, as the
  Python copies and Envoy's ``tcp_proxy`` end it (the destination said all it would; the
  client's bytes after its close are dropped). Written again: that write meets the reset
  (EPIPE), and the flow is reset on every path alike.
* ``rst``: the destination resets its connection (SO_LINGER 0) after its answer. A genuine
  reset: ``reset`` on B and A, on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from quic_helpers import require_engine

from quicmesh.sidecar.launch import LOOPBACK, SidecarProcess, free_ports

from .conftest import IDENTITY_A, IDENTITY_B, addr, wait_until

REQUEST = b"GET /ratings HTTP/1.0\r\n\r\n"
RESPONSE = b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"
LATER = b"x" * 1000
"""What the client sends after the answer, a few times."""

LISTENERS = {
    "native": {"transports": ["quic"], "engine": "native"},
    "aioquic": {"transports": ["quic"], "engine": "aioquic"},
    "h2": {"transports": ["h2"]},
    "tcp": {"transports": ["tcp"]},
}
CLUSTER_OPTIONS: dict[str, dict[str, Any]] = {
    "native": {"transport": "quic", "engine": "native"},
    "aioquic": {"transport": "quic", "engine": "aioquic"},
    "h2": {"transport": "h2"},
    "tcp": {"transport": "tcp"},
}
CLOSES = ("fin", "rst")


class _Destination:
    """Reads the request, answers, and closes: orderly (``fin``) or with RST (``rst``)."""

    def __init__(self, close: str) -> None:
        self.close = close
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = int(self.listener.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while len(request) < len(REQUEST):
                data = conn.recv(len(REQUEST) - len(request))
                if not data:
                    return
                request += data
            conn.sendall(RESPONSE)
            if self.close == "rst":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def destinations() -> Iterator[dict[str, _Destination]]:
    made = {close: _Destination(close) for close in CLOSES}
    yield made
    for destination in made.values():
        destination.stop()


@contextlib.contextmanager
def running_sidecars(
    workdir: Path,
    destinations: dict[str, _Destination],
    paths: tuple[str, ...],
    label: str,
    *options: str,
) -> Iterator[tuple[SidecarProcess, SidecarProcess, dict[str, int]]]:
    """Sidecars ``a-<label>`` and ``b-<label>`` (started with ``options``), B with a
    listener ``mesh_<path>`` for each of ``paths`` (:data:`LISTENERS`), A with a cluster
    ``<path>_<close>`` through it to each destination; yields A, B and A's listening
    ports by cluster."""
    targets = [addr(d.port) for d in destinations.values()]
    *b_listening, b_admin = free_ports(len(paths) + 1)
    b_ports = dict(zip(paths, b_listening, strict=True))
    b = SidecarProcess(
        f"b-{label}",
        {
            "node": {"name": "b", "identity": IDENTITY_B},
            "tls": {"ca_dir": str(workdir / "ca")},
            "admin": {"address": addr(b_admin)},
            "drain": {"grace_period": "10s"},
            "listeners": {
                "inbound": [
                    {
                        "name": f"mesh_{name}",
                        "address": addr(b_ports[name]),
                        "destinations": targets,
                        **LISTENERS[name],
                    }
                    for name in paths
                ]
            },
        },
        workdir,
    )
    clusters = [
        {
            "name": f"{name}_{close}",
            "target": addr(destination.port),
            "endpoints": [addr(b_ports[name])],
            **CLUSTER_OPTIONS[name],
        }
        for name in paths
        for close, destination in destinations.items()
    ]
    *listening, a_admin = free_ports(len(clusters) + 1)
    a_ports = {c["name"]: port for c, port in zip(clusters, listening, strict=True)}
    a = SidecarProcess(
        f"a-{label}",
        {
            "node": {"name": "a", "identity": IDENTITY_A},
            "tls": {"ca_dir": str(workdir / "ca")},
            "admin": {"address": addr(a_admin)},
            "drain": {"grace_period": "10s"},
            "listeners": {
                "outbound": [
                    {"name": name, "address": addr(port), "cluster": name}
                    for name, port in a_ports.items()
                ]
            },
            "clusters": clusters,
        },
        workdir,
    )
    b.start(*options)
    try:
        b.wait_ready()
        a.start(*options)
        try:
            a.wait_ready()
            yield a, b, a_ports
        finally:
            a.stop()
    finally:
        b.stop()


@pytest.fixture(scope="module")
def sidecars(
    workdir: Path, destinations: dict[str, _Destination]
) -> Iterator[tuple[SidecarProcess, SidecarProcess, dict[str, int]]]:
    require_engine("native")
    with running_sidecars(workdir, destinations, tuple(LISTENERS), "destination-close") as up:
        yield up


async def client(port: int, later: int) -> bytes:
    """Send the request, read the answer, then send ``later`` more chunks (a little apart:
    they reach the destination after its close) and half-close; what came back."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    received = b""
    try:
        writer.write(REQUEST)
        await writer.drain()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            received = await asyncio.wait_for(reader.readexactly(len(RESPONSE)), 10)
            for _ in range(later):
                await asyncio.sleep(0.05)
                writer.write(LATER)
                await writer.drain()
            await asyncio.sleep(0.1)
            writer.write_eof()
            received += await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return received


def logged_lines(
    a: SidecarProcess, b: SidecarProcess, name: str, destination: _Destination
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A's lines of the cluster through B's listener ``mesh_<name>`` to ``destination``,
    and B's."""
    cluster = f"{name}_{destination.close}"
    on_a = [r for r in a.access_log() if r["listener"] == cluster]
    on_b = [
        r
        for r in b.access_log()
        if r["listener"] == f"mesh_{name}" and r["endpoint"] == addr(destination.port)
    ]
    return on_a, on_b


def counted(
    lines: Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    wanted: tuple[int, int],
) -> bool:
    on_a, on_b = lines()
    return (len(on_a), len(on_b)) == wanted


def outcome(line: dict[str, Any]) -> str:
    return f"{line['outcome']} {line['reason']}".strip()


def outcomes(
    sidecars: tuple[SidecarProcess, SidecarProcess, dict[str, int]],
    destination: _Destination,
    later: int,
    paths: tuple[str, ...] = tuple(CLUSTER_OPTIONS),
) -> dict[str, tuple[str, str]]:
    """One flow through each of ``paths``' clusters to ``destination``: (A's outcome,
    B's) by path."""
    a, b, ports = sidecars
    found: dict[str, tuple[str, str]] = {}
    for name in paths:
        lines = functools.partial(logged_lines, a, b, name, destination)
        before = tuple(map(len, lines()))
        received = asyncio.run(client(ports[f"{name}_{destination.close}"], later))
        if destination.close == "fin":
            assert received == RESPONSE, name
        logged = functools.partial(counted, lines, (before[0] + 1, before[1] + 1))
        wait_until(logged, 20.0, f"{name}: both sidecars logged the flow")
        on_a, on_b = lines()
        found[name] = (outcome(on_a[-1]), outcome(on_b[-1]))
    return found


def first_words(found: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """The outcomes alone (without their reasons), by cluster."""
    return {name: (a.split()[0], b.split()[0]) for name, (a, b) in found.items()}


def test_a_destination_closing_while_the_client_sends_completes_on_every_path(
    sidecars: tuple[SidecarProcess, SidecarProcess, dict[str, int]],
    destinations: dict[str, _Destination],
) -> None:
    # The client's bytes after the answer: written (the destination's kernel answers them
    # with RST), then the client's FIN, whose shutdown(SHUT_WR) on B meets ENOTCONN.
    found = outcomes(sidecars, destinations["fin"], later=1)
    assert found == {name: ("completed", "completed") for name in CLUSTER_OPTIONS}, found


def test_a_write_after_the_destination_closed_and_reset_is_a_reset_on_every_path(
    sidecars: tuple[SidecarProcess, SidecarProcess, dict[str, int]],
    destinations: dict[str, _Destination],
) -> None:
    # More of the client's bytes: B's second write meets the RST (EPIPE), as Envoy's
    # tcp_proxy's would: the flow is reset, on every path alike.
    found = outcomes(sidecars, destinations["fin"], later=4)
    assert first_words(found) == {name: ("reset", "reset") for name in CLUSTER_OPTIONS}, found


@pytest.mark.parametrize("later", [0, 1])
def test_a_destination_resetting_is_a_reset_on_every_path(
    sidecars: tuple[SidecarProcess, SidecarProcess, dict[str, int]],
    destinations: dict[str, _Destination],
    later: int,
) -> None:
    found = outcomes(sidecars, destinations["rst"], later)
    assert first_words(found) == {name: ("reset", "reset") for name in CLUSTER_OPTIONS}, found
