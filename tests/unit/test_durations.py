"""Durations: one rule at the edge, and no wait handed to the OS that it cannot take.

``None`` or ``inf`` mean forever (or never); any finite number >= 0 is seconds, however large;
NaN, negatives, bools and non-numbers are refused, naming the parameter. Huge finite values
(``max_lifetime=1e308``) are legal, so every wait is clamped and no scheduler thread dies.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from mppool import Pool
from mppool.clock import MAX_WAIT, REAL_CLOCK, Clock, clamp_wait, wait_event
from mppool.sched import Scheduler
from mppool.validate import check_delay, check_duration, check_period, check_timeout

try:
    from helpers import wait_until
except ImportError:  # tests/ became a package
    from tests.helpers import wait_until

# Options where 0 means "off": never (None, inf) is stored as 0.
PERIODS = ("max_avail_delay", "max_using_delay", "max_using_delay_kill", "max_lifetime")
BAD = [(math.nan, ValueError), (-1, ValueError), (-0.5, ValueError), (-math.inf, ValueError),
       ("1", TypeError), (True, TypeError), ([1], TypeError), (1j, TypeError)]


@pytest.fixture
def sched() -> Iterator[Scheduler]:
    """A scheduler of the test's own, one worker: if that worker dies, nothing runs."""
    s = Scheduler(workers=1, name="mppool-test-hk")
    yield s
    s.close(wait=True)
    assert not any(t.is_alive() for t in s._threads)


@pytest.fixture
def pools() -> Iterator[list[Pool]]:
    made: list[Pool] = []
    yield made
    for p in made:
        p.shutdown()


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("value,expected", [
    (None, None), (math.inf, None), (0, 0.0), (2, 2.0), (0.25, 0.25), (1e308, 1e308),
    (10**400, None),  # an int too large for a float: longer than anything
])
def test_check_timeout_maps_forever_to_none(value: Any, expected: Any) -> None:
    assert check_timeout("timeout", value) == expected
    assert check_duration("delay", value) == expected


@pytest.mark.parametrize("value,exc", BAD)
def test_every_duration_check_names_the_parameter_and_value(value: Any, exc: type) -> None:
    for check in (check_timeout, check_duration, check_period, check_delay):
        with pytest.raises(exc, match="my_option") as info:
            check("my_option", value)
        assert repr(value) in str(info.value)


def test_check_period_maps_never_to_off() -> None:
    assert check_period("p", None) == 0.0
    assert check_period("p", math.inf) == 0.0
    assert check_period("p", 3) == 3.0


@pytest.mark.parametrize("option", [*PERIODS, "timeout", "delay"])
@pytest.mark.parametrize("value,exc", BAD)
def test_pool_refuses_a_bad_duration_naming_it(option: str, value: Any, exc: type) -> None:
    with pytest.raises(exc, match=option):
        Pool(lambda i: i, min_size=0, **{option: value})


@pytest.mark.parametrize("option", PERIODS)
@pytest.mark.parametrize("never", [None, math.inf])
def test_never_is_stored_as_off(option: str, never: Any, pools: list[Pool]) -> None:
    pool = Pool(lambda i: i, min_size=0, **{option: never})
    pools.append(pool)
    s = pool.stats()
    key = "max_using_delay_warn" if option == "max_using_delay" else option
    assert s[key] == 0.0
    assert s["delay"] == 0.0  # nothing to housekeep: no task at all


@pytest.mark.parametrize("forever", [None, math.inf])
def test_timeout_forever_is_none_and_delay_forever_means_no_housekeeping(
        forever: Any, pools: list[Pool]) -> None:
    pool = Pool(lambda i: i, min_size=0, timeout=forever, delay=forever, max_avail_delay=1)
    pools.append(pool)
    s = pool.stats()
    assert s["timeout"] is None
    assert s["delay"] == 0.0 and pool._hk_task is None


def test_shutdown_delay_inf_waits_for_the_lease_to_come_back(pools: list[Pool]) -> None:
    pool = Pool(lambda i: i, max_size=1)
    obj = pool.get()
    done = threading.Event()
    t = threading.Thread(target=lambda: (pool.shutdown(math.inf), done.set()), daemon=True)
    t.start()
    wait_until(lambda: pool.stats()["shutdown"], what="shutdown started")
    assert not done.is_set()  # waiting for the lease: inf did not crash the wait
    pool.ret(obj)
    t.join(5)
    assert done.is_set() and not t.is_alive()


# --------------------------------------------------------------------- waits given to the OS


@pytest.mark.parametrize("value,expected", [
    (None, None), (math.inf, MAX_WAIT), (math.nan, MAX_WAIT), (1e308, MAX_WAIT),
    (MAX_WAIT + 1, MAX_WAIT), (5.0, 5.0), (0, 0.0), (-3, 0.0),
])
def test_clamp_wait(value: Any, expected: Any) -> None:
    assert clamp_wait(value) == expected


def test_clock_wait_hands_the_os_a_clamped_timeout() -> None:
    class Cond:
        timeouts: list[float | None] = []

        def wait(self, timeout: float | None) -> None:
            self.timeouts.append(timeout)

    cond = Cond()
    for t in (1e308, math.inf, 2.0, None):
        REAL_CLOCK.wait(cond, t)  # type: ignore[arg-type]
    assert cond.timeouts == [MAX_WAIT, MAX_WAIT, 2.0, None]


def test_wait_event_takes_any_timeout() -> None:
    ev = threading.Event()
    assert wait_event(ev, 0.01) is False
    ev.set()
    assert wait_event(ev, 1e300) is True
    assert wait_event(ev, None) is True


# ------------------------------------------------------------------- no scheduler thread dies


def _ran(sched: Scheduler) -> threading.Event:
    ev = threading.Event()
    sched.enter(0, ev.set)
    return ev


def test_scheduler_survives_a_huge_or_infinite_delay(sched: Scheduler) -> None:
    sched.enter(1e308, lambda: None)
    sched.enter(math.inf, lambda: None)
    # The worker now waits for those tasks (the only ones left): once in this wait, a
    # worker that handed 1e308 s to the OS died of OverflowError.
    assert _ran(sched).wait(5)
    assert _ran(sched).wait(5), "the scheduler's only worker died"
    assert all(t.is_alive() for t in sched._threads)


@pytest.mark.parametrize("delay,exc", [(math.nan, ValueError), (-1, ValueError),
                                       ("1", TypeError), (None, TypeError)])
def test_scheduler_refuses_a_bad_delay(sched: Scheduler, delay: Any, exc: type) -> None:
    with pytest.raises(exc, match="delay"):
        sched.enter(delay, lambda: None)
    assert _ran(sched).wait(5)


def test_scheduler_survives_a_task_that_raises(sched: Scheduler,
                                               caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise OverflowError("boom")

    for _ in range(3):
        sched.enter(0, boom)
    assert _ran(sched).wait(5)
    assert all(t.is_alive() for t in sched._threads)
    # Logged, but a failure that repeats is not logged every time.
    assert sum("boom" in (r.exc_text or "") or "failed" in r.getMessage()
               for r in caplog.records) == 1


def test_scheduler_survives_a_clock_that_fails() -> None:
    class Flaky(Clock):
        fails = 1

        def wait(self, cond: threading.Condition, timeout: float | None) -> None:
            if self.fails:
                self.fails -= 1
                raise OverflowError("timestamp out of range for platform time_t")
            super().wait(cond, timeout)

    s = Scheduler(Flaky(), workers=1, name="mppool-test-flaky")
    try:
        s.enter(60, lambda: None)  # the worker waits for it: that wait raises once
        assert _ran(s).wait(5)
        assert all(t.is_alive() for t in s._threads)
    finally:
        s.close(wait=True)


def test_pools_with_huge_durations_do_not_stop_others(sched: Scheduler,
                                                      pools: list[Pool]) -> None:
    for kw in ({"max_lifetime": 1e308}, {"delay": math.inf}, {"delay": 1e300},
               {"max_avail_delay": math.inf}, {"max_using_delay_kill": 1e308}):
        pool = Pool._made_with(lambda i: i, max_size=2, scheduler=sched, **kw)
        pools.append(pool)
        pool.ret(pool.get())  # and the object is usable: no arithmetic went wrong
    assert _ran(sched).wait(5)  # the worker has since waited for those rounds
    other = Pool._made_with(lambda i: i, max_size=2, max_avail_delay=0.1, scheduler=sched)
    pools.append(other)
    wait_until(lambda: other.stats()["hk_rounds"] >= 3, timeout=5, what="other pool's rounds")
    assert all(t.is_alive() for t in sched._threads)
