"""The psycopg_pool-like options on pools served by a supervisor (sync and asyncio clients):
``check`` and ``reconnect_failed`` run in the supervisor, ``max_waiting`` refuses across
processes, and the counters come back through ``stats()`` and ``pop_stats()``."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

import mppool
import mppool.aio

pytestmark = pytest.mark.slow


def test_check_runs_in_the_supervisor_and_skips_broken_objects(client: Any,
                                                                 tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    seen = tmp_path / "checked-by"

    def check(obj: dict[str, int]) -> bool:
        import threading

        seen.write_text(f"{os.getpid()} {threading.current_thread().name}")
        return not broken.exists()

    pool = client.pool("checked", lambda i: {"n": i}, min_size=1, max_size=2, check=check)
    first = pool.get(timeout=5)
    assert first == {"n": 0}
    pid, thread = seen.read_text().split()
    assert int(pid) != os.getpid()  # the supervisor's pid, not ours
    assert thread.startswith("mppool-checked")  # the pool's own threads, not the lease loop
    pool.ret(first)
    broken.touch()
    got = pool.get(timeout=5)  # 0 fails its check: closed, and 1 is made in its place
    assert got == {"n": 1}
    s = pool.stats()
    assert (s["connections_lost"], s["nobjs"]) == (1, 1)
    pool.ret(got)


def test_check_after_reaches_the_supervisor(client: Any) -> None:
    def never(obj: int) -> bool:
        return False

    for name, check_after, lost in (("patient", 3600.0, 0), ("eager", 0.0, 1)):
        pool = client.pool(name, lambda i: i, min_size=0, max_size=1, check=never,
                           check_after=check_after)
        pool.ret(pool.get(timeout=5))  # made now: not checked
        got = pool.get(timeout=5)  # idle a moment: checked only with check_after=0
        assert got == lost, name  # 0 kept, or closed and 1 made in its place
        pool.ret(got)
        assert pool.stats()["connections_lost"] == lost, name
        assert pool.stats()["check_after"] == check_after


def test_max_waiting_refuses_across_processes(client: Any) -> None:
    pool = client.pool("busy", lambda i: i, min_size=0, max_size=1, max_waiting=1)
    held = pool.get(timeout=5)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.get(timeout=10)))
    t.start()
    wait_until(lambda: pool.waiting() == 1)
    with pytest.raises(mppool.TooManyRequests, match="max_waiting=1"):
        pool.get(timeout=10)
    pool.ret(held)
    t.join(10)
    assert got == [0]
    pool.ret(got[0])
    popped = pool.pop_stats()
    assert (popped["requests_num"], popped["requests_queued"], popped["requests_errors"]) \
        == (3, 1, 1)
    assert pool.pop_stats()["requests_num"] == 0


def test_reconnect_failed_is_called_in_the_supervisor_and_service_resumes(
        client: Any, tmp_path: Path) -> None:
    down = tmp_path / "down"
    told = tmp_path / "told"
    down.touch()

    def fun(i: int) -> int:
        if down.exists():
            raise ConnectionRefusedError("database is down")
        return i

    def failed(pool: Any) -> None:
        with told.open("a") as f:
            f.write(f"{os.getpid()} {pool.stats()['min_size']}\n")

    pool = client.pool("flaky", fun, min_size=1, max_size=2, reconnect_timeout=0.5,
                       reconnect_failed=failed)
    with pytest.raises(ConnectionRefusedError, match="database is down"):
        pool.get(timeout=5)  # fails fast: the creation error, not a timeout
    # The hook's whole line, not just its file: the file exists from the moment the hook
    # opens it, before its write (seen empty once in CI).
    wait_until(lambda: told.exists() and told.read_text().endswith("\n"), timeout=10,
               what="reconnect_failed called")
    pid, min_size = told.read_text().split()
    assert int(pid) != os.getpid() and min_size == "1"
    down.unlink()
    wait_until(lambda: pool.stats()["nobjs"] == 1, timeout=20, what="min_size refilled")
    assert pool.get(timeout=5) >= 1
    assert len(told.read_text().splitlines()) == 1  # once per outage
    pool.wait(timeout=5)


def test_bad_option_values_are_named(client: Any) -> None:
    with pytest.raises(TypeError, match="check must be callable, got 42"):
        client.pool("bad", lambda i: i, check=42)
    with pytest.raises(ValueError, match="max_waiting must be >= 0, got -3"):
        client.pool("bad", lambda i: i, max_waiting=-3)


def make(i: int) -> dict[str, int]:
    return {"i": i}


def test_async_pool_takes_the_options(server: mppool.Server) -> None:
    async def main() -> None:
        async with await mppool.aio.connect(server.address, server.authkey) as c:
            pool = await c.pool("aio-opts", make, min_size=0, max_size=1, max_waiting=1,
                                check=lambda o: o["i"] != 0)
            first = await pool.get(timeout=5)
            assert first == {"i": 0}  # new: not checked
            waiter = asyncio.ensure_future(pool.get(timeout=10))
            while await pool.waiting() != 1:
                await asyncio.sleep(0.01)
            with pytest.raises(mppool.TooManyRequests):
                await pool.get(timeout=10)
            await pool.ret(first)  # to the waiter: fails its check, a new one is made
            second = await asyncio.wait_for(waiter, 10)
            assert second == {"i": 1}
            await pool.ret(second)
            popped = await pool.pop_stats()
            assert popped["connections_lost"] == 1 and popped["requests_errors"] == 1
            assert (await pool.stats())["connections_lost"] == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_async_wait_for_min_size(server: mppool.Server, tmp_path: Path) -> None:
    down = tmp_path / "down"
    down.touch()

    def fun(i: int) -> int:
        if down.exists():
            raise ConnectionRefusedError("database is down")
        return i

    async def main() -> None:
        async with await mppool.aio.connect(server.address, server.authkey) as c:
            pool = await c.pool("aio-wait", fun, min_size=2, max_size=2)
            with pytest.raises(mppool.TimeOut, match=r"0 of min_size=2.*database is down"):
                await pool.wait(timeout=0.2)
            down.unlink()  # the refill scheduled by the backoff (in about 1 s) succeeds
            await pool.wait(timeout=20)
            assert (await pool.stats())["nobjs"] == 2

    asyncio.run(asyncio.wait_for(main(), 60))
