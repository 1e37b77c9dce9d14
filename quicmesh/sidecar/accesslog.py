"""The access log: one line per flow, written when the flow ends.

A :class:`FlowRecord` says when a flow started, which flow it was (``flow_id``:
the W3C trace id both sidecars log, see :mod:`.tracing`), how long it lasted,
the bytes it carried each way, where it came from (``downstream``) and went
(target, endpoint, transport), who asked (peer identity) and how it ended
(:class:`Outcome`, with a reason when it did not complete). :class:`AccessLog`
writes records to stdout or a file, as JSON (the default), in the ``text``
layout, or through a template of ``{field}`` names (:func:`parse_log_format`),
and reopens its file on request (SIGUSR1, after logrotate moved it).
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import json
import logging
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from ..errors import ConfigError, os_error_text
from ..logs import RateLimitedLog

logger = logging.getLogger("quicmesh.sidecar.accesslog")


class Outcome(enum.Enum):
    """How a flow ended."""

    COMPLETED = "completed"
    """Both directions finished cleanly."""
    RESET = "reset"
    """The flow was aborted in the middle (either side, or a lost connection)."""
    REFUSED = "refused"
    """The inbound policy or the peer sidecar refused the destination or identity."""
    OVERFLOW = "overflow"
    """A circuit breaker was full."""
    NO_HEALTHY_ENDPOINT = "no_healthy_endpoint"
    """Every endpoint of the cluster was unhealthy or ejected."""
    CONNECT_FAILED = "connect_failed"
    """No endpoint could be reached within the retries."""
    UNREACHABLE = "destination_unreachable"
    """The destination refused or did not answer the TCP connect (inbound), or the peer
    sidecar answered 502 for that reason (outbound)."""
    DRAINING = "draining"
    """The sidecar was draining and took no new flows."""


@dataclass
class FlowRecord:
    """One access-log line."""

    start: float
    """Wall-clock start, seconds since the epoch."""
    duration: float
    listener: str
    direction: str
    """``outbound`` (local client to a cluster) or ``inbound`` (peer sidecar to a destination)."""
    downstream: str
    target: str
    transport: str
    peer_identity: str
    endpoint: str
    bytes_sent: int
    """Bytes towards the destination (into the tunnel outbound, to the app inbound)."""
    bytes_received: int
    """Bytes back from the destination."""
    outcome: Outcome
    reason: str = ""
    original_destination: str = ""
    """(captured flows) The address the application dialled, before the capture rules."""
    flow_id: str = ""
    """The flow's trace id, the same in both sidecars' lines (``traceparent`` on the hop)."""
    suppressed: int = 0
    """(refused flows) Lines of the same peer identity and outcome left out since its
    last line, by :class:`RefusalLogLimit`."""

    def fields(self) -> dict[str, Any]:
        """The values of a log line, by the names of :data:`FIELDS`."""
        # Built by hand: dataclasses.asdict deep-copies every value, which was a
        # tenth of the sidecar's time under stream churn (issue 13).
        return {
            "start": datetime.datetime.fromtimestamp(self.start, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "flow_id": self.flow_id,
            "listener": self.listener,
            "direction": self.direction,
            "downstream": self.downstream,
            "target": self.target,
            "transport": self.transport,
            "peer_identity": self.peer_identity,
            "endpoint": self.endpoint,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "original_destination": self.original_destination,
            "duration_ms": round(self.duration * 1000, 3),
            "suppressed": self.suppressed,
        }

    def to_json(self) -> str:
        """The record as one JSON line (no newline)."""
        return json.dumps(self.fields(), separators=(",", ":"))

    def to_text(self, template: str) -> str:
        """The record through a template checked by :func:`parse_log_format`; empty is ``-``."""
        values = {
            name: "-" if value == "" else _CONTROL.sub(_escape, str(value))
            for name, value in self.fields().items()
        }
        return template.format_map(values)


_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    """A control character (a newline in a reason) as ``\\xNN``: a record stays one line."""
    return f"\\x{ord(match.group()):02x}"


FIELDS = (
    "start",
    "flow_id",
    "listener",
    "direction",
    "downstream",
    "target",
    "transport",
    "peer_identity",
    "endpoint",
    "bytes_sent",
    "bytes_received",
    "outcome",
    "reason",
    "original_destination",
    "duration_ms",
    "suppressed",
)
"""The fields of a log line, in JSON order; a template names them as ``{field}``."""

JSON = "json"
"""The default format: one JSON object per line."""

TEXT = (
    "[{start}] {flow_id} {direction} {listener} {downstream} -> {target} {transport} "
    "{endpoint} {peer_identity} {outcome} {bytes_sent} {bytes_received} {duration_ms}ms "
    "{reason}"
)
"""The ``text`` format: space-separated fields, ``-`` for an empty one, the reason last."""


def parse_log_format(value: object) -> str:
    """``json``, ``text`` or a template such as ``"{start} {flow_id} {outcome}"``.

    Returns ``"json"`` or the template. A template is one line naming only
    :data:`FIELDS` in braces (``{{`` and ``}}`` are literal braces), without
    conversions or format specifications.

    :raises ValueError: the format is not one of these.
    """
    if not isinstance(value, str) or not value:
        raise ValueError("expected json, text or a template of {field} names")
    if value == JSON:
        return JSON
    if value == "text":
        return TEXT
    if _CONTROL.search(value):
        raise ValueError("a template must be one line of printable characters")
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"invalid template: {exc}") from None
    names = [name for _, name, _, _ in parts if name is not None]
    if not names:
        raise ValueError("expected json, text or a template naming at least one {field}")
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in FIELDS:
            raise ValueError(f"unknown field {{{name}}} (known: {', '.join(FIELDS)})")
        if spec or conversion:
            raise ValueError(f"{{{name}}}: conversions and format specifications are not allowed")
    return value


REFUSED_OUTCOMES = frozenset({Outcome.REFUSED, Outcome.OVERFLOW, Outcome.DRAINING})
"""Outcomes of flows the sidecar refused: a peer can cause them at will."""

REFUSAL_LINES_PER_SECOND = 10.0
"""Access-log lines per second for the refused flows of one peer identity and outcome."""


class RefusalLogLimit:
    """Keeps refused flows from flooding the access log (sans-IO).

    A peer can make the sidecar refuse streams as fast as it may open them (a
    policy refusal, a limit, rapid reset), and each refusal was a line. Per
    (peer identity, outcome) of :data:`REFUSED_OUTCOMES`, lines are let through
    a token bucket of ``rate`` per second (burst ``burst``); a line left out is
    counted in :attr:`suppressed` (by outcome) and the next line of its key says
    how many were left out before it (:attr:`FlowRecord.suppressed`), like
    Envoy's sampled access logs. Other flows are always written.

    :param max_keys: the most keys tracked; beyond it the full (idle) buckets are dropped.
    """

    def __init__(
        self,
        rate: float = REFUSAL_LINES_PER_SECOND,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else 2 * rate
        self._clock = clock
        self._max_keys = max_keys
        # key -> [tokens, last refill time, lines left out since the last line]
        self._buckets: dict[tuple[str, Outcome], list[float]] = {}
        self.suppressed: Counter[str] = Counter()
        """Lines left out, by outcome value."""

    def admit(self, record: FlowRecord) -> bool:
        """Whether to write ``record``; sets its ``suppressed`` count when it is written."""
        if record.outcome not in REFUSED_OUTCOMES:
            return True
        now = self._clock()
        key = (record.peer_identity, record.outcome)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._prune(now)
            bucket = self._buckets[key] = [self.burst, now, 0.0]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            bucket[2] += 1
            self.suppressed[record.outcome.value] += 1
            return False
        bucket[0] = tokens - 1
        record.suppressed = int(bucket[2])
        bucket[2] = 0
        return True

    def _prune(self, now: float) -> None:
        """Drop the keys whose buckets have refilled (nothing left out to report)."""
        for key, (tokens, at, left_out) in list(self._buckets.items()):
            if not left_out and tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[key]
        if len(self._buckets) >= self._max_keys:
            self._buckets.clear()  # all busy: forget the counts rather than grow


class AccessLog:
    """Writes :class:`FlowRecord` lines to stdout (``"-"``), a file, or nowhere (``None``).

    Refused flows go through a :class:`RefusalLogLimit` (:attr:`refusals`).

    :param log_format: ``"json"`` or a template returned by :func:`parse_log_format`.
    """

    def __init__(self, path: str | None, log_format: str = JSON) -> None:
        self.path = path
        self.log_format = log_format
        self.refusals = RefusalLogLimit()
        """The limit on refused flows' lines, and its count of lines left out."""
        self._write_failures = RateLimitedLog(logger)
        """A log that cannot be written (a full disk, a closed pipe) says so once every
        10 s, not once a flow."""
        self._file: TextIO | None = None
        if path == "-":
            self._file = sys.stdout
        elif path is not None:
            try:
                self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            except OSError as exc:
                raise ConfigError(
                    f"access_log.path {path}: cannot open for appending: {os_error_text(exc)}"
                ) from None

    def format(self, record: FlowRecord) -> str:
        """One line (no newline) in this log's format."""
        if self.log_format == JSON:
            return record.to_json()
        return record.to_text(self.log_format)

    def write(self, record: FlowRecord) -> None:
        """Append one line and flush, so a crash loses no finished flow."""
        if self._file is None or not self.refusals.admit(record):
            return
        try:
            self._file.write(self.format(record) + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:
            self._write_failures.log(
                logging.WARNING, "write", "cannot write the access log: %s", exc
            )

    def reopen(self) -> None:
        """Open the file again by its path (after logrotate moved it); stdout stays.

        If the path cannot be opened, the current file is kept and a warning logged.
        """
        if self.path is None or self.path == "-" or self._file is None:
            return
        try:
            new = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        except OSError as exc:
            logger.warning("cannot reopen the access log %s: %s", self.path, exc.strerror or exc)
            return
        old, self._file = self._file, new
        _close_file(old)
        logger.info("reopened the access log %s", self.path)

    def close(self) -> None:
        """Close the file (stdout stays open). A line that could not be written (a full
        disk) stays in the file's buffer, and the flush at close fails again: it is
        dropped with a warning, so that a drain still ends."""
        if self._file is not None and self._file is not sys.stdout:
            _close_file(self._file)
        self._file = None


def _close_file(file: TextIO) -> None:
    """Close an access-log file; what its buffer still holds is lost if that fails."""
    try:
        file.close()
    except OSError as exc:
        logger.warning("cannot write the access log (lines lost at close): %s", exc)
        with contextlib.suppress(OSError):
            file.close()  # (the descriptor: a second close does not flush again)
