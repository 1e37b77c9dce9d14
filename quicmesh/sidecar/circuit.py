"""Circuit breakers: a cluster's limits on connections, streams and pending opens.

Sans-IO slot counts. Each ``try_*`` method either takes a slot and returns True, or
returns False; the caller refuses the flow and counts the overflow where the
cluster's counters live (``ClusterStats.overflows``: the refusal's other ways, a flow
timing out queued at ``max_connections`` say, are counted there too). Every taken
slot is given back with the matching ``release_*``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import CircuitBreakerConfig

LIMITS = ("max_connections", "max_concurrent_streams", "max_pending_opens")
"""Names of the limits, as used in overflow counters and metric labels."""


@dataclass
class CircuitBreaker:
    """Slots in use, per limit, for one cluster."""

    limits: CircuitBreakerConfig
    connections: int = 0
    streams: int = 0
    pending: int = 0

    def try_open_connection(self) -> bool:
        """Take a connection slot (a new peer connection)."""
        if self.connections >= self.limits.max_connections:
            return False
        self.connections += 1
        return True

    def release_connection(self) -> None:
        """A peer connection closed."""
        self.connections = max(0, self.connections - 1)

    def try_open_stream(self) -> bool:
        """Take a stream slot (a flow through the cluster)."""
        if self.streams >= self.limits.max_concurrent_streams:
            return False
        self.streams += 1
        return True

    def release_stream(self) -> None:
        """A flow ended."""
        self.streams = max(0, self.streams - 1)

    def try_begin_pending(self) -> bool:
        """Take a pending-open slot (a flow waiting for a connection or stream credit)."""
        if self.pending >= self.limits.max_pending_opens:
            return False
        self.pending += 1
        return True

    def end_pending(self) -> None:
        """A pending open finished, either way."""
        self.pending = max(0, self.pending - 1)
