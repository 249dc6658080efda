"""psycopg_pool's counters as running totals (mppool.counters.totals): what Prometheus
exports must never go down, whatever pop_stats() resets; and the pools read them without
ever waiting for their lock (poolmetrics.py writes them after each get)."""

from __future__ import annotations

from typing import Any

import mppool
from mppool import counters
from mppool.queuepool import Pool as QueuePool
from mppool.queuepool import ResourceManager


def fresh() -> dict[str, Any]:
    return dict.fromkeys((*counters.KEPT, "nuses"), 0)


def test_totals_run_on_through_pops() -> None:
    c = fresh()
    c["nuses"] += 3
    c["usage_s"] += 0.0104
    c["requests_errors"] += 1
    c["requests_adj"] += 1
    assert counters.totals(c) == counters.report(c)
    before = counters.totals(c)
    assert before["requests_num"] == 4 and before["usage_ms"] == 10
    popped = counters.pop(c)
    assert popped == before and counters.report(c)["requests_num"] == 0
    assert counters.totals(c) == before, "a pop does not move the totals"
    c["nuses"] += 2
    c["usage_s"] += 0.002
    counters.pop(c)
    counters.pop(c)  # nothing since: adds nothing
    after = counters.totals(c)
    assert after["requests_num"] == 6 and after["usage_ms"] == 12
    assert after["requests_errors"] == 1


def test_core_pool_totals_survive_pop_stats_and_never_wait_for_the_lock() -> None:
    pool = mppool.Pool(lambda i: object(), max_size=1, min_size=0)
    try:
        for _ in range(3):
            pool.ret(pool.get())
        pool.pop_stats()
        pool.ret(pool.get())
        totals = pool._counter_totals()
        assert totals is not None and totals["requests_num"] == 4
        assert pool.stats()["requests_num"] == 1
        with pool._lock:
            assert pool._counter_totals() is None  # busy (here: held by the caller)
    finally:
        pool.shutdown()


def test_queuepool_totals_count_the_takes_out() -> None:
    pool = QueuePool("q", 1)
    pool.put(ResourceManager("r"))
    pool.put(pool.take())
    pool.pop_stats()
    r = pool.take()
    totals = pool._counter_totals()
    assert totals is not None and totals["requests_num"] == 2  # the take out included
    with pool._lock:
        assert pool._counter_totals() is None
    pool.put(r)
    assert pool._counter_totals()["requests_num"] == 2  # type: ignore[index]
    pool.close()
