"""Budgets: process-local objects under a cross-process cap."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import fork_ctx, wait_until
from workers import budget_user

import mppool

pytestmark = pytest.mark.slow


def test_budget_caps_local_objects_across_processes(server, client, procs):
    budget = client.token_pool("budget", 2)
    ctx = fork_ctx()
    out = ctx.Queue()
    peak = 0
    for _ in range(4):
        p = ctx.Process(target=budget_user, args=(server.address, server.authkey, 30, 0.002, out))
        procs.append(p)
        p.start()
    while any(p.is_alive() for p in procs):
        s = budget.stats()
        peak = max(peak, s["nusing"])  # every live object anywhere holds one token
        assert s["nusing"] <= 2
        time.sleep(0.002)  # sampling period of the observer, not a wait for a result
    results = [out.get(timeout=10) for _ in range(4)]
    assert all(p.exitcode == 0 for p in procs)
    assert len(results) == 4 and peak >= 1
    wait_until(lambda: budget.free() == 2, what="every token back once the processes ended")


def test_idle_pool_gives_its_tokens_back_to_a_waiting_process(server, client, procs):
    budget = client.token_pool("budget", 2)
    idle = mppool.Pool(lambda i: f"conn{i}", max_size=2, min_size=0, budget=budget)
    a, b = idle.get(), idle.get()
    idle.ret(a)
    idle.ret(b)  # two idle objects holding the whole budget
    assert budget.free() == 0 and len(idle) == 2
    busy = mppool.Pool(lambda i: f"other{i}", max_size=2, min_size=0, budget=budget)
    t0 = time.monotonic()
    got = busy.get(timeout=5)  # blocks on the budget until the idle pool gives one back
    latency = time.monotonic() - t0
    assert got == "other0"
    assert latency < 0.5, latency  # the promise is 100 ms; slack for a loaded CI machine
    assert idle.stats()["nrecalled"] >= 1 and len(idle) <= 1
    busy.ret(got)
    idle.shutdown()
    busy.shutdown()
    wait_until(lambda: budget.free() == 2, what="tokens back after shutdown")


def test_busy_process_keeps_its_object_a_bounded_moment_then_gives_it_back(server, client):
    """A process using its object back to back is not starved of it by the first waiter
    (the object is not closed at the first return), nor does it starve the waiter: it gives
    the object back at a return within the recall patience."""
    budget = client.token_pool("budget", 1)
    pool = mppool.Pool(lambda i: i, max_size=1, min_size=0, budget=budget)
    pool.ret(pool.get())  # holds the only token
    other = mppool.Pool(lambda i: i, max_size=1, min_size=0, budget=budget)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(other.get(timeout=10)))
    t.start()
    wait_until(lambda: budget.waiting() == 1, what="the other pool waits for the budget")
    uses, deadline = 0, time.monotonic() + 10
    while len(pool) == 1 and time.monotonic() < deadline:
        try:
            obj = pool.get(timeout=0)  # busy: never idle at a recall round for long
        except mppool.TimeOut:
            break  # recalled between the len() above and this get: the token went on
        pool.ret(obj)
        uses += 1
    t.join(10)
    assert result == [0], "the waiter was starved"
    assert uses > 1, "closed at the first return: no patience"
    s = pool.stats()
    assert len(pool) == 0 and s["ncreated"] == 1 and s["nrecalled"] == 1
    other.shutdown()
    pool.shutdown()


def test_common_path_makes_no_round_trip(server, client):
    budget = client.token_pool("budget", 2)
    pool = mppool.Pool(lambda i: i, max_size=2, min_size=1, budget=budget)
    sent = []
    chan = client._channel()
    orig_request, orig_post = chan.request, chan.post

    def counting_request(rid, frame, *a):
        sent.append(frame[4])  # the payload's first byte: its kind
        return orig_request(rid, frame, *a)

    def counting_post(frame):
        sent.append(frame[4])
        return orig_post(frame)

    chan.request, chan.post = counting_request, counting_post
    try:
        for _ in range(200):
            pool.ret(pool.get())
    finally:
        chan.request, chan.post = orig_request, orig_post
    # only the background recall poll (a pickled Waiting request) may talk to the
    # supervisor, never get/ret (struct frames b"G" and b"P")
    assert not {b"G"[0], b"P"[0]} & set(sent), sent
    pool.shutdown()


def test_budget_token_returned_when_fun_fails(server, client):
    budget = client.token_pool("budget", 1)

    def fun(i):
        raise OSError("database down")

    pool = mppool.Pool(fun, max_size=1, min_size=0, budget=budget)
    with pytest.raises(OSError, match="database down"):
        pool.get()
    assert budget.free() == 1
    pool.shutdown()


def test_min_size_fill_never_blocks_on_an_exhausted_budget(server, client):
    budget = client.token_pool("budget", 1)
    hog = budget.get()  # the whole budget is out
    t0 = time.monotonic()
    pool = mppool.Pool(lambda i: i, max_size=2, min_size=1, budget=budget)
    assert time.monotonic() - t0 < 2  # construction did not wait for a token
    assert len(pool) == 0  # the fill is retried by housekeeping, not waited for
    budget.put(hog)
    assert pool.get(timeout=5) == 0
    pool.shutdown()


def test_get_timeout_bounds_the_wait_for_a_budget_token(server, client):
    budget = client.token_pool("budget", 1)
    hog = budget.get()
    pool = mppool.Pool(lambda i: i, max_size=2, min_size=0, budget=budget)
    with pytest.raises(mppool.TimeOut):
        pool.get(timeout=0)
    t0 = time.monotonic()
    with pytest.raises(mppool.TimeOut):
        pool.get(timeout=0.2)
    assert time.monotonic() - t0 < 2
    assert pool.stats()["ncreating"] == 0  # the reserved slot was given back
    budget.put(hog)
    assert pool.get(timeout=5) == 0
    pool.shutdown()


def test_a_dropped_pool_gives_its_budget_tokens_back(server, client):
    """Scheduled tasks hold a pool weakly: a budgeted pool dropped without shutdown() is
    finalized and its idle objects' tokens go back (they were kept for the process's life)."""
    import gc

    budget = client.token_pool("budget", 2)
    pool = mppool.Pool(lambda i: i, max_size=2, min_size=2, budget=budget)
    assert budget.free() == 0
    del pool
    gc.collect()
    wait_until(lambda: budget.free() == 2, what="the dropped pool's tokens back")


def test_pool_inherited_through_fork_starts_empty_and_keeps_housekeeping():
    import os as _os

    pool = mppool.Pool(lambda i: (_os.getpid(), i), max_size=3, min_size=2, delay=0.05)
    assert len(pool) == 2
    pid = _os.fork()
    if pid == 0:
        code = 1
        try:
            if len(pool) == 0:  # the parent's objects are not ours
                obj = pool.get(timeout=2)
                rounds = pool.stats()["hk_rounds"]
                deadline = time.monotonic() + 5
                while pool.stats()["hk_rounds"] <= rounds and time.monotonic() < deadline:
                    time.sleep(0.01)  # housekeeping runs on threads of this process
                if obj[0] == _os.getpid() and pool.stats()["hk_rounds"] > rounds:
                    code = 0
        finally:
            _os._exit(code)
    _, status = _os.waitpid(pid, 0)
    assert _os.waitstatus_to_exitcode(status) == 0
    assert len(pool) == 2  # the parent's pool is untouched
    pool.shutdown()
