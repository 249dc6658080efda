"""mppool.aio.strategies against the real PostgreSQL and Redis of this machine."""

from __future__ import annotations

import asyncio
import sys
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from mppool.aio import ConnectionPool
from mppool.aio.strategies import PsycopgStrategy, RedisStrategy

DEADLINE = 10.0


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(DEADLINE * 3):
            return await coro

    return asyncio.run(bounded())


async def until(pred: Callable[[], Awaitable[bool]], what: str, timeout: float = DEADLINE) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await pred():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


async def hammer(pool: ConnectionPool[Any], query: Callable[[Any], Awaitable[Any]],
                 count: Callable[[], Awaitable[int]], tasks: int = 20, rounds: int = 5) -> int:
    """``tasks`` tasks run ``rounds`` queries each through the pool while the server's own
    count of the pool's connections is sampled; returns the largest count seen."""
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await count())
            await asyncio.sleep(0.002)

    async def work() -> None:
        for _ in range(rounds):
            async with pool.get_connection() as conn:
                await query(conn)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(work() for _ in range(tasks)))
    finally:
        done.set()
        await sampler
    return max(peak, await count())


def test_missing_driver_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now raises ImportError
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match="needs the 'psycopg' package"):
        run(PsycopgStrategy("").make_connection())
    with pytest.raises(ImportError, match="needs the 'redis' package"):
        run(RedisStrategy().make_connection())


# ------------------------------------------------------------------------- PostgreSQL


@pytest.mark.postgres
def test_psycopg_pool_never_exceeds_burst_limit_server_side(postgres_dsn: str) -> None:
    import psycopg

    app = f"mppool-aio-{uuid.uuid4().hex[:12]}"

    async def main() -> int:
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as mon:

            async def count() -> int:
                cur = await mon.execute(
                    "select count(*) from pg_stat_activity where application_name = %s", (app,))
                row = await cur.fetchone()
                assert row is not None
                return int(row[0])

            async def query(conn: Any) -> None:
                await conn.execute("select pg_sleep(0.01)")

            pool = ConnectionPool(strategy=PsycopgStrategy(postgres_dsn, application_name=app,
                                                           autocommit=True),
                                  max_size=3, burst_limit=5)
            peak = await hammer(pool, query, count)
            assert pool.available.qsize() == 3, "burst connections closed once nobody waits"
            assert await count() == 3
            await pool.close()
            await until(lambda: _eq(count(), 0), "every connection gone server-side")
            return peak

    peak = run(main())
    print(f"peak PostgreSQL connections: {peak} (max_size=3, burst_limit=5)")
    assert 3 < peak <= 5, peak


async def _eq(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@pytest.mark.postgres
def test_psycopg_connection_killed_server_side_is_never_handed_out(postgres_dsn: str) -> None:
    import psycopg

    app = f"mppool-aio-{uuid.uuid4().hex[:12]}"

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as mon:
            strategy = PsycopgStrategy(postgres_dsn, application_name=app, autocommit=True)
            pool = ConnectionPool(strategy=strategy, max_size=1)
            async with pool.get_connection() as conn:
                killed = conn.info.backend_pid
                victim = conn
            await mon.execute("select pg_terminate_backend(%s)", (killed,))

            async def gone() -> bool:
                cur = await mon.execute("select count(*) from pg_stat_activity where pid = %s",
                                        (killed,))
                row = await cur.fetchone()
                return row is not None and row[0] == 0

            await until(gone, "the backend gone")
            assert not victim.closed, "psycopg alone does not know yet"

            async def seen_closed() -> bool:
                return strategy.connection_is_closed(victim)

            await until(seen_closed, "the terminated connection seen as closed, idle")
            async with pool.get_connection() as conn:
                assert conn is not victim
                cur = await conn.execute("select pg_backend_pid()")
                row = await cur.fetchone()
                assert row is not None and row[0] != killed
            assert victim.closed, "the stale connection was closed by the pool"
            assert pool.stats()["stale"] == 1
            await pool.close()

    run(main())


@pytest.mark.postgres
def test_psycopg_check_keeps_live_connections_and_replaces_a_terminated_one(
        postgres_dsn: str) -> None:
    """check= pre-pings for real: a live connection is kept (the same backend serves every
    get), one terminated server-side fails its ping, is closed, and the get is served by a
    new connection without an error. The strategy here looks at psycopg's flags only (as
    asyncio-connection-pool users' strategies do), so it is the check that finds it."""
    import psycopg

    class Naive(PsycopgStrategy):
        def connection_is_closed(self, conn: Any) -> bool:
            return bool(conn.closed or conn.broken)

    pings: list[int] = []

    async def ping(conn: Any) -> bool:
        pings.append(conn.info.backend_pid)
        await conn.execute("select 1")
        return True

    async def backend(pool: ConnectionPool[Any]) -> int:
        async with pool.get_connection() as conn:
            cur = await conn.execute("select pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as mon:
            pool = ConnectionPool(strategy=Naive(postgres_dsn, autocommit=True), max_size=1,
                                  check=ping)
            first = await backend(pool)
            assert [await backend(pool) for _ in range(3)] == [first] * 3
            assert pings == [first] * 3  # the new connection was not pinged
            await mon.execute("select pg_terminate_backend(%s)", (first,))

            async def gone() -> bool:
                cur = await mon.execute("select count(*) from pg_stat_activity where pid = %s",
                                        (first,))
                row = await cur.fetchone()
                return row is not None and row[0] == 0

            await until(gone, "the backend gone")
            second = await backend(pool)
            assert second != first
            stats = pool.stats()
            assert (stats["connections_lost"], stats["connections_num"], stats["requests_errors"],
                    stats["stale"]) == (1, 2, 0, 0), stats
            await pool.close()

    run(main())


@pytest.mark.postgres
def test_psycopg_connection_broken_in_use_is_not_handed_out_again(postgres_dsn: str) -> None:
    import psycopg

    app = f"mppool-aio-{uuid.uuid4().hex[:12]}"

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as mon:
            pool = ConnectionPool(strategy=PsycopgStrategy(postgres_dsn, application_name=app,
                                                           autocommit=True), max_size=1)
            with pytest.raises(psycopg.OperationalError):
                async with pool.get_connection() as conn:
                    victim = conn
                    await mon.execute("select pg_terminate_backend(%s)", (conn.info.backend_pid,))
                    await conn.execute("select pg_sleep(5)")
            assert victim.broken or victim.closed
            async with pool.get_connection() as conn:
                assert conn is not victim
                await conn.execute("select 1")
            await pool.close()

    run(main())


# ------------------------------------------------------------------------- Redis


@pytest.mark.redis
def test_redis_pool_never_exceeds_burst_limit_server_side(redis_url: str) -> None:
    from redis.asyncio import Redis

    name = f"mppool-aio-{uuid.uuid4().hex[:12]}"

    async def main() -> int:
        mon = Redis.from_url(redis_url)
        try:
            async def count() -> int:
                return sum(c.get("name") == name for c in await mon.client_list())

            async def query(conn: Any) -> None:
                await conn.ping()
                await asyncio.sleep(0.005)  # holds the connection like a slower command would

            pool = ConnectionPool(strategy=RedisStrategy(redis_url, client_name=name),
                                  max_size=3, burst_limit=5)
            peak = await hammer(pool, query, count)
            assert pool.available.qsize() == 3 and await count() == 3
            await pool.close()
            await until(lambda: _eq(count(), 0), "every connection gone server-side")
            return peak
        finally:
            await mon.aclose()

    peak = run(main())
    print(f"peak Redis connections: {peak} (max_size=3, burst_limit=5)")
    assert 3 < peak <= 5, peak


@pytest.mark.redis
def test_redis_connection_killed_server_side_is_never_handed_out(redis_url: str) -> None:
    from redis.asyncio import Redis

    name = f"mppool-aio-{uuid.uuid4().hex[:12]}"

    async def main() -> None:
        mon = Redis.from_url(redis_url)
        try:
            strategy = RedisStrategy(redis_url, client_name=name)
            pool = ConnectionPool(strategy=strategy, max_size=1)
            async with pool.get_connection() as conn:
                killed = await conn.client_id()
                victim = conn
            await mon.execute_command("CLIENT", "KILL", "ID", str(killed))

            async def seen_closed() -> bool:
                return strategy.connection_is_closed(victim)

            await until(seen_closed, "the killed connection seen as closed")
            async with pool.get_connection() as conn:
                assert conn is not victim
                assert await conn.client_id() != killed
            assert pool.stats()["stale"] == 1
            await pool.close()
        finally:
            await mon.aclose()

    run(main())


def test_psycopg_outage_backs_off_reports_and_recovers(postgres_dsn: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A database the server refuses (it does not exist) is an outage: wait() times out
    naming the server's error, reconnect_failed is called once, acquires fail fast without
    asking the server again; once the DSN is right and the backoff has passed, service
    resumes. The pool's backoff clock is a fake one."""
    import psycopg

    import mppool.aio.connection_pool as cp
    from mppool import PoolClosed, TimeOut

    clock = [1000.0]
    monkeypatch.setattr(cp, "_now", lambda: clock[0])
    url = urllib.parse.urlsplit(postgres_dsn)
    missing = urllib.parse.urlunsplit(url._replace(path=f"/mppool_no_db_{uuid.uuid4().hex[:8]}"))

    class Counting(PsycopgStrategy):
        calls = 0

        async def make_connection(self) -> Any:
            self.calls += 1
            return await super().make_connection()

    async def main() -> None:
        told: list[Any] = []
        strategy = Counting(missing, autocommit=True)
        pool = ConnectionPool(strategy=strategy, max_size=2, reconnect_timeout=0.0,
                              reconnect_failed=told.append, open=False)
        with pytest.raises(PoolClosed, match="not open"):
            async with pool.get_connection():
                pass
        async with pool:
            with pytest.raises(TimeOut, match=r"OperationalError.*does not exist"):
                await pool.wait(0.3)
            assert strategy.calls == 1 and told == [pool]  # reconnect_timeout=0: at once
            with pytest.raises(psycopg.OperationalError) as info:
                async with pool.get_connection():
                    pass
            assert strategy.calls == 1  # failed fast: the server was not asked again
            assert "without calling make_connection()" in " ".join(info.value.__notes__)
            strategy.conninfo = postgres_dsn
            clock[0] += 2.0  # past the backoff
            async with pool.get_connection() as conn:
                cur = await conn.execute("select 1")
                assert await cur.fetchone() == (1,)
            await pool.wait(1.0)  # one exists
            assert strategy.calls == 2 and told == [pool]
            kept = conn
        assert kept.closed  # async with closed the pool and its idle connection

    run(main())
