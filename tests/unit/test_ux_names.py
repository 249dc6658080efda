"""Pools are named in errors and logs; stats() lists who waits; tokens say which they are."""

from __future__ import annotations

import os
import threading

import pytest
from helpers import wait_until

import mppool
from mppool.pools import Token, TokenPool


def test_stats_lists_each_waiter_with_its_pid_and_wait() -> None:
    pool = mppool.Pool(lambda i: i, max_size=1, name="conns")
    try:
        held = pool.get()
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(pool.get(timeout=30)))
        t.start()
        wait_until(lambda: pool.stats()["nwaiting"] == 1, timeout=10, what="the waiter to queue")
        waiters = pool.stats()["waiters"]
        assert len(waiters) == 1
        assert waiters[0]["pid"] == os.getpid()
        assert isinstance(waiters[0]["waited"], float) and waiters[0]["waited"] >= 0.0
        pool.ret(held)
        t.join(10)
        assert not t.is_alive() and got == [held]
        assert pool.stats()["waiters"] == []
    finally:
        pool.shutdown()


def test_errors_name_the_pool() -> None:
    pool = mppool.Pool(lambda i: i, max_size=1, name="conns")
    held = pool.get()
    with pytest.raises(mppool.TimeOut, match="pool 'conns'"):
        pool.get(timeout=0)
    pool.ret(held)
    pool.shutdown()
    with pytest.raises(mppool.PoolClosed, match="pool 'conns'"):
        pool.get()


def test_tokens_are_numbered() -> None:
    assert repr(Token(3)) == "token #3"
    tp = TokenPool(2)
    try:
        t = tp.get()
        assert "0x" not in repr(t) or repr(t).startswith("<Token")
    finally:
        tp.put(t)
