"""Load balancing: which endpoint of a cluster gets the next flow.

Sans-IO: a balancer is handed the endpoints that may take a flow now (healthy,
not ejected, not already tried for this flow) and returns one. Randomness comes
from an injected :class:`random.Random`, so tests replay exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Balanced(Protocol):
    """What a balancer needs to know about an endpoint."""

    @property
    def active_requests(self) -> int:
        """Flows currently open to this endpoint."""


E = TypeVar("E", bound=Balanced)


class LoadBalancer:
    """Base class: :meth:`choose` one of ``candidates`` (never empty)."""

    name = "abstract"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random()

    def choose(self, candidates: Sequence[E]) -> E:
        """Pick the endpoint for the next flow from a non-empty sequence."""
        raise NotImplementedError


class RoundRobin(LoadBalancer):
    """Each endpoint in turn; the order is the cluster's endpoint order."""

    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._next = 0

    def choose(self, candidates: Sequence[E]) -> E:
        choice = candidates[self._next % len(candidates)]
        self._next = (self._next + 1) % (1 << 30)
        return choice


class LeastRequest(LoadBalancer):
    """The endpoint with the fewest open flows (power of two random choices).

    Two candidates are drawn at random and the less loaded one wins, which
    spreads load almost as well as a full scan without herding every new flow
    onto the same endpoint.
    """

    name = "least_request"

    def choose(self, candidates: Sequence[E]) -> E:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self.rng.sample(range(len(candidates)), 2)
        a, b = candidates[first], candidates[second]
        return a if a.active_requests <= b.active_requests else b


class RandomChoice(LoadBalancer):
    """A uniformly random endpoint."""

    name = "random"

    def choose(self, candidates: Sequence[E]) -> E:
        return candidates[self.rng.randrange(len(candidates))]


POLICIES: dict[str, type[LoadBalancer]] = {
    cls.name: cls for cls in (RoundRobin, LeastRequest, RandomChoice)
}
"""Balancers by ``clusters[].load_balancing`` name."""


def make_balancer(policy: str, rng: random.Random | None = None) -> LoadBalancer:
    """The balancer for a configured policy name."""
    return POLICIES[policy](rng)
