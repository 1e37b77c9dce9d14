"""AutoTransport, found by review 28: a bad address, a fallback delay as long as the
connect timeout, the HTTP/2 budget in its error, and connects after ``aclose()``.

Over loopback, with the peer of :mod:`tests.transport.test_auto` (a QUIC listener
behind a UDP relay that can drop everything, and an HTTP/2 listener on the relay's
port number).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from quicmesh import AutoTransport, ConfigError
from tests.quic_helpers import CA, SERVER, Recorder, run
from tests.transport.test_auto import Peer, auto, echo


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:4433", ("127.0.0.1", 70000), ("127.0.0.1", "x"), ("", 4433), ("127.0.0.1",)],
)
def test_a_bad_connect_address_is_a_config_error_as_on_every_transport(address: Any) -> None:
    """The address was used (as a dictionary key, indexed for the error) before either
    transport checked it: a ``"host:port"`` string failed as a ConnectError naming
    ``1:2``, a port out of range as a ConnectError, a list as a TypeError."""

    async def main() -> None:
        client = auto(fallback_delay=0.05)
        with pytest.raises(ConfigError, match=r"^connect address: ") as refused:
            await client.connect(address, timeout=2)
        assert "QUIC" not in str(refused.value)  # one line, not the race's two reasons
        assert client.stats()["connections_h2"] == 0
        await client.aclose()

    run(main())


def test_a_list_address_connects_as_on_every_transport() -> None:
    """``[host, port]`` is taken as a pair by the QUIC and HTTP/2 transports; here it
    was a TypeError (unhashable, as the broken-QUIC memory's key)."""

    async def main() -> None:
        peer = Peer()
        host, port = await peer.start()
        client = auto()
        connection = await client.connect([host, port], timeout=5)  # type: ignore[arg-type]
        assert connection.transport_name == "quic"
        assert await echo(connection, b"listed") == b"listed"
        await connection.aclose()
        await client.aclose()
        await peer.close()

    run(main())


def test_a_bad_listen_address_is_a_config_error() -> None:
    async def main() -> None:
        server = AutoTransport(identity=SERVER, trust=CA.trust_bundle)
        with pytest.raises(ConfigError, match=r"^listen address: "):
            await server.listen(None, Recorder())  # type: ignore[arg-type]
        await server.aclose()

    run(main())


@pytest.mark.parametrize("delay", [1.0, 30.0])
def test_a_fallback_delay_as_long_as_the_timeout_still_falls_back(delay: float) -> None:
    """HTTP/2 was started only after ``fallback_delay``, with what was left of the
    timeout (at least 1 ms): a delay as long as the timeout never reached a peer whose
    UDP is blocked (every connect failed). It now starts at half the timeout at most."""

    async def main() -> None:
        peer = Peer()
        address = await peer.start()
        assert peer.relay is not None
        peer.relay.blackhole = True
        client = auto(fallback_delay=delay)
        started = time.monotonic()
        connection = await client.connect(address, timeout=1.0)
        assert connection.transport_name == "h2"
        assert time.monotonic() - started < 1.0 + 0.5  # within the timeout (generous)
        assert await echo(connection, b"fell back") == b"fell back"
        await connection.aclose()
        await client.aclose()
        await peer.close()

    run(main())


def test_a_connect_after_aclose_works_but_leaves_no_quic_handshake_running() -> None:
    """Every transport still connects after ``aclose()`` (the native QUIC engine makes
    a new client endpoint); an AutoTransport's connect then left the QUIC handshake
    that lost the race running in the background, which nothing would stop."""

    async def main() -> None:
        peer = Peer()
        address = await peer.start()
        assert peer.relay is not None
        peer.relay.blackhole = True
        client = auto(fallback_delay=0.1)
        await client.aclose()
        connection = await client.connect(address, timeout=5)
        assert connection.transport_name == "h2"
        assert await echo(connection, b"after") == b"after"
        assert not client._late  # the QUIC handshake that lost was abandoned, not watched
        await connection.aclose()
        await client.aclose()
        await peer.close()

    run(main())


def test_a_quic_failure_after_aclose_sets_no_retry_timer() -> None:
    """A QUIC failure learnt after ``aclose()`` (here an ICMP error, at once) still
    marks the address (the next connect goes straight to HTTP/2), but scheduled a
    retry for when the mark expires (``broken_backoff`` later), that nothing would
    cancel."""

    async def main() -> None:
        peer = Peer()
        address = await peer.start(quic=False)
        client = auto(fallback_delay=0.1)
        await client.aclose()
        connection = await client.connect(address, timeout=5)
        assert connection.transport_name == "h2"
        assert client.stats()["endpoints_quic_broken"] == 1
        assert not client._retry_timers
        await connection.aclose()
        await client.aclose()
        await peer.close()

    run(main())
