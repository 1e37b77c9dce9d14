"""Waiting with a deadline without losing a cancellation: :func:`wait_within`.

Python 3.11's ``asyncio.wait_for`` runs the awaitable in a task of its own and, when
the caller is cancelled just as that task completes (both in one loop iteration),
returns the result and drops the cancellation: a command stopped by SIGTERM ran on
(the xDS demo's clients, 30 s). Python 3.12 rebuilt ``wait_for`` on
``asyncio.timeout``; :func:`wait_within` is that shape for 3.11.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``await awaitable``, at most ``timeout`` seconds (None: no limit), as
    ``asyncio.wait_for`` does on Python 3.12.

    The awaitable runs in the caller's task (no task of its own): a cancellation
    always reaches the caller, also one that comes as the awaitable completes.

    :raises TimeoutError: the time was up; the awaitable was cancelled (a future or a
        task given is cancelled; wrap it in ``asyncio.shield`` to keep it running).
    :raises asyncio.CancelledError: the caller was cancelled. A coroutine that was
        making a connection then closes it (asyncio's own do), but a *future* that
        already held its result keeps it: a caller awaiting a future whose result is
        a resource must close that result itself.
    """
    async with asyncio.timeout(timeout):
        return await awaitable
