"""Counting live flows, so a drain can wait for the last one, and for their last bytes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from ..errors import TunnelError
from ..transport.stream import MeshStream

FLUSH_TIMEOUT = 30.0
"""Longest a finished flow waits for its last bytes to leave."""

ACK_TIMEOUT = 2.0
"""Seconds a drain gives each peer connection, once its flows are finished (or the
grace period is over), to have their last bytes acknowledged before it closes
(:meth:`~quicmesh.PeerConnection.aclose`). One round trip is enough; this allows
for a lost packet or two on a slow path."""


class FlowTracker:
    """How many flows are live; :meth:`wait_idle` returns when none are."""

    def __init__(self) -> None:
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the enclosed block as one live flow."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def begin(self) -> None:
        """Count one more live flow (until :meth:`end`)."""
        self.active += 1
        self._idle.clear()

    def end(self) -> None:
        """A flow counted with :meth:`begin` ended."""
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no flow is live."""
        await self._idle.wait()


async def wait_sent(stream: MeshStream, timeout: float) -> None:
    """Wait (at most ``timeout`` seconds) until every byte written to ``stream`` has left.

    A flow counts as finished for a drain only once its last bytes are handed to
    the network; acknowledgement is then the peer connection's business
    (:meth:`~quicmesh.PeerConnection.aclose` waits for it when a drain closes
    the pools). A stream that failed meanwhile has nothing left to send.
    """
    with contextlib.suppress(TunnelError, TimeoutError):
        async with asyncio.timeout(timeout):  # no task of its own, as wait_for makes
            await stream.wait_sent()
