"""What the control plane sees of a pool with a fast path: its stats, and the calls that
must switch the region off while they apply.

Runs in the supervisor, on control-plane threads. `overlay` reads the region without its
mutex (stats never wait on a client): FREE tokens are shown idle, HELD ones lent to their
real holders (pid from the slot, checked against the connection at every scan), and the
lease counters include fast leases (the region counts its takes and gives). `fold_metrics`
adds fast leases to the supervisor's Prometheus histograms: their hold times (counted by
each give in the region) and their wait (none: a fast get never waits).
`pool_call` runs ``resize``, ``pause``, ``resume`` and ``free`` with the region's tokens
counted and the fast path off while they apply.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import shm
from ..holder import HOSTNAME

if TYPE_CHECKING:
    from .fastregion import FastRegion


def overlay(fr: FastRegion, s: dict[str, Any]) -> dict[str, Any]:
    """The Pool's stats with the region's tokens shown as what they are: FREE ones idle,
    HELD ones lent to their real holders (pid from the slot, checked against the
    connection at every scan). Read without the region's mutex: stats never wait on a
    client; ``"stale": true`` says that work is owed to a region whose mutex is held."""
    with fr.lock:
        r = fr.region
        states = [r.state(i) for i in range(r.nslots)]
        slots = [r.slot(i) for i in range(r.nslots)]
        parked = {lease: i for i, lease in enumerate(fr.parked) if lease}
        owed = fr.owed
        on_way = fr.outstanding()
        nparks, nunparks = fr.nparks, fr.nunparks
        takes, gives = r.takes, r.gives
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
    # Fast leases in the lease counters, from the region's own counts; the Pool counted the
    # region's parks and take-backs as leases, which they are not.
    for k, v in (("nuses", takes - nparks), ("nborrows", takes - nparks),
                 ("requests_num", takes - nparks), ("nreturns", gives - nunparks)):
        if k in s:
            s[k] = max(0, s[k] + v)
    s["fast"] = {"slots": len(states), "free": states.count(shm.FREE),
                 "held": states.count(shm.HELD), "clients": len(fr.clients),
                 "repairs": fr.nrepairs, "stale": owed, "on_way": on_way}
    return s


def pool_call(fr: FastRegion, method: str, *args: Any) -> Any:
    """``resize``/``free``/``pause``/``resume`` of the control plane and the console,
    with the region's tokens counted and the fast path off while they apply."""
    pool = fr.rec.pool
    if method == "resize":
        fr.pull_back(closed=False, why="resize")
        try:
            pool.resize(*args)
        finally:
            fr.reopen("resize")
        return None
    if method == "pause":
        fr.pull_back(closed=False, why="pause")
        try:
            return pool.pause()
        except BaseException:
            fr.reopen("pause")
            raise
    if method == "resume":
        done = pool.resume()
        fr.reopen("pause")
        return done
    if method == "free":
        with fr.lock:
            nfree = fr.region.count(shm.FREE)
        return pool.free() + nfree
    return getattr(pool, method)(*args)


def fold_metrics(fr: FastRegion, wait: Any, hold: Any) -> None:
    """Add the fast leases given back since the last scrape to the hold-time histogram
    ``hold`` and the fast takes to the wait histogram ``wait`` (at 0 s), under this pool's
    label. The counts are read under the region's mutex, taken with a short wait: when a
    client holds it, this scrape adds nothing and the next one catches up. (prometheus_client
    has no call to add n observations at once: its per-bucket values are incremented, which
    is what ``observe`` does one at a time.)"""
    with fr.lock:
        r = fr.region
        if fr._try_lock(0.001) is None:
            return
        try:
            counts, total = r.hold_times()
        finally:
            r.unlock()
        takes = r.takes
        prev_counts, prev_total, prev_takes = fr.folded or ([0] * len(counts), 0.0, 0)
        fr.folded = (counts, total, takes)
    h = hold.labels(fr.rec.name)
    for i, (now, before) in enumerate(zip(counts, prev_counts, strict=True)):
        if now > before:
            h._buckets[i].inc(now - before)
    if total > prev_total:
        h._sum.inc(total - prev_total)
    if takes > prev_takes:
        wait.labels(fr.rec.name)._buckets[0].inc(takes - prev_takes)
