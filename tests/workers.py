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
    """Endless get/ret, counting cycles; killed at a random moment by the test.

    ``counter`` is a lock-free RawValue: a process SIGKILLed while holding a
    multiprocessing lock never releases it, and the test would hang reading the count.
    """
    while True:
        obj = pool.get(timeout=10)
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


# ------------------------------------------------------------------ db_pool: fake DB-API modules
# Module-like objects (anything with connect() is a db_module). They live here so that the
# supervisor can unpickle them by reference when a TpooledConnectionPool ships one there.

DUMMY_CLOSED: list[Any] = []  # DummyConnections closed in this process, in order


class DummyConnection:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.closed = False
        self.rollbacks = 0

    def rollback(self) -> None:
        self.rollbacks += 1

    def commit(self) -> None:
        pass

    def cursor(self) -> Any:
        return None

    def close(self) -> None:
        self.closed = True
        DUMMY_CLOSED.append(self)


class DummyDBModule:
    def connect(self, *args: Any, **kwargs: Any) -> DummyConnection:
        return DummyConnection(*args, **kwargs)


class RaisingDBModule:
    def connect(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cannot connect")


class SlowDBModule:
    """connect() hangs while the file ``flag`` exists: a database that stopped answering."""

    def connect(self, flag: str, **kwargs: Any) -> DummyConnection:
        deadline = time.monotonic() + 30
        while os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.005)
        return DummyConnection(flag=flag, **kwargs)


# ------------------------------------------------------------------ db_pool: PostgreSQL workers


def hammer_threads(step: Any, n: int, nthreads: int, errors: Any) -> None:
    """Run ``step()`` n times in each of nthreads threads; any error goes to the parent
    through ``errors`` (which fails the test)."""
    import threading

    def work() -> None:
        try:
            for _ in range(n):
                step()
        except BaseException as exc:
            errors.put(f"{os.getpid()}: {exc!r}")

    threads = [threading.Thread(target=work) for _ in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def pg_raw_hammer(budget: Any, dsn: str, app: str, n: int, nthreads: int, errors: Any) -> None:
    """A process with its own RawConnectionPool on a shared budget, used by several threads."""

    import psycopg

    from mppool.db_pool import RawConnectionPool

    pool = RawConnectionPool(psycopg, max_size=2, budget=budget, conninfo=dsn,
                             application_name=app)

    def step() -> None:
        conn = pool.get(timeout=60)
        try:
            conn.execute("select pg_sleep(0.005)").fetchall()
        finally:
            conn.close()

    hammer_threads(step, n, nthreads, errors)
    pool.shutdown()


def pg_tpooled_hammer(address: Any, authkey: bytes, dsn: str, app: str, n: int, nthreads: int,
                      errors: Any) -> None:
    """A process using the shared TpooledConnectionPool through proxies, from several threads."""

    import psycopg

    import mppool
    from mppool.db_pool import TpooledConnectionPool

    client = mppool.connect(address, authkey)
    pool = TpooledConnectionPool(psycopg, max_size=2, client=client, conninfo=dsn,
                                 application_name=app, share=app)

    def step() -> None:
        with pool.item(timeout=60) as conn:
            conn.execute("select pg_sleep(0.005)").fetchall()

    hammer_threads(step, n, nthreads, errors)
    client.close()


def pg_insert_then_hang(pool: Any, table: str, ready: Any) -> None:
    """Open a transaction on a shared connection, say which backend it is, and hang."""
    conn = pool.get()
    conn.execute(f"insert into {table} values (42)")  # no commit
    ready.put(conn.execute("select pg_backend_pid()").fetchone()[0])
    while True:
        time.sleep(3600)


# --- batch-job patterns (docs/batch.md) -------------------------------------------------

_batch_pool: Any = None


def batch_init(address: str, authkey: str) -> None:
    """An initializer: connect once per worker process, keep the shared pool in a global."""
    global _batch_pool
    import mppool

    _batch_pool = mppool.connect(address, authkey).token_pool("batch")


def batch_task(i: int) -> tuple[int, int]:
    with _batch_pool.obj(timeout=30):
        return os.getpid(), i * i


def batch_task_with_pool(args: tuple[Any, int]) -> tuple[int, int]:
    pool, i = args
    with pool.obj(timeout=30):
        return os.getpid(), i * i


def hold_ignoring_sigterm(pool: Any, ready: Any) -> None:
    """Hold an object and ignore SIGTERM: kill_holder must escalate to SIGKILL."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pool.get()
    ready.put(os.getpid())
    while True:
        time.sleep(3600)


def slow_health(obj: Any) -> bool:
    time.sleep(3)
    return True


def unpicklable_on_second_get(obj: Any) -> None:
    """A getter hook after which the object no longer pickles (the second time it runs)."""
    obj.append(1)
    if len(obj) >= 2:
        obj.append(x for x in ())  # a generator: cannot be pickled


def slow_make(i: int) -> int:
    """A fun that takes its time, like a connect to a slow database."""
    time.sleep(1.0)
    return i


# ------------------------------------------------------------- chaos with supervisor restarts

CHAOS_TOKENS, CHAOS_OBJS = 3, 2


def chaos_obj(i: int) -> dict[str, int]:
    """``fun`` of the chaos object pool: distinct objects, told apart in stats by their repr."""
    return {"obj": i}


def chaos_pools(client: Any) -> list[Any]:
    """The chaos run's two pools, created with the same options by every process."""
    return [client.token_pool("chaos-t", CHAOS_TOKENS),
            client.pool("chaos-o", chaos_obj, max_size=CHAOS_OBJS, min_size=0)]


def chaos_restart_worker(address: str, authkey: bytes, slot: int, cycles: Any, manual: Any,
                         odd: Any, errfile: str, seed: int) -> None:
    """Loop get / hold a little / ret over the chaos pools, through supervisor restarts.

    Counts in shared arrays, at ``slot``: completed cycles; ``manual``: times this process had
    to make a new client by hand because the one it had did not reconnect to a supervisor
    that a fresh connection could reach; ``odd``: errors other than TimeOut and
    ServerUnavailable (the last one is written to ``errfile``).
    """
    import random

    import mppool

    rnd = random.Random(seed)
    client: Any = None
    pools: list[Any] = []
    failing_since: float | None = None
    while True:
        try:
            if client is None:
                fresh_client = mppool.connect(address, authkey, timeout=2)
                try:
                    pools = chaos_pools(fresh_client)  # may fail: the supervisor just died
                except BaseException:
                    fresh_client.close()
                    raise
                client = fresh_client
            pool = rnd.choice(pools)
            obj = pool.get(timeout=rnd.choice([0.05, 0.3, 1.0]))
            if rnd.random() < 0.7:
                time.sleep(rnd.random() * 0.02)  # hold it a little
            pool.ret(obj)
            cycles[slot] += 1
            failing_since = None
        except mppool.TimeOut:
            failing_since = None
        except mppool.ServerUnavailable:
            now = time.monotonic()
            if failing_since is None:
                failing_since = now
            elif client is not None and now - failing_since > 1.0:
                # Down for a second: is it the supervisor, or our client that did not reconnect?
                try:
                    fresh = mppool.connect(address, authkey, timeout=1)
                except mppool.ServerUnavailable:
                    pass  # still down: keep trying with the client we have
                else:
                    try:  # a supervisor is up: our own client must work again now
                        client.info()
                        pools[0].waiting()
                    except mppool.ServerUnavailable as again:
                        manual[slot] += 1
                        with open(errfile, "w") as f:
                            f.write(f"client did not reconnect: {again}"[:2000])
                        try:
                            client.close()
                        except Exception:
                            pass
                        client, pools = fresh, chaos_pools(fresh)
                    else:
                        fresh.close()
                    failing_since = None
            time.sleep(0.02)  # the supervisor is down: do not spin
        except Exception as exc:  # reported to the parent through odd and errfile
            odd[slot] += 1
            with open(errfile, "w") as f:
                f.write(f"{type(exc).__name__}: {exc}"[:2000])
            time.sleep(0.02)


class LoggedCursor:
    """A cursor that writes "made N" and "closed N" to a file: a test in another process
    sees when the supervisor made and closed it (closing on garbage collection too)."""

    def __init__(self, log: str, n: int, returns: str) -> None:
        self.log, self.n, self.returns = log, n, returns
        self.closed = False
        self.rows: list[tuple[Any, ...]] = []
        self._write(f"made {n}")

    def _write(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def execute(self, sql: str, params: Any = None) -> Any:
        if self.closed:
            raise RuntimeError("cursor already closed")
        if sql == "fail":
            raise ValueError("bad query")
        self.rows = [(sql, params)]
        return self if self.returns == "self" else 1 if self.returns == "count" else None

    def executemany(self, sql: str, seq: Any) -> Any:
        self.rows = [(sql, p) for p in seq]
        return None

    def fetchone(self) -> Any:
        return self.rows.pop(0) if self.rows else None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(f"closed {self.n}")

    def __del__(self) -> None:
        self.close()


class LoggedConnection(DummyConnection):
    def __init__(self, log: str, returns: str = "self") -> None:
        super().__init__(log)
        self.log, self.returns = log, returns
        self.made = 0

    def cursor(self, *args: Any, **kwargs: Any) -> LoggedCursor:
        self.made += 1
        return LoggedCursor(self.log, self.made, self.returns)


class CursorLogDB:
    """A DB module whose connections' cursors log to the file named by connect(log=...)."""

    def connect(self, log: str, returns: str = "self") -> LoggedConnection:
        return LoggedConnection(log, returns)


class GateCursor(LoggedCursor):
    """A LoggedCursor whose ``execute("gate", path)`` hangs until the file ``path`` exists
    (at most 10 s: a query the database is slow to answer), and whose ``execute("opaque")``
    returns an object that does not pickle (``"plain-opaque"``: one that looks like data)."""

    closed = True  # until __init__ ran: a cursor whose __init__ raised has nothing to close

    def execute(self, sql: str, params: Any = None) -> Any:
        if sql == "gate":
            self._write(f"waiting {self.n}")
            deadline = time.monotonic() + 10
            while not os.path.exists(params) and time.monotonic() < deadline:
                time.sleep(0.005)
            self._write(f"released {self.n}")
        if sql == "opaque":
            self.rows = [(sql, params)]
            return lambda: None  # not plain data, and no pickle takes it
        if sql == "plain-opaque":
            # Looks like plain data (an exception in a tuple) but does not pickle either.
            return (ValueError(lambda: None),)
        return super().execute(sql, params)


class GateConnection(LoggedConnection):
    def cursor(self, fail: bool = False) -> GateCursor:
        if fail:
            raise RuntimeError("cursor() refused")
        self.made += 1
        return GateCursor(self.log, self.made, self.returns)


class GateDB:
    """CursorLogDB whose cursors can hang in execute, return what does not pickle, and whose
    ``cursor(fail=True)`` raises."""

    def connect(self, log: str, returns: str = "self") -> GateConnection:
        return GateConnection(log, returns)
