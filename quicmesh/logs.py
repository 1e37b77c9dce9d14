"""Logging helpers shared by every layer.

:class:`RateLimitedLog` keeps a line per kind of event an attacker can cause at
will (refused Initials, refused streams) from flooding the log.
:func:`quicmesh_loggers` and :func:`set_log_level` are the levels of quicmesh's own
loggers as an operator reads and changes them at run time (the admin's ``/logging``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable


class RateLimitedLog:
    """Log one line per kind at most every ``interval`` seconds; the next line says
    how many were suppressed since the last one, and how long ago that was (not "in
    the last interval": the next line may come much later). For refusals an attacker
    can cause at will.
    """

    def __init__(
        self,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def log(
        self, level: int, kind: str, message: str, *args: object, exc_info: bool = False
    ) -> bool:
        """Log ``message % args`` (with the exception being handled if ``exc_info``)
        unless ``kind`` was logged in the last interval; return whether it was logged."""
        now = self._clock()
        if now < self._next.get(kind, float("-inf")):
            self._suppressed[kind] += 1
            return False
        self._next[kind] = now + self._interval
        last, self._last[kind] = self._last.get(kind, now), now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += (
                f" ({suppressed} more like this since the last one logged, {now - last:.0f}s ago)"
            )
        self._logger.log(level, message, *args, exc_info=exc_info)
        return True


LEVELS = {
    "trace": logging.DEBUG,  # (Envoy's finest level; Python's is debug)
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}
"""The level names an operator may give (Envoy's, and Python's ``warning``)."""

ROOT_LOGGER = "quicmesh"


def quicmesh_loggers() -> dict[str, str]:
    """quicmesh's loggers made so far (``quicmesh`` and those below it), by name, with
    the level each logs at now (its effective level, lower case; ``off`` above
    critical)."""
    below = (
        name
        for name, logger in logging.Logger.manager.loggerDict.items()
        if name.startswith(ROOT_LOGGER + ".") and isinstance(logger, logging.Logger)
    )
    names = [ROOT_LOGGER, *sorted(below)]
    return {name: _level_name(logging.getLogger(name).getEffectiveLevel()) for name in names}


def set_log_level(level: str, name: str | None = None) -> None:
    """Log at ``level`` (a name of :data:`LEVELS`) from now on: in logger ``name`` (one
    of :func:`quicmesh_loggers`), or in every one of them.

    :raises ValueError: an unknown level or logger, named (nothing changed).
    """
    check_log_level(level, name)
    for each in [name] if name is not None else quicmesh_loggers():
        logging.getLogger(each).setLevel(LEVELS[level.lower()])


def check_log_level(level: str, name: str | None = None) -> None:
    """What :func:`set_log_level` checks first.

    :raises ValueError: an unknown level or logger, named.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown level {level!r}: one of {', '.join(LEVELS)}")
    known = quicmesh_loggers()
    if name is not None and name not in known:
        raise ValueError(f"unknown logger {name!r}: one of {', '.join(known)}")


def _level_name(level: int) -> str:
    if level > logging.CRITICAL:
        return "off"
    return logging.getLevelName(level).lower()
