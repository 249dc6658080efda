"""Where mppool's own threads run things: the heap scheduler and the hook executors.

``Scheduler``: a small heap scheduler run by worker threads (maintenance tasks, as psycopg_pool
does). Housekeeping of every pool is a task here. Its threads are shared by many pools, so
they must never die and never block: a round only *decides* (under the pool lock) and hands
the user's code (``fun``, closers, health checks, resets) to the pool's runner.

``HookExecutor``: a few daemon threads that run one pool's user code. In the supervisor each
pool has its own, so a hook that hangs forever holds threads of its own pool only, and at most
``max_workers`` of them; the watchdog, lease kills and other pools keep running.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .clock import REAL_CLOCK, Clock, clamp_wait
from .ratelog import RateLimitedLog

log = logging.getLogger("mppool")


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
        self._errors = RateLimitedLog(10.0)
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
                self._errors.error("loop", "mppool: scheduler failed while waiting for a task",
                                   exc_info=True)
                time.sleep(self.ERROR_BACKOFF)
                continue
            if task is None:
                return
            if task.cancelled:
                continue
            try:
                task.fn()
            except Exception:  # a task must never kill its worker
                self._errors.error("task", "mppool: scheduled task %r failed", task.fn,
                                   exc_info=True)
            finally:
                del task  # do not keep the last task (and the pool it holds) alive while idle


class HookExecutor:
    """Up to ``max_workers`` daemon threads running one pool's user code, started on demand.

    Unlike ``concurrent.futures.ThreadPoolExecutor``: its threads are daemons, so a hook that
    never returns does not keep the process from exiting; a thread that cannot be started
    (``RuntimeError: can't start new thread``) makes ``submit`` raise with the call *not*
    queued, so the caller knows for sure it will never run; idle threads exit after
    ``idle_timeout`` seconds, so a quiet pool holds no threads.
    """

    def __init__(self, max_workers: int = 4, name: str = "mppool-run",
                 idle_timeout: float = 30.0) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        self.max_workers = max_workers
        self.name = name
        self.idle_timeout = idle_timeout
        self._cond = threading.Condition()
        self._queue: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._nthreads = 0
        self._idle = 0
        self._busy = 0
        self._closed = False
        self._names = itertools.count()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on one of the threads; RuntimeError if that cannot happen (closed,
        or no thread could be started), in which case ``fn`` will never run."""
        fut: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self.name}: executor is closed")
            self._queue.append((fut, fn, args))
            if len(self._queue) <= self._idle:
                self._cond.notify()
            elif self._nthreads < self.max_workers:
                t = threading.Thread(target=self._work, name=f"{self.name}-{next(self._names)}",
                                     daemon=True)
                try:
                    t.start()
                except BaseException:
                    # Still under the lock: no worker can have taken it, so it is certain
                    # that it will never run.
                    self._queue.pop()
                    raise
                self._nthreads += 1
            # else: every thread is busy; it runs when one frees up (user code that hangs
            # keeps it queued, which delays this pool only).
        return fut

    def run(self, fn: Callable[[], None]) -> None:
        """The ``runner`` of a ``Pool``: ``fn()`` soon, on one of these threads."""
        self.submit(fn)

    def close(self) -> None:
        """Cancel what is queued and let idle threads exit; running calls are not waited for
        (they may hang forever: their threads are daemons)."""
        with self._cond:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for fut, _, _ in queued:
            fut.cancel()

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"threads": self._nthreads, "busy": self._busy, "queued": len(self._queue)}

    def _work(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self.idle_timeout
                while not self._queue:
                    left = deadline - time.monotonic()
                    if self._closed or left <= 0:
                        self._nthreads -= 1  # decided under the lock: submit() sees it at once
                        return
                    self._idle += 1
                    try:
                        self._cond.wait(clamp_wait(left))
                    finally:
                        self._idle -= 1
                fut, fn, args = self._queue.popleft()
                self._busy += 1
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        result = fn(*args)
                    except BaseException as exc:  # reported to whoever holds the future
                        fut.set_exception(exc)
                    else:
                        fut.set_result(result)
            finally:
                with self._cond:
                    self._busy -= 1
                del fut, fn, args


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
