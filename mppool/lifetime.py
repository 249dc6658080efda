"""How a core pool begins and ends: ``open()``, ``wait()``, ``shutdown(delay)`` (alias
``close()``), ``with Pool(...)``, a pool dropped without shutdown, and a fork.

    Pool(..., open=True) ─▶ open(): housekeeping and recall start, min_size is filled
    Pool(..., open=False): nothing is created, nothing runs; gets raise PoolClosed until
                           open() (psycopg_pool's lifecycle)
    wait(timeout=30.0)     blocks until min_size objects exist, else TimeOut (naming the
                           last creation error, if creation fails)
    with Pool(...) as p:   opened on entry if it was not, closed on exit

    shutdown(delay), under the lock:                      then, outside it:
      every waiter ── set(PoolClosed) ──▶ its getter        housekeeping and recall tasks
      idle entries ──▶ _to_close                            cancelled; _settle() closes all
      leases out: wait up to ``delay`` for their return     (closer, budget tokens back)
        (checkin notifies _drained), then ──▶ _to_close

Scheduled tasks hold a pool weakly (see PoolState._weak_task), so a pool that is simply
dropped is finalized by ``__del__``: its objects are closed and its budget tokens go back,
instead of being kept for the life of the process.

A pool inherited through ``fork()`` starts empty in the child, with a new lock and its
housekeeping on threads that exist there: the parent's objects (and tokens) stay the
parent's, and closing one in the child could, say, end a database session the parent uses.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from types import TracebackType
from typing import Any

from .budget import RECALL_PERIOD
from .clock import clamp_wait
from .errors import PoolClosed, TimeOut
from .sched import Scheduler, default_scheduler
from .state import PoolState
from .validate import check_duration, check_timeout

log = logging.getLogger("mppool")

_pools: weakref.WeakSet[Lifetime] = weakref.WeakSet()  # every pool, for the fork hook


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class OpenClose:
    """``with pool:`` opens the pool on entry (if it was not) and closes it on exit; the
    sync pools with psycopg_pool's lifecycle (the core pool, queuepool's) share it."""

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        self.open()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Lifetime(OpenClose, PoolState):
    """The end of a core `mppool.Pool` (see the module docstring)."""

    def _register(self) -> None:
        """Known to the fork hook from now on (weakly)."""
        _pools.add(self)

    # Set by the constructor, for open().
    _hk_delay: float | None
    _own_clock: bool
    _fill_at_open = True  # False in werkzeug's reloader parent (PPP_WERKZEUG_WORKAROUND)

    def open(self, wait: bool = False, timeout: float | None = 30.0) -> None:
        """Start the pool: housekeeping, recall, and ``min_size`` objects (creation errors
        are logged, not raised). A no-op if it is open; PoolClosed once it was shut down.
        ``wait=True``: then `wait` for ``min_size`` objects, up to ``timeout`` seconds."""
        with self._lock:
            if self._shutdown:
                raise PoolClosed(f"pool {self._name!r} is shutting down: it cannot be opened")
            opened, self._opened = self._opened, True
        if not opened:
            self._start_housekeeping(self._hk_delay, self._sched_arg, own_clock=self._own_clock)
            self._start_recall(self._sched_arg, own_clock=self._own_clock)
            if self._fill_at_open:
                self._fill()
        if wait:
            self.wait(timeout)

    def wait(self, timeout: float | None = 30.0) -> None:
        """Block until ``min_size`` objects exist (idle or in use); TimeOut after ``timeout``
        seconds (None: as long as it takes), PoolClosed if the pool is not open."""
        limit = check_timeout("timeout", timeout)
        with self._lock:
            deadline = None if limit is None else self._clock.now() + limit
            while True:
                if self._shutdown or not self._opened:
                    raise PoolClosed(f"pool {self._name!r} is not open (open=False) or is "
                                     "shutting down")
                have = len(self._avail) + len(self._using)
                if have >= self._min_size:
                    return
                left = None if deadline is None else deadline - self._clock.now()
                if left is not None and left <= 0:
                    error = self._outage.error
                    raise TimeOut(f"pool {self._name!r}: {have} of min_size={self._min_size} "
                                  f"objects after {timeout} s"
                                  + (f"; creating them fails: {type(error).__name__}: {error}"
                                     if error is not None else ""))
                self._clock.wait(self._filled, left)

    def close(self, delay: float | None = 0.0) -> None:
        """`shutdown` (psycopg_pool's name)."""
        self.shutdown(delay)

    def shutdown(self, delay: float | None = 0.0) -> None:
        """Close every object, wake every waiter with PoolClosed; later gets raise it.

        ``delay``: how long to wait for objects in use to come back before closing them
        anyway (None or ``inf``: as long as it takes).
        """
        wait_for = check_duration("delay", delay)
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            self._filled.notify_all()
            waiters, self._waiters = self._waiters, deque()
            for w in waiters:
                w.set(PoolClosed(f"pool {self._name!r} is shutting down"))
            self._to_close.extend(self._avail)
            self._avail.clear()
            deadline = None if wait_for is None else self._clock.now() + wait_for
            self._draining = True
            while self._using and (deadline is None
                                   or (wait_for and self._clock.now() < deadline)):
                # Clamped (1e300 s is a legal delay) and re-checked by this loop.
                self._drained.wait(clamp_wait(None if deadline is None
                                              else deadline - self._clock.now()))
            self._draining = False
            if self._using:
                log.warning("mppool: pool %r shutting down with %d objects in use: closing them",
                            self._name, len(self._using))
                self._to_close.extend(self._using.values())
                self._using.clear()
                self._by_obj.clear()
        for task in (self._hk_task, self._recall_task, self._refill_task):
            if task is not None:
                task.cancel()
        if self._own_sched and self._sched is not None:
            self._sched.close()
        self._settle()

    def __del__(self) -> None:
        try:
            if not self._shutdown:
                self.shutdown()  # objects closed, budget tokens given back
        except Exception:
            pass  # interpreter shutdown, or a supervisor already gone

    def _after_fork_in_child(self) -> None:
        """A pool inherited through fork starts empty in the child: its objects (and their
        budget tokens) are the parent's, and closing one here could, say, end a database
        session the parent still uses. Housekeeping moves to threads that exist here."""
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._filled = threading.Condition(self._lock)
        self._refill_task = None
        for container in (self._avail, self._using, self._by_obj, self._waiters, self._to_close):
            container.clear()
        self._ncreating = self._nchecking = self._recall_n = 0
        self._recall_since = None
        self._inflight.clear()  # jobs running in the parent are no concern of the child's
        if self._sched is None or self._shutdown:
            return
        self._sched = Scheduler(self._clock, workers=1) if self._own_sched else default_scheduler()
        if self._hk_task is not None:
            self._hk_task = self._sched.enter(self._delay, self._weak_hk)
        if self._recall_task is not None:
            self._recall_task = self._sched.enter(RECALL_PERIOD, self._weak_recall)

