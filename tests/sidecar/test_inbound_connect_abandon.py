"""The inbound listener's destination connect, abandoned with its flow or its listener."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from quicmesh.sidecar.inbound import _unless_given_up


class _OpenFlow:
    """A flow that stays open (what ``_unless_given_up`` asks of a ``MeshStream``)."""

    def __init__(self) -> None:
        self._closed = asyncio.get_running_loop().create_future()

    async def wait_closed(self) -> None:
        await self._closed

    def exception(self) -> BaseException | None:
        return None


def test_a_connection_made_as_the_listener_cancels_the_connect_is_discarded() -> None:
    """The listener closing cancels the flow's task; a destination connection made in the
    same turn was left open (only a connect still under way was stopped)."""

    async def main() -> list[Any]:
        discarded: list[Any] = []
        connect: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(
            _unless_given_up(_OpenFlow(), connect, discarded.append)  # type: ignore[arg-type]
        )
        await asyncio.sleep(0)  # (one turn: the task waits on the connect)
        connect.set_result("the destination's connection")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)  # (the done callbacks' turn)
        return discarded

    assert asyncio.run(main()) == ["the destination's connection"]
