"""mppool.db_pool against a real MariaDB, through PyMySQL (a MySQLdb-compatible driver):
eventlet's db_pool is used with MySQL as much as with PostgreSQL.

Each test works in a scratch database of its own, so the server's process list tells which
connections are the test's (``information_schema.processlist.db``), and parallel test
workers never collide. Both pools are checked: RawConnectionPool (connections here) and
TpooledConnectionPool (connections in the supervisor, used through proxies).
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import Runner, fork_ctx, wait_until

import mppool
from mppool.db_pool import RawConnectionPool, TpooledConnectionPool

try:
    import pymysql
except ImportError:  # the mysql fixtures then skip, or fail under MPPOOL_REQUIRE_SERVICES=1
    pymysql = None

pytestmark = [pytest.mark.mysql, pytest.mark.slow]


class Scratch:
    """A database of the test's own, and an admin connection outside every pool."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.name = f"mppool_{uuid.uuid4().hex[:12]}"
        self.admin = pymysql.connect(**kwargs, autocommit=True, connect_timeout=5)
        self.lock = threading.Lock()  # one PyMySQL connection is not for two threads at once
        self.run("set session lock_wait_timeout = 10")  # a DROP must never hang on a lock
        self.run(f"create database {self.name}")
        self.kwargs = {**kwargs, "database": self.name, "connect_timeout": 5}

    def run(self, sql: str, *args: Any) -> Any:
        with self.lock, self.admin.cursor() as cur:
            cur.execute(sql, args or None)
            return cur.fetchall()

    def connections(self) -> int:
        return int(self.run("select count(*) from information_schema.processlist "
                            "where db = %s and id <> connection_id()", self.name)[0][0])

    def drop(self) -> None:
        self.run(f"drop database if exists {self.name}")


@pytest.fixture
def scratch(mysql_kwargs: dict[str, Any]) -> Iterator[Scratch]:
    db = Scratch(mysql_kwargs)
    db.run(f"create table {db.name}.items (x int) engine=InnoDB")
    try:
        yield db
    finally:
        try:
            db.drop()
        finally:
            db.admin.close()


def make_pool(kind: str, request: pytest.FixtureRequest, db: Scratch, **kwargs: Any) -> Any:
    if kind == "raw":
        return RawConnectionPool(pymysql, **kwargs, **db.kwargs)
    return TpooledConnectionPool("pymysql", client=request.getfixturevalue("client"), **kwargs,
                                 **db.kwargs)


KINDS = pytest.mark.parametrize("kind", ["raw", "tpooled"])


@KINDS
def test_queries_errors_and_the_rollback_at_put(kind: str, request: pytest.FixtureRequest,
                                                scratch: Scratch) -> None:
    pool = make_pool(kind, request, scratch, max_size=1)
    try:
        conn = pool.get()
        cur = conn.cursor()
        cur.execute("select 1")
        assert cur.fetchall() == ((1,),)
        with pytest.raises(pymysql.err.ProgrammingError):  # the driver's own class
            cur.execute("garbage blah blah")
        for i in range(5):
            cur.execute("insert into items values (%s)", (i,))  # not committed
        pool.put(conn)  # rolled back
        with pool.item(timeout=10) as conn:
            cur = conn.cursor()
            cur.execute("select count(*) from items")
            assert cur.fetchone() == (0,)
            cur.execute("insert into items values (42)")
            conn.commit()
        assert scratch.run(f"select x from {scratch.name}.items") == ((42,),)
    finally:
        pool.shutdown()


@KINDS
def test_max_size_holds_on_the_server(kind: str, request: pytest.FixtureRequest,
                                      scratch: Scratch) -> None:
    pool = make_pool(kind, request, scratch, max_size=2)
    seen: list[int] = []
    lock = threading.Lock()

    def step() -> None:
        with pool.item(timeout=30) as conn:
            cur = conn.cursor()
            cur.execute("select connection_id()")
            with lock:
                seen.append(cur.fetchone()[0])
            assert scratch.connections() <= 2

    runner = Runner()
    boxes = [runner.start(lambda: [step() for _ in range(10)]) for _ in range(4)]
    runner.join_all(60)
    assert all("error" not in b for b in boxes), [b.get("error") for b in boxes]
    assert len(seen) == 40 and len(set(seen)) <= 2  # 40 uses, at most 2 connections
    assert scratch.connections() <= 2
    with pytest.raises(mppool.TimeOut):
        a, b = pool.get(), pool.get()
        try:
            pool.get(timeout=0)
        finally:
            a.close()
            b.close()
    pool.shutdown()
    wait_until(lambda: scratch.connections() == 0, timeout=10, what="connections closed")


@KINDS
def test_clear_closes_the_idle_connections(kind: str, request: pytest.FixtureRequest,
                                           scratch: Scratch) -> None:
    pool = make_pool(kind, request, scratch, max_size=2, min_size=1)
    try:
        with pool.item(timeout=10) as conn:
            conn.ping()
        wait_until(lambda: scratch.connections() == 1, timeout=10, what="one idle connection")
        pool.clear()
        wait_until(lambda: scratch.connections() == 0, timeout=10, what="the idle one closed")
        with pool.item(timeout=10) as conn:  # the pool still works
            conn.ping()
    finally:
        pool.shutdown()


def test_pools_dropped_leave_no_connection(request: pytest.FixtureRequest,
                                           scratch: Scratch) -> None:
    raw = make_pool("raw", request, scratch, max_size=2)
    private = make_pool("tpooled", request, scratch, max_size=2)
    shared = [make_pool("tpooled", request, scratch, max_size=1, share="mysql-test")
              for _ in range(2)]
    for pool in (raw, private, *shared):
        with pool.item(timeout=10) as conn:
            conn.cursor().execute("select count(*) from items")
    assert scratch.connections() == 3  # one each; the two shared objects share one
    del raw, private
    gc.collect()
    for pool in shared:
        pool.close()
    wait_until(lambda: scratch.connections() == 0, timeout=15,
               what="every connection closed once its pool was gone")
    scratch.drop()


def _insert_then_hang(pool: Any, ready: Any) -> None:
    conn = pool.get()
    cur = conn.cursor()
    cur.execute("insert into items values (7)")  # never committed
    cur.execute("select connection_id()")
    ready.put(cur.fetchone()[0])
    signal.pause()


def test_tpooled_connection_of_a_killed_process_is_rolled_back(
        request: pytest.FixtureRequest, scratch: Scratch, procs: list[Any]) -> None:
    pool = make_pool("tpooled", request, scratch, max_size=1)
    try:
        ctx = fork_ctx()
        ready = ctx.Queue()
        p = ctx.Process(target=_insert_then_hang, args=(pool, ready))
        procs.append(p)
        p.start()
        conn_id = ready.get(timeout=20)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        with pool.item(timeout=15) as conn:
            cur = conn.cursor()
            cur.execute("select connection_id()")
            assert cur.fetchone()[0] == conn_id  # the same connection, reused
            cur.execute("select count(*) from items")
            assert cur.fetchone() == (0,)  # rolled back
    finally:
        pool.shutdown()


def test_tpooled_cursor_execute_returns_the_row_count_as_pymysql(request: pytest.FixtureRequest,
                                                               scratch: Scratch) -> None:
    """A shared connection's cursor is made by its first execute, whose result is the
    driver's: PyMySQL (as MySQLdb) returns the number of rows."""
    pool = make_pool("tpooled", request, scratch, max_size=1)
    try:
        with pool.item(timeout=10) as conn:
            cur = conn.cursor()
            assert cur.execute(f"insert into {scratch.name}.items values (1), (2), (3)") == 3
            assert conn.cursor().execute(f"select x from {scratch.name}.items") == 3
            cur.close()
            with pytest.raises(pymysql.err.ProgrammingError):  # PyMySQL's closed-cursor error
                cur.execute("select 1")
    finally:
        pool.shutdown()
