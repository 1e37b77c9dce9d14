"""A TCP server that accepts itself and hands each connection over as a plain socket.

:func:`asyncio.start_server` builds a transport, a protocol and a reader/writer
pair for every connection it accepts. A flow that the native engine splices
takes the socket itself and never reads it in Python, so that work would be
thrown away (and the socket detached from asyncio again): :class:`SocketServer`
accepts without it, and the caller wraps a socket in asyncio streams only when
it copies the flow in Python (:func:`quicmesh.splice.splice_accepted`), or hands it
to ``loop.connect_accepted_socket`` (the h2 and tcp listeners,
:func:`quicmesh.transport._tcp.start_server`).

Binding follows :meth:`asyncio.loop.create_server` (every address the host
resolves to, ``SO_REUSEADDR``, ``IPV6_V6ONLY`` on IPv6 sockets, a backlog of
100), and so does accepting: a batch of at most the backlog per wake-up, and a
pause of :data:`ACCEPT_RETRY_DELAY` when the process runs out of descriptors
or memory, the connections waiting in the backlog meanwhile, with one line logged
(:class:`AcceptPauseLog`). Through ``create_server`` (the h2 and tcp listeners until
2026-12) uvloop accepted and closed every waiting connection, logging nothing: the
client saw "server closed the connection before it was ready (it may not trust our
certificate)"; asyncio (3.11) reported it once per try, up to 100 times a wake-up,
each arming a retry of its own (17,000 lines in ten seconds from one sidecar).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .errors import OUT_OF_RESOURCES, accept_failure_text
from .transport.base import host_port

logger = logging.getLogger("quicmesh.accept")

Handler = Callable[[socket.socket, Any], Coroutine[Any, Any, None]]

ACCEPT_BACKLOG = 100
"""The listen backlog, and the most connections accepted per wake-up (asyncio's)."""

ACCEPT_RETRY_DELAY = 1.0
"""Seconds a listener stops accepting when the process is out of descriptors or memory
(asyncio's): the connections wait in the backlog meanwhile."""

ACCEPT_LOG_INTERVAL = 30.0
"""Seconds between two lines of :class:`AcceptPauseLog` while a listener stays short."""


class AcceptPauseLog:
    """The log line of a listener that cannot accept for want of descriptors or memory:
    one line naming the listener and the limit hit, then at most one every
    :data:`ACCEPT_LOG_INTERVAL` while it lasts, saying how many pauses it did not log.
    (asyncio reports "socket.accept() out of system resource" with a traceback once
    per try, up to 100 times a wake-up; uvloop's libuv closed the waiting connections
    instead, without a word to them or in the log.)"""

    def __init__(self, name: str, log: logging.Logger) -> None:
        self.name = name
        self._log = log
        self._last: float | None = None
        self._not_logged = 0

    def report(self, exc: OSError, delay: float = ACCEPT_RETRY_DELAY) -> None:
        """Accepting failed with ``exc`` and pauses ``delay`` seconds."""
        now = time.monotonic()
        if self._last is not None and now - self._last < ACCEPT_LOG_INTERVAL:
            self._not_logged += 1
            return
        more = ""
        if self._not_logged and self._last is not None:
            more = f" ({self._not_logged} more pauses in the last {now - self._last:.0f}s)"
        self._last, self._not_logged = now, 0
        self._log.error(
            "%s: cannot accept a connection: %s; accepting paused for %gs, new connections wait%s",
            self.name,
            accept_failure_text(exc),
            delay,
            more,
        )


def listener_name(transport_name: str, sock: Any) -> str:
    """How a listener is named in the log: ``"h2 listener on 127.0.0.1:15008"``."""
    try:
        address = host_port(sock.getsockname())
    except (OSError, ValueError, AttributeError):  # (closed; or no socket at all)
        address = "?"
    return f"{transport_name} listener on {address}" if transport_name else f"listener on {address}"


class SocketServer:
    """Listening sockets whose connections go to ``handle(sock, peername)`` as
    non-blocking sockets with ``TCP_NODELAY`` (as asyncio's transports set it), each in
    a task of its own. The handler owns the socket."""

    def __init__(self, sockets: list[socket.socket], handle: Handler, name: str = "") -> None:
        self._loop = asyncio.get_running_loop()
        self._sockets = sockets
        self._handle = handle
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._paused = False
        self._pauses = AcceptPauseLog(listener_name(name, sockets[0]), logger)
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    @classmethod
    async def start(
        cls, host: str | None, port: int, handle: Handler, name: str = ""
    ) -> SocketServer:
        """Bind ``host:port`` (every address it resolves to) and start accepting;
        ``name`` (``h2``, ``tcp``) names the listener in the log.

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
                sock.listen(ACCEPT_BACKLOG)
                sock.setblocking(False)
            if not sockets:
                raise OSError(f"getaddrinfo({host!r}) returned empty list")
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, handle, name)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets."""
        return list(self._sockets)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BACKLOG):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    logger.warning("%s: accepting a connection failed: %s", self._pauses.name, exc)
                    return
                # Out of descriptors or memory: stop accepting for a while (the
                # connections wait in the backlog), as asyncio's servers do; one line
                # naming the listener and the limit, then one every 30 s at most.
                self._pauses.report(exc, ACCEPT_RETRY_DELAY)
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

    async def wait_closed(self) -> None:
        """Once :meth:`close`d, wait for the handlers of the connections it accepted."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
