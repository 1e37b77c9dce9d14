"""The one duration grammar of every quicmesh configuration (sidecar YAML, netem).

A duration is a non-negative decimal number (``5``, ``1.5``, ``.5``, ``5.``,
``1e-3``) followed, after optional white space, by an optional unit: ``us``
(also ``µs``), ``ms``, ``s`` or ``m``; no unit means seconds. Units are
case-insensitive and white space around the whole is ignored, so ``"20ms"``,
``" 2 ms "``, ``"1.5s"``, ``"500us"``, ``"1m"`` and ``"0.25"`` all parse. Each
configuration applies its own range on top (the sidecar 0-86400 s, netem
0-3600 s) and wraps the error in its own message.
"""

from __future__ import annotations

import math
import re

__all__ = ["DURATION_UNITS", "parse_duration"]

DURATION_UNITS = {"": 1.0, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
"""Seconds per unit; the empty unit is seconds."""

_DURATION = re.compile(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[-+]?[0-9]+)?)\s*([a-zµ]*)\s*")


def parse_duration(text: str) -> float:
    """Seconds from a duration such as ``"500ms"``, ``"2s"``, ``"1m"`` or ``"0.25"``.

    :raises ValueError: one line naming the text and what is wrong with it (not a
        number with a unit, an unknown unit, or too large to be finite).
    """
    if not isinstance(text, str):
        raise ValueError("expected a duration such as 5s or 500ms")
    match = _DURATION.fullmatch(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 5s or 500ms")
    unit = match.group(2)
    if unit not in DURATION_UNITS:
        raise ValueError(f"{text!r} has an unknown unit {unit!r}: use us, ms, s or m")
    seconds = float(match.group(1)) * DURATION_UNITS[unit]
    if not math.isfinite(seconds):
        raise ValueError(f"duration {text!r} is too large")
    return seconds
