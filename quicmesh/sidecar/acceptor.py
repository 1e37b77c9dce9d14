"""A TCP server handing each accepted connection over as a plain socket.

:func:`asyncio.start_server` builds a transport, a protocol and a reader/writer
pair for every connection it accepts. A flow that the native engine splices
takes the socket itself and never reads it in Python, so that work would be
thrown away (and the socket detached from asyncio again): :class:`SocketServer`
accepts without it, and the caller wraps a socket in asyncio streams only when
it copies the flow in Python (:func:`quicmesh.splice.splice_accepted`).

Binding follows :meth:`asyncio.loop.create_server` (every address the host
resolves to, ``SO_REUSEADDR``, ``IPV6_V6ONLY`` on IPv6 sockets, a backlog of
100), and so does accepting: a batch of at most the backlog per wake-up, and a
pause of :data:`ACCEPT_RETRY_DELAY` when the process runs out of descriptors
or memory.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger("quicmesh.sidecar")

BACKLOG = 100
"""The listen backlog, and the most connections accepted per wake-up (asyncio's)."""

ACCEPT_RETRY_DELAY = 1.0
"""Seconds accepting pauses when the process is out of descriptors or memory (asyncio's)."""

_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

Handler = Callable[[socket.socket, Any], Coroutine[Any, Any, None]]


def report_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The sidecar's event-loop exception handler: asyncio's own, except that a
    server it runs (the h2 and tcp listeners, the admin) running out of descriptors
    or memory is one line, as :class:`SocketServer` logs it, not a traceback
    (asyncio pauses that server's accepting for a second and carries on)."""
    exc = context.get("exception")
    if (
        isinstance(exc, OSError)
        and exc.errno in _RESOURCE_ERRORS
        and "accept" in str(context.get("message", ""))
    ):
        logger.error("accepting paused for %gs: %s", ACCEPT_RETRY_DELAY, exc)
        return
    loop.default_exception_handler(context)


class SocketServer:
    """Listening sockets whose connections go to ``handle(sock, peername)`` as
    non-blocking sockets with ``TCP_NODELAY`` (as asyncio's transports set it), each in
    a task of its own. The handler owns the socket."""

    def __init__(self, sockets: list[socket.socket], handle: Handler) -> None:
        self._loop = asyncio.get_running_loop()
        self._sockets = sockets
        self._handle = handle
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._paused = False
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    @classmethod
    async def start(cls, host: str | None, port: int, handle: Handler) -> SocketServer:
        """Bind ``host:port`` (every address it resolves to) and start accepting.

        :raises OSError: an address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"error while attempting to bind on address {address!r}: "
                        f"{(exc.strerror or '').lower()}",
                    ) from None
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, handle)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets."""
        return list(self._sockets)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(BACKLOG):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    logger.warning("accepting a connection failed: %s", exc)
                    return
                # Out of descriptors or memory: stop accepting for a while (the
                # connections wait in the backlog), as asyncio's servers do.
                logger.error("accepting paused for %gs: %s", ACCEPT_RETRY_DELAY, exc)
                self._loop.remove_reader(listening.fileno())
                self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume, listening)
                return
            try:
                sock.setblocking(False)
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # already gone
                sock.close()
                continue
            self.spawn(self._handle(sock, peer))

    def spawn(self, handling: Coroutine[Any, Any, None]) -> None:
        """Run a connection's handling in a task of its own, kept and its failure logged
        (a connection accepted elsewhere and handed to this server's caller)."""
        task = self._loop.create_task(handling)
        self._tasks.add(task)
        task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a connection's handler failed", exc_info=task.exception())

    def pause(self) -> None:
        """Stop accepting for now (someone else accepts on :attr:`sockets`)."""
        self._paused = True
        for sock in self._sockets:
            if not self._loop.is_closed() and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def resume(self) -> None:
        """Accept again after :meth:`pause`."""
        self._paused = False
        for sock in self._sockets:
            self._resume(sock)

    def _resume(self, listening: socket.socket) -> None:
        if self._paused:
            return
        if not self._closed and listening.fileno() >= 0:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    def close(self) -> None:
        """Stop accepting and close the listening sockets; connections already
        accepted carry on."""
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets:
            if not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
