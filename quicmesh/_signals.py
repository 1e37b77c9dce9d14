"""Signals in the commands' own steps: handlers set for a block, and steps a signal must not
cut in two (making or deleting a network namespace, removing a scratch directory).

:func:`~quicmesh.sidecar.launch.terminate_as_exit` turns SIGTERM into SystemExit for a
command's body; what is here keeps that SystemExit out of the steps it would break.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any


@contextlib.contextmanager
def signal_handlers(
    signums: tuple[signal.Signals, ...], handler: Callable[[int, FrameType | None], None]
) -> Iterator[None]:
    """``handler`` for ``signums`` for the block, the earlier handlers put back after it
    (outside the main thread, where Python takes no handler, nothing is set).

    The handlers change all together (:func:`_signals_blocked`): one by one, a signal
    that came between two changes met an old handler where the block had begun (or a
    new one where it had ended), and one whose handler raised there (Ctrl-C,
    SystemExit) left the handlers set so far in place for good."""
    previous: dict[signal.Signals, Any] = {}
    try:
        with _signals_blocked(signums):
            try:
                for signum in signums:
                    previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread (the first one fails)
                pass
        # (A signal that came meanwhile is handled now, by ``handler``.)
        yield
    finally:
        with _signals_blocked(signums):
            for signum, before in previous.items():
                # (None: the handler was not set from Python; the default is the nearest.)
                signal.signal(signum, signal.SIG_DFL if before is None else before)


@contextlib.contextmanager
def _signals_blocked(signums: tuple[signal.Signals, ...]) -> Iterator[None]:
    """Hold ``signums`` back in the kernel (this thread's signal mask) for the block;
    one that came meanwhile is delivered as the old mask comes back, to the handler in
    force then (Python runs it before ``pthread_sigmask`` returns). (Only this thread's:
    another thread that does not block them can still take one meanwhile, and Python
    runs the handler in force at its next check; if that raises during an install,
    :func:`signal_handlers` still puts back each handler it had changed.)"""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back for the block, then act on the first that
    came once it ends (the handler in force then raises, or the signal's default stops
    the process): for a step a signal must not cut in two. A SystemExit between
    ``ip netns add`` and its end left the namespace behind (``ip`` ran on and made it
    after the link's tear-down had looked), one in the middle of the tear-down left the
    namespaces not yet deleted, and one inside a temporary directory's removal left it,
    with a CA's private key, in place. Outside the main thread it does nothing."""
    taken = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    received: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    try:
        with signal_handlers(taken, note):
            yield
    finally:
        if received:
            signal.raise_signal(received[0])


@contextlib.contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    """A private temporary directory (0700) for the block, removed at its end with
    signals held back (:func:`signals_deferred`): ``tempfile.TemporaryDirectory``
    forgets its directory before removing it, so a SystemExit between the two left it,
    and the benchmarks keep a CA's private key there."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        with signals_deferred():
            shutil.rmtree(path, ignore_errors=True)
