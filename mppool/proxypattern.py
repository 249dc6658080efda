"""What ProxyPatternPool's code and users read on its ``Pool``, on the core `mppool.Pool`.

ProxyPatternPool keeps its counters as plain attributes (``pool._nobjs``, ``pool._nuses``,
...) and its own ``Proxy`` class reads them: ``Proxy._get_obj()`` copies ``pool._nobjs``
after every get. Code written for it, its tests, and monitoring built on it read them too.
The core pool keeps the same counts in one dict under its lock (``stats()`` reports them);
this mixin shows them under ProxyPatternPool's names, read-only: assigning one raises
AttributeError instead of silently desynchronising the pool.

Also here:

- ``bool(pool)`` is always true, although ``len(pool)`` may be 0 (see `__bool__`).
- ``__delete__()``: ProxyPatternPool's explicit destructor; here it is `shutdown()`
  (an attribute each pool gets at construction, see there).
- ``PPP_WERKZEUG_WORKAROUND``: under ``flask --debug`` the reloader's parent process imports
  the application, hence builds its pools, but never serves a request. With this variable in
  the environment and ``WERKZEUG_RUN_MAIN`` not ``"true"`` (the parent), a pool built in this
  process starts no housekeeping and creates no ``min_size`` objects (no connection opened
  for nothing); ``get()`` still works, creating objects on demand. Pools the supervisor
  serves ignore it: a supervisor started from such a parent inherits its environment.

Not reproduced: ``_ncreating`` keeps the core pool's meaning (creations in progress, not
creation attempts so far), ``_uses``/``_sem``/``_todel`` (internal structures), and
``_housekeeper`` is an opaque handle, not a ``threading.Thread``: housekeeping runs on a
scheduler shared by pools, so there is no thread of this pool's own to join.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

from .lifetime import Lifetime
from .state import PoolState

log = logging.getLogger("mppool")

WERKZEUG_WORKAROUND = "PPP_WERKZEUG_WORKAROUND"


def werkzeug_reloader_parent() -> bool:
    """True in the parent process of ``flask --debug`` when the user asked, by setting
    ``PPP_WERKZEUG_WORKAROUND``, that pools stay idle there (ProxyPatternPool's rule)."""
    return (WERKZEUG_WORKAROUND in os.environ
            and os.environ.get("WERKZEUG_RUN_MAIN", "false") != "true")


def _counter(name: str, doc: str) -> property:
    def read(self: PoolState) -> int:
        return self._counts[name]

    return property(read, doc=doc)


class _Delete:
    """``pool.__delete__``: calls ``pool.shutdown()``. Holds the pool weakly, so that the
    pool and its own attribute make no reference cycle."""

    __slots__ = ("_pool",)

    def __init__(self, pool: Lifetime) -> None:
        self._pool = weakref.ref(pool)

    def __call__(self) -> None:
        pool = self._pool()
        if pool is not None:
            pool.shutdown()


class ProxyPatternCompat(Lifetime):
    """ProxyPatternPool's read-only attributes, ``__delete__()`` and idle-start rule."""

    _nuses = _counter("nuses", "Successful gets so far.")
    _ncreated = _counter("ncreated", "Objects created so far.")
    _nhealth = _counter("nhealth", "Health checks run so far.")
    _bad_health = _counter("bad_health", "Objects found unhealthy so far.")
    _nborrows = _counter("nuses", "Objects lent so far (gets and health borrows).")
    _nreturns = _counter("nreturns", "Objects returned so far.")
    _nkilled = _counter("nkilled", "Leases killed for being held too long.")
    _nrecycled = _counter("nrecycled", "Objects closed for idling too long.")
    _nwornout = _counter("nwornout", "Objects closed after max_use uses.")
    _ndestroys = _counter("ndestroys", "Objects closed so far.")
    _hk_rounds = _counter("hk_rounds", "Housekeeping rounds so far.")
    _hk_errors = _counter("hk_errors", "Housekeeping rounds that failed.")
    _hc_rounds = _counter("hc_rounds", "Health-check rounds so far.")
    _hc_errors = _counter("hc_errors", "Health checks that raised.")

    @property
    def _nobjs(self) -> int:
        """Objects the pool manages now, idle and in use (``len(pool)``)."""
        with self._lock:
            return len(self._avail) + len(self._using)

    @property
    def _started_ts(self) -> float:
        """When the pool was built, as a POSIX timestamp."""
        return self._started.timestamp()

    @property
    def _housekeeper(self) -> Any:
        """None when no housekeeping runs (none needed, the pool is shut down, or
        ``PPP_WERKZEUG_WORKAROUND`` kept it idle); else a handle on the scheduled round."""
        return None if self._shutdown else self._hk_task

    def __bool__(self) -> bool:
        """Always true, even with no object yet: ``len(pool)`` counts objects, and an empty
        pool must not read as "no pool" (ProxyPatternPool's Proxy tests ``if self._pool:``
        and would otherwise bypass the pool while it is empty)."""
        return True

    # ``pool.__delete__()``: ProxyPatternPool's destructor, here `shutdown()` (later ``get()``
    # calls raise `mppool.PoolClosed`). An attribute of each instance, set at construction,
    # not a method: a class with a ``__delete__`` makes its instances data descriptors (a
    # pool stored as a class attribute could no longer be shadowed on an instance), and a
    # class ``__getattr__`` would make every attribute access of the pool take the
    # interpreter's slow path (no specialisation of LOAD_ATTR), the hot path included.
    __delete__: Callable[[], None]

    def _idle_start(self, served: bool) -> bool:
        """At construction: stay idle (no housekeeping, no ``min_size`` objects) because
        this is the werkzeug reloader's parent? Never for pools the supervisor serves.
        Also gives the pool its ``__delete__``."""
        self.__delete__ = _Delete(self)
        if served or not werkzeug_reloader_parent():
            return False
        log.warning("mppool: pool %r: %s is set and this is not werkzeug's serving process: "
                    "no housekeeping and no min_size objects here", self._name,
                    WERKZEUG_WORKAROUND)
        return True
