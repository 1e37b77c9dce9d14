"""Waiting with a deadline (quicmesh/_timeouts.py, wait_within): a cancellation that
comes as the awaited thing completes reaches the caller, which Python 3.11's
``asyncio.wait_for`` lost (a command stopped by SIGTERM ran on); and the places whose
result is a connection close it rather than drop it."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from quicmesh._timeouts import wait_within
from quicmesh.sidecar.outbound import _refusal
from quicmesh.transport.native import NativeEndpoint

Waiter = Callable[["asyncio.Future[str]"], Awaitable[str]]


async def _through_a_coroutine(future: asyncio.Future[str]) -> str:
    return await future


def _cancelled_as_it_completes(wait: Callable[[asyncio.Future[str]], Awaitable[Any]]) -> Any:
    """Run ``wait(future)`` in a task, then complete the future and cancel the task in
    one loop iteration (the signal came as the reply arrived). The task's result, or
    the exception it ended with."""

    async def main() -> Any:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def waiting() -> Any:
            return await wait(future)

        task = asyncio.create_task(waiting())
        for _ in range(3):  # the task (and wait_for's own task) now wait on the future
            await asyncio.sleep(0)
        future.set_result("reply")
        task.cancel()
        try:
            return await task
        except asyncio.CancelledError as exc:
            return exc

    return asyncio.run(main())


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for is built on timeout in 3.12")
@pytest.mark.parametrize("through_a_coroutine", [False, True], ids=["future", "coroutine"])
def test_wait_for_of_python_3_11_loses_such_a_cancellation(through_a_coroutine: bool) -> None:
    """Why wait_within exists (from Python 3.12 on, which rebuilt wait_for on
    asyncio.timeout, this is skipped: once 3.11 is dropped, wait_within can go)."""

    def old(future: asyncio.Future[str]) -> Awaitable[str]:
        awaited = _through_a_coroutine(future) if through_a_coroutine else future
        return asyncio.wait_for(awaited, 10)

    assert _cancelled_as_it_completes(old) == "reply"  # the cancel() was swallowed


@pytest.mark.parametrize("through_a_coroutine", [False, True], ids=["future", "coroutine"])
def test_wait_within_passes_on_a_cancellation_that_comes_as_it_completes(
    through_a_coroutine: bool,
) -> None:
    def new(future: asyncio.Future[str]) -> Awaitable[str]:
        awaited = _through_a_coroutine(future) if through_a_coroutine else future
        return wait_within(awaited, 10)

    assert isinstance(_cancelled_as_it_completes(new), asyncio.CancelledError)


def test_wait_within_times_out_and_cancels_what_it_waited_for() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with pytest.raises(TimeoutError):
            await wait_within(future, 0.01)
        assert future.cancelled()
        shielded: asyncio.Future[None] = loop.create_future()
        with pytest.raises(TimeoutError):
            await wait_within(asyncio.shield(shielded), 0.01)
        assert not shielded.done()  # (shielded: it runs on)
        shielded.cancel()

    asyncio.run(main())


def test_wait_within_none_is_no_limit_and_a_result_comes_back() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        loop.call_later(0.05, future.set_result, 7)
        assert await wait_within(future, None) == 7
        assert await wait_within(asyncio.sleep(0, "done"), 1.0) == "done"

    asyncio.run(main())


# -- the call sites -----------------------------------------------------------------


class _AcceptedStream:
    """A stream opened without waiting for the peer's answer; the answer is ``accepted``."""

    def __init__(self, accepted: asyncio.Future[str]) -> None:
        self.accepted = accepted

    async def wait_accepted(self) -> None:
        await self.accepted


def test_a_flow_cancelled_as_its_stream_is_accepted_ends_cancelled() -> None:
    """The outbound flow's check for a refusal (sidecar/outbound.py, _refusal): the
    listener closing (the flow's task cancelled) as the peer's answer came let the flow
    run on with wait_for."""

    def refusal(accepted: asyncio.Future[str]) -> Awaitable[Any]:
        return _refusal(_AcceptedStream(accepted))  # type: ignore[arg-type]

    assert isinstance(_cancelled_as_it_completes(refusal), asyncio.CancelledError)


class _FakeNativeEngine:
    """What NativeEndpoint asks of the extension's endpoint to connect and close."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        self.closed_connections: list[int] = []

    def fileno(self) -> int:
        return self._read

    def connect(self, host: str, port: int, *, allowed: list[str] | None) -> int:
        return 1

    def close_connection(self, conn: int, code: int, reason: str) -> None:
        self.closed_connections.append(conn)

    def drain(self) -> list[Any]:
        return []

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


def test_a_native_connection_made_as_its_connect_is_cancelled_is_closed() -> None:
    """NativeEndpoint.connect awaits a future the engine resolves: a connection it held
    when the cancellation came would be nobody's (wait_for returned it, cancellation
    lost; a plain timeout dropped it, open)."""

    async def main() -> None:
        engine = _FakeNativeEngine()
        endpoint = NativeEndpoint(engine, asyncio.get_running_loop())
        try:
            task = asyncio.create_task(endpoint.connect("127.0.0.1", 1, timeout=10))
            for _ in range(3):
                await asyncio.sleep(0)
            endpoint._on_connected(1, 42, False)  # the handshake completed...
            task.cancel()  # ...as the caller gave up (in the same loop iteration)
            with pytest.raises(asyncio.CancelledError):
                await task
            assert engine.closed_connections == [42]
        finally:
            endpoint.close()

    asyncio.run(main())
