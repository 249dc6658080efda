"""Budgets: one token pool caps the live objects of many pools, in many processes.

    a process: Pool(fun, budget=b)                        the budget b: a token pool, e.g.
                                                          client.token_pool(name, n)
      create (PoolState._create): draw_token() ── get ──▶ one token out per live object
                              obj = fun(i), kept with its token in its Entry
      close (PoolState._settle): closer(obj),
                              give_back(token) ── put ──▶ the token is free for any process
      recall, every RECALL_PERIOD:  b.waiting() ◀──────   another process blocks in b.get()
                              idle objects above min_size are closed now (recall()); objects
                              in use are closed at their return (_recall_n, _recall_on_return)

A token is drawn before ``fun`` runs and given back after ``closer`` returned, so the objects
alive across every process never exceed the budget, not even for a moment. Filling
``min_size`` never waits for a token (a constructor or a housekeeping round must not block on
other processes): it tries again at the next round. The common path, get and ret of an idle
object, never talks to the budget: the token stays with its object. Recall is what keeps that
from starving the other processes: idle objects are given back within ``RECALL_PERIOD``.
Recall needs the budget's optional ``waiting()``; a budget without it is only a cap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ServerUnavailable
from .sched import Scheduler, default_scheduler

log = logging.getLogger("mppool")

# How often a pool with a shared budget asks whether another process waits for it; idle
# objects are then given back within this period (the budget promise: 100 ms at the latest).
RECALL_PERIOD = 0.05


class Budget(Protocol):
    """A token pool that caps live objects across processes (a shared token pool)."""

    def get(self, timeout: float | None = None) -> Any: ...
    def put(self, token: Any) -> None: ...


def check_budget(budget: Any) -> None:
    """A budget is a token pool: something with get() and put() (a shared token pool)."""
    if budget is not None and not (callable(getattr(budget, "get", None))
                                   and callable(getattr(budget, "put", None))):
        raise TypeError(f"budget must be a token pool with get() and put(), got {budget!r}")


def draw_token(budget: Budget | None, fill: bool, timeout: float | None) -> Any:
    """A token for an object about to be made (None without a budget), drawn before ``fun``
    runs; ``fill`` (for min_size) never waits for one."""
    if budget is None:
        return None
    return budget.get(0 if fill else timeout)


def give_back(budget: Budget | None, token: Any, pool_name: str) -> None:
    """Return the token of a closed object, or of one ``fun`` failed to make; never raises
    (the object is gone either way, and fun's own error must be the one the caller sees)."""
    if token is None:
        return
    try:
        budget.put(token)  # type: ignore[union-attr]
    except ServerUnavailable as exc:
        # The supervisor is gone: so is the budget, nothing to give back.
        log.info("mppool: pool %r: budget token not returned: %s", pool_name, exc)
    except Exception:
        log.warning("mppool: pool %r: could not return a budget token", pool_name, exc_info=True)


# state.py draws and gives back tokens with the functions above, so this module cannot
# import it at run time: the mixin below is typed against PoolState, a plain class at run time.
if TYPE_CHECKING:
    from .state import PoolState as _State
else:
    _State = object


class Budgeted(_State):
    """Recall, the budget side of the core `mppool.Pool` (combined there with PoolState)."""

    def _start_recall(self, own_clock: bool) -> None:
        """Poll the budget every RECALL_PERIOD, if it can say whether anybody waits."""
        self._recall_n = 0  # returns still to close for processes that wait (see recall())
        self._recall_task = None
        self._weak_recall = self._weak_task("_recall_tick")
        budget = self._budget
        if budget is not None and callable(getattr(budget, "waiting", None)):
            if self._sched is None:
                self._sched = (Scheduler(self._clock, workers=1) if own_clock
                               else default_scheduler())
                self._own_sched = own_clock
            self._recall_task = self._sched.enter(RECALL_PERIOD, self._weak_recall)

    def _recall_on_return(self) -> bool:
        """Under the lock, for an object coming back: True if it must be closed instead of
        kept, because another process waits for the budget (a demand seen by recall())."""
        if self._recall_n > 0 and len(self._avail) + len(self._using) >= self._min_size:
            self._recall_n -= 1
            self._counts["nrecalled"] += 1
            return True
        return False

    def _recall_tick(self) -> None:
        def job() -> None:
            try:
                self.recall()  # asks the budget (a round trip), then runs closers
            except Exception:
                log.exception("mppool: pool %r: budget recall failed", self._name)

        try:
            self._offload("recall", job)
        except Exception:  # only a broken runner gets here: keep ticking
            log.exception("mppool: pool %r: budget recall failed", self._name)
        with self._lock:
            if self._shutdown or self._sched is None:
                return
        self._recall_task = self._sched.enter(RECALL_PERIOD, self._weak_recall)

    def recall(self) -> int:
        """Give idle objects above min_size back to a budget that others wait for.

        Only asks the budget (a round trip) when there is something to give; objects in
        use are given back at their next ret instead. Returns how many were closed now.
        """
        with self._lock:
            spare = min(len(self._avail), len(self._avail) + len(self._using) - self._min_size)
            if self._shutdown or (spare <= 0 and not self._using):
                self._recall_n = 0
                return 0
        try:
            wanted = int(self._budget.waiting())  # type: ignore[union-attr]
        except Exception:
            log.debug("mppool: pool %r: budget.waiting() failed", self._name, exc_info=True)
            return 0
        with self._lock:
            spare = min(len(self._avail), len(self._avail) + len(self._using) - self._min_size)
            n = max(0, min(wanted, spare))
            for _ in range(n):
                self._to_close.append(self._avail.popleft())  # the longest idle first
            self._counts["nrecalled"] += n
            self._recall_n = max(0, wanted - n)
        if n:
            log.info("mppool: pool %r: gave %d idle object(s) back to the budget", self._name, n)
            self._settle()
        return n
