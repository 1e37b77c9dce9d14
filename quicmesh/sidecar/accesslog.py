"""The JSON access log: one line per flow, written when the flow ends.

A :class:`FlowRecord` says when a flow started, how long it lasted, the bytes it
carried each way, where it went (target, endpoint, transport), who asked (peer
identity) and how it ended (:class:`Outcome`, with a reason when it did not
complete). :class:`AccessLog` writes records to stdout or a file.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import sys
from dataclasses import asdict, dataclass
from typing import TextIO

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
    """(inbound) The destination refused or did not answer the TCP connect."""
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

    def to_json(self) -> str:
        """The record as one JSON line (no newline)."""
        data = asdict(self)
        data["start"] = (
            datetime.datetime.fromtimestamp(self.start, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        data["duration_ms"] = round(self.duration * 1000, 3)
        del data["duration"]
        data["outcome"] = self.outcome.value
        return json.dumps(data, separators=(",", ":"))


class AccessLog:
    """Writes :class:`FlowRecord` lines to stdout (``"-"``), a file, or nowhere (``None``)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file: TextIO | None = None
        if path == "-":
            self._file = sys.stdout
        elif path is not None:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def write(self, record: FlowRecord) -> None:
        """Append one line and flush, so a crash loses no finished flow."""
        if self._file is None:
            return
        try:
            self._file.write(record.to_json() + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:
            logger.warning("cannot write the access log: %s", exc)

    def close(self) -> None:
        """Close the file (stdout stays open)."""
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None
