"""mppool.aio.ConnectionPool(budget=...) across processes: the supervisor's token pool caps
the connections of 3 asyncio processes together, and tokens move between 4 busy processes
without churning their connections (the recall's hysteresis)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from helpers import fork_ctx, wait_until

import mppool
from mppool.aio import ConnectionPool, ConnectionStrategy

pytestmark = pytest.mark.slow

NAME = "aio-budget"


class ThreadBudget:
    """The sync client's token pool seen as an async one (a test adapter: the async client
    provides this without threads). A token granted to a cancelled get is given back."""

    def __init__(self, tokens: Any) -> None:
        self.tokens = tokens

    async def get(self, timeout: float | None = None) -> Any:
        fut = asyncio.ensure_future(asyncio.to_thread(self.tokens.get, timeout))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(self._give_back)
            raise

    def _give_back(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.tokens.put(fut.result())

    async def put(self, token: Any) -> None:
        await asyncio.to_thread(self.tokens.put, token)

    async def waiting(self) -> int:
        return int(await asyncio.to_thread(self.tokens.waiting))


class CountingStrategy(ConnectionStrategy[int]):
    """Fake connections counted in shared memory: live now, and the most ever live."""

    def __init__(self, live: Any, peak: Any) -> None:
        self.live = live
        self.peak = peak
        self.made = 0

    async def make_connection(self) -> int:
        with self.live.get_lock():
            self.live.value += 1
            self.peak.value = max(self.peak.value, self.live.value)
        self.made += 1
        return self.made

    def connection_is_closed(self, conn: int) -> bool:
        return False

    def close_connection(self, conn: int) -> None:
        with self.live.get_lock():
            self.live.value -= 1


def aio_worker(address: Any, authkey: bytes, live: Any, peak: Any, out: Any) -> None:
    client = mppool.connect(address, authkey)
    tokens = client.token_pool(NAME)

    async def main() -> int:
        strategy = CountingStrategy(live, peak)
        pool = ConnectionPool(strategy=strategy, max_size=2, burst_limit=3,
                              budget=ThreadBudget(tokens))

        async def work() -> None:
            for _ in range(15):
                async with pool.get_connection():
                    await asyncio.sleep(0.002)

        async with asyncio.timeout(60):
            await asyncio.gather(*(work() for _ in range(4)))
            await pool.close()
        return strategy.made

    try:
        made = asyncio.run(main())
        out.put((os.getpid(), made))
    finally:
        client.close()


def test_three_asyncio_processes_share_a_budget_of_two(server: mppool.Server, client: Any,
                                                       procs: list[Any]) -> None:
    budget = client.token_pool(NAME, 2)
    ctx = fork_ctx()
    live = ctx.Value("i", 0)
    peak = ctx.Value("i", 0)
    out = ctx.Queue()
    for _ in range(3):
        p = ctx.Process(target=aio_worker, args=(server.address, server.authkey, live, peak, out))
        procs.append(p)
        p.start()
    nusing_peak = 0
    deadline = time.monotonic() + 60
    while any(p.is_alive() for p in procs):
        assert time.monotonic() < deadline, "workers still running after 60 s"
        nusing = budget.stats()["nusing"]
        nusing_peak = max(nusing_peak, nusing)
        assert nusing <= 2
        time.sleep(0.002)  # the observer's sampling period, not a wait for a result
    results = [out.get(timeout=10) for _ in range(3)]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    print(f"peak live connections, 3 processes: {peak.value}; budget nusing peak: {nusing_peak}")
    assert peak.value == 2, "never above the budget, and the budget was used"
    assert live.value == 0 and sum(made for _, made in results) >= 3
    wait_until(lambda: budget.free() == 2, what="every token back once the processes ended")


CHURN, CHURN_WORKERS, CHURN_BUDGET, QUERIES, PACE = "aio-churn", 4, 2, 60, 0.005


def churn_worker(address: Any, authkey: bytes, live: Any, peak: Any, out: Any) -> None:
    client = mppool.connect(address, authkey)
    tokens = client.token_pool(CHURN)

    async def main() -> int:
        strategy = CountingStrategy(live, peak)
        pool = ConnectionPool(strategy=strategy, max_size=1, budget=ThreadBudget(tokens))
        async with asyncio.timeout(60):
            for _ in range(QUERIES):
                async with pool.get_connection():
                    await asyncio.sleep(0.001)  # the query
                await asyncio.sleep(PACE)  # the pace of the load, not a wait for a result
            await pool.close()
        return strategy.made

    try:
        out.put(asyncio.run(main()))
    finally:
        client.close()


def test_tokens_move_without_churning_connections(server: mppool.Server, client: Any,
                                                  procs: list[Any]) -> None:
    """4 processes with one connection each share a budget of 2, each running queries at a
    steady pace: tokens must move (every process gets its turn) but, with the recall's
    hysteresis, at most about once per patience, not at every query."""
    budget = client.token_pool(CHURN, CHURN_BUDGET)
    ctx = fork_ctx()
    live, peak, out = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Queue()
    for _ in range(CHURN_WORKERS):
        p = ctx.Process(target=churn_worker,
                        args=(server.address, server.authkey, live, peak, out))
        procs.append(p)
        p.start()
    opens = [out.get(timeout=90) for _ in range(CHURN_WORKERS)]
    for p in procs:
        p.join(10)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    queries = CHURN_WORKERS * QUERIES
    print(f"{sum(opens)} connections opened for {queries} queries, per process {opens}")
    assert peak.value <= CHURN_BUDGET and live.value == 0
    # A token moves at most once per recall patience while its process keeps using it: far
    # fewer opens than queries (a token moved whenever somebody waits is one per 1-4).
    assert sum(opens) <= queries / 8, (opens, queries)
    wait_until(lambda: budget.free() == CHURN_BUDGET, what="every token back")
