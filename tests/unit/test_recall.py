"""Budget recall: which objects go back to a budget others wait for, and when.

The pure decision (``recall_score``, ``plan_recall``) is tested on numbers; the pools on a
``FakeClock`` with a ``ManualScheduler`` (recall rounds run in the test's thread on
``advance()``) and a fake budget whose waiters the test sets. Several pools share one
scheduler as processes share one budget; tasks due at the same moment run in the order they
were entered, so a test can make the pool it expects to give back run last.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import mppool
from mppool.budget import (
    RECALL_MAX_HOLD,
    RECALL_MIN_USES,
    RECALL_PATIENCE,
    RECALL_PERIOD,
    plan_recall,
    recall_score,
    recall_wait,
)
from mppool.clock import FakeClock

try:
    from helpers import ManualScheduler
except ImportError:  # tests/ became a package
    from tests.helpers import ManualScheduler

P = RECALL_PATIENCE


class FakeBudget:
    """A token pool of ``size`` tokens with ``waiters`` processes blocked in get() (set by
    the test): a token put back goes to a waiter first, as in the supervisor."""

    def __init__(self, size: int) -> None:
        self.free = size
        self.waiters = 0
        self.served = 0  # tokens handed to a waiter
        self.asked = 0  # waiting() calls
        self.sticky = False  # waiters never served: continuous demand
        self._ids = itertools.count()

    def get(self, timeout: float | None = None) -> Any:
        if self.free <= 0:
            raise mppool.TimeOut("fake budget: no token")
        self.free -= 1
        return next(self._ids)

    def put(self, token: Any) -> None:
        if self.waiters > 0:
            self.served += 1
            if not self.sticky:
                self.waiters -= 1
        else:
            self.free += 1

    def waiting(self) -> int:
        self.asked += 1
        return self.waiters


def _pool(budget: FakeBudget, sched: ManualScheduler, **kw: Any) -> mppool.Pool:
    kw.setdefault("max_size", 1)
    return mppool.Pool._made_with(lambda i: object(), min_size=0, budget=budget, clock=sched.clock,
                       scheduler=sched, **kw)


def _cycle(pool: mppool.Pool) -> None:
    pool.ret(pool.get(timeout=0))


# ------------------------------------------------------------------ the pure decision


def test_score_is_idle_time_plus_demand_age_from_the_later_of_demand_and_creation() -> None:
    assert recall_score(10.0, 9.0, 0.0, 9.5) == pytest.approx(1.5)  # idle 1 s, demand 0.5 s
    assert recall_score(10.0, None, 0.0, 9.5) == pytest.approx(0.5)  # in use: demand only
    assert recall_score(10.0, 9.9, 9.8, 5.0) == pytest.approx(0.3)  # new object: from creation
    assert recall_score(10.0, None, 10.0, 5.0) == 0.0


def test_plan_closes_the_most_owed_due_objects_and_never_more_than_wanted() -> None:
    idle = [(9.0, 0.0), (5.0, 0.0), (9.99, 0.0)]  # idle 1 s, 5 s, 10 ms
    close, later = plan_recall(10.0, 1, idle, demand_since=10.0, patience=P)
    assert close == [1] and later is None  # the longest idle; nothing left over
    close, later = plan_recall(10.0, 5, idle, demand_since=10.0, patience=P)
    assert close == [1, 0]  # the third is not due yet...
    assert later == pytest.approx((P - 0.01) / 2)  # ...and falls due as idle and demand age


def test_plan_waits_when_nothing_is_due_and_says_until_when() -> None:
    close, later = plan_recall(10.0, 1, [(9.98, 0.0)], demand_since=9.99, patience=P)
    assert close == [] and later == pytest.approx((P - 0.03) / 2)
    assert plan_recall(10.0, 0, [(0.0, 0.0)], demand_since=10.0, patience=P) == ([], None)
    assert plan_recall(10.0, 1, [], demand_since=0.0, patience=P) == ([], None)


def test_a_new_object_gets_the_whole_patience_under_old_demand() -> None:
    # Demand for an hour: an object made 10 ms ago and just returned is not due yet.
    close, later = plan_recall(10.0, 1, [(10.0, 9.99)], demand_since=10.0 - 3600, patience=P)
    assert close == [] and later == pytest.approx((P - 0.01) / 2)


# ------------------------------------------------------------------ pools on a fake clock


def test_no_demand_gives_nothing_back() -> None:
    sched, budget = ManualScheduler(FakeClock()), FakeBudget(1)
    pool = _pool(budget, sched)
    _cycle(pool)
    for _ in range(20):
        sched.advance(RECALL_PERIOD)
    assert budget.asked >= 20 and len(pool) == 1 and pool.stats()["nrecalled"] == 0
    pool.shutdown()


def test_one_waiter_takes_one_token_from_the_pool_idle_longest() -> None:
    sched, budget = ManualScheduler(FakeClock()), FakeBudget(3)
    b = _pool(budget, sched)
    c = _pool(budget, sched)
    a = _pool(budget, sched)  # its rounds run after b's and c's at the same moment
    _cycle(a)
    sched.advance(1.0)  # a idles a second, nobody waits
    _cycle(b)
    _cycle(c)
    budget.waiters = 1
    sched.advance(RECALL_PERIOD)  # every pool sees the waiter; only a's object is due
    assert budget.served == 1 and budget.waiters == 0
    assert [len(a), len(b), len(c)] == [0, 1, 1]
    for _ in range(10):  # b's and c's objects fall due later: nobody waits by then
        sched.advance(RECALL_PERIOD)
    assert [len(a), len(b), len(c)] == [0, 1, 1] and budget.served == 1
    assert [p.stats()["nrecalled"] for p in (a, b, c)] == [1, 0, 0]
    for p in (a, b, c):
        p.shutdown()


def test_a_waiter_gets_a_recently_used_idle_object_within_the_patience() -> None:
    sched, budget = ManualScheduler(FakeClock()), FakeBudget(1)
    pool = _pool(budget, sched)
    _cycle(pool)  # just used: its process may well use it again
    budget.waiters = 1
    waited = 0.0
    while budget.served == 0:
        assert waited < 2 * P + RECALL_PERIOD, "the idle object never went back"
        sched.advance(0.005)
        waited += 0.005
    assert waited > RECALL_PERIOD / 2 and len(pool) == 0  # kept a moment, then given back
    pool.shutdown()


def test_object_in_use_goes_back_at_a_return_after_the_patience_once_paid_for() -> None:
    sched, budget = ManualScheduler(FakeClock()), FakeBudget(1)
    pool = _pool(budget, sched)
    for _ in range(RECALL_MIN_USES - 1):
        _cycle(pool)  # an object that has served its process: its open is paid for
    obj = pool.get(timeout=0)
    budget.waiters = 1
    sched.advance(RECALL_PERIOD)  # the round sees the demand, arms the returns
    pool.ret(obj)  # the demand is younger than the patience: kept for its process
    assert len(pool) == 1 and budget.served == 0
    obj = pool.get(timeout=0)
    sched.advance(P)
    pool.ret(obj)  # now due, and somebody still waits: closed, its token to the waiter
    assert len(pool) == 0 and budget.served == 1 and pool.stats()["nrecalled"] == 1
    pool.shutdown()


def test_a_busy_object_short_of_uses_is_kept_until_the_max_hold() -> None:
    sched, budget = ManualScheduler(FakeClock()), FakeBudget(1)
    pool = _pool(budget, sched)
    budget.waiters = 1
    obj = pool.get(timeout=0)  # a new object, used without a pause longer than the patience
    sched.advance(RECALL_PERIOD)  # the round that sees the demand: it counts from here
    seen = sched.clock.now()
    step = 1.5 * RECALL_MAX_HOLD / RECALL_MIN_USES  # too slow to reach its uses in the hold
    while sched.clock.now() - seen + step < RECALL_MAX_HOLD:
        pool.ret(obj)  # due by the patience, but it has not paid for its open yet: kept
        assert len(pool) == 1 and budget.served == 0, sched.clock.now() - seen
        obj = pool.get(timeout=0)
        sched.advance(step)
    sched.advance(RECALL_MAX_HOLD - (sched.clock.now() - seen))
    pool.ret(obj)  # demand has waited RECALL_MAX_HOLD: the waiter gets it now
    assert len(pool) == 0 and budget.served == 1
    assert pool.stats()["nuses"] < RECALL_MIN_USES  # released by the bound, not the uses
    pool.shutdown()


def test_an_idle_object_goes_back_after_the_patience_whatever_its_uses() -> None:
    sched, budget = ManualScheduler(FakeClock()), FakeBudget(1)
    pool = _pool(budget, sched)
    _cycle(pool)  # one use, then its process pauses: it does not need it now
    budget.waiters = 1
    waited = 0.0
    while budget.served == 0:
        assert waited < P + 2 * RECALL_PERIOD, "the idle object was not given back"
        sched.advance(0.005)
        waited += 0.005
    assert waited >= P - 0.005 and len(pool) == 0
    pool.shutdown()


def test_wait_counts_score_uses_idle_time_and_the_max_hold() -> None:
    # Paid for: only the score counts (an idle object's grows at twice the clock's rate).
    assert recall_wait(10.0, 9.98, 0.0, 9.99, RECALL_MIN_USES, P) == pytest.approx((P - 0.03) / 2)
    assert recall_wait(10.0, None, 0.0, 9.0, None, P) == 0.0  # uses not counted
    # Short of uses: in use, it waits for the max hold; idle, for its idle time to reach P.
    assert recall_wait(10.0, None, 0.0, 9.5, 1, P) == pytest.approx(RECALL_MAX_HOLD - 0.5)
    assert recall_wait(10.0, 9.97, 0.0, 9.5, 1, P) == pytest.approx(P - 0.03)
    assert recall_wait(10.0, 9.8, 0.0, 9.5, 1, P) == 0.0
    assert recall_wait(10.0, None, 0.0, 10.0 - RECALL_MAX_HOLD, 1, P) == 0.0


def test_a_return_keeps_its_object_when_the_demand_was_served_meanwhile() -> None:
    sched, budget = ManualScheduler(FakeClock()), FakeBudget(1)
    pool = _pool(budget, sched)
    obj = pool.get(timeout=0)
    budget.waiters = 1
    sched.advance(RECALL_PERIOD)
    clock_only = sched.clock
    clock_only.advance(P)  # due, but no round ran since the waiter left
    budget.waiters = 0  # served by another process
    pool.ret(obj)  # asks the budget again before closing
    assert len(pool) == 1 and budget.served == 0 and pool.stats()["nrecalled"] == 0
    pool.shutdown()


def test_under_continuous_demand_an_object_serves_its_process_for_its_uses() -> None:
    sched, budget = ManualScheduler(FakeClock()), FakeBudget(1)
    budget.waiters, budget.sticky = 1, True  # somebody always waits
    pool = _pool(budget, sched)
    uses = 400
    for _ in range(uses):  # one use every 5 ms: a busy process
        if len(pool) == 0 and budget.free == 0:
            budget.free = 1  # the token came back to this process
        _cycle(pool)
        sched.advance(0.005)
    made = pool.stats()["ncreated"]
    # A token moves at most once per RECALL_MIN_USES uses (and per patience), not at every
    # use: recall opens at most 1000 / RECALL_MIN_USES objects per 1,000 uses.
    assert made <= uses / RECALL_MIN_USES + 1, made
    assert made >= 2  # and it does move: the waiters are not starved
    pool.shutdown()


def test_never_more_objects_back_than_processes_wait() -> None:
    sched, budget = ManualScheduler(FakeClock()), FakeBudget(3)
    pool = _pool(budget, sched, max_size=3)
    objs = [pool.get(timeout=0) for _ in range(3)]
    for o in objs:
        pool.ret(o)
    sched.advance(1.0)
    budget.waiters = 1
    sched.advance(RECALL_PERIOD)
    assert len(pool) == 2 and budget.served == 1
    pool.shutdown()


def test_min_size_objects_are_never_recalled() -> None:
    sched, budget = ManualScheduler(FakeClock()), FakeBudget(2)
    pool = mppool.Pool._made_with(lambda i: object(), min_size=1, max_size=2, budget=budget,
                       clock=sched.clock, scheduler=sched)
    a, b = pool.get(timeout=0), pool.get(timeout=0)
    pool.ret(a)
    pool.ret(b)
    sched.advance(1.0)
    budget.waiters = 2
    for _ in range(10):
        sched.advance(RECALL_PERIOD)
    assert len(pool) == 1 and budget.served == 1
    pool.shutdown()
