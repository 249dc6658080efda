"""mppool.aio.ConnectionPool: asyncio-connection-pool's API and behaviour, and the budget."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

import mppool.aio.connection_pool as cp
from mppool import PoolClosed
from mppool.aio import ConnectionPool, ConnectionStrategy
from mppool.budget import RECALL_MIN_USES, RECALL_PATIENCE

DEADLINE = 5.0


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a scenario in a fresh event loop, bounded by a deadline."""

    async def bounded() -> Any:
        async with asyncio.timeout(DEADLINE * 2):
            return await coro

    return asyncio.run(bounded())


async def until(pred: Callable[[], Any], what: str, timeout: float = DEADLINE) -> None:
    """Yield to the loop until ``pred()`` is true; fail after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.001)


class Conn:
    def __init__(self, n: int) -> None:
        self.n = n
        self.dead = False  # killed from outside: the strategy sees it as closed
        self.closed = False

    def __repr__(self) -> str:
        return f"Conn({self.n})"


class Strategy(ConnectionStrategy[Conn]):
    """Counts live connections; ``gate`` (if set) holds make_connection until it is set."""

    def __init__(self, async_close: bool = False) -> None:
        self.async_close = async_close
        self.numbers = itertools.count()
        self.gate: asyncio.Event | None = None
        self.fail_next = 0
        self.live = 0
        self.peak = 0
        self.made: list[Conn] = []
        self.closed: list[Conn] = []
        self.making = 0

    async def make_connection(self) -> Conn:
        self.making += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_next:
                self.fail_next -= 1
                raise ConnectionRefusedError("refused on purpose")
        finally:
            self.making -= 1
        conn = Conn(next(self.numbers))
        self.made.append(conn)
        self.live += 1
        self.peak = max(self.peak, self.live)
        return conn

    def connection_is_closed(self, conn: Conn) -> bool:
        return conn.dead or conn.closed

    def _close(self, conn: Conn) -> None:
        assert not conn.closed, f"{conn} closed twice"
        conn.closed = True
        self.live -= 1
        self.closed.append(conn)

    def close_connection(self, conn: Conn) -> Awaitable[None] | None:
        if not self.async_close:
            self._close(conn)
            return None

        async def close() -> None:
            await asyncio.sleep(0)
            self._close(conn)

        return close()


class LocalBudget:
    """An in-process async token pool with waiting(): what ``await client.token_pool()``
    provides, for one process."""

    def __init__(self, n: int) -> None:
        self.max_size = n
        self.free = list(range(n))
        self.waiters: deque[asyncio.Future[int]] = deque()
        self.gets = 0
        self.puts = 0
        self.waiting_calls = 0

    @property
    def out(self) -> int:
        return self.max_size - len(self.free)

    async def get(self, timeout: float | None = None) -> int:
        self.gets += 1
        if self.free and not self.waiters:
            return self.free.pop()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                await self.put(fut.result())  # granted as we gave up: not lost
            elif fut in self.waiters:
                self.waiters.remove(fut)
            raise

    async def put(self, token: int) -> None:
        self.puts += 1
        assert token not in self.free, f"token {token} given back twice"
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(token)
                return
        self.free.append(token)

    async def waiting(self) -> int:
        self.waiting_calls += 1
        return sum(not f.done() for f in self.waiters)


def quiet(pool: ConnectionPool[Any]) -> None:
    """Nothing in flight: every connection made is either idle or closed."""
    assert pool.in_use == 0
    assert pool.currently_allocating == 0
    assert pool.currently_deallocating == 0
    assert pool._waiters == 0


# ------------------------------------------------------------------------- construction


def test_burst_limit_below_max_size_is_refused_naming_both() -> None:
    s = Strategy()
    ConnectionPool(strategy=s, max_size=100, burst_limit=None)
    ConnectionPool(strategy=s, max_size=100, burst_limit=100)
    ConnectionPool(strategy=s, max_size=100, burst_limit=101)
    ConnectionPool(strategy=s, max_size=0, burst_limit=3)  # keeps no idle connection
    with pytest.raises(ValueError, match=r"burst_limit must be greater than or equal to max_size"
                                          r" \(burst_limit=99, max_size=100\)"):
        ConnectionPool(strategy=s, max_size=100, burst_limit=99)
    with pytest.raises(ValueError, match="max_size=0"):
        ConnectionPool(strategy=s, max_size=0)
    with pytest.raises(TypeError, match="max_size"):
        ConnectionPool(strategy=s, max_size=True)
    with pytest.raises(TypeError, match="budget"):
        ConnectionPool(strategy=s, max_size=1, budget=object())  # type: ignore[arg-type]


def test_built_outside_any_loop_and_used_by_two_loops() -> None:
    """Construction binds no loop: waiters are made in whichever loop runs get_connection."""
    s = Strategy()
    pool = ConnectionPool(strategy=s, max_size=1)  # no running loop here

    async def contend() -> list[int]:
        seen: list[int] = []

        async def user() -> None:
            async with pool.get_connection() as conn:
                seen.append(conn.n)
                await asyncio.sleep(0)  # the others queue meanwhile

        await asyncio.gather(*(user() for _ in range(3)))
        return seen

    assert run(contend()) == [0, 0, 0]  # one connection, two waiters served by it
    assert run(contend()) == [0, 0, 0]  # a second loop: the waiters' futures are its own
    quiet(pool)
    run(pool.close())
    assert s.live == 0


# ----------------------------------------------------- asyncio-connection-pool's behaviour


@pytest.mark.parametrize("async_close", [False, True])
def test_concurrent_get_connection(async_close: bool) -> None:
    async def main() -> None:
        s = Strategy(async_close)
        pool = ConnectionPool(strategy=s, max_size=20)
        stop = asyncio.Event()
        holding: set[int] = set()

        async def holder() -> None:
            async with pool.get_connection() as conn:
                assert conn.n not in holding, "one connection handed to two holders"
                holding.add(conn.n)
                await stop.wait()
                holding.discard(conn.n)

        tasks = [asyncio.create_task(holder()) for _ in range(10)]
        await until(lambda: len(holding) == 10, "10 holders")
        assert pool.in_use == 10 and pool.available.empty()
        stop.set()
        await asyncio.gather(*tasks)
        quiet(pool)
        assert pool.available.qsize() == 10 and len(s.made) == 10 and not s.closed
        await pool.close()
        assert s.live == 0 and len(s.closed) == 10

    run(main())


def test_connection_being_made_is_counted() -> None:
    async def main() -> None:
        s = Strategy()
        s.gate = asyncio.Event()
        pool = ConnectionPool(strategy=s, max_size=10)
        got = 0

        async def worker() -> None:
            nonlocal got
            async with pool.get_connection():
                got += 1

        tasks = [asyncio.create_task(worker()) for _ in range(12)]
        await until(lambda: s.making == 10, "10 connections being made")
        assert pool.currently_allocating == 10 and pool._total == 10
        assert pool._waiters == 2, "the 11th and 12th wait: the slots being made count"
        s.gate.set()
        await asyncio.gather(*tasks)
        assert got == 12 and len(s.made) == 10
        quiet(pool)
        await pool.close()

    run(main())


@pytest.mark.parametrize("async_close", [False, True])
def test_burst_connections_closed_when_returned_with_nobody_waiting(async_close: bool) -> None:
    async def main() -> None:
        s = Strategy(async_close)
        pool = ConnectionPool(strategy=s, max_size=2)
        release = {i: asyncio.Event() for i in range(4)}
        held: dict[int, Conn] = {}

        async def worker(i: int) -> None:
            async with pool.get_connection() as conn:
                held[i] = conn
                await release[i].wait()
                del held[i]

        base = [asyncio.create_task(worker(i)) for i in range(2)]
        await until(lambda: len(held) == 2, "max_size connections held")
        with pytest.raises(TimeoutError):  # no burst: the third waits
            async with asyncio.timeout(0.05), pool.get_connection():
                pass
        assert pool._waiters == 0, "the timed-out waiter left the queue"

        pool.burst_limit = 3
        burst = asyncio.create_task(worker(2))
        await until(lambda: 2 in held, "a burst connection")
        assert pool._total == 3 and len(s.made) == 3
        queued = asyncio.create_task(worker(3))
        await until(lambda: pool._waiters == 1, "a waiter at burst_limit")
        release[2].set()
        await until(lambda: 3 in held, "the waiter served")
        assert held[3].n == 2 and not s.closed, "handed to the waiter, not closed"
        await burst
        release[3].set()
        await queued
        assert [c.n for c in s.closed] == [2], "nobody waits: the burst connection is closed"
        assert pool._total == 2 and pool.stats()["burst_closed"] == 1
        for i in (0, 1):
            release[i].set()
        await asyncio.gather(*base)
        quiet(pool)
        assert pool.available.qsize() == 2
        await pool.close()

    run(main())


def test_stale_connections_are_never_handed_out() -> None:
    async def main() -> None:
        s = Strategy()
        pool = ConnectionPool(strategy=s, max_size=4)
        stop = asyncio.Event()
        held: list[Conn] = []

        async def holder() -> None:
            async with pool.get_connection() as conn:
                held.append(conn)
                await stop.wait()

        tasks = [asyncio.create_task(holder()) for _ in range(4)]
        await until(lambda: len(held) == 4, "4 connections")
        stop.set()
        await asyncio.gather(*tasks)
        for conn in s.made[:3]:
            conn.dead = True  # killed while idle
        for _ in range(3):
            async with pool.get_connection() as conn:
                assert not conn.dead, f"stale {conn} handed out"
                assert conn.n == 3
        assert pool.stats()["stale"] == 3
        assert [c.n for c in s.closed] == [0, 1, 2], "stale connections closed, not leaked"
        async with pool.get_connection() as conn:
            conn.dead = True  # the user broke it
        async with pool.get_connection() as conn:
            assert conn.n == 4, "a connection broken by its user is not handed out again"
        quiet(pool)
        await pool.close()
        assert s.live == 0

    run(main())


def test_connection_is_closed_raising_drops_the_connection() -> None:
    class Raising(Strategy):
        def connection_is_closed(self, conn: Conn) -> bool:
            if conn.dead:
                raise OSError("cannot tell")
            return False

    async def main() -> None:
        s = Raising()
        pool = ConnectionPool(strategy=s, max_size=1)
        async with pool.get_connection() as conn:
            conn.dead = True
        with pytest.raises(OSError, match="cannot tell"):
            async with pool.get_connection():
                pass
        quiet(pool)
        assert s.live == 0 and pool._total == 0
        async with pool.get_connection() as conn:
            assert conn.n == 1
        await pool.close()

    run(main())


def test_idle_connection_is_handed_out_without_yielding_to_the_loop() -> None:
    async def main() -> None:
        s = Strategy()
        pool = ConnectionPool(strategy=s, max_size=1)
        async with pool.get_connection():
            pass
        ran = []
        loop = asyncio.get_running_loop()
        for _ in range(100):
            loop.call_soon(ran.append, 1)  # runs at the first yield to the loop
            async with pool.get_connection() as conn:
                assert not ran, "get_connection yielded to the event loop"
            assert not ran, "returning the connection yielded to the event loop"
            assert conn.n == 0
            await asyncio.sleep(0)
            assert ran
            ran.clear()
        await pool.close()

    run(main())


def test_failed_make_gives_the_slot_to_a_waiter(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(cp, "_now", lambda: clock[0])

    async def main() -> None:
        s = Strategy()
        s.gate = asyncio.Event()
        s.fail_next = 2
        pool = ConnectionPool(strategy=s, max_size=1)

        async def use() -> int:
            async with pool.get_connection() as conn:
                return conn.n

        first = asyncio.create_task(use())
        second = asyncio.create_task(use())
        await until(lambda: pool._waiters == 1, "the second queued behind the first make")
        s.gate.set()
        with pytest.raises(ConnectionRefusedError):
            await first
        # The slot went to the waiter, which fails fast during the backoff (make_connection
        # is not called again) instead of waiting for ever.
        with pytest.raises(ConnectionRefusedError):
            await second
        assert s.fail_next == 1 and pool._total == 0  # one call of make_connection
        s.fail_next = 0
        clock[0] += 2.0  # past the backoff: the slot is still there
        assert await use() == 0
        quiet(pool)
        await pool.close()

    run(main())


# ------------------------------------------------------------------------- cancellation


def test_cancel_while_making_restores_counters() -> None:
    async def main() -> None:
        s = Strategy()
        s.gate = asyncio.Event()
        budget = LocalBudget(1)
        pool = ConnectionPool(strategy=s, max_size=1, budget=budget)
        task = asyncio.create_task(pool.get_connection().__aenter__())
        await until(lambda: s.making == 1, "make_connection running")
        assert pool.currently_allocating == 1 and budget.out == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        quiet(pool)
        assert pool._total == 0 and budget.out == 0, "slot and budget token given back"
        await pool.close()

    run(main())


def test_cancel_while_queued_and_just_granted_loses_nothing() -> None:
    async def main() -> None:
        s = Strategy()
        pool = ConnectionPool(strategy=s, max_size=1)
        release = asyncio.Event()

        async def hold() -> None:
            async with pool.get_connection():
                await release.wait()

        holder = asyncio.create_task(hold())
        await until(lambda: pool.in_use == 1, "held")
        queued = asyncio.create_task(hold())
        await until(lambda: pool._waiters == 1, "queued")
        queued.cancel()  # cancelled while queued
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert pool._waiters == 0

        release.set()
        await holder
        cm = pool.get_connection()
        await cm.__aenter__()
        granted = asyncio.create_task(hold())
        await until(lambda: pool._waiters == 1, "queued again")
        await cm.__aexit__(None, None, None)  # hands it to the waiter, without yielding
        assert pool._waiters == 0 and pool.in_use == 1
        granted.cancel()  # granted, not yet resumed: the connection must come back
        with pytest.raises(asyncio.CancelledError):
            await granted
        quiet(pool)
        assert pool.available.qsize() == 1 and len(s.made) == 1 and not s.closed
        await pool.close()

    run(main())


def test_cancellation_chaos_loses_nothing_and_never_shares() -> None:
    """Tasks cancelled at random points, over and over: afterwards every connection made is
    idle or closed, none was held twice at once, and the limits held throughout."""

    async def main() -> tuple[int, int]:
        s = Strategy(async_close=True)
        budget = LocalBudget(5)
        pool = ConnectionPool(strategy=s, max_size=3, burst_limit=5, budget=budget)
        rng = random.Random(11)
        holding: set[int] = set()
        cancelled = 0

        async def use() -> None:
            async with pool.get_connection() as conn:
                assert conn.n not in holding, f"{conn} held twice"
                assert not conn.closed and not conn.dead
                holding.add(conn.n)
                try:
                    for _ in range(rng.randrange(3)):
                        await asyncio.sleep(0)
                finally:
                    holding.discard(conn.n)

        for _ in range(300):
            tasks = [asyncio.create_task(use()) for _ in range(12)]
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            for t in tasks:
                if rng.random() < 0.5:
                    t.cancel()
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, asyncio.CancelledError):
                    cancelled += 1
                elif r is not None:
                    raise r
            assert s.peak <= 5 and budget.out <= 5
        quiet(pool)
        assert s.live == pool.available.qsize() == budget.out
        await pool.close()
        assert s.live == 0 and budget.out == 0
        return cancelled, len(s.made)

    cancelled, made = run(main())
    assert cancelled > 500 and made >= 3


# ------------------------------------------------------------------------- budget


def test_every_live_connection_holds_a_token_burst_ones_too() -> None:
    async def main() -> None:
        budget = LocalBudget(4)
        strategies = [Strategy(), Strategy()]
        pools = [ConnectionPool(strategy=s, max_size=2, burst_limit=4, budget=budget)
                 for s in strategies]
        peak = 0

        async def use(pool: ConnectionPool[Conn]) -> None:
            nonlocal peak
            for _ in range(20):
                async with pool.get_connection():
                    live = sum(s.live for s in strategies)
                    assert live <= budget.out <= 4
                    peak = max(peak, live)
                    await asyncio.sleep(0)

        await asyncio.gather(*(use(p) for p in pools for _ in range(5)))
        assert peak == 4, "the budget, not max_size or burst_limit, was the binding cap"
        for p in pools:
            quiet(p)
        assert sum(s.live for s in strategies) == budget.out
        for p in pools:
            await p.close()
        assert budget.out == 0 and budget.gets == budget.puts

    run(main())


def test_idle_connection_with_its_token_needs_no_budget_round_trip() -> None:
    async def main() -> None:
        budget = LocalBudget(2)
        pool = ConnectionPool(strategy=Strategy(), max_size=2, budget=budget)
        async with pool.get_connection(), pool.get_connection():
            pass
        gets, puts = budget.gets, budget.puts
        for _ in range(200):
            async with pool.get_connection():
                pass
        assert (budget.gets, budget.puts) == (gets, puts) == (2, 0)
        await pool.close()
        assert budget.out == 0

    run(main())


def test_idle_connections_go_back_to_a_waiting_budget() -> None:
    async def main() -> None:
        budget = LocalBudget(2)
        a_strategy = Strategy()
        a = ConnectionPool(strategy=a_strategy, max_size=2, budget=budget)
        async with a.get_connection(), a.get_connection():
            pass  # two idle connections hold the whole budget
        assert budget.out == 2 and a.available.qsize() == 2
        b = ConnectionPool(strategy=Strategy(), max_size=2, budget=budget)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with asyncio.timeout(2), b.get_connection() as conn:
            latency = loop.time() - t0
            assert conn.n == 0
        assert latency < 0.5, latency  # one recall period (50 ms) plus slack
        assert a.stats()["recalled"] == 1 and a.available.qsize() == 1 and a_strategy.live == 1
        await a.close()
        await b.close()
        assert budget.out == 0

    run(main())


def test_busy_connection_goes_back_to_the_budget_at_its_return() -> None:
    async def main() -> None:
        budget = LocalBudget(1)
        s = Strategy()
        a = ConnectionPool(strategy=s, max_size=1, budget=budget)
        b = ConnectionPool(strategy=Strategy(), max_size=1, budget=budget)
        release = asyncio.Event()
        for _ in range(RECALL_MIN_USES):  # it has paid for its open: due after the patience
            async with a.get_connection():
                pass

        async def hold() -> None:
            async with a.get_connection():
                await release.wait()

        holder = asyncio.create_task(hold())
        await until(lambda: budget.out == 1, "a holds the only token")

        async def use_b() -> int:
            async with b.get_connection() as conn:
                return conn.n

        waiter = asyncio.create_task(use_b())
        await until(lambda: a._recall_n == 1, "a learns that another pool waits")
        since = a._recall_since
        assert since is not None
        # Returned once due (the demand as old as the patience): closed at its return.
        await until(lambda: cp._now() - since >= RECALL_PATIENCE, "the patience passed")
        release.set()
        await holder
        assert s.live == 0 and a.available.qsize() == 0, "closed at its return, not kept idle"
        assert await waiter == 0
        assert a.stats()["recalled"] == 1
        await a.close()
        await b.close()
        assert budget.out == 0

    run(main())


def test_recall_asks_the_budget_only_while_the_pool_holds_connections() -> None:
    async def main() -> None:
        budget = LocalBudget(2)
        pool = ConnectionPool(strategy=Strategy(), max_size=2, budget=budget)
        async with pool.get_connection():
            await until(lambda: budget.waiting_calls >= 2, "polled while a connection is out")
        await pool.close()
        calls = budget.waiting_calls
        await asyncio.sleep(0.2)  # four recall periods: a closed pool must not poll
        assert budget.waiting_calls == calls

    run(main())


def test_close_wakes_waiters_and_gives_every_token_back() -> None:
    async def main() -> None:
        budget = LocalBudget(2)
        s = Strategy()
        pool = ConnectionPool(strategy=s, max_size=1, budget=budget)
        release = asyncio.Event()

        async def hold() -> None:
            async with pool.get_connection():
                await release.wait()

        holder = asyncio.create_task(hold())
        await until(lambda: pool.in_use == 1, "held")
        waiter = asyncio.create_task(hold())
        await until(lambda: pool._waiters == 1, "queued")
        await pool.close()
        with pytest.raises(PoolClosed, match="shutting down"):
            await waiter
        assert s.live == 1, "the connection in use stays open until it is returned"
        release.set()
        await holder
        assert s.live == 0 and budget.out == 0
        with pytest.raises(PoolClosed):
            async with pool.get_connection():
                pass

    run(main())


def test_recall_task_ends_when_the_pool_holds_nothing_and_restarts() -> None:
    async def main() -> None:
        budget = LocalBudget(1)
        pool = ConnectionPool(strategy=Strategy(), max_size=0, burst_limit=1, budget=budget)
        for _ in range(2):
            async with pool.get_connection():
                task = pool._recall_task
                assert task is not None and not task.done()
            assert pool._total == 0 and budget.out == 0, "max_size=0: closed at its return"
            await until(task.done, "the recall task ended")
        await pool.close()

    run(main())
