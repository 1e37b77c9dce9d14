"""Liveness on every transport (a review, 2026-12-07).

* A QUIC ``idle_timeout`` at or below ``keepalive_interval`` dropped a live flow that
  was quiet for the idle timeout: the keepalive PING is now due within half of it.
* The aioquic client socket did not see ICMP host or network unreachable (Linux
  reports those to a connected UDP socket only with ``IP_RECVERR``); with the option
  it empties the socket's error queue, so stale errors never crowd out datagrams.
* An HTTP/2 connection to a hung peer (its kernel still acknowledging) stayed open
  for ever: it now PINGs a silent peer and gives up after ``dead_after``; h2 and tcp
  sockets get the kernel's TCP keepalive.
* ``connect(timeout=...)`` was not checked: ``-1`` was a ConnectError "timed out after
  -1s", ``"1"`` a TypeError.

The ICMP tests forge the kernel's input with a raw socket (root only): an ICMP error
about a datagram the client sent, as a router on the path would send it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h2.connection
import pytest

from quicmesh import ConnectError, H2Transport, StreamReset, TcpTransport
from quicmesh.errors import ConfigError
from tests.quic_helpers import (
    CA,
    CLIENT,
    QUIC_ENGINES,
    SERVER,
    TARGET,
    Recorder,
    client_transport,
    only_connection,
    require_engine,
    round_trip,
    run,
    server_transport,
)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="forging ICMP errors needs a raw socket (root)"
)

ICMP_DEST_UNREACH = 3
ICMP_HOST_UNREACH = 1
ICMP_PARAMETERPROB = 12


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_error(kind: int, code: int, source: Any, destination: Any) -> bytes:
    """An ICMP error about a UDP datagram from ``source`` to ``destination`` (IPv4)."""
    udp = struct.pack("!HHHH", source[1], destination[1], 8, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0x4000,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(source[0]),
        socket.inet_aton(destination[0]),
    )
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    body = bytes(4) + ip + udp
    header = struct.pack("!BBH", kind, code, _checksum(struct.pack("!BBH", kind, code, 0) + body))
    return header + body


def send_icmp(packet: bytes, count: int = 1) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        for _ in range(count):
            raw.sendto(packet, ("127.0.0.1", 0))


# -- 1: idle_timeout below the keepalive interval ------------------------------------


@pytest.mark.parametrize("engine", QUIC_ENGINES)
@pytest.mark.parametrize("idle_timeout", [0.5, 1.0])
def test_a_quiet_flow_outlives_an_idle_timeout_below_the_keepalive_interval(
    engine: str, idle_timeout: float
) -> None:
    """keepalive_interval 1 s (the default), idle_timeout 0.5 or 1 s: the PING is due
    within half the idle timeout (RFC 9000 10.1.2), so a flow quiet for 1.5 s lives."""
    require_engine(engine)

    async def main() -> None:
        server = server_transport(engine=engine, idle_timeout=idle_timeout)
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        client = client_transport(engine=engine, idle_timeout=idle_timeout)
        assert client.liveness.keepalive_interval == idle_timeout / 2
        connection = await client.connect(listener.address, timeout=5.0)
        stream = await connection.open_stream(TARGET)
        stream.write(b"a")
        assert await stream.readexactly(1) == b"a"
        await asyncio.sleep(1.5)  # the quiet period under test, not synchronisation
        assert await round_trip(stream, b"still here") == b"still here"
        await connection.aclose()
        listener.close()
        await listener.wait_closed()
        await client.aclose()
        await server.aclose()

    run(main())


def test_a_shorter_keepalive_interval_is_kept() -> None:
    client = client_transport(idle_timeout=60.0, keepalive_interval=0.3)
    assert client.liveness.keepalive_interval == 0.3
    assert (
        client_transport(idle_timeout=0.5, keepalive_interval=None).liveness.keepalive_interval
        is None
    )


# -- 2: ICMP host unreachable on aioquic, and its error queue -------------------------


@needs_root
@pytest.mark.parametrize("engine", QUIC_ENGINES)
def test_icmp_host_unreachable_fails_a_connect_at_once(engine: str) -> None:
    """The peer's first hop answers the client's Initial with ICMP host unreachable:
    the connect fails with it, not after its timeout (aioquic, until 2026-12-07: the
    whole timeout, as Linux drops that error on a connected socket without IP_RECVERR)."""
    require_engine(engine)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
            hole.bind(("127.0.0.1", 0))
            hole.setblocking(False)
            client = client_transport(engine=engine)
            connecting = asyncio.ensure_future(client.connect(hole.getsockname(), timeout=20.0))
            _, source = await loop.sock_recvfrom(hole, 65535)  # the client's Initial
            send_icmp(icmp_error(ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, source, hole.getsockname()))
            with pytest.raises(ConnectError, match="unreachable: No route to host"):
                await connecting
            await client.aclose()

    run(main())


@needs_root
def test_a_flood_of_icmp_errors_does_not_crowd_out_the_peers_datagrams() -> None:
    """With IP_RECVERR every ICMP error is also queued on the socket, charged to its
    receive buffer: more errors than the buffer holds (parameter problems, which the
    connection ignores) and the connection still carries its flow, because the queue
    is emptied as the errors come (left there, it filled the buffer and the kernel
    dropped the peer's datagrams)."""

    async def main() -> None:
        server = server_transport(engine="aioquic")
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        client = client_transport(engine="aioquic")
        connection = await client.connect(listener.address, timeout=5.0)
        stream = await connection.open_stream(TARGET)
        assert await stream_echo(stream, b"before") == b"before"
        udp = connection.connected_socket
        assert udp is not None
        sock = udp.get_extra_info("socket")
        # A small buffer (the kernel doubles it): the flood need not be megabytes.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        packet = icmp_error(ICMP_PARAMETERPROB, 0, udp.get_extra_info("sockname"), listener.address)
        for round_ in range(3):
            # Each queued error takes about 800 bytes of buffer: twice the buffer's worth.
            send_icmp(packet, count=rcvbuf // 400)
            payload = b"after flood %d" % round_
            assert await stream_echo(stream, payload) == payload
        assert not connection.is_closed
        connection.close()
        await connection.wait_closed()
        listener.close()
        await listener.wait_closed()
        await client.aclose()
        await server.aclose()

    run(main(), timeout=90)


async def stream_echo(stream: Any, payload: bytes) -> bytes:
    stream.write(payload)
    return bytes(await asyncio.wait_for(stream.readexactly(len(payload)), 20))


# -- 3: HTTP/2 notices a hung peer; TCP keepalive ----------------------------------


def test_an_h2_connection_to_a_hung_peer_fails_after_dead_after() -> None:
    """The server stops reading (as a SIGSTOPped process: its kernel still acknowledges
    every segment): the client's keepalive PING goes unanswered and, ``dead_after``
    later, every stream on the connection is reset, naming why."""

    async def main() -> None:
        server = H2Transport(
            identity=SERVER, trust=CA.trust_bundle, keepalive_interval=None, dead_after=None
        )
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        client = H2Transport(
            identity=CLIENT, trust=CA.trust_bundle, keepalive_interval=0.2, dead_after=1.0
        )
        connection = await client.connect(listener.address, timeout=5.0)
        stream = await connection.open_stream(TARGET)
        assert await stream_echo(stream, b"hello") == b"hello"
        accepted = await only_connection(listener)
        accepted.protocol._transport.pause_reading()  # the peer hangs
        stream.write(b"more data while the peer hangs")
        with pytest.raises(StreamReset, match="peer unresponsive"):
            await asyncio.wait_for(stream.read(100), 30)
        assert connection.is_closed
        listener.close()
        await listener.wait_closed()

    run(main())


def test_a_live_idle_h2_connection_is_kept() -> None:
    """Both sides PING a silent peer and get answers: an idle connection with short
    liveness settings stays open well past ``keepalive_interval + dead_after``."""

    async def main() -> None:
        server = H2Transport(
            identity=SERVER, trust=CA.trust_bundle, keepalive_interval=0.1, dead_after=0.3
        )
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        client = H2Transport(
            identity=CLIENT, trust=CA.trust_bundle, keepalive_interval=0.1, dead_after=0.3
        )
        connection = await client.connect(listener.address, timeout=5.0)
        stream = await connection.open_stream(TARGET)
        await asyncio.sleep(1.5)  # the idle period under test, not synchronisation
        assert not connection.is_closed
        assert await stream_echo(stream, b"still here") == b"still here"
        connection.close()
        await connection.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux TCP keepalive options")
@pytest.mark.parametrize("kind", [H2Transport, TcpTransport])
def test_h2_and_tcp_sockets_get_the_kernels_keepalive(kind: Any) -> None:
    """Both ends' sockets probe an idle peer (SO_KEEPALIVE, every keepalive_interval,
    enough probes to cover dead_after); h2's also bound unacknowledged data by
    dead_after (TCP_USER_TIMEOUT), tcp's not (a slow destination closes the window)."""

    async def main() -> None:
        server = kind(identity=SERVER, trust=CA.trust_bundle, keepalive_interval=2, dead_after=7)
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        client = kind(identity=CLIENT, trust=CA.trust_bundle, keepalive_interval=2, dead_after=7)
        connection = await client.connect(listener.address, timeout=5.0)
        stream = await connection.open_stream(TARGET)
        assert await stream_echo(stream, b"hello") == b"hello"
        protocols = [*listener._protocols]
        if kind is H2Transport:
            protocols.append(connection.protocol)
        else:
            protocols.extend(connection._flows)
        assert len(protocols) == 2
        for protocol in protocols:
            sock = protocol._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 2
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 2
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
            user_timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert user_timeout == (7000 if kind is H2Transport else 0)
        connection.close()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("kind", [H2Transport, TcpTransport])
@pytest.mark.parametrize(
    ("option", "value"),
    [("keepalive_interval", 0), ("dead_after", -1), ("keepalive_interval", "1s")],
)
def test_bad_tcp_liveness_options_are_config_errors(kind: Any, option: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=option):
        kind(identity=CLIENT, trust=CA.trust_bundle, **{option: value})


# -- 4: connect(timeout=...) ---------------------------------------------------------


def _transports() -> list[tuple[str, Any]]:
    def quic(engine: str) -> Any:
        return lambda: client_transport(engine=engine)

    return [
        ("quic-aioquic", quic("aioquic")),
        ("quic-native", quic("native")),
        ("h2", lambda: H2Transport(identity=CLIENT, trust=CA.trust_bundle)),
        ("tcp", lambda: TcpTransport(identity=CLIENT, trust=CA.trust_bundle)),
    ]


@pytest.mark.parametrize(("name", "make"), _transports(), ids=[n for n, _ in _transports()])
@pytest.mark.parametrize("timeout", [0, -1, "1", None, float("nan"), float("inf"), True])
def test_a_bad_connect_timeout_is_a_config_error(name: str, make: Any, timeout: Any) -> None:
    """The caller's mistake, said as such before anything is sent (it was a ConnectError
    "timed out after -1s", a TypeError, or, for nan on aioquic, "after nans")."""
    if name == "quic-native":
        require_engine("native")

    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
            hole.bind(("127.0.0.1", 0))
            transport = make()
            try:
                with pytest.raises(ConfigError, match=r"^timeout must be positive seconds"):
                    await asyncio.wait_for(
                        transport.connect(hole.getsockname(), timeout=timeout), 5
                    )
            finally:
                await transport.aclose()

    run(main())


UVLOOP_SCRIPT = """
import asyncio, socket, sys
import uvloop
from quicmesh import ConnectError
from tests.quic_helpers import client_transport
from tests.transport.test_liveness_review28 import icmp_error, send_icmp

async def main():
    loop = asyncio.get_running_loop()
    first = loop.create_future()

    class Hole(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            if not first.done():
                first.set_result(addr)

    hole, _ = await loop.create_datagram_endpoint(Hole, local_addr=("127.0.0.1", 0))
    client = client_transport(engine="aioquic")
    connecting = asyncio.ensure_future(client.connect(hole.get_extra_info("sockname"), timeout=1))
    send_icmp(icmp_error(3, 1, await first, hole.get_extra_info("sockname")))
    try:
        await connecting
    except ConnectError as exc:
        print("refused:", exc)
    hole.close()

uvloop.run(main())
"""


@needs_root
def test_an_icmp_error_does_not_crash_an_aioquic_client_under_uvloop() -> None:
    """uvloop's libuv reads a socket's error queue itself and passed the error on as a
    positive length: with IP_RECVERR the first ICMP error was a segmentation fault.
    Under uvloop the aioquic client socket does not ask for them (host unreachable is
    then not seen, as before): the connect times out, and the process lives."""
    pytest.importorskip("uvloop")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", UVLOOP_SCRIPT], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout


def test_an_answered_h2_ping_rearms_the_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review of the day's change: the timer armed for a PING's deadline (dead_after)
    was kept when the answer came, so an idle connection PINGed every dead_after, not
    every keepalive_interval, and a peer hung just after an answer was noticed after
    twice dead_after."""
    pings: list[float] = []
    ping = h2.connection.H2Connection.ping

    def counted(self: h2.connection.H2Connection, data: bytes) -> Any:
        if self.config.client_side:
            pings.append(time.monotonic())
        return ping(self, data)

    monkeypatch.setattr(h2.connection.H2Connection, "ping", counted)

    async def main() -> None:
        server = H2Transport(
            identity=SERVER, trust=CA.trust_bundle, keepalive_interval=None, dead_after=None
        )
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        client = H2Transport(
            identity=CLIENT, trust=CA.trust_bundle, keepalive_interval=0.2, dead_after=5.0
        )
        connection = await client.connect(listener.address, timeout=5.0)
        await asyncio.sleep(2.0)  # the idle period under test, not synchronisation
        # Every 0.2 s of silence: about ten; one (at 0.2 s) when the answer was ignored.
        assert len(pings) >= 4, pings
        assert not connection.is_closed
        connection.close()
        await connection.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())
