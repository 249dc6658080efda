"""Parking, on the fast path: the core Pool's idle tokens leased to a region
(`fastregion.FastRegion`) as FREE slots, and taken back.

A parked token is, for the Pool, a lease of the region's pseudo-holder; ``fr.parked`` maps
each slot to that lease, the supervisor's own record (a client may write over a slot's
state byte, never over this list). `park` fills the free slots and leaves slow mode, under the
region's mutex, when `may_park` says there is something to do: nobody waits, the region is
open, and the Pool holds tokens beyond one per get counted on its way. `unpark_locked` empties
slots in given states and returns their Pool leases, for `FastRegion` to check in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import shm
from ..errors import PoolClosed
from ..pool import CREATE, Entry

if TYPE_CHECKING:
    from .fastregion import FastRegion


def may_park(fr: FastRegion) -> bool:
    """Under fr.lock: whether `park` has something to do (leave slow mode, or park an
    idle token of the Pool beyond those kept for gets on their way)."""
    r, pool = fr.region, fr.rec.pool
    if fr.closed or fr.off or r.flags & shm.CLOSED or pool.waiting() or fr._over_size():
        return False
    # Only when the Pool has a token to park beyond those kept for gets on their way:
    # slow mode with nothing to park stays on (no lock taken just to turn it off, and
    # back on by the next get that finds nothing FREE).
    return pool.free() > fr.outstanding() and (bool(r.flags & shm.WAITERS)
                                               or fr.nparked < len(fr.parked))


def park(fr: FastRegion, wait: float) -> None:
    """Under fr.lock: lease the Pool's idle tokens to the region, FREE, and leave slow
    mode, all under the region's mutex (no client sees a half-done park)."""
    r, pool = fr.region, fr.rec.pool
    locked = fr._try_lock(wait)
    if locked is None:
        fr._owe()
        return
    if not locked:  # a dead owner, or a lock set up again: the next sync checks first
        r.set_flags(r.flags | shm.DIRTY)
        r.unlock()
        fr._owe()
        return
    try:
        if r.flags & (shm.CLOSED | shm.DIRTY):
            return
        # Gets counted on their way keep a token each in the Pool, where no fast get can
        # take it: they are served when they arrive, and nobody overtakes them.
        keep = fr.outstanding()
        parked, i = fr.parked, -1
        while True:
            # A slot free by the supervisor's own record, not by its state byte: a
            # client may have written ABSENT over a parked token's state, and parking
            # there would forget that token's Pool lease for good.
            try:
                i = parked.index(0, i + 1)
            except ValueError:
                break
            if keep and pool.free() <= keep:
                break
            try:
                got = pool._acquire(fr.holder)
                if got is CREATE:  # a token pool's fun is a plain constructor, no hook
                    got = pool._create_for(fr.holder)
            except PoolClosed:
                r.set_flags(r.flags | shm.CLOSED)
                return
            if type(got) is not Entry:
                break
            fr.parked[i] = got.lease
            fr.nparked += 1
            fr.nparks += 1
            fr.region.bump(i)
            r.set_state(i, shm.FREE)
        r.set_flags(r.flags & ~shm.WAITERS)
    finally:
        r.unlock()


def unpark_locked(fr: FastRegion, states: tuple[int, ...], most: int = 1 << 30) -> list[int]:
    """Under both locks: slots in ``states`` (``most`` of them) become ABSENT; their Pool
    leases, to check in. (Found with the mapping's own search, not a Python loop over
    every slot: this runs on every get and put in slow mode.)"""
    r = fr.region
    back: list[int] = []
    for st in states:
        i = r.find(st)
        while i >= 0 and len(back) < most:
            fr.region.bump(i)
            r.set_state(i, shm.ABSENT)
            if fr.parked[i]:
                back.append(fr.parked[i])
                fr.nparked -= 1
            fr.parked[i] = 0
            i = r.find(st)
    return back
