"""The core pool: one thread-safe class, used in-process and served by the supervisor.

State lives in a few containers guarded by one lock:

    _avail    deque of idle entries (taken from the right, so the left end idles longest)
    _using    lease id -> entry lent out
    _waiters  deque of waiters, oldest first; each one's ``set()`` returns False once it
              gave up, so an object is never handed to a waiter that timed out or died
    _todel    entries taken out of the pool, to be closed outside the lock

Every method decides under the lock and does the slow work (``fun``, hooks, ``closer``)
outside it. A waiter is any object with ``set(result) -> bool``; the supervisor queues
waiters tied to a client connection here, so a client that dies while waiting is dropped
from the queue instead of blocking a server thread (a stock manager semaphore loses a unit
for ever when a client dies blocked in acquire(): its server thread takes the unit later and
fails to send it).
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .clock import REAL_CLOCK, Clock, clamp_wait
from .errors import PoolClosed, ServerUnavailable, TimeOut
from .holder import Holder, current_holder
from .lender import Lender
from .ratelog import RateLimitedLog
from .sched import Scheduler, Task, default_scheduler
from .validate import (
    check_budget,
    check_callable,
    check_duration,
    check_int,
    check_period,
    check_timeout,
)

log = logging.getLogger("mppool")

FunHook = Callable[[int], Any]
PoolHook = Callable[[Any], Any]
HealthHook = Callable[[Any], bool]
Runner = Callable[[Callable[[], None]], None]

LIFETIME_JITTER = 0.05
# How often a pool with a shared budget asks whether another process waits for it; idle
# objects are then given back within this period (the budget promise: 100 ms at the latest).
RECALL_PERIOD = 0.05


class Budget(Protocol):
    """A token pool that caps live objects across processes (a shared token pool)."""

    def get(self, timeout: float | None = None) -> Any: ...
    def put(self, token: Any) -> None: ...


class _Create:
    """Handed to a waiter instead of an object: a slot is reserved, create one."""

    def __repr__(self) -> str:
        return "CREATE"


CREATE = _Create()


class Entry:
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
        self.token = token
        self.blob: bytes | None = None  # the supervisor's cached pickle of obj


class Waiter:
    """A getter blocked in this process. ``set``/``cancel`` are called under the pool lock."""

    __slots__ = ("_event", "done", "holder", "result")

    def __init__(self, holder: Holder) -> None:
        self.holder = holder
        self.result: Any = None
        self.done = False
        self._event = threading.Event()

    def set(self, result: Any) -> bool:
        if self.done:
            return False
        self.result = result
        self.done = True
        self._event.set()
        return True

    def cancel(self) -> bool:
        if self.done:
            return False
        self.done = True
        return True

    def wait(self, timeout: float | None) -> bool:
        return self._event.wait(timeout)


_ids = itertools.count(1)
# Lease ids are random 63-bit numbers, not a counter: a client cannot guess another's lease
# (and a lease is honoured only for the connection that holds it anyway).
_lease_rng = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _lease_rng.seed(os.urandom(16)))
_pools: weakref.WeakSet[Pool] = weakref.WeakSet()  # every pool, for the fork hook


def _weakly(pool: Pool, method: str) -> Callable[[], None]:
    """A task calling ``pool.<method>()`` that does not keep the pool alive."""
    ref = weakref.ref(pool)

    def tick() -> None:
        target = ref()
        if target is not None:
            getattr(target, method)()

    return tick


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Pool(Lender):
    """Thread-safe pool of objects created on demand by ``fun(i)`` (ProxyPatternPool's API)."""

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
        budget: Budget | None = None,
        kill_holder: bool = False,
        clock: Clock | None = None,
        scheduler: Scheduler | None = None,
        runner: Runner | None = None,
    ) -> None:
        """Durations: None or ``math.inf`` mean forever (``timeout``, ``shutdown(delay)``)
        or never (``max_avail_delay``, ``max_using_delay``, ``max_using_delay_kill``,
        ``max_lifetime``, where 0 also means never; ``delay=None``/``inf``: no housekeeping
        at all); any finite number >= 0 is seconds; anything else raises ValueError/TypeError.

        ``runner``: how housekeeping runs the user's code (``fun`` to refill ``min_size``,
        ``closer``, ``health``, ``tracer``). ``runner(job)`` must arrange for ``job()`` to be
        called soon on a thread of its own, or raise if it cannot (the work is then retried
        at the next round). With None (the default), housekeeping runs them itself, in the
        scheduler's thread. With a runner, a housekeeping round only decides, under the
        lock, and never blocks on a hook: a hook that hangs delays only this pool's runner.
        """
        # Validate everything before touching any state: nothing is half-created on error.
        check_callable("fun", fun, required=True)
        max_size = check_int("max_size", 0 if max_size is None else max_size)
        min_size = check_int("min_size", min_size)
        if max_size and min_size > max_size:
            raise ValueError(f"min_size={min_size!r} must not exceed max_size={max_size!r}")
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
        for name, hook in (("opener", opener), ("getter", getter), ("retter", retter),
                           ("closer", closer), ("health", health), ("stats", stats),
                           ("tracer", tracer)):
            check_callable(name, hook)
        check_budget(budget)
        check_callable("runner", runner)
        if not isinstance(kill_holder, bool):
            raise TypeError(f"kill_holder must be a bool, got {kill_holder!r}")
        if log_level is not None:
            log.setLevel(log_level)

        self._fun: FunHook = fun  # type: ignore[assignment]
        self._max_size = max_size
        self._min_size = min_size
        # If only the kill delay is given, warn at the same time as we kill.
        self._max_using_delay_warn = max_using_delay or self._max_using_delay_kill
        self._opener, self._getter, self._retter, self._closer = opener, getter, retter, closer
        self._health, self._stats_hook, self._tracer = health, stats, tracer or str
        self._budget = budget
        self._kill_holder = kill_holder
        self._clock = clock or REAL_CLOCK
        self._now = self._clock.now

        self._id = next(_ids)
        self._started = datetime.datetime.now()
        self._started_mono = self._clock.now()
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._avail: deque[Entry] = deque()
        self._using: dict[int, Entry] = {}
        self._by_obj: dict[int, list[int]] = {}  # id(obj) -> lease ids, for ret(obj)
        self._waiters: deque[Any] = deque()
        self._todel: deque[Entry] = deque()
        self._shutdown = False
        self._draining = False  # shutdown(delay) waits on _drained for leases to come back
        self._fifo = False  # eventlet's pools.Pool hands out the oldest idle item first
        self._nextnum = 0
        self._ncreating = 0
        # Entries out of both _avail and _using for a moment (a health check, the reset of a
        # reclaimed object): they still hold their slot, or the bound could be exceeded.
        self._nchecking = 0
        self._counts = dict.fromkeys(
            [
                "ncreated", "nuses", "nkilled", "nrecycled", "nwornout", "nborrows",
                "nreturns", "ndestroys", "nhealth", "bad_health", "hk_rounds",
                "hk_errors", "hc_rounds", "hc_errors", "nexpired", "nrecalled",
            ], 0)
        self._hk_time = 0.0
        self._hk_last = self._started_mono
        # Called with the holder of a killed lease when kill_holder=True (the supervisor
        # terminates the process; in-process there is nobody else to kill).
        self.on_kill_holder: Callable[[Holder, float], None] | None = None

        self._runner = runner
        # Kinds of slow work ("flush", "health", "fill", ...) handed to the runner and not
        # finished: at most one of each kind at a time, so a hook that hangs cannot make
        # rounds pile up jobs behind it (the next job picks up whatever is left to do).
        self._inflight: set[str] = set()
        self._runner_errors = RateLimitedLog(10.0)

        smallest = min((d for d in (self._max_avail_delay, self._max_using_delay_warn,
                                    self._max_lifetime) if d), default=0.0)
        if hk_delay is None:
            self._delay = 0.0
        else:
            self._delay = hk_delay or (smallest / 2 if smallest else (60.0 if health else 0.0))
        self._sched: Scheduler | None = None
        self._own_sched = False
        # Tasks hold the pool weakly: a pool dropped without shutdown() is still finalized
        # (its __del__ shuts it down, giving back objects and budget tokens).
        self._weak_hk = _weakly(self, "_hk_tick")
        self._weak_recall = _weakly(self, "_recall_tick")
        self._hk_task: Task | None = None
        if self._delay:
            if scheduler is not None:
                self._sched = scheduler
            elif clock is not None:
                self._sched, self._own_sched = Scheduler(self._clock, workers=1), True
            else:
                self._sched = default_scheduler()
            self._hk_task = self._sched.enter(self._delay, self._weak_hk)
        self._recall_n = 0
        self._recall_task: Task | None = None
        if budget is not None and callable(getattr(budget, "waiting", None)):
            if self._sched is None:
                self._sched = (Scheduler(self._clock, workers=1) if clock is not None
                               else default_scheduler())
                self._own_sched = clock is not None
            self._recall_task = self._sched.enter(RECALL_PERIOD, self._weak_recall)
        _pools.add(self)
        self._fill()

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
            if avail and not self._waiters and not self._shutdown:
                entry = avail.popleft() if self._fifo else avail.pop()
                now = self._now()
                if entry.expires and now >= entry.expires:
                    avail.appendleft(entry) if self._fifo else avail.append(entry)  # general path
                else:
                    self._lease(entry, holder, now)
                    self._remember(entry)
                    got = entry
        if got is not None:
            return self.hand_out(got).obj
        entry = self.checkout(holder, timeout)
        with self._lock:
            self._remember(entry)
        return entry.obj

    def ret(self, obj: Any, discard: bool = False) -> None:
        """Return an object got from this pool; unknown or twice-returned objects are ignored.

        With ``discard=True`` the object is closed instead of kept (it is known broken).
        """
        with self._lock:
            key = id(obj)
            leases = self._by_obj.get(key)
            lease = leases.pop() if leases else 0
            if leases == []:
                del self._by_obj[key]
            if not discard and self._fast_return(lease):
                return
        if not lease:
            log.warning("mppool: pool %d: ret() of an object it does not lend: %.80s",
                        self._id, self._trace(obj))
            return
        self.checkin(lease, discard)

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
        entry.holder = None
        entry.last_ret = now
        self._avail.append(entry)
        if self._draining and not self._using:
            self._drained.notify_all()
        return True

    def _remember(self, entry: Entry) -> None:
        """Under the lock: note which lease ret(obj) must give back."""
        leases = self._by_obj.get(id(entry.obj))
        if leases is None:
            self._by_obj[id(entry.obj)] = [entry.lease]
        else:
            leases.append(entry.lease)

    put = ret

    def free(self) -> int:
        """How many get() calls would succeed right now without waiting."""
        with self._lock:
            if self._shutdown:
                return 0
            if not self._max_size:
                return 2**31 - 1
            return len(self._avail) + max(0, self._max_size - self._total())

    def waiting(self) -> int:
        with self._lock:
            return sum(1 for w in self._waiters if not w.done)

    def __len__(self) -> int:
        with self._lock:
            return len(self._avail) + len(self._using)

    def clear(self) -> int:
        """Close every idle object (those in use are not touched); returns how many.

        min_size is refilled by housekeeping, as after any other close.
        """
        with self._lock:
            idle = list(self._avail)
            self._avail.clear()
            self._todel.extend(idle)
        self._flush()
        return len(idle)

    def resize(self, max_size: int) -> None:
        """Change the bound; extra idle objects are closed, new room goes to waiters."""
        max_size = check_int("max_size", max_size)
        with self._lock:
            if max_size and self._min_size > max_size:
                raise ValueError(f"max_size={max_size!r} is below min_size={self._min_size!r}")
            self._max_size = max_size
            while max_size and self._avail and self._total() > max_size:
                self._todel.append(self._avail.popleft())
            self._grant_slots()
        self._flush()

    def shutdown(self, delay: float | None = 0.0) -> None:
        """Close every object, wake every waiter with PoolClosed; later gets raise it.

        ``delay``: how long to wait for objects in use to come back before closing them
        anyway (None or ``inf``: as long as it takes).
        """
        wait_for = check_duration("delay", delay)
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            waiters, self._waiters = self._waiters, deque()
            for w in waiters:
                w.set(PoolClosed(f"pool {self._id} is shutting down"))
            self._todel.extend(self._avail)
            self._avail.clear()
            deadline = None if wait_for is None else self._clock.now() + wait_for
            self._draining = True
            while self._using and (deadline is None
                                   or (wait_for and self._clock.now() < deadline)):
                # Clamped (1e300 s is a legal delay) and re-checked by this loop.
                self._drained.wait(clamp_wait(None if deadline is None
                                              else deadline - self._clock.now()))
            self._draining = False
            if self._using:
                log.warning("mppool: pool %d shutting down with %d objects in use: closing them",
                            self._id, len(self._using))
                self._todel.extend(self._using.values())
                self._using.clear()
                self._by_obj.clear()
        for task in (self._hk_task, self._recall_task):
            if task is not None:
                task.cancel()
        if self._own_sched and self._sched is not None:
            self._sched.close()
        self._flush()

    def stats(self) -> dict[str, Any]:
        """A JSON-compatible description, with ProxyPatternPool's keys plus ``nwaiting``."""
        with self._lock:
            now = self._clock.now()
            c = self._counts
            return {
                "id": self._id,
                "started": self._started.isoformat(),
                "now": time.time(),
                "running": now - self._started_mono,
                "rel_hk_last": self._hk_last - now,
                "time_per_hk": self._hk_time / max(c["hk_rounds"], 1),
                "min_size": self._min_size,
                "max_size": self._max_size,
                "max_use": self._max_use,
                "timeout": self._timeout,
                "delay": self._delay,
                "max_avail_delay": self._max_avail_delay,
                "max_lifetime": self._max_lifetime,
                "max_using_delay_kill": self._max_using_delay_kill,
                "max_using_delay_warn": self._max_using_delay_warn,
                "health_freq": self._health_freq,
                "sem": ({"value": len(self._avail) + max(0, self._max_size - self._total()),
                         "init": self._max_size} if self._max_size else None),
                "navail": len(self._avail),
                "nusing": len(self._using),
                "ntodel": len(self._todel),
                "nwaiting": sum(1 for w in self._waiters if not w.done),
                "shutdown": self._shutdown,
                "avail": [self._describe(e, now) for e in self._avail],
                "using": [self._describe(e, now) for e in self._using.values()],
                "nobjs": len(self._avail) + len(self._using),
                "ncreating": self._ncreating,
                **c,
            }

    def __str__(self) -> str:
        return json.dumps(self.stats())

    def __repr__(self) -> str:
        with self._lock:
            return (f"<mppool.Pool {self._id} [objects: {len(self._using)} in use, "
                    f"{len(self._avail)} idle, {self._ncreating} creating | "
                    f"waiters: {len(self._waiters)} | max_size: {self._max_size or 'unbounded'}]>")

    def __del__(self) -> None:
        try:
            if not self._shutdown:
                self.shutdown()  # objects closed, budget tokens given back
        except Exception:
            pass  # interpreter shutdown, or a supervisor already gone

    # --------------------------------------------- lease API (also used by the supervisor)

    @property
    def timeout(self) -> float | None:
        """The pool's default ``get()`` timeout (None: wait forever)."""
        return self._timeout

    def checkout(self, holder: Holder, timeout: float | None = None) -> Entry:
        """Lease an entry to ``holder``, creating or waiting as needed (the blocking get)."""
        timeout = self._timeout if timeout is None else check_timeout("timeout", timeout)
        deadline = None if timeout is None else self._clock.now() + timeout
        got = self.acquire(holder, None if timeout == 0 else Waiter)
        if got is None:
            raise TimeOut(f"pool {self._id}: no object available (timeout=0)")
        if isinstance(got, Waiter):
            got = self._wait(got, timeout)
        if got is CREATE:
            # What is left of the caller's timeout bounds the wait for a budget token too.
            left = None if deadline is None else max(0.0, deadline - self._clock.now())
            return self.create_for(holder, left)
        return self.hand_out(got)  # type: ignore[arg-type]

    def _wait(self, waiter: Waiter, timeout: float | None) -> Entry | _Create:
        """Block until ``waiter`` is served; give up (and give back) on timeout or any error."""
        try:
            waiter.wait(timeout)
        except BaseException:
            self.abandon(waiter)  # KeyboardInterrupt and the like: nothing may be stranded
            raise
        if self.cancel(waiter):
            raise TimeOut(f"pool {self._id}: no object available within {timeout} s")
        got = waiter.result
        if isinstance(got, BaseException):
            raise got
        return got

    def acquire(self, holder: Holder, waiter: Callable[[Holder], Any] | None = None,
                ) -> Entry | _Create | Any | None:
        """The one decision of every get, for in-process and remote callers alike.

        Returns an idle entry now leased to ``holder`` (run `hand_out` on it), ``CREATE`` (a
        slot is reserved: call `create_for`, or `release_slot` if it will not be used), or
        the waiter made by ``waiter(holder)`` and queued (its ``set()`` is called later under
        the pool lock, with an entry, ``CREATE`` or an exception). None: nothing is
        available and no waiter was asked for. Newcomers never barge past queued waiters.
        """
        with self._lock:
            if self._shutdown:
                raise PoolClosed(f"pool {self._id} is shutting down")
            got: Any = None
            if not self._waiters or not any(not w.done for w in self._waiters):
                now = self._clock.now()
                while self._avail:
                    entry = self._avail.popleft() if self._fifo else self._avail.pop()
                    if entry.expires and now >= entry.expires:
                        self._counts["nexpired"] += 1
                        self._todel.append(entry)
                        continue
                    self._lease(entry, holder, now)
                    got = entry
                    break
                else:
                    if self._room():
                        self._ncreating += 1
                        got = CREATE
            if got is None and waiter is not None:
                got = waiter(holder)
                self._waiters.append(got)
            closing = bool(self._todel)
        if closing:  # expired entries met on the way: closed on the runner, if there is one
            self._offload("flush", self._flush)
        return got

    def cancel(self, waiter: Any) -> bool:
        """Withdraw a queued waiter that gave up (timed out); False if it was served first."""
        with self._lock:
            if not waiter.cancel():
                return False
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
            return True

    def abandon(self, waiter: Any) -> None:
        """A waiter's caller is gone (interrupted, cancelled): withdraw it, or give back what
        it was handed meanwhile, so that nothing is stranded."""
        if self.cancel(waiter):
            return
        got = waiter.result
        if got is CREATE:
            self.release_slot()
        elif isinstance(got, Entry):
            self.checkin(got.lease)

    def hand_out(self, entry: Entry) -> Entry:
        """Run the getter hook on an entry about to reach its holder (its one call site)."""
        if self._getter is not None:
            self._hook("getter", self._getter, entry.obj)
        return entry

    def create_for(self, holder: Holder, timeout: float | None = None) -> Entry:
        """Create an object in a reserved slot and hand it out to ``holder``; an error frees
        the slot. ``timeout`` bounds the wait for a budget token (None: the pool's timeout).
        """
        entry = self._create(timeout=self._timeout if timeout is None else timeout)
        with self._lock:
            self._ncreating -= 1
            if self._shutdown:
                self._todel.append(entry)
                closed = True
            else:
                self._lease(entry, holder, self._clock.now())
                closed = False
        if closed:
            self._flush()
            raise PoolClosed(f"pool {self._id} is shutting down")
        return self.hand_out(entry)

    def release_slot(self) -> None:
        """Give back a slot reserved by acquire() that will not be used."""
        with self._lock:
            self._ncreating -= 1
            self._grant_slots()
        self._offload("flush", self._flush)

    def lent(self, lease: int, holder: Holder | None = None) -> Entry | None:
        """The entry of ``lease`` if it is lent (to ``holder``, when given), else None."""
        with self._lock:
            entry = self._using.get(lease)
            if entry is None or (holder is not None and entry.holder != holder):
                return None
            return entry

    def checkin(self, lease: int, discard: bool = False, holder: Holder | None = None) -> bool:
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
            log.warning("mppool: pool %d: lease %d returned twice, unknown or already killed",
                        self._id, lease)
            return False
        self._hook("retter", self._retter, entry.obj)
        with self._lock:
            if self._using.get(lease) is not entry:
                return False  # killed or reclaimed while the retter ran
            del self._using[lease]
            self._counts["nreturns"] += 1
            entry.holder = None
            entry.last_ret = now = self._clock.now()
            if self._shutdown or discard:
                self._todel.append(entry)
            elif self._recall_n > 0 and len(self._avail) + len(self._using) >= self._min_size:
                self._recall_n -= 1  # another process waits for the budget: give it back
                self._counts["nrecalled"] += 1
                self._todel.append(entry)
            elif self._max_use and entry.uses >= self._max_use:
                self._counts["nwornout"] += 1
                self._todel.append(entry)
            elif entry.expires and now >= entry.expires:
                self._counts["nexpired"] += 1
                self._todel.append(entry)
            elif self._max_size and self._total() >= self._max_size:
                self._todel.append(entry)  # the pool was resized below its current count
            else:
                self._put_back(entry)
            if not self._using:
                self._drained.notify_all()
        self._flush()
        return True

    def reclaim(self, pred: Callable[[Holder], bool], reset: PoolHook | None = None) -> int:
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
                    log.warning("mppool: pool %d: reset of a reclaimed object failed, closing it",
                                self._id, exc_info=True)
                    ok = False
            with self._lock:
                self._nchecking -= 1
                entry.holder = None
                entry.last_ret = self._clock.now()
                if ok and not self._shutdown:
                    self._put_back(entry)
                else:
                    self._todel.append(entry)
                if not self._using:
                    self._drained.notify_all()
        if entries:
            self._offload("flush", self._flush)
        return len(entries)

    def drop_waiters(self, pred: Callable[[Any], bool]) -> int:
        """Forget queued waiters matching ``pred`` (their client went away)."""
        with self._lock:
            dropped = [w for w in self._waiters if pred(w) and w.cancel()]
            for w in dropped:
                self._waiters.remove(w)
            if dropped:
                self._grant_slots()  # a dropped waiter may have been first in line
        return len(dropped)

    def housekeep(self) -> None:
        """One housekeeping round: long use, idle and lifetime recycling, health, refill.

        Everything is decided at once, under the lock: which leases to kill (they leave the
        pool's books now, and their holders are terminated now), which objects to recycle,
        which to health-check, whether to refill ``min_size``. The user's code that follows
        (closers, health checks, ``fun``, the tracer) runs in this thread without a runner,
        or as jobs on the runner with one: then a round never waits on a hook, so a hook
        that hangs cannot hold the scheduler's threads, which other pools share.
        """
        start = self._clock.now()
        try:
            with self._lock:
                if self._shutdown:
                    return
                self._counts["hk_rounds"] += 1
                self._hk_last = start
                kills, long_uses = self._check_long_use(start)
                self._recycle_idle(start)
                health = (self._health is not None
                          and self._counts["hk_rounds"] % self._health_freq == 0)
                to_check = list(self._avail) if health else []
                flush = bool(self._todel)  # the health job closes what it finds bad itself
                fill = self._fill_wanted()
            # From the decision, not after the closer: a closer that hangs must not spare
            # a holder that overstayed.
            if self._kill_holder:
                for holder, age in kills:
                    try:
                        self._terminate(holder, age)
                    except Exception:
                        log.exception("mppool: pool %d: could not terminate pid %s", self._id,
                                      holder.pid)
            if long_uses and not self._offload("trace", lambda: self._warn_long_use(long_uses)):
                self._warn_long_use(long_uses, trace=False)  # the tracer hangs: say it without
            if health:
                self._offload("health", lambda: self._health_round(to_check))
            if flush:
                self._offload("flush", self._flush)
            # Inline, the health check above may just have closed objects: _fill() finds
            # out itself. With a runner, the next round sees what that job closed.
            if fill or self._runner is None:
                self._offload("fill", self._fill)
        except Exception:
            with self._lock:
                self._counts["hk_errors"] += 1
            log.exception("mppool: pool %d: housekeeping round failed", self._id)
        finally:
            with self._lock:
                self._hk_time += self._clock.now() - start

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
                log.exception("mppool: pool %d: housekeeping job %r failed", self._id, kind)
            finally:
                with self._lock:
                    self._inflight.discard(kind)

        try:
            self._runner(run)
        except Exception as exc:  # e.g. RuntimeError: can't start new thread
            with self._lock:
                self._inflight.discard(kind)
            self._runner_errors.error("runner", "mppool: pool %d: could not start housekeeping "
                                      "job %r, will retry: %s", self._id, kind, exc)
            return False
        return True

    # ------------------------------------------------------------------ internals

    def _total(self) -> int:
        return len(self._avail) + len(self._using) + self._ncreating + self._nchecking

    def _room(self) -> bool:
        return not self._max_size or self._total() < self._max_size

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
        self._counts["nuses"] += 1
        self._counts["nborrows"] += 1

    def _put_back(self, entry: Entry) -> None:
        """Under the lock: hand an idle entry to the oldest live waiter, or keep it."""
        now = self._clock.now()
        while self._waiters:
            w = self._waiters.popleft()
            if w.done:
                continue
            self._lease(entry, w.holder, now)
            if w.set(entry):
                return
            del self._using[entry.lease]
            entry.holder = None
        self._avail.append(entry)

    def _grant_slots(self) -> None:
        """Under the lock: turn free room into creation rights for the oldest waiters."""
        while self._waiters and self._room() and not self._shutdown:
            w = self._waiters.popleft()
            if w.done:
                continue
            self._ncreating += 1
            if not w.set(CREATE):
                self._ncreating -= 1

    def _create(self, fill: bool = False, timeout: float | None = None) -> Entry:
        """Create an object in a slot already counted in ``_ncreating``.

        ``fill``: for min_size, never wait for a budget token (a constructor or a
        housekeeping round must not block on other processes); try again later.
        """
        token = None
        try:
            if self._budget is not None:
                # Drawn before fun runs, so the cross-process total never exceeds the budget.
                token = self._budget.get(0 if fill else timeout)
            with self._lock:
                num = self._nextnum
                self._nextnum += 1
            obj = self._fun(num)
        except BaseException:
            if token is not None:
                self._budget.put(token)  # type: ignore[union-attr]
            with self._lock:
                self._ncreating -= 1
                self._grant_slots()
            self._flush()
            raise
        self._hook("opener", self._opener, obj)
        with self._lock:
            self._counts["ncreated"] += 1
            return Entry(obj, num, self._clock.now(), self._max_lifetime, token)

    def _fill_wanted(self) -> bool:
        """Under the lock: is there an object to create to reach min_size?"""
        return not self._shutdown and self._total() < self._min_size and self._room()

    def _fill(self) -> None:
        """Create objects up to min_size; errors are logged, not raised."""
        while True:
            with self._lock:
                if not self._fill_wanted():
                    return
                self._ncreating += 1
            try:
                entry = self._create(fill=True)
            except TimeOut:
                log.info("mppool: pool %d: no budget token free to reach min_size=%d yet",
                         self._id, self._min_size)
                return
            except Exception:
                log.warning("mppool: pool %d: could not create an object to reach min_size=%d",
                            self._id, self._min_size, exc_info=True)
                return
            with self._lock:
                self._ncreating -= 1
                if self._shutdown:
                    self._todel.append(entry)
                else:
                    self._put_back(entry)
            self._flush()

    def _flush(self) -> None:
        """Close the entries taken out of the pool, outside the lock; free their slots."""
        while True:
            with self._lock:
                if not self._todel:
                    return
                entry = self._todel.popleft()
            self._hook("closer", self._closer, entry.obj)
            if entry.token is not None:
                try:
                    self._budget.put(entry.token)  # type: ignore[union-attr]
                except ServerUnavailable as exc:
                    # The supervisor is gone: so is the budget, nothing to give back.
                    log.info("mppool: pool %d: budget token not returned: %s", self._id, exc)
                except Exception:
                    log.warning("mppool: pool %d: could not return a budget token", self._id,
                                exc_info=True)
            with self._lock:
                self._counts["ndestroys"] += 1
                self._grant_slots()

    def _check_long_use(self, now: float) -> tuple[list[tuple[Holder, float]],
                                                   list[tuple[float, Holder | None, Any]]]:
        """Under the lock: find long leases to warn about, and kill those held too long.

        A killed lease leaves the pool's books at once (its late return is ignored); its
        object is closed by the next flush. Returns the holders to terminate and the
        warnings to log: logging one runs the tracer, user code that has no place under
        the lock nor on the scheduler's threads.
        """
        kills: list[tuple[Holder, float]] = []
        long_uses: list[tuple[float, Holder | None, Any]] = []
        if not self._max_using_delay_warn:
            return kills, long_uses
        for lease, entry in list(self._using.items()):
            age = now - entry.last_get
            holder = entry.holder
            if age >= self._max_using_delay_warn and not entry.warned:
                entry.warned = True
                long_uses.append((age, holder, entry.obj))
            if self._max_using_delay_kill and age >= self._max_using_delay_kill:
                del self._using[lease]
                self._counts["nkilled"] += 1
                self._todel.append(entry)
                log.warning("mppool: pool %d: killing lease %d held for %.1f s by pid %s",
                            self._id, lease, age, holder.pid if holder else "?")
                if holder is not None:
                    kills.append((holder, age))
        if not self._using:
            self._drained.notify_all()
        return kills, long_uses

    def _warn_long_use(self, long_uses: list[tuple[float, Holder | None, Any]],
                       trace: bool = True) -> None:
        for age, holder, obj in long_uses:
            log.warning("mppool: pool %d: object held for %.1f s by pid %s: %.80s", self._id,
                        age, holder.pid if holder else "?",
                        self._trace(obj) if trace else f"<{type(obj).__name__}>")

    def _recycle_idle(self, now: float) -> None:
        """Under the lock: close idle objects past max_avail_delay or max_lifetime."""
        keep: deque[Entry] = deque()
        count = len(self._avail) + len(self._using)
        while self._avail:
            entry = self._avail.popleft()
            if entry.expires and now >= entry.expires:
                self._counts["nexpired"] += 1
                self._todel.append(entry)
                count -= 1
            elif (self._max_avail_delay and now - entry.last_ret >= self._max_avail_delay
                  and count > self._min_size):
                self._counts["nrecycled"] += 1
                self._todel.append(entry)
                count -= 1
            else:
                keep.append(entry)
        self._avail = keep

    def _health_round(self, entries: list[Entry] | None = None) -> None:
        """Check ``entries`` (default: every idle one), one at a time: each is out of the
        pool only while it is checked. Unhealthy ones are closed."""
        with self._lock:
            self._counts["hc_rounds"] += 1
            if entries is None:
                entries = list(self._avail)
        for entry in entries:
            with self._lock:
                try:
                    self._avail.remove(entry)  # borrowed: nobody gets it while checked
                except ValueError:
                    continue  # taken meanwhile
                self._counts["nhealth"] += 1
                self._nchecking += 1
            healthy = True
            try:
                healthy = bool(self._health(entry.obj))  # type: ignore[misc]
            except Exception:
                healthy = False
                with self._lock:
                    self._counts["hc_errors"] += 1
                log.warning("mppool: pool %d: health check raised", self._id, exc_info=True)
            with self._lock:
                self._nchecking -= 1
                if healthy and not self._shutdown:
                    self._put_back(entry)
                else:
                    if not healthy:
                        self._counts["bad_health"] += 1
                        log.warning("mppool: pool %d: unhealthy object closed: %.80s",
                                    self._id, self._trace(entry.obj))
                    self._todel.append(entry)
        self._flush()

    def _terminate(self, holder: Holder, age: float) -> None:
        if self.on_kill_holder is not None:
            self.on_kill_holder(holder, age)

    def _recall_tick(self) -> None:
        def job() -> None:
            try:
                self.recall()  # asks the budget (a round trip), then runs closers
            except Exception:
                log.exception("mppool: pool %d: budget recall failed", self._id)

        try:
            self._offload("recall", job)
        except Exception:  # only a broken runner gets here: keep ticking
            log.exception("mppool: pool %d: budget recall failed", self._id)
        with self._lock:
            if self._shutdown or self._sched is None:
                return
        self._recall_task = self._sched.enter(RECALL_PERIOD, self._weak_recall)

    def recall(self) -> int:
        """Give idle objects above min_size back to a budget that others wait for.

        Only asks the budget (a round trip) when there is something to give; objects in
        use are given back at their next ret instead. Returns how many were closed now.
        """
        with self._lock:
            spare = min(len(self._avail), len(self._avail) + len(self._using) - self._min_size)
            if self._shutdown or (spare <= 0 and not self._using):
                self._recall_n = 0
                return 0
        try:
            wanted = int(self._budget.waiting())  # type: ignore[union-attr]
        except Exception:
            log.debug("mppool: pool %d: budget.waiting() failed", self._id, exc_info=True)
            return 0
        with self._lock:
            spare = min(len(self._avail), len(self._avail) + len(self._using) - self._min_size)
            n = max(0, min(wanted, spare))
            for _ in range(n):
                self._todel.append(self._avail.popleft())  # the longest idle first
            self._counts["nrecalled"] += n
            self._recall_n = max(0, wanted - n)
        if n:
            log.info("mppool: pool %d: gave %d idle object(s) back to the budget", self._id, n)
            self._flush()
        return n

    def _hk_tick(self) -> None:
        self.housekeep()
        with self._lock:
            if self._shutdown or self._sched is None:
                return
        self._hk_task = self._sched.enter(self._delay, self._weak_hk)

    def _after_fork_in_child(self) -> None:
        """A pool inherited through fork starts empty in the child: its objects (and their
        budget tokens) are the parent's, and closing one here could, say, end a database
        session the parent still uses. Housekeeping moves to threads that exist here."""
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        for container in (self._avail, self._using, self._by_obj, self._waiters, self._todel):
            container.clear()
        self._ncreating = self._nchecking = self._recall_n = 0
        self._inflight.clear()  # jobs running in the parent are no concern of the child's
        if self._sched is None or self._shutdown:
            return
        self._sched = Scheduler(self._clock, workers=1) if self._own_sched else default_scheduler()
        if self._hk_task is not None:
            self._hk_task = self._sched.enter(self._delay, self._weak_hk)
        if self._recall_task is not None:
            self._recall_task = self._sched.enter(RECALL_PERIOD, self._weak_recall)

    def _hook(self, name: str, hook: PoolHook | None, obj: Any) -> None:
        if hook is None:
            return
        try:
            hook(obj)
        except Exception:
            log.warning("mppool: pool %d: %s hook raised, ignored", self._id, name, exc_info=True)

    def _trace(self, obj: Any) -> str:
        try:
            return str(self._tracer(obj))
        except Exception:
            return f"<{type(obj).__name__}>"

    def _describe(self, entry: Entry, now: float) -> dict[str, Any]:
        data: dict[str, Any] = {}
        try:
            if self._stats_hook is not None:
                data["stats"] = self._stats_hook(entry.obj)
            else:
                data["trace"] = str(self._tracer(entry.obj))
        except Exception:
            data["trace"] = f"<{type(entry.obj).__name__}>"
        data.update(uses=entry.uses, last_get=entry.last_get - now, last_ret=entry.last_ret - now)
        if entry.holder is not None:
            data.update(lease=entry.lease, pid=entry.holder.pid, holder=entry.holder.as_dict())
        return data
