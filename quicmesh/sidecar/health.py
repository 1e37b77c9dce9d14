"""Endpoint health: active checks and outlier ejection, as a sans-IO state machine.

:class:`EndpointHealth` is fed results (a health check passed or failed, a
connect succeeded or failed) with the current time ``now`` and answers whether
the endpoint may take flows. :class:`HealthTracker` holds one per endpoint of a
cluster and enforces ``max_ejection_percent``. Neither touches a clock or a
socket; the runtime passes ``loop.time()``.

States: ``healthy``; ``unhealthy`` (``unhealthy_threshold`` active checks in a
row failed, until ``healthy_threshold`` pass); ``ejected`` (``consecutive_connect_failures``
connect failures in a row, for ``base_ejection_time`` times a multiplier: the
ejections so far, capped at ten, less one for each ``base_ejection_time`` the endpoint
then stayed un-ejected without a connect failure; Envoy takes one off for each
outlier-detection ``interval`` a host is not ejected, and quicmesh has no such key).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from .config import HealthCheckConfig, OutlierDetectionConfig

MAX_EJECTION_MULTIPLIER = 10
"""An endpoint ejected again and again stays out at most this many base ejection times."""


class HealthState(enum.Enum):
    """Whether an endpoint may take flows."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    EJECTED = "ejected"


@dataclass
class EndpointHealth:
    """The health of one endpoint."""

    outlier: OutlierDetectionConfig
    check: HealthCheckConfig | None = None
    failing_checks: int = 0
    passing_checks: int = 0
    active_unhealthy: bool = False
    connect_failures: int = 0
    ejection_multiplier: int = 0
    """The last ejection's length in ``base_ejection_time``, less one for each
    ``base_ejection_time`` of clean stretch since (:meth:`_forgive`): the next ejection
    lasts one more (at most :data:`MAX_EJECTION_MULTIPLIER`)."""
    clean_since: float | None = None
    """When the stretch without ejection or connect failure began (the last ejection's
    end, or the last failure), or None before any failure."""
    ejected_until: float | None = None
    our_certificate_refused: bool = False
    """Every connect failure of the current run was the peer refusing our certificate:
    an ejection they caused ends when our certificate changes
    (:meth:`HealthTracker.our_identity_changed`)."""

    def state(self, now: float) -> HealthState:
        """The state at time ``now`` (an ejection ends by itself)."""
        if self.ejected_until is not None:
            if now < self.ejected_until:
                return HealthState.EJECTED
            self.ejected_until = None
        return HealthState.UNHEALTHY if self.active_unhealthy else HealthState.HEALTHY

    def is_available(self, now: float) -> bool:
        """Whether the endpoint may take new flows at ``now``."""
        return self.state(now) is HealthState.HEALTHY

    def check_passed(self, now: float) -> None:
        """An active health check succeeded."""
        self.failing_checks = 0
        self.passing_checks += 1
        threshold = self.check.healthy_threshold if self.check is not None else 1
        if self.active_unhealthy and self.passing_checks >= threshold:
            self.active_unhealthy = False
        if (
            self.ejected_until is not None
            and not self.active_unhealthy
            and self.passing_checks >= threshold
        ):
            # ``healthy_threshold`` checks passed in a row since the ejection began end
            # it early (docs/config.md; one passing check did before).
            self.clean_since = min(now, self.ejected_until)
            self.ejected_until = None
            self.connect_failures = 0

    def check_failed(self, now: float) -> None:
        """An active health check failed (no handshake within the timeout)."""
        self.passing_checks = 0
        self.failing_checks += 1
        threshold = self.check.unhealthy_threshold if self.check is not None else 1
        if self.failing_checks >= threshold:
            self.active_unhealthy = True

    def connect_succeeded(self, now: float) -> None:
        """A flow's connection or stream to the endpoint opened."""
        self.connect_failures = 0

    def connect_failed(self, now: float, *, may_eject: bool = True) -> bool:
        """A connect to the endpoint failed; returns True if this ejected it."""
        self._forgive(now)
        # (A failure during an ejection leaves the stretch to begin at its end.)
        self.clean_since = now if self.clean_since is None else max(now, self.clean_since)
        self.connect_failures += 1
        if (
            may_eject
            and self.connect_failures >= self.outlier.consecutive_connect_failures
            and self.state(now) is not HealthState.EJECTED
        ):
            self.ejection_multiplier = min(self.ejection_multiplier + 1, MAX_EJECTION_MULTIPLIER)
            self.ejected_until = now + self.outlier.base_ejection_time * self.ejection_multiplier
            self.clean_since = self.ejected_until
            self.connect_failures = 0
            self.passing_checks = 0  # the checks that end it early count from now
            return True
        return False

    def _forgive(self, now: float) -> None:
        """Take one off :attr:`ejection_multiplier` for each whole ``base_ejection_time``
        of the clean stretch up to ``now``: an endpoint that recovered and served well
        for long is not ejected for ten times the base at its next failures. (Envoy
        takes one off for each outlier-detection ``interval`` a host is not ejected;
        quicmesh has no ``interval``, so the base ejection time is the period.)"""
        base = self.outlier.base_ejection_time
        if self.ejection_multiplier == 0 or self.clean_since is None or base <= 0:
            return
        periods = int((now - self.clean_since) // base)
        if periods > 0:
            self.ejection_multiplier = max(0, self.ejection_multiplier - periods)
            self.clean_since += periods * base


class HealthTracker:
    """The health of every endpoint of one cluster, keyed by endpoint."""

    def __init__(
        self,
        outlier: OutlierDetectionConfig,
        check: HealthCheckConfig | None = None,
        *,
        panic_threshold: int = 0,
    ) -> None:
        self.outlier = outlier
        self.check = check
        self.panic_threshold = panic_threshold
        """Percent of available endpoints below which all take flows (Envoy's panic)."""
        self.endpoints: dict[object, EndpointHealth] = {}

    def set_endpoints(self, keys: Iterable[object]) -> None:
        """Track exactly ``keys``: new ones start healthy, kept ones keep their state."""
        keys = list(keys)
        self.endpoints = {
            key: self.endpoints.get(key) or EndpointHealth(self.outlier, self.check) for key in keys
        }

    def our_identity_changed(self, now: float) -> int:
        """Our certificate changed: end the ejections our previous one caused (their
        peers refused it; every endpoint would have, and they stayed ejected after it
        was fixed). Returns how many ended."""
        ended = 0
        for health in self.endpoints.values():
            if health.our_certificate_refused:
                # Its failures were about the certificate we no longer present.
                health.connect_failures = 0
                if health.state(now) is HealthState.EJECTED:
                    health.ejected_until = None
                    health.ejection_multiplier = max(0, health.ejection_multiplier - 1)
                    health.clean_since = now
                    ended += 1
            health.our_certificate_refused = False
        return ended

    def __getitem__(self, key: object) -> EndpointHealth:
        return self.endpoints[key]

    def available(self, now: float) -> list[object]:
        """Endpoints that may take flows now, in endpoint order."""
        return [key for key, health in self.endpoints.items() if health.is_available(now)]

    def in_panic(self, now: float) -> bool:
        """Whether fewer than ``panic_threshold`` percent of the endpoints are available
        (:meth:`routable`)."""
        return self._panics(len(self.available(now)))

    def routable(self, now: float) -> tuple[set[object], bool]:
        """The endpoints that may take flows now, and whether the cluster is in panic:
        fewer than ``panic_threshold`` percent of them available, every endpoint takes
        flows, health ignored (Envoy's panic mode), so a cluster whose endpoints were
        all ejected or failed their checks (a restarted peer, a network blip) keeps
        trying them rather than refusing every flow until an ejection ends."""
        available = self.available(now)
        if self._panics(len(available)):
            return set(self.endpoints), True
        return set(available), False

    def _panics(self, available: int) -> bool:
        if not self.endpoints or not self.panic_threshold:
            return False
        return 100 * available / len(self.endpoints) < self.panic_threshold

    def connect_failed(
        self, key: object, now: float, *, our_certificate_refused: bool = False
    ) -> bool:
        """Record a connect failure; eject unless that would pass ``max_ejection_percent``.

        :param our_certificate_refused: the peer refused our certificate (as far as its
            words say: a peer may claim it, which only ends its ejection early)."""
        health = self.endpoints.get(key)
        if health is None:
            return False
        # Marked only while every failure of the run was one: a timeout among them is
        # the endpoint's own.
        first_of_run = health.connect_failures == 0
        health.our_certificate_refused = our_certificate_refused and (
            first_of_run or health.our_certificate_refused
        )
        ejected = sum(1 for h in self.endpoints.values() if h.state(now) is HealthState.EJECTED)
        limit = len(self.endpoints) * self.outlier.max_ejection_percent / 100
        return health.connect_failed(now, may_eject=ejected + 1 <= limit)
