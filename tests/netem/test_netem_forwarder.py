"""The forwarder loop, run against packet socket pairs instead of TUN devices (no root)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from quicmesh.netem import DirectionConfig, LinkConfig
from quicmesh.netem.forwarder import Forwarder


@dataclass
class Harness:
    client: socket.socket  # stands for the client namespace's side of its TUN
    server: socket.socket
    control: socket.socket
    thread: threading.Thread

    def command(self, line: str) -> str:
        self.control.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.control.recv(65536)
            assert chunk
            data += chunk
        return data.decode().strip()


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    config: LinkConfig = getattr(request, "param", LinkConfig())
    client, client_tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server, server_tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    control, forwarder_control = socket.socketpair()
    for sock in (client_tun, server_tun):
        sock.setblocking(False)
    forwarder = Forwarder(config, client_tun.fileno(), server_tun.fileno(), forwarder_control)
    thread = threading.Thread(target=forwarder.run, daemon=True)
    thread.start()
    control.settimeout(5)
    assert control.recv(6) == b"ready\n"
    for sock in (client, server):
        sock.settimeout(5)
    yield Harness(client, server, control, thread)
    control.close()  # end of file stops the forwarder
    thread.join(5)
    assert not thread.is_alive()
    for sock in (client, server, client_tun, server_tun, forwarder_control):
        sock.close()


def test_forwards_both_ways_and_counts(harness: Harness) -> None:
    harness.client.send(b"a" * 100)
    assert harness.server.recv(2000) == b"a" * 100
    harness.server.send(b"b" * 60)
    assert harness.client.recv(2000) == b"b" * 60
    stats = json.loads(harness.command("stats"))
    assert stats["client_to_server"]["packets_out"] == 1
    assert stats["client_to_server"]["bytes_out"] == 100
    assert stats["server_to_client"]["bytes_in"] == 60


@pytest.mark.parametrize(
    "harness",
    [LinkConfig(client_to_server=DirectionConfig(delay=0.05))],
    indirect=True,
)
def test_delays_one_direction_only(harness: Harness) -> None:
    start = time.monotonic()
    harness.client.send(b"x")
    harness.server.recv(10)
    delayed = time.monotonic() - start
    start = time.monotonic()
    harness.server.send(b"y")
    harness.client.recv(10)
    undelayed = time.monotonic() - start
    assert 0.05 <= delayed < 0.08
    assert undelayed < 0.02


@pytest.mark.parametrize(
    "harness",
    [LinkConfig.symmetric(loss=1.0)],
    indirect=True,
)
def test_loss_drops(harness: Harness) -> None:
    for _ in range(10):
        harness.client.send(b"x")
    deadline = time.monotonic() + 5
    while json.loads(harness.command("stats"))["client_to_server"]["dropped_by_loss"] < 10:
        assert time.monotonic() < deadline
    harness.server.setblocking(False)
    with pytest.raises(BlockingIOError):
        harness.server.recv(10)
