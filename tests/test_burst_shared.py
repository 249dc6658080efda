"""``burst_limit`` on a pool shared through a supervisor: the lease loop's gets follow the same
room rule as in-process gets, and returns with nobody waiting close the burst objects there."""

from __future__ import annotations

import threading

import pytest
from helpers import wait_until

import mppool

pytestmark = pytest.mark.slow


def test_shared_pool_bursts_then_settles_at_max_size(client):
    pool = client.pool("burst", lambda i: {"n": i}, max_size=2, min_size=0, burst_limit=4)
    assert pool.free() == 4
    held = [pool.get(timeout=5) for _ in range(4)]  # four holders at once, nobody waits
    assert sorted(o["n"] for o in held) == [0, 1, 2, 3]
    with pytest.raises(mppool.TimeOut):
        pool.get(timeout=0)
    s = pool.stats()
    assert s["nusing"] == 4 and s["burst_limit"] == 4 and s["max_size"] == 2

    # A fifth getter waits, and is served by the next return (a burst object, not closed).
    got: list = []
    t = threading.Thread(target=lambda: got.append(pool.get(timeout=10)))
    t.start()
    wait_until(lambda: pool.waiting() == 1)
    pool.ret(held.pop())
    t.join(10)
    assert len(got) == 1 and pool.stats()["nburst_closed"] == 0
    held += got

    # Returns with nobody waiting close the extra ones: the pool settles at max_size.
    for obj in held:
        pool.ret(obj)
    wait_until(lambda: pool.stats()["nusing"] == 0)
    s = pool.stats()
    assert s["nobjs"] == s["navail"] == 2 and s["nburst_closed"] == 2 and s["ncreated"] == 4


def test_shared_pool_burst_limit_is_validated(client):
    with pytest.raises(ValueError, match="burst_limit=1 must be >= max_size=2"):
        client.pool("bad", lambda i: i, max_size=2, burst_limit=1)
    pool = client.pool("ok", lambda i: i, max_size=2, burst_limit=3)
    with pytest.raises(ValueError, match="burst_limit=3 must be >= max_size=4"):
        pool.resize(4)
