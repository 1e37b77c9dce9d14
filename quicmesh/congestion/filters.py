"""The windowed max filter BBR uses for bandwidth and ACK aggregation.

BBR (draft-ietf-ccwg-bbr-01) keeps the maximum of its recent samples over a window
measured in events it counts itself: ProbeBW cycles for the bandwidth filter,
round trips for the ACK-aggregation filter. Like the Linux implementation, this
filter keeps two slots, the current period's maximum and the previous one's, so
a sample is remembered for at least one and at most two periods.
"""

from __future__ import annotations


class WindowedMaxFilter:
    """The maximum of the samples seen in the current and previous periods."""

    def __init__(self) -> None:
        self._previous = 0.0
        self._current = 0.0

    @property
    def best(self) -> float:
        """The largest sample in the window, or 0.0 when there is none."""
        return max(self._previous, self._current)

    def update(self, sample: float) -> float:
        """Add a sample to the current period and return the new :attr:`best`."""
        if sample > self._current:
            self._current = sample
        return self.best

    def advance(self) -> None:
        """Start a new period, forgetting the oldest one."""
        self._previous = self._current
        self._current = 0.0

    def reset(self, value: float = 0.0) -> None:
        """Forget every sample, keeping ``value`` as the only one."""
        self._previous = 0.0
        self._current = value
