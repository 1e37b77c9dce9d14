"""Hear a TCP socket's error (its peer's reset) while nothing reads the socket.

asyncio stops watching a socket whose transport's reading is paused (backpressure), and
a reset that arrives then is heard only once reading resumes: a flow whose other end had
stopped taking bytes held its resources until its idle timeout (an hour by default). A
:class:`SocketErrorWatch` has the socket in an epoll instance of its own, for its error
(EPOLLERR) alone, and the event loop watches that instance: the loop's own registration
of the socket is left alone, and nothing happens while the connection is well. The
native engine's splice watches the same way (tokio's ``Interest::ERROR``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from collections.abc import Callable


class SocketErrorWatch:
    """Calls ``on_error`` once, with the socket's error as an OSError, if one comes
    before :meth:`close`. It stops at its first wake-up: an error, or a clean close both
    ways (EPOLLHUP alone, which is none). Costs three system calls to make (an epoll
    instance, the socket in it, the instance in the loop) and two to close.

    The error is read (``SO_ERROR``), so it is cleared for whoever reads the socket next:
    the caller fails the connection on it."""

    def __init__(self, sock: socket.socket, on_error: Callable[[OSError], None]) -> None:
        self._sock = sock
        self._on_error = on_error
        self._loop = asyncio.get_running_loop()
        self._epoll: select.epoll | None = select.epoll(1)
        try:
            self._epoll.register(sock.fileno(), select.EPOLLERR)
            self._loop.add_reader(self._epoll.fileno(), self._woken)
        except (OSError, ValueError):  # (closed meanwhile: uvloop's stand-in says -1)
            self.close()

    def _woken(self) -> None:
        error: OSError | None = None
        if self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                for _, events in self._epoll.poll(0):
                    if events & select.EPOLLERR:
                        number = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if number:
                            error = OSError(number, os.strerror(number))
        self.close()
        if error is not None:
            self._on_error(error)

    def close(self) -> None:
        """Stop watching (safe to call more than once)."""
        if self._epoll is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
