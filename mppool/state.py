"""The core pool's state: what its one lock guards, and the one place where the work decided
under that lock is done.

`mppool.Pool` is this state plus the decisions made on it: the lease API (pool.py), the
housekeeping rounds (housekeeping.py) and budget recall (budget.py). Each decision has the
same two steps, so that no user code ever runs under the lock and the lock is held briefly:

    1. decide, under _lock                      2. the work that follows, outside it
       ─────────────────────                       ─────────────────────────────────
       idle entry ──lease──▶ _using                the getter hook (Pool._hand_out)
       returned entry ──▶ a waiter, or _avail      (the retter hook ran before: Pool._checkin)
                     (or _to_close: a burst object above max_size, see burst_limit)
       free room ──▶ a creation right: CREATE      fun + opener, by whoever got the right
                     to a waiter, or a fill        (Pool._create_for, Housekeeping._fill)
                     (room: up to burst_limit if set, else max_size)
       any entry ──▶ _to_close                     _settle(): closer, budget token back,
                                                   the freed room to the next waiter

_settle() is the one place where closes happen. It runs in the caller's thread, or with
``offload=True`` as a job on the pool's runner when the caller must not run user code (a
housekeeping round, the supervisor's lease loop). _to_close is the pool's backlog, not one
decision's list: a settle closes whatever it finds there, so work that a busy runner refused
(at most one job of a kind runs at a time) is done by the next settle, wherever it runs.

What _lock guards:

    _avail      deque of idle entries (taken from the right, so the left end idles longest)
    _using      lease id -> entry lent out
    _waiters    deque of waiters, oldest first (see `Waiter` for what a waiter must do)
    _to_close   entries taken out of the pool, to be closed outside the lock (stats: ntodel)
    _ncreating  slots reserved for objects being created
    _nchecking  entries out of both _avail and _using for a moment (a health check, the reset
                of a reclaimed object): they still hold their slot, or the bound could be
                exceeded
    _counts     the counters that stats() reports (counters.py: psycopg_pool's)
    _outage     creation failures and their backoff (reconnect.py)
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import counters
from .budget import Budget, draw_token, give_back
from .clock import Clock
from .holder import Holder
from .leasemap import LeaseMap
from .outage import REFUSED, admit
from .ratelog import RateLimitedLog
from .sched import Scheduler, Task
from .waiters import CREATE as CREATE  # the `X as X` names: re-exported
from .waiters import Waiter as Waiter
from .waiters import WaiterBase as WaiterBase
from .waiters import withdraw as withdraw

if TYPE_CHECKING:
    from .outage import Outage

log = logging.getLogger("mppool")

FunHook = Callable[[int], Any]
PoolHook = Callable[[Any], Any]
HealthHook = Callable[[Any], bool]
Runner = Callable[[Callable[[], None]], None]

LIFETIME_JITTER = 0.05

# ProxyPatternPool's. It counts uses and borrows apart, but every lease is both here: one
# counter (nuses) serves both, and stats() reports it as nborrows too (one dict increment
# less per get: about 3% of an in-process get + ret, counted with callgrind).
COUNTERS = (
    "ncreated", "nuses", "nkilled", "nrecycled", "nwornout", "nreturns",
    "ndestroys", "nhealth", "bad_health", "hk_rounds", "hk_errors", "hc_rounds", "hc_errors",
    "nexpired", "nrecalled", "nburst_closed",
)


class Entry:
    """One pooled object and what the pool knows about it."""

    __slots__ = (
        "blob",
        "created",
        "expires",
        "holder",
        "last_get",
        "last_ret",
        "lease",
        "num",
        "obj",
        "token",
        "uses",
        "warned",
    )

    def __init__(self, obj: Any, num: int, now: float, lifetime: float, token: Any) -> None:
        self.obj = obj
        self.num = num
        self.created = now
        # Jitter so that objects created together do not all expire together.
        self.expires = now + lifetime * (1 - random.uniform(0, LIFETIME_JITTER)) if lifetime else 0.0
        self.uses = 0
        self.last_get = now
        self.last_ret = now
        self.lease = 0
        self.holder: Holder | None = None
        self.warned = False
        self.token = token  # its budget token, given back when it is closed
        self.blob: bytes | None = None  # the supervisor's cached pickle of obj


# Lease ids are random 63-bit numbers, not a counter: a client cannot guess another's lease
# (and a lease is honoured only for the connection that holds it anyway).
_lease_rng = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _lease_rng.seed(os.urandom(16)))


class PoolState:
    """The state of a core pool and the moves between its containers (see the module)."""

    # Settings, fixed at construction (but _max_size, which resize() changes under the lock).
    _id: int
    _name: str
    _started: datetime.datetime
    _started_mono: float
    _fun: FunHook
    _min_size: int
    _max_size: int
    _burst_limit: int  # 0: off; else objects are created up to it, kept up to _max_size
    _timeout: float | None
    _max_use: int
    _max_avail_delay: float
    _max_using_delay_warn: float
    _max_using_delay_kill: float
    _max_lifetime: float
    _health_freq: int
    _opener: PoolHook | None
    _getter: PoolHook | None
    _retter: PoolHook | None
    _closer: PoolHook | None
    _health: HealthHook | None
    _stats_hook: Callable[[Any], Any] | None
    _tracer: Callable[[Any], Any]
    _budget: Budget | None
    _kill_holder: bool
    _clock: Clock
    _now: Callable[[], float]
    _runner: Runner | None
    _check: HealthHook | None  # precheck.py
    _check_after: float
    _max_waiting: int
    _reconnect_failed: Callable[[Any], Any] | None
    _sched_arg: Scheduler | None  # the scheduler given to the constructor, if any
    on_kill_holder: Callable[[Holder, float], None] | None

    # Under _lock (see the module docstring).
    _lock: threading.Lock
    _drained: threading.Condition  # shutdown(delay) waits on it for leases to come back
    _avail: deque[Entry]
    _using: dict[int, Entry]
    _by_obj: LeaseMap  # obj -> its leases, for ret(obj)
    _waiters: deque[Any]
    _to_close: deque[Entry]
    _shutdown: bool
    _paused: bool  # pause(): gets queue as if the pool were empty; resume() serves them
    _draining: bool
    _fifo: bool  # eventlet's pools.Pool hands out the oldest idle item first
    _nextnum: int
    _ncreating: int
    _nchecking: int
    _counts: dict[str, Any]  # ints, but the float *_ms counters (counters.py)
    _opened: bool  # open() was called (lifetime.py)
    _filled: threading.Condition  # wait() waits on it for min_size objects
    _outage: Outage
    _refill_task: Task | None
    _inflight: set[str]  # kinds of runner jobs started and not finished (see _offload)
    _runner_errors: RateLimitedLog

    # Housekeeping (housekeeping.py) and recall (budget.py).
    _delay: float
    _sched: Scheduler | None
    _own_sched: bool
    _hk_task: Task | None
    _hk_time: float
    _hk_last: float
    _weak_hk: Callable[[], None]
    _recall_n: int
    _recall_since: float | None
    _recall_rounds: int
    _recall_task: Task | None
    _weak_recall: Callable[[], None]

    def _init_state(self) -> None:
        """The empty containers and counters; the lock that guards them."""
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._filled = threading.Condition(self._lock)
        self._avail = deque()
        self._using = {}
        self._by_obj = LeaseMap()
        self._waiters = deque()
        self._to_close = deque()
        self._shutdown = False
        self._paused = False
        self._draining = False
        self._fifo = False
        self._nextnum = 0
        self._ncreating = 0
        self._nchecking = 0
        self._counts = dict.fromkeys(COUNTERS + counters.KEPT, 0)
        self._opened = False
        # Until open() starts them: no housekeeping, no recall (stats() and shutdown() read these).
        self._delay = self._hk_time = 0.0
        self._hk_last = self._started_mono
        self._sched, self._own_sched = None, False
        self._hk_task = self._recall_task = None
        self._recall_n = 0
        # At most one runner job of each kind at a time, so that a hook that hangs cannot
        # make rounds pile up jobs behind it (the next job picks up whatever is left to do).
        self._inflight = set()
        self._runner_errors = RateLimitedLog(10.0)

    # ------------------------------------------------------------- moves, under the lock

    def _total(self) -> int:
        return len(self._avail) + len(self._using) + self._ncreating + self._nchecking

    def _room(self) -> bool:
        """Is there room to create one more object? Up to ``burst_limit`` when it is set."""
        limit = self._burst_limit or self._max_size
        return not limit or self._total() < limit

    def _lease(self, entry: Entry, holder: Holder, now: float) -> None:
        lease = _lease_rng.getrandbits(63) or 1
        while lease in self._using:
            lease = _lease_rng.getrandbits(63) or 1
        entry.lease = lease
        entry.holder = holder
        entry.last_get = now
        entry.uses += 1
        entry.warned = False
        self._using[lease] = entry
        self._counts["nuses"] += 1  # nborrows too (see COUNTERS)

    def _put_back(self, entry: Entry) -> None:
        """Hand an idle entry (counted nowhere) to the oldest live waiter, or keep it; with
        ``burst_limit``, close it instead if the pool holds ``max_size`` objects without it."""
        now = self._clock.now()
        while self._waiters and not self._paused:
            w = self._waiters.popleft()
            if w.done:
                continue
            self._lease(entry, w.holder, now)
            if w.set(entry):
                self._served(w, now)
                return
            del self._using[entry.lease]
            entry.holder = None
            self._counts["nuses"] -= 1  # not a use after all (requests_num counts them)
        if self._burst_limit and self._total() >= self._max_size:
            self._counts["nburst_closed"] += 1  # a burst object, and nobody waits for it
            self._to_close.append(entry)
            return
        self._avail.append(entry)

    def _grant_slots(self) -> None:
        """Turn free room into creation rights for the oldest waiters."""
        while self._waiters and self._room() and not self._shutdown and not self._paused:
            w = self._waiters.popleft()
            if w.done:
                continue
            self._ncreating += 1
            if w.set(CREATE):
                self._served(w, self._clock.now())
            else:
                self._ncreating -= 1

    def _served(self, waiter: Any, now: float) -> None:
        """A queued get was served (or gave up): count the time it waited."""
        since = getattr(waiter, "since", None)
        if since is not None:
            self._counts["requests_wait_s"] += now - since

    def _request_failed(self) -> None:
        """Under the lock: a get ended without an object (counters.py: it made no lease)."""
        self._counts["requests_errors"] += 1
        self._counts["requests_adj"] += 1

    def _returned(self, entry: Entry, now: float) -> None:
        """Under the lock: an entry comes back from its holder (for usage_ms)."""
        self._counts["usage_s"] += now - entry.last_get

    # ------------------------------------------------- the work after a decision, outside

    def _settle(self, offload: bool = False) -> None:
        """Do the closes decided under the lock (see the module docstring): here, or with
        ``offload`` on the runner if the pool has one."""
        if offload:
            self._offload("flush", self._close_backlog)
        else:
            self._close_backlog()

    def _close_backlog(self) -> None:
        """Close the entries in _to_close one by one; each frees its token, then its slot."""
        while True:
            with self._lock:
                if not self._to_close:
                    return
                entry = self._to_close.popleft()
            self._hook("closer", self._closer, entry.obj)
            give_back(self._budget, entry.token, self._name)
            with self._lock:
                self._counts["ndestroys"] += 1
                self._grant_slots()

    def _create(self, fill: bool = False, timeout: float | None = None) -> Entry:
        """Make an object in a slot already counted in ``_ncreating`` (a creation right).

        ``fill``: for min_size, never wait for a budget token (a constructor or a
        housekeeping round must not block on other processes); try again later.
        """
        token = None
        ticket = REFUSED
        started = 0.0
        try:
            with self._lock:
                # During an outage, only the one attempt that is due calls fun (reconnect.py).
                ticket = admit(self._outage, self._clock.now())
            # Drawn before fun runs, so the cross-process total never exceeds the budget.
            try:
                token = draw_token(self._budget, fill, timeout)
            except BaseException:
                with self._lock:
                    self._outage.abort(ticket)
                    ticket = REFUSED  # not a creation failure: fun was not called
                raise
            with self._lock:
                num = self._nextnum
                self._nextnum += 1
                self._counts["connections_num"] += 1
            started = self._clock.now()
            obj = self._fun(num)
        except BaseException as exc:
            give_back(self._budget, token, self._name)
            due = False
            with self._lock:
                self._ncreating -= 1
                self._grant_slots()
                if ticket != REFUSED:
                    self._counts["connections_errors"] += 1
                    self._counts["connections_s"] += self._clock.now() - started
                    if isinstance(exc, Exception):
                        due = self._creation_failed(exc, ticket)
                    else:  # interrupted (KeyboardInterrupt...): no verdict on the server
                        self._outage.abort(ticket)
            self._settle()
            if ticket != REFUSED and isinstance(exc, Exception):
                self._after_failure(due)
            raise
        self._hook("opener", self._opener, obj)
        with self._lock:
            now = self._clock.now()
            self._counts["ncreated"] += 1
            self._counts["connections_s"] += now - started
            self._creation_succeeded()
            return Entry(obj, num, now, self._max_lifetime, token)

    # Creation outcomes: reconnect.py (the Reconnecting mixin of Pool).
    def _creation_failed(self, exc: BaseException, ticket: int) -> bool:
        raise NotImplementedError

    def _creation_succeeded(self) -> None:
        raise NotImplementedError

    def _after_failure(self, due: bool) -> None:
        raise NotImplementedError

    def _schedule_refill(self, at_least: float = 0.0) -> None:
        raise NotImplementedError

    # Housekeeping (housekeeping.py) and recall (budget.py), started by open() (lifetime.py).
    def _start_housekeeping(self, delay: float | None, scheduler: Scheduler | None,
                            own_clock: bool) -> None:
        raise NotImplementedError

    def _start_recall(self, scheduler: Scheduler | None, own_clock: bool) -> None:
        raise NotImplementedError

    def _fill(self) -> None:
        raise NotImplementedError

    # The pre-ping (precheck.py) and the budget's recall at a return (budget.py), for the
    # lease-level methods (leasing.py).
    def _verify(self, entry: Entry) -> bool:
        raise NotImplementedError

    def _recall_wanted(self, entry: Entry) -> bool:
        raise NotImplementedError

    def _recall_on_return(self) -> bool:
        raise NotImplementedError

    def _offload(self, kind: str, job: Callable[[], None]) -> bool:
        """Run ``job`` (which runs user code): inline without a runner, else on the runner,
        at most one job of each ``kind`` at a time.

        False if it was not started (one of its kind has not finished, or the runner could
        not take it); what it would have done is still to do, and the next round tries again.
        """
        if self._runner is None:
            job()
            return True
        with self._lock:
            if kind in self._inflight:
                return False
            self._inflight.add(kind)

        def run() -> None:
            try:
                job()
            except Exception:
                with self._lock:
                    self._counts["hk_errors"] += 1
                log.exception("mppool: pool %r: housekeeping job %r failed", self._name, kind)
            finally:
                with self._lock:
                    self._inflight.discard(kind)

        try:
            self._runner(run)
        except Exception as exc:  # e.g. RuntimeError: can't start new thread
            with self._lock:
                self._inflight.discard(kind)
            self._runner_errors.error("runner", "mppool: pool %r: could not start housekeeping "
                                      "job %r, will retry: %s", self._name, kind, exc)
            return False
        return True

    def _weak_task(self, method: str) -> Callable[[], None]:
        """A scheduler task calling ``self.<method>()`` that does not keep the pool alive: a
        pool dropped without shutdown() is still finalized (objects closed, tokens back)."""
        ref = weakref.ref(self)

        def tick() -> None:
            target = ref()
            if target is not None:
                getattr(target, method)()

        return tick

    # ------------------------------------------------------------------ user code

    def _hook(self, name: str, hook: PoolHook | None, obj: Any) -> None:
        if hook is None:
            return
        try:
            hook(obj)
        except Exception:
            log.warning("mppool: pool %r: %s hook raised, ignored", self._name, name, exc_info=True)

    def _trace(self, obj: Any) -> str:
        try:
            return str(self._tracer(obj))
        except Exception:
            return f"<{type(obj).__name__}>"
