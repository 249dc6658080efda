"""ProxyPatternPool users switching to ``mppool.Pool``: what its code and tests read.

ProxyPatternPool's own ``Proxy`` class builds its pool with the module-level name ``Pool``;
pointing that name at ``mppool.Pool`` (what a user's one-line import change does for their
own code) must keep the Proxy working: per-thread objects, ``_ret_obj``, the ``_obj()``
context manager, a bounded pool timing out with ``TimeOut`` saying "timeout after".
Time-based rules run on a fake clock with a manual scheduler (no sleeping).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ProxyPatternPool as ppp
import pytest

import mppool
from mppool import Pool, PoolClosed, PoolException, TimeOut

try:
    from helpers import ManualScheduler, Recorder, Runner, wait_until
except ImportError:  # tests/ became a package
    from tests.helpers import ManualScheduler, Recorder, Runner, wait_until

COUNTERS = ["_nobjs", "_nuses", "_ncreated", "_nhealth", "_bad_health", "_nborrows", "_nreturns",
            "_nkilled", "_nrecycled", "_nwornout", "_ndestroys", "_hk_rounds", "_hk_errors",
            "_hc_rounds", "_hc_errors"]


@pytest.fixture
def proxy_on_mppool(monkeypatch: pytest.MonkeyPatch) -> None:
    """ProxyPatternPool's Proxy, its pool class pointed at mppool.Pool."""
    monkeypatch.setattr(ppp, "Pool", mppool.Pool)


@pytest.fixture(autouse=True)
def _no_werkzeug_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PPP_WERKZEUG_WORKAROUND", raising=False)
    monkeypatch.delenv("WERKZEUG_RUN_MAIN", raising=False)


# ---------------------------------------------------------------- read-only counters


def test_counters_follow_gets_returns_and_wear() -> None:
    rec = Recorder()
    pool = Pool(rec.fun, max_size=2, min_size=0, max_use=2, closer=rec.closer)
    assert (pool._nobjs, pool._nuses, pool._ncreated) == (0, 0, 0)
    assert pool and len(pool) == 0  # empty, yet not "no pool" for `if self._pool:`
    a, b = pool.get(), pool.get()
    assert (pool._nobjs, pool._nuses, pool._ncreated, pool._nborrows) == (2, 2, 2, 2)
    pool.ret(a)
    pool.ret(b)
    assert pool._nreturns == 2 and pool._nobjs == 2
    pool.ret(pool.get())  # its second use: worn out, closed at return
    assert pool._nwornout == 1 and pool._ndestroys == 1 and pool._nobjs == 1
    assert pool._nuses == 3 and len(rec.closed) == 1
    pool.shutdown()
    assert pool._ndestroys == 2 and pool._nobjs == 0


def test_counters_agree_with_stats_and_are_read_only() -> None:
    pool = Pool(lambda i: i, max_size=3, min_size=1)
    pool.ret(pool.get())
    stats = pool.stats()
    for name in COUNTERS:
        assert getattr(pool, name) == stats[name[1:]], name
        with pytest.raises(AttributeError):
            setattr(pool, name, 42)
    assert isinstance(pool._started_ts, float)
    assert abs(pool._started_ts - pool._started.timestamp()) < 1e-6
    pool.shutdown()


def test_recycled_and_killed_counters(sched: ManualScheduler, caplog: pytest.LogCaptureFixture) -> None:
    pool = Pool._made_with(lambda i: f"obj {i}", min_size=1, max_avail_delay=10.0,
                           max_using_delay_kill=30.0, clock=sched.clock, scheduler=sched)
    a, b = pool.get(), pool.get()
    pool.ret(b)
    sched.advance(20.0)  # b idled past max_avail_delay; a is still within its kill delay
    assert pool._nrecycled == 1 and pool._nobjs == 1 and pool._nkilled == 0
    with caplog.at_level(logging.WARNING, logger="mppool"):
        sched.advance(20.0)  # a held 40 s > 30 s: killed
    assert pool._nkilled == 1 and pool._hk_rounds >= 2
    pool.ret(a)  # a late return of a killed object changes nothing
    assert pool._nreturns == 1
    pool.shutdown()


def test_health_counters_and_replacement(sched: ManualScheduler) -> None:
    verdicts = iter([True, False, False, True] * 10)
    pool = Pool._made_with(lambda i: i, min_size=4, health=lambda o: next(verdicts), delay=5.0,
                           clock=sched.clock, scheduler=sched)
    assert pool._ncreated == 4
    sched.advance(5.0)
    assert pool._hc_rounds == 1 and pool._nhealth == 4 and pool._bad_health == 2
    assert pool._ncreated == 6 and pool._nobjs == 4  # the unhealthy ones were replaced
    pool.shutdown()


# ---------------------------------------------------------------- __delete__, _housekeeper


def test_delete_closes_every_object_and_ends_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    pool = Pool(rec.fun, max_size=3, min_size=2, closer=rec.closer)
    held = pool.get()
    with caplog.at_level(logging.WARNING, logger="mppool"):
        pool.__delete__()
    assert sorted(o["num"] for o in rec.closed) == [0, 1]  # the one in use too
    assert held in rec.closed and pool._nobjs == 0
    assert "in use" in caplog.text
    with pytest.raises(PoolClosed, match="shutting down"):
        pool.get()
    pool.ret(held)  # returning it afterwards is ignored, as a double return
    assert len(rec.closed) == 2


def test_delete_does_not_make_pools_descriptors() -> None:
    # ProxyPatternPool defines a __delete__ method, which makes a pool stored as a class
    # attribute a data descriptor: an instance could not shadow it.
    class Holder:
        pool = Pool(lambda i: i, min_size=0)

    h = Holder()
    h.pool = "mine"  # type: ignore[assignment]
    assert h.pool == "mine" and isinstance(Holder.pool, Pool)
    Holder.pool.__delete__()
    with pytest.raises(PoolClosed):
        Holder.pool.get()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        Holder.pool.nope  # noqa: B018


def test_housekeeper_handle(sched: ManualScheduler) -> None:
    assert Pool(lambda i: i)._housekeeper is None  # nothing to keep: no round at all
    pool = Pool(lambda i: i, max_avail_delay=60.0)
    assert pool._housekeeper is not None
    pool.shutdown()
    assert pool._housekeeper is None


# ---------------------------------------------------------------- PPP_WERKZEUG_WORKAROUND


def test_werkzeug_workaround_keeps_the_reloader_parent_idle(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PPP_WERKZEUG_WORKAROUND", "1")
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="mppool"):
        pool = Pool(rec.fun, min_size=3, max_size=5, max_avail_delay=60.0)
    assert "PPP_WERKZEUG_WORKAROUND" in caplog.text
    assert rec.nums == [] and pool._nobjs == 0 and pool._housekeeper is None
    assert pool.get() == {"num": 0}  # still usable: objects made on demand
    pool.shutdown()


def test_werkzeug_workaround_in_the_serving_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPP_WERKZEUG_WORKAROUND", "1")
    monkeypatch.setenv("WERKZEUG_RUN_MAIN", "true")  # werkzeug sets it in its serving child
    pool = Pool(lambda i: i, min_size=3, max_avail_delay=60.0)
    assert pool._nobjs == 3 and pool._housekeeper is not None
    pool.shutdown()


def test_without_the_variable_werkzeug_main_does_not_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WERKZEUG_RUN_MAIN", "false")
    pool = Pool(lambda i: i, min_size=2)
    assert pool._nobjs == 2
    pool.shutdown()


def test_werkzeug_workaround_ignored_by_pools_with_their_own_scheduler(
        monkeypatch: pytest.MonkeyPatch, sched: ManualScheduler) -> None:
    # The supervisor builds its pools with its scheduler: one started from the reloader's
    # parent inherits the variable and must still fill and keep its pools.
    monkeypatch.setenv("PPP_WERKZEUG_WORKAROUND", "1")
    pool = Pool._made_with(lambda i: i, min_size=2, clock=sched.clock, scheduler=sched)
    assert pool._nobjs == 2
    pool.shutdown()


# ---------------------------------------------------------------- TimeOut messages


def test_timeout_is_ppp_class_and_message() -> None:
    pool = Pool(lambda i: i, max_size=1)
    held = pool.get()
    with pytest.raises(TimeOut, match=r"timeout after 0\.05") as info:
        pool.get(timeout=0.05)
    assert isinstance(info.value, PoolException)
    with pytest.raises(TimeOut, match="timeout after 0"):
        pool.get(timeout=0)  # mppool: 0 means do not wait
    pool.ret(held)
    pool.shutdown()


def test_pool_timeout_applies_when_get_has_none() -> None:
    pool = Pool(lambda i: i, max_size=1, timeout=0.05)
    held = pool.get()
    with pytest.raises(TimeOut, match=r"timeout after 0\.05"):
        pool.get()
    pool.ret(held)
    pool.shutdown()


# ---------------------------------------------------------------- under ProxyPatternPool's Proxy


@pytest.mark.usefixtures("proxy_on_mppool")
def test_proxy_builds_an_mppool_pool_and_counts_objects() -> None:
    ref = ppp.Proxy(fun=lambda i: f"conn {i}", max_size=2)
    assert isinstance(ref._pool, mppool.Pool)
    assert ref.upper() == "CONN 0"  # forwarded to this thread's object
    assert ref._nobjs == 1 and len(ref._pool._using) == 1 and len(ref._pool._avail) == 0
    assert ref._get_obj() == "conn 0"  # the same object while this thread holds it
    ref._ret_obj()
    assert not ref._has_obj() and len(ref._pool._avail) == 1
    with ref._obj() as o:
        assert o == "conn 0"
    assert ref._pool._nuses == 2
    ref._pool.shutdown()


@pytest.mark.usefixtures("proxy_on_mppool")
def test_proxy_threads_get_their_own_objects_then_time_out(runner: Runner) -> None:
    ref = ppp.Proxy(fun=lambda i: i, max_size=2)
    first = threading.Event()
    release = threading.Event()

    def hold(wait_first: bool) -> str:
        if wait_first:
            assert first.wait(5)
        value = str(ref)  # gets an object for this thread and keeps it
        first.set()
        assert release.wait(5)
        return value

    boxes = [runner.start(lambda: hold(False)), runner.start(lambda: hold(True))]
    wait_until(lambda: ref._pool._nuses == 2, what="both threads hold an object")
    with pytest.raises(TimeOut, match="timeout after"):
        ref._get_obj(timeout=0.05)
    assert not ref._has_obj()
    release.set()
    runner.join_all()
    assert sorted(b["result"] for b in boxes) == ["0", "1"]
    ref._pool.shutdown()


@pytest.mark.usefixtures("proxy_on_mppool")
def test_proxy_passes_pool_options_through() -> None:
    closed: list[Any] = []
    ref = ppp.Proxy(fun=lambda i: [i], max_size=1, min_size=0, max_use=1, closer=closed.append)
    assert ref._pool._nobjs == 0
    assert ref._get_obj() == [0]
    ref._ret_obj()
    assert closed == [[0]]  # max_use=1: worn out at its return
    assert ref._get_obj() == [1]
    ref._ret_obj()
    ref._pool.shutdown()
