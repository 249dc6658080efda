"""What a core pool says about itself: ``stats()`` (ProxyPatternPool's keys and more),
``pop_stats()`` (psycopg_pool's, see counters.py), ``str()`` and ``repr()``.

Everything is read under the pool lock in one go, so a snapshot is consistent (``navail +
nusing == nobjs``, and so on); the hooks that describe objects (``stats``, ``tracer``) are
the user's, and any error of theirs is shown instead of raised.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import counters
from .state import COUNTERS, Entry, PoolState


class Views(PoolState):
    """The views of the core `mppool.Pool` (see the module docstring)."""

    def stats(self) -> dict[str, Any]:
        """A JSON-compatible description, with ProxyPatternPool's keys plus ``nwaiting``."""
        with self._lock:
            now = self._clock.now()
            c = self._counts
            limit = self._burst_limit or self._max_size  # how many may be out at once
            return {
                "id": self._id,
                "started": self._started.isoformat(),
                "now": time.time(),
                "running": now - self._started_mono,
                "rel_hk_last": self._hk_last - now,
                "time_per_hk": self._hk_time / max(c["hk_rounds"], 1),
                "min_size": self._min_size,
                "max_size": self._max_size,
                "burst_limit": self._burst_limit or None,
                "max_use": self._max_use,
                "timeout": self._timeout,
                "delay": self._delay,
                "max_avail_delay": self._max_avail_delay,
                "max_lifetime": self._max_lifetime,
                "max_using_delay_kill": self._max_using_delay_kill,
                "max_using_delay_warn": self._max_using_delay_warn,
                "health_freq": self._health_freq,
                "sem": ({"value": len(self._avail) + max(0, limit - self._total()),
                         "init": limit} if limit else None),
                "navail": len(self._avail),
                "nusing": len(self._using),
                "ntodel": len(self._to_close),
                "nwaiting": sum(1 for w in self._waiters if not w.done),
                # Who waits, first come first: each waiter's pid and seconds waited so far.
                "waiters": [self._describe_waiter(w, now) for w in self._waiters if not w.done],
                "shutdown": self._shutdown,
                "paused": self._paused,
                "avail": [self._describe(e, now) for e in self._avail],
                "using": [self._describe(e, now) for e in self._using.values()],
                "nobjs": len(self._avail) + len(self._using),
                "ncreating": self._ncreating,
                "max_waiting": self._max_waiting,
                "check_after": self._check_after if self._check is not None else None,
                "reconnect_timeout": self._outage.timeout,
                "outage": self._outage.describe(now),
                **{k: c[k] for k in COUNTERS},
                "nborrows": c["nuses"],  # every lease is a use and a borrow (see COUNTERS)
                **counters.report(c),
            }

    def pop_stats(self) -> dict[str, int]:
        """psycopg_pool's counters and gauges (see counters.py); the counters restart at 0."""
        with self._lock:
            return {**counters.gauges(self._min_size, self._burst_limit or self._max_size,
                                      self._total(), len(self._avail),
                                      sum(1 for w in self._waiters if not w.done)),
                    **counters.pop(self._counts)}

    def _counter_totals(self) -> dict[str, int] | None:
        """psycopg_pool's counters as running totals, which pop_stats() does not reset (for
        Prometheus counters: poolmetrics.py); None if the lock is busy (or held by the
        caller): the lock is never waited for, the write that asked is deferred."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return counters.totals(self._counts)
        finally:
            self._lock.release()

    def __str__(self) -> str:
        return json.dumps(self.stats())

    def __repr__(self) -> str:
        with self._lock:
            return (f"<mppool.Pool {self._id} [objects: {len(self._using)} in use, "
                    f"{len(self._avail)} idle, {self._ncreating} creating | "
                    f"waiters: {len(self._waiters)} | max_size: {self._max_size or 'unbounded'}"
                    + (f", burst_limit: {self._burst_limit}" if self._burst_limit else "")
                    + "]>")

    @staticmethod
    def _describe_waiter(w: Any, now: float) -> dict[str, Any]:
        holder = getattr(w, "holder", None)
        since = getattr(w, "since", None)
        return {"pid": getattr(holder, "pid", None),
                "waited": None if since is None else max(0.0, now - since)}

    def _describe(self, entry: Entry, now: float) -> dict[str, Any]:
        data: dict[str, Any] = {}
        try:
            if self._stats_hook is not None:
                data["stats"] = self._stats_hook(entry.obj)
            else:
                data["trace"] = str(self._tracer(entry.obj))
        except Exception:
            data["trace"] = f"<{type(entry.obj).__name__}>"
        data.update(uses=entry.uses, last_get=entry.last_get - now, last_ret=entry.last_ret - now)
        if entry.holder is not None:
            data.update(lease=entry.lease, pid=entry.holder.pid, holder=entry.holder.as_dict())
        return data
