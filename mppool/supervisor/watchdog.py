"""The watchdog: a process that dies gives back everything it held, at once.

It has two eyes. The first is a lease connection closing (exit, crash, SIGKILL: the kernel
closes the socket), which costs nothing and is instant: the lease loop calls `release_conn`,
which drops the connection's waiters and reclaims its leases (``transfer="proxy"`` objects are
reset first, on the pool's own threads, since reset is user code). The second is a periodic
scan of connected holders (pid and start time from boot) for a holder whose socket outlives
it, e.g. one inherited by a child process; it runs on a thread of its own, so nothing a pool
does can delay it.

Lease kills (``max_using_delay_kill``) are decided by housekeeping; with ``kill_holder`` the
holder is sent SIGTERM here, then SIGKILL after a grace, on timers of their own, and only when
the kernel vouched for its pid (a unix-socket peer).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

import psutil

from ..clock import Clock, clamp_wait
from ..holder import Holder
from ..ratelog import RateLimitedLog
from ..sched import Scheduler
from .registry import Record, Registry

if TYPE_CHECKING:
    from .leases import Conn, LeaseLoop

log = logging.getLogger("mppool")

KILL_GRACE = 2.0


class Watchdog:
    def __init__(self, registry: Registry, loop: LeaseLoop, clock: Clock,
                 scan_interval: float = 0.2) -> None:
        self.registry = registry
        self.loop = loop
        self.scan_interval = scan_interval
        self.kill_timers = Scheduler(clock, workers=1, name="mppool-kill")
        self.nreclaimed = 0
        self.nscans = 0
        self.suspects: set[int] = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="mppool-watchdog", daemon=True)
        self._scan_errors = RateLimitedLog(10.0)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.kill_timers.close()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(clamp_wait(max(1.0, 2 * self.scan_interval)))

    def _watch(self) -> None:
        """scan() every scan_interval until stopped; deadline-based, so a slow scan does not
        shift the ones after it."""
        interval = self.scan_interval
        due = time.monotonic() + interval
        while not self.stopped.wait(clamp_wait(due - time.monotonic())):
            now = time.monotonic()
            if now < due:
                continue  # a clamped wait ended early
            try:
                self.scan()
            except Exception:
                self._scan_errors.error("scan", "mppool: watchdog scan failed", exc_info=True)
            due += interval
            if due <= time.monotonic():  # fell behind (a long scan, a frozen process)
                due = time.monotonic() + interval

    def release_conn(self, conn: Conn) -> None:
        """A client connection closed: drop its waiters, reclaim its leases."""
        for rec in list(self.registry.records.values()):
            rec.pool._drop_waiters(lambda w: getattr(w, "conn", None) is conn)
            if rec.reset is None or rec.submit(self._reclaim, rec, conn) is None:
                self._reclaim(rec, conn)
        for region in list(self.loop.fast_regions.values()):  # fast leases (fastregion.py)
            region.release(conn.id, conn.bye, conn.holder.pid if conn.holder else None)

    def reclaim_rest(self, rec: Record, conn: Conn) -> None:
        """On the loop: the last call on an object of ``conn``, closed, ended: take back
        what ``release_conn`` had to leave (see `_reclaim`)."""
        if rec.reset is None or rec.submit(self._reclaim, rec, conn) is None:
            self._reclaim(rec, conn)

    def _reclaim(self, rec: Record, conn: Conn) -> None:
        cid = conn.id
        # A lease whose object a call of this client still runs on stays out until that
        # call ends (requests.py, _call_ended): lent again now, the object would be shared
        # by its next holder and that call (a query still running on a DB connection).
        with conn.calls_lock:
            busy = set(conn.calls)
        n = rec.pool._reclaim(lambda h: h.conn == cid, reset=rec.reset, spare=busy)
        if n:
            self.nreclaimed += n
            pid = conn.holder.pid if conn.holder is not None else "?"
            if conn.bye:
                # The client closed on purpose (close(), interpreter exit): routine.
                log.info("mppool: pool %r: took back %d lease(s) still held by pid %s "
                         "(connection %d), which closed its client", rec.name, n, pid, cid)
            else:
                log.warning("mppool: pool %r: reclaimed %d lease(s) of connection %d whose "
                            "holder (pid %s) went away without closing (crash, kill, lost "
                            "connection)", rec.name, n, cid, pid)

    def scan(self) -> None:
        """Close connections whose holder process is gone although its socket lives on.

        A holder found dead is closed at the next scan if its socket is still open, so a
        process whose EOF is already on its way is left to the (instant) close path.
        """
        try:
            for region in list(self.loop.fast_regions.values()):  # on the loop's thread
                self.loop.call_soon(region.check_soon)
            suspects, self.suspects = self.suspects, set()
            for conn in list(self.loop.conns.values()):
                holder = conn.holder
                if holder is None or conn.closed or holder.alive():
                    continue
                if conn.id not in suspects:
                    self.suspects.add(conn.id)
                    continue
                log.warning("mppool: holder pid %d is gone but its connection is still open "
                            "(socket inherited by another process?): closing it", holder.pid)
                self.loop.call_soon(lambda conn=conn: self.loop.close(conn))  # type: ignore[misc]
        finally:
            self.nscans += 1  # driven by _watch(), on the watchdog's own thread

    def terminate_holder(self, holder: Holder, age: float) -> None:
        """kill_holder=True: SIGTERM the holder of a killed lease, SIGKILL after a grace.

        Only a holder whose pid the kernel vouched for (a unix-socket peer) is ever signalled:
        a TCP client's pid is only its claim, and could name any process.
        """
        if not holder.verified or holder.pid == os.getpid():
            log.warning("mppool: not terminating pid %s (held a lease for %.1f s): its pid is "
                        "only claimed by a TCP client", holder.pid, age)
            return
        try:
            proc = psutil.Process(holder.pid)
            if not holder.is_process(proc):
                return  # the pid was reused: not our holder
            log.warning("mppool: terminating pid %d, which held a lease for %.1f s", holder.pid, age)
            proc.terminate()
        except psutil.Error:
            return

        def finish() -> None:
            try:
                if proc.is_running() and holder.is_process(proc):
                    log.warning("mppool: pid %d ignored SIGTERM for %.1f s: SIGKILL", holder.pid,
                                KILL_GRACE)
                    proc.kill()
            except psutil.Error:
                pass
        self.kill_timers.enter(KILL_GRACE, finish)

