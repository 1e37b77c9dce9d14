"""The sidecar's event-loop exception handler, for the asyncio servers it still runs
(the admin's): running out of descriptors is one line, as the listeners'
:class:`~quicmesh._accept.SocketServer` (the outbound listeners, and the
h2 and tcp inbound ones) logs it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .._accept import (
    ACCEPT_BACKLOG,
    ACCEPT_RETRY_DELAY,
    AcceptPauseLog,
    SocketServer,
    listener_name,
    logger,
)
from ..errors import OUT_OF_RESOURCES

__all__ = ["ACCEPT_BACKLOG", "ACCEPT_RETRY_DELAY", "SocketServer", "report_loop_exception"]

_loop_servers: dict[str, AcceptPauseLog] = {}
"""(:func:`report_loop_exception`) The pause lines of the asyncio servers, by name."""


def report_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The sidecar's event-loop exception handler: asyncio's own, except that a
    server it runs (the admin's; the listeners accept themselves, see
    :class:`~quicmesh._accept.SocketServer`) running out of descriptors or
    memory is one line naming it, rate-limited, as :class:`SocketServer` logs it, not a
    traceback (asyncio pauses that server's accepting for a second and carries on; it
    reports it once per connection waiting, up to 100 times a wake-up)."""
    exc = context.get("exception")
    if (
        isinstance(exc, OSError)
        and exc.errno in OUT_OF_RESOURCES
        and "accept" in str(context.get("message", ""))
    ):
        name = listener_name("", context.get("socket"))
        pauses = _loop_servers.get(name)
        if pauses is None:
            pauses = _loop_servers[name] = AcceptPauseLog(name, logger)
        pauses.report(exc, ACCEPT_RETRY_DELAY)
        return
    loop.default_exception_handler(context)
