"""What queuepool's `Pool` adds from psycopg_pool: the ``check`` pre-ping, ``max_waiting`` (its
options are kept here, the refusal is made by ``take()``), and the counters of
`mppool.counters` with ``stats()`` and ``pop_stats()``.

``check(resource) -> bool`` runs at take on the resource of a manager that is open and was
idle at least ``check_after`` seconds (a manager just opened is not checked). False or an
exception closes the manager (``connections_lost``); since a take opens a closed manager,
the same take then opens a new resource, within what is left of its timeout for a budget
token.

The counters, as queuepool's pool sees them:

    requests_num        take() calls that ended, served or failed
    requests_queued     takes that had to wait for a manager
    requests_wait_ms    total time takes spent waiting for a manager
    requests_errors     takes that failed: timed out, refused (max_waiting), pool closed,
                        or the manager's open() or repair raised
    usage_ms            total time managers were out (take to put)
    connections_num     open() calls; connections_ms: time spent in them
    connections_errors  open() calls that raised
    connections_lost    managers closed because ``check`` failed
    returns_bad         puts whose putRepair() raised (the manager is closed)

A take of an idle manager takes no lock to be counted: it adds its manager to ``_out`` (one
atomic set operation), and the put that brings it back, which takes the pool lock anyway,
counts it (``nuses``) with its ``usage``; the reports add the takes still out. Everything
else is counted on paths that wait, open or fail anyway.

With ``PROMETHEUS_MULTIPROC_DIR`` set when the pool is made (and prometheus_client
installed), the counters are exported as running totals, which ``pop_stats()`` does not
reset, under the names of the supervisor's metrics and the label ``pool`` (the pool's
name): see `mppool.poolmetrics.instrument_counters`. They are written after takes, puts and
``wait()``, at most every 50 ms (a deferred write brings the last change), and at
``close()``; read under the pool's lock, never waited for (a busy lock defers the write).
Otherwise nothing is imported and the class is left as it is.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import counters
from ..outage import Outage
from ..poolmetrics import enabled as metrics_enabled
from ..poolmetrics import instrument_counters
from ..waiters import Waiter

log = logging.getLogger("mppool")

# After these, the counters are written (they count takes, puts and openings).
METRICS_AFTER = ("take", "put", "wait")


class Measures:
    """The psycopg_pool side of queuepool's `Pool` (see the module docstring)."""

    name: str
    capacity: int
    _lock: threading.Lock
    _idle: list[Any]
    _waiters: deque[Waiter]
    _members: set[int]
    _closed: bool
    _outage: Outage
    _recalled: int

    def _init_measures(self, check: Callable[[Any], Any] | None, check_after: float,
                       max_waiting: int) -> None:
        """Keep the options (checked by the caller) and start the counters at 0."""
        self._check = check
        self._check_after = check_after
        self._max_waiting = max_waiting
        self._counts: dict[str, Any] = dict.fromkeys((*counters.KEPT, "nuses"), 0)
        self._out: set[int] = set()  # ids of the managers taken and not put back

    def _export_metrics(self) -> None:
        """Last in __init__: export the counters if metrics are on (PROMETHEUS_MULTIPROC_DIR)."""
        if metrics_enabled():
            instrument_counters(self, str(self.name), METRICS_AFTER, "close")

    def _counter_totals(self) -> dict[str, int] | None:
        """psycopg_pool's counters as running totals, which pop_stats() does not reset (for
        Prometheus), the takes still out counted as in `_report`; None if the lock is busy
        (or held by the caller): it is never waited for, the write that asked is deferred."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            out = len(self._out)
            self._counts["nuses"] += out
            try:
                return counters.totals(self._counts)
            finally:
                self._counts["nuses"] -= out
        finally:
            self._lock.release()

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._counts[k] += v

    def _check_due(self, r: Any, now: float) -> bool:
        """With a ``check``: must the resource of ``r`` (open, just taken) be checked?"""
        return not self._check_after or now - (r._lastUsed or now) >= self._check_after

    def _report(self, pop: bool) -> dict[str, int]:
        """Under the lock: the counters, the takes still out counted as served (their put
        will count them in ``nuses``; see the module docstring)."""
        out = len(self._out)
        self._counts["nuses"] += out
        try:
            return counters.pop(self._counts) if pop else counters.report(self._counts)
        finally:
            self._counts["nuses"] -= out

    def _broken(self, r: Any) -> str | None:
        """Run ``check`` on the resource of ``r``: None if it passed, else why it failed
        (counted in ``connections_lost``; the caller closes ``r``)."""
        try:
            ok = bool(self._check(r.resource))  # type: ignore[misc]
            why = "check returned False"
        except Exception as exc:
            ok, why = False, f"check raised {type(exc).__name__}: {exc}"
        if ok:
            return None
        self._count(connections_lost=1)
        log.info("mppool: queuepool %r: %s found broken at take (%.200s), reopening it",
                 self.name, r, why)
        return why

    # The pool's.
    def _now(self) -> float:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """A JSON-compatible snapshot: sizes, options, psycopg_pool's counters (since the
        last `pop_stats`), ``outage``: None, or how an outage of ``open()`` stands, and
        ``recalled``: managers closed for the budget (recall.py) since the pool was made."""
        with self._lock:
            return {"name": str(self.name), "capacity": self.capacity,
                    "managers": len(self._members), "idle": len(self._idle),
                    "idle_open": sum(1 for r in self._idle if r._isOpen),
                    "waiting": sum(1 for w in self._waiters if not w.done),
                    "max_waiting": self._max_waiting,
                    "check_after": self._check_after if self._check is not None else None,
                    "reconnect_timeout": self._outage.timeout,
                    "outage": self._outage.describe(self._now()),
                    "closed": self._closed, "recalled": self._recalled,
                    **self._report(pop=False)}

    def pop_stats(self) -> dict[str, int]:
        """psycopg_pool's gauges and counters (see `mppool.counters`); the counters restart
        at 0. ``pool_max`` is the capacity, ``pool_size`` the managers put in."""
        with self._lock:
            return {**counters.gauges(0, self.capacity, len(self._members), len(self._idle),
                                      sum(1 for w in self._waiters if not w.done)),
                    **self._report(pop=True)}
