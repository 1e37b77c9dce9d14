"""Logging helpers shared by every layer.

:class:`RateLimitedLog` keeps a line per kind of event an attacker can cause at
will (refused Initials, refused streams) from flooding the log.
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
