"""The supervisor's check of a fast-path region against its own records, and the repair.

Runs in the supervisor, on the lease loop's thread (every watchdog scan) or wherever a
`fastregion.FastRegion.sync` finds that a process died holding the region's mutex, always
under the region's mutex. The region is memory that every client of the pool can write:
nothing in it is trusted. What the supervisor knows for sure is its own: which tokens it
parked in which slot (``parked``), which lease connections mapped the region
(``clients``), and the kernel-verified pid behind each connection. A state byte that is
not a state, a slot the supervisor never parked, a HELD slot of a connection that is gone or
whose pid is not the connection's, a header overwritten, gets counted on their way that
stopped coming: each is put right, and the whole repair is logged once (WARNING).

A client that scribbles over the region can only hurt pools it could use anyway (it holds
the key); it can never make the core Pool exceed its bound, since every token in the region
is, for the Pool, lent to the region.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import shm

if TYPE_CHECKING:
    from .fastregion import FastRegion

log = logging.getLogger("mppool")


def repair(fr: FastRegion, why: str | None) -> list[str]:
    """Under the region's mutex (and ``fr.lock``): put every slot and the header right.
    Returns what was wrong (empty: nothing)."""
    r, fixed = fr.region, []
    conns = fr.loop.conns
    if why:
        fixed.append(why)
    magic, version, nslots, flags, pending = shm.HEADER.unpack_from(r.mm)
    if (magic, version, nslots) != (shm.MAGIC, shm.VERSION, r.nslots):
        shm.HEADER.pack_into(r.mm, 0, shm.MAGIC, shm.VERSION, r.nslots, flags, pending)
        fixed.append("header overwritten")
    for i in range(r.nslots):
        st = r.state(i)
        if not fr.parked[i]:
            if st != shm.ABSENT:
                fixed.append(f"slot {i}: state {st} for a token never parked there")
                r.bump(i)
                r.set_state(i, shm.ABSENT)
            continue
        if st == shm.HELD:
            _, conn_id, pid, _, _, _ = r.slot(i)
            conn = conns.get(conn_id)
            if conn is None or conn.closed or conn.holder is None or conn.holder.pid != pid \
                    or conn_id not in fr.clients:
                fixed.append(f"slot {i}: held by connection {conn_id} (pid {pid}), which "
                             "is gone or not that process")
                r.bump(i)
                r.set_state(i, shm.RETURNED if r.flags else shm.FREE)
        elif st not in (shm.FREE, shm.RETURNED):
            fixed.append(f"slot {i}: state {st} is not a state")
            r.bump(i)
            r.set_state(i, shm.RETURNED if r.flags else shm.FREE)
    flags = r.flags
    if flags & ~(shm.WAITERS | shm.CLOSED | shm.DIRTY):
        fixed.append(f"flags {flags:#x}")
    want_closed = shm.CLOSED if fr.closed or fr.off else 0
    if flags & shm.CLOSED != want_closed:
        fixed.append("the CLOSED flag")
    waiting = fr.rec.pool.waiting()
    # (Not when a get's intent, owed or at hand, is about to set it: sync applies it next.)
    if waiting and not flags & shm.WAITERS and not (fr.slow or fr.need):
        fixed.append("WAITERS cleared while gets wait")
    r.set_flags((flags & shm.WAITERS) | want_closed | (shm.WAITERS if waiting else 0))
    # Gets counted on their way that made no progress for two checks in a row (no count, no
    # arrival, nobody waiting): their process died (or stopped) before sending.
    pending, arrived, out = r.pending, fr.arrived, fr.outstanding()
    seen = fr.stale
    n = seen[2] + 1 if seen is not None and seen[:2] == (pending, arrived) else 1
    if out and not waiting and n >= 3:
        fixed.append(f"{out} pending get(s) that never arrived")
        fr.arrived = pending
        n = 0
    fr.stale = (pending, fr.arrived, n) if out else None
    if why is None and flags & shm.DIRTY:
        fixed.insert(0, "a process died holding the region's lock")
    if fixed:
        fr.nrepairs += 1
        log.warning("mppool: pool %r: fast-path region repaired from the supervisor's "
                    "records: %s", fr.rec.name, "; ".join(fixed))
    return fixed


def stuck_owner(fr: FastRegion) -> None:
    """On the loop's thread, every watchdog scan, while work is owed: a lock word that names
    the same owner for three scans in a row, a live thread that is not stopped, is freed and
    the region checked. A critical section lasts nanoseconds: an owner that runs (or sleeps)
    and still holds the lock after three scans is a word a client wrote (its own thread, any
    other process's, even the supervisor's), which the kernel would never clear. An owner
    that is stopped (SIGSTOP, a debugger) may really be inside the lock: waited for. (An
    owner that is no thread at all is taken over at once by `shm.Region.try_lock`.)"""
    r = fr.region
    tid = r.owner_tid()
    if not fr.owed or tid <= 0 or shm.thread_state(tid) in (b"T", b"t"):
        fr.stuck = None
        return
    n = fr.stuck[1] + 1 if fr.stuck is not None and fr.stuck[0] == tid else 1
    fr.stuck = (tid, n)
    if n < 3:
        return
    fr.stuck = None
    with fr.lock:
        if r.owner_tid() != tid:
            return
        got = reset_lock(fr, f"the region's lock named thread {tid} as its owner for three "
                         "scans, a thread that is not stopped: freed")
        if got is None:
            return
        r.set_flags(r.flags | shm.DIRTY)
        r.unlock()
    fr.sync()


def reset_lock(fr: FastRegion, why: str) -> bool | None:
    """Under ``fr.lock``: free the lock word and take it (False: check the region first;
    None: somebody else took it meanwhile, the retry timer comes back)."""
    r = fr.region
    r.reset_lock()
    fr.check_due = why
    return None if r.try_lock(0.0) is None else False
