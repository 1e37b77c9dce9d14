"""The sans-IO 0-RTT budget and rebind rule (:mod:`quicmesh.transport.quic.policy`)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from quicmesh.transport.quic.policy import EARLY_STREAM_COST, EarlyDataBudget, RebindRule


def test_connect_costs_target_and_headers() -> None:
    budget = EarlyDataBudget(remaining=1000)
    assert budget.open_stream("a:1", {"k": "vv"})
    assert budget.remaining == 1000 - EARLY_STREAM_COST - 3 - 3


def test_connect_that_does_not_fit_waits() -> None:
    budget = EarlyDataBudget(remaining=EARLY_STREAM_COST + 2)
    assert not budget.open_stream("abc", None)
    assert budget.remaining == EARLY_STREAM_COST + 2


def test_bytes_beyond_the_budget_wait_and_keep_order() -> None:
    budget = EarlyDataBudget(remaining=100)
    assert budget.send(0, 60)
    assert not budget.send(0, 60)
    # Later bytes of that stream wait too, even small ones that would fit.
    assert not budget.send(0, 1)
    assert budget.deferred(0) == 61
    assert budget.send(4, 40)
    assert budget.remaining == 0


def test_settle_ends_the_budget() -> None:
    budget = EarlyDataBudget(remaining=10)
    assert not budget.send(0, 20)
    budget.settle()
    assert not budget.active
    assert budget.deferred(0) == 0
    assert budget.send(0, 10**9)
    assert budget.open_stream("x" * 10**6, None)


def test_forget_drops_a_reset_stream() -> None:
    budget = EarlyDataBudget(remaining=0)
    assert not budget.send(8, 5)
    assert budget.forget(8)
    assert not budget.forget(8)


@given(st.integers(0, 10_000), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3000))))
def test_budget_never_spends_more_than_it_has(start: int, sends: list[tuple[int, int]]) -> None:
    budget = EarlyDataBudget(remaining=start)
    spent = sum(size for stream, size in sends if budget.send(stream * 4, size))
    assert spent <= start
    assert budget.remaining == start - spent


def test_rebind_after_consecutive_ptos_once_per_streak() -> None:
    rule = RebindRule(after_ptos=3)
    assert not rule.check(1, established=True)
    assert not rule.check(2, established=True)
    assert rule.check(3, established=True)
    rule.finished()
    assert not rule.check(4, established=True)  # same streak
    assert not rule.check(0, established=True)  # an ACK ends the streak
    assert rule.check(3, established=True)


def test_no_rebind_while_one_runs_or_before_the_handshake() -> None:
    rule = RebindRule(after_ptos=1)
    assert not rule.check(5, established=False)
    assert rule.check(5, established=True)
    assert not rule.check(0, established=True)
    assert not rule.check(1, established=True)  # the first is still migrating
    rule.finished()
    assert rule.check(1, established=True)
