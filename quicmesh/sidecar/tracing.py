"""Flow ids that cross the hop: W3C Trace Context ``traceparent`` headers.

Sidecar A gives every outbound flow a :class:`TraceContext` and sends it in the
CONNECT request as ``traceparent`` (as HBONE does); sidecar B reads it back, so
both access-log lines of one flow carry the same ``flow_id`` (the trace id). A
CONNECT that already carries a valid ``traceparent`` (a client of the library, a
traced proxy) keeps its trace id, so a trace can follow the flow. Sans-IO: plain
parsing and formatting, randomness injected.

The format (https://www.w3.org/TR/trace-context/#traceparent-header)::

    traceparent: 00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

HEADER = "traceparent"
"""The CONNECT header that carries the flow's trace context."""

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_INVALID_ID = re.compile(r"0+")
_SYSTEM_RANDOM = random.SystemRandom()


@dataclass(frozen=True)
class TraceContext:
    """One hop of a trace: the trace id (the flow id in access logs) and this hop's span id."""

    trace_id: str
    """32 lower-case hex digits, not all zero."""
    parent_id: str
    """16 lower-case hex digits, not all zero: the span of the sender."""
    flags: str = "01"
    """2 hex digits; ``01`` means sampled."""

    @classmethod
    def new(cls, rng: random.Random | None = None) -> TraceContext:
        """A new trace (a flow that arrived without one): its ids from ``rng``, by
        default from the system's random source in one read for both."""
        if rng is not None:
            return cls(_random_id(rng, 128), _random_id(rng, 64))
        while True:
            ids = os.urandom(24)
            if any(ids[:16]) and any(ids[16:]):
                return cls(ids[:16].hex(), ids[16:].hex())

    def child(self, rng: random.Random = _SYSTEM_RANDOM) -> TraceContext:
        """The context for the next hop: same trace id, a new span id."""
        return TraceContext(self.trace_id, _random_id(rng, 64), self.flags)

    def header(self) -> str:
        """The ``traceparent`` value (version 00)."""
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


def parse_traceparent(value: str) -> TraceContext:
    """Parse a ``traceparent`` header value.

    Follows the W3C rules: version ``ff`` and all-zero ids are invalid; a version
    above 00 may carry more fields after the four known ones (they are ignored).

    :raises ValueError: the value is not a valid ``traceparent``.
    """
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"not a W3C traceparent: {value[:80]!r}")
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        raise ValueError(f"traceparent version {version} with this layout is invalid")
    if _INVALID_ID.fullmatch(trace_id) or _INVALID_ID.fullmatch(parent_id):
        raise ValueError("traceparent trace-id and parent-id must not be all zero")
    return TraceContext(trace_id, parent_id, flags)


def continue_or_start(headers: dict[str, str], rng: random.Random | None = None) -> TraceContext:
    """The trace of a received flow: its ``traceparent`` if valid, else a new trace."""
    value = headers.get(HEADER)
    if value is not None:
        try:
            return parse_traceparent(value)
        except ValueError:
            pass
    return TraceContext.new(rng)


def _random_id(rng: random.Random, bits: int) -> str:
    while True:
        value = rng.getrandbits(bits)
        if value:
            return f"{value:0{bits // 4}x}"
