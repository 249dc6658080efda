"""Lease ages on the fast path: ``max_using_delay`` and ``max_using_delay_kill`` for tokens
held in a region (`fastregion.FastRegion`).

Runs in the supervisor, on the lease loop's thread, every quarter of the pool's smallest
delay (at most every second) while the region lives. Each HELD slot carries the time its
holder took it (``since``, the holder's CLOCK_MONOTONIC, one clock for every process on the
host). A lease past ``max_using_delay`` is warned about once; one past
``max_using_delay_kill`` becomes a kill intent (slot, generation) that `FastRegion.sync`
applies under the mutex only if the slot still holds that generation and is still that old
(the slots are read here without the mutex, so a torn read cannot kill a young lease). The
killed slot is freed with a new generation, so its holder's late put is a no-op; the kill is
counted (``nkilled``), logged, and with ``kill_holder`` the holder is terminated by its
connection's kernel-verified pid, as the core Pool's housekeeping does for its own leases.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .. import shm

if TYPE_CHECKING:
    from .fastregion import FastRegion

log = logging.getLogger("mppool")


def age_timer(fr: FastRegion) -> None:
    """On the loop's thread, every age_period while the region lives."""
    if fr.closed:
        return
    try:
        scan_ages(fr, time.monotonic())
    finally:
        fr.loop.at(fr.loop.sup.clock.now() + fr.age_period, 3, lambda: age_timer(fr))


def scan_ages(fr: FastRegion, now: float) -> None:
    """Warn once about each fast lease held past max_using_delay, and kill those past
    max_using_delay_kill, as the core Pool's housekeeping does for its own leases. The
    slots are read without the mutex; a kill is an intent that `sync` applies only if
    the slot still holds the same generation (a lease given back meanwhile is spared)."""
    r, warn, kill = fr.region, fr.warn_after, fr.kill_after
    warnings: list[tuple[float, int]] = []
    live: set[tuple[int, int]] = set()
    with fr.lock:
        for i in range(r.nslots):
            if r.state(i) != shm.HELD:
                continue
            gen, _, pid, _, _, since = r.slot(i)
            age = now - since
            if age < warn:
                continue
            live.add((i, gen))
            if kill and age >= kill:
                fr.kills[i] = gen
            elif (i, gen) not in fr.warned:
                warnings.append((age, pid))
        fr.warned = live  # forget leases that ended: at most one entry per slot
        kills = bool(fr.kills)
    for age, pid in warnings:
        log.warning("mppool: pool %r: object held for %.1f s by pid %s: <fast token>",
                    fr.rec.name, age, pid)
    if kills:
        fr.sync()


def report_kills(fr: FastRegion, killed: list[tuple[int, int, float]]) -> None:
    """After `sync` killed fast leases: counted, logged, and their holders terminated
    when the pool says so (``kill_holder``), by the connection's kernel-verified pid."""
    pool = fr.rec.pool
    pool._count("nkilled", len(killed))
    for conn_id, pid, age in killed:
        log.warning("mppool: pool %r: killing fast lease held for %.1f s by pid %s",
                    fr.rec.name, age, pid)
        conn = fr.loop.conns.get(conn_id)
        holder = conn.holder if conn is not None else None
        # The slot's conn and pid are written by clients: only a connection that mapped
        # this region can hold one of its slots. Without this, a client could write any
        # process's connection and pid into its own slot and have it terminated.
        if holder is None or holder.pid != pid or conn_id not in fr.clients \
                or not pool._kill_holder or pool.on_kill_holder is None:
            continue
        try:
            pool.on_kill_holder(holder, age)
        except Exception:
            log.exception("mppool: pool %r: could not terminate pid %s", fr.rec.name, pid)
