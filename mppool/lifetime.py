"""How a core pool ends: ``shutdown(delay)``, a pool dropped without it, and a fork.

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

from .budget import RECALL_PERIOD
from .clock import clamp_wait
from .errors import PoolClosed
from .sched import Scheduler, default_scheduler
from .state import PoolState
from .validate import check_duration

log = logging.getLogger("mppool")

_pools: weakref.WeakSet[Lifetime] = weakref.WeakSet()  # every pool, for the fork hook


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Lifetime(PoolState):
    """The end of a core `mppool.Pool` (see the module docstring)."""

    def _register(self) -> None:
        """Known to the fork hook from now on (weakly)."""
        _pools.add(self)

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
        for task in (self._hk_task, self._recall_task):
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

