"""Prometheus metrics of the pools that live in a worker process (budget-backed pools,
``db_pool.RawConnectionPool``, ``pools.Pool``, any in-process `mppool.Pool`).

The supervisor's metrics (``mppool serve --metrics-port``) see only the pools it serves. A
pool that lives in a worker (a budget-backed pool of psycopg connections, say) waits, creates
and closes where the supervisor cannot see it, and those are the waits users feel. So each
such pool exports them itself, through prometheus_client's *multiprocess mode*:

- On when ``PROMETHEUS_MULTIPROC_DIR`` is set (the variable prometheus_client's multiprocess
  mode itself requires) and prometheus_client is installed; checked once per pool, when it is
  made. Otherwise nothing is imported and the pool's methods are the class's own: the hot
  path is not touched at all.
- Why multiprocess mode rather than sending the figures to the supervisor: the figures are
  made in the worker, and the usual place to scrape a gunicorn application is the
  application's own ``/metrics`` (prometheus_client's ``MultiProcessCollector``), which
  already sums every worker's files. Going through the supervisor would add a message per
  get to the lease channel, and would lose the figures exactly when they matter most (the
  supervisor is down or busy). Multiprocess mode does not run custom collectors at scrape
  time, so values are written when they change (file-backed, one mmap per process).
- Names and the ``pool`` label are those of the supervisor's metrics: the histogram
  ``mppool_acquire_wait_seconds`` (every get, including those served at once), the
  gauges ``mppool_pool_objects``, ``mppool_pool_in_use``, ``mppool_pool_idle``,
  ``mppool_pool_waiting`` (``livesum``: summed over live workers) and
  ``mppool_pool_max_size`` (``livemax``), and psycopg_pool's counters
  (``mppool_pool_requests_num_total``... see `mppool.counters`). ``live*`` gauges of a worker
  that died disappear once ``prometheus_client.multiprocess.mark_process_dead(pid)`` is
  called for it: the gunicorn hook ``mppool.gunicorn.child_exit`` does so, and a worker that
  exits normally does it for itself (atexit). The histogram and the counters are running
  totals and stay, as they should.
- The counters are the pool's running totals (`mppool.counters.totals`), which
  ``pop_stats()`` does not reset: a Prometheus counter never goes down. Each write adds what
  grew since the last one, at most every ``FLUSH_EVERY`` seconds per pool (reading them
  costs more than a get), the last change of a burst by a deferred write (`_Counters`). It
  reads the pool's counts under the pool's lock, taken without waiting: when the lock is
  busy the write is deferred (a metric never makes a get wait, and never deadlocks a caller
  that holds the lock).
- ``mppool.aio.ConnectionPool`` and ``mppool.queuepool.Pool`` export the counters alone
  (`instrument_counters`), under their ``name``.
- The supervisor process never exports these (it has its own metrics): it drops
  ``PROMETHEUS_MULTIPROC_DIR`` from its environment at start.

With metrics on, a pool's class is swapped for a subclass of the same name (made once per
class) whose ``get``, ``_checkout``, ``ret``/``put``, ``_checkin`` and the methods where objects
are created or closed also time each get and, after each call, write those of the pool's
five gauges that changed, and the counters that grew. Pools made while metrics are off keep
their class as it is.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .counters import COUNTERS, HELP

log = logging.getLogger("mppool")

ENV = "PROMETHEUS_MULTIPROC_DIR"
# The counters of a pool are written at most this often (seconds): the last change within
# it by a deferred write (see _Counters).
FLUSH_EVERY = 0.05
BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)  # as the supervisor's

_metrics: _Metrics | None = None
_made = threading.Lock()
_disabled = False


def enabled() -> bool:
    """Are worker-side metrics on? (``PROMETHEUS_MULTIPROC_DIR`` set, not disabled.)"""
    return not _disabled and bool(os.environ.get(ENV))


def disable() -> None:
    """Never instrument pools made in this process from now on (the supervisor calls it)."""
    global _disabled
    _disabled = True


class _Metrics:
    """The process's metric objects, made once (prometheus_client refuses duplicates)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # registry=None: multiprocess mode exports every metric made in any process through
        # the files; MultiProcessCollector reads them at scrape time.
        self.wait = Histogram("mppool_acquire_wait_seconds", "Time a get() waited for an object",
                              ["pool"], buckets=BUCKETS, registry=None)
        gauge = functools.partial(Gauge, labelnames=["pool"], registry=None)
        self.objects = gauge("mppool_pool_objects", "Objects the pool manages (idle + in use)",
                             multiprocess_mode="livesum")
        self.in_use = gauge("mppool_pool_in_use", "Objects lent out", multiprocess_mode="livesum")
        self.idle = gauge("mppool_pool_idle", "Objects idle in the pool",
                          multiprocess_mode="livesum")
        self.waiting = gauge("mppool_pool_waiting", "Blocked get() calls",
                             multiprocess_mode="livesum")
        self.max_size = gauge("mppool_pool_max_size", "The pool's bound (0: unbounded)",
                              multiprocess_mode="livemax")
        # psycopg_pool's, named and described as the supervisor's (supervisor/metrics.py).
        self.counters = tuple(Counter(f"mppool_pool_{k}", f"psycopg_pool's {k}: {HELP[k]}",
                                      ["pool"], registry=None) for k in COUNTERS)
        atexit.register(_mark_self_dead)


def _mark_self_dead() -> None:
    """A worker that exits normally takes its live gauges away itself."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
    except Exception:
        pass  # the directory went away first: nothing of ours is left to remove


def _get_metrics() -> _Metrics:
    global _metrics
    with _made:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


def instrument(pool: Any) -> bool:
    """Make ``pool`` export its waits and sizes; False (and nothing changed) if
    prometheus_client cannot be used."""
    m = _metrics_or_none()
    if m is None:
        return False
    pool._metrics = _PoolMetrics(pool, m)
    pool.__class__ = _instrumented_class(type(pool))
    pool._metrics.refresh(pool)
    return True


def _metrics_or_none() -> _Metrics | None:
    try:
        return _get_metrics()
    except Exception as exc:  # not installed, or a broken multiprocess directory
        log.warning("mppool: %s is set but pool metrics are off: %s: %s", ENV,
                    type(exc).__name__, exc)
        disable()
        return None


class _Counters:
    """One pool's psycopg_pool counters, written as the running totals grow: at most every
    ``FLUSH_EVERY`` seconds from the calls that count (reading them costs a few microseconds,
    a get a fraction of that), the last change within ``FLUSH_EVERY`` by a deferred write.
    It holds the pool weakly."""

    def __init__(self, pool: Any, name: str, m: _Metrics,
                 defer: Callable[[float, Callable[[], None]], Any]) -> None:
        self.counters = tuple(c.labels(pool=name) for c in m.counters)
        self.ref = weakref.ref(pool)
        self.sent = [0] * len(COUNTERS)  # the totals written so far
        self.defer = defer  # defer(delay, fn): fn runs later (a scheduler thread, the loop)
        self.next_at = 0.0  # no write before this (time.monotonic()), unless forced
        self.deferred_at: float | None = None  # when the deferred write scheduled is due
        self.lock = threading.Lock()  # writes in turn: each adds what grew since the last
        _all_counters.add(self)

    def after_fork(self) -> None:
        """In a forked child: a lock held by another thread stays held, and the deferred
        write is the parent's; so are the counts so far (the parent writes them, written or
        not yet): the child writes only what it adds to its copy of the pool."""
        self.lock = threading.Lock()
        self.next_at, self.deferred_at = 0.0, None
        pool = self.ref()
        totals = None if pool is None else pool._counter_totals()
        if totals is not None:  # None: the pool's lock was held at the fork, the pool is dead
            self.sent = [totals[k] for k in COUNTERS]

    def write_soon(self, pool: Any, force: bool = False) -> None:
        """After a call that may have counted: write now if the last write is old enough
        (or ``force``: the pool is closing), else make sure a deferred write comes."""
        now = time.monotonic()
        due = self.deferred_at
        if not force and now < self.next_at and due is not None and now < due + 1.0:
            return  # the common case in a burst: a deferred write is on its way
        try:
            if force or now >= self.next_at:
                self.next_at = now + FLUSH_EVERY
                if self._write(pool):
                    return
            self._defer(now)
        except Exception:
            log.debug("mppool: pool %r: metrics not written", _name_of(pool), exc_info=True)

    def _defer(self, now: float) -> None:
        due = self.deferred_at
        if due is not None and now < due + 1.0:  # one is scheduled (and not lost with a loop)
            return
        delay = max(self.next_at - now, 0.001)
        self.deferred_at = now + delay
        def deferred() -> None:
            self.deferred_at = None
            target = self.ref()
            if target is not None:
                self.write_soon(target, force=True)

        try:
            self.defer(delay, deferred)
        except Exception:  # no scheduler, no running loop: the next call writes them
            self.deferred_at = None
            raise

    def _write(self, pool: Any) -> bool:
        """Add what grew since the last write; False if the pool could not be read now
        (its lock busy: see `mppool.Pool._counter_totals`)."""
        with self.lock:
            totals = pool._counter_totals()
            if totals is None:
                return False
            sent = self.sent
            for i, key in enumerate(COUNTERS):
                grown = totals[key] - sent[i]
                if grown > 0:  # a total read lower than one written (see totals()) is skipped
                    sent[i] = totals[key]
                    self.counters[i].inc(grown)
        return True


_all_counters: weakref.WeakSet[_Counters] = weakref.WeakSet()


def _counters_after_fork() -> None:
    for c in list(_all_counters):
        c.after_fork()


os.register_at_fork(after_in_child=_counters_after_fork)


def _name_of(pool: Any) -> Any:
    return getattr(pool, "_name", None) or getattr(pool, "name", None)


def _on_scheduler(delay: float, fn: Callable[[], None]) -> Any:
    from .sched import default_scheduler

    return default_scheduler().enter(delay, fn)


def _on_loop(delay: float, fn: Callable[[], None]) -> Any:
    import asyncio

    return asyncio.get_running_loop().call_later(delay, fn)


def instrument_counters(pool: Any, name: str, after: tuple[str, ...], final: str,
                        in_loop: bool = False) -> bool:
    """Make ``pool`` (an ``mppool.aio.ConnectionPool`` or ``mppool.queuepool.Pool``) export
    psycopg_pool's counters: its class is swapped for a subclass (once per class) whose
    methods named in ``after`` (plain or ``async``) write them after each call (see
    `_Counters`; ``final``, the pool's close, writes them at once), as the pool's
    ``_counter_totals()`` reads them; ``in_loop``: deferred writes run in the event loop
    (the pool is not thread-safe), else on the default scheduler. False (nothing changed)
    if prometheus_client cannot be used."""
    m = _metrics_or_none()
    if m is None:
        return False
    pool._metrics_counters = _Counters(pool, name, m, _on_loop if in_loop else _on_scheduler)
    pool.__class__ = _counting_class(type(pool), after, final)
    pool._metrics_counters.write_soon(pool, force=True)
    return True


def _counting_class(cls: type, after: tuple[str, ...], final: str) -> type:
    """A subclass of ``cls`` (same name) whose methods named in ``after`` write the
    counters after each call."""
    with _made:
        sub = _counting_classes.get(cls)
        if sub is not None:
            return sub

    def wrap(func: Callable[..., Any], force: bool) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def awrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                try:
                    return await func(self, *args, **kwargs)
                finally:
                    self._metrics_counters.write_soon(self, force)
            return awrapper

        @functools.wraps(func)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return func(self, *args, **kwargs)
            finally:
                self._metrics_counters.write_soon(self, force)
        return wrapper

    ns: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                          "__doc__": cls.__doc__}
    ns.update((method, wrap(getattr(cls, method), method == final))
              for method in (*after, final))
    sub = type(cls.__name__, (cls,), ns)
    with _made:
        return _counting_classes.setdefault(cls, sub)


_counting_classes: dict[type, type] = {}


class _PoolMetrics:
    """One pool's labelled metrics. It holds no strong reference to the pool (the methods of
    the instrumented class pass it; its counters keep a weak one), so a pool dropped by its
    owner is still shut down at once."""

    def __init__(self, pool: Any, m: _Metrics) -> None:
        name = pool._name
        self.counters = _Counters(pool, name, m, _on_scheduler)
        self.wait = m.wait.labels(pool=name)
        self.gauges = (m.objects.labels(pool=name), m.in_use.labels(pool=name),
                       m.idle.labels(pool=name), m.waiting.labels(pool=name),
                       m.max_size.labels(pool=name))
        self.timing = threading.local()  # a get's _checkout is timed once, by the get
        # The values last written: a gauge is written only when it changes (each write takes
        # prometheus_client's process-wide lock and touches the mmap).
        self.last: list[float | None] = [None] * len(self.gauges)
        self.pid = os.getpid()  # a forked child writes its own files: everything, once
        # Refreshes in turn, so that the last one to read the counts is the last to write.
        self.lock = threading.Lock()

    def refresh(self, p: Any) -> None:
        """Write the pool's gauges, read without the lock: a gauge is a sample anyway, and a
        metric must never make a get wait; and the counters that grew (read under the
        pool's lock if it is free: see `mppool.Pool._counter_totals`)."""
        if self.pid != os.getpid():  # a forked child: a lock another thread held stays held
            self.pid, self.lock = os.getpid(), threading.Lock()
            self.last = [None] * len(self.gauges)
        try:
            with self.lock:
                nidle, nusing = len(p._avail), len(p._using)
                if p._shutdown:
                    values: tuple[float, ...] = (0, 0, 0, 0, 0)
                else:
                    nwaiting = sum(1 for w in tuple(p._waiters) if not w.done)
                    values = (nidle + nusing, nusing, nidle, nwaiting, p._max_size)
                last = self.last
                for i, value in enumerate(values):
                    if last[i] != value:
                        last[i] = value
                        self.gauges[i].set(value)
        except Exception:
            log.debug("mppool: pool %r: metrics not written", p._name, exc_info=True)
        self.counters.write_soon(p, force=p._shutdown)


# Where the counts change besides a get: returns, a get that queues (waiting goes up while it
# waits), closes, creations for min_size, housekeeping, shutdown, resizes, reclaims.
_REFRESH_AFTER = ("ret", "put", "_checkin", "_acquire", "_settle", "_fill", "housekeep",
                  "shutdown", "resize", "_reclaim", "_drop_waiters")
_classes: dict[type, type] = {}


def _instrumented_class(cls: type) -> type:
    """A subclass of ``cls`` (same name) that times gets and writes the gauges; the class
    itself, and every pool made while metrics are off, are untouched."""
    with _made:
        sub = _classes.get(cls)
        if sub is not None:
            return sub

    def get(self: Any, timeout: float | None = None) -> Any:
        m = self._metrics
        m.timing.on = True
        start = self._clock.now()
        try:
            return cls.get(self, timeout)  # type: ignore[attr-defined]
        finally:
            m.timing.on = False
            m.wait.observe(self._clock.now() - start)
            m.refresh(self)

    def _checkout(self: Any, holder: Any, timeout: float | None = None) -> Any:
        m = self._metrics
        if getattr(m.timing, "on", False):
            return cls._checkout(self, holder, timeout)  # type: ignore[attr-defined]
        start = self._clock.now()
        try:
            return cls._checkout(self, holder, timeout)  # type: ignore[attr-defined]
        finally:
            m.wait.observe(self._clock.now() - start)
            m.refresh(self)

    def after(func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return func(self, *args, **kwargs)
            finally:
                self._metrics.refresh(self)
        return wrapper

    ns: dict[str, Any] = {"get": get, "_checkout": _checkout, "__module__": cls.__module__,
                          "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    for method in _REFRESH_AFTER:
        func = getattr(cls, method, None)
        if func is not None:
            ns[method] = after(func)
    sub = type(cls.__name__, (cls,), ns)
    with _made:
        return _classes.setdefault(cls, sub)
