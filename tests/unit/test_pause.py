"""Pool.pause()/resume()/drain(): the operator's verbs in the core pool."""

from __future__ import annotations

import threading

import pytest

from mppool import Pool, TimeOut

try:
    from helpers import wait_until
except ImportError:  # tests/ became a package
    from tests.helpers import wait_until


def test_paused_get_times_out_and_leases_continue() -> None:
    pool = Pool(fun=lambda i: {"i": i}, max_size=2, min_size=1)
    try:
        held = pool.get()
        assert pool.pause() is True
        assert pool.pause() is False  # already paused
        assert pool.stats()["paused"] is True and pool.paused
        assert pool.free() == 0  # no get would succeed without waiting
        with pytest.raises(TimeOut):
            pool.get(timeout=0)  # an idle slot exists, but paused means "as if empty"
        with pytest.raises(TimeOut):
            pool.get(timeout=0.05)
        pool.ret(held)  # a lease held through the pause is returned fine
        assert pool.stats()["navail"] == 1 and pool.stats()["nusing"] == 0
        with pytest.raises(TimeOut):
            pool.get(timeout=0)  # still paused though an object is idle
    finally:
        pool.shutdown()


def test_resume_serves_queued_gets_in_order() -> None:
    pool = Pool(fun=lambda i: {"i": i}, max_size=1, min_size=1)
    got: list[tuple[str, object]] = []
    try:
        pool.pause()
        threads = []
        for name in ("first", "second"):
            t = threading.Thread(target=lambda n=name: got.append((n, pool.get(timeout=10))))
            t.start()
            threads.append(t)
            queued = len(threads)
            wait_until(lambda k=queued: pool.waiting() == k, what=f"{name} to queue")
        assert got == []
        assert pool.resume() is True
        assert pool.resume() is False
        wait_until(lambda: len(got) == 1, what="the first waiter to be served")
        assert got[0][0] == "first"
        pool.ret(got[0][1])
        wait_until(lambda: len(got) == 2, what="the second waiter to be served")
        assert got[1][0] == "second"
        pool.ret(got[1][1])
        for t in threads:
            t.join(5)
            assert not t.is_alive()
        # unpaused, the fast path serves again
        pool.ret(pool.get(timeout=0))
    finally:
        pool.shutdown()


def test_resume_grants_room_to_create() -> None:
    pool = Pool(fun=lambda i: {"i": i}, max_size=2, min_size=0)
    try:
        pool.pause()
        box: list[object] = []
        t = threading.Thread(target=lambda: box.append(pool.get(timeout=10)))
        t.start()
        wait_until(lambda: pool.waiting() == 1, what="the get to queue")
        pool.resume()
        t.join(5)
        assert box and box[0] == {"i": 0}
        pool.ret(box[0])
    finally:
        pool.shutdown()


def test_drain_closes_idle_objects_and_refills() -> None:
    closed: list[object] = []
    pool = Pool(fun=lambda i: {"i": i}, max_size=4, min_size=2, closer=closed.append)
    try:
        held = pool.get()
        assert pool.stats()["navail"] == 1
        assert pool.drain() == 1
        assert len(closed) == 1 and closed[0] is not held
        s = pool.stats()
        assert s["nusing"] == 1 and s["navail"] == 1 and s["ncreated"] == 3  # refilled at once
        pool.ret(held)
    finally:
        pool.shutdown()
