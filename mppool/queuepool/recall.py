"""The budget recall of queuepool's `Pool`: when other processes wait for the budget its open
managers hold, managers are closed to give their tokens back, with the core pool's
demand-based policy and its hysteresis (`mppool.budget`: ``recall_wait``, ``plan_recall``,
``RECALL_PATIENCE``, ``RECALL_MIN_USES``, ``RECALL_MAX_HOLD``, ``RECALL_PERIOD``, read at each
call), so that an idle or busy process cannot starve the others and no resource is churned.

- Only demand moves tokens: nothing is closed unless the budget's ``waiting()`` says another
  process waits, and never more managers than there are waiters.
- An idle open manager is closed once it is due: its idle time plus the demand's age
  (counted from its opening if later) reaches the patience, and it has paid for its opening
  (``RECALL_MIN_USES`` takes since it was opened, or idle for the patience); the most owed
  (the longest idle) first. It keeps its place in the pool, closed: a take opens it again.
- The rest of the demand falls on managers in use: each is closed at its put once due (the
  score, and its takes or ``RECALL_MAX_HOLD`` of demand), and only if ``waiting()``, asked
  again at that put, still says somebody waits (the demand the last round saw may have been
  served since, by another process's recall).

A round runs on the default scheduler every ``RECALL_PERIOD`` seconds, sooner when an idle
manager falls due (``RECALL_MIN_DELAY`` at the soonest); it asks the budget only while the
pool holds an open manager. The times are the managers' own ``_lastOpened`` (its opening)
and ``_lastUsed`` (its last take or put), the uses its ``_usageCount``: what
`ResourceManager.open` and the pool keep for the recycling limits.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from .. import budget
from ..budget import Budget
from ..sched import Task, default_scheduler

if TYPE_CHECKING:
    from .pool import ResourceManager

log = logging.getLogger("mppool")

_REASON = "another process waits for the budget"


class Recall:
    """The recall side of queuepool's `Pool` (see the module docstring)."""

    # The pool's, read here.
    name: str
    _budget: Budget | None
    _tokens: dict[int, Any]
    _lock: threading.Lock
    _closed: bool
    _idle: list[ResourceManager]

    def _init_recall(self) -> None:
        self._recall: Task | None = None
        self._recall_n = 0  # puts that may close their manager (see _recall_wanted)
        self._recall_since: float | None = None  # since when others wait, as this pool saw it
        self._recalled = 0  # managers closed for the budget (stats()["recalled"])

    def _start_recall(self) -> None:
        """Start the rounds, if the budget can say whether anybody waits."""
        if self._budget is not None and callable(getattr(self._budget, "waiting", None)):
            self._recall = default_scheduler().enter(budget.RECALL_PERIOD, _weak_recall(self))

    def _stop_recall(self) -> None:
        """For close(): no more rounds."""
        if self._recall is not None:
            self._recall.cancel()

    def _stop_demand(self) -> None:
        """Under the lock: nobody waits for the budget (or nothing is open): forget it."""
        self._recall_n = 0
        self._recall_since = None

    def recall(self) -> int:
        """One recall round now: close the idle open managers that are due (see
        `mppool.budget.recall_wait`), giving their tokens to a budget other processes wait
        for. Returns how many were closed now; managers in use are closed at a put once
        due."""
        return self._recall_round()[0]

    def _recall_tick(self) -> None:
        if self._closed:
            return
        delay = budget.RECALL_PERIOD
        try:
            later = self._recall_round()[1]
            if later is not None:  # an idle manager falls due before the next period
                delay = min(delay, max(budget.RECALL_MIN_DELAY, later))
        except Exception:
            log.debug("mppool: queuepool %r: budget recall failed", self.name, exc_info=True)
        finally:
            if not self._closed:
                self._recall = default_scheduler().enter(delay, _weak_recall(self))

    def _recall_round(self) -> tuple[int, float | None]:
        """Ask the budget whether anybody waits (only while a manager is open), close the
        idle managers that are due, arm the puts of those in use. Returns how many were
        closed, and in how many seconds the next idle one falls due (None: none)."""
        waiting = getattr(self._budget, "waiting", None)
        with self._lock:
            if self._closed or waiting is None or not self._tokens:
                self._stop_demand()
                return 0, None
        try:
            wanted = int(waiting())  # a round trip to the supervisor: outside the lock
        except Exception:
            log.debug("mppool: queuepool %r: budget.waiting() failed", self.name, exc_info=True)
            return 0, None
        with self._lock:
            if wanted <= 0 or self._closed:
                self._stop_demand()
                return 0, None
            now = self._now()
            if self._recall_since is None:
                self._recall_since = now
            idle = [r for r in self._idle if r._isOpen]
            close, later = budget.plan_recall(
                now, wanted, [(_stamp(r._lastUsed), _stamp(r._lastOpened)) for r in idle],
                self._recall_since, budget.RECALL_PATIENCE, [r._usageCount or 0 for r in idle])
            victims = [idle[i] for i in close]
            self._idle = [r for r in self._idle if all(r is not v for v in victims)]
            self._recalled += len(victims)
            # The rest of the demand falls on the open managers in use, at their put.
            self._recall_n = max(0, min(wanted - len(victims), len(self._tokens) - len(idle)))
        if victims:
            try:
                for r in victims:
                    self._close(r, _REASON)
            finally:
                self._restore(victims)  # closed, in their place: a take opens them again
            log.debug("mppool: queuepool %r: closed %d idle manager(s) for the budget",
                      self.name, len(victims))
        return len(victims), later

    def _recall_wanted(self, r: ResourceManager) -> bool:
        """At the put of ``r`` (open) while puts are armed: True if it must be closed for
        the budget: it is due (as the core pool's ``_recall_due``) and somebody still waits,
        asked again now (a round trip only on such puts)."""
        with self._lock:
            since = self._recall_since
            if (self._recall_n <= 0 or since is None
                    or budget.recall_wait(self._now(), None, _stamp(r._lastOpened), since,
                                          r._usageCount or 0, budget.RECALL_PATIENCE) > 0.0):
                return False
        try:
            wanted = int(self._budget.waiting())  # type: ignore[union-attr]
        except Exception:
            log.debug("mppool: queuepool %r: budget.waiting() failed", self.name, exc_info=True)
            return False
        with self._lock:
            if wanted <= 0:
                self._stop_demand()
                return False
            if self._recall_n <= 0:  # another put took the last one meanwhile
                return False
            self._recall_n -= 1
            self._recalled += 1
        return True

    # The pool's.
    def _now(self) -> float:
        raise NotImplementedError

    def _close(self, r: ResourceManager, why: str) -> None:
        raise NotImplementedError

    def _restore(self, managers: list[ResourceManager]) -> None:
        raise NotImplementedError


def _stamp(t: float | None) -> float:
    """A manager's time; a manager whose ``open()`` did not call the base class's keeps none:
    as if long ago, so that it can still go back (the budget must not starve)."""
    return 0.0 if t is None else t


def _weak_recall(pool: Recall) -> Any:
    ref = weakref.ref(pool)

    def tick() -> None:
        target = ref()
        if target is not None:
            target._recall_tick()

    return tick
