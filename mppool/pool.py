"""The core pool: `Pool`, the lease state machine, used in-process and by the supervisor.

    in this process                                   in the supervisor (its lease loop)
    ───────────────                                   ──────────────────────────────────
    get() ─ fast path: an idle entry, nobody queued   a client's get
          └ else _checkout():
              _acquire(holder, Waiter) ◀────────────── _acquire(holder, its RemoteWaiter)
                │ an idle entry  → _hand_out(entry): the getter hook
                │ CREATE         → _create_for(holder): budget token, fun, opener
                │ a waiter       → queued; later set(), under the lock, with an entry,
                │                  CREATE or PoolClosed; _cancel()/_abandon() if it gives up
    ret(obj) ─ obj → lease (LeaseMap)                 a client's put
          └ fast path: back to the idle entries
          └ else _checkin(lease) ◀───────────────────  _checkin(lease, holder=its connection)
              retter hook, then to the oldest waiter, kept idle, or closed (discarded,
              worn out, expired, recalled by the budget, above a shrunk max_size)
                                                      a client's process died or left:
                                                      _reclaim(pred, reset), _drop_waiters(pred)

Every method decides under the one lock and does the slow work outside it; state.py says
what the lock guards and where that work is done. The periodic round is in housekeeping.py,
budgets (tokens and recall) in budget.py, the pre-ping of idle objects (``check``) in
precheck.py, creation failures (backoff, ``reconnect_failed``) in reconnect.py, the counters
in counters.py, the lease-level methods below in leasing.py, the lifecycle (open, wait,
close) in lifetime.py, the operator's moves
(pause, resize, drain) in admin.py, stats() in views.py; `Pool` combines them. The supervisor queues waiters
tied to a client connection here, so a client that dies while waiting is dropped from the
queue instead of blocking a server thread (a stock manager semaphore loses a unit for ever
when a client dies blocked in acquire(): its server thread takes the unit later and fails to
send it).

The lease-level methods (``_checkout``, ``_acquire``, ``_checkin``, ...) are underscored: they
are the supervisor's and the thin pools' (``pools.Pool``, ``db_pool``) way in, not the API.
So are the ``clock``, ``scheduler`` and ``runner`` a pool may be made with: not parameters of
``Pool()``, but of `Pool._made_with` (the supervisor's pools, tests with a fake clock).
"""

from __future__ import annotations

import datetime
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from .admin import Admin
from .budget import RECALL_PERIOD, Budget, Budgeted, check_budget
from .clock import REAL_CLOCK, Clock
from .holder import Holder, current_holder
from .housekeeping import Housekeeping
from .leasing import Leasing
from .lender import Lender
from .lifetime import Lifetime
from .poolmetrics import enabled as metrics_enabled
from .poolmetrics import instrument
from .precheck import Checking
from .proxypattern import ProxyPatternCompat
from .reconnect import Reconnecting
from .sched import Scheduler
from .state import LIFETIME_JITTER, Entry, FunHook, HealthHook, PoolHook, Runner
from .validate import (
    check_burst,
    check_callable,
    check_duration,
    check_int,
    check_period,
    check_sizes,
    check_timeout,
)
from .views import Views
from .waiters import CREATE, Waiter

__all__ = [
    "CREATE", "LIFETIME_JITTER", "RECALL_PERIOD", "Budget", "Entry", "FunHook", "HealthHook",
    "Pool", "PoolHook", "Runner", "Waiter",
]

log = logging.getLogger("mppool")

_ids = itertools.count(1)


class Pool(Leasing, Housekeeping, Budgeted, Checking, Reconnecting, ProxyPatternCompat, Lifetime,
           Admin, Views, Lender):
    """A thread-safe pool of objects made on demand by ``fun(i)``, with ProxyPatternPool's
    API: ``get()``/``ret()`` (alias ``put``), ``with pool.obj() as o:`` (alias ``item``),
    ``stats()``, ``shutdown()``, ``resize()``, ``free()``, ``waiting()``, ``len(pool)``.

    Waiters are served first come, first served; an object returned goes to the oldest
    waiter; a waiter that timed out never swallows an object. An exception in a hook is
    logged and swallowed: the pool stays consistent.

    Durations: ``None`` or ``math.inf`` mean forever (``timeout``) or never (the ``max_*``
    delays, where 0 means never too); any finite number >= 0 is seconds; anything else
    (NaN, negative, not a number) raises ValueError/TypeError naming the parameter.

    **Sizes and waiting**

    - ``fun``: ``fun(i)`` makes an object; it is given the creation number (0, 1, 2, ...).
      Required. An exception it raises propagates out of ``get()`` and costs no slot; at
      construction (for ``min_size``) it is logged, not raised.
    - ``max_size``: the bound on objects (idle + in use); 0 or None: unbounded.
    - ``min_size``: objects made at construction and whenever the count falls below it.
    - ``timeout``: how long ``get()`` waits by default (None: forever; 0: not at all);
      ``TimeOut`` when nothing came in time.
    - ``burst_limit`` (keyword): None makes ``max_size`` a hard bound. An int makes it soft:
      when nothing is idle, a get makes objects up to ``burst_limit`` instead of waiting; an
      object returned while the pool holds more than ``max_size`` and nobody waits is closed
      (``stats()["nburst_closed"]``). Needs ``max_size >= 1`` and ``burst_limit >=
      max_size`` (ValueError otherwise). ``free()`` counts the room up to ``burst_limit``;
      ``min_size`` and ``resize()`` work on ``max_size``.
    - ``max_waiting`` (keyword): 0, no limit; otherwise a ``get()`` that would queue behind
      ``max_waiting`` others raises ``TooManyRequests`` at once.

    **Recycling and long use**

    - ``max_use``: an object used this many times is closed (0: no limit).
    - ``max_avail_delay``: an object idle this long is closed (never below ``min_size``).
    - ``max_lifetime`` (keyword): an object this old is closed when next idle (up to 5%
      random jitter, so that objects do not all expire together).
    - ``max_using_delay``: an object held longer is reported (a warning naming its holder).
    - ``max_using_delay_kill``: an object held longer is taken back: its lease is killed
      (the object is closed and its slot freed; a later ``ret`` of it is ignored). Given
      alone, it is the warning delay too.
    - ``kill_holder`` (keyword): with a killed lease, terminate its holder process too
      (SIGTERM, then SIGKILL); meaningful in shared pools, where holders are other processes.
    - ``delay``: the housekeeping period (seconds). 0: derived, half the smallest non-zero of
      ``max_avail_delay``/``max_using_delay``/``max_lifetime``, else 60 s when ``health`` is
      set, else none; None or ``inf``: no housekeeping at all.

    **Hooks** (each called with the object)

    - ``opener`` after creation, ``getter`` on each get, ``retter`` on each return,
      ``closer`` when the object is closed.
    - ``health``: ``health(obj) -> bool`` runs on idle objects every ``health_freq``
      housekeeping rounds; an unhealthy object is closed and replaced.
    - ``check`` (keyword): ``check(obj) -> bool`` runs on an idle object just before
      ``get()`` hands it out (a pre-ping); False or an exception closes it and ``get()`` goes
      on to another or a new object within the same deadline. ``check_after`` (keyword):
      only objects idle at least this many seconds are checked (0.0: all).
    - ``stats``, ``tracer``: ``stats(obj)`` and ``tracer(obj)`` describe an object in
      ``stats()`` and in warnings.

    **Failing creations, lifecycle, naming**

    - ``reconnect_timeout`` (keyword, 300.0), ``reconnect_failed`` (keyword): when making
      objects for ``min_size`` fails, retries back off (1 s, doubling, +-10% jitter) for up
      to ``reconnect_timeout`` seconds, then ``reconnect_failed(pool)`` is called, once per
      outage.
    - ``open`` (keyword, True): with False nothing is made until ``pool.open()``;
      ``pool.wait(timeout)`` blocks until ``min_size`` objects exist; ``close()`` is
      ``shutdown()``, and ``with Pool(...) as pool:`` closes on exit.
    - ``budget`` (keyword): a shared token pool (``client.token_pool(...)``); every object
      holds one token while it lives, so the objects of every process using that budget never
      exceed its size. Idle objects above ``min_size`` are given back when another process
      waits for the budget.
    - ``name`` (keyword): how logs, errors, stats and metrics name the pool (default
      ``"#<number>"``).
    - ``log_level``: sets the level of the ``"mppool"`` logger.
    """

    def __init__(
        self,
        fun: FunHook | None = None,
        max_size: int | None = 0,
        min_size: int = 1,
        timeout: float | None = None,
        max_use: int = 0,
        max_avail_delay: float | None = 0.0,
        max_using_delay: float | None = 0.0,
        max_using_delay_kill: float | None = 0.0,
        health_freq: int = 1,
        delay: float | None = 0.0,
        opener: PoolHook | None = None,
        getter: PoolHook | None = None,
        retter: PoolHook | None = None,
        closer: PoolHook | None = None,
        health: HealthHook | None = None,
        stats: Callable[[Any], Any] | None = None,
        tracer: Callable[[Any], Any] | None = None,
        log_level: int | None = None,
        *,
        max_lifetime: float | None = 0.0,
        burst_limit: int | None = None,
        budget: Budget | None = None,
        kill_holder: bool = False,
        name: str | None = None,
        check: HealthHook | None = None,
        check_after: float | None = 0.0,
        max_waiting: int = 0,
        reconnect_timeout: float | None = 300.0,
        reconnect_failed: PoolHook | None = None,
        open: bool = True,
    ) -> None:
        """See the class: every parameter is described there."""
        # Set only by _made_with(): not parameters, so that help(Pool) shows the API alone.
        clock, scheduler, runner = self.__dict__.pop("_internals", (None, None, None))
        # Validate everything before touching any state: nothing is half-created on error.
        check_callable("fun", fun, required=True)
        min_size, max_size = check_sizes(min_size, 0 if max_size is None else max_size)
        burst_limit = check_burst(burst_limit, max_size)
        self._timeout = check_timeout("timeout", timeout)
        self._max_use = check_int("max_use", max_use)
        # Options where 0 means off store "never" (None, inf) as 0: no arithmetic and no
        # OS wait ever sees inf. Huge finite values are kept: waits are clamped where made.
        self._max_avail_delay = check_period("max_avail_delay", max_avail_delay)
        max_using_delay = check_period("max_using_delay", max_using_delay)
        self._max_using_delay_kill = check_period("max_using_delay_kill", max_using_delay_kill)
        self._health_freq = check_int("health_freq", health_freq, minimum=1)
        hk_delay = check_duration("delay", delay)  # None: housekeeping never runs
        self._max_lifetime = check_period("max_lifetime", max_lifetime)
        for hook_name, hook in (("opener", opener), ("getter", getter), ("retter", retter),
                                ("closer", closer), ("health", health), ("stats", stats),
                                ("tracer", tracer)):
            check_callable(hook_name, hook)
        check_budget(budget)
        check_callable("runner", runner)
        for flag, value in (("kill_holder", kill_holder), ("open", open)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {value!r}")
        self._max_waiting = check_int("max_waiting", max_waiting)
        self._init_check(check, check_after)
        self._init_reconnect(reconnect_timeout, reconnect_failed)
        if log_level is not None:
            log.setLevel(log_level)

        self._fun: FunHook = fun  # type: ignore[assignment]
        self._max_size = max_size
        self._burst_limit = burst_limit
        self._min_size = min_size
        # If only the kill delay is given, warn at the same time as we kill.
        self._max_using_delay_warn = max_using_delay or self._max_using_delay_kill
        self._opener, self._getter, self._retter, self._closer = opener, getter, retter, closer
        self._health, self._stats_hook, self._tracer = health, stats, tracer or str
        self._budget = budget
        self._kill_holder = kill_holder
        self._clock = clock or REAL_CLOCK
        # The real clock is time.monotonic itself: no Python frame per get and put for it.
        self._now = time.monotonic if type(self._clock) is Clock else self._clock.now

        self._id = next(_ids)
        # Errors and logs name the pool: by its name in the supervisor, else "#<id>".
        self._name = str(name) if name else f"#{self._id}"
        self._started = datetime.datetime.now()
        self._started_mono = self._clock.now()
        self._init_state()
        # Called with the holder of a killed lease when kill_holder=True (the supervisor
        # terminates the process; in-process there is nobody else to kill).
        self.on_kill_holder: Callable[[Holder, float], None] | None = None
        self._runner = runner
        # PPP_WERKZEUG_WORKAROUND (see proxypattern.py); the supervisor passes its scheduler.
        idle = self._idle_start(served=scheduler is not None)
        self._hk_delay = None if idle else hk_delay
        self._sched_arg, self._own_clock = scheduler, clock is not None
        self._fill_at_open = not idle
        if metrics_enabled():  # PROMETHEUS_MULTIPROC_DIR: see poolmetrics.py; else untouched
            instrument(self)
        self._register()
        if open:
            self.open()

    @classmethod
    def _made_with(cls, *args: Any, clock: Clock | None = None,
                   scheduler: Scheduler | None = None, runner: Runner | None = None,
                   **options: Any) -> Pool:
        """``Pool(*args, **options)`` with internals of its own (the supervisor, tests).

        ``clock``: time for every deadline and delay (a fake one in tests). ``scheduler``:
        where housekeeping rounds run (the supervisor shares one). ``runner``: how
        housekeeping runs the user's code (``fun`` to refill ``min_size``, ``closer``,
        ``health``, ``tracer``): ``runner(job)`` must arrange for ``job()`` to be called soon
        on a thread of its own, or raise if it cannot (the work is then retried at the next
        round). Without one, housekeeping runs them itself, in the scheduler's thread. With
        one, a round only decides, under the lock, and never blocks on a hook: a hook that
        hangs delays only this pool's runner.
        """
        pool = cls.__new__(cls)
        vars(pool)["_internals"] = (clock, scheduler, runner)  # read (and dropped) by __init__
        pool.__init__(*args, **options)  # type: ignore[misc]
        return pool

    # ------------------------------------------------------------------ public API

    def get(self, timeout: float | None = None) -> Any:
        """Get an object; ``timeout=None`` uses the pool's, 0 means do not wait."""
        if timeout is not None:
            check_timeout("timeout", timeout)
        holder = current_holder()
        got: Entry | None = None
        with self._lock:
            # Fast path, one lock: an idle object and nobody queued before us.
            avail = self._avail
            if (avail and not self._waiters and not self._shutdown and not self._paused
                    and self._check is None):
                entry = avail.popleft() if self._fifo else avail.pop()
                now = self._now()
                if entry.expires and now >= entry.expires:
                    avail.appendleft(entry) if self._fifo else avail.append(entry)  # general path
                else:
                    self._lease(entry, holder, now)
                    self._by_obj.add(entry.obj, entry.lease)
                    got = entry
        if got is not None:
            return self._hand_out(got).obj
        entry = self._checkout(holder, timeout)
        with self._lock:
            self._by_obj.add(entry.obj, entry.lease)
        return entry.obj

    def ret(self, obj: Any, discard: bool = False) -> None:
        """Return an object got from this pool; unknown or twice-returned objects are ignored.

        With ``discard=True`` the object is closed instead of kept (it is known broken).
        """
        with self._lock:
            lease = self._by_obj.take(obj)
            if not discard and self._fast_return(self._using.get(lease)):
                return
        if not lease:
            log.warning("mppool: pool %r: ret() of an object it does not lend: %.80s",
                        self._name, self._trace(obj))
            return
        self._checkin(lease, discard)

    put = ret

    def free(self) -> int:
        """How many get() calls would succeed right now without waiting (0 when paused)."""
        with self._lock:
            if self._shutdown or self._paused:
                return 0
            limit = self._burst_limit or self._max_size  # burst objects too: nobody waits
            if not limit:
                return 2**31 - 1
            return len(self._avail) + max(0, limit - self._total())

    def waiting(self) -> int:
        """How many ``get()`` calls are blocked waiting for an object now."""
        with self._lock:
            return sum(1 for w in self._waiters if not w.done)

    def __len__(self) -> int:
        with self._lock:
            return len(self._avail) + len(self._using)

    @property
    def timeout(self) -> float | None:
        """The pool's default ``get()`` timeout (None: wait forever)."""
        return self._timeout
