"""psycopg_pool's counters: what operators graph about a pool, and ``pop_stats()``.

They live in the pool's ``_counts`` dict beside ProxyPatternPool's counters, and are updated
under the pool lock by the decisions that already take it, so the hot path (get and ret of
an idle object) takes no lock and reads no clock of its own: the times below are differences
of clock readings the pool makes anyway. A get of an idle object adds nothing at all:
``requests_num`` is derived from the leases counted anyway (``nuses``), corrected on the slow
paths (see `report`); a ret adds one float to ``usage``.

    requests_num        get() calls that ended, served or failed (a get that finds its
                        object broken by ``check`` and tries again counts once)
    requests_queued     gets that had to wait in the queue
    requests_wait_ms    total time gets spent queued (served or not)
    requests_errors     gets that failed: timed out, refused (``max_waiting``), cancelled,
                        or whose creation of an object failed
    usage_ms            total time objects were lent out (get to ret)
    connections_num     creation attempts (calls of ``fun``), for gets and for ``min_size``
    connections_ms      total time spent in ``fun``
    connections_errors  creation attempts that raised
    connections_lost    objects found broken and closed: by ``check`` before a get, or by
                        the ``health`` check of housekeeping
    returns_bad         objects returned broken (``ret(obj, discard=True)``; db_pool: a
                        failed cleanup)

The ``*_ms`` counters are kept as float seconds (``*_s``: no multiplication on the hot path)
and reported as whole milliseconds. ``pop_stats()``
returns them with psycopg_pool's gauges (``pool_min pool_max pool_size pool_available
requests_waiting``) and sets them back to zero; ``stats()`` shows them too, without resetting.
ProxyPatternPool's counters (``ncreated``, ``nborrows``...) are never reset.

What a pop takes away is kept apart (``counts["popped"]``, added at `pop`, under the same
lock), so that `totals` gives running totals since the pool was made, which no pop ever
lowers: the values Prometheus counters need (poolmetrics.py).
"""

from __future__ import annotations

from typing import Any

HELP = {
    "requests_num": "get() calls that ended, served or failed",
    "requests_queued": "gets that had to wait in the queue",
    "requests_wait_ms": "milliseconds gets spent queued",
    "requests_errors": "gets that failed (timeout, max_waiting, cancelled, creation error)",
    "usage_ms": "milliseconds objects were lent out",
    "connections_num": "creation attempts (calls of fun)",
    "connections_ms": "milliseconds spent creating objects",
    "connections_errors": "creation attempts that raised",
    "connections_lost": "objects found broken by check or health and closed",
    "returns_bad": "objects returned broken (discarded)",
}
COUNTERS = tuple(HELP)
# What the pool's _counts keeps for each: the times in seconds, and for requests_num a
# correction to nuses (every served get is one lease; see report()).
KEPT = tuple("requests_adj" if k == "requests_num" else k[:-3] + "_s" if k.endswith("_ms")
             else k for k in COUNTERS)


def report(counts: dict[str, Any]) -> dict[str, int]:
    """The counters as ``stats()`` shows them: whole numbers (milliseconds rounded).

    ``requests_num`` = leases made (``nuses``) + ``requests_adj``, which the slow paths keep:
    +1 for a get that failed (it made no lease), -1 for a lease that ``check`` found broken
    (its get goes on and makes another), and -nuses at `pop`.
    """
    out = {}
    for k, kept in zip(COUNTERS, KEPT, strict=True):
        if k == "requests_num":
            out[k] = counts["nuses"] + counts["requests_adj"]
        else:
            out[k] = round(counts[kept] * 1000.0) if kept != k else counts[k]
    return out


def pop(counts: dict[str, Any]) -> dict[str, int]:
    """Under the pool lock: the counters as reported, then zero (what they were is added to
    ``counts["popped"]``, for `totals`)."""
    out = report(counts)
    popped = counts.get("popped")
    if popped is None:
        counts["popped"] = dict(out)
    else:
        for k, v in out.items():
            popped[k] += v
    for k in KEPT:
        counts[k] = 0
    counts["requests_adj"] = -counts["nuses"]
    return out


def totals(counts: dict[str, Any]) -> dict[str, int]:
    """Under the pool lock: the counters as running totals since the pool was made, which
    `pop` does not reset (``report`` plus what the pops took away). A total only grows, but
    for ``requests_num`` between a lease that ``check`` finds broken and the correction
    (see `report`): a reader keeps the largest value it saw."""
    out = report(counts)
    popped = counts.get("popped")
    if popped is not None:
        for k, v in popped.items():
            out[k] += v
    return out


def gauges(pool_min: int, pool_max: int, size: int, available: int,
           waiting: int) -> dict[str, int]:
    """psycopg_pool's gauges, under its names."""
    return {"pool_min": pool_min, "pool_max": pool_max, "pool_size": size,
            "pool_available": available, "requests_waiting": waiting}
