"""queuepool's ``Pool`` and ``ResourceManager``, with a timeout on ``take()`` and a budget.

queuepool pools *resource managers* that the user puts in: each manager opens its resource
lazily (at the first take), repairs it on take and put, and is closed when it idled, stayed
open or was used too long. The pool never creates managers; it is a stack of them:

    put(r) ── recycling limits (open too long, used too often) ─▶ closed
           └ putRepair() ─▶ the oldest blocked take(), else the top of the idle stack
    take() ── the top of the stack (the manager used last: its resource is warm), else wait
           └ recycling limits ─▶ takeRepair() ─▶ open() if closed (first: a budget token)
    recycle() ── every idle manager over a limit is closed (startRecycler: periodically)

Waiters are served first come, first served, and one that timed out never swallows a
manager (the core pool's `mppool.waiters.Waiter` protocol). With ``budget=`` (a shared token
pool) every *open* manager holds one token, drawn before ``open()`` and given back when it is
seen closed, whoever closed it (the pool, a repair, the user): so the resources open across
all processes never exceed the budget. When another process waits for the budget, open
managers are closed for it with the core pool's recall policy and hysteresis (recall.py):
idle ones once due, the longest idle first, ones in use at a put once due, never more than
the processes waiting; so that an idle or busy process cannot starve the others, without
reopening a resource at every take.

Differences from queuepool, each so that nothing is lost or blocks for ever: a manager whose
``open()`` or repair raised goes back to the pool (closed) before the error propagates;
``put()`` beyond ``capacity`` managers raises ValueError (queuepool blocks for ever on its
full queue); putting a manager that is already idle is ignored with a warning; durations use
the monotonic clock (``_lastOpened``/``_lastUsed`` are ``time.monotonic()`` values, not
datetimes); arguments are validated.

mppool's options, keyword-only and off by default (see measures.py): ``check=`` (a pre-ping
of an open manager's resource at take; a failure closes the manager and the same take opens
it again), ``check_after=``, ``max_waiting=`` (`mppool.TooManyRequests`), and psycopg_pool's
counters in ``stats()`` and ``pop_stats()``; psycopg_pool's lifecycle and reconnect options
(see lifecycle.py): ``open=`` with ``pool.open()``, ``pool.wait()``, ``with Pool(...)``, and
``reconnect_timeout=``/``reconnect_failed=`` (a manager's ``open()`` that fails is retried with
backoff; takes that would open one fail fast meanwhile; the hook once per outage).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

from ..budget import Budget, check_budget, give_back
from ..errors import PoolClosed, TimeOut, TooManyRequests
from ..holder import current_holder
from ..validate import check_callable, check_delay, check_duration, check_int, check_period, check_timeout
from ..waiters import Waiter, withdraw
from .lifecycle import Lifecycle
from .measures import Measures
from .recall import Recall

__all__ = ["Pool", "ResourceManager"]

log = logging.getLogger("mppool")


def _now() -> float:
    """The clock of the recycling limits (tests replace it; waits use real time)."""
    return time.monotonic()


class ResourceManager:
    """Opens, closes and repairs one resource (``resource``); subclass it (queuepool's API).

    ``open()``/``close()`` in a subclass must call the base class's, which keeps the
    bookkeeping the pool's recycling reads. ``with pool.take() as r:`` puts it back at the
    end, closing it first if the block raised and the pool's ``closeOnException`` is set.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.resource: Any = None
        self._pool: Pool | None = None
        self._isOpen = False
        self._lastOpened: float | None = None
        self._lastUsed: float | None = None
        self._usageCount: int | None = None

    def __str__(self) -> str:
        return str(self.name)

    def __repr__(self) -> str:
        return str({"name": self.name, "_isOpen": self._isOpen, "_lastOpened": self._lastOpened,
                    "_lastUsed": self._lastUsed, "_usageCount": self._usageCount})

    def open(self) -> None:
        now = _now()
        self._isOpen = True
        self._lastOpened = now
        self._lastUsed = now
        self._usageCount = 0

    def close(self) -> None:
        self._isOpen = False

    def takeRepair(self) -> None:
        """Called at every take, before the resource is opened if it is closed."""

    def putRepair(self) -> None:
        """Called at every put, after the recycling limits were checked."""

    def __enter__(self) -> ResourceManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        pool = self._pool
        if pool is None:
            raise RuntimeError(f"resource manager {self.name!r} was not taken from a pool")
        if exc_type is not None and pool.closeOnException:
            pool._close(self, "the with block raised")
        pool.put(self)
        return False


class Pool(Measures, Recall, Lifecycle):
    """A LIFO pool of the `ResourceManager` objects ``put()`` in it (queuepool's API)."""

    def __init__(self, name: str, capacity: int, maxIdleTime: float | None = 300.0,
                 maxOpenTime: float | None = 300.0, maxUsageCount: int | None = 1000,
                 closeOnException: bool = True, *, budget: Budget | None = None,
                 check: Callable[[Any], Any] | None = None, check_after: float = 0.0,
                 max_waiting: int = 0, reconnect_timeout: float | None = 300.0,
                 reconnect_failed: Callable[[Pool], Any] | None = None,
                 open: bool = True) -> None:
        """``maxIdleTime``/``maxOpenTime``: seconds, None for no limit; ``maxUsageCount``: takes
        per opening, None for no limit; ``budget``: a token pool (``client.token_pool(...)``)
        capping the managers open at once across every process that uses it.

        ``check(resource) -> bool``: run at take on the resource of a manager that is open
        (and idle at least ``check_after`` seconds); False or an exception closes the
        manager, and the take opens it again. ``max_waiting``: 0, no limit; otherwise a
        take that would queue behind that many others raises `mppool.TooManyRequests`.

        ``reconnect_timeout``/``reconnect_failed``: a manager's ``open()`` that raises is
        retried with backoff (1 s, doubling, +-10% jitter; takes that would open a manager
        raise its error at once meanwhile), and ``reconnect_failed(pool)`` is called once per
        outage that lasted ``reconnect_timeout`` seconds. ``open=False``: takes raise
        `mppool.PoolClosed` until ``pool.open()``. See lifecycle.py."""
        self.capacity = check_int("capacity", capacity, minimum=1)
        self._maxIdleTime = None if maxIdleTime is None else check_delay("maxIdleTime", maxIdleTime)
        self._maxOpenTime = None if maxOpenTime is None else check_delay("maxOpenTime", maxOpenTime)
        self._maxUsageCount = (None if maxUsageCount is None
                               else check_int("maxUsageCount", maxUsageCount, minimum=1))
        if not isinstance(closeOnException, bool):
            raise TypeError(f"closeOnException must be a bool, got {closeOnException!r}")
        check_budget(budget)
        check_callable("check", check)
        self._init_measures(check, check_period("check_after", check_after),
                            check_int("max_waiting", max_waiting))
        self.name = name
        self._init_lifecycle(reconnect_timeout, reconnect_failed, open)
        self.closeOnException = closeOnException
        self._budget = budget
        self._lock = threading.Lock()
        self._idle: list[ResourceManager] = []  # a stack: the last one put is taken first
        self._waiters: deque[Waiter] = deque()
        self._members: set[int] = set()  # ids of the managers put in, at most capacity
        self._tokens: dict[int, Any] = {}  # id(manager) -> its budget token while open
        self._closed = False
        self._recycler: threading.Thread | None = None
        self._stop = threading.Event()
        self._init_recall()
        if open:
            self._start_recall()
        self._export_metrics()  # PROMETHEUS_MULTIPROC_DIR: see measures.py

    def _now(self) -> float:
        return _now()

    def __str__(self) -> str:
        return str(self.name)

    def __repr__(self) -> str:
        return str({"name": self.name, "capacity": self.capacity, "_maxIdleTime": self._maxIdleTime,
                    "_maxOpenTime": self._maxOpenTime, "_maxUsageCount": self._maxUsageCount,
                    "closeOnException": self.closeOnException})

    # ------------------------------------------------------------------ queuepool's API

    def take(self, timeout: float | None = None) -> ResourceManager:
        """The manager put last, opened if it is closed; blocks until one is free.

        ``timeout``: seconds to wait (None: for ever, 0: not at all), then `mppool.TimeOut`.
        With a budget, what is left of it also bounds the wait for a token to open one.
        """
        timeout = check_timeout("timeout", timeout)
        try:
            r = self._take(timeout)
        except BaseException:
            self._count(requests_errors=1, requests_adj=1)  # a take that failed
            raise
        self._out.add(id(r))  # atomic: counted under the lock at its put (see measures.py)
        return r

    def _take(self, timeout: float | None) -> ResourceManager:
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = None
        with self._lock:
            if self._refused is not None:
                raise PoolClosed(self._refused)
            if self._idle and not any(not w.done for w in self._waiters):
                r = self._idle.pop()
                if not r._isOpen and self._outage.active:
                    r = self._prefer_open(r)  # it would fail fast: an open one, if any
            elif timeout == 0:
                raise TimeOut(f"queuepool {self.name!r}: no resource free, timeout after 0 s")
            elif self._max_waiting and (sum(1 for w in self._waiters if not w.done)
                                        >= self._max_waiting):
                raise TooManyRequests(f"queuepool {self.name!r}: {self._max_waiting} takes "
                                      f"wait already (max_waiting={self._max_waiting})")
            else:
                waiter = Waiter(current_holder())
                self._waiters.append(waiter)
                self._counts["requests_queued"] += 1
        if waiter is not None:
            r = self._wait(waiter, timeout)
        try:
            r._pool = self
            self._recycle(r)
            r.takeRepair()
            self._sync_token(r)
            if self._check is not None and r._isOpen and self._check_due(r, _now()):
                why = self._broken(r)
                if why is not None:  # closed, then opened again below
                    self._close(r, why)
            if not r._isOpen:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._open(r, left)
            r._usageCount = (r._usageCount or 0) + 1
            r._lastUsed = _now()
        except BaseException:
            self._give(r)  # back, closed or not: the error must not cost a manager
            raise
        return r

    def put(self, r: ResourceManager) -> None:
        """Give a manager back (or add a new one): recycling limits, ``putRepair()``, then
        to the oldest blocked ``take()`` or the top of the stack."""
        if not isinstance(r, ResourceManager):
            raise TypeError(f"put() takes a ResourceManager, got {r!r}")
        with self._lock:
            if any(x is r for x in self._idle):
                log.warning("mppool: queuepool %r: put() of a manager already idle, ignored: %s",
                            self.name, r)
                return
            if id(r) not in self._members:
                if len(self._members) >= self.capacity:
                    raise ValueError(f"queuepool {self.name!r} is full: capacity={self.capacity} "
                                     f"managers were put in already, cannot add {r}")
                self._members.add(id(r))
            now = _now()
            if id(r) in self._out:  # a manager coming back from a take
                self._out.discard(id(r))
                self._counts["nuses"] += 1
                self._counts["usage_s"] += now - (r._lastUsed or now)
        r._pool = self
        r._lastUsed = now
        try:
            self._recycle(r)
            r.putRepair()
            if r._isOpen and self._recall_n > 0 and self._recall_wanted(r):  # see recall.py
                self._close(r, "another process waits for the budget")
        except Exception:
            log.warning("mppool: queuepool %r: repair of %s failed, closing it", self.name, r,
                        exc_info=True)
            self._count(returns_bad=1)
            self._close(r, "its repair failed")
        finally:
            self._sync_token(r)
            self._give(r)

    def recycle(self) -> int:
        """Close every idle manager over a recycling limit; returns how many were closed.
        The managers keep their place in the stack."""
        with self._lock:
            idle, self._idle = self._idle, []
        closed = 0
        try:
            for r in idle:
                was_open = r._isOpen
                self._recycle(r)
                closed += was_open and not r._isOpen
        finally:
            self._restore(idle)
        return closed

    def startRecycler(self, interval: float = 60) -> None:
        """Run `recycle` every ``interval`` seconds on a daemon thread (once per pool);
        `stopRecycler` or `close` stops it."""
        interval = check_delay("interval", interval)
        if interval <= 0 or check_duration("interval", interval) is None:
            raise ValueError(f"interval must be a finite number of seconds > 0, got {interval!r}")
        with self._lock:
            if self._recycler is not None or self._closed:
                return
            self._stop.clear()
            self._recycler = threading.Thread(target=_recycler_loop,
                                              args=(weakref.ref(self), self._stop, interval),
                                              name=f"queuepool recycler {self.name}", daemon=True)
        self._recycler.start()

    def stopRecycler(self, timeout: float = 5.0) -> None:
        """Stop the recycler thread and wait for it (up to ``timeout`` seconds)."""
        with self._lock:
            thread, self._recycler = self._recycler, None
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def close(self) -> None:
        """Stop the recycler and the budget recall, close every idle manager, and wake
        every blocked ``take()`` with `mppool.PoolClosed`. Managers out are closed when
        they are put back."""
        self.stopRecycler()
        with self._lock:
            self._closed = True
            self._refused = f"queuepool {self.name!r} is shutting down"
            idle, self._idle = self._idle, []
            waiters, self._waiters = self._waiters, deque()
            for w in waiters:
                w.set(PoolClosed(f"queuepool {self.name!r} is shutting down"))
        self._stop_recall()
        for r in idle:
            self._close(r, "the pool is closing")
        with self._lock:
            self._idle = idle

    def __del__(self) -> None:
        # A pool dropped without close(): its idle managers are closed and their budget
        # tokens go back, instead of being held until the process exits.
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass  # interpreter shutdown, or a supervisor already gone

    def free(self) -> int:
        """How many managers are idle in the pool."""
        with self._lock:
            return len(self._idle)

    def waiting(self) -> int:
        """How many ``take()`` calls are blocked."""
        with self._lock:
            return sum(1 for w in self._waiters if not w.done)

    # ------------------------------------------------------------------ internals

    def _wait(self, waiter: Waiter, timeout: float | None) -> ResourceManager:
        since = time.monotonic()
        try:
            waiter.wait(timeout)
        except BaseException:  # interrupted: withdraw, or pass on what it was handed
            if not self._cancel(waiter) and isinstance(waiter.result, ResourceManager):
                self._give(waiter.result)
            raise
        finally:
            self._count(requests_wait_s=time.monotonic() - since)
        if self._cancel(waiter):
            raise TimeOut(f"queuepool {self.name!r}: no resource free, timeout after {timeout} s")
        got = waiter.result
        if isinstance(got, BaseException):
            raise got
        return got

    def _cancel(self, waiter: Waiter) -> bool:
        with self._lock:
            return withdraw(self._waiters, waiter)

    def _give(self, r: ResourceManager) -> None:
        """To the oldest live waiter, else the top of the stack (closed first if the pool
        is closed)."""
        if self._closed:
            self._close(r, "the pool is closed")
        with self._lock:
            while self._waiters and not self._closed:
                if self._waiters.popleft().set(r):
                    return
            self._idle.append(r)

    def _restore(self, managers: list[ResourceManager]) -> None:
        """Put managers taken out by recycle()/recall back below any put meanwhile, in their
        order; waiters queued meanwhile are served first."""
        with self._lock:
            rest = list(managers)
            while rest and self._waiters:
                if self._waiters.popleft().set(rest[-1]):
                    rest.pop()
            self._idle[:0] = rest

    def _recycle(self, r: ResourceManager) -> None:
        """Close ``r`` if it is open and over a limit (queuepool's three)."""
        if not r._isOpen:
            return
        now = _now()
        why = None
        if self._maxIdleTime is not None and now - (r._lastUsed or now) > self._maxIdleTime:
            why = f"idle more than maxIdleTime={self._maxIdleTime} s"
        elif self._maxOpenTime is not None and now - (r._lastOpened or now) > self._maxOpenTime:
            why = f"open more than maxOpenTime={self._maxOpenTime} s"
        elif self._maxUsageCount is not None and (r._usageCount or 0) >= self._maxUsageCount:
            why = f"used maxUsageCount={self._maxUsageCount} times"
        if why:
            self._close(r, why)

    def _close(self, r: ResourceManager, why: str) -> None:
        """Close a manager, never raising; its budget token goes back."""
        log.debug("mppool: queuepool %r: closing %s: %s", self.name, r, why)
        try:
            r.close()
        except Exception:
            log.warning("mppool: queuepool %r: close() of %s raised, ignored", self.name, r,
                        exc_info=True)
            r._isOpen = False  # its resource is unusable either way
        self._sync_token(r)

    def _sync_token(self, r: ResourceManager) -> None:
        """A manager seen closed gives its budget token back, whoever closed it."""
        if r._isOpen:
            return
        with self._lock:
            token = self._tokens.pop(id(r), None)
        give_back(self._budget, token, str(self.name))


def _recycler_loop(ref: weakref.ReferenceType[Pool], stop: threading.Event, interval: float) -> None:
    """The recycler thread: holds the pool weakly, so a dropped pool ends it too."""
    while not stop.wait(interval):
        pool = ref()
        if pool is None:
            return
        try:
            pool.recycle()
        except Exception:  # the thread must survive anything a manager's close() does
            log.exception("mppool: queuepool %r: recycle failed", pool.name)
        del pool
