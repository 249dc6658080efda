"""mppool.aio.ConnectionPool's psycopg_pool-like options: check/check_after, max_waiting, the
counters and pop_stats.

The pool's clock (check_after, durations) is a fake one advanced by the tests; the event loop
runs for real, every scenario bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
from helpers import ModuleClock, patch_now, run_bounded

import mppool.aio.connection_pool as cp
from mppool import PoolClosed, TooManyRequests
from mppool.aio import ConnectionPool, ConnectionStrategy

DEADLINE = 5.0


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return run_bounded(coro, DEADLINE)


async def until(pred: Callable[[], Any], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not pred():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ModuleClock:
    return patch_now(monkeypatch, cp, 100.0)


class Strategy(ConnectionStrategy[dict[str, Any]]):
    """Connections are dicts; ``make_time`` advances the fake clock in make_connection."""

    def __init__(self, clock: ModuleClock | None = None, make_time: float = 0.0) -> None:
        self.numbers = itertools.count()
        self.clock = clock
        self.make_time = make_time
        self.fail_next = 0
        self.closed: list[int] = []

    async def make_connection(self) -> dict[str, Any]:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionRefusedError("refused on purpose")
        if self.clock is not None:
            self.clock.t += self.make_time
        return {"n": next(self.numbers)}

    def connection_is_closed(self, conn: dict[str, Any]) -> bool:
        return bool(conn.get("closed"))

    def close_connection(self, conn: dict[str, Any]) -> Awaitable[None] | None:
        assert not conn.get("closed"), f"{conn} closed twice"
        conn["closed"] = True
        self.closed.append(conn["n"])
        return None


async def use(pool: ConnectionPool[Any]) -> int:
    async with pool.get_connection() as conn:
        return int(conn["n"])


async def fill(pool: ConnectionPool[Any], n: int) -> None:
    """Make ``n`` connections and leave them idle."""
    held = [pool.get_connection() for _ in range(n)]
    for cm in held:
        await cm.__aenter__()
    for cm in held:
        await cm.__aexit__(None, None, None)


# ------------------------------------------------------------------------------ check


def test_check_closes_broken_idle_connections_and_the_acquire_goes_on() -> None:
    broken: set[int] = set()
    checked: list[int] = []

    def check(conn: dict[str, Any]) -> bool:
        checked.append(conn["n"])
        return conn["n"] not in broken

    async def scenario() -> None:
        s = Strategy()
        pool = ConnectionPool(strategy=s, max_size=3, check=check)
        await fill(pool, 2)  # idle: 0 then 1 (the oldest is handed out first)
        assert checked == []  # new connections are not checked
        assert await use(pool) == 0 and checked == [0]
        broken.update({0, 1})
        assert await use(pool) == 2  # 1 and 0 fail their check: closed, a new one made
        assert checked == [0, 1, 0]
        assert s.closed == [1, 0]
        st = pool.stats()
        assert (st["connections_lost"], st["idle"], st["in_use"], st["requests_num"],
                st["requests_errors"], st["connections_num"]) == (2, 1, 0, 4, 0, 3)

    run(scenario())


def test_an_async_check_that_raises_counts_as_broken(caplog: pytest.LogCaptureFixture) -> None:
    async def check(conn: dict[str, Any]) -> bool:
        await asyncio.sleep(0)
        raise ConnectionResetError("server closed the connection")

    async def scenario() -> None:
        s = Strategy()
        pool = ConnectionPool(strategy=s, max_size=1, check=check)
        await fill(pool, 1)
        with caplog.at_level("INFO", logger="mppool"):
            assert await use(pool) == 1
        assert s.closed == [0]
        assert "server closed the connection" in caplog.text
        assert pool.stats()["connections_lost"] == 1

    run(scenario())


def test_check_after_skips_connections_idle_a_short_time(clock: ModuleClock) -> None:
    checked: list[int] = []

    async def scenario() -> None:
        pool = ConnectionPool(strategy=Strategy(), max_size=1, check_after=10.0,
                              check=lambda c: checked.append(c["n"]) or True)
        await fill(pool, 1)
        clock.t += 9.0
        await use(pool)
        assert checked == []
        clock.t += 10.0
        await use(pool)
        assert checked == [0]

    run(scenario())


def test_a_connection_handed_to_a_waiter_is_checked_too() -> None:
    ok = {"on": True}

    async def scenario() -> None:
        s = Strategy()
        pool = ConnectionPool(strategy=s, max_size=1, check=lambda c: ok["on"])
        cm = pool.get_connection()
        await cm.__aenter__()
        waiter = asyncio.ensure_future(use(pool))
        await until(lambda: pool.stats()["waiting"] == 1, "the waiter to queue")
        ok["on"] = False
        await cm.__aexit__(None, None, None)  # to the waiter: fails its check, a new one
        assert await waiter == 1
        assert s.closed == [0]

    run(scenario())


def test_a_check_cancelled_midway_closes_its_connection_and_frees_the_slot() -> None:
    started = asyncio.Event()

    async def check(conn: dict[str, Any]) -> bool:
        started.set()
        await asyncio.sleep(DEADLINE * 10)
        return True

    async def scenario() -> None:
        s = Strategy()
        pool = ConnectionPool(strategy=s, max_size=1, check=check)
        await fill(pool, 1)
        task = asyncio.ensure_future(use(pool))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: pool.stats()["deallocating"] == 0, "the close")
        assert s.closed == [0]  # it may be mid-query: never handed out again
        st = pool.stats()
        assert (st["in_use"], st["idle"], st["requests_errors"], st["requests_num"]) == (
            0, 0, 1, 2)
        pool.check = None
        assert await use(pool) == 1  # the slot is free again

    run(scenario())


# ------------------------------------------------------------------------------ max_waiting


def test_max_waiting_refuses_at_once() -> None:
    async def scenario() -> None:
        pool = ConnectionPool(strategy=Strategy(), max_size=1, max_waiting=1)
        cm = pool.get_connection()
        await cm.__aenter__()
        waiter = asyncio.ensure_future(use(pool))
        await until(lambda: pool.stats()["waiting"] == 1, "the waiter to queue")
        with pytest.raises(TooManyRequests, match=r"max_waiting=1"):
            await use(pool)
        await cm.__aexit__(None, None, None)
        assert await waiter == 0  # the queued one is served as before
        st = pool.stats()
        assert (st["requests_errors"], st["requests_num"], st["requests_queued"]) == (1, 3, 1)
        assert await use(pool) == 0  # nobody waits: no refusal

    run(scenario())


# ------------------------------------------------------------------------------ counters


def test_counters_and_pop_stats(clock: ModuleClock) -> None:
    async def scenario() -> None:
        s = Strategy(clock, make_time=0.25)
        pool = ConnectionPool(strategy=s, max_size=2)
        async with pool.get_connection():  # makes connection 0
            clock.t += 1.5  # lent out 1.5 s
        s.fail_next = 1
        with pytest.raises(ConnectionRefusedError):
            async with pool.get_connection(), pool.get_connection():  # 0, then a failed make
                pass
        clock.t += 2.0  # past the backoff (1 s +-10%): the next make is the attempt due
        cm1, cm2 = pool.get_connection(), pool.get_connection()
        await cm1.__aenter__()  # connection 0
        await cm2.__aenter__()  # connection 1 is made: 0.25 s
        waiter = asyncio.ensure_future(use(pool))
        await until(lambda: pool.stats()["waiting"] == 1, "the waiter to queue")
        clock.t += 2.0  # queued 2 s
        await cm1.__aexit__(None, None, None)  # held 2.25 s; to the waiter
        assert await waiter == 0
        await cm2.__aexit__(None, None, None)  # held 2 s
        expected = {"requests_num": 6, "requests_queued": 1, "requests_wait_ms": 2000,
                    "requests_errors": 1, "usage_ms": 5750, "connections_num": 3,
                    "connections_ms": 500, "connections_errors": 1, "connections_lost": 0,
                    "returns_bad": 0}
        st = pool.stats()
        assert {k: st[k] for k in expected} == expected
        popped = pool.pop_stats()
        assert {k: popped[k] for k in expected} == expected
        assert (popped["pool_min"], popped["pool_max"], popped["pool_size"],
                popped["pool_available"], popped["requests_waiting"]) == (0, 2, 2, 2, 0)
        again = pool.pop_stats()
        assert all(again[k] == 0 for k in expected), again
        await use(pool)
        assert pool.stats()["requests_num"] == 1
        assert pool.stats()["made"] == 2  # asyncio-connection-pool's totals are not reset

    run(scenario())


def test_a_refused_acquire_after_close_is_a_request_error() -> None:
    async def scenario() -> None:
        pool = ConnectionPool(strategy=Strategy(), max_size=1)
        await pool.close()
        with pytest.raises(PoolClosed):
            await use(pool)
        assert (pool.stats()["requests_errors"], pool.stats()["requests_num"]) == (1, 1)

    run(scenario())


@pytest.mark.parametrize(
    ("kwargs", "exc", "text"),
    [
        ({"check": 42}, TypeError, "check must be callable, got 42"),
        ({"check_after": -1}, ValueError, "check_after.*-1"),
        ({"check_after": math.nan}, ValueError, "check_after.*nan"),
        ({"check_after": "1"}, TypeError, "check_after.*'1'"),
        ({"max_waiting": -1}, ValueError, "max_waiting must be >= 0, got -1"),
        ({"max_waiting": 1.5}, TypeError, "max_waiting must be an int, got 1.5"),
    ],
)
def test_bad_options_are_named(kwargs: dict[str, Any], exc: type[Exception], text: str) -> None:
    with pytest.raises(exc, match=text):
        ConnectionPool(strategy=Strategy(), max_size=1, **kwargs)
