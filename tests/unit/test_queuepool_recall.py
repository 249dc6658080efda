"""queuepool's budget recall, with the core pool's hysteresis (the pure ``plan_recall`` /
``recall_wait`` of mppool.budget): open managers are closed for a budget other processes
wait for only once due, the longest idle first, never more than wanted, and managers in use
at a put once due if the budget still says somebody waits. Due counts takes too: a busy
manager short of ``RECALL_MIN_USES`` is kept until demand has waited ``RECALL_MAX_HOLD``; an
idle one goes back after the patience whatever its takes.

The pool's clock is a fake one moved by the tests; rounds are run by the tests
(``pool.recall()``), the background round being put off for an hour.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers import ModuleClock, patch_now

import mppool.queuepool.pool as qpool
import mppool.queuepool.recall as qrecall
from mppool import budget
from mppool.budget import RECALL_MAX_HOLD, RECALL_MIN_USES, RECALL_PATIENCE
from mppool.queuepool import Pool, ResourceManager

P = RECALL_PATIENCE
U = RECALL_MIN_USES


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ModuleClock:
    monkeypatch.setattr(budget, "RECALL_PERIOD", 3600.0)  # only the tests' rounds run
    return patch_now(monkeypatch, qpool, 100.0)


class Budget:
    """A token pool whose ``waiting()`` says what the test sets (``wanted``)."""

    def __init__(self) -> None:
        self.wanted = 0
        self.asked = 0
        self.out = 0

    def get(self, timeout: float | None = None) -> int:
        self.out += 1
        return self.out

    def put(self, token: int) -> None:
        self.out -= 1

    def waiting(self) -> int:
        self.asked += 1
        return self.wanted


class Res(ResourceManager):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.openings = 0

    def open(self) -> None:
        self.openings += 1
        super().open()


def make(n: int) -> tuple[Pool, list[Res], Budget]:
    b = Budget()
    pool = Pool("recall", n, maxIdleTime=None, maxOpenTime=None, maxUsageCount=None, budget=b)
    managers = [Res(f"r{i}") for i in range(n)]
    for r in managers:
        pool.put(r)
    return pool, managers, b


@pytest.fixture
def pools() -> Iterator[list[Pool]]:
    made: list[Pool] = []
    yield made
    for pool in made:
        pool.close()


def serve(pool: Pool, n: int) -> None:
    """``n`` takes of the manager on top, back to back (the clock does not move)."""
    for _ in range(n):
        pool.put(pool.take(timeout=0))


def is_open(managers: list[Res]) -> list[str]:
    return [r.name for r in managers if r._isOpen]


def test_idle_managers_go_back_only_once_due_the_longest_idle_first(
        clock: ModuleClock, pools: list[Pool]) -> None:
    pool, ms, b = make(2)
    pools.append(pool)
    for _ in range(U):  # both have paid for their openings: only the score counts
        x, y = pool.take(timeout=0), pool.take(timeout=0)
        pool.put(y)
        pool.put(x)
    one, two = pool.take(timeout=0), pool.take(timeout=0)
    pool.put(one)  # idle since 100.0
    clock.t += 0.01
    pool.put(two)  # idle since 100.01
    b.wanted = 1
    clock.t += 0.01
    # Idle 0.02 s and 0.01 s, the demand just seen: neither is due.
    assert pool.recall() == 0 and is_open(ms) == ["r0", "r1"]
    n, later = pool._recall_round()
    assert n == 0 and later == pytest.approx((P - 0.02) / 2)  # two seconds a second
    clock.t += (P - 0.02) / 2 - 0.001
    assert pool.recall() == 0 and is_open(ms) == ["r0", "r1"], "kept: not due yet"
    clock.t += 0.002  # the first is due; the second, idle 0.01 s less, is not
    assert pool.recall() == 1 and not one._isOpen and two._isOpen
    assert b.out == 1 and pool.stats()["recalled"] == 1
    assert pool.free() == 2, "closed in its place: a take opens it again"
    clock.t += 1.0  # both would be due now, but one waiter is served: one goes back
    b.wanted = 0
    assert pool.recall() == 0 and two._isOpen
    assert pool.take(timeout=0) is two, "the open one stays on top"


def test_never_more_than_wanted_and_most_owed_first(clock: ModuleClock,
                                                    pools: list[Pool]) -> None:
    pool, ms, b = make(3)
    pools.append(pool)
    taken = [pool.take(timeout=0) for _ in range(3)]
    for _ in range(U - 1):
        for r in taken:
            r._usageCount = (r._usageCount or 0) + 1  # as many takes: paid for
    for r in taken:  # the first put idles longest
        pool.put(r)
        clock.t += 0.01
    b.wanted = 2
    assert pool.recall() == 0  # the demand starts now
    clock.t += P
    assert pool.recall() == 2 and is_open(ms) == [taken[2].name]
    assert b.out == 1 and pool.stats()["recalled"] == 2


def test_nobody_waiting_nothing_is_closed(clock: ModuleClock, pools: list[Pool]) -> None:
    pool, ms, b = make(2)
    pools.append(pool)
    x, y = pool.take(timeout=0), pool.take(timeout=0)
    pool.put(x)
    pool.put(y)
    for _ in range(3):
        clock.t += 3600.0
        assert pool.recall() == 0
    assert is_open(ms) == ["r0", "r1"] and b.asked == 3 and pool._recall_n == 0
    assert pool._recall_since is None and pool.stats()["recalled"] == 0


def test_the_budget_is_asked_only_while_a_manager_is_open(clock: ModuleClock,
                                                          pools: list[Pool]) -> None:
    pool, _, b = make(1)
    pools.append(pool)
    b.wanted = 1
    assert pool.recall() == 0 and b.asked == 0  # nothing open: nothing to give
    serve(pool, 1)
    assert pool.recall() == 0 and b.asked == 1


def test_a_reopened_manager_gets_the_whole_patience_however_old_the_demand(
        clock: ModuleClock, pools: list[Pool]) -> None:
    pool, (r,), b = make(1)
    pools.append(pool)
    b.wanted = 1
    r = pool.take(timeout=0)
    assert pool.recall() == 0  # in use: puts armed, the demand dated
    pool.put(r)
    assert r._isOpen and pool.stats()["recalled"] == 0, "put at once: kept"
    clock.t += 3600.0  # the demand is an hour old
    assert pool.recall() == 1 and not r._isOpen and b.out == 0
    serve(pool, U)  # opened again now, and paid for
    assert r.openings == 2 and b.out == 1
    clock.t += 0.01
    assert pool.recall() == 0 and r._isOpen, "counted from its opening"
    clock.t += P / 2 + 0.001
    assert pool.recall() == 1 and not r._isOpen


def test_an_idle_manager_goes_back_after_the_patience_whatever_its_takes(
        clock: ModuleClock, pools: list[Pool]) -> None:
    pool, (r,), b = make(1)
    pools.append(pool)
    serve(pool, 1)  # one take, then its process pauses
    b.wanted = 1
    clock.t += P / 2 + 0.001  # the score reached the patience, not its idle time
    n, later = pool._recall_round()
    assert n == 0 and r._isOpen, "short of takes and idle less than the patience"
    assert later == pytest.approx(P / 2 - 0.001)
    clock.t += later - 0.001
    assert pool.recall() == 0 and r._isOpen
    clock.t += 0.002  # idle for the patience: its process does not need it
    assert pool.recall() == 1 and not r._isOpen and b.out == 0


def test_a_manager_in_use_goes_back_at_a_put_once_due_and_paid_for(
        clock: ModuleClock, pools: list[Pool]) -> None:
    pool, (r,), b = make(1)
    pools.append(pool)
    serve(pool, U - 1)  # with the takes below, it has paid for its opening
    b.wanted = 1
    r = pool.take(timeout=0)
    assert pool.recall() == 0 and pool._recall_n == 1
    clock.t += P / 2
    asked = b.asked
    pool.put(r)
    assert r._isOpen and b.asked == asked, "not due: kept, the budget not asked"
    r = pool.take(timeout=0)
    clock.t += P / 2 + 0.001
    pool.put(r)
    assert not r._isOpen and b.asked == asked + 1 and b.out == 0
    assert pool.stats()["recalled"] == 1 and pool._recall_n == 0
    assert pool.free() == 1, "back in the pool, closed"


def test_a_busy_manager_short_of_takes_is_kept_until_the_max_hold(
        clock: ModuleClock, pools: list[Pool]) -> None:
    pool, (r,), b = make(1)
    pools.append(pool)
    b.wanted = 1
    r = pool.take(timeout=0)  # opened now, used without a pause
    assert pool.recall() == 0 and pool._recall_n == 1
    seen = clock.t  # the demand and the opening both date from here
    step = 1.5 * RECALL_MAX_HOLD / U  # too slow to reach its takes within the hold
    while clock.t - seen + step < RECALL_MAX_HOLD:
        clock.t += step
        pool.put(r)  # due by the score, not paid for: kept
        assert r._isOpen and pool.stats()["recalled"] == 0, clock.t - seen
        r = pool.take(timeout=0)
    assert (r._usageCount or 0) < U
    clock.t = seen + RECALL_MAX_HOLD  # demand has waited the max hold: it goes back
    pool.put(r)
    assert not r._isOpen and b.out == 0 and pool.stats()["recalled"] == 1


def test_a_due_put_keeps_its_manager_if_nobody_waits_any_more(
        clock: ModuleClock, pools: list[Pool]) -> None:
    pool, (r,), b = make(1)
    pools.append(pool)
    serve(pool, U)  # paid for: due by the score
    b.wanted = 1
    r = pool.take(timeout=0)
    assert pool.recall() == 0 and pool._recall_n == 1
    clock.t += 2 * P
    b.wanted = 0  # served meanwhile, by another process's recall
    pool.put(r)
    assert r._isOpen and pool.stats()["recalled"] == 0
    assert pool._recall_n == 0 and pool._recall_since is None, "the demand is forgotten"


def test_the_knobs_are_read_at_each_call(clock: ModuleClock, pools: list[Pool],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pool, (r,), b = make(1)
    pools.append(pool)
    b.wanted = 1
    r = pool.take(timeout=0)
    assert pool.recall() == 0
    clock.t += 0.02
    pool.put(r)
    assert r._isOpen, "not due with the library's patience"
    monkeypatch.setattr(budget, "RECALL_PATIENCE", 0.01)
    monkeypatch.setattr(budget, "RECALL_MIN_USES", 1)
    serve(pool, 1)
    assert not r._isOpen and pool.stats()["recalled"] == 1


class Sched:
    """Records what the rounds schedule instead of running it."""

    def __init__(self) -> None:
        self.entered: list[float] = []

    def enter(self, delay: float, fn: Any) -> Any:
        self.entered.append(delay)
        return self

    def cancel(self) -> None:
        pass


def test_the_next_round_runs_when_an_idle_manager_falls_due(
        clock: ModuleClock, monkeypatch: pytest.MonkeyPatch) -> None:
    sched = Sched()
    monkeypatch.setattr(qrecall, "default_scheduler", lambda: sched)
    monkeypatch.setattr(budget, "RECALL_PERIOD", 0.05)
    pool, (r,), b = make(1)
    assert sched.entered == [0.05]  # started with the pool
    serve(pool, U)
    pool._recall_tick()
    assert sched.entered[-1] == 0.05, "nobody waits: every period"
    b.wanted = 1
    clock.t += 0.06
    pool._recall_tick()  # idle 0.06 s, the demand new: due in (P - 0.06) / 2 s
    assert sched.entered[-1] == pytest.approx((P - 0.06) / 2) and r._isOpen
    clock.t += 0.016
    pool._recall_tick()  # due in 0.004 s: not sooner than RECALL_MIN_DELAY
    assert sched.entered[-1] == budget.RECALL_MIN_DELAY > (P - 0.092) / 2 and r._isOpen
    clock.t += budget.RECALL_MIN_DELAY
    pool._recall_tick()
    assert not r._isOpen and sched.entered[-1] == 0.05
    pool.close()
    n = len(sched.entered)
    pool._recall_tick()
    assert len(sched.entered) == n, "a closed pool schedules nothing"
