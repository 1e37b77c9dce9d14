"""A failed connect (a QUIC timeout or refused handshake, an abandoned TLS dial) or
health check leaves nothing behind for asyncio to complain about: no "Future
exception was never retrieved"."""

from __future__ import annotations

import asyncio
import gc
import socket
from typing import Any

import pytest

from quicmesh import TRANSPORTS, ConnectError, DevCA, QuicmeshError, QuicTransport

CA = DevCA()
OTHER_CA = DevCA()


def _silent_port() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock, int(sock.getsockname()[1])


def _run_collecting_loop_errors(main: Any) -> list[dict[str, Any]]:
    """Run ``main()`` and return what reached the loop's exception handler, after the
    garbage of the failed connections was collected while the loop still ran."""
    errors: list[dict[str, Any]] = []

    async def wrapper() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        await main()
        for _ in range(3):
            await asyncio.sleep(0.05)  # let the closed connections finish their callbacks
            gc.collect()

    asyncio.run(wrapper())
    return errors


def test_timed_out_connects_leave_no_unretrieved_future() -> None:
    client = QuicTransport(
        identity=CA.issue("spiffe://mesh.local/ns/a/sa/a"), trust=CA.trust_bundle
    )
    sock, port = _silent_port()

    async def main() -> None:
        for _ in range(3):
            with pytest.raises(ConnectError, match=r"timed out after 0\.3s"):
                await client.connect(("127.0.0.1", port), timeout=0.3)

    with sock:
        errors = _run_collecting_loop_errors(main)
    assert [e.get("message") for e in errors] == []


def test_refused_handshakes_leave_no_unretrieved_future() -> None:
    server = QuicTransport(
        identity=CA.issue("spiffe://mesh.local/ns/b/sa/b"), trust=CA.trust_bundle
    )
    # The client does not trust the server's CA: it refuses the handshake.
    stranger = QuicTransport(
        identity=CA.issue("spiffe://mesh.local/ns/a/sa/a"), trust=OTHER_CA.trust_bundle
    )

    async def handler(stream: Any) -> None:
        stream.abort()

    async def main() -> None:
        listener = await server.listen(("127.0.0.1", 0), handler)
        try:
            for _ in range(3):
                with pytest.raises(QuicmeshError):
                    await stranger.connect(("127.0.0.1", listener.address[1]), timeout=2)
        finally:
            listener.close()
            await listener.wait_closed()

    errors = _run_collecting_loop_errors(main)
    assert [e.get("message") for e in errors] == []


@pytest.mark.parametrize("name", ["h2", "tcp"])
def test_abandoned_tls_dials_leave_no_unretrieved_future(name: str) -> None:
    """A TLS dial given up on (its timeout, or the caller's cancellation, as
    ``AutoTransport`` cancels the loser of its race) to a server that accepts the TCP
    connection and never answers: the reset settled the dial's ``ready`` with an error
    nobody read, logged by asyncio (blaming the server's trust in our certificate)."""
    client = TRANSPORTS[name](
        identity=CA.issue("spiffe://mesh.local/ns/a/sa/a"), trust=CA.trust_bundle
    )
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the TCP handshake; nobody reads the ClientHello

    async def main() -> None:
        address = silent.getsockname()
        with pytest.raises(ConnectError, match=r"timed out after 0\.3s"):
            await client.connect(address, timeout=0.3)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.connect(address, timeout=5), 0.3)

    with silent:
        errors = _run_collecting_loop_errors(main)
    assert [e.get("message") for e in errors] == []
