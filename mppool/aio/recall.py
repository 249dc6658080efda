"""The budget recall of `mppool.aio.ConnectionPool`: when other processes wait for the budget
its connections hold, connections go back to it, with the core pool's demand-based policy
and its hysteresis (`mppool.budget`: ``recall_wait``, ``plan_recall``, ``RECALL_PATIENCE``,
``RECALL_MIN_USES``, ``RECALL_MAX_HOLD``, read at each call), so that an idle or busy process
cannot starve the others and no connection is churned.

- Only demand moves tokens: nothing goes back unless the budget's ``waiting()`` says another
  process waits, and never more connections than there are waiters.
- An idle connection goes back once it is due: its idle time plus the demand's age (counted
  from the connection's creation if later) reaches the patience, and it has paid for its
  open (``RECALL_MIN_USES`` uses, or idle for the patience); the most owed first.
- The rest of the demand falls on connections in use: each goes back at its return once due
  (the score, and its uses or ``RECALL_MAX_HOLD`` of demand), and only if ``waiting()``,
  asked again at that return, still says somebody waits (the demand the last round saw may
  have been served since, by another process's recall).

A task per pool runs a round every ``RECALL_PERIOD`` seconds (sooner when an idle connection
falls due), only while the pool holds connections; the next acquire starts it again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .. import budget

log = logging.getLogger("mppool")

# How often a pool with a budget asks whether another process waits for it (at most).
RECALL_PERIOD = 0.05


class Recall:
    """The recall side of `mppool.aio.ConnectionPool` (see the module docstring)."""

    # The pool's, read here.
    budget: Any
    in_use: int
    currently_deallocating: int
    _closed: bool
    _idle: Any
    _counts: dict[str, int]
    _recall_task: asyncio.Task[None] | None

    def _init_recall(self) -> None:
        self._recall_n = 0  # returns that may close their connection (see _recall_wanted)
        self._recall_since: float | None = None  # since when others wait, as this pool saw it
        self._recall_task = None

    def _stop_demand(self) -> None:
        """Nobody waits for the budget (or this pool holds nothing): forget the demand."""
        self._recall_n = 0
        self._recall_since = None

    def _ensure_recall(self) -> None:
        """Start the recall task in the running loop (at most one per pool)."""
        if not callable(getattr(self.budget, "waiting", None)) or self._closed:
            return
        task = self._recall_task
        loop = asyncio.get_running_loop()
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._recall_task = loop.create_task(self._recall_loop(),
                                             name="mppool.aio.ConnectionPool recall")

    async def _recall_loop(self) -> None:
        """Runs while the pool holds connections; the next get_connection() restarts it."""
        delay = RECALL_PERIOD
        while not self._closed:
            await asyncio.sleep(delay)
            if not self._total:
                self._stop_demand()
                return
            delay = RECALL_PERIOD
            try:
                later = (await self._recall_round())[1]
            except Exception:
                log.exception("mppool.aio: budget recall failed")
                continue
            if later is not None:  # an idle connection falls due before the next period
                delay = min(RECALL_PERIOD, max(budget.RECALL_MIN_DELAY, later))

    async def _stop_recall(self) -> None:
        """For close(): end the recall task (awaited if it runs in this loop)."""
        task, self._recall_task = self._recall_task, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                try:
                    await task
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                        raise

    async def recall(self) -> int:
        """One recall round now: give the idle connections that are due (see
        `mppool.budget.recall_wait`) back to a budget other processes wait for. Returns how
        many were closed now; connections in use go back at a return once due."""
        return (await self._recall_round())[0]

    async def _recall_round(self) -> tuple[int, float | None]:
        """Ask the budget whether anybody waits (only when this pool holds connections),
        close the idle connections that are due, arm the returns of those in use. Returns
        how many were closed, and in how many seconds the next idle one falls due (None:
        none)."""
        waiting = getattr(self.budget, "waiting", None)
        if waiting is None or not (self._idle or self.in_use):
            self._stop_demand()
            return 0, None
        try:
            wanted = int(await waiting())
        except Exception:
            log.debug("mppool.aio: budget.waiting() failed", exc_info=True)
            return 0, None
        if wanted <= 0:
            self._stop_demand()
            return 0, None
        # No await from here to the closes: the idle connections planned are those removed.
        now = self._now()
        if self._recall_since is None:
            self._recall_since = now
        idle = list(self._idle)
        close, later = budget.plan_recall(now, wanted, [(s.stamp, s.created) for s in idle],
                                          self._recall_since, budget.RECALL_PATIENCE,
                                          [s.uses for s in idle])
        slots = [idle[i] for i in close]  # the most owed (the longest idle) first
        for slot in slots:
            self._idle.remove(slot)
        n = len(slots)
        self.currently_deallocating += n
        self._counts["recalled"] += n
        self._recall_n = max(0, min(wanted - n, self.in_use))
        for slot in slots:
            await self._close(slot, quiet=True)
        if n:
            log.info("mppool.aio: gave %d idle connection(s) back to the budget", n)
        return n, later

    async def _recall_wanted(self, slot: Any) -> bool:
        """For a connection coming back while returns are armed (``_recall_n``): True if it
        is due (`mppool.budget.recall_wait`, as the core pool's ``_recall_due``) and somebody
        still waits for the budget, asked again now (a round trip only on such returns: the
        demand the last round saw may have been served since)."""
        since = self._recall_since
        if since is None or budget.recall_wait(self._now(), None, slot.created, since,
                                               slot.uses, budget.RECALL_PATIENCE) > 0.0:
            return False  # not due: the score, or its uses (or the max hold), not reached
        try:
            wanted = int(await self.budget.waiting())
        except Exception:
            log.debug("mppool.aio: budget.waiting() failed", exc_info=True)
            return False
        if wanted <= 0:
            self._stop_demand()
        return wanted > 0 and self._recall_n > 0

    # The pool's.
    @property
    def _total(self) -> int:
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError

    async def _close(self, slot: Any, quiet: bool = False) -> None:
        raise NotImplementedError
