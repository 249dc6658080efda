"""mppool.aio.ConnectionPool's psycopg_pool-like lifecycle and reconnect options: open=,
open(), wait(), async with, reconnect_timeout/reconnect_failed (backoff of a failing
make_connection, fail fast meanwhile, the hook once per outage).

The pool's clock (the backoff's) is a fake one moved by the tests; the event loop runs for
real, every scenario bounded by a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from helpers import BAD_LIFECYCLE_OPTIONS, ModuleClock, check_outage_half_a_second_in, patch_now, run_bounded

import mppool.aio.connection_pool as cp
from mppool import PoolClosed, TimeOut
from mppool.aio import ConnectionPool, ConnectionStrategy

DEADLINE = 5.0


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return run_bounded(coro, DEADLINE)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ModuleClock:
    return patch_now(monkeypatch, cp, 100.0)


class Flaky(ConnectionStrategy[dict[str, Any]]):
    """make_connection fails while ``down``; counts its calls."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.calls = 0
        self.made: list[dict[str, Any]] = []

    async def make_connection(self) -> dict[str, Any]:
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("the database is down")
        conn = {"n": len(self.made), "closed": False}
        self.made.append(conn)
        return conn

    def connection_is_closed(self, conn: dict[str, Any]) -> bool:
        return bool(conn["closed"])

    def close_connection(self, conn: dict[str, Any]) -> None:
        conn["closed"] = True


async def use(pool: ConnectionPool[Any]) -> int:
    async with pool.get_connection() as conn:
        return int(conn["n"])


# ------------------------------------------------------------------------------ backoff


def test_a_failing_make_connection_backs_off_and_acquires_fail_fast(clock: ModuleClock) -> None:
    async def scenario() -> None:
        s = Flaky(down=True)
        pool = ConnectionPool(strategy=s, max_size=2)
        with pytest.raises(ConnectionRefusedError):
            await use(pool)
        assert s.calls == 1
        for _ in range(3):  # within the first delay (1 s -10%): no call, the same error
            with pytest.raises(ConnectionRefusedError, match="down") as info:
                await use(pool)
            assert any("without calling make_connection()" in n
                       for n in getattr(info.value, "__notes__", ()))
        clock.t += 0.85
        with pytest.raises(ConnectionRefusedError):
            await use(pool)
        assert s.calls == 1
        clock.t += 0.3  # 1.15 s: the attempt that is due
        with pytest.raises(ConnectionRefusedError):
            await use(pool)
        assert s.calls == 2
        clock.t += 1.7  # the second delay is 2 s +-10%
        with pytest.raises(ConnectionRefusedError):
            await use(pool)
        assert s.calls == 2
        clock.t += 0.6
        s.down = False  # service resumes with the next attempt
        assert await use(pool) == 0 and s.calls == 3
        assert await use(pool) == 0 and s.calls == 3  # idle: reused
        st = pool.stats()
        assert (st["connections_num"], st["connections_errors"], st["make_errors"],
                st["make_refused"], st["in_use"], st["allocating"], st["idle"]) == (
                    3, 2, 2, 5, 0, 0, 1)  # 5 acquires failed fast
        await pool.close()

    run(scenario())


def test_stats_describe_the_outage(clock: ModuleClock) -> None:
    async def scenario() -> None:
        s = Flaky(down=True)
        pool = ConnectionPool(strategy=s, max_size=2)
        assert pool.stats()["outage"] is None
        with pytest.raises(ConnectionRefusedError):
            await use(pool)
        clock.t += 0.5
        with pytest.raises(ConnectionRefusedError):
            await use(pool)  # failed fast: not an attempt
        check_outage_half_a_second_in(pool.stats())
        clock.t += 0.7
        s.down = False
        assert await use(pool) == 0
        assert pool.stats()["outage"] is None, "a connection made ends the outage"
        await pool.close()

    run(scenario())


def test_name_names_the_pool_in_errors_and_stats(clock: ModuleClock) -> None:
    async def scenario() -> None:
        assert ConnectionPool(strategy=Flaky(), max_size=1).stats()["name"] is None
        pool = ConnectionPool(strategy=Flaky(down=True), max_size=1, name="orders",
                              open=False)
        assert pool.stats()["name"] == "orders"
        with pytest.raises(PoolClosed, match="ConnectionPool 'orders' is not open"):
            await use(pool)
        await pool.open()
        with pytest.raises(TimeOut, match="ConnectionPool 'orders': no connection"):
            await pool.wait(0.01)
        await pool.close()
        with pytest.raises(PoolClosed, match="ConnectionPool 'orders' is shutting down"):
            await use(pool)
        with pytest.raises(TypeError, match="name must be a str or None, got 3"):
            ConnectionPool(strategy=Flaky(), max_size=1, name=3)  # type: ignore[arg-type]

    run(scenario())


def test_waiters_given_a_slot_during_an_outage_fail_fast(clock: ModuleClock) -> None:
    async def scenario() -> None:
        s = Flaky()
        pool = ConnectionPool(strategy=s, max_size=1)
        cm = pool.get_connection()
        conn = await cm.__aenter__()
        waiter = asyncio.ensure_future(use(pool))
        while not pool.stats()["waiting"]:
            await asyncio.sleep(0.001)
        s.down, conn["closed"] = True, True  # returned broken: the waiter gets the slot
        await cm.__aexit__(None, None, None)
        with pytest.raises(ConnectionRefusedError):
            await waiter  # the connection it was handed was stale, its make failed
        assert s.calls == 2 and pool._total == 0
        await pool.close()

    run(scenario())


def test_reconnect_failed_once_per_outage(clock: ModuleClock) -> None:
    told: list[Any] = []

    async def hook(pool: ConnectionPool[Any]) -> None:  # an async hook is awaited
        await asyncio.sleep(0)
        told.append(pool)

    async def attempts(pool: ConnectionPool[Any], n: int) -> None:
        for _ in range(n):
            clock.t += 10.0  # every attempt is due
            with pytest.raises(ConnectionRefusedError):
                await use(pool)

    async def scenario() -> None:
        s = Flaky(down=True)
        pool = ConnectionPool(strategy=s, max_size=1, reconnect_timeout=5.0,
                              reconnect_failed=hook)
        await attempts(pool, 1)
        assert told == []  # 0 s into the outage
        await attempts(pool, 1)
        assert told == [pool]  # 10 s: past reconnect_timeout
        await attempts(pool, 3)
        assert told == [pool]  # once per outage; the attempts go on
        s.down = False
        clock.t += 100.0
        assert await use(pool) == 0  # the outage is over
        pool.strategy.made[0]["closed"] = True  # the next acquire must make one
        s.down = True
        await attempts(pool, 1)
        assert told == [pool]
        await attempts(pool, 1)
        assert told == [pool, pool]  # a second outage, a second call
        await pool.close()

    run(scenario())


def test_a_plain_reconnect_failed_that_raises_is_logged(
        clock: ModuleClock, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def hook(pool: ConnectionPool[Any]) -> None:
        calls.append(1)
        raise RuntimeError("hook bug")

    async def scenario() -> None:
        pool = ConnectionPool(strategy=Flaky(down=True), max_size=1, reconnect_timeout=0.0,
                              reconnect_failed=hook)
        with pytest.raises(ConnectionRefusedError):  # the creation error, not the hook's
            await use(pool)
        assert calls == [1]
        await pool.close()

    run(scenario())
    assert "reconnect_failed raised" in caplog.text


# ------------------------------------------------------------------------------ lifecycle


def test_open_false_creates_nothing_until_open() -> None:
    async def scenario() -> None:
        s = Flaky()
        pool = ConnectionPool(strategy=s, max_size=1, open=False)
        with pytest.raises(PoolClosed, match="not open"):
            await use(pool)
        with pytest.raises(PoolClosed, match="not open"):
            await pool.wait(1.0)
        assert s.calls == 0
        await pool.open()
        await pool.open()  # a no-op
        assert await use(pool) == 0 and s.calls == 1
        await pool.close()
        with pytest.raises(PoolClosed, match="cannot be opened again"):
            await pool.open()
        with pytest.raises(PoolClosed, match="shutting down"):
            await use(pool)

    run(scenario())


def test_wait_makes_one_connection_and_keeps_it_idle() -> None:
    async def scenario() -> None:
        s = Flaky()
        pool = ConnectionPool(strategy=s, max_size=2)
        await pool.wait(1.0)
        assert s.calls == 1 and pool.stats()["idle"] == 1
        await pool.wait(1.0)  # one exists: nothing made
        assert s.calls == 1
        assert await use(pool) == 0 and s.calls == 1
        await pool.close()

    run(scenario())


def test_wait_returns_once_a_connection_was_made_even_if_not_kept() -> None:
    async def scenario() -> None:
        s = Flaky()
        pool = ConnectionPool(strategy=s, max_size=0, burst_limit=1)  # keeps nothing idle
        await pool.wait(1.0)
        assert s.calls == 1 and s.made[0]["closed"]
        await pool.close()

    run(scenario())


def test_wait_raises_timeout_on_a_failing_make_connection() -> None:
    async def scenario() -> None:
        s = Flaky(down=True)
        pool = ConnectionPool(strategy=s, max_size=1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeOut, match="ConnectionRefusedError: the database is down"):
            await pool.wait(0.2)
        assert loop.time() - started >= 0.2
        assert s.calls == 1  # one attempt: the next is due in 1 s, after the deadline
        assert pool._total == 0
        await pool.close()

    run(scenario())


def test_wait_retries_on_the_backoff_schedule_and_succeeds() -> None:
    async def scenario() -> None:
        s = Flaky(down=True)
        pool = ConnectionPool(strategy=s, max_size=1)
        waiting = asyncio.ensure_future(pool.wait(4.0))
        while s.calls < 1:
            await asyncio.sleep(0.001)
        s.down = False  # the attempt due about 1 s later succeeds
        await waiting
        assert s.calls == 2 and pool.stats()["idle"] == 1
        await pool.close()

    run(scenario())


def test_async_with_opens_and_closes() -> None:
    async def scenario() -> None:
        s = Flaky()
        async with ConnectionPool(strategy=s, max_size=1, open=False) as pool:
            assert await use(pool) == 0
        assert s.made[0]["closed"]
        with pytest.raises(PoolClosed):
            await use(pool)

    run(scenario())


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_LIFECYCLE_OPTIONS)
def test_bad_options(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ConnectionPool(strategy=Flaky(), max_size=1, **kwargs)
