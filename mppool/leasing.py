"""The lease-level API of the core pool: every get and every return, in-process or remote.

`Pool.get`/`Pool.ret` and the supervisor's lease loop take the same decisions here, so there
is one checkout and one checkin (pool.py draws the flow). ``_acquire`` decides under the lock
and returns the work to do outside it: an idle entry (then ``_hand_out``: the getter hook),
``CREATE`` (then ``_create_for``), or a queued waiter. ``_checkin`` returns a lease, in place
when nothing needs doing (``_fast_return``), else through the retter hook to the oldest
waiter, the idle entries, or a close. ``_reclaim`` and ``_drop_waiters`` take back what a
client that died held or waited for.

These methods are underscored because they are the supervisor's and the thin pools' way in
(``pools.Pool``, ``db_pool``), not the API applications use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from typing import Any

from .errors import PoolClosed, TimeOut, TooManyRequests
from .holder import Holder
from .state import Entry, PoolHook, PoolState
from .validate import check_timeout
from .waiters import CREATE, Waiter, _Create, withdraw

log = logging.getLogger("mppool")


class Leasing(PoolState):
    """Gets and returns at the lease level (see the module docstring)."""

    def _fast_return(self, entry: Entry | None) -> bool:
        """Under the lock: return a lent entry (``self._using.get(lease)``, looked up by the
        caller, which needs it too) in place if nothing needs doing (no hook to run, nothing
        to recycle or recall, no waiter to hand it to); False means the general path must
        handle it."""
        # self._total(), inline: a bounded pool's every return reads it.
        if (entry is None or self._retter is not None or self._waiters or self._shutdown
                or self._recall_n or (self._max_use and entry.uses >= self._max_use)
                or (self._max_size and len(self._avail) + len(self._using) + self._ncreating
                    + self._nchecking > self._max_size)):
            return False
        now = self._now()
        if entry.expires and now >= entry.expires:
            return False
        del self._using[entry.lease]
        self._counts["nreturns"] += 1
        self._counts["usage_s"] += now - entry.last_get
        entry.holder = None
        entry.last_ret = now
        self._avail.append(entry)
        if self._draining and not self._using:
            self._drained.notify_all()
        return True

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
                 args: tuple[Any, ...] = ()) -> Entry | _Create | Any | None:
        """The one decision of every get, for in-process and remote callers alike.

        Returns an idle entry now leased to ``holder`` (run `_hand_out` on it), ``CREATE`` (a
        slot is reserved: call `_create_for`, or `_release_slot` if it will not be used), or
        the waiter made by ``waiter(holder, *args)`` and queued (its ``set()`` is called later under
        the pool lock, with an entry, ``CREATE`` or an exception). None: nothing is
        available and no waiter was asked for. Newcomers never barge past queued waiters.
        An idle entry must pass `_verify` before it is handed out. TooManyRequests: the
        queue holds ``max_waiting`` gets already.

        ``args`` is a tuple, not ``*args``: CPython 3.11 calls a function with ``*args`` the
        slow way (a C-level frame of its own), and this runs for every get.
        """
        refused = None
        with self._lock:
            if self._shutdown or not self._opened:
                raise PoolClosed(f"pool {self._name!r} is shutting down" if self._shutdown else
                                 f"pool {self._name!r} is not open yet (open=False): call "
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
                    if not self._to_close:
                        return entry  # the common case, in as few steps as can be
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
            if not withdraw(self._waiters, waiter):
                return False
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

    def _count(self, name: str, n: int = 1) -> None:
        """Count ``n`` events decided outside the Pool's books (the fast path's lease kills,
        whose tokens the Pool sees lent to the region)."""
        with self._lock:
            self._counts[name] += n

    def _lent(self, lease: int, holder: Holder | None = None) -> Entry | None:
        """The entry of ``lease`` if it is lent (to ``holder``, when given), else None."""
        with self._lock:
            entry = self._using.get(lease)
            if entry is None or (holder is not None and entry.holder != holder):
                return None
            return entry

    def _while_lent(self, lease: int, holder: Holder, fn: Callable[[], None]) -> bool:
        """Run ``fn`` (quick, no user code) under the lock if ``lease`` is lent to ``holder``;
        False, without running it, if it is not (returned, killed, reclaimed): whatever
        ``fn`` records then cannot outlive the lease unseen by whoever ends it next."""
        with self._lock:
            entry = self._using.get(lease)
            if entry is None or entry.holder != holder:
                return False
            fn()
            return True

    def _checkin(self, lease: int, discard: bool = False, holder: Holder | None = None) -> bool:
        """Return a leased entry; False (and a warning) if the lease is unknown, killed, or
        (``holder`` given) lent to somebody else: a lease is returned only by its holder."""
        with self._lock:
            entry = self._using.get(lease)
            if entry is not None and holder is not None and entry.holder is not holder \
                    and entry.holder != holder:
                return False  # somebody else's lease: the remote caller logs the refusal
            if not discard and self._fast_return(entry):
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

    def _reclaim(self, pred: Callable[[Holder], bool], reset: PoolHook | None = None,
                 spare: Container[int] = ()) -> int:
        """Take back every lease whose holder matches ``pred`` (a holder that died), but
        those in ``spare`` (a call of the dead holder still runs on their object).

        With ``reset``, each object is reset (e.g. rolled back) and reused; if the reset
        fails it is closed. Without it, objects go straight back to the pool.
        """
        with self._lock:
            leases = [k for k, e in self._using.items()
                      if e.holder is not None and pred(e.holder) and k not in spare]
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
