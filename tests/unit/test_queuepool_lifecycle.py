"""mppool.queuepool.Pool's psycopg_pool-like lifecycle and reconnect options: open=,
open(), wait(), with Pool(...), reconnect_timeout/reconnect_failed (backoff of a manager's
failing open(), fail fast meanwhile, the hook once per outage).

The pool's clock (the backoff's and the recycling limits') is a fake one moved by the tests;
blocking waits use real time, bounded by deadlines.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from helpers import BAD_LIFECYCLE_OPTIONS, ModuleClock, check_outage_half_a_second_in, patch_now

import mppool.queuepool.pool as qpool
from mppool import PoolClosed, TimeOut
from mppool.queuepool import Pool, ResourceManager

DEADLINE = 10.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ModuleClock:
    return patch_now(monkeypatch, qpool, 1000.0)


class Database:
    """What the managers connect to: ``down`` makes every open() fail; counts the calls."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.calls = 0


class Res(ResourceManager):
    def __init__(self, name: str, db: Database) -> None:
        super().__init__(name)
        self.db = db

    def open(self) -> None:
        self.db.calls += 1
        if self.db.down:
            raise ConnectionRefusedError("the database is down")
        self.resource = {"name": self.name}
        super().open()

    def close(self) -> None:
        self.resource = None
        super().close()


def make(db: Database, capacity: int = 2, **kw: Any) -> Pool:
    """Every take reopens its manager (maxUsageCount=1: closed at its put)."""
    pool = Pool("test", capacity, maxUsageCount=1, **kw)
    for i in range(capacity):
        pool.put(Res(f"r{i}", db))
    return pool


def use(pool: Pool) -> str:
    with pool.take(timeout=DEADLINE) as r:
        return str(r.resource["name"])


# ------------------------------------------------------------------------------ backoff


def test_a_failing_open_backs_off_and_takes_fail_fast(clock: ModuleClock) -> None:
    db = Database(down=True)
    pool = make(db)
    with pytest.raises(ConnectionRefusedError):
        use(pool)
    assert db.calls == 1 and pool.free() == 2  # the manager went back, closed
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError, match="down") as info:
            use(pool)
        assert any("without calling open()" in n for n in getattr(info.value, "__notes__", ()))
    clock.t += 0.85
    with pytest.raises(ConnectionRefusedError):
        use(pool)
    assert db.calls == 1
    clock.t += 0.3  # 1.15 s: the attempt that is due
    with pytest.raises(ConnectionRefusedError):
        use(pool)
    assert db.calls == 2
    clock.t += 1.7  # the second delay is 2 s +-10%
    with pytest.raises(ConnectionRefusedError):
        use(pool)
    assert db.calls == 2
    clock.t += 0.6
    db.down = False  # service resumes with the next attempt
    assert use(pool) and db.calls == 3
    assert use(pool) and db.calls == 4  # no outage: every take may open
    st = pool.stats()
    assert (st["connections_num"], st["connections_errors"]) == (4, 2)
    pool.close()


def test_stats_describe_the_outage(clock: ModuleClock) -> None:
    db = Database(down=True)
    pool = make(db, reconnect_timeout=60.0)
    assert pool.stats()["outage"] is None and pool.stats()["reconnect_timeout"] == 60.0
    with pytest.raises(ConnectionRefusedError):
        use(pool)
    clock.t += 0.5
    with pytest.raises(ConnectionRefusedError):
        use(pool)  # failed fast: not an attempt
    check_outage_half_a_second_in(pool.stats())
    clock.t += 0.7
    db.down = False
    assert use(pool) == "r1"
    assert pool.stats()["outage"] is None, "an open() that works ends the outage"
    pool.close()


def test_a_take_of_an_open_manager_is_served_during_an_outage(clock: ModuleClock) -> None:
    db = Database()
    pool = Pool("test", 2, maxUsageCount=None)
    warm, cold = Res("warm", db), Res("cold", db)
    pool.put(warm)
    with pool.take() as r:
        assert r is warm
    pool.put(cold)  # now on top of the stack, never opened
    db.down = True
    with pytest.raises(ConnectionRefusedError):
        use(pool)  # cold: its open() fails
    calls = db.calls
    with pool.take(timeout=0) as r:
        assert r is warm  # not cold, on top, which would fail fast
    assert db.calls == calls
    with pool.take(timeout=0) as r:
        assert r is warm  # LIFO: put last
    held = pool.take(timeout=0)
    with pytest.raises(ConnectionRefusedError):
        use(pool)  # only cold is left: it fails fast
    pool.put(held)
    assert pool.free() == 2
    pool.close()


def test_reconnect_failed_once_per_outage(clock: ModuleClock) -> None:
    db = Database(down=True)
    told: list[Pool] = []
    pool = make(db, reconnect_timeout=5.0, reconnect_failed=told.append)

    def attempts(n: int) -> None:
        for _ in range(n):
            clock.t += 10.0  # every attempt is due
            with pytest.raises(ConnectionRefusedError):
                use(pool)

    attempts(1)
    assert told == []  # 0 s into the outage
    attempts(1)
    assert told == [pool]  # 10 s: past reconnect_timeout
    attempts(3)
    assert told == [pool]  # once per outage; the attempts go on
    db.down = False
    clock.t += 100.0
    assert use(pool)  # the outage is over
    db.down = True
    attempts(1)
    assert told == [pool]
    attempts(1)
    assert told == [pool, pool]  # a second outage, a second call
    pool.close()


# ------------------------------------------------------------------------------ lifecycle


def test_open_false_opens_nothing_until_open() -> None:
    db = Database()
    pool = make(db, open=False)  # managers may be put in
    with pytest.raises(PoolClosed, match="not open"):
        pool.take()
    with pytest.raises(PoolClosed, match="not open"):
        pool.wait(1.0)
    assert db.calls == 0
    pool.open()
    pool.open()  # a no-op
    assert use(pool) and db.calls == 1
    pool.close()
    with pytest.raises(PoolClosed, match="cannot be opened again"):
        pool.open()
    with pytest.raises(PoolClosed, match="shutting down"):
        pool.take()


def test_wait_opens_one_resource_and_keeps_it() -> None:
    db = Database()
    pool = Pool("test", 2)
    for i in range(2):
        pool.put(Res(f"r{i}", db))
    pool.wait(1.0)
    assert db.calls == 1 and pool.free() == 2
    pool.wait(1.0)  # one is open: nothing opened
    assert db.calls == 1
    assert pool.stats()["requests_num"] == 0  # wait() is not a request
    with pool.take(timeout=0) as r:
        assert r._isOpen and db.calls == 1  # the one wait() opened
    pool.close()


def test_wait_raises_timeout_on_a_failing_open() -> None:
    db = Database(down=True)
    pool = make(db)
    started = time.monotonic()
    with pytest.raises(TimeOut, match="ConnectionRefusedError: the database is down"):
        pool.wait(0.2)
    assert time.monotonic() - started >= 0.2
    assert db.calls == 1  # one attempt: the next is due in 1 s, after the deadline
    assert pool.free() == 2
    pool.close()


def test_wait_raises_an_error_that_is_not_opening() -> None:
    class BadRepair(Res):
        def takeRepair(self) -> None:
            raise RuntimeError("repair bug")

    db = Database()
    pool = Pool("test", 1)
    pool.put(BadRepair("r", db))
    with pytest.raises(RuntimeError, match="repair bug"):  # at once, not after 5 s of retries
        pool.wait(5.0)
    assert db.calls == 0 and pool.free() == 1
    pool.close()


def test_wait_raises_timeout_with_no_manager() -> None:
    pool = Pool("empty", 1)
    with pytest.raises(TimeOut, match=r"no resource could be opened in 0\.05 s"):
        pool.wait(0.05)


def test_wait_retries_on_the_backoff_schedule_and_succeeds() -> None:
    db = Database(down=True)
    pool = make(db)
    box: dict[str, Any] = {}

    def waiting() -> None:
        try:
            pool.wait(DEADLINE)
            box["ok"] = True
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=waiting, daemon=True)
    t.start()
    deadline = time.monotonic() + DEADLINE
    while db.calls < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    db.down = False  # the attempt due about 1 s later succeeds
    t.join(DEADLINE)
    assert box == {"ok": True} and db.calls == 2
    pool.close()


def test_with_pool_opens_and_closes() -> None:
    db = Database()
    with make(db, open=False) as pool:
        name = use(pool)
        assert name
    with pytest.raises(PoolClosed):
        pool.take()


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_LIFECYCLE_OPTIONS)
def test_bad_options(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Pool("bad", 1, **kwargs)
