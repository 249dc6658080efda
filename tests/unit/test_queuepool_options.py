"""mppool.queuepool.Pool's psycopg_pool-like options: check/check_after, max_waiting, the
counters and pop_stats. The recycling clock (also the clock of check_after, usage_ms and
connections_ms) is a fake one; blocked takes wait on real time, bounded by deadlines."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import ModuleClock, patch_now, wait_until

import mppool.queuepool.pool as qpool
from mppool import PoolClosed, TimeOut, TooManyRequests
from mppool.queuepool import Pool

try:
    from test_queuepool import Res, make
except ImportError:  # tests/ became a package
    from tests.unit.test_queuepool import Res, make

DEADLINE = 10.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ModuleClock:
    return patch_now(monkeypatch, qpool)


@pytest.fixture
def spawn() -> Iterator[Any]:
    """``spawn(fn)`` runs ``fn`` on a thread and returns a box for its result or error; every
    thread is joined at the end."""
    started: list[threading.Thread] = []

    def run(fn: Any) -> dict[str, Any]:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=target, daemon=True)
        started.append(t)
        t.start()
        return box

    yield run
    for t in started:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in started)


# ------------------------------------------------------------------------------ check


def test_check_closes_a_broken_manager_and_the_take_reopens_it(
        clock: ModuleClock, caplog: pytest.LogCaptureFixture) -> None:
    broken: set[int] = set()
    checked: list[Any] = []

    def check(resource: dict[str, Any]) -> bool:
        checked.append(dict(resource))
        return resource["opening"] not in broken

    pool, (r0,) = make(1, check=check)
    r = pool.take()
    assert r is r0 and checked == []  # just opened: not checked
    pool.put(r)
    assert pool.take().resource == {"name": "r0", "opening": 1}
    assert checked == [{"name": "r0", "opening": 1}]
    pool.put(r0)
    broken.add(1)
    with caplog.at_level(logging.INFO, logger="mppool"):
        r = pool.take()
    assert r is r0 and r.resource == {"name": "r0", "opening": 2}  # closed, reopened
    assert r0.log[-2:] == ["close", "open"]
    assert len(checked) == 2  # the new resource is not checked again
    assert "found broken at take (check returned False)" in caplog.text
    pool.put(r)
    s = pool.stats()
    assert (s["connections_lost"], s["connections_num"], s["requests_num"],
            s["requests_errors"]) == (1, 2, 3, 0)


def test_a_check_that_raises_counts_as_broken(clock: ModuleClock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    def check(resource: Any) -> bool:
        raise ConnectionResetError("server closed the connection")

    pool, _ = make(1, check=check)
    pool.put(pool.take())
    with caplog.at_level(logging.INFO, logger="mppool"):
        assert pool.take().resource["opening"] == 2
    assert "server closed the connection" in caplog.text
    assert pool.stats()["connections_lost"] == 1


def test_check_after_skips_managers_idle_a_short_time(clock: ModuleClock) -> None:
    checked: list[int] = []
    pool, _ = make(1, check=lambda res: checked.append(res["opening"]) or True,
                   check_after=10.0, maxIdleTime=None)
    pool.put(pool.take())
    clock.t += 9.0
    pool.put(pool.take())
    assert checked == []
    clock.t += 10.0
    pool.put(pool.take())
    assert checked == [1]


def test_a_broken_manager_whose_reopen_fails_goes_back_closed(clock: ModuleClock) -> None:
    pool, (r0,) = make(1, check=lambda res: False)
    pool.put(pool.take())
    r0.fail_open = True
    with pytest.raises(ConnectionError):
        pool.take()
    assert pool.free() == 1 and not r0._isOpen  # nothing lost
    r0.fail_open = False
    clock.t += 2.0  # past the backoff (1 s +-10%) that follows a failed open()
    assert pool.take() is r0 and r0._isOpen


# ------------------------------------------------------------------------------ max_waiting


def test_max_waiting_refuses_at_once(spawn: Any) -> None:
    pool, (r0,) = make(1, max_waiting=1)
    r = pool.take()
    box = spawn(lambda: pool.take(timeout=DEADLINE))
    wait_until(lambda: pool.waiting() == 1)
    with pytest.raises(TooManyRequests, match=r"queuepool 'test': 1 takes wait already "
                                              r"\(max_waiting=1\)"):
        pool.take(timeout=DEADLINE)
    pool.put(r)
    wait_until(lambda: "result" in box or "error" in box)
    assert box.get("result") is r0, box
    pool.put(r0)
    held = pool.take()
    with pytest.raises(TimeOut):  # timeout=0 never queues: TimeOut as before
        pool.take(timeout=0)
    pool.put(held)
    s = pool.stats()
    assert (s["requests_errors"], s["requests_queued"], s["requests_num"]) == (2, 1, 5)


# ------------------------------------------------------------------------------ counters


def test_counters_and_pop_stats(clock: ModuleClock, spawn: Any) -> None:
    class Slow(Res):
        """Opening takes 0.25 s of the fake clock (unless it fails); a resource marked bad
        fails its repair at put."""

        def open(self) -> None:
            if not self.fail_open:
                clock.t += 0.25
            super().open()

        def putRepair(self) -> None:
            if self.resource and self.resource.get("bad"):
                raise RuntimeError("rollback failed")

    pool = Pool("test", 2, maxIdleTime=None, maxOpenTime=None)
    a, b = Slow("a"), Slow("b")
    pool.put(a)
    pool.put(b)
    r = pool.take()  # b (the top of the stack), opened: 0.25 s
    clock.t += 1.5  # out 1.5 s
    pool.put(r)
    r = pool.take()
    r.resource["bad"] = True
    pool.put(r)  # its repair fails: closed (returns_bad)
    b.fail_open = True
    with pytest.raises(ConnectionError):
        pool.take()  # b again: its open fails (a failed take, a failed open)
    b.fail_open = False
    clock.t += 2.0  # past the backoff that follows a failed open(); nothing is out
    held = [pool.take(), pool.take()]  # b then a, each opened: 0.25 s
    box = spawn(lambda: pool.take(timeout=DEADLINE))
    wait_until(lambda: pool.waiting() == 1)
    queued_by = time.monotonic()
    wait_until(lambda: time.monotonic() >= queued_by + 0.05)  # it has waited 50 ms at least
    pool.put(held[0])  # b, out 0.25 s (while a opened): to the waiter
    wait_until(lambda: "result" in box or "error" in box)
    assert box.get("result") is b, box
    pool.put(b)
    pool.put(held[1])
    s = pool.stats()
    expected = {"requests_num": 6, "requests_queued": 1, "requests_errors": 1,
                "usage_ms": 1750, "connections_num": 4, "connections_ms": 750,
                "connections_errors": 1, "connections_lost": 0, "returns_bad": 1}
    assert {k: s[k] for k in expected} == expected, s
    assert s["requests_wait_ms"] >= 50 and s["managers"] == 2 and s["idle"] == 2
    popped = pool.pop_stats()
    assert {k: popped[k] for k in expected} == expected
    assert (popped["pool_min"], popped["pool_max"], popped["pool_size"],
            popped["pool_available"], popped["requests_waiting"]) == (0, 2, 2, 2, 0)
    assert all(v == 0 for k, v in pool.pop_stats().items() if k in expected)
    pool.put(pool.take())
    assert pool.stats()["requests_num"] == 1


def test_a_take_refused_by_a_closed_pool_is_a_request_error() -> None:
    pool, _ = make(1)
    pool.close()
    with pytest.raises(PoolClosed):
        pool.take()
    assert (pool.stats()["requests_errors"], pool.stats()["requests_num"]) == (1, 1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "text"),
    [
        ({"check": 42}, TypeError, "check must be callable, got 42"),
        ({"check_after": -1}, ValueError, "check_after.*-1"),
        ({"check_after": math.nan}, ValueError, "check_after.*nan"),
        ({"max_waiting": -1}, ValueError, "max_waiting must be >= 0, got -1"),
        ({"max_waiting": 1.5}, TypeError, "max_waiting must be an int, got 1.5"),
    ],
)
def test_bad_options_are_named(kwargs: dict[str, Any], exc: type[Exception], text: str) -> None:
    with pytest.raises(exc, match=text):
        Pool("test", 1, **kwargs)
