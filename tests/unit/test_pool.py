"""The in-process pool, ``mppool.Pool``.

Time-based rules run on a ``FakeClock``: most tests pass a ``ManualScheduler`` (no threads) and
call ``pool.housekeep()`` after ``clock.advance()``; a few check the real scheduler thread on
the fake clock by waiting for ``stats()['hk_rounds']`` with a deadline. Only get() timeouts use
real (short) time, since a blocked getter waits on a real event.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mppool
from mppool import Pool, PoolClosed, TimeOut
from mppool.clock import FakeClock

try:
    from helpers import ManualScheduler, Recorder, Runner, wait_until
except ImportError:  # tests/ became a package
    from tests.helpers import ManualScheduler, Recorder, Runner, wait_until

PPP_STATS_KEYS = [
    "id", "started", "now", "running", "rel_hk_last", "time_per_hk", "min_size", "max_size",
    "max_use", "timeout", "delay", "max_avail_delay", "max_using_delay_kill",
    "max_using_delay_warn", "health_freq", "sem", "navail", "nusing", "ntodel", "shutdown", "avail",
    "using", "nobjs", "ncreated", "ncreating", "nuses", "nkilled", "nrecycled", "nwornout",
    "nborrows", "nreturns", "ndestroys", "nhealth", "bad_health", "hk_rounds", "hk_errors",
    "hc_rounds", "hc_errors", "nwaiting",
]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="mppool")
    return caplog


def mppool_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "mppool" and r.levelno >= logging.WARNING]


def tick(pool: Pool, sched: ManualScheduler, seconds: float) -> None:
    """Move fake time and run one housekeeping round by hand."""
    sched.clock.advance(seconds)
    pool.housekeep()


def check_consistent(pool: Pool) -> dict[str, Any]:
    s = pool.stats()
    assert s["nobjs"] == s["navail"] + s["nusing"] == len(pool)
    assert len(s["avail"]) == s["navail"] and len(s["using"]) == s["nusing"]
    if s["max_size"]:
        assert s["nobjs"] + s["ncreating"] <= s["max_size"]
    return s


def nums(objs: list[Any]) -> list[int]:
    return [o["num"] for o in objs]


# ------------------------------------------------------------------------------ creation


def test_fun_receives_creation_numbers(make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(min_size=0)
    objs = [pool.get() for _ in range(3)]
    assert rec.nums == [0, 1, 2]
    assert nums(objs) == [0, 1, 2]


def test_creation_numbers_continue_after_min_size_fill(make_pool: Callable[..., Pool],
                                                       rec: Recorder) -> None:
    pool = make_pool(min_size=2)
    assert rec.nums == [0, 1]
    objs = [pool.get() for _ in range(3)]
    assert sorted(nums(objs)) == [0, 1, 2]
    assert rec.nums == [0, 1, 2]


def test_min_size_filled_at_construction(make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(min_size=3, max_size=5)
    assert rec.nums == [0, 1, 2]
    s = check_consistent(pool)
    assert (s["navail"], s["nusing"], s["ncreated"]) == (3, 0, 3)
    assert len(pool) == 3
    assert pool.free() == 5


def test_default_min_size_is_one(rec: Recorder) -> None:
    pool = Pool(rec.fun)
    try:
        assert rec.nums == [0] and len(pool) == 1
    finally:
        pool.shutdown()


def test_creation_error_at_construction_is_logged_not_raised(
        make_pool: Callable[..., Pool], warnings_log: pytest.LogCaptureFixture,
        sched: ManualScheduler) -> None:
    rec = Recorder(fail=lambda i: i == 0)
    pool = make_pool(rec.fun, min_size=1, max_size=2)
    assert rec.nums == [0]
    records = [r for r in warnings_log.records if r.name == "mppool"]
    assert records, "the creation error must be logged"
    assert any(r.exc_info and "cannot create object 0" in str(r.exc_info[1]) for r in records)
    s = check_consistent(pool)
    assert (s["nobjs"], s["ncreating"], s["ncreated"]) == (0, 0, 0)
    assert pool.free() == 2  # the failed creation holds no slot
    # Until the backoff's first delay (1 s, ±10%) has passed, a get fails fast with the same
    # error, without calling fun; then fun is tried again.
    with pytest.raises(RuntimeError, match="cannot create object 0"):
        pool.get(timeout=0)
    assert rec.nums == [0]
    sched.clock.advance(1.2)
    assert pool.get(timeout=0) == {"num": 1}


def test_housekeeping_refills_to_min_size(make_pool: Callable[..., Pool], rec: Recorder,
                                          sched: ManualScheduler) -> None:
    fail = {"on": True}
    rec.fail = lambda i: fail["on"]
    pool = make_pool(min_size=2, delay=10.0)
    assert len(pool) == 0
    fail["on"] = False
    tick(pool, sched, 10)
    assert len(pool) == 2
    check_consistent(pool)


# ------------------------------------------------------------------------------ get / ret


def test_get_ret_reuses_the_object(make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(min_size=1)
    o = pool.get()
    s = check_consistent(pool)
    assert (s["navail"], s["nusing"]) == (0, 1)
    pool.ret(o)
    s = check_consistent(pool)
    assert (s["navail"], s["nusing"]) == (1, 0)
    assert pool.get() is o
    assert rec.nums == [0]
    s = pool.stats()
    assert (s["nborrows"], s["nreturns"], s["nuses"]) == (2, 1, 2)


def test_put_is_an_alias_of_ret(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=0)
    o = pool.get()
    pool.put(o)
    s = check_consistent(pool)
    assert (s["navail"], s["nusing"], s["nreturns"]) == (1, 0, 1)


def test_obj_context_manager_always_returns(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=0, max_size=1)
    with pool.obj() as o:
        assert pool.stats()["nusing"] == 1
    assert pool.stats()["nusing"] == 0
    with pytest.raises(ZeroDivisionError), pool.item() as o2:
        assert o2 is o
        assert pool.stats()["nusing"] == 1
        1 / 0  # noqa: B018
    s = check_consistent(pool)
    assert (s["navail"], s["nusing"], s["nreturns"]) == (1, 0, 2)


def test_obj_context_manager_passes_timeout(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=0, max_size=1)
    held = pool.get()
    with pytest.raises(TimeOut), pool.obj(timeout=0):
        pass
    pool.ret(held)
    check_consistent(pool)


def test_get_creates_up_to_max_size(make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(min_size=0, max_size=3)
    objs = [pool.get(timeout=0) for _ in range(3)]
    assert len({id(o) for o in objs}) == 3
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    assert rec.nums == [0, 1, 2]
    check_consistent(pool)


# ------------------------------------------------------------------------------ timeouts


def test_timeout_zero_does_not_wait(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=1, max_size=1)
    held = pool.get()
    start = time.monotonic()
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    assert time.monotonic() - start < 1.0
    assert pool.waiting() == 0
    pool.ret(held)
    s = check_consistent(pool)
    assert (s["navail"], s["nusing"]) == (1, 0)


def test_bounded_timeout_raises_timeout(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=1, max_size=1)
    held = pool.get()
    start = time.monotonic()
    with pytest.raises(TimeOut):
        pool.get(timeout=0.05)
    assert time.monotonic() - start >= 0.045
    assert pool.waiting() == 0
    assert pool.stats()["nwaiting"] == 0
    pool.ret(held)  # the getter that timed out does not swallow it
    s = check_consistent(pool)
    assert (s["navail"], s["nusing"]) == (1, 0)
    assert pool.get(timeout=0) is held


def test_none_timeout_uses_the_pools(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=1, max_size=1, timeout=0.05)
    held = pool.get()
    start = time.monotonic()
    with pytest.raises(TimeOut):
        pool.get()
    with pytest.raises(TimeOut):
        pool.get(timeout=None)
    assert time.monotonic() - start >= 0.09
    with pytest.raises(TimeOut):
        pool.get(timeout=0)  # an explicit timeout wins over the pool's
    pool.ret(held)
    assert pool.stats()["timeout"] == 0.05


def test_unbounded_pool_never_times_out(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=0, max_size=0)
    objs = [pool.get(timeout=0) for _ in range(20)]
    assert len({id(o) for o in objs}) == 20
    assert pool.stats()["sem"] is None
    pool_none = make_pool(min_size=0, max_size=None)
    assert pool_none.stats()["max_size"] == 0
    assert len({id(pool_none.get(timeout=0)) for _ in range(5)}) == 5


def test_none_timeout_waits_until_returned(make_pool: Callable[..., Pool], runner: Runner) -> None:
    pool = make_pool(min_size=1, max_size=1)  # timeout=None: wait forever
    held = pool.get()
    box = runner.start(pool.get)
    wait_until(lambda: pool.waiting() == 1)
    assert not box["done"]
    pool.ret(held)
    wait_until(lambda: box["done"])
    assert box.get("result") is held


# ------------------------------------------------------------------------------ fun errors


def test_fun_error_propagates_and_costs_no_slot(make_pool: Callable[..., Pool],
                                                sched: ManualScheduler) -> None:
    rec = Recorder(fail=lambda i: i == 0)
    pool = make_pool(rec.fun, min_size=0, max_size=1)
    with pytest.raises(RuntimeError, match="cannot create object 0"):
        pool.get(timeout=0)
    s = check_consistent(pool)
    assert (s["nobjs"], s["ncreating"], s["ncreated"]) == (0, 0, 0)
    assert pool.free() == 1
    # The next get within the backoff fails fast with the same error, fun not called.
    with pytest.raises(RuntimeError, match="cannot create object 0") as info:
        pool.get(timeout=0)
    assert any("next attempt in" in n for n in getattr(info.value, "__notes__", ()))
    assert rec.nums == [0]
    sched.clock.advance(1.2)
    assert pool.get(timeout=0) == {"num": 1}


def test_fun_error_in_a_waiter_propagates_and_costs_no_slot(
        make_pool: Callable[..., Pool], runner: Runner, sched: ManualScheduler) -> None:
    rec = Recorder(fail=lambda i: i == 1)
    pool = make_pool(rec.fun, min_size=0, max_size=1, max_use=1)
    held = pool.get()
    box = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    pool.ret(held)  # worn out: closed, its slot goes to the waiter, whose fun(1) fails
    wait_until(lambda: box["done"])
    assert isinstance(box.get("error"), RuntimeError)
    s = check_consistent(pool)
    assert (s["nobjs"], s["ncreating"], s["nwaiting"]) == (0, 0, 0)
    assert pool.free() == 1
    sched.clock.advance(1.2)  # past the backoff that fun's failure started
    assert pool.get(timeout=0) == {"num": 2}


# ------------------------------------------------------------------------------ bad returns


def test_ret_twice_logs_a_warning_and_changes_nothing(
        make_pool: Callable[..., Pool], warnings_log: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_size=0, max_size=2)
    o = pool.get()
    pool.ret(o)
    before = pool.stats()
    assert not mppool_warnings(warnings_log)
    pool.ret(o)
    assert mppool_warnings(warnings_log)
    after = pool.stats()
    for key in ("navail", "nusing", "nreturns", "nobjs", "ndestroys"):
        assert after[key] == before[key], key
    assert pool.get(timeout=0) is o
    assert pool.get(timeout=0) is not o  # still exactly one idle copy of o


def test_ret_of_an_unknown_object_logs_a_warning_and_changes_nothing(
        make_pool: Callable[..., Pool], warnings_log: pytest.LogCaptureFixture,
        rec: Recorder) -> None:
    pool = make_pool(min_size=1, max_size=2)
    before = pool.stats()
    pool.ret({"num": 0})  # equal to the pool's object but not it
    pool.ret("stranger")
    assert len(mppool_warnings(warnings_log)) == 2
    after = pool.stats()
    for key in ("navail", "nusing", "nreturns", "nobjs", "ndestroys"):
        assert after[key] == before[key], key
    assert rec.closed == []


# ------------------------------------------------------------------------------ fairness


def test_waiters_are_served_first_come_first_served(make_pool: Callable[..., Pool],
                                                    runner: Runner) -> None:
    pool = make_pool(min_size=1, max_size=1)
    held = pool.get()
    order: list[str] = []

    def waiter(name: str) -> None:
        o = pool.get(timeout=5)
        order.append(name)
        pool.ret(o)

    names = ["A", "B", "C", "D"]
    for k, name in enumerate(names, 1):
        runner.start(lambda name=name: waiter(name), name=name)
        wait_until(lambda k=k: pool.waiting() == k)
    pool.ret(held)
    wait_until(lambda: len(order) == len(names))
    assert order == names
    s = check_consistent(pool)
    assert (s["navail"], s["nusing"], s["nobjs"]) == (1, 0, 1)


def test_returned_object_goes_to_the_waiter_not_to_a_newcomer(
        make_pool: Callable[..., Pool], runner: Runner) -> None:
    pool = make_pool(min_size=1, max_size=1)
    held = pool.get()
    box = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    pool.ret(held)
    # Handed over at once, under the lock: a newcomer cannot barge in before the waiter wakes.
    s = pool.stats()
    assert (s["navail"], s["nusing"]) == (0, 1)
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    wait_until(lambda: box["done"])
    assert box.get("result") is held
    assert s["using"][0]["pid"] == os.getpid()


def test_a_newcomer_does_not_barge_past_a_waiter_while_a_slot_frees(
        make_pool: Callable[..., Pool], runner: Runner) -> None:
    in_closer, release = threading.Event(), threading.Event()

    def slow_closer(o: Any) -> None:
        in_closer.set()
        release.wait(5)

    pool = make_pool(min_size=0, max_size=1, max_use=1, closer=slow_closer)
    held = pool.get()
    waiter = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    returning = runner.start(lambda: pool.ret(held))  # worn out: its slot frees once closed
    assert in_closer.wait(5)
    try:
        with pytest.raises(TimeOut):
            pool.get(timeout=0)  # the slot being freed belongs to the waiter
    finally:
        release.set()
    wait_until(lambda: waiter["done"] and returning["done"])
    assert waiter.get("result") == {"num": 1}
    s = check_consistent(pool)
    assert (s["nusing"], s["nobjs"], s["nwaiting"]) == (1, 1, 0)


def test_a_waiter_that_timed_out_never_swallows_an_object(
        make_pool: Callable[..., Pool], runner: Runner) -> None:
    pool = make_pool(min_size=1, max_size=1)
    held = pool.get()
    quitter = runner.start(lambda: pool.get(timeout=0.05))
    wait_until(lambda: quitter["done"])
    assert isinstance(quitter.get("error"), TimeOut)
    patient = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    pool.ret(held)
    wait_until(lambda: patient["done"])
    assert patient.get("result") is held
    s = check_consistent(pool)
    assert (s["navail"], s["nusing"], s["nwaiting"]) == (0, 1, 0)


def test_timeouts_racing_returns_lose_nothing(make_pool: Callable[..., Pool],
                                              runner: Runner) -> None:
    pool = make_pool(min_size=2, max_size=2)
    got = [0] * 6
    timed_out = [0] * 6

    def worker(k: int) -> None:
        for _ in range(60):
            try:
                o = pool.get(timeout=0.001)
            except TimeOut:
                timed_out[k] += 1
                continue
            got[k] += 1
            pool.ret(o)

    for k in range(6):
        runner.start(lambda k=k: worker(k))
    runner.join_all(timeout=15)
    s = check_consistent(pool)
    assert (s["navail"], s["nusing"], s["nwaiting"], s["nobjs"]) == (2, 0, 0, 2)
    assert s["nborrows"] == s["nreturns"] == sum(got)
    assert sum(got) + sum(timed_out) == 6 * 60
    a, b = pool.get(timeout=0), pool.get(timeout=0)
    assert a is not b and pool.free() == 0


# ------------------------------------------------------------------------------ recycling


def test_max_use_closes_after_that_many_uses(make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(min_size=0, max_use=2)
    o = pool.get()
    pool.ret(o)
    assert pool.get() is o
    assert rec.closed == []
    pool.ret(o)
    assert rec.closed == [o]
    s = check_consistent(pool)
    assert (s["nwornout"], s["nobjs"], s["ndestroys"]) == (1, 0, 1)
    assert pool.get() == {"num": 1}


def test_max_use_frees_the_slot_for_a_waiter(make_pool: Callable[..., Pool], runner: Runner,
                                             rec: Recorder) -> None:
    pool = make_pool(min_size=0, max_size=1, max_use=1)
    held = pool.get()
    box = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    pool.ret(held)
    wait_until(lambda: box["done"])
    assert box.get("result") == {"num": 1}
    assert rec.closed == [held]


def test_max_avail_delay_closes_idle_objects_never_below_min_size(
        make_pool: Callable[..., Pool], sched: ManualScheduler, rec: Recorder) -> None:
    pool = make_pool(min_size=1, max_avail_delay=10.0)
    objs = [pool.get() for _ in range(3)]
    for o in objs:
        pool.ret(o)
    tick(pool, sched, 9.9)
    assert rec.closed == [] and len(pool) == 3
    tick(pool, sched, 0.1)
    s = check_consistent(pool)
    assert (s["nrecycled"], s["nobjs"], s["ndestroys"]) == (2, 1, 2)
    assert len(rec.closed) == 2
    tick(pool, sched, 100)
    assert len(pool) == 1 and pool.stats()["nrecycled"] == 2


def test_max_avail_delay_counts_from_the_last_return(
        make_pool: Callable[..., Pool], sched: ManualScheduler, rec: Recorder) -> None:
    pool = make_pool(min_size=0, max_avail_delay=10.0)
    a, b = pool.get(), pool.get()
    pool.ret(a)
    tick(pool, sched, 6)
    pool.ret(b)
    tick(pool, sched, 4)  # a idle 10 s, b idle 4 s
    assert rec.closed == [a]
    tick(pool, sched, 6)
    assert rec.closed == [a, b]
    assert len(pool) == 0


def test_max_avail_delay_does_not_touch_objects_in_use(
        make_pool: Callable[..., Pool], sched: ManualScheduler, rec: Recorder) -> None:
    pool = make_pool(min_size=0, max_avail_delay=10.0)
    o = pool.get()
    tick(pool, sched, 50)
    assert rec.closed == [] and pool.stats()["nusing"] == 1
    pool.ret(o)
    tick(pool, sched, 9)
    assert rec.closed == []


def test_max_lifetime_with_jitter(make_pool: Callable[..., Pool], sched: ManualScheduler,
                                  rec: Recorder) -> None:
    n = 40
    pool = make_pool(min_size=n, max_lifetime=100.0)
    originals = set(range(n))
    assert set(rec.nums) == originals
    tick(pool, sched, 94.9)  # jitter is at most 5%: nothing expires before 95 s
    assert rec.closed == []
    tick(pool, sched, 2.6)  # 97.5 s: with jitter, some have expired and some not
    closed = {o["num"] for o in rec.closed}
    assert 0 < len(closed) < n, f"{len(closed)} of {n} expired at 97.5 s: no jitter?"
    assert closed <= originals
    tick(pool, sched, 2.5)  # 100 s: every original object is gone
    assert {o["num"] for o in rec.closed} == originals
    s = check_consistent(pool)
    assert s["nobjs"] == n  # refilled to min_size with new objects
    assert all(o["num"] >= n for o in [pool.get() for _ in range(n)])


def test_max_lifetime_object_in_use_is_closed_when_returned(
        make_pool: Callable[..., Pool], sched: ManualScheduler, rec: Recorder) -> None:
    pool = make_pool(min_size=0, max_lifetime=10.0)
    o = pool.get()
    tick(pool, sched, 20)
    assert rec.closed == [] and pool.stats()["nusing"] == 1
    pool.ret(o)
    assert rec.closed == [o]
    assert len(pool) == 0
    assert pool.get() == {"num": 1}


def test_max_lifetime_expired_idle_object_is_not_handed_out(
        make_pool: Callable[..., Pool], sched: ManualScheduler, rec: Recorder) -> None:
    pool = make_pool(min_size=1, max_lifetime=10.0)
    sched.clock.advance(10)  # no housekeeping round ran
    o = pool.get()
    assert o == {"num": 1}
    assert rec.closed == [{"num": 0}]
    check_consistent(pool)


# ------------------------------------------------------------------------------ long use


def test_max_using_delay_warns_naming_the_holder(
        make_pool: Callable[..., Pool], sched: ManualScheduler,
        warnings_log: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_size=0, max_using_delay=10.0)
    o = pool.get()
    tick(pool, sched, 9.9)
    assert not mppool_warnings(warnings_log)
    tick(pool, sched, 0.2)
    warned = mppool_warnings(warnings_log)
    assert len(warned) == 1
    assert str(os.getpid()) in warned[0]
    s = check_consistent(pool)
    assert (s["nusing"], s["nkilled"]) == (1, 0)  # only a warning: no kill delay
    tick(pool, sched, 10)
    assert len(mppool_warnings(warnings_log)) == 1  # once per lease
    pool.ret(o)
    assert pool.stats()["navail"] == 1


def test_max_using_delay_kill(make_pool: Callable[..., Pool], sched: ManualScheduler,
                              rec: Recorder, warnings_log: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_size=0, max_size=2, max_using_delay=5.0, max_using_delay_kill=10.0)
    o = pool.get()
    other = pool.get()
    pool.ret(other)
    tick(pool, sched, 9.9)
    assert rec.closed == [] and pool.stats()["nusing"] == 1
    tick(pool, sched, 0.1)
    assert rec.closed == [o]
    s = check_consistent(pool)
    assert (s["nkilled"], s["nusing"], s["navail"], s["nobjs"]) == (1, 0, 1, 1)
    assert pool.free() == 2  # its slot is free again
    assert any(str(os.getpid()) in m for m in mppool_warnings(warnings_log))
    # A later ret of the killed object is ignored, with a warning.
    n = len(mppool_warnings(warnings_log))
    before = pool.stats()
    pool.ret(o)
    assert len(mppool_warnings(warnings_log)) == n + 1
    after = pool.stats()
    for key in ("navail", "nusing", "nreturns", "nobjs", "ndestroys", "nkilled"):
        assert after[key] == before[key], key
    assert rec.closed == [o]
    assert pool.get(timeout=0) is other


def test_killed_lease_frees_its_slot_for_the_oldest_waiter(
        make_pool: Callable[..., Pool], sched: ManualScheduler, runner: Runner,
        rec: Recorder) -> None:
    pool = make_pool(min_size=1, max_size=1, max_using_delay_kill=10.0)
    held = pool.get()
    sched.clock.advance(5)
    first = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    second = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 2)
    tick(pool, sched, 5)
    wait_until(lambda: first["done"])
    assert first.get("result") == {"num": 1}
    assert rec.closed == [held]
    s = check_consistent(pool)
    assert (s["nkilled"], s["nusing"], s["nobjs"], s["nwaiting"]) == (1, 1, 1, 1)
    assert not second["done"]
    pool.ret(first["result"])
    wait_until(lambda: second["done"])
    assert second.get("result") is first["result"]


def test_warn_delay_defaults_to_the_kill_delay(
        make_pool: Callable[..., Pool], sched: ManualScheduler,
        warnings_log: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_size=0, max_using_delay_kill=10.0)
    s = pool.stats()
    assert s["max_using_delay_warn"] == 10.0 and s["max_using_delay_kill"] == 10.0
    assert s["delay"] == 5.0
    pool.get()
    tick(pool, sched, 9.9)
    assert not mppool_warnings(warnings_log)
    tick(pool, sched, 0.1)
    warned = mppool_warnings(warnings_log)
    assert warned and all(str(os.getpid()) in m for m in warned)
    assert pool.stats()["nkilled"] == 1


def test_explicit_warn_delay_is_kept(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=0, max_using_delay=3.0, max_using_delay_kill=10.0)
    s = pool.stats()
    assert (s["max_using_delay_warn"], s["max_using_delay_kill"]) == (3.0, 10.0)


def test_kill_holder_reports_the_holder(make_pool: Callable[..., Pool],
                                        sched: ManualScheduler) -> None:
    killed: list[tuple[int, float]] = []
    pool = make_pool(min_size=0, max_using_delay_kill=10.0, kill_holder=True)
    pool.on_kill_holder = lambda holder, age: killed.append((holder.pid, age))
    pool.get()
    tick(pool, sched, 11)
    assert killed == [(os.getpid(), 11.0)]
    quiet = make_pool(min_size=0, max_using_delay_kill=10.0)  # kill_holder=False
    quiet.on_kill_holder = lambda holder, age: killed.append((holder.pid, age))
    quiet.get()
    tick(quiet, sched, 11)
    assert quiet.stats()["nkilled"] == 1 and len(killed) == 1


# ------------------------------------------------------------------------------ health


def test_health_checked_every_health_freq_rounds(make_pool: Callable[..., Pool],
                                                 sched: ManualScheduler) -> None:
    checked: list[Any] = []
    pool = make_pool(min_size=2, health=lambda o: checked.append(o) or True, health_freq=3)
    pool.housekeep()
    pool.housekeep()
    assert checked == [] and pool.stats()["hc_rounds"] == 0
    pool.housekeep()
    assert sorted(nums(checked)) == [0, 1]
    s = pool.stats()
    assert (s["hc_rounds"], s["nhealth"], s["bad_health"], s["hk_rounds"]) == (1, 2, 0, 3)
    for _ in range(3):
        pool.housekeep()
    assert len(checked) == 4 and pool.stats()["hc_rounds"] == 2


def test_health_checks_idle_objects_only(make_pool: Callable[..., Pool]) -> None:
    checked: list[Any] = []
    pool = make_pool(min_size=2, health=lambda o: checked.append(o) or True)
    busy = pool.get()
    pool.housekeep()
    assert len(checked) == 1 and checked[0] is not busy


def test_unhealthy_objects_are_closed_and_replaced(
        make_pool: Callable[..., Pool], rec: Recorder,
        warnings_log: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_size=2, health=lambda o: o["num"] != 0)
    pool.housekeep()
    assert rec.closed == [{"num": 0}]
    s = check_consistent(pool)
    assert (s["bad_health"], s["nobjs"], s["ncreated"]) == (1, 2, 3)
    assert sorted(nums([pool.get(), pool.get()])) == [1, 2]
    assert mppool_warnings(warnings_log)


def test_health_check_that_raises_is_swallowed(make_pool: Callable[..., Pool]) -> None:
    def health(o: Any) -> bool:
        raise OSError("probe failed")

    pool = make_pool(min_size=1, max_size=2, health=health)
    pool.housekeep()
    s = check_consistent(pool)
    assert (s["hc_errors"], s["hk_errors"], s["hc_rounds"]) == (1, 0, 1)
    assert s["nobjs"] == 1
    with pool.obj(timeout=0):
        pass


def test_an_object_under_health_check_still_holds_its_slot(
        make_pool: Callable[..., Pool], runner: Runner, rec: Recorder) -> None:
    entered, release = threading.Event(), threading.Event()

    def health(o: Any) -> bool:
        entered.set()
        release.wait(5)
        return True

    pool = make_pool(min_size=1, max_size=1, health=health)
    hk = runner.start(pool.housekeep)
    assert entered.wait(5)
    try:
        with pytest.raises(TimeOut):
            pool.get(timeout=0)  # must not create a second object beyond max_size
        assert pool.free() == 0
        waiter = runner.start(lambda: pool.get(timeout=5))
        wait_until(lambda: pool.waiting() == 1)
    finally:
        release.set()
    wait_until(lambda: hk["done"] and waiter["done"])
    assert waiter.get("result") == {"num": 0}  # handed the checked object when it came back
    assert rec.nums == [0]
    check_consistent(pool)


# ------------------------------------------------------------------------------ hooks


def test_hooks_are_called_on_each_event(make_pool: Callable[..., Pool]) -> None:
    events: list[tuple[str, int]] = []

    def hook(name: str) -> Callable[[Any], None]:
        return lambda o: events.append((name, o["num"]))

    pool = make_pool(min_size=0, max_use=2, opener=hook("opener"), getter=hook("getter"),
                     retter=hook("retter"), closer=hook("closer"))
    for _ in range(2):
        with pool.obj():
            pass
    assert events == [("opener", 0), ("getter", 0), ("retter", 0), ("getter", 0),
                      ("retter", 0), ("closer", 0)]


HOOKS = ["opener", "getter", "retter", "closer", "stats", "tracer", "health"]


@pytest.mark.parametrize("name", HOOKS)
def test_hook_exceptions_are_swallowed(make_pool: Callable[..., Pool], sched: ManualScheduler,
                                       name: str, warnings_log: pytest.LogCaptureFixture) -> None:
    calls: list[Any] = []

    def bad(o: Any) -> Any:
        calls.append(o)
        raise ValueError(f"{name} hook failed")

    pool = make_pool(min_size=1, max_size=2, max_use=2, max_using_delay=5.0,
                     **{name: bad})
    for _ in range(3):
        with pool.obj(timeout=0) as o:
            assert o["num"] in (0, 1)
    a, b = pool.get(timeout=0), pool.get(timeout=0)
    pool.ret(b)
    tick(pool, sched, 6)  # long-use warning for a (tracer), health round for b (health)
    json.loads(str(pool))  # stats/tracer hooks
    pool.ret(a)
    s = check_consistent(pool)
    assert (s["nusing"], s["hk_errors"]) == (0, 0)
    assert s["nborrows"] == s["nreturns"] == 5
    assert calls, f"the {name} hook was never called"
    if name in ("opener", "getter", "retter", "closer", "health"):
        assert any(name in m for m in mppool_warnings(warnings_log)), "the error is logged"
    pool.shutdown()
    s = pool.stats()
    assert (s["nobjs"], s["ncreating"]) == (0, 0)
    assert s["ndestroys"] == s["ncreated"]


def test_stats_and_tracer_hooks_describe_objects(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=1, stats=lambda o: {"n": o["num"] * 10})
    assert pool.stats()["avail"][0]["stats"] == {"n": 0}
    traced = make_pool(min_size=1, tracer=lambda o: f"object #{o['num']}")
    entry = traced.stats()["avail"][0]
    assert entry["trace"] == "object #0" and "stats" not in entry
    plain = make_pool(min_size=1)
    assert plain.stats()["avail"][0]["trace"] == str({"num": 0})


# ------------------------------------------------------------------------------ housekeeping


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"delay": 7.0, "max_avail_delay": 10.0}, 7.0),
    ({"max_avail_delay": 10.0}, 5.0),
    ({"max_avail_delay": 10.0, "max_using_delay": 4.0}, 2.0),
    ({"max_using_delay": 4.0}, 2.0),
    ({"max_lifetime": 3.0, "max_avail_delay": 10.0, "max_using_delay": 8.0}, 1.5),
    ({"max_using_delay_kill": 6.0}, 3.0),
    ({"health": bool}, 60.0),
    ({"health": bool, "max_avail_delay": 8.0}, 4.0),
    ({"health": bool, "delay": 2.0}, 2.0),
    ({"delay": 0.5}, 0.5),
])
def test_housekeeping_period(make_pool: Callable[..., Pool], sched: ManualScheduler,
                             kwargs: dict[str, Any], expected: float) -> None:
    pool = make_pool(min_size=0, **kwargs)
    assert pool.stats()["delay"] == expected
    assert sched.entered == [expected]
    assert sched.advance(expected * 0.99) == 0
    assert pool.stats()["hk_rounds"] == 0
    assert sched.advance(expected * 0.01) == 1
    assert pool.stats()["hk_rounds"] == 1
    assert sched.pending() == [pytest.approx(sched.clock.now() + expected)]
    assert sched.advance(expected) == 1
    assert pool.stats()["hk_rounds"] == 2


def test_no_housekeeping_without_a_reason(make_pool: Callable[..., Pool],
                                          sched: ManualScheduler) -> None:
    pool = make_pool(min_size=0, max_use=3)
    assert not pool.stats()["delay"]
    assert sched.entered == []
    sched.advance(10_000)
    assert pool.stats()["hk_rounds"] == 0


def test_housekeeping_thread_on_a_fake_clock(rec: Recorder) -> None:
    clock = FakeClock()
    before = set(threading.enumerate())
    pool = Pool._made_with(rec.fun, min_size=0, max_avail_delay=10.0, closer=rec.closer,
                           clock=clock)
    try:
        ours = [t for t in threading.enumerate() if t not in before]
        assert ours, "a pool on its own clock runs its own housekeeping thread"
        o = pool.get()
        pool.ret(o)
        clock.advance(5)
        wait_until(lambda: pool.stats()["hk_rounds"] >= 1)
        assert rec.closed == []
        clock.advance(5)
        wait_until(lambda: pool.stats()["hk_rounds"] >= 2)
        wait_until(lambda: rec.closed == [o])
        assert pool.stats()["nrecycled"] == 1
    finally:
        pool.shutdown()
    for t in ours:
        t.join(5)
        assert not t.is_alive(), "shutdown() stops the pool's housekeeping thread"


# ------------------------------------------------------------------------------ stats


def test_stats_has_every_spec_key(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=2, max_size=3, timeout=2.5, max_use=4, max_avail_delay=8.0,
                     max_using_delay=6.0, max_using_delay_kill=12.0, health_freq=2)
    held = pool.get()
    s = pool.stats()
    missing = [k for k in PPP_STATS_KEYS if k not in s]
    assert not missing
    assert json.loads(json.dumps(s)) == s  # JSON-compatible (no tuples, no objects)
    assert (s["min_size"], s["max_size"], s["max_use"], s["timeout"]) == (2, 3, 4, 2.5)
    assert (s["max_avail_delay"], s["max_using_delay_warn"], s["max_using_delay_kill"]) == \
        (8.0, 6.0, 12.0)
    assert (s["health_freq"], s["delay"], s["shutdown"]) == (2, 3.0, False)
    assert (s["navail"], s["nusing"], s["nobjs"], s["nwaiting"], s["ntodel"]) == (1, 1, 2, 0, 0)
    assert s["sem"] == {"value": 2, "init": 3}
    assert len(s["using"]) == 1 and s["using"][0]["pid"] == os.getpid()
    assert s["using"][0]["uses"] == 1
    assert "pid" not in s["avail"][0]
    pool.ret(held)


def test_str_is_json_dumps_of_stats(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=2, max_size=4)
    held = pool.get()
    text = str(pool)
    from_str = json.loads(text)
    from_stats = json.loads(json.dumps(pool.stats()))
    assert set(from_str) == set(from_stats)
    # Only the wall-clock "now" may differ between the two calls (the pool runs on a fake clock).
    from_str.pop("now")
    from_stats.pop("now")
    assert from_str == from_stats
    pool.ret(held)
    assert json.loads(str(pool))["nusing"] == 0


def test_str_equals_json_dumps_of_stats_exactly(make_pool: Callable[..., Pool],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make_pool(min_size=1)
    monkeypatch.setattr(time, "time", lambda: 1234.5)  # pin the only wall-clock field
    assert str(pool) == json.dumps(pool.stats())


def test_stats_counters_follow_the_operations(make_pool: Callable[..., Pool],
                                              runner: Runner) -> None:
    pool = make_pool(min_size=0, max_size=2, max_use=2)
    a = pool.get()
    b = pool.get()
    box = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.stats()["nwaiting"] == 1)
    pool.ret(a)
    wait_until(lambda: box["done"])
    pool.ret(box["result"])  # second use of a: worn out
    pool.ret(b)
    s = check_consistent(pool)
    assert (s["ncreated"], s["nborrows"], s["nuses"], s["nreturns"]) == (2, 3, 3, 3)
    assert (s["nwornout"], s["ndestroys"], s["nobjs"], s["nwaiting"]) == (1, 1, 1, 0)
    assert s["sem"] == {"value": 2, "init": 2}


# ------------------------------------------------------------------------------ shutdown


def test_shutdown_wakes_every_waiter_with_pool_closed(
        make_pool: Callable[..., Pool], runner: Runner, rec: Recorder,
        warnings_log: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_size=1, max_size=1)
    held = pool.get()
    boxes = [runner.start(pool.get), runner.start(lambda: pool.get(timeout=30))]
    wait_until(lambda: pool.waiting() == 2)
    pool.shutdown()
    wait_until(lambda: all(b["done"] for b in boxes))
    for b in boxes:
        assert isinstance(b.get("error"), PoolClosed)
        assert "shutting down" in str(b["error"])
    assert rec.closed == [held]  # in use, closed anyway...
    assert any("in use" in m for m in mppool_warnings(warnings_log))  # ...with a warning
    for timeout in (None, 0, 1.0):
        with pytest.raises(PoolClosed, match="shutting down"):
            pool.get(timeout=timeout)
    s = pool.stats()
    assert s["shutdown"] is True
    assert (s["nobjs"], s["nwaiting"], s["ncreating"]) == (0, 0, 0)
    assert pool.free() == 0 and pool.waiting() == 0 and len(pool) == 0


def test_shutdown_closes_idle_objects(make_pool: Callable[..., Pool], rec: Recorder,
                                      sched: ManualScheduler) -> None:
    pool = make_pool(min_size=3, max_avail_delay=10.0)
    assert sched.pending()
    pool.shutdown()
    assert sorted(nums(rec.closed)) == [0, 1, 2]
    assert len(pool) == 0 and pool.stats()["ndestroys"] == 3
    assert sched.pending() == []  # housekeeping stopped
    pool.housekeep()
    assert pool.stats()["hk_rounds"] == 0
    pool.shutdown()  # idempotent
    assert len(rec.closed) == 3


def test_ret_after_shutdown_is_harmless(make_pool: Callable[..., Pool], rec: Recorder,
                                        warnings_log: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_size=0)
    o = pool.get()
    pool.shutdown()
    assert rec.closed == [o]
    pool.ret(o)  # no exception, not closed twice
    assert rec.closed == [o]
    assert len(pool) == 0


def test_shutdown_delay_waits_for_objects_in_use(
        make_pool: Callable[..., Pool], runner: Runner, rec: Recorder,
        warnings_log: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_size=0)
    o = pool.get()
    closing = runner.start(lambda: pool.shutdown(delay=30.0))
    wait_until(lambda: pool.stats()["shutdown"])
    assert not closing["done"] and rec.closed == []
    with pytest.raises(PoolClosed):
        pool.get(timeout=0)
    pool.ret(o)
    wait_until(lambda: closing["done"])
    assert "error" not in closing
    assert rec.closed == [o]
    assert not any("in use" in m for m in mppool_warnings(warnings_log))


# ------------------------------------------------------------------------------ resize, free, waiting, len


def test_free_len_and_waiting(make_pool: Callable[..., Pool], runner: Runner) -> None:
    pool = make_pool(min_size=1, max_size=3)
    assert (pool.free(), len(pool), pool.waiting()) == (3, 1, 0)
    a = pool.get()
    assert (pool.free(), len(pool)) == (2, 1)
    b, c = pool.get(), pool.get()
    assert (pool.free(), len(pool)) == (0, 3)
    box = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    assert pool.stats()["nwaiting"] == 1
    pool.ret(a)
    wait_until(lambda: box["done"])
    assert pool.waiting() == 0
    for o in (box["result"], b, c):
        pool.ret(o)
    assert (pool.free(), len(pool)) == (3, 3)


def test_waiting_drops_when_a_waiter_times_out(make_pool: Callable[..., Pool],
                                               runner: Runner) -> None:
    pool = make_pool(min_size=1, max_size=1)
    held = pool.get()
    seen = []
    box = runner.start(lambda: pool.get(timeout=0.5))
    wait_until(lambda: seen.append(pool.waiting()) or box["done"])
    assert 1 in seen
    assert isinstance(box.get("error"), TimeOut)
    assert pool.waiting() == 0
    pool.ret(held)


def test_free_of_an_unbounded_pool_is_large(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=0)
    assert pool.free() >= 2**31 - 1
    pool.get()
    assert pool.free() >= 2**31 - 1


def test_resize_up_lets_a_waiter_in(make_pool: Callable[..., Pool], runner: Runner) -> None:
    pool = make_pool(min_size=1, max_size=1)
    held = pool.get()
    box = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    pool.resize(2)
    wait_until(lambda: box["done"])
    assert box.get("result") == {"num": 1}
    s = check_consistent(pool)
    assert (s["max_size"], s["nusing"], s["sem"]) == (2, 2, {"value": 0, "init": 2})
    pool.ret(held)


def test_resize_down_closes_extra_idle_objects(make_pool: Callable[..., Pool],
                                               rec: Recorder) -> None:
    pool = make_pool(min_size=0, max_size=4)
    objs = [pool.get() for _ in range(4)]
    for o in objs:
        pool.ret(o)
    pool.resize(2)
    assert len(rec.closed) == 2
    s = check_consistent(pool)
    assert (s["max_size"], s["nobjs"], s["navail"]) == (2, 2, 2)
    assert pool.free() == 2


def test_resize_down_closes_extra_objects_as_they_come_back(
        make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(min_size=0, max_size=3)
    objs = [pool.get() for _ in range(3)]
    pool.resize(1)
    assert rec.closed == []  # in use: not closed under the user's feet
    for k, o in enumerate(objs):
        pool.ret(o)
        assert len(rec.closed) == min(k + 1, 2)  # closed while the pool is above its size
    assert len(rec.closed) == 2
    s = check_consistent(pool)
    assert (s["nobjs"], s["navail"]) == (1, 1)
    assert pool.free() == 1
    pool.get(timeout=0)
    with pytest.raises(TimeOut):
        pool.get(timeout=0)


def test_resize_to_unbounded(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=0, max_size=1)
    pool.get()
    pool.resize(0)
    pool.get(timeout=0)
    assert pool.stats()["max_size"] == 0


@pytest.mark.parametrize(("size", "exc", "words"), [
    (-1, ValueError, ["max_size", "-1"]),
    (1, ValueError, ["max_size", "1", "min_size", "2"]),
    ("3", TypeError, ["max_size", "'3'"]),
    (2.5, TypeError, ["max_size", "2.5"]),
])
def test_resize_rejects_bad_sizes(make_pool: Callable[..., Pool], size: Any,
                                  exc: type[Exception], words: list[str]) -> None:
    pool = make_pool(min_size=2, max_size=3)
    with pytest.raises(exc) as info:
        pool.resize(size)
    for word in words:
        assert word in str(info.value)
    assert pool.stats()["max_size"] == 3


# ------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(("kwargs", "exc", "words"), [
    ({"max_size": -1}, ValueError, ["max_size", "-1"]),
    ({"min_size": -2}, ValueError, ["min_size", "-2"]),
    ({"min_size": 3, "max_size": 2}, ValueError, ["min_size", "3", "max_size", "2"]),
    ({"max_size": 2.5}, TypeError, ["max_size", "2.5"]),
    ({"min_size": "1"}, TypeError, ["min_size", "'1'"]),
    ({"max_use": -1}, ValueError, ["max_use", "-1"]),
    ({"timeout": -1}, ValueError, ["timeout", "-1"]),
    ({"timeout": "soon"}, TypeError, ["timeout", "'soon'"]),
    ({"max_avail_delay": -0.5}, ValueError, ["max_avail_delay", "-0.5"]),
    ({"max_using_delay": -3}, ValueError, ["max_using_delay", "-3"]),
    ({"max_using_delay_kill": float("nan")}, ValueError, ["max_using_delay_kill", "nan"]),
    ({"max_lifetime": -1.0}, ValueError, ["max_lifetime", "-1.0"]),
    ({"delay": -2}, ValueError, ["delay", "-2"]),
    ({"health_freq": 0}, ValueError, ["health_freq", "0"]),
    ({"opener": "nope"}, TypeError, ["opener", "'nope'"]),
    ({"getter": 1}, TypeError, ["getter", "1"]),
    ({"retter": [1]}, TypeError, ["retter", "[1]"]),
    ({"closer": 2.0}, TypeError, ["closer", "2.0"]),
    ({"health": "yes"}, TypeError, ["health", "'yes'"]),
    ({"stats": 3}, TypeError, ["stats", "3"]),
    ({"tracer": "str"}, TypeError, ["tracer", "'str'"]),
    ({"kill_holder": "yes"}, TypeError, ["kill_holder", "'yes'"]),
])
def test_bad_arguments_name_the_parameter_and_value(
        kwargs: dict[str, Any], exc: type[Exception], words: list[str], rec: Recorder) -> None:
    before = set(threading.enumerate())
    with pytest.raises(exc) as info:
        Pool._made_with(rec.fun, **{"max_avail_delay": 1.0, "clock": FakeClock(), **kwargs})
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    # Nothing half-created: no object made, no housekeeping thread started.
    assert rec.nums == []
    assert set(threading.enumerate()) <= before


@pytest.mark.parametrize("fun", [None, 42, "make"])
def test_fun_must_be_callable(fun: Any) -> None:
    with pytest.raises(TypeError) as info:
        Pool(fun)
    assert "fun" in str(info.value) and repr(fun) in str(info.value)


@pytest.mark.parametrize(("timeout", "exc"), [(-1, ValueError), ("x", TypeError),
                                              (float("nan"), ValueError)])
def test_get_rejects_a_bad_timeout(make_pool: Callable[..., Pool], timeout: Any,
                                   exc: type[Exception]) -> None:
    pool = make_pool(min_size=1, max_size=1)
    with pytest.raises(exc) as info:
        pool.get(timeout=timeout)
    assert "timeout" in str(info.value) and repr(timeout) in str(info.value)
    s = check_consistent(pool)
    assert (s["nusing"], s["navail"], s["nwaiting"]) == (0, 1, 0)


def test_shutdown_rejects_a_bad_delay(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(min_size=0)
    with pytest.raises(ValueError, match="delay"):
        pool.shutdown(delay=-1)
    assert pool.stats()["shutdown"] is False


# ------------------------------------------------------------------------------ misc


def test_pools_are_exported_and_distinct(make_pool: Callable[..., Pool]) -> None:
    assert mppool.Pool is Pool
    a, b = make_pool(min_size=0), make_pool(min_size=0)
    assert a.stats()["id"] != b.stats()["id"]


def test_log_messages_use_the_mppool_logger_with_arguments(
        make_pool: Callable[..., Pool], warnings_log: pytest.LogCaptureFixture) -> None:
    pool = make_pool(min_size=0)
    pool.ret("unknown")
    records = [r for r in warnings_log.records if r.name == "mppool"]
    assert records and all(r.args for r in records)  # %s-style, not pre-formatted f-strings


# ------------------------------------------------------------------------------ property


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("get"), st.sampled_from([0, 0.001])),
        st.tuples(st.just("ret"), st.integers(0, 7)),
        st.tuples(st.just("ret_old"), st.integers(0, 7)),
        st.tuples(st.just("ret_unknown"), st.none()),
        st.tuples(st.just("fail_next"), st.none()),
        st.tuples(st.just("kill"), st.none()),
        st.tuples(st.just("idle"), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_size=st.integers(1, 4), min_size=st.integers(0, 4), max_use=st.integers(0, 3), ops=OPS)
def test_property_bounded_pool_stays_consistent(max_size: int, min_size: int, max_use: int,
                                                ops: list[tuple[str, Any]]) -> None:
    min_size = min(min_size, max_size)
    fail = {"next": False}
    made: list[Any] = []
    closed: list[Any] = []

    def fun(i: int) -> dict[str, int]:
        if fail["next"]:
            fail["next"] = False
            raise RuntimeError("creation failed")
        obj = {"num": i}
        made.append(obj)
        return obj

    sched = ManualScheduler(FakeClock())
    pool = Pool._made_with(fun, max_size=max_size, min_size=min_size, max_use=max_use,
                           max_avail_delay=3.0, max_using_delay_kill=10.0,
                           closer=closed.append, clock=sched.clock, scheduler=sched)
    held: list[tuple[Any, float]] = []  # (object, when it was got)
    old: list[Any] = []  # returned, killed or never ours: returning them again changes nothing
    try:
        for op, arg in ops:
            hk_failed = False
            if op == "get":
                full = len(held) >= max_size
                try:
                    held.append((pool.get(timeout=arg), sched.clock.now()))
                    assert not full, "got an object from a full pool"
                except TimeOut:
                    assert full, "TimeOut although the pool had room"
                except RuntimeError:
                    assert not full
            elif op == "ret" and held:
                o, _ = held.pop(arg % len(held))
                pool.ret(o)
                old.append(o)
            elif op == "ret_old" and (stale := [o for o in old if all(o is not h for h, _ in held)]):
                # (an old object lent out again is the new holder's: identity cannot tell)
                before = pool.stats()
                pool.ret(stale[arg % len(stale)])
                after = pool.stats()
                for key in ("navail", "nusing", "nreturns", "nobjs"):
                    assert after[key] == before[key], key
            elif op == "ret_unknown":
                pool.ret({"num": -1})
            elif op == "fail_next":
                fail["next"] = True
            elif op in ("kill", "idle"):  # kill: every lease is held past the kill delay
                armed = fail["next"]
                tick(pool, sched, 10.0 if op == "kill" else 3.0)
                hk_failed = armed and not fail["next"]
                now = sched.clock.now()
                old.extend(o for o, t in held if now - t >= 10.0)
                held = [(o, t) for o, t in held if now - t < 10.0]
            s = pool.stats()
            assert s["nobjs"] + s["ncreating"] <= max_size
            assert s["nobjs"] == s["navail"] + s["nusing"] == len(pool)
            assert s["nusing"] == len(held)
            assert s["ncreating"] == 0 and s["nwaiting"] == 0
            assert pool.free() == max_size - len(held)
            assert s["ndestroys"] == len(closed) == s["ncreated"] - s["nobjs"]
            assert s["ncreated"] == len(made)
            assert not any(any(o is c for c in closed) for o, _ in held)
            if op in ("kill", "idle") and not hk_failed:
                assert s["nobjs"] >= min_size  # housekeeping refills to min_size
    finally:
        pool.shutdown()
    assert len(closed) == len(made)


def test_an_object_under_reset_after_reclaim_still_holds_its_slot():
    """Reclaiming a dead holder's object resets it outside the lock; meanwhile the slot is
    still taken, so a get() on a full pool must not create a second object."""
    import mppool
    from mppool.holder import Holder

    pool = mppool.Pool(lambda i: i, max_size=1, min_size=0)
    dead = Holder(pid=999999, start=1.0, host="elsewhere", conn=7)
    pool._checkout(dead, timeout=0)
    in_reset, release = threading.Event(), threading.Event()

    def slow_reset(obj):
        in_reset.set()
        release.wait(5)

    t = threading.Thread(target=pool._reclaim, args=(lambda h: h.conn == 7, slow_reset))
    t.start()
    try:
        assert in_reset.wait(5)
        with pytest.raises(mppool.TimeOut):
            pool.get(timeout=0)
        assert pool.stats()["ncreated"] == 1
    finally:
        release.set()
        t.join(5)
    assert pool.get(timeout=0) == 0  # the reset object, reused


def test_fun_error_survives_a_budget_that_cannot_take_its_token_back():
    """fun fails and giving its token back fails too: fun's error is the one raised, and the
    reserved slot is free again."""

    class Budget:
        def get(self, timeout=None):
            return object()

        def put(self, token):
            raise OSError("budget unreachable")

    def fun(i):
        raise ValueError("database down")

    pool = Pool(fun, max_size=1, min_size=0, budget=Budget())
    with pytest.raises(ValueError, match="database down"):
        pool.get(timeout=0)
    assert pool.free() == 1 and pool.stats()["ncreating"] == 0
    pool.shutdown()
