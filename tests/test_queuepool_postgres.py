"""mppool.queuepool with psycopg2 against a real PostgreSQL.

queuepool's own scenario: 2 threads run 100 tasks on a pool of 20 serializable connections;
each task increments a counter row 10 times, retrying on serialization failures, leaves its
last transaction open (the put must roll it back) and closes one connection behind its
manager's back (the put must notice). The counter must end at exactly 1000. Then the same
pool API in 4 processes on a shared budget, checked where it matters: the connections the
server sees (``pg_stat_activity``, by an ``application_name`` unique to the test).
Tables get unique names and are dropped at the end. Last, an outage (test_db_outage's way:
a private role cut off and given back).
"""

from __future__ import annotations

import multiprocessing.pool as mpp
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest
from helpers import fork_ctx, wait_until
from outage_kit import Timeline, cut_off, fail_fast_until_told, private_role, role_backends
from outage_kit import admin as pg_admin
from psycopg.conninfo import make_conninfo
from psycopg2 import errors as pg_errors
from psycopg2 import extensions as pg_ext

from mppool import TimeOut
from mppool.queuepool import Pool
from mppool.queuepool.psycopg2cm import ConnectionManager, ConnectionManagerExtended

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SAMPLING_DEADLINE = 120.0


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@contextmanager
def admin(dsn: str) -> Iterator[Any]:
    conn = psycopg2.connect(dsn, application_name="mppool-test-admin")
    conn.autocommit = True
    try:
        with conn.cursor() as c:
            c.execute("set lock_timeout = '10s'")
        yield conn
    finally:
        conn.close()


def scalar(conn: Any, query: str, args: Any = None) -> Any:
    with conn.cursor() as c:
        c.execute(query, args)
        row = c.fetchone()
    return None if row is None else row[0]


def count_app(adm: Any, app: str) -> int:
    return int(scalar(adm, "select count(*) from pg_stat_activity where application_name = %s",
                      (app,)))


@pytest.fixture
def counter_table(postgres_dsn: str) -> Iterator[str]:
    table = unique("mppool_qp")
    with admin(postgres_dsn) as adm, adm.cursor() as c:
        c.execute(f"create table {table} (x integer not null)")
        c.execute(f"insert into {table} values (0)")
    try:
        yield table
    finally:
        with admin(postgres_dsn) as adm, adm.cursor() as c:
            c.execute(f"drop table if exists {table}")


def serializable_pool(dsn: str, app: str, capacity: int, **kw: Any) -> Pool:
    pool = Pool("qp", capacity, maxIdleTime=60, maxOpenTime=600, maxUsageCount=1000,
                closeOnException=True, **kw)
    for i in range(capacity):
        pool.put(ConnectionManager(f"qp-{i}", pg_ext.ISOLATION_LEVEL_SERIALIZABLE, None, None,
                                   False, dsn, application_name=app))
    return pool


def increment_task(pool: Pool, table: str, n: int) -> list[int]:
    """queuepool's task: n increments, each in its own serializable transaction, retried
    on serialization failures; then a transaction left open and a connection closed
    outside its manager, for the pool's repair to handle."""
    seen = []
    for _ in range(n):
        with pool.take(timeout=60) as cm:
            conn = cm.resource
            while True:
                try:
                    with conn, conn.cursor() as c:  # one transaction, committed on exit
                        c.execute(f"select x from {table}")
                        (x,) = c.fetchone()
                        c.execute(f"update {table} set x = %s", (x + 1,))
                    seen.append(x + 1)
                    break
                except pg_errors.SerializationFailure:
                    conn.rollback()
                    time.sleep(random.random() * 0.01)  # back off before the retry
            with conn.cursor() as c:
                c.execute(f"select x from {table}")  # still in a transaction at the put
    cm = pool.take(timeout=60)
    cm.resource.close()  # closed behind the manager's back
    pool.put(cm)
    return seen


def test_queuepool_scenario_counter_ends_at_exactly_1000(postgres_dsn: str,
                                                         counter_table: str) -> None:
    app = unique("mppool_qp")
    pool = serializable_pool(postgres_dsn, app, 20)
    pool.startRecycler(5)
    with mpp.ThreadPool(2) as tpool:
        results = tpool.starmap(increment_task, [(pool, counter_table, 10)] * 100)
    values = sorted(v for r in results for v in r)
    assert values == list(range(1, 1001))  # every increment seen once: none lost, none twice
    with admin(postgres_dsn) as adm:
        assert scalar(adm, f"select x from {counter_table}") == 1000
        # LIFO keeps about as many open as threads, and each task's last step closed one
        assert count_app(adm, app) <= 2
        assert pool.free() == 20 and pool.waiting() == 0
        pool.close()
        wait_until(lambda: count_app(adm, app) == 0, what="the pool's connections closed")


def test_put_rolls_back_and_closes_what_is_broken(postgres_dsn: str, counter_table: str) -> None:
    app = unique("mppool_qp")
    pool = Pool("repair", 1)
    cm = ConnectionManager("r", autocommit=False, dsn=postgres_dsn, application_name=app)
    pool.put(cm)
    with pool.take() as got:
        with got.resource.cursor() as c:
            c.execute(f"update {counter_table} set x = 42")  # left uncommitted
        assert got.resource.info.transaction_status == pg_ext.TRANSACTION_STATUS_INTRANS
    assert cm.resource.info.transaction_status == pg_ext.TRANSACTION_STATUS_IDLE
    with admin(postgres_dsn) as adm:
        assert scalar(adm, f"select x from {counter_table}") == 0  # rolled back
    with pool.take() as got:
        conn = got.resource
        with conn.cursor() as c:
            try:
                c.execute("select 1/0")
            except psycopg2.DataError:
                pass
        assert conn.info.transaction_status == pg_ext.TRANSACTION_STATUS_INERROR
    assert cm._isOpen and conn.info.transaction_status == pg_ext.TRANSACTION_STATUS_IDLE
    got = pool.take()
    first = got.resource
    first.close()
    pool.put(got)
    assert not cm._isOpen and cm.resource is None  # noticed, and closed
    got = pool.take()
    assert got.resource is not first and scalar(got.resource, "select 1") == 1  # reopened
    pool.put(got)
    pool.close()


def test_session_settings_are_applied(postgres_dsn: str) -> None:
    pool = Pool("settings", 1)
    pool.put(ConnectionManager("s", pg_ext.ISOLATION_LEVEL_REPEATABLE_READ, True, None, None,
                               postgres_dsn))
    with pool.take() as cm:
        assert scalar(cm.resource, "show transaction_isolation") == "repeatable read"
        assert scalar(cm.resource, "show transaction_read_only") == "on"
    auto = Pool("auto", 1)
    auto.put(ConnectionManager("a", autocommit=True, dsn=postgres_dsn))
    with auto.take() as cm:
        assert cm.resource.autocommit is True
    pool.close()
    auto.close()


def test_extended_query_helpers(postgres_dsn: str, counter_table: str) -> None:
    pool = Pool("ext", 1)
    pool.put(ConnectionManagerExtended("e", autocommit=True, dsn=postgres_dsn))
    with pool.take() as cm:
        assert isinstance(cm, ConnectionManagerExtended)
        cm.qexec(f"update {counter_table} set x = %s", (7,))
        assert cm.query(f"select x, x + 1 as y from {counter_table}") == [{"x": 7, "y": 8}]
        rows, desc = cm.querys("select 1 as a, 'b' as b")
        assert rows == [(1, "b")] and [d[0] for d in desc] == ["a", "b"]
        assert cm.query1("select 1 as one") == {"one": 1}
        assert cm.query1("select 1 as n union all select 2") is None  # not exactly one row
        assert cm.query1("select 1 where false") is None
        now_ms = cm.query1(f"select {cm.now_expr()} as t, {cm.now_expr(60)} as later")
        assert now_ms is not None and now_ms["later"] - now_ms["t"] == 60000
        assert abs(now_ms["t"] / 1000 - time.time()) < 60
    pool.close()


def test_take_timeout_with_real_connections(postgres_dsn: str) -> None:
    pool = Pool("timeout", 1)
    pool.put(ConnectionManager("t", dsn=postgres_dsn))
    with pool.take(), pytest.raises(TimeOut, match="timeout after"):
        pool.take(timeout=0.1)
    pool.close()


# ---------------------------------------------------------------- 4 processes, one budget


def budget_worker(budget: Any, dsn: str, table: str, app: str, tasks: int, errors: Any) -> None:
    try:
        pool = serializable_pool(dsn, app, 4, budget=budget)
        with mpp.ThreadPool(2) as tpool:
            tpool.starmap(increment_task, [(pool, table, 3)] * tasks)
        pool.close()
    except BaseException as e:
        errors.put(repr(e))
        raise


def test_four_processes_stay_under_the_budget(server: Any, client: Any, procs: list[Any],
                                              postgres_dsn: str, counter_table: str) -> None:
    nprocs, cap, tasks = 4, 3, 8
    app = unique("mppool_qp")
    budget = client.token_pool(f"qp-{app}", cap)
    ctx = fork_ctx()
    errors = ctx.Queue()
    for _ in range(nprocs):
        p = ctx.Process(target=budget_worker,
                        args=(budget, postgres_dsn, counter_table, app, tasks, errors))
        procs.append(p)
        p.start()
    peak = 0
    with admin(postgres_dsn) as adm:
        deadline = time.monotonic() + SAMPLING_DEADLINE
        while any(p.is_alive() for p in procs):
            n = count_app(adm, app)
            peak = max(peak, n)
            assert n <= cap, f"{n} connections of {app} open, budget {cap}"
            assert time.monotonic() < deadline, "the worker processes did not finish in time"
            time.sleep(0.001)  # the sampler's period, not a wait for a result
        for p in procs:
            p.join(10)
        failures = []
        while not errors.empty():
            failures.append(errors.get_nowait())
        assert not failures, failures
        assert [p.exitcode for p in procs] == [0] * nprocs
        # every increment of every process, under retries: none lost, none twice
        assert scalar(adm, f"select x from {counter_table}") == nprocs * tasks * 3
        wait_until(lambda: count_app(adm, app) == 0, what="every connection closed")
    wait_until(lambda: budget.free() == cap, what="every budget token back")
    assert peak >= 1


# ---------------------------------------------------------------- an outage


OUTAGE_RECONNECT_TIMEOUT = 2.0


def ping(conn: Any) -> bool:
    """``check=``: a round trip on an autocommit connection (nothing left open)."""
    with conn.cursor() as c:
        c.execute("select 1")
        return bool(c.fetchone() == (1,))


def test_outage_fails_fast_backs_off_tells_once_and_recovers(postgres_dsn: str) -> None:
    """test_db_outage's scenario for queuepool: a private role's backends are terminated and
    its CONNECTION LIMIT set to 0. The dead open managers fail ``check`` and are closed, never
    handed out; takes fail fast with the server's error; open() attempts back off (1 s, then
    doubling); ``reconnect_failed`` is called once, ``reconnect_timeout`` after the first
    failure; once the limit is lifted, takes are served again with nothing reset by hand.
    Run with ``-s`` to see the timeline."""
    tl = Timeline()
    attempts: list[float] = []  # when each open() was tried (test clock)
    told: list[float] = []

    class Timed(ConnectionManager):
        def open(self) -> None:
            attempts.append(tl.now())
            super().open()

    def reconnect_failed(pool: Pool) -> None:
        told.append(tl.note("reconnect_failed(pool) called"))

    app = unique("mppool_qp")
    with pg_admin(postgres_dsn) as adm, private_role(adm) as role:
        dsn = make_conninfo(postgres_dsn, user=role, connect_timeout=5, application_name=app)
        pool = Pool("outage", 2, maxIdleTime=600, maxOpenTime=600, check=ping,
                    reconnect_timeout=OUTAGE_RECONNECT_TIMEOUT, reconnect_failed=reconnect_failed)
        for i in range(2):
            pool.put(Timed(f"o{i}", autocommit=True, dsn=dsn))
        try:
            with pool.take(timeout=10) as a, pool.take(timeout=10) as b:
                assert scalar(a.resource, "select current_user") == role
                assert scalar(b.resource, "select 1") == 1
            wait_until(lambda: len(role_backends(adm, role)) == 2, timeout=10,
                       what="both managers open as the role")
            tl.note(f"pool up: 2 connections as role {role}")
            assert pool.stats()["outage"] is None

            cut_off(adm, role)
            start = tl.note("outage: CONNECTION LIMIT 0, every pooled backend terminated")
            before = len(attempts)

            for _ in range(2):  # each dead open manager: check fails, reopening it fails
                with pytest.raises(psycopg2.OperationalError,
                                   match="too many connections for role"):
                    pool.take(timeout=10)
            first_fail = tl.note("takes #1 and #2 raised OperationalError "
                                 "(too many connections for role)")
            assert first_fail - start < 5.0, "the takes did not fail fast"
            s = pool.stats()
            assert s["connections_lost"] == 2, s  # both dead connections caught by check
            assert s["outage"] is not None and "too many connections" in s["outage"]["error"]

            # Takes keep failing fast while the pool backs off, until reconnect_failed.
            outage_attempts = fail_fast_until_told(
                tl, lambda: pool.take(timeout=10), psycopg2.OperationalError, attempts, before,
                told, first_fail, OUTAGE_RECONNECT_TIMEOUT, "take", "open()")
            assert pool.stats()["outage"]["attempts"] == len(outage_attempts)

            # The limit is lifted: takes are served again once the next attempt is due.
            adm.execute(f'alter role "{role}" connection limit -1')
            lifted = tl.note("CONNECTION LIMIT -1")
            served: list[str] = []

            def take_served() -> bool:
                try:
                    with pool.take(timeout=10) as cm:
                        served.append(scalar(cm.resource, "select current_user"))
                except psycopg2.OperationalError:
                    pass
                return bool(served)

            wait_until(take_served, timeout=15, interval=0.02, what="a take served again")
            back = tl.note("service resumed: a take served")
            assert back - lifted < 10.0  # the next backoff step (4 s, +-10%) after give-up
            for t in attempts[before + len(outage_attempts):]:
                tl.note("open() attempt", t)
            assert served == [role] and len(told) == 1
            assert pool.stats()["outage"] is None
            popped = pool.pop_stats()
            tl.note(f"pop_stats: {popped}")
            assert popped["connections_lost"] == 2 and popped["connections_errors"] >= 2
        finally:
            pool.close()
            print(f"\noutage timeline (seconds from the test's start), attempts at "
                  f"{[round(x, 2) for x in attempts]}:\n{tl.show()}")
