"""A small heap scheduler run by worker threads (maintenance tasks, as psycopg_pool does).

Housekeeping of every pool is a task here; because several workers run tasks, one slow hook
or health check delays its own pool only, not the others served by the same scheduler.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable

from .clock import REAL_CLOCK, Clock

log = logging.getLogger("mppool")


class Task:
    __slots__ = ("cancelled", "due", "fn", "seq")

    def __init__(self, due: float, seq: int, fn: Callable[[], None]) -> None:
        self.due = due
        self.seq = seq
        self.fn = fn
        self.cancelled = False

    def __lt__(self, other: Task) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, clock: Clock = REAL_CLOCK, workers: int = 2, name: str = "mppool-hk") -> None:
        self.clock = clock
        self._cond = threading.Condition()
        self._heap: list[Task] = []
        self._seq = itertools.count()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def enter(self, delay: float, fn: Callable[[], None]) -> Task:
        with self._cond:
            task = Task(self.clock.now() + delay, next(self._seq), fn)
            heapq.heappush(self._heap, task)
            self._cond.notify()
            return task

    def close(self, wait: bool = False) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify_all()
        if wait:
            current = threading.current_thread()
            for t in self._threads:
                if t is not current:
                    t.join(5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._heap:
                        delay = self._heap[0].due - self.clock.now()
                        if delay <= 0:
                            task = heapq.heappop(self._heap)
                            break
                        self.clock.wait(self._cond, delay)
                    else:
                        self.clock.wait(self._cond, None)
            if task.cancelled:
                continue
            try:
                task.fn()
            except Exception:  # a task must never kill its worker
                log.exception("mppool: scheduled task %r failed", task.fn)


_default: tuple[int, Scheduler] | None = None
_default_lock = threading.Lock()


def default_scheduler() -> Scheduler:
    """The process-wide scheduler for pools on the real clock (recreated after a fork)."""
    global _default
    import os

    with _default_lock:
        if _default is None or _default[0] != os.getpid():
            _default = (os.getpid(), Scheduler(REAL_CLOCK, workers=2))
        return _default[1]
