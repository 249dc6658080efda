"""mppool.Pool's psycopg_pool-like options: check, max_waiting, reconnect backoff, the
counters and pop_stats, and the lifecycle (open, wait, close, with).

Time runs on a FakeClock with a ManualScheduler (no housekeeping threads); only blocked
getters wait on real (short) time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest

from mppool import Pool, PoolClosed, TimeOut, TooManyRequests

try:
    from helpers import ManualScheduler, Recorder, Runner, wait_until
except ImportError:  # tests/ became a package
    from tests.helpers import ManualScheduler, Recorder, Runner, wait_until


# ------------------------------------------------------------------------------ check


def test_check_closes_a_broken_idle_object_and_get_goes_on(
        make_pool: Callable[..., Pool], rec: Recorder) -> None:
    broken: set[int] = {0}
    checked: list[int] = []

    def check(obj: Any) -> bool:
        checked.append(obj["num"])
        return obj["num"] not in broken

    pool = make_pool(min_size=2, max_size=3, check=check)
    got = pool.get()  # the pool is LIFO: 1 comes out first, and is fine
    assert got == {"num": 1} and checked == [1]
    pool.ret(got)
    broken.add(1)
    got = pool.get()  # 1 and 0 both fail their check: closed, and a new one is made
    assert got == {"num": 2}
    assert checked == [1, 1, 0]  # a new object is not checked
    assert rec.closed == [{"num": 1}, {"num": 0}]
    s = pool.stats()
    assert (s["connections_lost"], s["nobjs"], s["navail"], s["requests_num"]) == (2, 1, 0, 2)


def test_check_that_raises_counts_as_broken(make_pool: Callable[..., Pool], rec: Recorder,
                                            caplog: pytest.LogCaptureFixture) -> None:
    def check(obj: Any) -> bool:
        raise ConnectionError("server closed the connection")

    pool = make_pool(min_size=1, max_size=1, check=check)
    with caplog.at_level("INFO", logger="mppool"):
        assert pool.get(timeout=0) == {"num": 1}
    assert rec.closed == [{"num": 0}]
    assert "server closed the connection" in caplog.text


def test_check_after_skips_objects_idle_a_short_time(make_pool: Callable[..., Pool],
                                                     sched: ManualScheduler) -> None:
    checked: list[int] = []
    pool = make_pool(min_size=1, max_size=1, check_after=5.0,
                     check=lambda o: checked.append(o["num"]) or True)
    pool.ret(pool.get())
    assert checked == []  # created just now
    sched.clock.advance(4.9)
    pool.ret(pool.get())
    assert checked == []
    sched.clock.advance(5.0)
    pool.ret(pool.get())
    assert checked == [0]
    assert pool.stats()["check_after"] == 5.0


def test_an_object_handed_to_a_waiter_is_checked_too(
        make_pool: Callable[..., Pool], runner: Runner, rec: Recorder) -> None:
    ok = {"on": True}
    pool = make_pool(min_size=0, max_size=1, check=lambda o: ok["on"])
    held = pool.get()
    box = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    ok["on"] = False
    pool.ret(held)  # goes to the waiter, fails its check, is closed: the waiter makes one
    wait_until(lambda: box["done"])
    assert box.get("result") == {"num": 1}, box
    assert rec.closed == [{"num": 0}]


# ------------------------------------------------------------------------------ max_waiting


def test_max_waiting_refuses_at_once(make_pool: Callable[..., Pool], runner: Runner) -> None:
    pool = make_pool(min_size=0, max_size=1, max_waiting=1)
    held = pool.get()
    box = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    with pytest.raises(TooManyRequests, match="max_waiting=1"):
        pool.get(timeout=5)
    with pytest.raises(TimeOut):  # not queued: a get that does not wait is not refused
        pool.get(timeout=0)
    pool.ret(held)
    wait_until(lambda: box["done"])
    assert box.get("result") == {"num": 0}
    s = pool.stats()
    assert (s["requests_num"], s["requests_queued"], s["requests_errors"]) == (4, 1, 2)
    assert s["max_waiting"] == 1


# ------------------------------------------------------------------------------ counters


def test_counters_and_pop_stats(make_pool: Callable[..., Pool], sched: ManualScheduler) -> None:
    pool = make_pool(min_size=1, max_size=2)
    a = pool.get()
    b = pool.get()
    sched.clock.advance(0.25)
    pool.ret(a)
    pool.ret(b, discard=True)
    s = pool.stats()
    assert s["requests_num"] == 2 and s["usage_ms"] == 500
    assert (s["connections_num"], s["connections_errors"], s["returns_bad"]) == (2, 0, 1)
    assert all(isinstance(s[k], int) for k in ("usage_ms", "connections_ms", "requests_wait_ms"))
    popped = pool.pop_stats()
    assert popped["requests_num"] == 2 and popped["usage_ms"] == 500
    assert (popped["pool_min"], popped["pool_max"], popped["pool_size"],
            popped["pool_available"], popped["requests_waiting"]) == (1, 2, 1, 1, 0)
    again = pool.pop_stats()
    assert again["requests_num"] == again["usage_ms"] == again["returns_bad"] == 0
    assert pool.stats()["nborrows"] == 2  # ProxyPatternPool's counters are never reset


def test_wait_time_of_queued_gets_is_counted(make_pool: Callable[..., Pool], runner: Runner,
                                             sched: ManualScheduler) -> None:
    pool = make_pool(min_size=0, max_size=1)
    held = pool.get()
    box = runner.start(lambda: pool.get(timeout=5))
    wait_until(lambda: pool.waiting() == 1)
    sched.clock.advance(2.0)
    pool.ret(held)
    wait_until(lambda: box["done"])
    s = pool.stats()
    assert (s["requests_queued"], s["requests_wait_ms"]) == (1, 2000)


def test_creation_failures_are_counted(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(Recorder(fail=lambda i: True).fun, min_size=0)
    with pytest.raises(RuntimeError):
        pool.get()
    s = pool.stats()
    assert (s["connections_num"], s["connections_errors"], s["requests_errors"]) == (1, 1, 1)


# ------------------------------------------------------------------------------ reconnect


def test_min_size_refill_backs_off_and_reconnect_failed_is_called_once(
        make_pool: Callable[..., Pool], sched: ManualScheduler) -> None:
    down = {"on": True}
    rec = Recorder(fail=lambda i: down["on"])
    told: list[Pool] = []
    pool = make_pool(rec.fun, min_size=2, max_size=4, reconnect_timeout=5.0,
                     reconnect_failed=told.append)
    assert rec.nums == [0]  # the first failure stops the fill
    tries = [sched.clock.now()]
    for _ in range(4):
        due = min(sched.pending())
        sched.advance(due - sched.clock.now())
        tries.append(sched.clock.now())
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    # 1 s, 2 s, then cut to land on the 5 s deadline (2 s), then 8 s: ±10% jitter each.
    assert gaps[0] == pytest.approx(1.0, abs=0.101) and gaps[1] == pytest.approx(2.0, abs=0.3)
    assert tries[3] - tries[0] == pytest.approx(5.0, abs=0.01)
    assert gaps[3] >= 7.0
    assert told == [pool]  # once, at the deadline, not at every failure after it
    with pytest.raises(RuntimeError):  # meanwhile a get fails fast, fun is not called
        pool.get()
    assert len(rec.nums) == 5
    assert pool.stats()["outage"]["attempts"] == 5
    down["on"] = False
    sched.advance(min(sched.pending()) - sched.clock.now())
    assert len(pool) == 2  # service resumed by itself: min_size filled
    assert pool.stats()["outage"] is None
    assert told == [pool]


def test_a_get_after_the_backoff_tries_again(make_pool: Callable[..., Pool],
                                             sched: ManualScheduler) -> None:
    down = {"on": True}
    rec = Recorder(fail=lambda i: down["on"])
    pool = make_pool(rec.fun, min_size=0)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            pool.get()
    assert rec.nums == [0]  # one call of fun, two fast failures
    down["on"] = False
    sched.clock.advance(1.2)
    assert pool.get() == {"num": 1}
    assert pool.get() == {"num": 2}  # the outage is over: no more gating


# ------------------------------------------------------------------------------ lifecycle


def test_open_false_creates_nothing_until_open(make_pool: Callable[..., Pool],
                                               rec: Recorder) -> None:
    pool = make_pool(min_size=2, open=False)
    assert rec.nums == [] and len(pool) == 0
    with pytest.raises(PoolClosed, match="open"):
        pool.get(timeout=0)
    with pytest.raises(PoolClosed):
        pool.wait(0)
    pool.open()
    pool.open()  # a no-op
    assert rec.nums == [0, 1]
    pool.wait(0)


def test_wait_times_out_naming_the_creation_error(make_pool: Callable[..., Pool]) -> None:
    pool = make_pool(Recorder(fail=lambda i: True).fun, min_size=1)
    with pytest.raises(TimeOut, match=r"0 of min_size=1.*cannot create object 0"):
        pool.wait(timeout=0)


def test_wait_returns_once_min_size_is_reached(runner: Runner) -> None:
    gate = {"open": False}

    def fun(i: int) -> int:
        if not gate["open"]:
            raise OSError("not yet")
        return i

    pool = Pool(fun, min_size=1, reconnect_timeout=None)  # real clock, default scheduler
    try:
        box = runner.start(lambda: pool.wait(timeout=30))
        gate["open"] = True  # the refill scheduled after the failure (in ~1 s) succeeds
        wait_until(lambda: box["done"], timeout=10)
        assert "error" not in box and len(pool) == 1
    finally:
        pool.shutdown()


def test_with_opens_and_closes(sched: ManualScheduler, rec: Recorder) -> None:
    with Pool._made_with(rec.fun, min_size=1, open=False, clock=sched.clock, scheduler=sched,
              closer=rec.closer) as pool:
        assert len(pool) == 1
        obj = pool.get()
        pool.ret(obj)
    assert rec.closed == [{"num": 0}]
    with pytest.raises(PoolClosed):
        pool.get()
    with pytest.raises(PoolClosed):
        pool.open()
    pool.close()  # twice: a no-op


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "exc", "text"),
    [
        ({"check": 42}, TypeError, "check must be callable, got 42"),
        ({"check_after": -1}, ValueError, "check_after.*-1"),
        ({"check_after": "1"}, TypeError, "check_after.*'1'"),
        ({"max_waiting": -1}, ValueError, "max_waiting must be >= 0, got -1"),
        ({"max_waiting": 1.5}, TypeError, "max_waiting must be an int, got 1.5"),
        ({"reconnect_timeout": math.nan}, ValueError, "reconnect_timeout.*nan"),
        ({"reconnect_timeout": -2}, ValueError, "reconnect_timeout.*-2"),
        ({"reconnect_failed": "log"}, TypeError, "reconnect_failed must be callable, got 'log'"),
        ({"open": "yes"}, TypeError, "open must be a bool, got 'yes'"),
    ],
)
def test_bad_options_are_named(kwargs: dict[str, Any], exc: type[Exception], text: str,
                               rec: Recorder) -> None:
    with pytest.raises(exc, match=text):
        Pool(rec.fun, **kwargs)
    assert rec.nums == []  # nothing was created


def test_config_file_takes_the_options_and_checks_them(tmp_path: Any) -> None:
    from mppool import db_pool
    from mppool.config import ConfigError, load_config

    good = tmp_path / "good.toml"
    good.write_text('[pools.db]\nfun = "builtins:int"\ncheck = "mppool.db_pool:ping"\n'
                    'check_after = 5.0\nmax_waiting = 8\nreconnect_timeout = 60.0\n'
                    'reconnect_failed = "builtins:print"\n')
    opts = load_config(good)["db"]
    assert opts["check"] is db_pool.ping and opts["reconnect_failed"] is print
    assert (opts["check_after"], opts["max_waiting"], opts["reconnect_timeout"]) == (5.0, 8, 60.0)
    bad = tmp_path / "bad.toml"
    bad.write_text('[pools.db]\nfun = "builtins:int"\nmax_waiting = -1\n')
    with pytest.raises(ConfigError, match="max_waiting must be >= 0, got -1"):
        load_config(bad)
