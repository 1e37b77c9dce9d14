"""Why an HTTP/2 (or TLS-over-TCP) connection to a hung peer failed (a review, 2026-12).

A peer that stops answering (its process SIGSTOPped, a stuck event loop, packets
dropped one way) is failed by the h2 liveness checks: a keepalive PING unanswered
for ``dead_after``. But the kernel's ``TCP_USER_TIMEOUT`` (also ``dead_after``, see
``tune_liveness``), counting from the first byte left unacknowledged, usually gave up
first on a connection carrying data, and the flows failed with whatever the socket
said last: "connection lost: [Errno 110] Connection timed out" (or "[Errno 32] Broken
pipe"), a plain ConnectionLost. Both verdicts now name the cause, as the QUIC
transport does ("peer unresponsive"), and both are :class:`PeerUnresponsive`.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from quicmesh import H2Transport, StreamReset
from quicmesh.errors import ConnectionLost, PeerUnresponsive
from quicmesh.transport._tcp import _lost_with
from tests.quic_helpers import CA, CLIENT, SERVER, TARGET, Recorder, only_connection, run

STOPPED = "peer unresponsive: the peer stopped answering (no PING reply in "


async def _hung_peer(keepalive_interval: float, dead_after: float) -> tuple[Any, Any, Any]:
    """A client connection with one echoed stream to a server that then stops reading
    (as a SIGSTOPped process: its kernel still acknowledges, until its buffer is full)."""
    server = H2Transport(
        identity=SERVER, trust=CA.trust_bundle, keepalive_interval=None, dead_after=None
    )
    listener = await server.listen(("127.0.0.1", 0), Recorder())
    client = H2Transport(
        identity=CLIENT,
        trust=CA.trust_bundle,
        keepalive_interval=keepalive_interval,
        dead_after=dead_after,
    )
    connection = await client.connect(listener.address, timeout=5.0)
    stream = await connection.open_stream(TARGET)
    stream.write(b"hello")
    assert await asyncio.wait_for(stream.readexactly(5), 10) == b"hello"
    accepted = await only_connection(listener)
    accepted.protocol._transport.pause_reading()  # the peer hangs
    return listener, connection, stream


def test_a_peer_that_stops_reading_a_busy_connection_is_named_unresponsive() -> None:
    """Data keeps coming until the hung peer's receive window is shut: the kernel's
    TCP_USER_TIMEOUT ends the connection (ETIMEDOUT) before the PING's deadline. The
    flows failed with "connection lost: [Errno 110] Connection timed out"."""

    async def main() -> None:
        listener, connection, stream = await _hung_peer(keepalive_interval=0.5, dead_after=2.0)

        async def pump() -> None:
            with pytest.raises(StreamReset):  # (its writes fail as its reads)
                while True:
                    stream.write(b"x" * 65536)
                    await stream.drain()

        pumping = asyncio.create_task(pump())
        with pytest.raises(StreamReset) as lost:
            while await asyncio.wait_for(stream.read(1 << 20), 30):
                pass
        assert STOPPED in str(lost.value), lost.value
        assert isinstance(connection.lost_error, PeerUnresponsive), connection.lost_error
        assert str(connection.lost_error).startswith("connection lost: "), connection.lost_error
        assert "Errno" not in str(connection.lost_error)
        await asyncio.wait_for(pumping, 10)
        listener.close()
        await listener.wait_closed()

    run(main())


def test_a_peer_that_stops_answering_pings_is_named_unresponsive() -> None:
    """Only a few bytes go out (all acknowledged by the peer's kernel): the PING's own
    verdict, ``dead_after`` after it went out. It said "HTTP/2 connection failed: peer
    unresponsive: no ACK for 1.0s" (QUIC's words: HTTP/2 has no ACK to wait for)."""

    async def main() -> None:
        listener, connection, stream = await _hung_peer(keepalive_interval=0.2, dead_after=1.0)
        stream.write(b"more data while the peer hangs")
        with pytest.raises(StreamReset) as lost:
            await asyncio.wait_for(stream.read(100), 30)
        error = connection.lost_error
        assert isinstance(error, PeerUnresponsive), error
        assert str(error).startswith(f"connection lost: {STOPPED}1."), error
        assert str(error) in str(lost.value)
        listener.close()
        await listener.wait_closed()

    run(main())


def test_the_kernels_verdicts_are_named_as_the_pings() -> None:
    """What the socket says when the kernel gave up on the peer: a timeout
    (``TCP_USER_TIMEOUT``, keepalive probes: also TcpTransport's only check), or, with
    a PING unanswered, a broken pipe (the timeout read elsewhere first). A reset, or a
    broken pipe with no PING outstanding, is the peer's doing, and said as before."""
    timed_out = TimeoutError(errno.ETIMEDOUT, "Connection timed out")
    broken = BrokenPipeError(errno.EPIPE, "Broken pipe")
    tcp = _lost_with(timed_out)  # (tcp: no PING; the kernel's keepalive probes)
    assert isinstance(tcp, PeerUnresponsive)
    assert str(tcp) == (
        "connection lost: peer unresponsive: the peer stopped answering (the kernel gave up"
        " on what it sent: connection timed out)"
    )
    h2 = _lost_with(broken, 9.84)
    assert isinstance(h2, PeerUnresponsive)
    assert str(h2) == (
        f"connection lost: {STOPPED}9.8s, and the kernel gave up on what it sent: broken pipe)"
    )
    assert isinstance(_lost_with(timed_out, 3.0), PeerUnresponsive)
    plain = _lost_with(broken)
    assert type(plain) is ConnectionLost
    assert str(plain) == "connection lost: [Errno 32] Broken pipe"
    reset = _lost_with(ConnectionResetError(errno.ECONNRESET, "reset"), 3.0)
    assert type(reset) is ConnectionLost
    assert str(reset) == "connection reset by peer"
