"""mppool.queuepool: queuepool's Pool and ResourceManager, from queuepool's documented
behaviour (LIFO of managers put in, lazy open, repair at take and put, three recycling
limits, recycler, closeOnException) plus mppool's take(timeout) and budget.

The recycling clock is replaced by a fake one (``clock`` fixture): no test sleeps to make a
manager old. Blocking takes use real time, bounded by deadlines.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import ModuleClock, patch_now, wait_until

import mppool.queuepool.pool as qpool
from mppool import PoolClosed, TimeOut
from mppool.pools import TokenPool
from mppool.queuepool import Pool, ResourceManager

DEADLINE = 10.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ModuleClock:
    return patch_now(monkeypatch, qpool, 1000.0)


class Res(ResourceManager):
    """A manager whose resource is a fresh dict per opening; records what happened."""

    log: list[str]

    def __init__(self, name: str, fail_open: bool = False) -> None:
        super().__init__(name)
        self.log = []
        self.fail_open = fail_open
        self.openings = 0

    def open(self) -> None:
        if self.fail_open:
            raise ConnectionError(f"cannot open {self.name}")
        self.openings += 1
        self.resource = {"name": self.name, "opening": self.openings}
        self.log.append("open")
        super().open()

    def close(self) -> None:
        self.resource = None
        self.log.append("close")
        super().close()

    def takeRepair(self) -> None:
        self.log.append("takeRepair")

    def putRepair(self) -> None:
        self.log.append("putRepair")


def make(capacity: int = 3, **kw: Any) -> tuple[Pool, list[Res]]:
    pool = Pool("test", capacity, **kw)
    managers = [Res(f"r{i}") for i in range(capacity)]
    for r in managers:
        pool.put(r)
    return pool, managers


@pytest.fixture
def threads() -> Iterator[list[threading.Thread]]:
    started: list[threading.Thread] = []
    yield started
    for t in started:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in started)


def start(threads: list[threading.Thread], fn: Any) -> dict[str, Any]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    threads.append(t)
    t.start()
    return box


# ---------------------------------------------------------------- queuepool's behaviour


def test_lifo_and_lazy_open(clock: ModuleClock) -> None:
    pool, (r0, r1, r2) = make()
    assert all(not r._isOpen and r.log == ["putRepair"] for r in (r0, r1, r2))  # not opened
    r = pool.take()
    assert r is r2 and r._isOpen and r.resource == {"name": "r2", "opening": 1}
    assert r.log == ["putRepair", "takeRepair", "open"]  # repaired before it is opened
    assert r._usageCount == 1 and r._pool is pool
    pool.put(r)
    assert pool.take() is r2  # the warm one again: LIFO keeps few resources open
    assert r2.openings == 1 and r2._usageCount == 2 and not r0._isOpen and not r1._isOpen
    pool.put(r2)


def test_with_block_returns_the_manager(clock: ModuleClock) -> None:
    pool, managers = make(2)
    with pool.take() as cm:
        assert cm is managers[1] and cm.resource is not None
        assert pool.free() == 1
    assert pool.free() == 2 and cm._isOpen  # returned, still open


def test_close_on_exception(clock: ModuleClock) -> None:
    pool, _ = make(1)
    with pytest.raises(KeyError), pool.take() as cm:
        raise KeyError("boom")
    assert not cm._isOpen and pool.free() == 1  # closed, and back in the pool
    assert pool.take() is cm and cm.openings == 2  # reopened at the next take
    pool.put(cm)
    keep = Pool("keep", 1, closeOnException=False)
    keep.put(Res("k"))
    with pytest.raises(KeyError), keep.take() as cm:
        raise KeyError("boom")
    assert cm._isOpen  # closeOnException=False: the resource stays open


def test_max_usage_count(clock: ModuleClock) -> None:
    pool, (r,) = make(1, maxUsageCount=2)
    pool.put(pool.take())
    assert r._isOpen  # used once
    pool.put(pool.take())  # its second use: closed at the put
    assert not r._isOpen and r.log[-2:] == ["close", "putRepair"]
    assert pool.take()._usageCount == 1 and r.openings == 2


def test_max_idle_time_at_take(clock: ModuleClock) -> None:
    pool, (r,) = make(1, maxIdleTime=60.0, maxOpenTime=None)
    pool.put(pool.take())
    clock.t += 61.0
    assert pool.take() is r
    assert r.log[-3:] == ["close", "takeRepair", "open"]  # recycled, repaired, reopened
    assert r.openings == 2 and r.log.count("close") == 1


def test_max_open_time_at_put(clock: ModuleClock) -> None:
    pool, (r,) = make(1, maxIdleTime=None, maxOpenTime=100.0)
    taken = pool.take()
    clock.t += 101.0  # open too long while in use: closed when it comes back
    pool.put(taken)
    assert not r._isOpen and r.openings == 1


def test_limits_none_means_no_limit(clock: ModuleClock) -> None:
    pool, (r,) = make(1, maxIdleTime=None, maxOpenTime=None, maxUsageCount=None)
    for _ in range(5):
        pool.put(pool.take())
        clock.t += 1e6
    assert r.openings == 1 and r._usageCount == 5


def test_recycle_closes_idle_managers_over_a_limit_and_keeps_order(clock: ModuleClock) -> None:
    pool, (r0, r1, r2) = make(3, maxIdleTime=60.0, maxOpenTime=None)
    a, b = pool.take(), pool.take()  # r2, r1
    pool.put(b)
    clock.t += 30.0
    pool.put(a)  # r2 idle for 0 s, r1 for 30 s
    clock.t += 40.0  # r1: 70 s, r2: 40 s
    assert pool.recycle() == 1
    assert not r1._isOpen and r2._isOpen
    assert pool.take() is r2  # the stack order is unchanged
    assert pool.take() is r1 and pool.take() is r0


def test_recycler_thread_runs_and_stops(clock: ModuleClock) -> None:
    pool, (r,) = make(1, maxIdleTime=5.0)
    pool.put(pool.take())
    clock.t += 10.0
    pool.startRecycler(0.01)
    pool.startRecycler(0.01)  # once per pool
    wait_until(lambda: not r._isOpen, DEADLINE, what="the recycler to close the idle manager")
    thread = pool._recycler
    assert thread is not None and thread.daemon
    pool.stopRecycler()
    assert not thread.is_alive()


def test_recycler_survives_a_close_that_raises(clock: ModuleClock,
                                               caplog: pytest.LogCaptureFixture) -> None:
    class Bad(Res):
        def close(self) -> None:
            super().close()
            raise OSError("close failed")

    pool = Pool("bad", 1, maxIdleTime=1.0)
    bad = Bad("bad")
    pool.put(bad)
    pool.put(pool.take())
    clock.t += 5.0
    with caplog.at_level(logging.WARNING, logger="mppool"):
        pool.startRecycler(0.01)
        wait_until(lambda: bad.log.count("close") >= 1, DEADLINE, what="the recycle")
    assert pool._recycler is not None and pool._recycler.is_alive()
    pool.close()
    assert pool._recycler is None


def test_take_blocks_until_a_put_and_serves_in_order(threads: list[threading.Thread]) -> None:
    pool, _ = make(1)
    held = pool.take()
    first = start(threads, lambda: pool.take(timeout=DEADLINE))
    wait_until(lambda: pool.waiting() == 1, DEADLINE, what="the first taker to block")
    second = start(threads, lambda: pool.take(timeout=DEADLINE))
    wait_until(lambda: pool.waiting() == 2, DEADLINE, what="the second taker to block")
    pool.put(held)
    wait_until(lambda: "result" in first, DEADLINE, what="the first taker to be served")
    assert "result" not in second and first["result"] is held
    pool.put(first["result"])
    wait_until(lambda: "result" in second, DEADLINE, what="the second taker")
    pool.put(second["result"])


def test_take_timeout_and_a_timed_out_taker_swallows_nothing() -> None:
    pool, _ = make(1)
    held = pool.take()
    with pytest.raises(TimeOut, match=r"timeout after 0\.05"):
        pool.take(timeout=0.05)
    with pytest.raises(TimeOut, match="timeout after 0"):
        pool.take(timeout=0)
    pool.put(held)
    assert pool.free() == 1 and pool.take(timeout=0) is held


def test_open_failure_keeps_the_manager(clock: ModuleClock) -> None:
    pool = Pool("fail", 1)
    r = Res("r", fail_open=True)
    pool.put(r)
    with pytest.raises(ConnectionError):
        pool.take()
    assert pool.free() == 1  # queuepool would have lost it
    r.fail_open = False
    clock.t += 2.0  # past the backoff (1 s +-10%) that follows a failed open()
    assert pool.take() is r and r._isOpen


def test_put_errors() -> None:
    pool, managers = make(2)
    with pytest.raises(ValueError, match="capacity=2"):
        pool.put(Res("one too many"))
    with pytest.raises(TypeError, match="ResourceManager"):
        pool.put("nope")  # type: ignore[arg-type]
    pool.put(managers[0])  # already idle: ignored
    assert pool.free() == 2


@pytest.mark.parametrize(("kwargs", "exc", "word"), [
    ({"capacity": 0}, ValueError, "capacity"),
    ({"capacity": "3"}, TypeError, "capacity"),
    ({"maxIdleTime": -1}, ValueError, "maxIdleTime"),
    ({"maxOpenTime": float("nan")}, ValueError, "maxOpenTime"),
    ({"maxUsageCount": 0}, ValueError, "maxUsageCount"),
    ({"closeOnException": 1}, TypeError, "closeOnException"),
    ({"budget": object()}, TypeError, "budget"),
])
def test_bad_arguments(kwargs: dict[str, Any], exc: type[Exception], word: str) -> None:
    args = {"name": "x", "capacity": 2, **kwargs}
    with pytest.raises(exc, match=word):
        Pool(**args)


def test_close_wakes_takers_and_closes_idle(threads: list[threading.Thread]) -> None:
    pool, _ = make(2)
    a = pool.take()
    b = pool.take()
    pool.put(b)
    waiter_pool, _ = make(1)
    held = waiter_pool.take()
    box = start(threads, lambda: waiter_pool.take(timeout=DEADLINE))
    wait_until(lambda: waiter_pool.waiting() == 1, DEADLINE, what="the taker to block")
    waiter_pool.close()
    wait_until(lambda: "error" in box, DEADLINE, what="the taker to be woken")
    assert isinstance(box["error"], PoolClosed)
    waiter_pool.put(held)
    assert not held._isOpen
    pool.close()
    assert not b._isOpen and a._isOpen  # the one out is closed when it comes back
    pool.put(a)
    assert not a._isOpen
    with pytest.raises(PoolClosed):
        pool.take()


# ---------------------------------------------------------------- budget


def test_budget_one_token_per_open_manager(clock: ModuleClock) -> None:
    budget = TokenPool(max_size=2)
    pool, (r0, _, _) = make(3, budget=budget, maxUsageCount=None)
    a, b = pool.take(), pool.take()
    assert budget.free() == 0
    with pytest.raises(TimeOut):
        pool.take(timeout=0.05)  # r0 is free, but opening it needs a token
    assert pool.free() == 1 and not r0._isOpen  # nothing lost
    a.close()  # closed by its user: the token goes back when the pool sees it
    pool.put(a)
    assert budget.free() == 1
    c = pool.take()  # a again (top of the stack), reopened with the token
    assert c is a and budget.free() == 0
    pool.put(b)
    pool.put(c)
    pool.close()
    assert budget.free() == 2


def test_budget_token_back_when_open_fails() -> None:
    budget = TokenPool(max_size=1)
    pool = Pool("fail", 1, budget=budget)
    r = Res("r", fail_open=True)
    pool.put(r)
    with pytest.raises(ConnectionError):
        pool.take()
    assert budget.free() == 1


def test_budget_recall_closes_idle_managers_for_a_waiter(threads: list[threading.Thread]) -> None:
    budget = TokenPool(max_size=1)
    pool, (r,) = make(1, budget=budget)
    pool.put(pool.take())  # idle and open: holds the only token
    box = start(threads, lambda: budget.get(timeout=DEADLINE))  # somebody else wants it
    wait_until(lambda: "result" in box, DEADLINE, what="the idle manager to give its token back")
    assert not r._isOpen and pool.free() == 1
    budget.put(box["result"])
    pool.close()


def test_a_dropped_pool_gives_its_budget_tokens_back() -> None:
    budget = TokenPool(max_size=2)
    pool, managers = make(2, budget=budget)
    pool.put(pool.take())
    assert budget.free() == 1 and managers[1]._isOpen
    pool.startRecycler(60)
    thread = pool._recycler
    events = managers[1].log
    del pool, managers  # the managers point back at their pool: a cycle
    gc.collect()
    assert budget.free() == 2 and events[-1] == "close"
    assert thread is not None
    thread.join(DEADLINE)
    assert not thread.is_alive()
