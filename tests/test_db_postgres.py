"""mppool.db_pool against a real PostgreSQL: what the server sees.

The bound is checked where it matters, in ``pg_stat_activity``: each test tags its
connections with a unique ``application_name`` and a sampler in the test process counts them
while worker processes hammer the pool. Tables get unique names, so parallel test workers
never collide, and are dropped at the end.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psycopg
import pytest
from helpers import fork_ctx, wait_until
from outage_kit import admin, unique
from workers import pg_insert_then_hang, pg_raw_hammer, pg_tpooled_hammer

from mppool.db_pool import RawConnectionPool, TpooledConnectionPool

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

NPROCS = 4
CAP = 2
SAMPLING_DEADLINE = 90.0




def count_app(adm: psycopg.Connection[Any], app: str) -> int:
    row = adm.execute("select count(*) from pg_stat_activity where application_name = %s",
                      (app,)).fetchone()
    assert row is not None
    return int(row[0])


def backend_state(adm: psycopg.Connection[Any], pid: int) -> str | None:
    row = adm.execute("select state from pg_stat_activity where pid = %s", (pid,)).fetchone()
    return None if row is None else str(row[0])


def sample_peak(adm: psycopg.Connection[Any], app: str, procs: list[Any], cap: int) -> int:
    """Count the app's connections until every process ended; fail at once above ``cap``."""
    peak = 0
    deadline = time.monotonic() + SAMPLING_DEADLINE
    while any(p.is_alive() for p in procs):
        n = count_app(adm, app)
        peak = max(peak, n)
        assert n <= cap, f"{n} connections of {app} in pg_stat_activity, cap {cap}"
        assert time.monotonic() < deadline, "the worker processes did not finish in time"
        time.sleep(0.001)  # the sampler's period, not a wait for a result
    return peak


def join_ok(procs: list[Any], errors: Any) -> None:
    for p in procs:
        p.join(10)
    failures = []
    while not errors.empty():
        failures.append(errors.get_nowait())
    assert not failures, failures
    assert [p.exitcode for p in procs] == [0] * len(procs)


def hammer_under_budget(client: Any, procs: list[Any], dsn: str, hammer: Any, n: int,
                        prefix: str, label: str) -> int:
    """NPROCS processes run ``hammer`` on a budget of CAP while pg_stat_activity is sampled
    (sample_peak fails the test above CAP); returns the peak, once every connection closed
    and every token came back."""
    app = unique(prefix)
    budget = client.token_pool(f"pg-{app}", CAP)
    ctx = fork_ctx()
    errors = ctx.Queue()
    for _ in range(NPROCS):
        p = ctx.Process(target=hammer, args=(budget, dsn, app, n, 2, errors))
        procs.append(p)
        p.start()
    with admin(dsn) as adm:
        peak = sample_peak(adm, app, procs, CAP)
        join_ok(procs, errors)
        wait_until(lambda: count_app(adm, app) == 0, timeout=10,
                   what="every connection closed once the processes ended")
    wait_until(lambda: budget.free() == CAP, what="every budget token back")
    print(f"{label} on a budget of {CAP}: peak {peak} connections in pg_stat_activity")
    return peak


def test_raw_pools_on_a_budget_stay_under_it(server: Any, client: Any, procs: list[Any],
                                             postgres_dsn: str,
                                             record_property: Any) -> None:
    peak = hammer_under_budget(client, procs, postgres_dsn, pg_raw_hammer, 40, "mppool",
                               "raw pools")
    record_property("pg_peak", peak)
    assert peak >= 1


def test_tpooled_pool_stays_under_max_size(server: Any, client: Any, procs: list[Any],
                                           postgres_dsn: str, record_property: Any) -> None:
    app = unique("mppool")
    # Created here first, so that its sizes are the ones every process attaches to (by
    # its share name: each worker builds its own pool object).
    pool = TpooledConnectionPool(psycopg, max_size=CAP, client=client, conninfo=postgres_dsn,
                                 application_name=app, share=app)
    ctx = fork_ctx()
    errors = ctx.Queue()
    try:
        for _ in range(NPROCS):
            p = ctx.Process(target=pg_tpooled_hammer,
                            args=(server.address, server.authkey, postgres_dsn, app, 40, 2, errors))
            procs.append(p)
            p.start()
        with admin(postgres_dsn) as adm:
            peak = sample_peak(adm, app, procs, CAP)
            join_ok(procs, errors)
            assert pool.stats()["ncreated"] <= CAP
            pool.shutdown()
            wait_until(lambda: count_app(adm, app) == 0, timeout=10,
                       what="the shared connections closed at shutdown")
    finally:
        pool.shutdown()
    record_property("pg_peak", peak)
    print(f"tpooled pool of max_size {CAP}: peak {peak} connections in pg_stat_activity")
    assert peak >= 1


def test_tpooled_connection_of_a_killed_process_is_rolled_back_and_reused(
        client: Any, procs: list[Any], postgres_dsn: str) -> None:
    app = unique("mppool")
    table = unique("mppool_kill")
    with admin(postgres_dsn) as adm:
        adm.execute(f"create table {table} (x int)")
        pool = TpooledConnectionPool(psycopg, max_size=1, client=client, conninfo=postgres_dsn,
                                     application_name=app)
        try:
            ctx = fork_ctx()
            ready = ctx.Queue()
            p = ctx.Process(target=pg_insert_then_hang, args=(pool, table, ready))
            procs.append(p)
            p.start()
            pid = ready.get(timeout=20)
            assert backend_state(adm, pid) == "idle in transaction"
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
            wait_until(lambda: backend_state(adm, pid) == "idle", timeout=10,
                       what="the supervisor rolled the dead holder's transaction back")
            with pool.item(timeout=10) as conn:
                assert conn.execute("select pg_backend_pid()").fetchone()[0] == pid  # reused
                assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)
            row = adm.execute(f"select count(*) from {table}").fetchone()
            assert row == (0,)
            assert pool.stats()["ncreated"] == 1
        finally:
            pool.shutdown()  # closes the connection first, so that the drop cannot wait on it
            adm.execute(f"drop table if exists {table}")


@pytest.mark.parametrize("kind", ["raw", "tpooled"])
def test_terminated_connection_is_replaced(kind: str, request: pytest.FixtureRequest,
                                           postgres_dsn: str) -> None:
    app = unique("mppool")
    pool: Any
    if kind == "raw":
        pool = RawConnectionPool(psycopg, max_size=1, conninfo=postgres_dsn, application_name=app)
    else:
        pool = TpooledConnectionPool(psycopg, max_size=1, client=request.getfixturevalue("client"),
                                     conninfo=postgres_dsn, application_name=app)
    try:
        with admin(postgres_dsn) as adm:
            with pool.item(timeout=10) as conn:
                pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            adm.execute("select pg_terminate_backend(%s)", (pid,))
            wait_until(lambda: backend_state(adm, pid) is None, timeout=10,
                       what="the idle pooled connection terminated by the server")
            conn = pool.get(timeout=10)  # the dead one: nothing could tell while it was idle
            with pytest.raises((psycopg.OperationalError, RuntimeError)):
                conn.execute("select 1")
            conn.close()  # its rollback fails: the pool closes it instead of keeping it
            with pool.item(timeout=10) as conn:
                new_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
                assert conn.execute("select 1").fetchone() == (1,)
            assert new_pid != pid
            assert count_app(adm, app) == 1
            if kind == "raw":
                s = pool.stats()
                assert s["ncreated"] == 2 and s["ndestroys"] == 1
    finally:
        pool.shutdown()


@pytest.mark.parametrize("kind", ["raw", "tpooled"])
def test_psycopg2_works_too(kind: str, request: pytest.FixtureRequest, postgres_dsn: str) -> None:
    """eventlet's TestPsycopg2Base, through either pool."""
    import psycopg2
    import psycopg2.extensions

    app = unique("mppool")
    pool: Any
    if kind == "raw":
        pool = RawConnectionPool(psycopg2, max_size=1, dsn=postgres_dsn, application_name=app)
    else:
        pool = TpooledConnectionPool("psycopg2", max_size=1, client=request.getfixturevalue("client"),
                                     dsn=postgres_dsn, application_name=app)
    try:
        with pool.item(timeout=10) as conn:
            with conn.cursor() as c:  # the cursor works as a context manager
                c.execute("select 1")
                assert c.fetchone() == (1,)
            conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
            assert conn.autocommit is True  # an attribute, forwarded
            conn.autocommit = False
        with pool.item(timeout=10) as conn:
            cur = conn.cursor()
            cur.execute("select current_setting('application_name')")
            assert cur.fetchone() == (app,)
    finally:
        pool.shutdown()


def _dsn_for(dsn: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


def count_db(adm: psycopg.Connection[Any], dbname: str) -> int:
    row = adm.execute("select count(*) from pg_stat_activity where datname = %s",
                      (dbname,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("how", ["clear", "dropped"])
def test_drop_database_after_its_pools(how: str, client: Any, postgres_dsn: str) -> None:
    """PostgreSQL refuses DROP DATABASE while any connection to it exists: every pool kind
    must have closed its connections, the supervisor's ones included, after clear() or once
    the pools are gone (garbage collected, closed by their last user)."""
    import gc

    dbname = unique("mppool_drop")
    with admin(postgres_dsn) as adm:
        adm.execute(f"create database {dbname}")
        try:
            dsn = _dsn_for(postgres_dsn, dbname)
            # min_size > 0 is refilled by housekeeping after a clear(): only when dropped.
            warm = 1 if how == "dropped" else 0
            pools: list[Any] = [
                RawConnectionPool(psycopg, max_size=2, min_size=warm, conninfo=dsn),
                TpooledConnectionPool(psycopg, max_size=2, min_size=warm, client=client,
                                      conninfo=dsn),
                TpooledConnectionPool(psycopg, max_size=1, client=client, conninfo=dsn,
                                      share=dbname),
                TpooledConnectionPool(psycopg, max_size=1, client=client, conninfo=dsn,
                                      share=dbname),
            ]
            for pool in pools:
                with pool.item(timeout=10) as conn:
                    assert conn.execute("select current_database()").fetchone() == (dbname,)
            assert count_db(adm, dbname) >= 3
            with pytest.raises(psycopg.errors.ObjectInUse):
                adm.execute(f"drop database {dbname}")  # the pools' connections hold it
            if how == "clear":
                for pool in pools:
                    pool.clear()
            else:
                pools[2].close()
                pools[3].close()
                pools.clear()
                gc.collect()
            wait_until(lambda: count_db(adm, dbname) == 0, timeout=15,
                       what=f"no connection to the database after {how}")
            adm.execute(f"drop database {dbname}")
        finally:
            for pool in pools:
                pool.shutdown()
            adm.execute(f"drop database if exists {dbname} with (force)")


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_tpooled_cursors_behave_as_the_driver_s(driver: str, client: Any,
                                                postgres_dsn: str) -> None:
    """A shared connection's cursor is made by its first execute (one round trip), yet
    answers as the driver's: what execute() returns, the closed-cursor error, server-side
    (named) cursors, description and rowcount."""
    import importlib

    mod = importlib.import_module(driver)
    kw = {"conninfo": postgres_dsn} if driver == "psycopg" else {"dsn": postgres_dsn}
    pool = TpooledConnectionPool(driver, max_size=1, client=client, **kw)
    try:
        with pool.item(timeout=10) as conn:
            cur = conn.cursor()
            ret = cur.execute("select 1 as one, 'x' as two")
            assert ret is (cur if driver == "psycopg" else None)  # psycopg returns the cursor
            assert [d[0] for d in cur.description] == ["one", "two"] and cur.rowcount == 1
            assert cur.fetchall() == [(1, "x")]
            cur.close()
            with pytest.raises(mod.InterfaceError):
                cur.execute("select 1")
            named = conn.cursor(name=unique("cur"))  # server-side: made at once, as asked
            named.execute("select generate_series(1, 5)")
            assert [r[0] for r in named.fetchmany(2)] == [1, 2]
            named.close()
            with pytest.raises(mod.errors.UndefinedTable):
                conn.cursor().execute("select * from no_such_table_here")
    finally:
        pool.shutdown()
