"""What `mppool.aio.ConnectionPool` counts: its own totals and psycopg_pool's counters
(`mppool.counters`), ``stats()``, ``pop_stats()``, and their export to Prometheus.

With ``PROMETHEUS_MULTIPROC_DIR`` set when the pool is made (and prometheus_client
installed), psycopg_pool's counters are exported as running totals, which ``pop_stats()``
does not reset, under the names of the supervisor's metrics and the label ``pool`` (the
pool's ``name``; ``aio`` if it has none): see `mppool.poolmetrics.instrument_counters`.
They are written after acquires, returns and ``wait()``, at most every 50 ms (a deferred
write in the event loop brings the last change), and at ``close()``. Otherwise nothing is
imported and the pool's class is left as it is.
"""

from __future__ import annotations

from typing import Any

from .. import counters
from ..outage import Outage
from ..poolmetrics import enabled as metrics_enabled
from ..poolmetrics import instrument_counters

# After these, the counters are written (they count acquires, returns and creations).
METRICS_AFTER = ("_acquire", "_release", "wait")


class Measures:
    """The counting side of `mppool.aio.ConnectionPool` (see the module docstring)."""

    # The pool's, read here.
    name: str | None
    in_use: int
    currently_allocating: int
    currently_deallocating: int
    _idle: Any
    _outage: Outage

    def _init_measures(self) -> None:
        self._counts = dict.fromkeys(
            ("made", "make_errors", "make_refused", "closed", "close_errors", "stale", "burst_closed",
             "recalled"), 0)
        # psycopg_pool's counters as mppool.counters keeps them (nuses: acquires served).
        self._pcounts: dict[str, Any] = dict.fromkeys((*counters.KEPT, "nuses"), 0)

    def _export_metrics(self) -> None:
        """Last in __init__: export the counters if metrics are on (PROMETHEUS_MULTIPROC_DIR)."""
        if metrics_enabled():
            instrument_counters(self, self.name or "aio", METRICS_AFTER, "close", in_loop=True)

    def stats(self) -> dict[str, Any]:
        """Current counts, totals since the pool was built, psycopg_pool's counters (since
        the last `pop_stats`), ``outage``: None, or how a creation outage stands, and the
        pool's ``name``."""
        return {"name": self.name, "in_use": self.in_use, "idle": len(self._idle),
                "allocating": self.currently_allocating,
                "deallocating": self.currently_deallocating, "waiting": self._waiters,
                **self._counts, **counters.report(self._pcounts),
                "outage": self._outage.describe(self._now())}

    def pop_stats(self) -> dict[str, int]:
        """psycopg_pool's gauges and counters (see `mppool.counters`); the counters restart
        at 0. ``pool_min`` is 0 (nothing is kept open ahead), ``pool_max`` the limit
        (``burst_limit`` if given)."""
        return {**counters.gauges(0, self._limit(), self._total, len(self._idle), self._waiters),
                **counters.pop(self._pcounts)}

    def _counter_totals(self) -> dict[str, int]:
        """psycopg_pool's counters as running totals, which pop_stats() does not reset (for
        Prometheus: `mppool.poolmetrics`). No lock: the pool is used from one thread."""
        return counters.totals(self._pcounts)

    # The pool's.
    @property
    def _total(self) -> int:
        raise NotImplementedError

    @property
    def _waiters(self) -> int:
        raise NotImplementedError

    def _limit(self) -> int:
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError
