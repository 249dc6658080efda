"""mppool.aio.ConnectionPool's budget recall, with the core pool's hysteresis (the pure
``plan_recall``/``recall_wait`` of mppool.budget): connections go back to a budget other
processes wait for only once due, the longest idle first, never more than wanted, and
connections in use at a return once due if the budget still says somebody waits. Due
counts uses too: a busy connection short of ``RECALL_MIN_USES`` is kept until demand has
waited ``RECALL_MAX_HOLD``; an idle one goes back after the patience whatever its uses.

The pool's clock is a fake one moved by the tests; rounds are run by the tests
(``pool.recall()``), the background task being put to sleep for an hour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from helpers import ModuleClock, patch_now, run_bounded

import mppool.aio.connection_pool as cp
import mppool.aio.recall as aio_recall
from mppool import budget
from mppool.aio import ConnectionPool, ConnectionStrategy
from mppool.budget import RECALL_MAX_HOLD, RECALL_MIN_USES, RECALL_PATIENCE

P = RECALL_PATIENCE
U = RECALL_MIN_USES
DEADLINE = 5.0


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return run_bounded(coro, DEADLINE)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ModuleClock:
    monkeypatch.setattr(aio_recall, "RECALL_PERIOD", 3600.0)  # only the tests' rounds run
    return patch_now(monkeypatch, cp, 100.0)


class Budget:
    """An async token pool whose ``waiting()`` says what the test sets (``wanted``)."""

    def __init__(self) -> None:
        self.wanted = 0
        self.asked = 0
        self.out = 0
        self.gate: asyncio.Event | None = None  # set: waiting() blocks until it is set

    async def get(self, timeout: float | None = None) -> int:
        self.out += 1
        return self.out

    async def put(self, token: int) -> None:
        self.out -= 1

    async def waiting(self) -> int:
        self.asked += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.wanted


class Strategy(ConnectionStrategy[dict[str, Any]]):
    def __init__(self) -> None:
        self.made: list[dict[str, Any]] = []

    async def make_connection(self) -> dict[str, Any]:
        conn = {"n": len(self.made), "closed": False}
        self.made.append(conn)
        return conn

    def connection_is_closed(self, conn: dict[str, Any]) -> bool:
        return bool(conn["closed"])

    def close_connection(self, conn: dict[str, Any]) -> None:
        conn["closed"] = True


def make_pool(n: int = 2) -> tuple[ConnectionPool[dict[str, Any]], Strategy, Budget]:
    s, b = Strategy(), Budget()
    return ConnectionPool(strategy=s, max_size=n, budget=b), s, b


def live(s: Strategy) -> list[int]:
    return [c["n"] for c in s.made if not c["closed"]]


async def serve(pool: ConnectionPool[dict[str, Any]], n: int) -> None:
    """``n`` uses, back to back (the clock does not move)."""
    for _ in range(n):
        async with pool.get_connection():
            pass


def test_idle_connections_go_back_only_once_due_the_longest_idle_first(
        clock: ModuleClock) -> None:
    async def scenario() -> None:
        pool, s, b = make_pool(2)
        for _ in range(U):  # both have paid for their opens: only the score counts
            async with pool.get_connection(), pool.get_connection():
                pass
        first, second = pool.get_connection(), pool.get_connection()
        one = await first.__aenter__()
        two = await second.__aenter__()
        await first.__aexit__(None, None, None)  # idle since 100.0
        clock.t += 0.01
        await second.__aexit__(None, None, None)  # idle since 100.01
        b.wanted = 1
        clock.t += 0.01
        # Idle 0.02 s and 0.01 s, the demand just seen: neither is due.
        assert await pool.recall() == 0 and live(s) == [0, 1]
        n, later = await pool._recall_round()
        assert n == 0 and later == pytest.approx((P - 0.02) / 2)  # two seconds a second
        clock.t += (P - 0.02) / 2 - 0.001
        assert await pool.recall() == 0 and live(s) == [0, 1], "kept: not due yet"
        clock.t += 0.002  # the first is due; the second, idle 0.01 s less, is not
        assert await pool.recall() == 1 and one["closed"] and not two["closed"]
        assert b.out == 1 and pool.stats()["recalled"] == 1
        clock.t += 1.0  # both would be due now, but one waiter is served: one goes back
        b.wanted = 0
        assert await pool.recall() == 0 and not two["closed"]
        await pool.close()
        assert b.out == 0

    run(scenario())


def test_never_more_than_wanted_and_most_owed_first(clock: ModuleClock) -> None:
    async def scenario() -> None:
        pool, s, b = make_pool(3)
        cms = [pool.get_connection() for _ in range(3)]
        for cm in cms:
            await cm.__aenter__()
        for cm in reversed(cms):  # 2 then 1 then 0: connection 2 idles longest
            await cm.__aexit__(None, None, None)
            clock.t += 0.01
        b.wanted = 2
        assert await pool.recall() == 0  # the demand starts now
        clock.t += P
        assert await pool.recall() == 2 and live(s) == [0]
        await pool.close()

    run(scenario())


def test_nobody_waiting_nothing_is_closed(clock: ModuleClock) -> None:
    async def scenario() -> None:
        pool, s, b = make_pool(2)
        async with pool.get_connection(), pool.get_connection():
            pass
        for _ in range(3):
            clock.t += 3600.0
            assert await pool.recall() == 0
        assert live(s) == [0, 1] and b.asked == 3 and pool._recall_n == 0
        assert pool._recall_since is None and pool.stats()["recalled"] == 0
        await pool.close()

    run(scenario())


def test_a_new_connection_gets_the_whole_patience_however_old_the_demand(
        clock: ModuleClock) -> None:
    async def scenario() -> None:
        pool, s, b = make_pool(1)
        b.wanted = 1
        async with pool.get_connection():
            assert await pool.recall() == 0  # in use: returns armed, the demand dated
        assert live(s) == [0] and pool.stats()["recalled"] == 0, "returned at once: kept"
        clock.t += 3600.0  # the demand is an hour old
        assert await pool.recall() == 1 and live(s) == []
        await serve(pool, U)  # connection 1, made now, paid for
        clock.t += 0.01
        assert await pool.recall() == 0 and live(s) == [1], "counted from its creation"
        clock.t += P / 2 + 0.001
        assert await pool.recall() == 1 and live(s) == []
        await pool.close()

    run(scenario())


def test_an_idle_connection_goes_back_after_the_patience_whatever_its_uses(
        clock: ModuleClock) -> None:
    async def scenario() -> None:
        pool, s, b = make_pool(1)
        await serve(pool, 1)  # one use, then its process pauses
        b.wanted = 1
        clock.t += P / 2 + 0.001  # the score reached the patience, not its idle time
        n, later = await pool._recall_round()
        assert n == 0 and live(s) == [0], "short of uses and idle less than the patience"
        assert later == pytest.approx(P / 2 - 0.001)
        clock.t += later - 0.001
        assert await pool.recall() == 0 and live(s) == [0]
        clock.t += 0.002  # idle for the patience: its process does not need it
        assert await pool.recall() == 1 and live(s) == [] and b.out == 0
        await pool.close()

    run(scenario())


def test_a_connection_in_use_goes_back_at_a_return_once_due_and_paid_for(
        clock: ModuleClock) -> None:
    async def scenario() -> None:
        pool, s, b = make_pool(1)
        await serve(pool, U - 1)  # with the uses below, it has paid for its open
        b.wanted = 1
        async with pool.get_connection():
            assert await pool.recall() == 0
            assert pool._recall_n == 1
            clock.t += P / 2
            asked = b.asked
        assert live(s) == [0] and b.asked == asked, "not due: kept, the budget not asked"
        async with pool.get_connection():
            clock.t += P / 2 + 0.001
        assert live(s) == [] and b.asked == asked + 1 and b.out == 0
        assert pool.stats()["recalled"] == 1 and pool._recall_n == 0
        await pool.close()

    run(scenario())


def test_a_busy_connection_short_of_uses_is_kept_until_the_max_hold(
        clock: ModuleClock) -> None:
    async def scenario() -> None:
        pool, s, b = make_pool(1)
        b.wanted = 1
        cm = pool.get_connection()
        await cm.__aenter__()  # a new connection, used without a pause
        assert await pool.recall() == 0 and pool._recall_n == 1
        seen = clock.t  # the demand and the connection both date from here
        step = 1.5 * RECALL_MAX_HOLD / U  # too slow to reach its uses within the hold
        uses = 1
        while clock.t - seen + step < RECALL_MAX_HOLD:
            clock.t += step
            await cm.__aexit__(None, None, None)  # due by the score, not paid for: kept
            assert live(s) == [0] and pool.stats()["recalled"] == 0, clock.t - seen
            cm = pool.get_connection()
            await cm.__aenter__()
            uses += 1
        assert uses < U
        clock.t = seen + RECALL_MAX_HOLD  # demand has waited the max hold: it goes back
        await cm.__aexit__(None, None, None)
        assert live(s) == [] and b.out == 0 and pool.stats()["recalled"] == 1
        await pool.close()

    run(scenario())


def test_the_knobs_are_read_at_each_call(clock: ModuleClock,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        pool, s, b = make_pool(1)
        b.wanted = 1
        async with pool.get_connection():
            assert await pool.recall() == 0
            clock.t += 0.02
        assert live(s) == [0], "not due with the library's patience"
        monkeypatch.setattr(budget, "RECALL_PATIENCE", 0.01)
        monkeypatch.setattr(budget, "RECALL_MIN_USES", 1)
        async with pool.get_connection():
            pass
        assert live(s) == [] and pool.stats()["recalled"] == 1
        await pool.close()

    run(scenario())


def test_a_due_return_keeps_its_connection_if_nobody_waits_any_more(
        clock: ModuleClock) -> None:
    async def scenario() -> None:
        pool, s, b = make_pool(1)
        await serve(pool, U)  # paid for: due by the score
        b.wanted = 1
        async with pool.get_connection():
            assert await pool.recall() == 0 and pool._recall_n == 1
            clock.t += 2 * P
            b.wanted = 0  # served meanwhile, by another pool's recall
        assert live(s) == [0] and pool.stats()["recalled"] == 0
        assert pool._recall_n == 0 and pool._recall_since is None, "the demand is forgotten"
        await pool.close()

    run(scenario())


def test_a_return_cancelled_while_asking_the_budget_keeps_its_connection(
        clock: ModuleClock) -> None:
    async def scenario() -> None:
        pool, s, b = make_pool(1)
        await serve(pool, U)  # paid for: due by the score
        b.wanted = 1
        entered = asyncio.Event()

        async def hold() -> None:
            async with pool.get_connection():
                await pool.recall()
                clock.t += 2 * P
                b.gate = asyncio.Event()  # the re-ask at the return blocks
                entered.set()

        task = asyncio.create_task(hold())
        await entered.wait()
        while b.asked < 2:  # the return is asking the budget
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (pool.in_use, len(pool._idle), live(s)) == (0, 1, [0])
        assert pool.stats()["recalled"] == 0 and b.out == 1
        await pool.close()
        assert b.out == 0

    run(scenario())
