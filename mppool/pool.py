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
in counters.py, the lifecycle (open, wait, close) in lifetime.py, the operator's moves
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
from .errors import PoolClosed, TimeOut, TooManyRequests
from .holder import Holder, current_holder
from .housekeeping import Housekeeping
from .lender import Lender
from .lifetime import Lifetime
from .poolmetrics import enabled as metrics_enabled
from .poolmetrics import instrument
from .precheck import Checking
from .proxypattern import ProxyPatternCompat
from .reconnect import Reconnecting
from .sched import Scheduler
from .state import (
    CREATE,
    LIFETIME_JITTER,
    Entry,
    FunHook,
    HealthHook,
    PoolHook,
    Runner,
    Waiter,
    _Create,
)
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

__all__ = [
    "CREATE", "LIFETIME_JITTER", "RECALL_PERIOD", "Budget", "Entry", "FunHook", "HealthHook",
    "Pool", "PoolHook", "Runner", "Waiter",
]

log = logging.getLogger("mppool")

_ids = itertools.count(1)


class Pool(Housekeeping, Budgeted, Checking, Reconnecting, ProxyPatternCompat, Lifetime, Admin,
           Views, Lender):
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
            if not discard and self._fast_return(lease):
                return
        if not lease:
            log.warning("mppool: pool %r: ret() of an object it does not lend: %.80s",
                        self._name, self._trace(obj))
            return
        self._checkin(lease, discard)

    def _fast_return(self, lease: int) -> bool:
        """Under the lock: return a lease in place if nothing needs doing (no hook to run,
        nothing to recycle or recall, no waiter to hand it to); False means the general
        path must handle it."""
        entry = self._using.get(lease)
        if (entry is None or self._retter is not None or self._waiters or self._shutdown
                or self._recall_n or (self._max_use and entry.uses >= self._max_use)
                or (self._max_size and self._total() > self._max_size)):
            return False
        now = self._now()
        if entry.expires and now >= entry.expires:
            return False
        del self._using[lease]
        self._counts["nreturns"] += 1
        self._counts["usage_s"] += now - entry.last_get
        entry.holder = None
        entry.last_ret = now
        self._avail.append(entry)
        if self._draining and not self._using:
            self._drained.notify_all()
        return True

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

    # --------------------------------------------- lease API (also used by the supervisor)

    @property
    def timeout(self) -> float | None:
        """The pool's default ``get()`` timeout (None: wait forever)."""
        return self._timeout

    def _checkout(self, holder: Holder, timeout: float | None = None) -> Entry:
        """Lease an entry to ``holder``, creating or waiting as needed (the blocking get)."""
        timeout = self._timeout if timeout is None else check_timeout("timeout", timeout)
        deadline = None if timeout is None else self._clock.now() + timeout
        while True:
            got = self._acquire(holder, None if timeout == 0 else Waiter)
            if got is None:
                raise TimeOut(f"pool {self._name!r}: no object available, timeout after 0 s "
                              "(timeout=0: do not wait)")
            if isinstance(got, Waiter):
                got = self._wait(got, timeout)
            # What is left of the caller's timeout bounds the wait for a budget token too,
            # and the next try when ``check`` found the object broken.
            left = None if deadline is None else max(0.0, deadline - self._clock.now())
            if got is CREATE:
                return self._create_for(holder, left)
            if self._verify(got):  # type: ignore[arg-type]
                return self._hand_out(got)  # type: ignore[arg-type]
            timeout = left

    def _wait(self, waiter: Waiter, timeout: float | None) -> Entry | _Create:
        """Block until ``waiter`` is served; give up (and give back) on timeout or any error."""
        try:
            waiter.wait(timeout)
        except BaseException:
            self._abandon(waiter)  # KeyboardInterrupt and the like: nothing may be stranded
            raise
        if self._cancel(waiter):
            raise TimeOut(f"pool {self._name!r}: no object available, timeout after {timeout} s")
        got = waiter.result
        if isinstance(got, BaseException):
            raise got
        return got

    def _acquire(self, holder: Holder, waiter: Callable[..., Any] | None = None,
                *args: Any) -> Entry | _Create | Any | None:
        """The one decision of every get, for in-process and remote callers alike.

        Returns an idle entry now leased to ``holder`` (run `_hand_out` on it), ``CREATE`` (a
        slot is reserved: call `_create_for`, or `_release_slot` if it will not be used), or
        the waiter made by ``waiter(holder, *args)`` and queued (its ``set()`` is called later under
        the pool lock, with an entry, ``CREATE`` or an exception). None: nothing is
        available and no waiter was asked for. Newcomers never barge past queued waiters.
        An idle entry must pass `_verify` before it is handed out. TooManyRequests: the
        queue holds ``max_waiting`` gets already.
        """
        refused = None
        with self._lock:
            if self._shutdown:
                raise PoolClosed(f"pool {self._name!r} is shutting down")
            if not self._opened:
                raise PoolClosed(f"pool {self._name!r} is not open yet (open=False): call "
                                 "open() first")
            got: Any = None
            if not self._paused and (not self._waiters
                                     or not any(not w.done for w in self._waiters)):
                now = self._now()
                while self._avail:
                    entry = self._avail.popleft() if self._fifo else self._avail.pop()
                    if entry.expires and now >= entry.expires:
                        self._counts["nexpired"] += 1
                        self._to_close.append(entry)
                        continue
                    self._lease(entry, holder, now)
                    got = entry
                    break
                else:
                    if self._room():
                        self._ncreating += 1
                        got = CREATE
            if got is None and waiter is not None:
                if (self._max_waiting and len(self._waiters) >= self._max_waiting
                        and sum(1 for w in self._waiters if not w.done) >= self._max_waiting):
                    refused = TooManyRequests(f"pool {self._name!r}: {self._max_waiting} gets "
                                              f"wait already (max_waiting={self._max_waiting})")
                else:
                    got = waiter(holder, *args)
                    if getattr(got, "since", 0.0) is None:  # stats() shows how long it waited
                        got.since = self._clock.now()
                    self._waiters.append(got)
                    self._counts["requests_queued"] += 1
            if got is None:
                self._request_failed()  # timeout=0 and nothing, or refused
            closing = bool(self._to_close)
        if closing:  # expired entries met on the way: closed on the runner, if there is one
            self._settle(offload=True)
        if refused is not None:
            raise refused
        return got

    def _cancel(self, waiter: Any) -> bool:
        """Withdraw a queued waiter that gave up (timed out); False if it was served first."""
        with self._lock:
            if not waiter.cancel():
                return False
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
            self._request_failed()
            self._served(waiter, self._clock.now())
            return True

    def _abandon(self, waiter: Any) -> None:
        """A waiter's caller is gone (interrupted, cancelled): withdraw it, or give back what
        it was handed meanwhile, so that nothing is stranded."""
        if self._cancel(waiter):
            return
        got = waiter.result
        if got is CREATE:
            self._release_slot()
        elif isinstance(got, Entry):
            self._checkin(got.lease)

    def _hand_out(self, entry: Entry) -> Entry:
        """Run the getter hook on an entry about to reach its holder (its one call site)."""
        if self._getter is not None:
            self._hook("getter", self._getter, entry.obj)
        return entry

    def _create_for(self, holder: Holder, timeout: float | None = None) -> Entry:
        """Create an object in a reserved slot and hand it out to ``holder``; an error frees
        the slot. ``timeout`` bounds the wait for a budget token (None: the pool's timeout).
        """
        try:
            entry = self._create(timeout=self._timeout if timeout is None else timeout)
        except BaseException:
            with self._lock:
                self._request_failed()
            raise
        with self._lock:
            self._ncreating -= 1
            if self._shutdown:
                self._to_close.append(entry)
                closed = True
            else:
                self._lease(entry, holder, self._clock.now())
                self._filled.notify_all()
                closed = False
        if closed:
            self._settle()
            raise PoolClosed(f"pool {self._name!r} is shutting down")
        return self._hand_out(entry)

    def _release_slot(self) -> None:
        """Give back a slot reserved by _acquire() that will not be used."""
        with self._lock:
            self._ncreating -= 1
            self._grant_slots()
        self._settle(offload=True)

    def _lent(self, lease: int, holder: Holder | None = None) -> Entry | None:
        """The entry of ``lease`` if it is lent (to ``holder``, when given), else None."""
        with self._lock:
            entry = self._using.get(lease)
            if entry is None or (holder is not None and entry.holder != holder):
                return None
            return entry

    def _checkin(self, lease: int, discard: bool = False, holder: Holder | None = None) -> bool:
        """Return a leased entry; False (and a warning) if the lease is unknown, killed, or
        (``holder`` given) lent to somebody else: a lease is returned only by its holder."""
        with self._lock:
            entry = self._using.get(lease)
            if entry is not None and holder is not None and entry.holder is not holder \
                    and entry.holder != holder:
                return False  # somebody else's lease: the remote caller logs the refusal
            if not discard and self._fast_return(lease):
                return True
        if entry is None:
            if holder is not None:
                return False  # the remote caller logs it, rate-limited per connection
            log.warning("mppool: pool %r: lease %d returned twice, unknown or already killed",
                        self._name, lease)
            return False
        self._hook("retter", self._retter, entry.obj)
        recalled = bool(self._recall_n) and not discard and self._recall_wanted(entry)
        with self._lock:
            if self._using.get(lease) is not entry:
                return False  # killed or reclaimed while the retter ran
            del self._using[lease]
            self._counts["nreturns"] += 1
            entry.last_ret = now = self._clock.now()
            self._returned(entry, now)
            entry.holder = None
            if discard:
                self._counts["returns_bad"] += 1
            if self._shutdown or discard or (recalled and self._recall_on_return()):  # budget.py
                self._to_close.append(entry)
            elif self._max_use and entry.uses >= self._max_use:
                self._counts["nwornout"] += 1
                self._to_close.append(entry)
            elif entry.expires and now >= entry.expires:
                self._counts["nexpired"] += 1
                self._to_close.append(entry)
            elif self._max_size and not self._burst_limit and self._total() >= self._max_size:
                self._to_close.append(entry)  # the pool was resized below its current count
            else:  # with burst_limit, _put_back closes what is above max_size if nobody waits
                self._put_back(entry)
            if not self._using:
                self._drained.notify_all()
        self._settle()
        return True

    def _reclaim(self, pred: Callable[[Holder], bool], reset: PoolHook | None = None) -> int:
        """Take back every lease whose holder matches ``pred`` (a holder that died).

        With ``reset``, each object is reset (e.g. rolled back) and reused; if the reset
        fails it is closed. Without it, objects go straight back to the pool.
        """
        with self._lock:
            leases = [k for k, e in self._using.items() if e.holder is not None and pred(e.holder)]
            entries = [self._using.pop(k) for k in leases]
            self._nchecking += len(entries)
        for entry in entries:
            ok = True
            if reset is not None:
                try:
                    reset(entry.obj)
                except Exception:
                    log.warning("mppool: pool %r: reset of a reclaimed object failed, closing it",
                                self._name, exc_info=True)
                    ok = False
            with self._lock:
                self._nchecking -= 1
                entry.last_ret = self._clock.now()
                self._returned(entry, entry.last_ret)
                entry.holder = None
                if ok and not self._shutdown:
                    self._put_back(entry)
                else:
                    self._to_close.append(entry)
                if not self._using:
                    self._drained.notify_all()
        if entries:
            self._settle(offload=True)
        return len(entries)

    def _drop_waiters(self, pred: Callable[[Any], bool]) -> int:
        """Forget queued waiters matching ``pred`` (their client went away)."""
        with self._lock:
            dropped = [w for w in self._waiters if pred(w) and w.cancel()]
            for w in dropped:
                self._waiters.remove(w)
            if dropped:
                self._grant_slots()  # a dropped waiter may have been first in line
        return len(dropped)
