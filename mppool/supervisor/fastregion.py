"""The supervisor's side of a token pool's fast path: its region in shared memory.

    client (mppool.fastpath)              shared memory (mppool.shm)       supervisor (here)
    get(): take a FREE slot ──────────▶  slots: ABSENT FREE HELD RETURNED  park idle tokens of
    put(): HELD → FREE                    flags: WAITERS CLOSED DIRTY        the core Pool as FREE
      nothing FREE: WAITERS, pending+1,   pending                            (leased to the region)
      then a normal get to the supervisor ─────────────────────────────────▶ on_get(): pull FREE
    put() in slow mode: HELD → RETURNED,                                     back, the core Pool
      then a poke (FastPoke) ──────────────────────────────────────────────▶ queues the waiter;
                                                                             settle(): RETURNED
                                                                             → the core Pool

The core Pool stays the one source of truth for the units: every token the region holds
(FREE or HELD) is, for the Pool, lent to one pseudo-holder, the region (connection id -1).
The region only decides *which client* has a parked token, so every rule of the core Pool
(the bound, FIFO waiters, shutdown waking waiters, stats counters) holds unchanged, and a
token enters or leaves the region only through ``Pool.acquire``/``Pool.checkin``.

- **Fast mode** (flags 0): clients take and give back FREE slots under the region's robust
  mutex, with no message at all.
- **Slow mode** (WAITERS): a client found nothing FREE. It set WAITERS and counted itself in
  ``pending`` before sending its get, so from then on every get and put goes through the
  supervisor, and the oldest waiter is served first. A slow get pulls every FREE slot back
  into the core Pool (`on_get`); a put turns its slot RETURNED and pokes; `settle` moves
  RETURNED slots into the core Pool, which hands them to the oldest waiter. Once nobody waits
  and nothing is pending, `settle` parks the idle tokens again and clears WAITERS.
- **Death of a holder**: its lease connection closes (the kernel does that on SIGKILL) and
  `release` frees every slot it held, generation bumped, so a late put of such a token is a
  no-op. A death *inside* the mutex is reported by the kernel to the next locker as
  ``EOWNERDEAD``; that locker marks the region DIRTY, which sends everyone to the supervisor
  until `check` has repaired it.
- **Checks and repair**: `check` (after DIRTY, and every watchdog scan) compares the region
  with the supervisor's own records: the tokens it parked (``parked``), the live lease
  connections and their kernel-verified pids. A state byte that is not a state, a slot the
  supervisor never parked, a HELD slot of a connection that is gone or whose pid is not the
  connection's, a pending count with nobody on the way: each is put right, and logged.
  A client that scribbles over the region can only hurt pools it could use anyway (it holds
  the key); it can never make the core Pool exceed its bound.
- **Shutdown, resize, pause** switch the region to CLOSED while they apply (every get and
  put through the supervisor, FREE slots pulled back), so the core Pool's own behaviour
  applies unchanged: shutdown wakes waiters, a paused pool hands out nothing, a shrunk pool
  stays slow until the extra tokens came back and were closed. The console's
  ``kill_holder`` frees the fast slots of the pid it names (and never the region's own
  leases, whose holder is the supervisor itself).
- **Not here yet**: lease ages. The core Pool would see only the region's parked leases, so
  pools with ``max_using_delay(_kill)``, ``max_use``, ``max_lifetime`` or ``burst_limit``
  are refused the fast path (`refusal`) and keep the normal one. The region has as many
  slots as the pool had tokens when its first fast client came; tokens added later by a
  resize are served through the supervisor. Hold-time and wait-time
  histograms (metrics) see only the leases that went through the supervisor; the gauges
  (in use, idle) come from `overlay` and count fast leases.

Pokes, gets, puts and closes run on the lease loop's thread; stats, resize, pause and
shutdown come from the control plane: a Python lock orders them, and the region's mutex
orders the moves with the clients. Lock order: ``self.lock``, then the region's mutex,
then the core Pool's lock.

A known limit: a get that decided to queue (``pending`` counted) and whose process is then
stopped (SIGSTOP) for longer than two watchdog scans before its message leaves is counted
as lost: ``pending`` is reset (logged), and until that get arrives a fast get may take a
unit before it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from .. import shm
from ..errors import PoolClosed
from ..holder import HOSTNAME, Holder, process_start
from ..pool import CREATE, Entry

if TYPE_CHECKING:
    from .leases import LeaseLoop
    from .registry import Record

log = logging.getLogger("mppool")

REGION_CONN = -1  # the pseudo connection id the core Pool sees the region's leases under
# Options under which the fast path is refused: the supervisor would have to watch every
# fast lease's age (not done yet), so such pools keep the normal path.
UNSUPPORTED = ("max_using_delay", "max_using_delay_kill", "max_use", "max_lifetime",
               "burst_limit")


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
        pid = os.getpid()
        self.holder = Holder(pid, process_start(pid), HOSTNAME, REGION_CONN, verified=True)
        self.clients: set[int] = set()  # lease connections that mapped the region
        self.lock = threading.Lock()
        self.stale_pending = -1  # pending seen at the last check with nobody waiting
        self.nrepairs = 0
        self.closed = False  # for good: the pool is shutting down
        self.off: set[str] = set()  # for a while: "pause", "resize"

    # ------------------------------------------------------------------ the lease loop

    def on_get(self, conn_id: int) -> None:
        """A get reached the supervisor: slow mode, and the FREE tokens back to the Pool so
        that it serves the oldest waiter first."""
        with self.lock:
            r = self._locked()
            try:
                if conn_id in self.clients and r.pending:
                    r.set_pending(r.pending - 1)  # that get has arrived
                r.set_flags(r.flags | shm.WAITERS)
                back = self._unpark_locked((shm.FREE, shm.RETURNED))
            finally:
                r.unlock()
        self._checkin(back)

    def settle(self) -> None:
        """After a get, a put or a poke: RETURNED slots to the Pool; back to fast mode when
        nobody waits and nothing is on its way."""
        pool = self.rec.pool
        with self.lock:
            r = self._locked()
            try:
                back = self._unpark_locked((shm.RETURNED,))
            finally:
                r.unlock()
            self._checkin(back)  # shutting down: the Pool closes them
            if self.closed or r.pending or r.flags & shm.CLOSED or pool.waiting():
                return
            if self._over_size():
                # Shrunk below what is out: puts must reach the Pool, which closes the extra.
                r = self._locked()
                try:
                    r.set_flags(r.flags | shm.WAITERS)
                finally:
                    r.unlock()
                return
            self._park()

    def _park(self) -> None:
        """Under self.lock: lease the Pool's idle tokens to the region, FREE, and leave slow
        mode, all under the region's mutex (no client sees a half-done park)."""
        r, pool = self._locked(), self.rec.pool
        try:
            if r.pending or r.flags & shm.CLOSED:
                return
            while True:
                i = r.find(shm.ABSENT)
                if i < 0:
                    break
                try:
                    got = pool._acquire(self.holder)
                    if got is CREATE:  # a token pool's fun is a plain constructor, no hook
                        got = pool._create_for(self.holder)
                except PoolClosed:
                    r.set_flags(r.flags | shm.CLOSED)
                    return
                if type(got) is not Entry:
                    break
                self.parked[i] = got.lease
                r.bump(i)
                r.set_state(i, shm.FREE)
            r.set_flags(r.flags & ~shm.WAITERS)
        finally:
            r.unlock()

    def release(self, conn_id: int, clean: bool = False) -> None:
        """A lease connection closed (its process exited or was killed): its slots come back,
        each with a new generation. ``clean``: it said Bye first (a routine exit)."""
        self.clients.discard(conn_id)
        n = self._release(1, conn_id)
        if n:
            log.log(logging.INFO if clean else logging.WARNING,
                    "mppool: pool %r: took back %d fast lease(s) of connection %d, which %s",
                    self.rec.name, n, conn_id,
                    "closed its client" if clean else "went away without closing")

    def release_pid(self, pid: int) -> int:
        """The operator's kill_holder: every slot held by ``pid`` comes back; how many."""
        return self._release(2, pid)

    def _release(self, field: int, value: int) -> int:
        """Free every HELD slot whose field ``field`` (1: conn, 2: pid) is ``value``."""
        back: list[int] = []
        n = 0
        with self.lock:
            r = self._locked()
            try:
                slow = r.flags
                for i in range(r.nslots):
                    if r.state(i) == shm.HELD and r.slot(i)[field] == value:
                        n += 1
                        r.bump(i)
                        if slow:
                            r.set_state(i, shm.ABSENT)
                            back.append(self.parked[i])
                            self.parked[i] = 0
                        else:
                            r.set_state(i, shm.FREE)
            finally:
                r.unlock()
        self._checkin(back)
        self.settle()
        return n

    def _locked(self) -> shm.Region:
        """Take the region's mutex (under self.lock); a region left DIRTY by a process that
        died holding it is repaired first."""
        r = self.region
        r.lock()
        if r.flags & shm.DIRTY:
            self._repair_locked("a process died holding the region's lock")
        return r

    def _unpark_locked(self, states: tuple[int, ...]) -> list[int]:
        """Under both locks: slots in ``states`` become ABSENT; their Pool leases, to check in.
        (Found with the mapping's own search, not a Python loop over every slot: this runs
        on every get and put in slow mode.)"""
        r, back = self.region, []
        for st in states:
            i = r.find(st)
            while i >= 0:
                r.bump(i)
                r.set_state(i, shm.ABSENT)
                if self.parked[i]:
                    back.append(self.parked[i])
                self.parked[i] = 0
                i = r.find(st)
        return back

    def _checkin(self, leases: list[int]) -> None:
        for lease in leases:
            self.rec.pool._checkin(lease, holder=self.holder)

    def _over_size(self) -> bool:
        pool = self.rec.pool
        return bool(pool._max_size) and len(pool) > pool._max_size

    # ------------------------------------------------------------------ checks and repair

    def check(self) -> list[str]:
        """Compare the region with the supervisor's records and repair it (every watchdog
        scan, and whenever a process died holding the mutex). Returns what was repaired."""
        with self.lock:
            r = self.region
            r.lock()  # a dead owner sets DIRTY: the repair below says so
            try:
                fixed = self._repair_locked(None)
            finally:
                r.unlock()
        if not self.closed:
            self.settle()
        return fixed

    def check_soon(self) -> None:
        """`check`, as a callback of the lease loop (every watchdog scan); a region whose
        pool shut down is let go once every token it had came back."""
        self.check()
        if self.closed and not any(self.parked):
            regions_of(self.loop).pop(self.rec.id, None)
            self.close()

    def _repair_locked(self, why: str | None) -> list[str]:
        """Under the region's mutex (and self.lock): put every slot and the header right."""
        r, fixed = self.region, []
        back: list[int] = []
        conns = self.loop.conns
        if why:
            fixed.append(why)
        magic, version, nslots, flags, pending = shm.HEADER.unpack_from(r.mm)
        if (magic, version, nslots) != (shm.MAGIC, shm.VERSION, r.nslots):
            shm.HEADER.pack_into(r.mm, 0, shm.MAGIC, shm.VERSION, r.nslots, flags, pending)
            fixed.append("header overwritten")
        for i in range(r.nslots):
            st = r.state(i)
            if not self.parked[i]:
                if st != shm.ABSENT:
                    fixed.append(f"slot {i}: state {st} for a token never parked there")
                    r.bump(i)
                    r.set_state(i, shm.ABSENT)
                continue
            if st == shm.HELD:
                _, conn_id, pid, _, _, _ = r.slot(i)
                conn = conns.get(conn_id)
                if conn is None or conn.closed or conn.holder is None or conn.holder.pid != pid \
                        or conn_id not in self.clients:
                    fixed.append(f"slot {i}: held by connection {conn_id} (pid {pid}), which "
                                 "is gone or not that process")
                    st = shm.RETURNED if r.flags else shm.FREE
                    r.bump(i)
                    r.set_state(i, st)
            elif st not in (shm.FREE, shm.RETURNED):
                fixed.append(f"slot {i}: state {st} is not a state")
                r.bump(i)
                r.set_state(i, shm.RETURNED if r.flags else shm.FREE)
        flags = r.flags
        if flags & ~(shm.WAITERS | shm.CLOSED | shm.DIRTY):
            fixed.append(f"flags {flags:#x}")
        want_closed = shm.CLOSED if self.closed or self.off else 0
        if flags & shm.CLOSED != want_closed:
            fixed.append("the CLOSED flag")
        if self.rec.pool.waiting() and not flags & shm.WAITERS:
            fixed.append("WAITERS cleared while gets wait")
        r.set_flags((flags & shm.WAITERS) | want_closed
                    | (shm.WAITERS if self.rec.pool.waiting() else 0))
        pending = r.pending
        if pending and not self.rec.pool.waiting() and pending == self.stale_pending:
            # Counted by a get that never reached us (its process died before sending).
            fixed.append(f"{pending} pending get(s) that never arrived")
            r.set_pending(0)
            pending = 0
        self.stale_pending = pending
        if why is None and flags & shm.DIRTY:
            fixed.insert(0, "a process died holding the region's lock")
        if fixed:
            self.nrepairs += 1
            log.warning("mppool: pool %r: fast-path region repaired from the supervisor's "
                        "records: %s", self.rec.name, "; ".join(fixed))
        self._checkin(back)
        return fixed

    # ------------------------------------------------------------------ control plane

    def pull_back(self, closed: bool, why: str = "") -> None:
        """Before a shutdown, a resize or a pause: every FREE slot back to the Pool, the fast
        path off (``closed``: for good; else until `reopen` with the same ``why``)."""
        with self.lock:
            if why:
                self.off.add(why)
            r = self._locked()
            try:
                r.set_flags(r.flags | shm.CLOSED)
                back = self._unpark_locked((shm.FREE, shm.RETURNED))
            finally:
                r.unlock()
            self.closed = self.closed or closed
        self._checkin(back)

    def reopen(self, why: str) -> None:
        """After a resize or a pause: fast mode again (once the Pool is within its size and
        nothing else keeps the region off)."""
        with self.lock:
            self.off.discard(why)
            r = self._locked()
            try:
                if not self.closed and not self.off:
                    r.set_flags(r.flags & ~shm.CLOSED)
            finally:
                r.unlock()
        self.settle()

    def overlay(self, s: dict[str, Any]) -> dict[str, Any]:
        """The Pool's stats with the region's tokens shown as what they are: FREE ones idle,
        HELD ones lent to their real holders (pid from the slot, checked against the
        connection at every scan)."""
        with self.lock:
            r = self.region
            states = [r.state(i) for i in range(r.nslots)]
            slots = [r.slot(i) for i in range(r.nslots)]
            parked = {lease: i for i, lease in enumerate(self.parked) if lease}
        now = time.monotonic()
        using, nfree = [], 0
        for u in s.get("using", []):
            i = parked.get(u.get("lease"))
            if i is None:
                using.append(u)
            elif states[i] == shm.HELD:
                _, conn_id, pid, _, start, since = slots[i]
                using.append({**u, "pid": pid, "last_get": since - now, "fast": True,
                              "holder": {"pid": pid, "start": start, "host": HOSTNAME,
                                         "conn": conn_id, "verified": False}})
            else:
                nfree += 1
        s = dict(s, using=using, nusing=len(using), navail=s.get("navail", 0) + nfree)
        if s.get("sem"):
            s["sem"] = dict(s["sem"], value=s["sem"]["value"] + nfree)
        s["fast"] = {"slots": len(states), "free": states.count(shm.FREE),
                     "held": states.count(shm.HELD), "clients": len(self.clients),
                     "repairs": self.nrepairs}
        return s

    def close(self) -> None:
        """Let the region's descriptor go. The mapping stays until this object is collected:
        a call still on its way (another thread) must never touch unmapped memory."""
        self.closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass

    def pool_call(self, method: str, *args: Any) -> Any:
        """``resize``/``free``/``pause``/``resume`` of the control plane and the console,
        with the region's tokens counted and the fast path off while they apply."""
        pool = self.rec.pool
        if method == "resize":
            self.pull_back(closed=False, why="resize")
            try:
                pool.resize(*args)
            finally:
                self.reopen("resize")
            return None
        if method == "pause":
            self.pull_back(closed=False, why="pause")
            try:
                return pool.pause()
            except BaseException:
                self.reopen("pause")
                raise
        if method == "resume":
            done = pool.resume()
            self.reopen("pause")
            return done
        if method == "free":
            with self.lock:
                nfree = self.region.count(shm.FREE)
            return pool.free() + nfree
        return getattr(pool, method)(*args)


def regions_of(loop: Any) -> dict[int, FastRegion]:
    """The lease loop's regions by pool id (kept after a pool is dropped, so that tokens
    given back while it shuts down still reach it)."""
    regions: dict[int, FastRegion] | None = loop.__dict__.get("fast_regions")
    if regions is None:
        regions = loop.__dict__.setdefault("fast_regions", {})
    return regions


def serve_fastmap(loop: LeaseLoop, conn: Any, msg: Any) -> None:
    """Hand a token pool's region to a client that proved the key, on a connection of its
    own, over a unix socket (the fd travels with SCM_RIGHTS), for a lease channel of that
    same process. Anything else is refused with a reason, and the client keeps the normal
    path."""
    from ..remote import PackedException

    rec = loop.records.get(msg.pool_id)
    main = loop.conns.get(msg.conn)
    why: str | None = None
    if rec is None:
        why = f"no pool with id {msg.pool_id}"
    elif conn.sock.family != socket.AF_UNIX or conn.holder is None or not conn.holder.verified:
        why = "the fast path is for processes on the supervisor's host (unix socket)"
    elif main is None or main.closed or main.holder is None or main.holder.pid != conn.holder.pid:
        why = f"lease connection {msg.conn} is not one of this process"
    else:
        why = refusal(rec)
    if why is None and rec is not None and rec.fast is None:
        try:
            rec.fast = FastRegion(rec, loop, max(1, rec.pool._max_size))
        except (shm.Unavailable, OSError, ValueError) as exc:
            why = f"no shared memory here: {exc}"
        else:
            regions_of(loop)[rec.id] = rec.fast
    if why is not None or rec is None:
        conn.send_raw(P.encode_reply(msg.rid, P.ERR, PackedException(ValueError(why))))
        return
    region: FastRegion = rec.fast
    region.clients.add(msg.conn)
    region.settle()  # tokens parked before the client can look
    frame = P.encode_reply(msg.rid, P.OK, region.region.nslots)
    with conn.wlock:
        sent = 0
        if not conn.wbuf and not conn.closed:
            try:
                sent = socket.send_fds(conn.sock, [frame], [region.fd])
            except OSError:
                sent = 0
    if sent != len(frame):
        loop.call_soon(lambda: loop.close(conn, "could not send the fast-path region"))
