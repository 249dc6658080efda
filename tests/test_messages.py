"""What a user sees when something is wrong: each message says what is wrong and what to do."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
from pathlib import Path

import pytest

import mppool
from mppool.errors import SQLITE_THREAD_HINT

pytestmark = [pytest.mark.usefixtures("reap")]


def _private(tmp_path: Path) -> Path:
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    return d


def test_connect_with_no_supervisor_says_so_first_and_how_to_start_one(tmp_path: Path) -> None:
    address = str(_private(tmp_path) / "s.sock")
    with pytest.raises(mppool.ServerUnavailable) as info:
        mppool.connect(address)
    msg = str(info.value)
    assert msg.startswith(f"no supervisor at {address}: start one with"), msg
    assert "mppool serve" in msg and "autostart=True" in msg
    assert "authkey" not in msg  # nothing runs there: the key is not the problem


def test_connect_without_the_key_of_a_live_supervisor_says_it_runs(tmp_path: Path) -> None:
    address = str(_private(tmp_path) / "s.sock")
    with mppool.Server(address, os.urandom(16)):
        os.unlink(address + ".key")
        with pytest.raises(mppool.ServerUnavailable) as info:
            mppool.connect(address)
    msg = str(info.value)
    assert msg.startswith(f"a supervisor runs at {address}"), msg
    assert "MPPOOL_AUTHKEY" in msg


def test_a_dead_supervisor_fails_control_calls_at_once(tmp_path: Path) -> None:
    address = str(_private(tmp_path) / "s.sock")
    srv = mppool.Server(address, os.urandom(16)).start()
    try:
        c = mppool.connect(address, srv.authkey)
        c.pool("p", lambda i: i, max_size=2)
        assert srv.pid is not None
        os.kill(srv.pid, signal.SIGKILL)  # the supervisor this test started
        srv._proc.wait(5)  # type: ignore[union-attr]
        for call in (c.stats, lambda: c.pool("p"), c.info):
            t0 = time.monotonic()
            with pytest.raises(mppool.ServerUnavailable, match="no supervisor at"):
                call()
            assert time.monotonic() - t0 < 1.0, "a dead supervisor must fail calls at once"
        c.close()
    finally:
        srv.shutdown()


def test_server_offers_no_manager_factories() -> None:
    # Server used to be a SyncManager: Queue(), Lock(), Pool()... failed with
    # "AssertionError: server not yet started", and Server.Pool was not mppool.Pool.
    for name in ("Queue", "Lock", "Pool", "dict", "list", "Namespace", "register", "connect",
                 "get_server", "join"):
        assert not hasattr(mppool.Server, name), name
    assert {n for n in dir(mppool.Server) if not n.startswith("_")} == {
        "address", "authkey", "client", "pid", "shutdown", "start"}


def test_other_options_are_named(client) -> None:
    client.pool("p", lambda i: i, max_size=4)
    with pytest.raises(ValueError) as info:
        client.pool("p", lambda i: i, max_size=8, timeout=3)
    msg = str(info.value)
    assert "max_size=4, not 8" in msg and "timeout=3, not set when it was created" in msg, msg
    assert "client.pool('p')" in msg
    with pytest.raises(ValueError, match=r"fun differs"):
        client.pool("p", lambda i: i + 1, max_size=4)
    with pytest.raises(ValueError, match=r"transfer='copy', not 'proxy'"):
        client.pool("p", lambda i: i, max_size=4, transfer="proxy")


def test_token_pools_suggest_token_pool(client) -> None:
    client.token_pool("t", 2)
    with pytest.raises(ValueError) as info:
        client.pool("t", lambda i: i, max_size=2)
    assert "it is a token pool" in str(info.value)
    assert "client.token_pool('t')" in str(info.value)
    with pytest.raises(ValueError) as info:
        client.token_pool("t", 3)
    assert "max_size=2, not 3" in str(info.value)
    assert "client.token_pool('t')" in str(info.value)


@pytest.mark.parametrize("fun", [lambda i: sqlite3.connect(":memory:"), lambda i: socket.socket()],
                         ids=["sqlite3", "socket"])
def test_an_object_that_cannot_be_copied_suggests_proxy(client, fun) -> None:
    pool = client.pool("uncopyable", fun, max_size=1, closer=lambda o: o.close())
    with pytest.raises(TypeError) as info:
        pool.get(timeout=5)
    assert "transfer=\"proxy\"" in str(info.value)
    assert "cannot pickle" in str(info.value)
    assert pool.stats()["nusing"] == 0  # the lease went back


def test_proxied_sqlite3_without_check_same_thread_gets_the_hint(client, tmp_path) -> None:
    path = str(tmp_path / "db")
    pool = client.pool("sq", lambda i: sqlite3.connect(path), max_size=1, transfer="proxy",
                       closer=lambda c: c.close())
    obj = pool.get(timeout=5)
    try:
        # Made on one of the pool's threads, used on another (or the lease loop's).
        with pytest.raises(sqlite3.ProgrammingError) as info:
            for _ in range(20):  # the pool has up to 4 threads: one of the calls must cross
                obj.execute("select 1")
        assert SQLITE_THREAD_HINT in getattr(info.value, "__notes__", [])
    finally:
        pool.ret(obj)
