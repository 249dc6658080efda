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
    tp = TokenPool(max_size=2)
    try:
        t = tp.get()
        assert "0x" not in repr(t) or repr(t).startswith("<Token")
    finally:
        tp.put(t)


def _render(renderable: object, width: int) -> str:
    from io import StringIO

    from rich.console import Console

    c = Console(width=width, file=StringIO(), color_system=None)
    c.print(renderable)
    return c.file.getvalue()  # type: ignore[attr-defined]


STATS = {
    "sessions_for_the_reporting_service": {"kind": "pool", "transfer": "proxy", "max_size": 8,
                                           "nusing": 1, "navail": 1, "nborrows": 123456,
                                           "ncreated": 2, "shutdown": True,
                                           "waiters": [{"pid": 4242, "waited": 1.5}],
                                           "nwaiting": 1},
    "pg": {"kind": "token", "max_size": 20},
    "pg_replica_readonly": {"kind": "token", "max_size": 20, "nwaiting": 3},
}


@pytest.mark.parametrize("width", [80, 60, 200])
def test_pool_names_never_vanish(width: int) -> None:
    from rich.console import Console

    from mppool.display import fitted_pools_table as _fitted_pools_table

    text = _render(_fitted_pools_table(Console(width=width), STATS), width)
    # The first column's cells, joined across lines (a long name folds onto the next line).
    flat = "".join(ln.split("│")[1].strip() for ln in text.splitlines() if ln.startswith("│"))
    for name in STATS:
        assert name in flat, (name, text)  # long names may fold, never vanish
    assert all(len(line) <= width for line in text.splitlines()), text


def test_top_lists_waiters_by_pid_and_wait() -> None:
    from mppool.display import waiters_table as _waiters_table

    text = _render(_waiters_table(STATS), 120)
    assert "4242" in text and "1.500 s" in text
    assert _render(_waiters_table({"p": {"waiters": []}}), 80).strip() == "waiters: none"
