"""mppool.db_pool with the options of mppool.Pool: ``check=db_pool.ping``, ``max_waiting``,
the counters, and psycopg_pool's lifecycle (``open=False``, ``open()``, ``wait()``,
``close()``, ``with``), for RawConnectionPool and TpooledConnectionPool, on sqlite3 (the
PostgreSQL side is in test_db_outage.py)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

import mppool
from mppool import db_pool
from mppool.db_pool import RawConnectionPool, TpooledConnectionPool


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "test.db")


@pytest.fixture(params=["raw", "tpooled"])
def make(request: pytest.FixtureRequest, db_path: str) -> Iterator[Any]:
    made: list[Any] = []
    client = request.getfixturevalue("client") if request.param == "tpooled" else None

    def build(**kw: Any) -> Any:
        kw.setdefault("max_size", 1)
        kw.setdefault("database", db_path)
        if request.param == "raw":
            pool = RawConnectionPool(sqlite3, check_same_thread=False, **kw)
        else:
            pool = TpooledConnectionPool(sqlite3, client=client, check_same_thread=False, **kw)
        made.append(pool)
        return pool

    build.kind = request.param  # type: ignore[attr-defined]
    yield build
    for pool in made:
        pool.shutdown()


def test_ping(db_path: str) -> None:
    conn = sqlite3.connect(db_path)
    assert db_pool.ping(conn) is True
    assert not conn.in_transaction
    conn.close()
    assert db_pool.ping(conn) is False  # closed: False, not an exception


def test_check_ping_closes_a_dead_idle_connection_instead_of_lending_it(db_path: str) -> None:
    pool = RawConnectionPool(sqlite3, 0, 2, check=db_pool.ping, cleanup=None,
                             database=db_path, check_same_thread=False)
    try:
        conn = pool.get(timeout=5)
        conn._base.close()  # dies while it is out: nobody could tell when it comes back
        pool.put(conn)
        with pool.item(timeout=5) as conn:  # the dead one fails its ping: a new one
            assert conn.execute("select 1").fetchone() == (1,)
        s = pool.stats()
        assert (s["connections_lost"], s["ncreated"], s["ndestroys"]) == (1, 2, 1)
    finally:
        pool.shutdown()


def test_open_false_then_open_wait_and_with(make: Any) -> None:
    pool = make(min_size=1, open=False)
    with pytest.raises(mppool.PoolClosed, match="open"):
        pool.get(timeout=0)
    pool.open(wait=True, timeout=10)
    assert pool.current_size == 1
    pool.wait(timeout=10)
    with pool as same:
        assert same is pool
        with pool.item(timeout=5) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(mppool.PoolClosed):
        pool.get(timeout=0)


def test_close_of_a_pool_never_opened(make: Any) -> None:
    pool = make(open=False)
    pool.close()


def test_max_waiting_and_pop_stats(make: Any) -> None:
    pool = make(max_size=1, max_waiting=1)
    held = pool.get(timeout=5)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.get(timeout=10)))
    t.start()
    wait_until(lambda: pool.waiting() == 1)
    with pytest.raises(mppool.TooManyRequests):
        pool.get(timeout=10)
    pool.put(held)
    t.join(10)
    pool.put(got[0])
    wait_until(lambda: pool.stats()["nusing"] == 0, what="the puts applied")
    popped = pool.pop_stats()
    assert (popped["requests_num"], popped["requests_queued"], popped["requests_errors"]) \
        == (3, 1, 1)
    assert popped["pool_max"] == 1 and popped["usage_ms"] >= 0
    assert pool.pop_stats()["requests_num"] == 0


def test_check_after_reaches_the_pool(make: Any) -> None:
    def never(conn: Any) -> bool:
        return False

    for check_after, lost in ((3600.0, 0), (0.0, 1)):
        pool = make(check=never, check_after=check_after)
        with pool.item(timeout=5):
            pass  # made now: not checked
        with pool.item(timeout=5) as conn:  # idle a moment: checked only if check_after=0
            assert conn.execute("select 1").fetchone() == (1,)
        wait_until(lambda p=pool: p.stats()["nusing"] == 0, what="the puts applied")
        assert pool.stats()["connections_lost"] == lost, check_after


def test_returns_bad_counts_failed_cleanups_not_closes_at_every_put(make: Any) -> None:
    def failing(conn: Any) -> None:
        raise RuntimeError("cleanup failed")

    pool = make(cleanup=failing)
    with pool.item(timeout=5):
        pass
    with pool.item(timeout=5) as conn:  # the first was closed: a new one works
        assert conn.execute("select 1").fetchone() == (1,)
    wait_until(lambda: pool.stats()["nusing"] == 0, what="the puts applied")
    assert pool.stats()["returns_bad"] == 2
    closing = make(max_idle=0)  # eventlet's limiter: closed at every put, none of them bad
    for _ in range(2):
        with closing.item(timeout=5) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    wait_until(lambda: closing.stats()["nusing"] == 0, what="the puts applied")
    s = closing.stats()
    assert (s["returns_bad"], s["ncreated"], s["navail"]) == (0, 2, 0), s


def test_outage_wait_times_out_reconnect_failed_once_and_service_resumes(
        make: Any, tmp_path: Path) -> None:
    where = tmp_path / "not-yet"  # sqlite3 cannot open a database in a missing directory
    told = tmp_path / "told"

    def reconnect_failed(pool: Any) -> None:  # in the supervisor for a TpooledConnectionPool
        with told.open("a") as f:
            f.write("told\n")

    pool = make(min_size=1, database=str(where / "db.sqlite"), reconnect_timeout=0.0,
                reconnect_failed=reconnect_failed)
    with pytest.raises(mppool.TimeOut, match="unable to open database file"):
        pool.wait(timeout=0.3)
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        pool.get(timeout=5)  # fails fast with the driver's error, not a timeout
    wait_until(lambda: told.exists() and told.read_text().endswith("\n"), timeout=10,
               what="reconnect_failed called")
    where.mkdir()
    pool.wait(timeout=20)  # the backoff's next attempt works: nobody resets anything
    with pool.item(timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert told.read_text() == "told\n", "once per outage"
    s = pool.stats()
    assert s["connections_errors"] >= 1 and s["connections_num"] > s["connections_errors"]
    assert s["outage"] is None


@pytest.mark.parametrize(
    ("kwargs", "exc", "text"),
    [
        ({"check": 42}, TypeError, "check must be callable, got 42"),
        ({"check_after": -1}, ValueError, "check_after.*-1"),
        ({"max_waiting": "2"}, TypeError, "max_waiting must be an int, got '2'"),
        ({"reconnect_timeout": -1}, ValueError, "reconnect_timeout.*-1"),
        ({"reconnect_failed": 3}, TypeError, "reconnect_failed must be callable, got 3"),
        ({"open": 1}, TypeError, "open must be a bool, got 1"),
    ],
)
def test_bad_options_are_named(kwargs: dict[str, Any], exc: type[Exception], text: str,
                               db_path: str) -> None:
    with pytest.raises(exc, match=text):
        RawConnectionPool(sqlite3, database=db_path, **kwargs)
