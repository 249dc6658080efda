"""queuepool's Pool(budget=...) across processes: tokens move between 4 busy processes without
reopening a resource at every take (the recall's hysteresis), and the cap holds."""

from __future__ import annotations

import time
from typing import Any

import pytest
from helpers import fork_ctx, wait_until

import mppool
from mppool.queuepool import Pool, ResourceManager

pytestmark = pytest.mark.slow

CHURN, WORKERS, BUDGET, TAKES, PACE = "qp-churn", 4, 2, 60, 0.005


class Counted(ResourceManager):
    """A fake resource counted in shared memory: open now, and the most ever open."""

    def __init__(self, name: str, live: Any, peak: Any) -> None:
        super().__init__(name)
        self.live = live
        self.peak = peak
        self.opens = 0

    def open(self) -> None:
        with self.live.get_lock():
            self.live.value += 1
            self.peak.value = max(self.peak.value, self.live.value)
        self.opens += 1
        super().open()

    def close(self) -> None:
        if self._isOpen:
            with self.live.get_lock():
                self.live.value -= 1
        super().close()


def churn_worker(address: Any, authkey: bytes, live: Any, peak: Any, out: Any) -> None:
    client = mppool.connect(address, authkey)
    try:
        r = Counted("r", live, peak)
        pool = Pool(CHURN, 1, budget=client.token_pool(CHURN))
        pool.put(r)
        for _ in range(TAKES):
            m = pool.take(timeout=30)
            time.sleep(0.001)  # the query
            pool.put(m)
            time.sleep(PACE)  # the pace of the load, not a wait for a result
        pool.close()
        out.put(r.opens)
    finally:
        client.close()


def test_tokens_move_without_reopening_at_every_take(server: mppool.Server, client: Any,
                                                      procs: list[Any]) -> None:
    """4 processes with one manager each share a budget of 2, each taking at a steady pace:
    tokens must move (every process gets its turn) but, with the recall's hysteresis, at
    most about once per RECALL_MIN_USES takes, not at every take."""
    budget = client.token_pool(CHURN, BUDGET)
    ctx = fork_ctx()
    live, peak, out = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Queue()
    for _ in range(WORKERS):
        p = ctx.Process(target=churn_worker, args=(server.address, server.authkey, live, peak, out))
        procs.append(p)
        p.start()
    opens = [out.get(timeout=90) for _ in range(WORKERS)]
    for p in procs:
        p.join(10)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    takes = WORKERS * TAKES
    print(f"{sum(opens)} resources opened for {takes} takes, per process {opens}")
    assert peak.value <= BUDGET and live.value == 0
    # Closing whenever somebody waits reopens about once per 1-4 takes; the hysteresis
    # about once per RECALL_MIN_USES (20) takes of a process.
    assert sum(opens) <= takes / 8, (opens, takes)
    wait_until(lambda: budget.free() == BUDGET, what="every token back")
