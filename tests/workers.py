"""Functions run in other processes by the cross-process tests (importable under spawn)."""

from __future__ import annotations

import os
import time
from typing import Any


def hold_forever(pool: Any, ready: Any, n: int = 1) -> None:
    """Take n objects, say so, then block until killed."""
    held = [pool.get() for _ in range(n)]
    ready.put((os.getpid(), [repr(h) for h in held]))
    while True:
        time.sleep(3600)


def wait_for_one(pool: Any, started: Any, results: Any, tag: Any, timeout: float | None = None,
                 seq: Any = None) -> None:
    """Wait for one object; ``seq`` (a shared counter) numbers the holders in the order they
    held it, since a Queue's feeder thread may deliver results out of that order."""
    started.put(tag)
    obj = pool.get(timeout=timeout)
    n = 0
    if seq is not None:
        with seq.get_lock():
            n = seq.value
            seq.value += 1
    results.put((n, tag, repr(obj)))
    pool.ret(obj)


def churn(pool: Any, max_size: int, inuse: Any, lock: Any, peak: Any, n: int, errors: Any) -> None:
    """n get/ret cycles; count concurrent holders across processes and record the peak."""
    try:
        for _ in range(n):
            obj = pool.get(timeout=30)
            with lock:
                inuse.value += 1
                peak.value = max(peak.value, inuse.value)
            with lock:
                inuse.value -= 1
            pool.ret(obj)
    except BaseException as exc:  # reported to the parent, which fails the test
        errors.put(f"{os.getpid()}: {exc!r}")


def task_use_pool(pool: Any) -> tuple[int, Any]:
    """A multiprocessing.Pool task: the shared pool arrives pickled and reconnects here."""
    with pool.obj(timeout=10) as obj:
        return os.getpid(), obj


def chaos_worker(pools: list[Any], seed: int) -> None:
    import random

    rnd = random.Random(seed)
    while True:
        pool = rnd.choice(pools)
        try:
            obj = pool.get(timeout=rnd.choice([0, 0.01, 0.2, None]))
        except Exception:
            continue
        if rnd.random() < 0.5:
            time.sleep(rnd.random() * 0.005)
        pool.ret(obj)


def hold_and_fork_keeper(pool: Any, ready: Any) -> None:
    """Hold an object, then fork a child that keeps this process's sockets open and
    outlives it: the supervisor must notice the holder's death by psutil, not by EOF."""
    pool.get()
    pid = os.fork()
    if pid == 0:  # the keeper: inherits the lease socket and just sleeps
        time.sleep(30)
        os._exit(0)
    ready.put((os.getpid(), pid))
    while True:
        time.sleep(3600)


def get_loop(pool: Any, counter: Any) -> None:
    """Endless get/ret, counting cycles; killed at a random moment by the test."""
    while True:
        obj = pool.get(timeout=10)
        with counter.get_lock():
            counter.value += 1
        pool.ret(obj)


def insert_uncommitted_then_hang(pool: Any, ready: Any) -> None:
    """Open a transaction on a proxied DB connection and die in the middle of it."""
    conn = pool.get()
    conn.execute("insert into t values (42)")  # no commit
    ready.put(conn.execute("select count(*) from t").fetchone()[0])
    while True:
        time.sleep(3600)


class BadReset:
    """A pooled object whose reset fails: the supervisor must close it, not reuse it."""

    def __init__(self, i: int) -> None:
        self.i = i

    def rollback(self) -> None:
        raise RuntimeError("cannot roll back")

    def ident(self) -> int:
        return self.i


def budget_user(address: Any, authkey: bytes, n: int, hold: float, out: Any) -> None:
    """A process with its own local pool drawing on a shared budget of tokens."""
    import mppool

    client = mppool.connect(address, authkey)
    budget = client.token_pool("budget")
    pool = mppool.Pool(lambda i: object(), max_size=4, min_size=0, budget=budget)
    t0 = time.monotonic()
    for _ in range(n):
        with pool.obj(timeout=30):
            time.sleep(hold)
    out.put((os.getpid(), time.monotonic() - t0, pool.stats()["ncreated"]))
    pool.shutdown()
    client.close()


def autostart_connect(address: str, out: Any) -> None:
    import mppool

    client = mppool.connect(address, autostart=True, timeout=20)
    out.put(client.info()["pid"])
    client.close()
