"""Creation failures: back off, fail gets fast, tell the user once per outage.

When ``fun`` raises (the database is down, the role may not log in), trying again at every
get or every housekeeping round would hammer a server that is already in trouble, and make
every caller wait for a connect that will fail. So a failure opens an *outage*:

    fun raises ─▶ Outage.failed(): next attempt in 1 s, then 2, 4, 8... (x2, ±10% jitter,
                  at most MAX_DELAY), the last one before ``reconnect_timeout`` landing on it
    meanwhile   ─▶ a get that would create raises the last creation error at once (a copy,
                  with a note saying when the next attempt is due), costing no slot and no
                  call of fun; min_size is refilled by a task scheduled for the next attempt
    when due    ─▶ one attempt (a *probe*) at a time, made by whichever get or refill comes
                  first; the others still fail fast
    outage lasted reconnect_timeout ─▶ ``reconnect_failed(pool)``, once per outage; the
                  attempts go on (at MAX_DELAY at most), so service resumes by itself
    a creation succeeds ─▶ the outage is over: gets create freely again

`mppool.outage.Outage` is the pure state machine (fed with times under the pool lock,
unit-tested without a clock); `Reconnecting` is the core pool's side of it: what happens
after a failure (the hook, the refill task). The gate itself is in ``PoolState._create``.
"""

from __future__ import annotations

import logging
from typing import Any

from .clock import REAL_CLOCK
from .outage import INITIAL_DELAY, Outage, failed, gave_up, succeeded
from .sched import Scheduler, Task, default_scheduler
from .state import PoolState
from .validate import check_callable, check_duration

log = logging.getLogger("mppool")

class Reconnecting(PoolState):
    """The outage side of the core `mppool.Pool` (see the module docstring)."""

    def _init_reconnect(self, reconnect_timeout: Any, reconnect_failed: Any) -> None:
        """Check and keep the options (no other state: nothing is created yet)."""
        timeout = check_duration("reconnect_timeout", reconnect_timeout)
        check_callable("reconnect_failed", reconnect_failed)
        self._outage = Outage(timeout)
        self._reconnect_failed = reconnect_failed
        self._refill_task: Task | None = None

    def _creation_failed(self, exc: BaseException, ticket: int) -> bool:
        """Under the lock: fun raised; True if reconnect_failed is due."""
        return failed(self._outage, self._clock.now(), exc, ticket, f"pool {self._name!r}")

    def _creation_succeeded(self) -> None:
        """Under the lock: fun worked."""
        succeeded(self._outage, self._clock.now(), f"pool {self._name!r}")

    def _after_failure(self, due: bool) -> None:
        """Outside the lock, after a failed creation: tell the user if the outage has lasted
        reconnect_timeout, and make sure min_size is refilled when the next attempt is due."""
        if due:
            gave_up(self._outage, f"pool {self._name!r}")
            if self._reconnect_failed is not None:
                self._hook("reconnect_failed", self._reconnect_failed, self)
        try:
            self._schedule_refill()
        except Exception:  # fun's own error is the one the caller must see
            log.exception("mppool: pool %r: could not schedule the next attempt", self._name)

    def _schedule_refill(self, at_least: float = 0.0) -> None:
        """A task at the next attempt's time (``at_least`` seconds from now) that refills
        min_size; one at a time."""
        with self._lock:
            if (self._shutdown or not self._min_size or not self._outage.active
                    or self._refill_task is not None):
                return
            if self._sched is None:
                if self._sched_arg is not None:
                    self._sched = self._sched_arg
                elif self._clock is REAL_CLOCK:
                    self._sched = default_scheduler()
                else:
                    self._sched, self._own_sched = Scheduler(self._clock, workers=1), True
            delay = max(at_least, self._outage.next_at - self._clock.now())
            self._refill_task = self._sched.enter(delay, self._weak_task("_refill_tick"))

    def _refill_tick(self) -> None:
        with self._lock:
            self._refill_task = None
            if self._shutdown:
                return
        if not self._offload("fill", self._fill):
            self._schedule_refill(INITIAL_DELAY)  # a fill runs, or the runner refused: later
