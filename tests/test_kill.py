"""Processes killed on purpose: nothing is ever lost (the watchdog reclaims every lease of a
process that died, and a process that dies while waiting costs nothing)."""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time

import psutil
import pytest
from helpers import fork_ctx, start_ready, wait_until
from workers import get_loop, hold_and_fork_keeper, hold_forever, wait_for_one

import mppool
from mppool.holder import Holder, current_holder

pytestmark = [pytest.mark.slow, pytest.mark.kill]


def accounted(pool, size):
    """Every unit is either out or available, and none is out."""
    s = pool.stats()
    return s["nusing"] == 0 and pool.free() == size


def test_sigkilled_holder_unit_comes_back_fast(client, procs):
    tokens = client.token_pool("t", 1)
    latencies = []
    for _ in range(8):
        p, _ = start_ready(procs, hold_forever, tokens)
        got: list[float] = []

        def wait_for_token(got: list[float] = got) -> None:
            tokens.get(timeout=10)
            got.append(time.monotonic())

        waiter = threading.Thread(target=wait_for_token)
        waiter.start()
        wait_until(lambda: tokens.waiting() == 1, what="parent waiting")
        t0 = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)
        waiter.join(10)
        assert got, "the killed holder's token never came back"
        latencies.append(got[0] - t0)
        p.join(5)
        assert tokens.stats()["nusing"] == 1  # the parent holds it now
        _release_all(tokens)
    assert statistics.median(latencies) < 0.1, latencies
    assert max(latencies) < 1.0, latencies


def _release_all(pool):
    """Return what this process holds in ``pool`` (test helper)."""
    for obj, _ in pool._client._held[pool.name].items():
        pool.ret(obj)
    wait_until(lambda: pool.stats()["nusing"] == 0, what="all returned")


def test_sigkilled_waiter_costs_nothing(client, procs):
    ctx = fork_ctx()
    pool = client.pool("w", lambda i: i, max_size=1)
    held = pool.get()
    started, results = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=wait_for_one, args=(pool, started, results, "victim"))
    procs.append(p)
    p.start()
    wait_until(lambda: pool.waiting() == 1, what="child waiting")
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    wait_until(lambda: pool.waiting() == 0, what="dead waiter dropped")
    pool.ret(held)
    # the unit was not swallowed by the dead waiter
    assert pool.get(timeout=1) == held
    s = pool.stats()
    assert s["nobjs"] == 1 and s["nusing"] == 1


def test_kill_during_get_loses_nothing(client, procs):
    ctx = fork_ctx()
    pool = client.pool("churn", lambda i: i, max_size=3, min_size=0)
    tokens = client.token_pool("churn-t", 2)
    counter = ctx.RawValue("i", 0)  # no lock: a killed child would keep it forever
    rnd = random.Random(7)
    for _ in range(12):
        counter.value = 0
        p = ctx.Process(target=get_loop, args=(rnd.choice([pool, tokens]), counter))
        procs.append(p)
        p.start()
        wait_until(lambda: counter.value > 0, what="churn started")
        time.sleep(rnd.random() * 0.05)  # a random moment inside the churn: the point of the test
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
    wait_until(lambda: accounted(tokens, 2), what="tokens accounted")
    wait_until(lambda: pool.stats()["nusing"] == 0, what="objects back")
    assert pool.stats()["nobjs"] <= 3
    # and all of them can be taken at once
    objs = [pool.get(timeout=1) for _ in range(3)]
    toks = [tokens.get(timeout=1) for _ in range(2)]
    for o in objs:
        pool.ret(o)
    for t in toks:
        tokens.ret(t)


def test_holder_death_seen_by_psutil_when_socket_survives(client, procs):
    pool = client.pool("inh", lambda i: i, max_size=1)
    p, (holder_pid, keeper_pid) = start_ready(procs, hold_and_fork_keeper, pool)
    try:
        assert pool.stats()["nusing"] == 1
        os.kill(holder_pid, signal.SIGKILL)
        p.join(5)
        # The keeper still has the socket open: only the psutil scan can tell.
        assert psutil.pid_exists(keeper_pid)
        t0 = time.monotonic()
        assert pool.get(timeout=5) == 0
        assert time.monotonic() - t0 < 2.0
    finally:
        try:
            os.kill(keeper_pid, signal.SIGKILL)  # the grandchild this test started
        except ProcessLookupError:
            pass


def test_long_lease_killed_and_holder_terminated(client, procs):
    pool = client.pool("long", lambda i: i, max_size=1, max_using_delay_kill=0.3,
                       kill_holder=True)
    p, _ = start_ready(procs, hold_forever, pool)
    p.join(10)
    assert p.exitcode == -signal.SIGTERM  # terminated by the supervisor
    s = pool.stats()
    assert s["nkilled"] == 1 and s["nusing"] == 0
    assert pool.get(timeout=1) == 1  # a fresh object in the freed slot


def test_killed_lease_ret_is_ignored(client):
    pool = client.pool("kl", lambda i: i, max_size=1, max_using_delay_kill=0.2)
    obj = pool.get()
    wait_until(lambda: pool.stats()["nkilled"] == 1, what="lease killed")
    fresh = pool.get(timeout=1)
    pool.ret(obj)  # late return of the killed lease: warned and ignored
    s = pool.stats()
    assert s["nusing"] == 1 and s["nobjs"] == 1
    pool.ret(fresh)


def test_supervisor_killed_unblocks_every_call():
    srv = mppool.Server().start()
    try:
        c = mppool.connect(srv.address, srv.authkey)
        pool = c.token_pool("t", 1)
        pool.get()
        errors: list[BaseException] = []

        def blocked():
            try:
                pool.get()  # waits forever unless the supervisor dies
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=blocked) for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: pool.waiting() == 3, what="3 blocked getters")
        t0 = time.monotonic()
        os.kill(srv.pid, signal.SIGKILL)
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads), "a call hangs after supervisor death"
        assert time.monotonic() - t0 < 3
        assert len(errors) == 3 and all(isinstance(e, mppool.ServerUnavailable) for e in errors)
        with pytest.raises(mppool.ServerUnavailable):
            pool.get(timeout=0)
        with pytest.raises(mppool.ServerUnavailable):
            c.stats()
        c.close()
    finally:
        srv.shutdown()


def test_reused_pid_is_not_the_holder():
    me = current_holder()
    assert me.alive()
    impostor = Holder(me.pid, me.start - 100.0, me.host)
    assert not impostor.alive()
    assert not Holder(2**22 + 12345, 0.0, me.host).alive()
    assert Holder(me.pid, 0.0, "another-host").alive()  # not ours to judge


@pytest.mark.timeout(120)
def test_chaos_random_kills_lose_nothing(client, procs):
    """A dozen processes churn through a token pool and an object pool; others are
    SIGKILLed at random and replaced, for a bounded time. Afterwards every unit is
    accounted for and usable."""
    from workers import chaos_worker

    ctx = fork_ctx()
    tokens = client.token_pool("chaos-t", 4)
    objs = client.pool("chaos-o", lambda i: i, max_size=3, min_size=0)
    rnd = random.Random(1234)
    seconds = float(os.environ.get("MPPOOL_CHAOS_SECONDS", "8"))
    workers = []

    def spawn():
        w = ctx.Process(target=chaos_worker, args=([tokens, objs], rnd.randrange(1 << 30)))
        procs.append(w)
        w.start()
        workers.append(w)

    for _ in range(12):
        spawn()
    kills = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(rnd.random() * 0.1)  # random kill moments are the point of the test
        victim = workers.pop(rnd.randrange(len(workers)))
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(5)
        kills += 1
        spawn()
    cycles = tokens.stats()["nborrows"] + objs.stats()["nborrows"]
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
        w.join(5)
    wait_until(lambda: accounted(tokens, 4), timeout=10, what="tokens accounted")
    wait_until(lambda: objs.stats()["nusing"] == 0, timeout=10, what="objects back")
    assert objs.stats()["nobjs"] <= 3
    got_t = [tokens.get(timeout=1) for _ in range(4)]
    got_o = [objs.get(timeout=1) for _ in range(3)]
    for t in got_t:
        tokens.ret(t)
    for o in got_o:
        objs.ret(o)
    print(f"chaos: {kills} kills, {cycles} cycles, units lost 0")
    assert kills > 10 and cycles > 100


def _sqlite(i):
    import sqlite3

    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.execute("create table t (x int)")
    conn.commit()
    return conn


def test_proxy_object_of_dead_holder_is_rolled_back(client, procs):
    from workers import insert_uncommitted_then_hang

    pool = client.pool("sqlite", _sqlite, transfer="proxy", max_size=1)
    p, said = start_ready(procs, insert_uncommitted_then_hang, pool)
    assert said == 1  # the child saw its own uncommitted row
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    conn = pool.get(timeout=5)
    assert conn.execute("select count(*) from t").fetchone()[0] == 0  # rolled back
    assert pool.stats()["ncreated"] == 1  # the same connection, reused
    pool.ret(conn)


def test_proxy_object_whose_reset_fails_is_closed(client, procs):
    from workers import BadReset

    pool = client.pool("bad", BadReset, transfer="proxy", max_size=1)
    p, _ = start_ready(procs, hold_forever, pool)
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    obj = pool.get(timeout=5)
    assert obj.ident() == 1  # a new object: number 0 could not be reset and was closed
    s = pool.stats()
    assert s["ndestroys"] == 1 and s["ncreated"] == 2
    pool.ret(obj)


def test_holder_ignoring_sigterm_gets_sigkill(client, procs):
    from workers import hold_ignoring_sigterm

    pool = client.pool("stubborn", lambda i: i, max_size=1, max_using_delay_kill=0.2,
                       kill_holder=True)
    p, _ = start_ready(procs, hold_ignoring_sigterm, pool)
    p.join(10)  # SIGTERM is ignored; SIGKILL follows after the grace period (2 s)
    assert p.exitcode == -signal.SIGKILL


def test_slow_health_check_does_not_stall_other_pools(client):
    """Housekeeping runs as tasks on several workers: a pool whose health check blocks for
    seconds does not delay the lease kill of another pool."""
    from workers import slow_health

    client.pool("sick", lambda i: i, max_size=2, health=slow_health, delay=0.05)
    other = client.pool("busy", lambda i: i, max_size=1, max_using_delay_kill=0.3)
    other.get()
    t0 = time.monotonic()
    wait_until(lambda: other.stats()["nkilled"] == 1, timeout=2.5, what="the lease kill")
    assert time.monotonic() - t0 < 2.5  # well before the 3 s health check ends


class _Box:
    """A proxied object whose ``inner()`` is another proxied object (a cursor's stand-in)."""

    def __init__(self, i: int) -> None:
        self.i = i

    def inner(self) -> _Box:
        return _Box(self.i + 100)


def test_killed_lease_takes_its_sub_objects_with_it(client):
    """A proxied sub-object (a cursor) of a killed lease is refused from then on: it was
    usable for as long as the connection lived, on an object no longer its holder's."""
    pool = client.pool("kl-sub", _Box, transfer="proxy", max_size=1, max_using_delay_kill=0.2)
    box = pool.get()
    inner = box.inner()
    assert inner.i == 100
    wait_until(lambda: pool.stats()["nkilled"] == 1, what="lease killed")
    with pytest.raises(mppool.PoolClosed, match="killed, reclaimed or returned"):
        inner.i  # noqa: B018 - the read is the test
    with pytest.raises(mppool.PoolClosed):
        inner.inner()
