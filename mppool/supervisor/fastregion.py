"""The supervisor's side of a token pool's fast path: its region in shared memory.

    client (mppool.fastpath)              shared memory (mppool.shm)       supervisor (here)
    get(): take a FREE slot ──────────▶  slots: ABSENT FREE HELD RETURNED  park idle tokens of
    put(): HELD → FREE                    flags: WAITERS CLOSED DIRTY        the core Pool as FREE
      nothing FREE: WAITERS, pending+1,   pending (clients only)             (leased to the region)
      then a normal get to the supervisor ─────────────────────────────────▶ on_get(): a FREE one
    put() in slow mode: HELD → RETURNED,                                     back for it, or slow
      then a poke (FastPoke) ──────────────────────────────────────────────▶ mode and a queue;
                                                                             settle(): RETURNED
                                                                             → the core Pool

The core Pool stays the one source of truth for the units: every token the region holds
(FREE or HELD) is, for the Pool, lent to one pseudo-holder, the region (`REGION_CONN`). The
region only decides *which client* has a parked token, so every rule of the core Pool (the
bound, FIFO waiters, shutdown waking waiters, stats counters) holds unchanged, and a token
enters or leaves the region only through the Pool's ``_acquire``/``_checkin``.

- **Fast mode** (flags 0): clients take and give back FREE slots under the region's lock
  (a word only atomics touch: `mppool._fastslot`), with no message at all.
- **A get at the supervisor** (`on_get`): served by the Pool if it has a token; else one
  FREE token comes back to the Pool for it; else it must queue: slow mode.
- **Slow mode** (WAITERS): set by a client that found nothing FREE (it also counted itself in
  ``pending`` before sending its get) or by the supervisor for a get that queues. Every get
  and put then goes through the supervisor, and the oldest waiter is served first: FREE
  slots are pulled back, a put turns its slot RETURNED and pokes, and `settle` moves RETURNED
  slots into the Pool, which hands them to the oldest waiter. Once nobody waits, `settle`
  parks the idle tokens again and clears WAITERS, keeping one in the Pool for each get still
  on its way (``pending`` minus the arrivals the supervisor counted): no fast get can take
  those, so nobody overtakes a get that was sent first.
- **Death of a holder**: its lease connection closes (the kernel does that on SIGKILL) and
  `release` frees every slot it held, generation bumped, so a late put of such a token is a
  no-op. A death *inside* the lock leaves its thread id in the lock word: the next
  `shm.Region.try_lock` finds that thread gone, takes the lock over and marks the region
  DIRTY, which sends everyone to the supervisor until it is repaired (`fastrepair`, also at
  every watchdog scan). A lock word a client wrote naming a live thread that is not
  stopped is freed after three watchdog scans (`fastrepair.stuck_owner`).
- **Shutdown, resize, pause** switch the region to CLOSED while they apply (every get and
  put through the supervisor, FREE slots pulled back), so the core Pool's own behaviour
  applies unchanged. The console's ``kill_holder`` frees the fast slots of the pid it names.
- **Parking** (`fastpark`): the Pool's idle tokens leased to the region as FREE slots when
  nobody waits, and taken back (`fastpark.unpark_locked`) for a get, a slow mode, a close.
- **Lease ages** (`fastages`): ``max_using_delay`` and ``max_using_delay_kill`` apply to fast
  leases, read from the slots; the core Pool does not age the region's own leases.
- **Not here**: pools with ``max_use``, ``max_lifetime`` or ``burst_limit`` keep the normal
  path (`refusal`). The region has as many slots as the pool had tokens when its first fast
  client came; tokens added later by a resize are served through the supervisor. `stats()`
  and the metrics (`fastviews`) count fast leases in the gauges, the lease counters and the
  histograms.

**The supervisor never waits on a client** (a client can stop inside the mutex): every
change it wants in the region is an intent (a get arrived, a connection closed, a FastGive,
a lease to kill, close or pause, a check), and `sync` applies them all in one pass under the
mutex taken with a bounded wait (200 µs on the lease loop); when it cannot be had, they stay
owed and a loop timer retries (1 ms doubling to 20 ms) while the Pool and every other pool
go on. Clients wait at most 2 ms too, then go through the supervisor (a normal get, a
FastGive). Lock order: ``self.lock`` (never held while waiting), the region's mutex, the
core Pool's lock. Gets, puts, pokes and closes run on the lease loop's thread; stats,
resize, pause and shutdown on the control plane's.

Known limits (docs/performance.md says more): a client that writes over the region can make
the pool's own lock and slots wrong (two holders of one of its units, until the repair), not
other pools nor any process; a lock word forged to name a stopped thread is waited for as
long as that thread is stopped. A get counted on its way
whose process stops for two watchdog scans before sending is written off, and may be
overtaken.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import shm
from ..holder import HOSTNAME, REGION_CONN, Holder, process_start
from . import fastages, fastpark, fastviews
from .fastrepair import repair, stuck_owner

if TYPE_CHECKING:
    from .leases import LeaseLoop
    from .registry import Record

log = logging.getLogger("mppool")

# Options under which the fast path is refused (they count or age the tokens themselves,
# which the region does not track), so such pools keep the normal path.
UNSUPPORTED = ("max_use", "max_lifetime", "burst_limit")
# How long the lease loop waits for the region's lock before leaving the work owed, the
# retry timer's first and longest period, and how long a control-plane call (its own thread)
# keeps trying before it leaves the work to the loop.
LOOP_WAIT = 0.0002
RETRY_FIRST, RETRY_MAX = 0.001, 0.02
CONTROL_WAIT = 0.05


def refusal(rec: Record) -> str | None:
    """Why ``rec`` cannot have a fast path (None: it can)."""
    if rec.kind != "token":
        return f"pool {rec.name!r} is not a token pool"
    for opt in UNSUPPORTED:
        if rec.plain_options.get(opt):
            return f"pool {rec.name!r} has {opt} set (the fast path does not support it yet)"
    return None


class FastRegion:
    def __init__(self, rec: Record, loop: LeaseLoop, nslots: int) -> None:
        self.rec = rec
        self.loop = loop
        self.region, self.fd = shm.Region.create(nslots, f"mppool-{rec.name}")
        self.parked = [0] * nslots  # slot -> the core Pool's lease of the token parked there
        self.nparked = 0  # how many of them are nonzero
        pid = os.getpid()
        self.holder = Holder(pid, process_start(pid), HOSTNAME, REGION_CONN, verified=True)
        self.clients: set[int] = set()  # lease connections that mapped the region
        self.lock = threading.Lock()
        self.stale: tuple[int, int, int] | None = None  # see fastrepair: (pending, arrived, n)
        self.nrepairs = 0
        self.stuck: tuple[int, int] | None = None  # (owner tid, scans): see _stuck_owner
        self.closed = False  # for good: the pool is shutting down
        self.off: set[str] = set()  # for a while: "pause", "resize"
        # Intents, applied by sync() under the region's mutex (see the module docstring).
        self.arrived = 0  # gets of mapped clients that reached us, modulo 2**32 (`outstanding`)
        self.need = 0  # gets that reached us and want a FREE token back in the Pool
        self.slow = False  # slow mode wanted: WAITERS, and the FREE tokens back to the Pool
        self.gone: dict[int, bool] = {}  # closed connection -> it said Bye (clean)
        self.gone_pid: dict[int, int | None] = {}  # closed connection -> its pid (logs)
        self.gone_pids: set[int] = set()  # kill_holder
        self.gives: dict[tuple[int, int], int] = {}  # (slot, conn) -> generation (FastGive)
        self.check_due: str | None = None  # a repair is due ("" when nothing went wrong)
        self.owed = False  # the intents above wait for the mutex; a retry is scheduled
        self.retry = RETRY_FIRST
        self.retry_timer = False
        # For stats: tokens the supervisor parked and took back (the Pool counts them as
        # leases); for metrics, the region's counts at the last scrape (fastviews).
        self.nparks = self.nunparks = 0
        self.folded: tuple[list[int], float, int] | None = None
        # Lease ages (max_using_delay, max_using_delay_kill): read from the slots' ``since``
        # (the holder's CLOCK_MONOTONIC, the same clock system-wide) every `age_period`.
        pool = rec.pool
        self.warn_after = pool._max_using_delay_warn
        self.kill_after = pool._max_using_delay_kill
        self.warned: set[tuple[int, int]] = set()  # (slot, generation) already warned about
        self.kills: dict[int, int] = {}  # intent: slot -> the generation to kill
        if self.warn_after:
            smallest = min(d for d in (self.warn_after, self.kill_after) if d)
            self.age_period = min(1.0, max(0.02, smallest / 4))
            loop.call_soon(lambda: fastages.age_timer(self))

    # ------------------------------------------------------------------ intents

    def on_get(self, conn_id: int) -> None:
        """A get reached the supervisor: the Pool serves it if it has a token; else a token
        parked FREE comes back to the Pool for it; else the region goes slow (WAITERS, every
        FREE token back) and the get queues, first in line."""
        r = self.region
        with self.lock:
            if conn_id in self.clients:
                self.arrived = (self.arrived + 1) & 0xFFFFFFFF
            if self._quiet():
                # Already slow with nothing parked to pull back: no mutex needed. (With
                # WAITERS set, only the supervisor makes slots FREE, under self.lock.)
                if r.flags & shm.WAITERS and r.find(shm.FREE) < 0:
                    return
                # The Pool has a token for it (kept there for gets on their way): no mutex.
                if not r.flags & shm.WAITERS and self.rec.pool.free() > 0:
                    return
            self.need += 1
        # No parking here: the get is about to queue in the Pool, which cannot see it yet.
        self.sync(park=False)

    def queued(self) -> None:
        """A get queued in the Pool: the region must be slow (it is, unless a control-plane
        call parked tokens between this get's `on_get` and its queueing)."""
        with self.lock:
            if self.region.flags & shm.WAITERS:
                return
            self.slow = True
        self.sync(park=False)

    def settle(self) -> None:
        """After a get, a put or a poke: RETURNED slots to the Pool; back to fast mode when
        nobody waits and nothing is on its way."""
        with self.lock:
            if self._quiet() and not fastpark.may_park(self):
                return  # nothing given back, nothing to park: no mutex needed
        self.sync()

    def _quiet(self) -> bool:
        """Under self.lock: nothing owed, no intent, no RETURNED slot to hand on."""
        return not (self.owed or self.slow or self.need or self.gone or self.gone_pids or self.gives
                    or self.kills or self.check_due is not None) \
            and self.region.find(shm.RETURNED) < 0

    def outstanding(self) -> int:
        """Gets counted in the region's ``pending`` that have not reached us yet. More
        arrivals than counts (a get sent because the mutex was busy counts none; a client
        may scribble) resynchronize the two counts."""
        gap = (self.region.pending - self.arrived) & 0xFFFFFFFF
        if gap >= 1 << 31:
            self.arrived = self.region.pending
            return 0
        return gap

    def give(self, conn_id: int, slot: int, gen: int) -> None:
        """A FastGive: the client could not take the mutex in time to give (slot, gen) back.
        At most one entry per (slot, connection), so a flood of them takes no memory."""
        if not 0 <= slot < self.region.nslots or conn_id not in self.clients:
            return
        with self.lock:
            self.gives[(slot, conn_id)] = gen
        self.sync()

    def release(self, conn_id: int, clean: bool = False, pid: int | None = None) -> None:
        """A lease connection closed (its process exited or was killed): its slots come back,
        each with a new generation. ``clean``: it said Bye first (a routine exit); ``pid``:
        its kernel-verified process, for the log."""
        with self.lock:
            if conn_id not in self.clients:
                return
            self.clients.discard(conn_id)
            self.gone[conn_id] = clean
            self.gone_pid[conn_id] = pid
        self.sync()

    def release_pid(self, pid: int) -> int:
        """The operator's kill_holder: every slot held by ``pid`` comes back; how many (as
        seen now: if a stopped process holds the mutex, they come back when it lets go)."""
        r = self.region
        n = sum(1 for i in range(r.nslots) if r.state(i) == shm.HELD and r.slot(i)[2] == pid)
        with self.lock:
            self.gone_pids.add(pid)
        self._sync_control()
        return n

    def check(self) -> None:
        """Compare the region with the supervisor's records and repair it (every watchdog
        scan; also whenever a process died holding the mutex)."""
        with self.lock:
            if self.check_due is None:
                self.check_due = ""
        self.sync()

    def check_soon(self) -> None:
        """`check`, as a callback of the lease loop (every watchdog scan); a region whose
        pool shut down is let go once every token it had came back."""
        stuck_owner(self)
        self.check()
        if self.closed and not self.owed and not any(self.parked):
            self.loop.fast_regions.pop(self.rec.id, None)
            self.close()

    def pull_back(self, closed: bool, why: str = "") -> None:
        """Before a shutdown, a resize or a pause: every FREE slot back to the Pool, the fast
        path off (``closed``: for good; else until `reopen` with the same ``why``)."""
        with self.lock:
            if why:
                self.off.add(why)
            self.closed = self.closed or closed
        self._sync_control()

    def reopen(self, why: str) -> None:
        """After a resize or a pause: fast mode again (once the Pool is within its size and
        nothing else keeps the region off)."""
        with self.lock:
            self.off.discard(why)
        self._sync_control()

    # ------------------------------------------------------------------ applying them

    def sync(self, wait: float = LOOP_WAIT, park: bool = True) -> bool:
        """Apply every intent under the region's mutex, hand the tokens that came back to the
        Pool, and park the idle ones when nobody waits. False: the mutex was not had within
        ``wait`` (none if work is already owed: the retry timer waits instead); the
        intents stay owed and the lease loop retries."""
        with self.lock:
            r = self.region
            got = self._try_lock(0.0 if self.owed else wait)
            if got is None:
                self._owe()
                return False
            try:
                if not got or r.flags & shm.DIRTY:
                    self.check_due = self.check_due or "a process died holding the region's lock"
                if self.check_due is not None:
                    why, self.check_due = self.check_due, None
                    repair(self, why or None)
                back, released, killed = self._apply_locked()
            finally:
                r.unlock()
            self.owed, self.retry = False, RETRY_FIRST
            self._checkin(back)
            if park and fastpark.may_park(self):
                fastpark.park(self, LOOP_WAIT)
        for conn_id, (n, clean) in released.items():
            pid = self.gone_pid.pop(conn_id, "?")
            if clean:  # the words of the normal path's reclaim, so one grep finds both
                log.info("mppool: pool %r: took back %d lease(s) still held by pid %s "
                         "(connection %d, fast path), which closed its client",
                         self.rec.name, n, pid, conn_id)
            else:
                log.warning("mppool: pool %r: reclaimed %d lease(s) of connection %d whose "
                            "holder (pid %s) went away without closing (crash, kill, lost "
                            "connection; fast path)", self.rec.name, n, conn_id, pid)
        if killed:
            fastages.report_kills(self, killed)
        return not self.owed

    def _apply_locked(self) -> tuple[list[int], dict[int, tuple[int, bool]],
                                     list[tuple[int, int, float]]]:
        """Under both locks: the intents, applied. Returns the Pool leases to check in, per
        closed connection how many of its slots came back, and the leases killed (conn, pid,
        age)."""
        r = self.region
        back: list[int] = []
        if self.need:
            # A token per get that reached us, from the FREE slots; short of them, the gets
            # queue and the region goes slow (FIFO from here on).
            need, self.need = self.need, 0
            if not r.flags & shm.WAITERS:
                back = fastpark.unpark_locked(self, (shm.FREE,), need)
            if len(back) < need or r.flags & shm.WAITERS:
                self.slow = True
        flags = r.flags & (shm.WAITERS | shm.DIRTY)
        pull_free = self.slow or self.closed or bool(self.off)
        if self.slow:
            flags |= shm.WAITERS
            self.slow = False
        if self.closed or self.off:
            flags |= shm.CLOSED
        r.set_flags(flags & ~shm.DIRTY)
        released: dict[int, tuple[int, bool]] = {}
        if self.gone or self.gone_pids:
            for i in range(r.nslots):
                if r.state(i) != shm.HELD:
                    continue
                _, conn_id, pid, _, _, _ = r.slot(i)
                if conn_id in self.gone or pid in self.gone_pids:
                    self.region.bump(i)  # a late put of the old generation is a no-op
                    r.set_state(i, shm.RETURNED if r.flags else shm.FREE)
                    if conn_id in self.gone:
                        n, _ = released.get(conn_id, (0, False))
                        released[conn_id] = (n + 1, self.gone[conn_id])
            self.gone.clear()
            self.gone_pids.clear()
        killed: list[tuple[int, int, float]] = []
        now = time.monotonic()
        for i, gen in self.kills.items():
            # Decided from slots read without the mutex (a torn read is possible): checked
            # again here, the generation and the age.
            _, conn_id, pid, _, _, since = r.slot(i)
            if r.state(i) == shm.HELD and r.slot(i)[0] == gen and now - since >= self.kill_after:
                self.region.bump(i)  # the holder's late put is a no-op
                r.set_state(i, shm.RETURNED if r.flags else shm.FREE)
                killed.append((conn_id, pid, now - since))
        self.kills.clear()
        for (slot, conn_id), gen in self.gives.items():
            r.give_locked(slot, gen, conn_id)  # not this holder's any more: nothing changes
        self.gives.clear()
        back += fastpark.unpark_locked(self, (shm.FREE, shm.RETURNED) if pull_free
                                       else (shm.RETURNED,))
        if self._over_size():
            # Shrunk below what is out: puts must reach the Pool, which closes the extra.
            r.set_flags(r.flags | shm.WAITERS)
        return back, released, killed

    def _try_lock(self, wait: float) -> bool | None:
        """Under self.lock: the region's lock within ``wait`` (`shm.Region.try_lock`: True,
        False when taken over from a dead owner, None when busy). Never raises: only
        atomics touch the lock word, whatever a client wrote there."""
        return self.region.try_lock(wait)

    def _owe(self) -> None:
        """Under self.lock: the mutex is busy; the lease loop retries (never waiting long)."""
        self.owed = True
        if threading.get_ident() == self.loop.thread.ident:
            self._schedule()
        else:
            self.loop.call_soon(self._schedule)

    def _schedule(self) -> None:
        """On the loop's thread: one retry timer at a time, backing off to RETRY_MAX."""
        if self.retry_timer or not self.owed:
            return
        self.retry_timer = True
        self.loop.at(self.loop.sup.clock.now() + self.retry, 3, self._retry)

    def _retry(self) -> None:
        self.retry_timer = False
        self.retry = min(self.retry * 2, RETRY_MAX)
        with self.lock:
            self.owed = False  # this attempt may wait LOOP_WAIT
        self.sync()

    def _sync_control(self) -> None:
        """From the control plane (its own thread): apply the intents, trying for up to
        CONTROL_WAIT; past that they stay owed and the lease loop applies them."""
        deadline = time.monotonic() + CONTROL_WAIT
        while not self.sync(LOOP_WAIT):
            if threading.get_ident() == self.loop.thread.ident or time.monotonic() > deadline:
                return
            time.sleep(0.001)

    def _checkin(self, leases: list[int]) -> None:
        self.nunparks += len(leases)
        for lease in leases:
            self.rec.pool._checkin(lease, holder=self.holder)

    def _over_size(self) -> bool:
        pool = self.rec.pool
        return bool(pool._max_size) and len(pool) > pool._max_size

    # ------------------------------------------------------------------ control plane

    def overlay(self, s: dict[str, Any]) -> dict[str, Any]:
        return fastviews.overlay(self, s)

    def pool_call(self, method: str, *args: Any) -> Any:
        return fastviews.pool_call(self, method, *args)

    def close(self) -> None:
        """Let the region's descriptor go. The mapping stays until this object is collected:
        a call still on its way (another thread) must never touch unmapped memory."""
        self.closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass
