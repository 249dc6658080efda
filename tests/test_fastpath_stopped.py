"""A client stopped (SIGSTOP) while it holds a fast-path region's mutex hurts nobody else.

The region's mutex is shared memory that every client of the pool takes for a few hundred
nanoseconds. A process can be stopped right there (a debugger, SIGSTOP, a frozen cgroup).
The supervisor must never wait on it: its other pools, ``stats()``, resizes, reclaims of
dead holders and other clients' gets (with their timeouts) all go on; the work the stopped
process keeps from the region lands as soon as it runs again or dies.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from helpers import NEEDS_FAST_PATH, start_ready, wait_until
from test_fastpath import accounted, fast_pool, hold_forever

from mppool.errors import TimeOut
from mppool.fastpath import FastToken

pytestmark = [pytest.mark.slow, pytest.mark.kill, NEEDS_FAST_PATH]


def stop_inside_the_mutex(pool: Any, ready: Any) -> None:
    """Map the region, take its mutex, and stop there (the test continues or kills us)."""
    pool.put(pool.get(timeout=10))
    _lock_and_stop(pool, ready)


def _lock_and_stop(pool: Any, ready: Any) -> None:
    region = pool._where[1]
    region.lock()
    ready.put(os.getpid())
    ready.close()
    ready.join_thread()  # the queue's feeder thread has sent it before we stop
    os.kill(os.getpid(), signal.SIGSTOP)
    region.unlock()  # after SIGCONT
    while True:
        time.sleep(3600)


def wait_stopped(pid: int) -> None:
    def stopped() -> bool:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    wait_until(stopped, what=f"pid {pid} stopped")


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


@pytest.mark.parametrize("end", ["SIGCONT", "SIGKILL"])
def test_a_stopped_mutex_holder_stalls_nobody(client, procs, end):
    size = 2
    pool = fast_pool(client, f"t-stop-{end}", size)
    other = client.token_pool(f"t-other-{end}", 1)
    # A holder of a fast token that will die while the mutex is held by someone else.
    holder, (hpid, kind, _, _) = start_ready(procs, hold_forever, pool)
    assert kind == "FastToken"
    stopper, spid = start_ready(procs, stop_inside_the_mutex, pool)
    wait_stopped(spid)

    # Another pool: served at once, as is the whole control plane.
    tok, took = timed(lambda: other.get(timeout=5))
    other.put(tok)
    assert took < 1.0, f"another pool's get took {took:.3f} s"
    s, took = timed(pool.stats)
    assert took < 1.0 and s["max_size"] == size, (took, s)

    # This pool: a get that cannot take the mutex goes to the supervisor and honours its
    # timeout; the parked token waits for the stopped process.
    t0 = time.monotonic()
    with pytest.raises(TimeOut):
        pool.get(timeout=0.3)
    took = time.monotonic() - t0
    assert 0.25 <= took < 1.5, f"a get with timeout=0.3 returned after {took:.3f} s"
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.get(timeout=30)))
    waiter.start()
    wait_until(lambda: pool.waiting() >= 1, what="a get queued at the supervisor")

    # A holder dies meanwhile: noted now, its unit given back once the mutex is free.
    os.kill(hpid, signal.SIGKILL)
    holder.join(5)
    s, took = timed(pool.stats)
    assert took < 1.0, f"stats() took {took:.3f} s while a client holds the region's mutex"

    # A resize from the control plane completes (the region's part is left owed).
    _, took = timed(lambda: client.resize(f"t-stop-{end}", size))
    assert took < 2.0, f"resize took {took:.3f} s"

    if end == "SIGCONT":
        os.kill(spid, signal.SIGCONT)
    else:
        os.kill(spid, signal.SIGKILL)  # inside the mutex: the next locker gets EOWNERDEAD
        stopper.join(5)
    waiter.join(10)
    assert got, "the queued get was not served once the mutex was free"
    pool.put(got[0])
    if end == "SIGKILL":
        wait_until(lambda: pool.stats()["fast"]["repairs"] >= 1, what="the region repaired")
    else:
        os.kill(spid, signal.SIGKILL)
        stopper.join(5)
    wait_until(lambda: accounted(pool, size), timeout=10, what="every unit back")
    held = [pool.get(timeout=5) for _ in range(size)]  # all of them, and no more
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    for t in held:
        pool.put(t)
    wait_until(lambda: not pool.stats()["fast"]["stale"], what="nothing owed")
    tok = pool.get(timeout=5)
    assert type(tok) is FastToken, "fast again"
    pool.put(tok)


def test_a_put_while_the_mutex_is_held_travels_as_a_message(client, procs):
    """A process that holds a fast token and cannot take the mutex to give it back (its
    holder is stopped) sends the give-back to the supervisor instead of waiting on it."""
    pool = fast_pool(client, "t-stop-give", 1)
    tok = pool.get(timeout=5)
    assert type(tok) is FastToken
    stopper, spid = start_ready(procs, stop_inside_the_mutex_after_get, pool)
    wait_stopped(spid)
    _, took = timed(lambda: pool.put(tok))
    assert took < 0.5, f"put took {took:.3f} s"
    os.kill(spid, signal.SIGCONT)
    wait_until(lambda: accounted(pool, 1), timeout=10, what="the unit given back by message")
    tok = pool.get(timeout=5)
    with pytest.raises(TimeOut):
        pool.get(timeout=0)  # one unit, not two
    pool.put(tok)
    os.kill(spid, signal.SIGKILL)
    stopper.join(5)


def stop_inside_the_mutex_after_get(pool: Any, ready: Any) -> None:
    """Map the region (a get that queues, since the parent holds the only token, then
    gives up), take the mutex and stop."""
    try:
        pool.get(timeout=0)
    except TimeOut:
        pass
    _lock_and_stop(pool, ready)
