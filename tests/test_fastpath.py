"""The fast path of token pools (``token_pool(..., fast=True)``, mppool.fastpath): every
guarantee of the normal path, proved on leases taken in shared memory.

- never held twice under concurrent get/put from many processes;
- a SIGKILLed holder's units come back, also when it dies inside the region's mutex with a
  half-written slot;
- a late put (after the slot was given back or reclaimed) is a no-op;
- FIFO while anyone waits: no fast get barges past a queued waiter;
- a scribbled region is detected and repaired by the supervisor, and logged;
- stats (holder pids), resize and shutdown (waking waiters) as for the normal path.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import pytest
from helpers import NEEDS_FAST_PATH, fork_ctx, start_ready, wait_until

import mppool
from mppool import shm
from mppool.errors import PoolClosed, TimeOut
from mppool.fastpath import FastToken, FastTokenPool

pytestmark = [pytest.mark.slow, pytest.mark.kill, NEEDS_FAST_PATH]


def fast_pool(client: Any, name: str, size: int) -> FastTokenPool:
    pool = client.token_pool(name, size, fast=True)
    assert isinstance(pool, FastTokenPool)
    tok = pool.get(timeout=5)
    assert type(tok) is FastToken, "the fast path was not taken"
    assert isinstance(tok, mppool.pools.Token)  # get() -> Token, on either path
    pool.put(tok)
    wait_until(lambda: pool.stats()["fast"]["free"] == size, what="tokens parked")
    return pool


def accounted(pool: Any, size: int) -> bool:
    s = pool.stats()
    return s["nusing"] == 0 and pool.free() == size and s["nwaiting"] == 0


# ------------------------------------------------------------------ workers (forked)


def churn(pool: Any, size: int, out: Any, peak: Any, lock: Any, n: int, errors: Any) -> None:
    try:
        for _ in range(n):
            tok = pool.get(timeout=30)
            with lock:
                out.value += 1
                peak.value = max(peak.value, out.value)
            with lock:
                out.value -= 1
            pool.put(tok)
    except BaseException as exc:  # reported to the test, never lost
        errors.put(repr(exc))


def hold_forever(pool: Any, ready: Any) -> None:
    tok = pool.get(timeout=10)
    ready.put((os.getpid(), type(tok).__name__, getattr(tok, "slot", None),
               getattr(tok, "gen", None)))
    while True:
        time.sleep(3600)


def die_in_critical_section(pool: Any, ready: Any) -> None:
    """Map the region, then take its mutex, write half of a take, and wait to be killed."""
    pool.put(pool.get(timeout=10))
    region = pool._where[1]
    region.lock()
    at = region.slots_at
    shm.SLOT.pack_into(region.mm, at, 99, 424242, os.getpid(), 0, 0.0, 0.0)
    region.set_state(0, shm.HELD)  # ...and never unlocks
    ready.put(os.getpid())
    while True:
        time.sleep(3600)


def wait_in_line(pool: Any, tag: int, started: Any, served: Any) -> None:
    started.put(tag)
    tok = pool.get(timeout=30)
    served.put(tag)
    time.sleep(0.05)
    pool.put(tok)


# ------------------------------------------------------------------ tests


def test_never_held_twice_under_concurrent_get_put(client, procs):
    size, nproc, n = 3, 6, 400
    pool = fast_pool(client, "t-many", size)
    ctx = fork_ctx()
    out, peak, lock, errors = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Lock(), ctx.Queue()
    for _ in range(nproc):
        p = ctx.Process(target=churn, args=(pool, size, out, peak, lock, n, errors))
        procs.append(p)
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert errors.empty(), errors.get()
    assert 1 <= peak.value <= size, f"{peak.value} tokens out at once for a pool of {size}"
    wait_until(lambda: accounted(pool, size), what="every token back")
    s = pool.stats()
    assert s["fast"]["free"] + s["navail"] - s["fast"]["free"] == size
    # All of them can be taken at once, and no more.
    held = [pool.get(timeout=5) for _ in range(size)]
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    for tok in held:
        pool.put(tok)


def test_sigkilled_holder_units_come_back(client, procs):
    pool = fast_pool(client, "t-kill", 1)
    latencies = []
    for _ in range(5):
        p, (pid, kind, _, _) = start_ready(procs, hold_forever, pool)
        assert kind == "FastToken"
        s = pool.stats()
        assert [u["pid"] for u in s["using"]] == [pid]  # stats name the real holder
        got: list[float] = []

        def wait_for_token(got: list[float] = got) -> None:
            pool.get(timeout=10)
            got.append(time.monotonic())

        waiter = threading.Thread(target=wait_for_token)
        waiter.start()
        wait_until(lambda: pool.waiting() == 1, what="parent waiting")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        waiter.join(10)
        assert got, "the killed holder's token never came back"
        latencies.append(got[0] - t0)
        p.join(5)
        assert pool.stats()["nusing"] == 1
        for obj, _ in pool._client._held[pool.name].items():
            pool.put(obj)  # the parent's (normal-path) token
        wait_until(lambda: accounted(pool, 1), what="all returned")
    assert sorted(latencies)[len(latencies) // 2] < 0.1, latencies
    assert max(latencies) < 1.0, latencies


def test_sigkilled_inside_the_critical_section(client, procs, caplog):
    pool = fast_pool(client, "t-crit", 1)
    p, pid = start_ready(procs, die_in_critical_section, pool)
    os.kill(pid, signal.SIGKILL)
    p.join(5)
    # The next locker is told the owner died (EOWNERDEAD): it goes to the supervisor, which
    # repairs the half-written slot (a connection that is not that process's) and serves it.
    tok = pool.get(timeout=5)
    wait_until(lambda: pool.stats()["fast"]["repairs"] >= 1, what="a repair")
    with pytest.raises(TimeOut):
        pool.get(timeout=0)  # exactly one unit, and we hold it
    pool.put(tok)
    wait_until(lambda: accounted(pool, 1), what="the unit back")
    wait_until(lambda: pool.stats()["fast"]["free"] == 1, what="parked again")
    tok = pool.get(timeout=5)
    assert type(tok) is FastToken, "back to the fast path after the repair"
    pool.put(tok)


def test_late_put_is_a_noop(client, caplog):
    pool = fast_pool(client, "t-late", 1)
    old = pool.get()
    pool.put(old)
    new = pool.get()
    assert (new.slot, new.gen) != (old.slot, old.gen)
    with caplog.at_level(logging.WARNING, logger="mppool"):
        pool.put(old)  # a late put of a lease given back already
    assert "no longer holds" in caplog.text
    with pytest.raises(TimeOut):
        pool.get(timeout=0)  # the late put freed nothing: `new` is still held
    pool.put(new)
    assert accounted(pool, 1)


def test_late_put_after_reclaim_is_a_noop(client, procs):
    pool = fast_pool(client, "t-reclaim", 1)
    p, (pid, kind, slot, gen) = start_ready(procs, hold_forever, pool)
    assert kind == "FastToken"
    os.kill(pid, signal.SIGKILL)
    p.join(5)
    mine = pool.get(timeout=5)  # the reclaimed unit
    region = pool._where[1]
    # The dead holder's token, put back late through our own mapping: refused by generation.
    assert region.give(slot, gen, pool._where[2]) is False
    assert region.give(slot, gen, 424242) is False
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    pool.put(mine)
    wait_until(lambda: accounted(pool, 1), what="unit back")


def test_fifo_while_waiting(client, procs):
    pool = fast_pool(client, "t-fifo", 1)
    held = pool.get()
    ctx = fork_ctx()
    started, served = ctx.Queue(), ctx.Queue()
    for tag in range(3):
        p = ctx.Process(target=wait_in_line, args=(pool, tag, started, served))
        procs.append(p)
        p.start()
        assert started.get(timeout=10) == tag
        wait_until(lambda tag=tag: pool.waiting() == tag + 1, what=f"waiter {tag} queued")
    pool.put(held)
    order = [served.get(timeout=10) for _ in range(3)]
    assert order == [0, 1, 2]
    for p in procs:
        p.join(10)
    wait_until(lambda: accounted(pool, 1), what="unit back")


def test_no_barging_past_a_queued_waiter(client, procs):
    pool = fast_pool(client, "t-barge", 1)
    held = pool.get()
    ctx = fork_ctx()
    started, served = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=wait_in_line, args=(pool, 0, started, served))
    procs.append(p)
    p.start()
    wait_until(lambda: pool.waiting() == 1, what="waiter queued")
    pool.put(held)
    assert served.get(timeout=10) == 0  # the waiter, not a fast get, got the unit
    p.join(10)
    wait_until(lambda: accounted(pool, 1), what="unit back")


def test_scribbled_region_is_repaired(client, caplog):
    pool = fast_pool(client, "t-scribble", 2)
    region = pool._where[1]
    with caplog.at_level(logging.WARNING, logger="mppool"):
        region.lock()
        region.mm[shm.STATES_AT:shm.STATES_AT + 2] = b"\x07\x02"  # garbage, and a bogus HELD
        shm.HEADER.pack_into(region.mm, 0, 0, 0, 0, 0, 12345)
        region.unlock()
        wait_until(lambda: pool.stats()["fast"]["repairs"] >= 1, what="a repair")
    assert shm.HEADER.unpack_from(region.mm)[:3] == (shm.MAGIC, shm.VERSION, 2)
    wait_until(lambda: accounted(pool, 2), what="units accounted")
    held = [pool.get(timeout=5) for _ in range(2)]
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    for tok in held:
        pool.put(tok)
    wait_until(lambda: accounted(pool, 2), what="units back")


def test_resize_and_shutdown(client):
    pool = fast_pool(client, "t-resize", 2)
    a, b = pool.get(), pool.get()
    pool.resize(3)
    c = pool.get(timeout=5)
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    for tok in (a, b, c):
        pool.put(tok)
    wait_until(lambda: accounted(pool, 3), what="3 units")
    held = [pool.get(timeout=5) for _ in range(3)]
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.get(timeout=10)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=waiter)
    th.start()
    wait_until(lambda: pool.waiting() == 1, what="waiter queued")
    pool.shutdown()
    th.join(10)
    assert errors and isinstance(errors[0], (PoolClosed, mppool.ServerUnavailable)), errors
    for tok in held:
        pool.put(tok)  # after shutdown: ignored or closed, never raises


def test_fallback_over_tcp():
    with mppool.Server(address="127.0.0.1:0") as srv, \
            mppool.connect(srv.address, srv.authkey) as c:
        pool = c.token_pool("tcp", 1, fast=True)
        tok = pool.get(timeout=5)
        assert type(tok) is not FastToken
        pool.put(tok)


def test_bad_fast_argument(client):
    with pytest.raises(TypeError, match="fast"):
        client.token_pool("x", 1, fast="yes")


def test_pause_stops_fast_gets_and_resume_restores_them(client):
    pool = fast_pool(client, "t-pause", 2)
    assert client.pause("t-pause")
    with pytest.raises(TimeOut):
        pool.get(timeout=0)  # tokens are free, but a paused pool hands out nothing
    got: list[Any] = []
    th = threading.Thread(target=lambda: got.append(pool.get(timeout=10)))
    th.start()
    wait_until(lambda: pool.waiting() == 1, what="a get queued while paused")
    assert client.resume("t-pause")
    th.join(10)
    assert got, "the queued get was not served at resume"
    pool.put(got[0])
    wait_until(lambda: accounted(pool, 2), what="units back")
    wait_until(lambda: pool.stats()["fast"]["free"] == 2, what="parked again")
    tok = pool.get(timeout=5)
    assert type(tok) is FastToken, "fast again after resume"
    pool.put(tok)


def test_console_kill_holder_takes_back_fast_leases(client, procs):
    pool = fast_pool(client, "t-console", 1)
    _, (pid, kind, _, _) = start_ready(procs, hold_forever, pool)
    assert kind == "FastToken"
    assert client.kill_holder("t-console", pid)["reclaimed"] == 1
    assert client.kill_holder("t-console", os.getpid())["reclaimed"] == 0
    tok = pool.get(timeout=5)  # the unit is back while its old holder lives on
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    pool.put(tok)
    wait_until(lambda: accounted(pool, 1), what="unit back")


def test_kill_holder_of_the_supervisor_pid_frees_no_parked_token(client, server):
    pool = fast_pool(client, "t-suppid", 2)
    assert client.kill_holder("t-suppid", server.pid)["reclaimed"] == 0
    held = [pool.get(timeout=5) for _ in range(2)]
    with pytest.raises(TimeOut):
        pool.get(timeout=0)  # still 2 units, not 4
    for tok in held:
        pool.put(tok)


def test_resize_down_with_fast_leases_out(client):
    pool = fast_pool(client, "t-shrink", 3)
    held = [pool.get(), pool.get(), pool.get()]
    pool.resize(1)
    for tok in held:
        pool.put(tok)
    wait_until(lambda: accounted(pool, 1), what="shrunk to 1")
    tok = pool.get(timeout=5)
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    pool.put(tok)
    s = pool.stats()
    assert s["max_size"] == 1 and s["nusing"] == 0


def test_fast_token_pool_as_a_budget(client):
    budget = fast_pool(client, "t-budget", 1)
    a = mppool.Pool(lambda i: object(), max_size=2, min_size=0, budget=budget)
    b = mppool.Pool(lambda i: object(), max_size=2, min_size=0, budget=budget)
    try:
        obj = a.get()
        assert budget.stats()["fast"]["held"] == 1  # the object's token is a fast one
        with pytest.raises(TimeOut):
            b.get(timeout=0.2)  # the cap holds across pools
        a.ret(obj)  # idle while somebody waits for the budget: closed, its token back
        other = b.get(timeout=10)
        b.ret(other)
    finally:
        a.shutdown()
        b.shutdown()
    wait_until(lambda: accounted(budget, 1), what="budget token back")


def test_a_get_that_never_arrives_does_not_keep_the_region_slow(client):
    pool = fast_pool(client, "t-pending", 1)
    where = pool._where
    held = pool.get()
    # A get that decided to queue (pending counted, WAITERS set) and whose process died
    # before its message left: nobody will ever un-count it.
    assert where[1].take(where[2], os.getpid(), 0.0, 0.0) == shm.QUEUE
    pool.put(held)  # in slow mode: through the supervisor
    wait_until(lambda: pool.stats()["fast"]["repairs"] >= 1, timeout=10,
               what="the get that never came written off")
    wait_until(lambda: pool.stats()["fast"]["free"] == 1, timeout=10, what="fast mode again")
    tok = pool.get(timeout=5)
    assert type(tok) is FastToken
    pool.put(tok)
