"""Counting live flows, so a drain can wait for the last one, and their last bytes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from ..errors import TunnelError
from ..transport.stream import MeshStream

FLUSH_TIMEOUT = 30.0
"""Longest a finished flow waits for its last bytes to leave."""


class FlowTracker:
    """How many flows are live; :meth:`wait_idle` returns when none are."""

    def __init__(self) -> None:
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the enclosed block as one live flow."""
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no flow is live."""
        await self._idle.wait()


async def wait_flushed(stream: MeshStream, timeout: float) -> None:
    """Wait (at most ``timeout`` seconds) until every byte written to ``stream`` has left.

    A flow counts as finished for a drain only once its last bytes are on the
    wire: closing the peer connection earlier would drop them. MeshStream has
    no public "wait until sent" yet, so this lowers the stream's high-water mark
    to zero and waits on ``drain()``, which the connection wakes as bytes leave.
    """
    stream._high_water = 0
    with contextlib.suppress(TunnelError, TimeoutError):
        await asyncio.wait_for(stream.drain(), timeout)
