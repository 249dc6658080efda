"""mppool.db_pool: eventlet's db_pool tests (tests/db_pool_test.py) ported to sqlite3 and
native threads, for RawConnectionPool and TpooledConnectionPool, plus what mppool adds:
connect_timeout in a helper thread, discarding on a failing cleanup, budgets, argument checks.

sqlite3 stands in for a server: a file database (an in-memory one cannot be shared between
connections), opened with ``check_same_thread=False`` because connections are made in a
helper thread and used by other threads (in the supervisor, by its worker threads).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import RawLease, Runner, fork_ctx, wait_until
from workers import (
    DUMMY_CLOSED,
    CursorLogDB,
    DummyConnection,
    DummyDBModule,
    GateDB,
    RaisingDBModule,
    SlowDBModule,
)

import mppool
from mppool import db_pool
from mppool.db_pool import (
    DatabaseConnector,
    PooledConnectionWrapper,
    RawConnectionPool,
    TpooledConnectionPool,
)
from mppool.pools import TokenPool


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    path = str(tmp_path / "test.db")
    conn = sqlite3.connect(path)
    conn.execute("create table gargleblatz (a integer)")
    conn.execute("create table test_table (row_id integer primary key, value_int integer)")
    conn.commit()
    conn.close()
    return path


class Pools:
    """Builds the pools of one test, all of one kind, and shuts them down at the end."""

    def __init__(self, kind: str, db_path: str, client: Any) -> None:
        self.kind = kind
        self.db_path = db_path
        self.client = client
        self.made: list[db_pool.BaseConnectionPool] = []

    def create(self, min_size: int = 0, max_size: int = 1, max_idle: float = 10,
               max_age: float = 10, connect_timeout: float | None = 0.5, module: Any = None,
               **kwargs: Any) -> Any:
        if module is None:
            module = sqlite3
            kwargs = {"database": self.db_path, "check_same_thread": False, **kwargs}
        pool: db_pool.BaseConnectionPool
        if self.kind == "raw":
            pool = RawConnectionPool(module, min_size, max_size, max_idle, max_age,
                                     connect_timeout, **kwargs)
        else:
            pool = TpooledConnectionPool(module, min_size, max_size, max_idle, max_age,
                                         connect_timeout, client=self.client, **kwargs)
        self.made.append(pool)
        return pool

    def shutdown_all(self) -> None:
        for pool in self.made:
            pool.shutdown()


@pytest.fixture(params=["raw", "tpooled"])
def pools(request: pytest.FixtureRequest, db_path: str) -> Iterator[Pools]:
    client = request.getfixturevalue("client") if request.param == "tpooled" else None
    made = Pools(request.param, db_path, client)
    yield made
    made.shutdown_all()


def open_idle(pool: Any) -> int:
    """Idle connections that are open (a shared pool's slot may hold none)."""
    return sum(1 for a in pool.stats()["avail"] if a.get("stats", {}).get("connected", True))


def get_after_backoff(pool: Any) -> Any:
    """A connection, once the backoff that a failed connect started lets the pool try again
    (until then, gets fail fast with the connect's error)."""
    def attempt() -> Any:
        try:
            return pool.get(timeout=5)
        except mppool.ConnectTimeout:
            return None

    return wait_until(attempt, timeout=10, interval=0.05, what="a connect after the backoff")


def settle(pred: Any, what: str) -> None:
    # A shared pool's put() is sent without waiting; the supervisor applies it a moment later.
    wait_until(pred, timeout=5, what=what)


# -------------------------------------------------------------- eventlet's DBConnectionPool tests


def test_connecting_cursor_and_queries(pools: Pools) -> None:
    pool = pools.create()
    conn = pool.get()
    assert conn is not None and isinstance(conn, PooledConnectionWrapper)
    cursor = conn.cursor()
    cursor.execute("select 1")
    assert cursor.fetchall() == [(1,)]
    cursor.close()
    cursor = conn.cursor()
    with pytest.raises(sqlite3.OperationalError):
        cursor.execute("garbage blah blah")
    cursor.close()
    conn.close()


def test_put_none(pools: Pools) -> None:
    pool = pools.create(max_size=1)
    conn = pool.get()
    assert pool.free() == 0
    pool.put(None)  # "we fooled it into thinking that we had a dead process"
    settle(lambda: pool.free() == 1, "the slot given up")
    assert not conn  # its connection was closed with the slot: the wrapper is spent
    conn2 = pool.get(timeout=5)
    assert conn2.cursor
    conn2.cursor().execute("select 1")
    pool.put(conn2)


def test_put_none_gives_up_only_this_threads_connection(pools: Pools,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    pool = pools.create(max_size=2)
    got = threading.Event()
    release = threading.Event()
    runner = Runner()

    def hold() -> None:
        conn = pool.get(timeout=5)
        got.set()
        release.wait(5)
        conn.close()

    runner.start(hold)
    assert got.wait(5)
    mine = pool.get(timeout=5)
    with caplog.at_level(logging.WARNING, logger="mppool"):
        pool.put(None)  # gives up `mine`, never the other thread's connection
        pool.put(None)  # this thread holds nothing any more: ignored
    assert "holds no connection" in caplog.text
    assert not mine
    release.set()
    runner.join_all()
    settle(lambda: pool.free() == 2, "both slots free")


def test_close_does_a_put(pools: Pools) -> None:
    pool = pools.create(max_size=1)
    conn = pool.get()
    assert pool.free() == 0
    conn.close()
    settle(lambda: pool.free() == 1, "close() returned the connection")
    with pytest.raises(AttributeError):
        conn.cursor()


def test_put_doesnt_double_wrap(pools: Pools) -> None:
    pool = pools.create()
    pool.put(pool.get())
    conn = pool.get(timeout=5)
    assert not isinstance(conn._base, PooledConnectionWrapper)
    pool.put(conn)


def test_bool(pools: Pools) -> None:
    pool = pools.create()
    conn = pool.get()
    assert conn
    conn.close()
    assert not conn


def test_connection_is_clean_after_put(pools: Pools) -> None:
    pool = pools.create(max_size=1)
    conn = pool.get()
    curs = conn.cursor()
    for i in range(10):
        curs.execute("insert into test_table (value_int) values (?)", (i,))
    # do not commit :-)
    pool.put(conn)
    conn2 = pool.get(timeout=5)
    curs2 = conn2.cursor()
    for i in range(10):
        curs2.execute("insert into test_table (value_int) values (?)", (i,))
    conn2.commit()
    curs2.execute("select count(*) from test_table")
    assert curs2.fetchone() == (10,)  # inserted only once
    pool.put(conn2)


def test_visibility_from_other_connections(pools: Pools) -> None:
    pool = pools.create(max_size=3)
    conn = pool.get()
    conn2 = pool.get()
    curs = conn.cursor()
    try:
        curs2 = conn2.cursor()
        curs2.execute("insert into gargleblatz (a) values (314159)")
        assert curs2.rowcount == 1
        conn2.commit()
        selection_query = "select * from gargleblatz"
        curs2.execute(selection_query)
        assert curs2.fetchall() == [(314159,)]
        del curs2
        pool.put(conn2)
        conn3 = pool.get(timeout=5)  # it should see the addition
        curs3 = conn3.cursor()
        curs3.execute(selection_query)
        assert curs3.fetchall() == [(314159,)]
        curs.execute(selection_query)  # and so does the already-open connection
        assert curs.fetchall() == [(314159,)]
        pool.put(conn3)
    finally:
        curs.execute("delete from gargleblatz where a=314159")
        conn.commit()
        pool.put(conn)


def test_clear(pools: Pools) -> None:
    pool = pools.create()
    pool.put(pool.get())
    settle(lambda: open_idle(pool) == 1, "the connection idle")
    pool.clear()
    assert open_idle(pool) == 0
    with pool.item(timeout=5) as conn:  # the pool still works: a new connection
        conn.execute("select 1")


def test_clear_warmup(pools: Pools) -> None:
    """Clear implicitly created connections (min_size > 0)."""
    pool = pools.create(min_size=1)
    assert open_idle(pool) == 1
    pool.clear()
    assert open_idle(pool) == 0


@pytest.mark.parametrize("limit", ["max_idle", "max_age"])
def test_zero_limit_closes_at_put(pools: Pools, limit: str) -> None:
    pool = pools.create(max_size=2, **{limit: 0})
    conn = pool.get()
    conn.close()
    settle(lambda: pool.current_size == 0, "the connection closed at its return")


def test_waiters_get_woken(pools: Pools) -> None:
    # A waiter on a full pool is woken when the only connection comes back and is closed.
    pool = pools.create(max_size=1, max_age=0)
    conn = pool.get()
    assert pool.free() == 0 and pool.waiting() == 0
    runner = Runner()
    box = runner.start(lambda: pool.get(timeout=10))
    wait_until(lambda: pool.waiting() == 1, what="the waiter blocked in get()")
    assert pool.free() == 0
    pool.put(conn)
    runner.join_all(10)
    assert "error" not in box, box
    assert pool.free() == 0 and pool.waiting() == 0
    pool.put(box["result"])


def test_raising_create(pools: Pools) -> None:
    # If connect() raises, the pool does not lose a connection slot.
    pool = pools.create(max_size=1, module=RaisingDBModule())
    with pytest.raises(RuntimeError, match="cannot connect"):
        pool.get()
    assert pool.free() == 1


# ---------------------------------------------------------- eventlet's module-level tests (raw)


def test_raw_pool_issue_125() -> None:
    pool = RawConnectionPool(DummyDBModule(), dsn="dbname=test user=jessica port=5433",
                             min_size=3, max_size=5)
    conn = pool.get()
    assert conn._base.kwargs == {"dsn": "dbname=test user=jessica port=5433"}
    pool.put(conn)
    pool.shutdown()


class Recorder:
    def __init__(self, exc: BaseException | None = None) -> None:
        self.calls: list[Any] = []
        self.exc = exc

    def __call__(self, conn: Any) -> None:
        self.calls.append(conn)
        if self.exc is not None:
            raise self.exc


def test_raw_pool_custom_cleanup_ok() -> None:
    cleanup = Recorder()
    pool = RawConnectionPool(DummyDBModule(), cleanup=cleanup)
    conn = pool.get()
    base = conn._base
    pool.put(conn)
    assert cleanup.calls == [base]  # the cleanup gets the driver's connection
    with pool.item():
        pass
    assert len(cleanup.calls) == 2
    assert pool.current_size == 1  # kept: the cleanup succeeded
    pool.shutdown()


def test_raw_pool_custom_cleanup_arg_error() -> None:
    cleanup = Recorder(NotImplementedError())
    pool = RawConnectionPool(DummyDBModule())
    conn = pool.get()
    base = conn._base
    pool.put(conn, cleanup=cleanup)
    assert len(cleanup.calls) == 1
    assert base.closed and pool.current_size == 0  # a failing cleanup discards
    with pool.item(cleanup=cleanup):
        pass
    assert len(cleanup.calls) == 2
    assert pool.current_size == 0 and pool.free() == 4
    pool.shutdown()


def test_raw_pool_custom_cleanup_fatal() -> None:
    state = [0]

    def cleanup(conn: Any) -> None:
        state[0] += 1
        raise KeyboardInterrupt

    pool = RawConnectionPool(DummyDBModule(), cleanup=cleanup)
    conn = pool.get()
    with pytest.raises(KeyboardInterrupt):
        pool.put(conn)
    assert state[0] == 1
    assert pool.current_size == 0 and pool.free() == 4  # discarded, its slot free
    pool.shutdown()


def test_raw_pool_clear_update_current_size() -> None:
    # eventlet issue 139: clear() must update current_size, or no new connection is made.
    pool = RawConnectionPool(DummyDBModule())
    pool.get().close()
    assert pool.current_size == 1
    assert pool.stats()["navail"] == 1
    pool.clear()
    assert pool.current_size == 0
    assert pool.stats()["navail"] == 0
    pool.shutdown()


# ------------------------------------------------------------------------ connect_timeout


def test_connect_timeout_costs_no_slot(pools: Pools, tmp_path: Path) -> None:
    flag = tmp_path / "database-hangs"
    flag.touch()
    pool = pools.create(max_size=1, connect_timeout=0.2, module=SlowDBModule(), flag=str(flag))
    t0 = time.monotonic()
    with pytest.raises(mppool.ConnectTimeout, match=r"connect_timeout=0\.2"):
        pool.get()
    assert time.monotonic() - t0 < 5
    settle(lambda: pool.free() == 1, "the slot free again")
    flag.unlink()  # the database answers again: a get after the backoff (1 s) connects
    conn = get_after_backoff(pool)
    assert conn
    if pools.kind == "raw":
        base = conn._base
        wait_until(lambda: any(c is not base and c.kwargs.get("flag") == str(flag) for c in DUMMY_CLOSED),
                   what="the connection that arrived late closed")
        assert pool.current_size == 1
    conn.close()


def test_waiter_whose_connect_times_out_costs_no_slot(tmp_path: Path) -> None:
    # eventlet's test_db_pool_create_timeout: a waiter that gets the slot of a connection
    # closed at put, and whose connect then hangs, must give the slot back.
    flag = tmp_path / "database-hangs"
    pool = RawConnectionPool(SlowDBModule(), max_size=1, max_age=0, max_idle=60,
                             connect_timeout=0.2, flag=str(flag))
    runner = Runner()
    with pool.item() as conn:
        assert conn
        flag.touch()  # the next connect hangs, as if the database were unreachable
        box = runner.start(lambda: pool.get(timeout=10))
        wait_until(lambda: pool.waiting() == 1, what="the waiter blocked in get()")
    runner.join_all(10)
    assert isinstance(box.get("error"), mppool.ConnectTimeout), box
    assert pool.free() == 1
    flag.unlink()
    conn = get_after_backoff(pool)
    assert conn
    conn.close()
    pool.shutdown()


def test_connect_timeout_none_connects_in_the_calling_thread(db_path: str) -> None:
    pool = RawConnectionPool(sqlite3, connect_timeout=None, database=db_path)
    conn = pool.get()
    conn.execute("select 1")  # check_same_thread=True works: no helper thread was used
    conn.close()
    pool.shutdown()


# ------------------------------------------------------------------------ failing cleanup


def test_failing_cleanup_discards_the_connection(pools: Pools) -> None:
    pool = pools.create(max_size=1)
    conn = pool.get()
    conn.execute("create temp table marker (x int)")  # exists as long as this connection

    def broken(c: Any) -> None:
        raise RuntimeError("the connection is broken")

    pool.put(conn, cleanup=broken)
    settle(lambda: open_idle(pool) == 0, "the connection closed")
    conn = pool.get(timeout=5)
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        conn.execute("select * from marker")  # a new connection
    conn.close()
    s = pool.stats()
    # Both pools discard it in their pool (TpooledConnectionPool: the supervisor closes the
    # slot), so that it counts in returns_bad.
    assert (s["ncreated"], s["ndestroys"], s["returns_bad"]) == (2, 1, 1), s


def test_rollback_of_a_closed_connection_fails_and_discards(db_path: str) -> None:
    pool = RawConnectionPool(sqlite3, max_size=1, database=db_path, check_same_thread=False)
    conn = pool.get()
    conn._base.close()  # the connection died behind the pool's back
    conn.close()  # the default cleanup (rollback) fails: discarded, not kept
    assert pool.current_size == 0
    with pool.item(timeout=5) as conn:
        conn.execute("select 1")
    pool.shutdown()


# ------------------------------------------------------------------------ put() edge cases


def test_put_twice_or_foreign_is_ignored(pools: Pools, caplog: pytest.LogCaptureFixture) -> None:
    pool = pools.create(max_size=2)
    conn = pool.get()
    pool.put(conn)
    with caplog.at_level(logging.WARNING, logger="mppool"):
        pool.put(conn)
        pool.put(object())
    assert caplog.text.count("did not lend or already got back") == 2
    settle(lambda: pool.free() == 2 and pool.current_size == 1, "nothing changed")


def test_put_of_the_driver_connection_returns_it(pools: Pools) -> None:
    pool = pools.create(max_size=1)
    wrapper = pool.get()
    pool.put(wrapper._base)  # the underlying connection is recognised
    assert not wrapper
    settle(lambda: pool.free() == 1, "returned")


# ------------------------------------------------------------------------ wrappers


def test_wrapper_forwards_attributes_and_context_manager(db_path: str) -> None:
    pool = RawConnectionPool(sqlite3, database=db_path, check_same_thread=False)
    conn = pool.get()
    assert conn.isolation_level == ""
    conn.isolation_level = "IMMEDIATE"  # written on the connection, not on the wrapper
    assert conn._base.isolation_level == "IMMEDIATE"
    conn.isolation_level = ""
    with conn as raw:  # eventlet: the driver's __enter__ (sqlite3: commit on success)
        assert raw is conn._base
        raw.execute("insert into gargleblatz values (7)")
    check = sqlite3.connect(db_path)
    assert check.execute("select a from gargleblatz").fetchall() == [(7,)]
    check.close()
    assert "sqlite3.Connection" in repr(conn)
    conn.close()
    assert "returned to its pool" in repr(conn)
    with pytest.raises(AttributeError, match="returned to its pool"):
        conn.execute("select 1")
    pool.shutdown()


def test_generic_wrapper_forwards_everything() -> None:
    base = DummyConnection()
    wrapper = db_pool.GenericConnectionWrapper(base)
    wrapper.rollback()
    wrapper.commit()
    assert base.rollbacks == 1 and wrapper.kwargs == {}
    wrapper.close()  # the generic wrapper really closes
    assert base.closed


# ------------------------------------------------------------------------ limits and budgets


def test_raw_idle_and_old_connections_are_closed() -> None:
    idle = RawConnectionPool(DummyDBModule(), max_size=2, max_idle=0.2, max_age=30)
    old = RawConnectionPool(DummyDBModule(), max_size=2, max_idle=30, max_age=0.3)
    for pool in (idle, old):
        pool.get().close()
        assert pool.current_size == 1
    wait_until(lambda: idle.current_size == 0, what="the idle connection closed")
    wait_until(lambda: old.current_size == 0, what="the old connection closed")
    assert idle.stats()["nrecycled"] == 1 and old.stats()["nexpired"] == 1
    idle.shutdown()
    old.shutdown()


def test_raw_budget_tokens_follow_connections() -> None:
    budget = TokenPool(max_size=1)
    pool = RawConnectionPool(DummyDBModule(), max_size=2, budget=budget)
    conn = pool.get()
    assert budget.free() == 0
    conn.close()
    assert budget.free() == 0  # an idle connection keeps its token
    pool.clear()
    assert budget.free() == 1
    pool.put(pool.get(), cleanup=Recorder(RuntimeError("broken")))
    assert budget.free() == 1  # discarded: its token is back
    pool.get().close()
    other = RawConnectionPool(DummyDBModule(), max_size=2, budget=budget)
    with other.item(timeout=5):  # the idle connection of `pool` is given back for it
        assert pool.current_size == 0
    pool.shutdown()
    other.shutdown()
    assert budget.free() == 1


def test_forgotten_raw_pool_closes_its_connections() -> None:
    budget = TokenPool(max_size=1)
    pool = RawConnectionPool(DummyDBModule(), budget=budget)
    conn = pool.get()
    base = conn._base
    conn.close()
    del pool, conn
    gc.collect()
    assert base.closed  # as eventlet's __del__ does, and the budget token is back
    assert budget.free() == 1


# ------------------------------------------------------------------------ TpooledConnectionPool


def test_tpooled_connection_of_a_killed_process_is_rolled_back(client: Any, db_path: str,
                                                               procs: list[Any]) -> None:
    pool = TpooledConnectionPool(sqlite3, max_size=1, client=client, database=db_path,
                                 check_same_thread=False)
    ctx = fork_ctx()
    ready = ctx.Queue()
    p = ctx.Process(target=_insert_then_hang, args=(pool, ready))
    procs.append(p)
    p.start()
    assert ready.get(timeout=10) == 1  # the child saw its own uncommitted row
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    with pool.item(timeout=10) as conn:
        assert conn.execute("select count(*) from gargleblatz").fetchone() == (0,)
    assert pool.stats()["ncreated"] == 1  # rolled back and reused, not replaced
    pool.shutdown()


def _insert_then_hang(pool: Any, ready: Any) -> None:
    conn = pool.get()
    conn.execute("insert into gargleblatz values (42)")  # no commit
    ready.put(conn.execute("select count(*) from gargleblatz").fetchone()[0])
    while True:
        time.sleep(3600)


def test_tpooled_default_client_autostarts(client: Any, db_path: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def fake_connect(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return client

    monkeypatch.setattr("mppool.client._default", None)
    monkeypatch.setattr("mppool.client.connect", fake_connect)
    a = TpooledConnectionPool(sqlite3, database=db_path, check_same_thread=False)
    b = TpooledConnectionPool(sqlite3, database=db_path, check_same_thread=False)
    assert calls == [{"autostart": True}]  # one client per process, shared
    assert a._client is client and b._client is client
    a.shutdown()


# ------------------------------------------------------------------------ DatabaseConnector


def test_database_connector() -> None:
    credentials = {"default": {"user": "u"}, "h2": {"user": "v", "passwd": "p"}}
    dc = DatabaseConnector(DummyDBModule(), credentials, RawConnectionPool)
    assert dc.credentials_for("h2") == {"user": "v", "passwd": "p"}
    assert dc.credentials_for("h1") == {"user": "u"}
    pool = dc.get("h1", "db1")
    assert dc.get("h1", "db1") is pool and dc.get("h1", "db2") is not pool
    assert isinstance(pool, RawConnectionPool)
    with pool.item() as conn:
        assert conn._base.kwargs == {"db": "db1", "host": "h1", "user": "u"}
    with pytest.raises(ValueError, match="'h3'"):
        DatabaseConnector(DummyDBModule(), {"h1": {}}).get("h3", "db")


def test_connection_pool_is_the_tpooled_one() -> None:
    assert db_pool.ConnectionPool is TpooledConnectionPool
    assert db_pool.ConnectTimeout is mppool.ConnectTimeout
    assert issubclass(RawConnectionPool, db_pool.BaseConnectionPool)


# ------------------------------------------------------------------------ bad arguments

BAD = [
    ({"max_size": 0}, ValueError, "max_size"),
    ({"max_size": "4"}, TypeError, "max_size"),
    ({"min_size": -1}, ValueError, "min_size"),
    ({"min_size": 5, "max_size": 4}, ValueError, "min_size=5"),
    ({"max_idle": -1}, ValueError, "max_idle"),
    ({"max_age": "30"}, TypeError, "max_age"),
    ({"max_age": float("nan")}, ValueError, "max_age"),
    ({"connect_timeout": 0}, ValueError, "connect_timeout"),
    ({"connect_timeout": -1}, ValueError, "connect_timeout"),
    ({"connect_timeout": "5"}, TypeError, "connect_timeout"),
    ({"cleanup": 42}, TypeError, "cleanup"),
]


@pytest.mark.parametrize("cls", [RawConnectionPool, TpooledConnectionPool])
@pytest.mark.parametrize(("kwargs", "exc", "name"), BAD)
def test_bad_arguments(cls: type, kwargs: dict[str, Any], exc: type, name: str,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mppool.client.default_client", _no_client)
    with pytest.raises(exc, match=name) as info:
        cls(DummyDBModule(), **kwargs)
    value = next(iter(kwargs.values()))
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize("cls", [RawConnectionPool, TpooledConnectionPool])
@pytest.mark.parametrize(("module", "exc"), [(42, TypeError), ("", ValueError),
                                             ("not a name", ValueError), (None, TypeError)])
def test_bad_db_module(cls: type, module: Any, exc: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mppool.client.default_client", _no_client)
    with pytest.raises(exc, match=f"db_module.*{module!r}"):
        cls(module)


def test_bad_budget_and_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mppool.client.default_client", _no_client)
    with pytest.raises(TypeError, match=r"budget.*object"):
        RawConnectionPool(DummyDBModule(), budget=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"budget must be None.*TokenPool"):
        TpooledConnectionPool(DummyDBModule(), budget=TokenPool(max_size=1))
    with pytest.raises(TypeError, match=r"client.*'nope'"):
        TpooledConnectionPool(DummyDBModule(), client="nope")  # type: ignore[arg-type]


def test_bad_call_arguments() -> None:
    pool = RawConnectionPool(DummyDBModule(), max_size=1)
    conn = pool.get()
    with pytest.raises(TypeError, match=r"cleanup.*42"):
        pool.put(conn, cleanup=42)  # type: ignore[arg-type]
    assert conn  # nothing happened: still ours
    pool.put(conn)
    with pytest.raises(ValueError, match=r"timeout.*-1"):
        pool.get(timeout=-1)
    with pytest.raises(ValueError, match=r"new_size.*0"):
        pool.resize(0)
    with pytest.raises(TypeError, match=r"credentials.*\[\]"):
        DatabaseConnector(DummyDBModule(), [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"conn_pool.*42"):
        DatabaseConnector(DummyDBModule(), {}, 42)  # type: ignore[arg-type]
    pool.shutdown()


def _no_client() -> Any:
    raise AssertionError("a pool with bad arguments must not connect to a supervisor")


# -------------------------------------------------------------- TpooledConnectionPool's cursors


def cursor_log(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.fixture
def counted_requests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many requests this process sends that wait for a reply (round trips)."""
    from mppool.channel import Channel

    sent: list[int] = []
    original = Channel.request

    def request(self: Channel, *args: Any, **kwargs: Any) -> Any:
        sent.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Channel, "request", request)
    return sent


@pytest.mark.parametrize("returns", ["self", "none", "count"])
def test_tpooled_cursor_is_made_by_its_first_execute_in_one_round_trip(
        client: Any, tmp_path: Path, counted_requests: list[int], returns: str) -> None:
    log = tmp_path / "cursors.log"
    pool = TpooledConnectionPool(CursorLogDB(), client=client, log=str(log), returns=returns)
    conn = pool.get()
    try:
        warm = conn.cursor()
        warm.execute("warm up")  # the proxy learns that _mppool_execute is a method
        cur = conn.cursor()
        before = len(counted_requests)
        assert cursor_log(log) == ["made", "1"]  # this one is not made yet: nothing sent
        ret = cur.execute("select 1")
        assert len(counted_requests) - before == 1  # made and executed in one round trip
        assert cursor_log(log) == ["made", "1", "made", "2"]
        # What execute() returned is the driver's: the cursor itself, None, a count.
        assert ret is cur if returns == "self" else ret == (1 if returns == "count" else None)
        assert cur.fetchone() == ("select 1", None)  # the rest is the real cursor's
        cur.execute("select 2", (7,))  # made already: executes on the same cursor
        assert cur.fetchone() == ("select 2", (7,))
        assert cursor_log(log)[-2:] == ["made", "2"]
    finally:
        pool.put(conn)
        pool.shutdown()


def test_tpooled_cursor_close_waits_for_nothing_and_the_supervisor_closes_it(
        client: Any, tmp_path: Path, counted_requests: list[int]) -> None:
    log = tmp_path / "cursors.log"
    pool = TpooledConnectionPool(CursorLogDB(), client=client, log=str(log))
    conn = pool.get()
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
            before = len(counted_requests)
        assert len(counted_requests) == before  # close() sent nothing that waits
        wait_until(lambda: cursor_log(log) == ["made", "1", "closed", "1"], timeout=5,
                   what="the supervisor closed the dropped cursor")
        assert cur.closed
        with pytest.raises(RuntimeError, match="cursor is closed"):
            cur.execute("select 2")  # no InterfaceError in this module: RuntimeError
        with pytest.raises(RuntimeError, match="cursor is closed"):
            cur.fetchone()
    finally:
        pool.put(conn)
        pool.shutdown()


def test_tpooled_cursor_whose_first_execute_fails_is_closed_and_raises_that_error(
        client: Any, tmp_path: Path) -> None:
    log = tmp_path / "cursors.log"
    pool = TpooledConnectionPool(CursorLogDB(), client=client, log=str(log))
    conn = pool.get()
    try:
        cur = conn.cursor()
        with pytest.raises(ValueError, match="bad query"):
            cur.execute("fail")
        assert cursor_log(log) == ["made", "1", "closed", "1"]  # closed before the reply
        assert cur.execute("select 1") is cur  # the next execute makes a new cursor
        assert cursor_log(log)[-2:] == ["made", "2"]
    finally:
        pool.put(conn)
        pool.shutdown()


def test_tpooled_cursor_on_sqlite_behaves_as_sqlite_s(client: Any, db_path: str) -> None:
    pool = TpooledConnectionPool(sqlite3, client=client, database=db_path,
                                 check_same_thread=False)
    conn = pool.get()
    cur = conn.cursor()
    assert cur.execute("select 1") is cur  # sqlite3's execute returns its cursor
    assert cur.fetchall() == [(1,)] and cur.description[0][0] == "1"
    cur.executemany("insert into gargleblatz (a) values (?)", [(1,), (2,)])
    assert cur.rowcount == 2
    cur.close()
    with pytest.raises(sqlite3.ProgrammingError, match="cursor is closed"):
        cur.fetchone()  # the error sqlite3 raises for a closed cursor
    assert [r for r in conn.cursor().execute("select count(*) from gargleblatz")] == [(2,)]
    pool.put(conn)
    pool.shutdown()


# ------------------------------------------------ TpooledConnectionPool's cursors, attacked


def test_tpooled_connection_returned_while_its_cursor_executes_goes_back_after_it(
        client: Any, tmp_path: Path) -> None:
    """A connection returned (by another thread) while an execute still runs on it in the
    supervisor is lent again only once that execute has ended: the next holder never shares
    it with the old holder's query, and the old holder's cursor is dead by then."""
    log, gate = tmp_path / "cursors.log", tmp_path / "gate"
    pool = TpooledConnectionPool(GateDB(), client=client, max_size=1, log=str(log))
    conn = pool.get()
    cur = conn.cursor()
    runner = Runner()
    res = runner.start(lambda: cur.execute("gate", str(gate)))
    try:
        wait_until(lambda: "waiting" in cursor_log(log), timeout=5, what="the execute to start")
        pool.put(conn)  # returned while its cursor executes in the supervisor
        nxt_box = runner.start(lambda: pool.get(timeout=8))  # the next holder
        wait_until(lambda: pool._pool.stats()["nwaiting"] == 1, timeout=5,
                   what="the next holder waiting for the busy connection")
        assert pool._pool.stats()["nusing"] == 1 and not nxt_box["done"]
        gate.touch()
        wait_until(lambda: nxt_box["done"], timeout=5, what="the next holder served")
        nxt = nxt_box["result"]
        assert cursor_log(log).index("released") >= 0  # the execute ended first
        assert res.get("result") is cur, res  # the old holder's execute finished as usual
        with pytest.raises(Exception):  # noqa: B017 - whatever it is, it must not work
            cur.fetchone()  # but its cursor died with the return
        with nxt.cursor() as mine:
            assert mine.execute("mine").fetchone() == ("mine", None)
        wait_until(lambda: _all_closed(log), timeout=5,
                   what="the old holder's cursor closed in the supervisor")
        pool.put(nxt)
    finally:
        gate.touch()
        runner.join_all(10)
        pool.shutdown()


def _made_and_closed(log: Path) -> tuple[list[str], list[str]]:
    """The cursors the supervisor made, and those it closed, by number."""
    words = cursor_log(log)
    return ([n for w, n in itertools.pairwise(words) if w == "made"],
            [n for w, n in itertools.pairwise(words) if w == "closed"])


def _all_closed(log: Path) -> bool:
    made, closed = _made_and_closed(log)
    return sorted(made) == sorted(set(closed)) and len(closed) == len(set(closed))


def _books_balance(pool: TpooledConnectionPool, size: int) -> bool:
    s = pool._pool.stats()
    return s["nusing"] == 0 and s["navail"] + s["nusing"] <= size and s["nwaiting"] == 0


def test_tpooled_execute_with_hostile_arguments_hurts_only_its_caller(
        client: Any, tmp_path: Path) -> None:
    """_mppool_execute called through the connection's proxy with what no DeferredCursor
    sends: each call fails (or runs) for its caller alone, no cursor is left open, and the
    connection still works."""
    log = tmp_path / "cursors.log"
    pool = TpooledConnectionPool(GateDB(), client=client, max_size=1, log=str(log))
    conn = pool.get()
    base = conn._base  # the proxy of the served connection
    try:
        for cargs, ckwargs, method, exc in [
                ((), {}, "__class__", TypeError),  # a new cursor with no arguments: refused
                ((), {}, 5, TypeError),  # not a name
                ((), {}, "no_such_method", AttributeError),
                ((), {"fail": True}, "execute", RuntimeError),  # the driver's cursor() raises
                ((), {"nope": 1}, "execute", TypeError),  # cursor() of the wrong arity
                (5, {}, "execute", TypeError),  # not a tuple of arguments
                ((), {}, "close", None),  # runs: a proxy of a closed cursor
                ((), {}, "__del__", None)]:
            if exc is None:
                real, (kind, value) = base._mppool_execute(cargs, ckwargs, method, (), {})
                assert (kind, value) == ("value", None)
                assert real.closed is True
                del real
            else:
                with pytest.raises(exc):
                    base._mppool_execute(cargs, ckwargs, method, ("select 1",), {})
        big = "x" * (4 << 20)  # a large query travels and comes back in one piece
        cur = conn.cursor()
        assert cur.execute(big) is cur and cur.fetchone() == (big, None)
        cur.close()
        with conn.cursor() as cur:
            assert cur.execute("select 1", (2,)).fetchone() == ("select 1", (2,))
        gc.collect()
        wait_until(lambda: _all_closed(log), timeout=5, what="every cursor closed there")
    finally:
        pool.put(conn)
    wait_until(lambda: _books_balance(pool, 1), timeout=5, what="the slot back")
    pool.shutdown()


def test_tpooled_execute_refused_after_return_and_from_another_connection(
        client: Any, tmp_path: Path) -> None:
    log = tmp_path / "cursors.log"
    pool = TpooledConnectionPool(GateDB(), client=client, max_size=1, log=str(log))
    conn = pool.get()
    base = conn._base
    lease, pool_id = base._mp_lease, base._mp_pool_id
    raw = RawLease(client)
    try:
        P = raw.P
        call = ((), {}, "execute", ("pwned",), {})
        rid = next(raw.rids)
        raw.send(P.encode_call(rid, pool_id, lease, 0, "_mppool_execute", call, {}))
        reply = raw.reply()
        assert reply.status == P.ERR and isinstance(reply.value.unpack(), mppool.PoolClosed)
        assert cursor_log(log) == []  # nothing ran on the holder's connection
        pool.put(conn)
        with pytest.raises(mppool.PoolClosed):  # the holder itself, after the return
            base._mppool_execute(*call)
        rid = next(raw.rids)  # and the old lease number, from the other connection
        raw.send(P.encode_call(rid, pool_id, lease, 0, "_mppool_execute", call, {}))
        assert raw.reply().status == P.ERR
        assert cursor_log(log) == []
    finally:
        raw.close()
    nxt = pool.get(timeout=5)
    with nxt.cursor() as cur:
        assert cur.execute("mine").fetchone() == ("mine", None)
    pool.put(nxt)
    wait_until(lambda: _books_balance(pool, 1), timeout=5, what="the slot back")
    pool.shutdown()


def test_tpooled_executes_that_hang_block_neither_the_loop_nor_other_pools(
        client: Any, tmp_path: Path) -> None:
    """A client pipelines more hanging executes than its pool has threads: every other pool
    and the lease loop keep answering at once, and everything comes back once they end."""
    from mppool.supervisor.registry import POOL_THREADS

    log, other_log, gate = tmp_path / "cursors.log", tmp_path / "other.log", tmp_path / "gate"
    stuck = TpooledConnectionPool(GateDB(), client=client, max_size=1, log=str(log))
    other = TpooledConnectionPool(GateDB(), client=client, max_size=1, log=str(other_log))
    tokens = client.token_pool("attack-tokens", 1)
    raw = RawLease(client)
    try:
        P = raw.P
        granted = raw.get(stuck._pool._mp_route()[1], timeout=5)
        assert isinstance(granted, P.Granted), granted
        n = POOL_THREADS + 2
        for _ in range(n):
            rid = next(raw.rids)
            raw.send(P.encode_call(rid, stuck._pool._mp_route()[1], granted.lease, 0,
                                   "_mppool_execute", ((), {}, "execute", ("gate", str(gate)),
                                                       {}), {}))
        wait_until(lambda: cursor_log(log).count("waiting") == POOL_THREADS, timeout=5,
                   what="every thread of the pool stuck in execute")
        for _ in range(3):
            t0 = time.monotonic()
            conn = other.get(timeout=2)
            with conn.cursor() as cur:
                assert cur.execute("q").fetchone() == ("q", None)
            other.put(conn)
            tok = tokens.get(timeout=2)
            tokens.ret(tok)
            assert client.stats()["attack-tokens"]["nusing"] <= 1
            assert time.monotonic() - t0 < 1.0
        gate.touch()
        replies = [raw.reply(timeout=10) for _ in range(n)]
        assert all(r.status == P.REF for r in replies), replies
        raw.send(P.encode_put(stuck._pool._mp_route()[1], granted.lease))
        rid = next(raw.rids)
        raw.send(P.encode_ping(rid))
        assert raw.reply().rid == rid
        wait_until(lambda: _all_closed(log), timeout=5, what="the returned lease's cursors closed")
    finally:
        gate.touch()
        raw.close()
    wait_until(lambda: _books_balance(stuck, 1), timeout=5, what="the slot back")
    stuck.shutdown()
    other.shutdown()


def test_tpooled_execute_results_that_do_not_pickle(client: Any, tmp_path: Path) -> None:
    """A result that is not data arrives as None; one that looks like data but does not
    pickle fails that execute, and the cursor it made is not kept there."""
    log = tmp_path / "cursors.log"
    pool = TpooledConnectionPool(GateDB(), client=client, max_size=1, log=str(log),
                                 returns="value")
    conn = pool.get()
    try:
        cur = conn.cursor()
        assert cur.execute("opaque") is None
        assert cur.fetchone() == ("opaque", None)
        cur.close()
        bad = conn.cursor()
        with pytest.raises(Exception, match="pickle"):
            bad.execute("plain-opaque")
        gc.collect()
        # Closed in the supervisor while this process still holds the connection: its ref
        # was not kept for a reply that never went out.
        wait_until(lambda: _all_closed(log), timeout=5, what="the unsent cursor closed there")
    finally:
        pool.put(conn)
    pool.shutdown()


def test_a_deferred_cursor_closed_from_many_threads(client: Any, tmp_path: Path) -> None:
    """close() racing with itself and with every use: each use raises the closed-cursor
    error, and the supervisor's cursor is closed once, while the connection is still held;
    an execute that was running when close() came leaves no cursor behind either."""
    log, gate = tmp_path / "cursors.log", tmp_path / "gate"
    pool = TpooledConnectionPool(GateDB(), client=client, max_size=1, log=str(log))
    conn = pool.get()
    runner = Runner()
    try:
        cur = conn.cursor()
        cur.execute("select 1")
        barrier = threading.Barrier(8)

        def hammer(i: int) -> list[str]:
            barrier.wait(5)
            cur.close()
            errors = []
            for use in (lambda: cur.execute("x"), lambda: cur.fetchone(), lambda: cur.rowcount,
                        lambda: setattr(cur, "arraysize", 3), lambda: list(cur)):
                try:
                    use()
                except RuntimeError as exc:  # GateDB has no InterfaceError: RuntimeError
                    errors.append(str(exc))
            return errors

        boxes = [runner.start(lambda i=i: hammer(i)) for i in range(8)]
        runner.join_all(10)
        for box in boxes:
            assert box.get("result") == ["the cursor is closed"] * 5, box
        assert cur.closed is True
        wait_until(lambda: _made_and_closed(log) == (["1"], ["1"]), timeout=5,
                   what="the cursor closed once")
        # An execute still running when another thread closes its cursor.
        slow = conn.cursor()
        box = runner.start(lambda: slow.execute("gate", str(gate)))
        wait_until(lambda: "waiting" in cursor_log(log), timeout=5, what="the execute to start")
        slow.close()
        gate.touch()
        runner.join_all(10)
        assert "error" not in box, box
        assert slow.closed is True
        with pytest.raises(RuntimeError, match="cursor is closed"):
            slow.fetchone()
        wait_until(lambda: _all_closed(log), timeout=5,
                   what="the cursor closed there while the DeferredCursor lives")
    finally:
        gate.touch()
        runner.join_all(10)
        pool.put(conn)
        pool.shutdown()


def test_tpooled_connection_of_a_client_gone_mid_query_is_lent_again_after_the_query(
        client: Any, tmp_path: Path) -> None:
    """A client that dies while its query runs in the supervisor: its connection is taken
    back only once that query has ended, never lent to the next holder alongside it."""
    log, gate = tmp_path / "cursors.log", tmp_path / "gate"
    pool = TpooledConnectionPool(GateDB(), client=client, max_size=1, log=str(log))
    pid = pool._pool._mp_route()[1]
    raw = RawLease(client)
    runner = Runner()
    try:
        granted = raw.get(pid, timeout=5)
        rid = next(raw.rids)
        raw.send(raw.P.encode_call(rid, pid, granted.lease, 0, "_mppool_execute",
                                   ((), {}, "execute", ("gate", str(gate)), {}), {}))
        wait_until(lambda: "waiting" in cursor_log(log), timeout=5, what="the query to start")
        raw.close()  # the client is gone, its query still running
        nxt_box = runner.start(lambda: pool.get(timeout=8))
        wait_until(lambda: pool._pool.stats()["nwaiting"] == 1, timeout=5,
                   what="the next holder waiting while the dead client's query runs")
        assert pool._pool.stats()["nusing"] == 1 and not nxt_box["done"]
        gate.touch()
        wait_until(lambda: nxt_box["done"], timeout=5, what="the next holder served")
        assert "released" in cursor_log(log)
        nxt = nxt_box["result"]
        with nxt.cursor() as mine:
            assert mine.execute("mine").fetchone() == ("mine", None)
        pool.put(nxt)
    finally:
        gate.touch()
        raw.close()
        runner.join_all(10)
        pool.shutdown()
