"""A benchmark's helper process: a Python child started by multiprocessing ("spawn")
and driven over a pipe (the congestion receiver, the throughput servers).

The child's target is called as ``target(setup, control, parent_pid)``; it sends one
message once it is ready (its ports or addresses) and answers the parent's commands on
``control``. Whatever ends the parent's wait for that first message (an error, or
SIGTERM and Ctrl-C while the child starts) kills and reaps the child, and stopping a
child also stops multiprocessing's resource tracker (the process the "spawn" method
starts beside it) and waits for it: a benchmark that returns, or is stopped with ``kill
PID``, leaves no process of its own behind, not even for the few milliseconds the
tracker took to notice that its parent had gone.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from typing import Any

from .._signals import signals_deferred
from ..errors import QuicmeshError

Entered = Callable[[], contextlib.AbstractContextManager[object]]
"""A context manager factory entered around the child's start."""

STOP_GRACE = 10.0
"""Seconds a child has to end after the parent's stop command, before it is killed."""


class ChildUnanswered(QuicmeshError):
    """The child process ended, or did not answer within the time given."""


class SpawnedChild:
    """One child process and the parent's end of its control pipe."""

    def __init__(
        self,
        target: Callable[[Any, Connection, int], None],
        setup: object,
        name: str,
        *,
        started_in: Entered = contextlib.nullcontext,
        start_timeout: float = 60.0,
    ) -> None:
        """Start ``target`` and wait up to ``start_timeout`` seconds for its first message,
        kept as :attr:`ready`; ``started_in`` is entered around the start (the link's
        namespace the child is created in). Raises :class:`ChildUnanswered`."""
        context = multiprocessing.get_context("spawn")
        self._control, child_end = context.Pipe()
        self._process = context.Process(
            target=target, args=(setup, child_end, os.getpid()), name=name, daemon=True
        )
        try:
            # A signal inside start() (SIGTERM, Ctrl-C) acts once it has returned: cut
            # short, the child found its pipe empty and died with a traceback, unreaped.
            with signals_deferred(), started_in():
                self._process.start()
            self.ready: Any = self._answer(start_timeout)
        except BaseException:
            self.kill()
            raise
        finally:
            child_end.close()

    def ask(self, message: object, timeout: float) -> Any:
        """Send ``message`` and return the child's answer."""
        try:
            self._control.send(message)
        except OSError:
            raise ChildUnanswered("it has ended") from None
        return self._answer(timeout)

    def stop(self, message: object) -> None:
        """Send the stop command ``message``, wait for the child to end (killing it after
        :data:`STOP_GRACE` seconds), and stop the resource tracker."""
        with contextlib.suppress(OSError):
            self._control.send(message)
        self._process.join(STOP_GRACE)
        self.kill()

    def kill(self) -> None:
        """End the child at once (if it still runs), reap it, and stop the resource tracker."""
        if self._process.pid is not None:  # (started)
            if self._process.is_alive():
                self._process.kill()
            self._process.join()
        self._control.close()
        stop_resource_tracker()

    def _answer(self, timeout: float) -> Any:
        try:
            if self._control.poll(timeout):
                return self._control.recv()
        except (EOFError, OSError):
            raise ChildUnanswered("it has ended") from None
        raise ChildUnanswered(f"it did not answer within {timeout:g} s")


def stop_resource_tracker() -> None:
    """Stop multiprocessing's resource tracker and wait for it to end (the next spawned
    child starts another), unless another child of this process is alive: each holds the
    tracker's pipe, so the wait would last until they had all ended. Left alone the
    tracker ends only after this process has, when it reads the end of its pipe.

    Stopping it releases whatever it still tracks (a ``SharedMemory`` block, a named
    semaphore), as this process's exit would: the benchmarks that use this hold none.
    Its ``_stop`` is private (CPython 3.8 and later): where it is missing, the tracker is
    left to end on its own."""
    if multiprocessing.active_children():
        return
    stop = getattr(getattr(resource_tracker, "_resource_tracker", None), "_stop", None)
    if stop is not None:
        stop()
