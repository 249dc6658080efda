"""``Pool(burst_limit=...)``: a soft ``max_size``.

When nothing is idle, gets create objects up to ``burst_limit``; an object coming back while
the pool holds ``max_size`` objects without it is handed to a queued waiter, or closed when
nobody waits. Everything runs on a ``FakeClock`` and a ``ManualScheduler``; only blocked
getters use real (short) time, since they wait on a real event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mppool import Pool, TimeOut
from mppool.holder import Holder
from mppool.pools import TokenPool

try:
    from helpers import ManualScheduler, Recorder, Runner, wait_until
except ImportError:  # tests/ became a package
    from tests.helpers import ManualScheduler, Recorder, Runner, wait_until


@pytest.fixture
def make_pool(runner: Runner, sched: ManualScheduler, rec: Recorder) -> Iterator[Callable[..., Pool]]:
    made: list[Pool] = []

    def make(**kw: Any) -> Pool:
        kw.setdefault("clock", sched.clock)
        kw.setdefault("scheduler", sched)
        kw.setdefault("closer", rec.closer)
        kw.setdefault("min_size", 0)
        pool = Pool._made_with(rec.fun, **kw)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.shutdown()


def check_bounds(pool: Pool) -> dict[str, Any]:
    s = pool.stats()
    assert s["nobjs"] == s["navail"] + s["nusing"] == len(pool)
    assert s["nobjs"] + s["ncreating"] <= (s["burst_limit"] or s["max_size"])
    assert s["navail"] <= s["max_size"]  # burst objects are never kept idle
    return s


# ------------------------------------------------------------------------------ validation


def test_burst_limit_below_max_size_raises_naming_both() -> None:
    with pytest.raises(ValueError, match=r"burst_limit=2 must be >= max_size=3"):
        Pool(lambda i: i, max_size=3, burst_limit=2)


@pytest.mark.parametrize("max_size", [0, None])
def test_burst_limit_needs_a_bounded_pool(max_size: int | None) -> None:
    with pytest.raises(ValueError, match=r"burst_limit=4 .*max_size=0"):
        Pool(lambda i: i, max_size=max_size, burst_limit=4)


@pytest.mark.parametrize("bad", [2.5, "4", True])
def test_burst_limit_must_be_an_int(bad: Any) -> None:
    with pytest.raises(TypeError, match="burst_limit"):
        Pool(lambda i: i, max_size=2, burst_limit=bad)


def test_burst_limit_is_keyword_only_and_off_by_default() -> None:
    pool = Pool(lambda i: i, max_size=2, min_size=0, delay=None)
    try:
        assert pool.stats()["burst_limit"] is None
        assert pool.free() == 2
    finally:
        pool.shutdown()


# ------------------------------------------------------------------------------ bursting


def test_creates_up_to_burst_limit_when_nothing_is_idle(make_pool: Callable[..., Pool],
                                                         rec: Recorder) -> None:
    pool = make_pool(max_size=2, burst_limit=4)
    objs = [pool.get(timeout=0) for _ in range(4)]
    assert sorted(o["num"] for o in objs) == [0, 1, 2, 3] and rec.nums == [0, 1, 2, 3]
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    s = check_bounds(pool)
    assert s["nusing"] == 4 and s["ncreated"] == 4 and s["burst_limit"] == 4
    assert s["sem"] == {"value": 0, "init": 4}
    assert "burst_limit: 4" in repr(pool)


def test_idle_objects_are_used_before_bursting(make_pool: Callable[..., Pool],
                                               rec: Recorder) -> None:
    pool = make_pool(max_size=2, burst_limit=4, min_size=2)
    assert rec.nums == [0, 1]
    a, b = pool.get(), pool.get()
    assert {a["num"], b["num"]} == {0, 1} and rec.nums == [0, 1]
    pool.get()  # nothing idle: a burst object
    assert rec.nums == [0, 1, 2]


def test_burst_objects_are_closed_when_returned_with_nobody_waiting(
        make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(max_size=2, burst_limit=4)
    objs = [pool.get() for _ in range(4)]
    for obj in objs:
        pool.ret(obj)
    # The first two returns found the pool at max_size without them: closed.
    assert rec.closed == objs[:2]
    s = check_bounds(pool)
    assert s["nburst_closed"] == 2 and s["ndestroys"] == 2 and s["nreturns"] == 4
    assert s["nobjs"] == s["navail"] == 2 and s["ntodel"] == 0
    # Back to max_size idle objects: the next two gets create nothing.
    pool.ret(pool.get())
    assert rec.nums == [0, 1, 2, 3]


def test_a_burst_object_goes_to_a_waiter(make_pool: Callable[..., Pool], runner: Runner,
                                         rec: Recorder) -> None:
    pool = make_pool(max_size=2, burst_limit=3)
    objs = [pool.get() for _ in range(3)]
    box = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    pool.ret(objs[2])  # above max_size, but somebody waits: handed over, not closed
    wait_until(lambda: box["done"])
    assert box["result"] is objs[2]
    s = check_bounds(pool)
    assert s["nburst_closed"] == 0 and rec.closed == [] and s["nusing"] == 3


def test_a_waiter_that_gave_up_does_not_keep_a_burst_object(
        make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(max_size=1, burst_limit=2)
    a, b = pool.get(), pool.get()
    with pytest.raises(TimeOut):
        pool.get(timeout=0.01)  # queued, then withdrawn
    pool.ret(b)
    assert rec.closed == [b] and pool.stats()["nburst_closed"] == 1
    pool.ret(a)
    assert check_bounds(pool)["navail"] == 1


def test_burst_limit_equal_to_max_size_is_a_hard_bound(make_pool: Callable[..., Pool],
                                                       rec: Recorder) -> None:
    pool = make_pool(max_size=2, burst_limit=2)
    objs = [pool.get() for _ in range(2)]
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    for obj in objs:
        pool.ret(obj)
    assert rec.closed == [] and check_bounds(pool)["navail"] == 2


def test_free_counts_room_up_to_burst_limit(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(max_size=2, burst_limit=5, min_size=1)
    assert pool.free() == 5  # 1 idle + room for 4 more
    held = [pool.get() for _ in range(3)]
    assert pool.free() == 2
    assert pool.stats()["sem"] == {"value": 2, "init": 5}
    pool.ret(held.pop())  # closed: the room comes back
    assert pool.free() == 3
    assert pool.stats()["sem"] == {"value": 3, "init": 5}


# ------------------------------------------------------------------------------ other paths


def test_reclaimed_burst_objects_are_closed_when_nobody_waits(
        make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(max_size=1, burst_limit=3)
    gone = Holder(pid=999_999, start=1.0, host="elsewhere", conn=7)
    for _ in range(3):
        pool._checkout(gone)
    assert pool._reclaim(lambda h: h == gone) == 3
    s = check_bounds(pool)
    assert s["nburst_closed"] == 2 and len(rec.closed) == 2 and s["navail"] == 1


def test_health_checked_object_above_max_size_is_closed(
        make_pool: Callable[..., Pool], rec: Recorder) -> None:
    """While the only idle object is out for its health check, gets burst; when it comes
    back the pool is above max_size and nobody waits, so it is closed."""
    held: list[Any] = []

    def health(obj: Any) -> bool:
        held.extend(pool.get(timeout=0) for _ in range(2))  # nothing idle: both are new
        return True

    pool = make_pool(max_size=1, burst_limit=3, min_size=1, health=health, delay=1.0)
    first = pool.get()
    pool.ret(first)
    pool.housekeep()
    assert rec.nums == [0, 1, 2] and rec.closed == [first]
    s = check_bounds(pool)
    assert s["nburst_closed"] == 1 and s["nhealth"] == 1 and s["nusing"] == 2


def test_min_size_refill_is_unaffected(make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(max_size=2, burst_limit=4, min_size=2, delay=1.0)
    objs = [pool.get() for _ in range(4)]
    pool.housekeep()
    assert rec.nums == [0, 1, 2, 3]  # the refill counts objects in use: nothing to create
    for obj in objs:
        pool.ret(obj)
    pool.housekeep()
    s = check_bounds(pool)
    assert s["nobjs"] == 2 and s["ncreated"] == 4 and s["nburst_closed"] == 2


# ------------------------------------------------------------------------------ resize


def test_resize_keeps_max_size_within_burst_limit(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(max_size=2, burst_limit=4)
    with pytest.raises(ValueError, match=r"burst_limit=4 must be >= max_size=5"):
        pool.resize(5)
    with pytest.raises(ValueError, match=r"burst_limit=4 .*max_size=0"):
        pool.resize(0)
    assert pool.stats()["max_size"] == 2
    pool.resize(4)
    s = pool.stats()
    assert s["max_size"] == 4 and s["burst_limit"] == 4


def test_resize_changes_what_counts_as_a_burst(make_pool: Callable[..., Pool],
                                               rec: Recorder) -> None:
    pool = make_pool(max_size=3, burst_limit=4)
    objs = [pool.get() for _ in range(4)]
    pool.resize(1)
    for obj in objs:
        pool.ret(obj)
    s = check_bounds(pool)
    assert s["navail"] == 1 and s["nburst_closed"] == 3 and rec.closed == objs[:3]
    pool.resize(4)  # burst_limit unchanged: room up to 4 again
    assert pool.free() == 4


def test_shrinking_closes_idle_objects_above_the_new_max_size(
        make_pool: Callable[..., Pool], rec: Recorder) -> None:
    pool = make_pool(max_size=3, burst_limit=5)
    held = [pool.get() for _ in range(3)]
    for obj in held:
        pool.ret(obj)  # all kept: never above max_size
    pool.resize(2)
    s = check_bounds(pool)
    assert s["navail"] == 2 and len(rec.closed) == 1 and s["nburst_closed"] == 0


# ------------------------------------------------------------------------------ budget


def test_burst_objects_hold_budget_tokens(make_pool: Callable[..., Pool], rec: Recorder) -> None:
    budget = TokenPool(max_size=3)
    pool = make_pool(max_size=1, burst_limit=4, budget=budget)
    objs = [pool.get(timeout=0) for _ in range(3)]
    assert budget.free() == 0  # one token per live object, burst ones included
    with pytest.raises(TimeOut):
        pool.get(timeout=0)  # room up to burst_limit, but no token
    s = pool.stats()
    assert s["ncreated"] == 3 and s["ncreating"] == 0  # the reserved slot was given back
    for obj in objs:
        pool.ret(obj)
    s = check_bounds(pool)
    assert s["nburst_closed"] == 2 and s["nobjs"] == 1
    assert budget.free() == 2  # the closed burst objects gave their tokens back


# ------------------------------------------------------------------------------ fast paths


@pytest.mark.parametrize("burst_limit", [None, 4])
def test_get_and_ret_below_max_size_stay_on_the_fast_path(
        make_pool: Callable[..., Pool], burst_limit: int | None) -> None:
    pool = make_pool(max_size=2, min_size=1, burst_limit=burst_limit)

    def general(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("left the fast path")

    pool.ret(pool.get())  # warm: the min_size object exists
    pool._checkout = general  # type: ignore[method-assign]
    pool._checkin = general  # type: ignore[method-assign]
    for _ in range(3):
        pool.ret(pool.get())
    assert pool.stats()["nreturns"] == 4


# ------------------------------------------------------------------------------ config file


def test_config_file_takes_burst_limit_and_checks_it(tmp_path: Any) -> None:
    from mppool.config import ConfigError, load_config

    good = tmp_path / "good.toml"
    good.write_text('[pools.db]\nfun = "builtins:int"\nmax_size = 2\nburst_limit = 4\n')
    assert load_config(good)["db"]["burst_limit"] == 4
    bad = tmp_path / "bad.toml"
    bad.write_text('[pools.db]\nfun = "builtins:int"\nmax_size = 2\nburst_limit = 1\n')
    with pytest.raises(ConfigError, match="burst_limit=1 must be >= max_size=2"):
        load_config(bad)
