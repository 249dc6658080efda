"""Housekeeping: the core pool's periodic round, and refilling ``min_size``.

    scheduler thread, every ``delay`` s          the pool's runner (or the same thread
    (shared by pools: it must never block)       without a runner: see Pool's ``runner=``)
    ─────────────────────────────────────        ───────────────────────────────────────
    _hk_tick → housekeep(), under the lock:
      leases held past max_using_delay_kill ──▶  on_kill_holder(holder) at once (the
        leave the books, to _to_close            supervisor terminates that process)
      leases past max_using_delay_warn ───────▶  "trace" job: warnings, with the tracer
      idle past max_avail_delay/max_lifetime ─▶  "flush" job: _settle() closes them
        to _to_close
      every health_freq rounds: idle entries ─▶  "health" job: _health_round(), one entry
                                                 out of the pool at a time while checked
      fewer than min_size objects ────────────▶  "fill" job: _fill() creates them
    then schedules the next round

The round decides everything at once and hands each kind of user code (closer, health,
tracer, fun) to a job of its own: with a runner, a hook that hangs holds only that job, never
the scheduler's threads, and the next round does not start a second job of the same kind.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from .errors import TimeOut
from .holder import REGION_CONN, Holder
from .sched import Scheduler, default_scheduler
from .state import Entry, PoolState

log = logging.getLogger("mppool")

LongUse = tuple[float, Holder | None, Any]  # (age, holder, obj) of a lease held long


class Housekeeping(PoolState):
    """The housekeeping side of the core `mppool.Pool` (see the module docstring)."""

    def _start_housekeeping(self, delay: float | None, scheduler: Scheduler | None,
                            own_clock: bool) -> None:
        """Schedule the first round. ``delay=None``: never; 0: derived from the limits."""
        smallest = min((d for d in (self._max_avail_delay, self._max_using_delay_warn,
                                    self._max_lifetime) if d), default=0.0)
        if delay is None:
            self._delay = 0.0
        else:
            self._delay = delay or (smallest / 2 if smallest else
                                    (60.0 if self._health else 0.0))
        self._hk_time = 0.0
        self._hk_last = self._started_mono
        self._sched = None
        self._own_sched = False
        self._weak_hk = self._weak_task("_hk_tick")
        self._hk_task = None
        if self._delay:
            if scheduler is not None:
                self._sched = scheduler
            elif own_clock:
                self._sched, self._own_sched = Scheduler(self._clock, workers=1), True
            else:
                self._sched = default_scheduler()
            self._hk_task = self._sched.enter(self._delay, self._weak_hk)

    def _hk_tick(self) -> None:
        self.housekeep()
        with self._lock:
            if self._shutdown or self._sched is None:
                return
        self._hk_task = self._sched.enter(self._delay, self._weak_hk)

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
                flush = bool(self._to_close)  # the health job closes what it finds bad itself
                fill = self._fill_wanted()
            # From the decision, not after the closer: a closer that hangs must not spare
            # a holder that overstayed.
            if self._kill_holder and self.on_kill_holder is not None:
                for holder, age in kills:
                    try:
                        self.on_kill_holder(holder, age)
                    except Exception:
                        log.exception("mppool: pool %r: could not terminate pid %s", self._name,
                                      holder.pid)
            if long_uses and not self._offload("trace", lambda: self._warn_long_use(long_uses)):
                self._warn_long_use(long_uses, trace=False)  # the tracer hangs: say it without
            if health:
                self._offload("health", lambda: self._health_round(to_check))
            if flush:
                self._settle(offload=True)
            # Inline, the health check above may just have closed objects: _fill() finds
            # out itself. With a runner, the next round sees what that job closed.
            if fill or self._runner is None:
                self._offload("fill", self._fill)
        except Exception:
            with self._lock:
                self._counts["hk_errors"] += 1
            log.exception("mppool: pool %r: housekeeping round failed", self._name)
        finally:
            with self._lock:
                self._hk_time += self._clock.now() - start

    def _check_long_use(self, now: float) -> tuple[list[tuple[Holder, float]], list[LongUse]]:
        """Under the lock: find long leases to warn about, and kill those held too long.

        A killed lease leaves the pool's books at once (its late return is ignored); its
        object is closed by the next settle. Returns the holders to terminate and the
        warnings to log: logging one runs the tracer, user code that has no place under
        the lock nor on the scheduler's threads.
        """
        kills: list[tuple[Holder, float]] = []
        long_uses: list[LongUse] = []
        if not self._max_using_delay_warn:
            return kills, long_uses
        for lease, entry in list(self._using.items()):
            age = now - entry.last_get
            holder = entry.holder
            if holder is not None and holder.conn == REGION_CONN:
                continue  # parked in the fast path's region, which ages its own leases
            if age >= self._max_using_delay_warn and not entry.warned:
                entry.warned = True
                long_uses.append((age, holder, entry.obj))
            if self._max_using_delay_kill and age >= self._max_using_delay_kill:
                del self._using[lease]
                self._counts["nkilled"] += 1
                self._to_close.append(entry)
                log.warning("mppool: pool %r: killing lease %d held for %.1f s by pid %s",
                            self._name, lease, age, holder.pid if holder else "?")
                if holder is not None:
                    kills.append((holder, age))
        if not self._using:
            self._drained.notify_all()
        return kills, long_uses

    def _warn_long_use(self, long_uses: list[LongUse], trace: bool = True) -> None:
        for age, holder, obj in long_uses:
            log.warning("mppool: pool %r: object held for %.1f s by pid %s: %.80s", self._name,
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
                self._to_close.append(entry)
                count -= 1
            elif (self._max_avail_delay and now - entry.last_ret >= self._max_avail_delay
                  and count > self._min_size):
                self._counts["nrecycled"] += 1
                self._to_close.append(entry)
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
                log.warning("mppool: pool %r: health check raised", self._name, exc_info=True)
            with self._lock:
                self._nchecking -= 1
                if healthy and not self._shutdown:
                    self._put_back(entry)
                else:
                    if not healthy:
                        self._counts["bad_health"] += 1
                        self._counts["connections_lost"] += 1
                        log.warning("mppool: pool %r: unhealthy object closed: %.80s",
                                    self._name, self._trace(entry.obj))
                    self._to_close.append(entry)
        self._settle()

    def _fill_wanted(self) -> bool:
        """Under the lock: is there an object to create to reach min_size?"""
        return not self._shutdown and self._total() < self._min_size and self._room()

    def _fill(self) -> None:
        """Create objects up to min_size; errors are logged, not raised. After a failure the
        next attempt waits for the backoff (reconnect.py): a task is scheduled for it."""
        while True:
            with self._lock:
                if not self._fill_wanted():
                    return
                if self._outage.active and self._clock.now() < self._outage.next_at:
                    backing_off = True  # not due yet: the refill task comes back for it
                else:
                    backing_off = False
                    self._ncreating += 1
            if backing_off:
                self._schedule_refill()
                return
            try:
                entry = self._create(fill=True)
            except TimeOut:
                log.info("mppool: pool %r: no budget token free to reach min_size=%d yet",
                         self._name, self._min_size)
                return
            except Exception as exc:
                # The first failure of an outage was logged with its traceback (reconnect.py);
                # later ones come at the backoff's pace, once a minute at most.
                log.warning("mppool: pool %r: could not create an object to reach min_size=%d: "
                         "%s: %s", self._name, self._min_size, type(exc).__name__, exc)
                return
            with self._lock:
                self._ncreating -= 1
                if self._shutdown:
                    self._to_close.append(entry)
                else:
                    self._put_back(entry)
                    self._filled.notify_all()
            self._settle()
