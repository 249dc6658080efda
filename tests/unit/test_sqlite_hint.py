"""A pooled sqlite3 connection made without check_same_thread=False, used from another
thread: the ProgrammingError carries a note saying how to fix it."""

from __future__ import annotations

import sqlite3
import threading

import pytest

import mppool
from mppool.errors import SQLITE_THREAD_HINT, add_hint


def test_local_pool_adds_the_hint(tmp_path) -> None:
    pool = mppool.Pool(lambda i: sqlite3.connect(str(tmp_path / "db")), max_size=1)
    with pool.obj() as conn:
        conn.execute("select 1")  # made and used in this thread: fine
    caught: list[BaseException] = []

    def other() -> None:
        try:
            with pool.obj(timeout=5) as conn:
                conn.execute("select 1")
        except sqlite3.ProgrammingError as exc:
            caught.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(30)
    assert not t.is_alive()
    pool.shutdown()
    assert len(caught) == 1
    assert getattr(caught[0], "__notes__", []) == [SQLITE_THREAD_HINT]


def test_other_errors_get_no_hint() -> None:
    for exc in (sqlite3.ProgrammingError("Cannot operate on a closed database."), ValueError("same thread")):
        assert not hasattr(add_hint(exc), "__notes__")


def test_hint_added_once() -> None:
    exc = sqlite3.ProgrammingError("SQLite objects created in a thread can only be used in that same thread.")
    add_hint(add_hint(exc))
    assert exc.__notes__ == [SQLITE_THREAD_HINT]
    with pytest.raises(sqlite3.ProgrammingError):
        raise exc
