"""RawConnectionPool: plain connections, kept in this process, in a core `mppool.Pool`.

    get() ── core pool checkout ──▶ an idle connection, or _make() in a free slot:
                                      (with budget=) a token drawn first, then
                                      create() → connect(db_module, connect_timeout, ...)
    put() ── cleanup ──▶ core pool checkin ──▶ kept idle, or closed by safe_close()
                                                (then the token goes back)
    the core pool's housekeeping closes connections idle past max_idle or older than
    max_age; with a budget, idle ones go back when another process waits for it
"""

from __future__ import annotations

import importlib
import time
import weakref
from typing import TYPE_CHECKING, Any

from ..budget import Budget
from ..errors import PoolClosed
from ..holder import current_holder
from ..pool import Pool as _CorePool
from .base import BaseConnectionPool
from .connecting import module_name, safe_close, timed_connect

if TYPE_CHECKING:
    from ..client import Client


class _WeakFun:
    """The core pool's ``fun``, not keeping the RawConnectionPool alive.

    The core pool lives as long as its housekeeping task does; a strong reference back would
    keep a forgotten RawConnectionPool (and its connections and budget tokens) alive forever.
    """

    def __init__(self, pool: RawConnectionPool) -> None:
        self._ref = weakref.ref(pool)

    def __call__(self, num: int) -> Any:
        pool = self._ref()
        if pool is None:
            raise PoolClosed("the RawConnectionPool was garbage collected: shutting down")
        return pool._make()


class RawConnectionPool(BaseConnectionPool):
    """Plain connections, kept in this process (eventlet's ``RawConnectionPool``).

    With ``budget=`` (a shared token pool) each connection holds one token from before
    ``connect`` until after ``close``, so the total across processes never exceeds the
    budget; idle connections above ``min_size`` are closed when another process waits for it.
    Do not carry a RawConnectionPool across ``fork()``: build one in each process.
    """

    def _open(self, budget: Budget | None, client: Client | None, share: str | None) -> None:
        super()._open(budget, client, share)
        if isinstance(self._db_module, str):
            self._db_module = importlib.import_module(self._db_module)
        self._pool = _CorePool(
            _WeakFun(self), max_size=self.max_size, min_size=self.min_size,
            max_avail_delay=0.0 if self._close_on_put else self.max_idle,
            max_lifetime=0.0 if self._close_on_put else self.max_age,
            # eventlet's max_idle=0/max_age=0: closed at every return (worn out, not bad).
            max_use=1 if self._close_on_put else 0,
            closer=safe_close, budget=budget, open=self._start_open, **self._pool_options)
        # Stack order, as eventlet: the most recently used connection goes out first, so the
        # surplus stays idle and max_idle can close it.
        self._pool._fifo = False

    def open(self, wait: bool = False, timeout: float | None = 30.0) -> None:
        self._pool.open(wait, timeout)

    @classmethod
    def connect(cls, db_module: Any, connect_timeout: float | None, *args: Any, **kw: Any) -> Any:
        """``db_module.connect(*args, **kw)``, or ConnectTimeout after ``connect_timeout`` s."""
        return timed_connect(lambda: db_module.connect(*args, **kw), connect_timeout,
                             module_name(db_module))

    def create(self) -> Any:
        now = time.time()
        return now, now, self.connect(self._db_module, self.connect_timeout, *self._args,
                                      **self._kwargs)

    def _make(self) -> Any:
        made = self.create()
        # eventlet's create() returns (last_used, created_at, conn); a subclass may return conn.
        return made[2] if isinstance(made, tuple) and len(made) == 3 else made

    def _checkout(self, timeout: float | None) -> tuple[Any, Any]:
        entry = self._pool._checkout(current_holder(), timeout)
        return entry.obj, entry.lease

    def _checkin(self, handle: Any, discard: bool) -> None:
        self._pool._checkin(handle, discard)

    def clear(self) -> None:
        self._pool.clear()

    def _free_items(self) -> list[tuple[float, float, Any]]:
        pool = self._pool
        with pool._lock:
            # The core pool's times are on its monotonic clock; eventlet's are wall-clock.
            shift = time.time() - pool._clock.now()
            return [(e.last_ret + shift, e.created + shift, e.obj) for e in reversed(pool._avail)]

    def __del__(self) -> None:
        # eventlet closes its connections when the pool goes away; so do we, budget tokens too.
        pool = self.__dict__.get("_pool")
        if pool is not None:
            try:
                pool.shutdown()
            except Exception:
                pass
