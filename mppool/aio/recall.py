"""The budget recall of `mppool.aio.ConnectionPool`: when other processes wait for the budget
its connections hold, idle connections are closed to give their tokens back, and connections
in use are closed at their return (``_recall_n`` of them), so that an idle or busy process
cannot starve the others. A task per pool asks the budget every ``RECALL_PERIOD`` seconds,
only while the pool holds connections; the next acquire starts it again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

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
    _recall_n: int
    _recall_task: asyncio.Task[None] | None

    @property
    def _total(self) -> int:
        raise NotImplementedError

    async def _close(self, slot: Any, quiet: bool = False) -> None:
        raise NotImplementedError

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
        while not self._closed:
            await asyncio.sleep(RECALL_PERIOD)
            if not self._total:
                self._recall_n = 0
                return
            try:
                await self.recall()
            except Exception:
                log.exception("mppool.aio: budget recall failed")

    async def recall(self) -> int:
        """Close idle connections that other processes wait for; the budget's ``waiting()``
        says how many. Only asks it when this pool holds connections; those in use are
        given back at their return instead. Returns how many were closed now."""
        waiting = getattr(self.budget, "waiting", None)
        if waiting is None or not (self._idle or self.in_use):
            self._recall_n = 0
            return 0
        try:
            wanted = int(await waiting())
        except Exception:
            log.debug("mppool.aio: budget.waiting() failed", exc_info=True)
            return 0
        n = max(0, min(wanted, len(self._idle)))
        slots = [self._idle.popleft() for _ in range(n)]  # the longest idle first
        self.currently_deallocating += n
        self._counts["recalled"] += n
        self._recall_n = max(0, min(wanted - n, self.in_use))
        for slot in slots:
            await self._close(slot, quiet=True)
        if n:
            log.info("mppool.aio: gave %d idle connection(s) back to the budget", n)
        return n
