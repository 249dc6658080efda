"""Where mppool's own threads run things: the heap scheduler.

``Scheduler``: a small heap scheduler run by worker threads (maintenance tasks, as psycopg_pool
does). Housekeeping of every pool is a task here. Its threads are shared by many pools, so
they must never die and never block: a round only *decides* (under the pool lock) and hands
the user's code (``fun``, closers, health checks, resets) to the pool's runner.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from .clock import REAL_CLOCK, Clock

log = logging.getLogger("mppool")


class LogLimiter:
    """Let a repeating message through at most once per ``interval`` seconds.

    ``allow()`` returns None while the message is muted, else how many were muted since the
    last one let through (to be mentioned in it), so a failure that repeats in a loop cannot
    flood the log.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last = -math.inf
        self._muted = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                self._muted += 1
                return None
            self._last = now
            muted, self._muted = self._muted, 0
            return muted


def check_task_delay(delay: Any) -> float:
    """A scheduler delay: a number >= 0 (``inf``: never due). NaN or a negative number would
    sort the heap wrongly (NaN compares false with everything), so they are refused here."""
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise TypeError(f"delay must be a number of seconds, got {delay!r}")
    delay = float(delay)
    if math.isnan(delay) or delay < 0:
        raise ValueError(f"delay must be a number of seconds >= 0, got {delay!r}")
    return delay


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
    """Run ``fn`` after ``delay`` seconds on one of ``workers`` threads.

    Tasks must be short and must not run user code: several pools share these threads.
    """

    ERROR_BACKOFF = 0.05  # after a failure outside a task (the clock itself), not to spin

    def __init__(self, clock: Clock = REAL_CLOCK, workers: int = 2, name: str = "mppool-hk") -> None:
        self.clock = clock
        self._cond = threading.Condition()
        self._heap: list[Task] = []
        self._seq = itertools.count()
        self._closed = False
        self._task_errors = LogLimiter()
        self._loop_errors = LogLimiter()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def enter(self, delay: float, fn: Callable[[], None]) -> Task:
        """Run ``fn`` in ``delay`` seconds (a number >= 0; ``inf`` or a huge one: never runs,
        but costs nothing: the workers wait for it in bounded pieces)."""
        delay = check_task_delay(delay)
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

    def _next(self) -> Task | None:
        """Wait for the next due task; None once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._heap:
                    delay = self._heap[0].due - self.clock.now()
                    if delay <= 0:
                        return heapq.heappop(self._heap)
                    self.clock.wait(self._cond, delay)  # clamped: re-checked in this loop
                else:
                    self.clock.wait(self._cond, None)

    def _run(self) -> None:
        # Nothing may end this loop but close(): a dead worker would silently stop the
        # housekeeping of every pool it served (and there is no one to notice).
        while True:
            try:
                task = self._next()
            except Exception:
                muted = self._loop_errors.allow()
                if muted is not None:
                    log.exception("mppool: scheduler failed while waiting for a task (%d similar "
                                  "errors not logged)", muted)
                time.sleep(self.ERROR_BACKOFF)
                continue
            if task is None:
                return
            if task.cancelled:
                continue
            try:
                task.fn()
            except Exception:  # a task must never kill its worker
                muted = self._task_errors.allow()
                if muted is not None:
                    log.exception("mppool: scheduled task %r failed (%d similar errors not logged)",
                                  task.fn, muted)
            finally:
                del task  # do not keep the last task (and the pool it holds) alive while idle


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
