"""A failed QUIC connect (timeout, refused handshake) or health check leaves nothing behind
for asyncio to complain about: no "Future exception was never retrieved"."""

from __future__ import annotations

import asyncio
import gc
import socket
from typing import Any

import pytest

from quicmesh import ConnectError, DevCA, QuicmeshError, QuicTransport

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
