"""TpooledConnectionPool: which pools share connections, and when the connections close.

Each pool object is its own supervisor-side pool unless ``share="name"`` is given; every
process using a pool is registered in the supervisor, and the last one to leave (close(),
garbage collection, exit, or death) drops the pool, closing its connections. Also eventlet's
helpers that code and tests call on both pools: ``free_items``, ``_unwrap_connection``,
``_safe_close`` and the ``connect`` classmethod.
"""

from __future__ import annotations

import gc
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from helpers import fork_ctx, wait_until
from workers import DummyDBModule

import mppool
from mppool import tpool
from mppool.db_pool import RawConnectionPool, TpooledConnectionPool

pytestmark = pytest.mark.slow


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    path = str(tmp_path / "test.db")
    sqlite3.connect(path).close()
    return path


def tpooled(client: Any, db_path: str, **kwargs: Any) -> TpooledConnectionPool:
    return TpooledConnectionPool(sqlite3, client=client, database=db_path,
                                 check_same_thread=False, **kwargs)


def served(client: Any, name: str) -> bool:
    return name in client.stats()


def users(client: Any, name: str) -> int:
    from mppool.db_pool.served import _users_of

    return int(client.execute(_users_of, name))


# ---------------------------------------------------------------- identity


def test_pools_with_the_same_arguments_are_independent(client: Any, db_path: str) -> None:
    a = tpooled(client, db_path, max_size=1)
    b = tpooled(client, db_path, max_size=3)
    assert a.name != b.name and a.name.startswith("db_pool:sqlite3:")
    assert db_path not in a.name  # hashed: arguments (passwords) never show
    assert b.stats()["max_size"] == 3  # each one's own sizes apply
    held = a.get()
    with b.item(timeout=0) as conn:  # a second pool never waits on the first one
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(mppool.TimeOut):
        a.get(timeout=0)
    held.close()
    a.shutdown()
    b.shutdown()


def test_share_names_one_pool_whose_first_sizes_apply(client: Any, db_path: str) -> None:
    a = tpooled(client, db_path, max_size=1, share="orders")
    b = TpooledConnectionPool("sqlite3", max_size=3, client=client, check_same_thread=False,
                              database=db_path, share="orders")
    assert a.name == b.name and a.name.startswith("db_pool:orders:sqlite3:")
    assert b.stats()["max_size"] == 1
    conn = a.get()
    with pytest.raises(mppool.TimeOut):
        b.get(timeout=0)
    conn.close()
    with b.item(timeout=5) as conn:
        conn.execute("select 1")
    other_db = tpooled(client, db_path + "-other", share="orders")
    other_name = tpooled(client, db_path, share="invoices")
    assert len({a.name, other_db.name, other_name.name}) == 3  # arguments are part of it
    for pool in (a, other_db, other_name):
        pool.shutdown()


def test_bad_share(client: Any, db_path: str) -> None:
    with pytest.raises(TypeError, match=r"share.*5"):
        tpooled(client, db_path, share=5)
    with pytest.raises(ValueError, match=r"share.*''"):
        tpooled(client, db_path, share="")
    with pytest.raises(TypeError, match=r"share.*TpooledConnectionPool.*'x'"):
        RawConnectionPool(DummyDBModule(), share="x")
    assert not [n for n in client.stats() if n.startswith("db_pool:")]  # nothing half-made


# ---------------------------------------------------------------- when connections close


def test_close_of_the_last_user_drops_the_pool(client: Any, db_path: str) -> None:
    a = tpooled(client, db_path, max_size=2, share="s")
    b = tpooled(client, db_path, max_size=2, share="s")
    a.put(a.get())
    assert users(client, a.name) == 2
    a.close()
    with pytest.raises(mppool.PoolClosed, match="closed"):
        a.get()
    assert served(client, b.name) and users(client, b.name) == 1  # b still uses it
    with b.item(timeout=5) as conn:
        conn.execute("select 1")
    b.close()
    wait_until(lambda: not served(client, b.name), what="the pool dropped with its last user")
    b.close()  # twice: nothing more happens
    again = tpooled(client, db_path, max_size=2, share="s")  # the name is free: a new pool
    assert again.name == b.name and users(client, again.name) == 1
    with again.item(timeout=5) as conn:
        conn.execute("select 1")
    again.shutdown()


def test_a_garbage_collected_pool_drops_its_connections(client: Any, db_path: str) -> None:
    pool = tpooled(client, db_path, min_size=1)
    name = pool.name
    conn = pool.get()
    conn.close()
    del pool, conn
    gc.collect()
    wait_until(lambda: not served(client, name), what="the forgotten pool dropped")


def test_shutdown_drops_it_for_everyone(client: Any, db_path: str) -> None:
    a = tpooled(client, db_path, share="s")
    b = tpooled(client, db_path, share="s")
    a.shutdown()
    assert not served(client, a.name)
    with pytest.raises(mppool.PoolClosed):
        b.get(timeout=1)


def _use_and_exit(address: Any, authkey: bytes, db_path: str, out: Any, hang: bool) -> None:
    client = mppool.connect(address, authkey)
    pool = tpooled(client, db_path, share="exiting")
    with pool.item() as conn:
        conn.execute("select 1")
    out.put(pool.name)
    if hang:
        signal.pause()
    # a normal exit, pool still referenced: it leaves at interpreter exit


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_the_last_user_process_exiting_drops_the_pool(server: Any, client: Any, db_path: str,
                                                      procs: list[Any], how: str) -> None:
    ctx = fork_ctx()
    out = ctx.Queue()
    p = ctx.Process(target=_use_and_exit, args=(server.address, server.authkey, db_path, out,
                                                how == "sigkill"))
    procs.append(p)
    p.start()
    name = out.get(timeout=20)
    if how == "sigkill":
        assert served(client, name)
        os.kill(p.pid, signal.SIGKILL)
    p.join(20)
    wait_until(lambda: not served(client, name), timeout=10,
               what=f"the pool dropped after its only user's {how}")


def _child_uses(pool: Any, out: Any, go: Any) -> None:
    with pool.item(timeout=10) as conn:
        conn.execute("select 1")
    out.put("used")
    go.wait(20)


def test_a_fork_child_keeps_an_inherited_pool_alive(client: Any, db_path: str,
                                                    procs: list[Any]) -> None:
    pool = tpooled(client, db_path, max_size=1)
    name = pool.name
    ctx = fork_ctx()
    out, go = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_child_uses, args=(pool, out, go))
    procs.append(p)
    p.start()
    assert out.get(timeout=20) == "used"
    assert users(client, name) == 2  # the child joined when it first used the pool
    pool.close()  # the parent is done; the child is not
    assert served(client, name)
    go.set()
    p.join(20)
    assert p.exitcode == 0
    wait_until(lambda: not served(client, name), what="the pool dropped after the child")


# ---------------------------------------------------------------- eventlet's helpers


@pytest.mark.parametrize("kind", ["raw", "tpooled"])
def test_free_items(kind: str, client: Any, db_path: str) -> None:
    if kind == "raw":
        pool: Any = RawConnectionPool(sqlite3, max_size=3, database=db_path,
                                      check_same_thread=False)
    else:
        pool = tpooled(client, db_path, max_size=3)
    assert len(pool.free_items) == 0
    first, second = pool.get(), pool.get()
    first_base = first._base
    first.close()
    second.close()
    wait_until(lambda: len(pool.free_items) == 2, what="two idle connections")
    items = pool.free_items
    (used_last, created_last, _), (used_first, _, conn_first) = items
    assert used_last >= used_first and created_last > 0  # most recently used first, wall clock
    if kind == "raw":
        assert conn_first is first_base
    else:
        assert conn_first is None  # the connection is in the supervisor
    items.clear()  # a snapshot: the pool is unchanged
    assert len(pool.free_items) == 2
    pool.clear()
    assert len(pool.free_items) == 0
    pool.shutdown()


def test_unwrap_connection_and_safe_close() -> None:
    pool = RawConnectionPool(DummyDBModule(), max_size=2)
    wrapper = pool.get()
    base = wrapper._base
    assert pool._unwrap_connection(wrapper) is base
    assert not wrapper  # spent
    assert pool._unwrap_connection(wrapper) is None
    assert pool._unwrap_connection(None) is None
    assert pool._unwrap_connection(object()) is None

    class DuckWrapper:  # a _base and nothing else: unwrapped all the same, as in eventlet
        _base = "the connection"

    assert pool._unwrap_connection(DuckWrapper()) == "the connection"
    pool._safe_close(base)
    assert base.closed

    class Broken:
        def close(self) -> None:
            raise RuntimeError("cannot close")

    pool._safe_close(Broken(), quiet=True)  # never raises
    pool._safe_close(Broken())
    pool._safe_close(None)
    pool.put(base)
    pool.shutdown()


def test_connect_classmethods(db_path: str) -> None:
    raw = RawConnectionPool.connect(sqlite3, 5, database=db_path, check_same_thread=False)
    assert isinstance(raw, sqlite3.Connection)
    raw.close()
    conn = TpooledConnectionPool.connect(sqlite3, 5, database=db_path, check_same_thread=False)
    assert isinstance(conn, tpool.Proxy)  # eventlet's: a tpool proxy, made in this process
    cur = conn.cursor()
    assert isinstance(cur, tpool.Proxy)
    cur.execute("select 1")
    assert cur.fetchall() == [(1,)]
    conn.close()
    with pytest.raises(mppool.ConnectTimeout):
        RawConnectionPool.connect(_Hanging(), 0.1)


class _Hanging:
    def connect(self) -> Any:
        import threading

        threading.Event().wait(2)
        raise RuntimeError("too late")
