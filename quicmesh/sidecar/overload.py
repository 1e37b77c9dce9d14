"""An overload manager in Envoy's spirit, for the inbound listener.

Resources are sampled once a second: the process's resident memory, its open
file descriptors and the bytes its inbound flows hold in buffers, each against a
limit (memory: ``overload_max_rss`` MiB if set; descriptors:
``overload_max_descriptors``, by default the soft ``RLIMIT_NOFILE``; buffers:
``max_buffered_total`` MiB).
The fullest resource decides the state:

* ``normal`` below :data:`STOP_ACCEPTING` of its limit;
* ``stop_accepting`` from there: new inbound streams are refused with 503
  (``sidecar is overloaded``), so existing flows keep their resources;
* ``shed`` from :data:`SHED`: also reset the newest tenth of the inbound flows
  each second until the pressure falls.

Plus plain caps checked for every new stream: streams per peer identity, streams
in total, connections per peer identity (:meth:`OverloadManager.admit_connection`).

And one action on the event loop's delay (:class:`StreamRateGovernor`): the
sidecar has a single event loop, so a peer that makes it parse and refuse
streams as fast as its credit allows delays every other peer's flows. A timer
probes the loop every :data:`LOOP_LAG_TICK` seconds; when it fires more than
``overload_max_loop_lag`` late, the identity that opened the most streams
lately gets its new-stream credit cut (the transport withholds MAX_STREAMS
from all its connections, :meth:`~quicmesh.transport.base.Transport.set_stream_rate`),
and it gets it back step by step once the loop is calm. An identity that no
policy of the listener allows, whose every stream is refused anyway, is held at
its own low rate from its first refused stream on (``denied_stream_rate``,
:meth:`StreamRateGovernor.deny`), without waiting for the loop to fall behind.
The state, the pressures and the refusals are exported in ``/metrics``. The
decision logic is sans-IO (:meth:`OverloadManager.update` takes the
measurements); :func:`measure` reads ``/proc``.
"""

from __future__ import annotations

import math
import os
import resource
from collections import Counter
from collections.abc import Callable
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
    :param max_connections_per_identity: connections one peer identity may hold.
    :param max_buffered_total: bytes all inbound flows may hold in buffers (None:
        not watched).
    :param max_buffered_per_connection: bytes the inbound flows of one connection
        may hold; beyond it the listener resets the connection's fullest flows.
    """

    max_streams_per_identity: int
    max_streams_total: int
    max_rss: int | None
    max_descriptors: int
    max_connections_per_identity: int = 256
    max_buffered_total: int | None = None
    max_buffered_per_connection: int | None = None
    state: str = "normal"
    pressure: dict[str, float] = field(
        default_factory=lambda: {"memory": 0.0, "descriptors": 0.0, "buffers": 0.0}
    )
    refusals: Counter[str] = field(default_factory=Counter)
    """Streams refused, by reason: ``per_identity``, ``total``, ``overloaded``,
    ``connections_per_identity``."""
    shed: int = 0
    """Flows reset to shed load."""
    buffer_resets: int = 0
    """Flows reset because their connection held more than ``max_buffered_per_connection``."""
    buffered: int = 0
    """Bytes the inbound flows held in buffers at the last sample."""
    _per_identity: Counter[str] = field(default_factory=Counter)
    _total: int = 0

    def update(self, rss: int, descriptors: int, buffered: int = 0) -> str:
        """Take a sample; return the new state."""
        self.buffered = buffered
        self.pressure["memory"] = rss / self.max_rss if self.max_rss else 0.0
        self.pressure["descriptors"] = descriptors / self.max_descriptors
        self.pressure["buffers"] = (
            buffered / self.max_buffered_total if self.max_buffered_total else 0.0
        )
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
        refused = self.refusal(identity)
        if refused is None:
            self._per_identity[identity] += 1
            self._total += 1
            return None
        reason, why = refused
        self.refusals[reason] += 1
        return why

    def refusal(self, identity: str) -> tuple[str, str] | None:
        """Why :meth:`admit` would refuse a new stream of ``identity`` now (the refusal
        counter's key and the message), or None; nothing is counted."""
        if self.state != "normal":
            return "overloaded", f"sidecar is overloaded ({self._worst()})"
        if self._total >= self.max_streams_total:
            return "total", f"max_streams_total ({self.max_streams_total}) reached"
        if self._per_identity.get(identity, 0) >= self.max_streams_per_identity:
            return "per_identity", (
                f"max_streams_per_identity ({self.max_streams_per_identity}) reached by {identity}"
            )
        return None

    def admit_connection(self, identity: str, connections: int) -> str | None:
        """A connection of ``identity`` carries its first stream while the identity
        holds ``connections`` live connections (this one excluded): the refusal, or None."""
        refusal = self.connection_refusal(identity, connections)
        if refusal is not None:
            self.refusals["connections_per_identity"] += 1
        return refusal

    def connection_refusal(self, identity: str, connections: int) -> str | None:
        """:meth:`admit_connection`'s answer, with nothing counted."""
        if connections < self.max_connections_per_identity:
            return None
        return (
            f"max_connections_per_identity ({self.max_connections_per_identity})"
            f" reached by {identity}"
        )

    def over_buffered(self, per_connection: dict[object, int]) -> list[object]:
        """The connections holding more than ``max_buffered_per_connection``."""
        cap = self.max_buffered_per_connection
        if cap is None:
            return []
        return [connection for connection, held in per_connection.items() if held > cap]

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


LOOP_LAG_TICK = 0.02
"""Seconds between two probes of the event loop's delay."""

DEFAULT_MAX_LOOP_LAG = 0.05
"""Event-loop delay (seconds) past which the heaviest identity is slowed down."""


@dataclass
class StreamRateGovernor:
    """Overload action on event-loop delay: slow down the heaviest identity (sans-IO).

    The caller reports every new inbound stream (:meth:`opened`) and every probe
    of the loop's delay (:meth:`observe`), and applies the rate changes
    :meth:`observe` returns to its transports. When ``late`` probes in a row
    fire more than ``max_lag`` late, the identity that opened the most streams in
    the last one to two ``window`` seconds, if it opened more than ``heavy`` a
    second, gets its rate cut to half of what it opened (not below ``floor``), at
    most once per ``hold`` seconds (AIMD's decrease). Identities opening fewer than
    ``heavy`` streams a second are never cut, however late the loop: their flows
    are the traffic being protected, and a machine busy for other reasons (or a
    flood of forged Initials, which no identity sends) would otherwise slow them
    down; a stall makes a light identity's flows arrive in a burst, which is why
    ``heavy`` is well above what a busy client opens. At the floor an identity
    costs the loop little (about 0.1-0.4 ms per refused stream here). Once every
    probe stayed under half of ``max_lag`` for ``recover`` seconds, each slowed
    identity's rate doubles, and goes back to the transport's own (``None``) when
    it reaches ``base_rate``.

    :param max_lag: seconds of delay that count as overload.
    :param base_rate: the transport's new-stream rate per identity (None: unlimited).
    """

    max_lag: float = DEFAULT_MAX_LOOP_LAG
    base_rate: float | None = 1000.0
    floor: float = 100.0
    heavy: float = 200.0
    late: int = 2
    hold: float = 0.2
    recover: float = 2.0
    window: float = 1.0
    rates: dict[str, float] = field(default_factory=dict)
    """Identities slowed down now, and their rates."""
    denied: dict[str, float] = field(default_factory=dict)
    """Identities no policy of the listener allows, held at their own low rate
    (:meth:`deny`): never cut further nor restored by the loop's delay."""
    cuts: int = 0
    """Rate cuts made."""
    lag: float = 0.0
    """The largest delay probed in the last full window (seconds)."""
    _opened: Counter[str] = field(default_factory=Counter)
    _previous: Counter[str] = field(default_factory=Counter)
    _window_start: float | None = None
    _window_lag: float = 0.0
    _last_cut: float = -math.inf
    _calm_since: float | None = None
    _late_in_a_row: int = 0

    def opened(self, identity: str) -> None:
        """A new inbound stream of ``identity`` reached the listener."""
        self._opened[identity] += 1

    def observe(self, delay: float, now: float) -> dict[str, float | None]:
        """A probe fired ``delay`` seconds late at ``now``; the rate changes to apply
        (identity: new rate, or None for the transport's own)."""
        if self._window_start is None:
            self._window_start = now
        elif now - self._window_start >= self.window:
            self.lag, self._window_lag = self._window_lag, 0.0
            self._previous, self._opened = self._opened, Counter()
            self._window_start = now
        self._window_lag = max(self._window_lag, delay)
        if delay > self.max_lag:
            self._calm_since = None
            self._late_in_a_row += 1
            if self._late_in_a_row >= self.late and now - self._last_cut >= self.hold:
                return self._cut(now)
            return {}
        self._late_in_a_row = 0
        if delay < self.max_lag / 2:
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= self.recover and self.rates:
                self._calm_since = now
                return self._restore()
        return {}

    def deny(self, identity: str, rate: float) -> dict[str, float | None]:
        """``identity`` is allowed nowhere: every stream it opens will be refused, so
        hold it at ``rate`` new streams a second whatever the loop's delay; the rate
        change to apply (none if it is held already)."""
        if self.denied.get(identity) == rate:
            return {}
        self.denied[identity] = rate
        self.rates.pop(identity, None)
        return {identity: rate}

    def review_denied(
        self, still_denied: Callable[[str], bool], rate: float
    ) -> dict[str, float | None]:
        """The configuration changed: release the held identities ``still_denied``
        no longer says are allowed nowhere (back to the transport's own rate), hold
        the others at ``rate``; the rate changes to apply."""
        changes: dict[str, float | None] = {}
        for identity, held in list(self.denied.items()):
            if not still_denied(identity):
                del self.denied[identity]
                changes[identity] = None
            elif held != rate:
                self.denied[identity] = changes[identity] = rate
        return changes

    def _cut(self, now: float) -> dict[str, float | None]:
        assert self._window_start is not None
        seconds = self.window + (now - self._window_start)
        recent = self._opened + self._previous
        for identity in self.denied:
            recent.pop(identity, None)
        if not recent:
            return {}
        identity, count = recent.most_common(1)[0]
        opened_rate = count / seconds
        if opened_rate <= self.heavy:
            return {}
        current = self.rates.get(identity, self.base_rate or math.inf)
        rate = max(self.floor, min(current, opened_rate) / 2)
        if rate >= current:
            return {}
        self.rates[identity] = rate
        self.cuts += 1
        self._last_cut = now
        return {identity: rate}

    def _restore(self) -> dict[str, float | None]:
        changes: dict[str, float | None] = {}
        for identity, rate in list(self.rates.items()):
            doubled = rate * 2
            if self.base_rate is None or doubled < self.base_rate:
                self.rates[identity] = changes[identity] = doubled
            else:
                del self.rates[identity]
                changes[identity] = None
        return changes
