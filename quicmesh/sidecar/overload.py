"""An overload manager in Envoy's spirit, for the inbound listener.

Resources are sampled once a second: the process's resident memory and its open
file descriptors, each against a limit (memory: ``overload_max_rss`` MiB if set;
descriptors: ``overload_max_descriptors``, by default the soft ``RLIMIT_NOFILE``).
The fullest resource decides the state:

* ``normal`` below :data:`STOP_ACCEPTING` of its limit;
* ``stop_accepting`` from there: new inbound streams are refused with 503
  (``sidecar is overloaded``), so existing flows keep their resources;
* ``shed`` from :data:`SHED`: also reset the newest tenth of the inbound flows
  each second until the pressure falls.

Plus two plain caps checked for every new stream: streams per peer identity and
streams in total. The state, the pressures and the refusals are exported in
``/metrics``. The decision logic is sans-IO (:meth:`OverloadManager.update` takes
the measurements); :func:`measure` reads ``/proc``.
"""

from __future__ import annotations

import os
import resource
from collections import Counter
from dataclasses import dataclass, field

STOP_ACCEPTING = 0.90
"""Fraction of a resource's limit from which new streams are refused."""

SHED = 0.98
"""Fraction of a resource's limit from which the newest flows are reset."""

STATES = ("normal", "stop_accepting", "shed")


def default_max_descriptors() -> int:
    """The soft limit on open file descriptors (``ulimit -n``)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def measure() -> tuple[int, int]:
    """(resident bytes, open descriptors) of this process, from ``/proc``."""
    try:
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        descriptors = len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0, 0
    return rss, descriptors


@dataclass
class OverloadManager:
    """Limits of one inbound listener and its overload state.

    :param max_streams_per_identity: concurrent inbound streams one peer identity
        may hold (over all its connections).
    :param max_streams_total: concurrent inbound streams in all.
    :param max_rss: resident bytes counted as full memory (None: not watched).
    :param max_descriptors: descriptors counted as full.
    """

    max_streams_per_identity: int
    max_streams_total: int
    max_rss: int | None
    max_descriptors: int
    state: str = "normal"
    pressure: dict[str, float] = field(default_factory=lambda: {"memory": 0.0, "descriptors": 0.0})
    refusals: Counter[str] = field(default_factory=Counter)
    """Streams refused, by reason: ``per_identity``, ``total``, ``overloaded``."""
    shed: int = 0
    """Flows reset to shed load."""
    _per_identity: Counter[str] = field(default_factory=Counter)
    _total: int = 0

    def update(self, rss: int, descriptors: int) -> str:
        """Take a sample; return the new state."""
        self.pressure["memory"] = rss / self.max_rss if self.max_rss else 0.0
        self.pressure["descriptors"] = descriptors / self.max_descriptors
        worst = max(self.pressure.values())
        if worst >= SHED:
            self.state = "shed"
        elif worst >= STOP_ACCEPTING:
            self.state = "stop_accepting"
        else:
            self.state = "normal"
        return self.state

    def admit(self, identity: str) -> str | None:
        """Count a new stream of ``identity`` in, or return why it is refused."""
        if self.state != "normal":
            reason, why = "overloaded", f"sidecar is overloaded ({self._worst()})"
        elif self._total >= self.max_streams_total:
            reason, why = "total", f"max_streams_total ({self.max_streams_total}) reached"
        elif self._per_identity[identity] >= self.max_streams_per_identity:
            reason = "per_identity"
            why = (
                f"max_streams_per_identity ({self.max_streams_per_identity}) reached by {identity}"
            )
        else:
            self._per_identity[identity] += 1
            self._total += 1
            return None
        self.refusals[reason] += 1
        return why

    def release(self, identity: str) -> None:
        """A stream admitted by :meth:`admit` ended."""
        self._total -= 1
        self._per_identity[identity] -= 1
        if self._per_identity[identity] <= 0:
            del self._per_identity[identity]

    @property
    def streams(self) -> int:
        """Inbound streams admitted and not yet ended."""
        return self._total

    def _worst(self) -> str:
        name = max(self.pressure, key=lambda key: self.pressure[key])
        return f"{name} at {self.pressure[name]:.0%} of its limit"
