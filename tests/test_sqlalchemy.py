"""The recipe of docs/sqlalchemy.md: SQLAlchemy engines whose connections, across all
processes, are capped by one shared budget.

The recipe is repeated here as written in the document (plus type hints); keep the two in step.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy
from helpers import Runner, wait_until
from sqlalchemy.pool import NullPool
from test_db_postgres import hammer_under_budget, unique
from workers import hammer_threads

from mppool.db_pool import RawConnectionPool

# ------------------------------------------------------------------ the recipe (docs/sqlalchemy.md)


class ReturnsToPool:
    """Mixed into a driver's connection class: while SQLAlchemy holds the connection, its
    close() gives it back to the pool; otherwise (the pool closing it) it really closes."""

    def close(self) -> None:
        pool = self.__dict__.pop("_mppool_pool", None)
        if pool is None:
            super().close()  # type: ignore[misc]
        else:
            pool.put(self)


class PGConnection(ReturnsToPool, psycopg.Connection):
    def add_notice_handler(self, callback: Any) -> None:
        # SQLAlchemy takes each checkout for a new connection and adds its handler each time.
        handlers = self.__dict__.setdefault("_mppool_notice_handlers", set())
        if callback not in handlers:
            handlers.add(callback)
            super().add_notice_handler(callback)


def engine_on(pool: RawConnectionPool, url: str, **engine_options: Any) -> sqlalchemy.Engine:
    """An engine that borrows its connections from ``pool`` and returns them there."""

    def creator() -> Any:
        conn = pool.get()._base  # the driver's connection, inside the pool's wrapper
        conn._mppool_pool = pool
        return conn

    return sqlalchemy.create_engine(url, creator=creator, poolclass=NullPool, **engine_options)


# ------------------------------------------------------------------ sqlite: no server needed


class CountingSqlite(ReturnsToPool, sqlite3.Connection):
    """sqlite3 connections that count how many are open at once in this process."""

    lock = threading.Lock()
    live = 0
    peak = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        with CountingSqlite.lock:
            CountingSqlite.live += 1
            CountingSqlite.peak = max(CountingSqlite.peak, CountingSqlite.live)

    def close(self) -> None:
        really = "_mppool_pool" not in self.__dict__
        super().close()
        if really:
            with CountingSqlite.lock:
                CountingSqlite.live -= 1


def test_sqlite_engines_share_a_budget(client: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "sa.db")
    setup = sqlite3.connect(path)
    setup.execute("create table items (n integer)")
    setup.commit()
    setup.close()
    budget = client.token_pool("sa-sqlite", 2)
    CountingSqlite.live = CountingSqlite.peak = 0
    # Two pools stand for two processes: each could hold 3 connections, together only 2.
    pools = [RawConnectionPool(sqlite3, max_size=3, budget=budget, database=path,
                               factory=CountingSqlite, check_same_thread=False)
             for _ in range(2)]
    engines = [engine_on(pool, "sqlite://") for pool in pools]
    runner = Runner()

    def work(engine: sqlalchemy.Engine, base: int) -> None:
        for i in range(25):
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text("insert into items (n) values (:n)"), {"n": base + i})
                conn.execute(sqlalchemy.text("select count(*) from items")).scalar_one()

    boxes = [runner.start(functools.partial(work, engine, k * 100))
             for k, engine in enumerate(engines * 3)]
    runner.join_all(60)
    assert all("error" not in box for box in boxes), [box.get("error") for box in boxes]
    with engines[0].connect() as conn:
        assert conn.execute(sqlalchemy.text("select count(*) from items")).scalar_one() == 150
    assert CountingSqlite.peak <= 2, CountingSqlite.peak
    assert sum(pool.stats()["ncreated"] for pool in pools) >= 1
    for engine in engines:
        engine.dispose()
    for pool in pools:
        pool.shutdown()
    assert CountingSqlite.live == 0
    wait_until(lambda: budget.free() == 2, what="every token back")


class SqliteConnection(ReturnsToPool, sqlite3.Connection):
    pass


def test_sqlite_engine_gives_invalidated_connections_back(tmp_path: Path) -> None:
    pool = RawConnectionPool(sqlite3, max_size=1, database=str(tmp_path / "x.db"),
                             factory=SqliteConnection, check_same_thread=False)
    engine = engine_on(pool, "sqlite://")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("select 1"))
        conn.invalidate()  # SQLAlchemy "closes" it: back to the pool, rolled back, kept
    assert pool.current_size == 1
    with engine.connect() as conn:
        dbapi_conn = conn.connection.dbapi_connection
        sqlite3.Connection.close(dbapi_conn)  # type: ignore[arg-type]  # it broke underneath
        conn.invalidate()  # back to the pool, whose rollback fails: closed, not kept
    assert pool.current_size == 0
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("select 1")).scalar_one() == 1
    engine.dispose()
    pool.shutdown()


# ------------------------------------------------------------------ PostgreSQL: several processes

NPROCS = 4
CAP = 2


def sa_hammer(budget: Any, dsn: str, app: str, n: int, nthreads: int, errors: Any) -> None:
    """A process with its own engine on its own pool, all pools drawing on one budget."""
    try:
        pool = RawConnectionPool(PGConnection, max_size=2, budget=budget, conninfo=dsn,
                                 application_name=app)
        engine = engine_on(pool, "postgresql+psycopg://")

        def step() -> None:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("select pg_sleep(0.005)"))

        hammer_threads(step, n, nthreads, errors)
        engine.dispose()
        pool.shutdown()
    except BaseException as exc:
        errors.put(f"{os.getpid()}: {exc!r}")


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_engines_in_many_processes_stay_under_the_budget(
        client: Any, procs: list[Any], postgres_dsn: str, record_property: Any) -> None:
    peak = hammer_under_budget(client, procs, postgres_dsn, sa_hammer, 30, "mppool_sa",
                               "SQLAlchemy engines")
    record_property("pg_peak", peak)
    assert peak >= 1


@pytest.mark.postgres
def test_postgres_engine_reuses_connections_and_adds_one_notice_handler(postgres_dsn: str) -> None:
    app = unique("mppool_sa")
    pool = RawConnectionPool(PGConnection, max_size=1, conninfo=postgres_dsn, application_name=app)
    engine = engine_on(pool, "postgresql+psycopg://")
    pids = set()
    for _ in range(5):
        with engine.connect() as conn:
            pids.add(conn.execute(sqlalchemy.text("select pg_backend_pid()")).scalar_one())
            conn.execute(sqlalchemy.text("create temp table t (x int)"))  # rolled back at return
    assert len(pids) == 1 and pool.stats()["ncreated"] == 1
    with pool.item() as conn:
        assert len(conn._base._notice_handlers) == 1
    engine.dispose()
    pool.shutdown()
