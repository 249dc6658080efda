"""Worker-side Prometheus metrics (mppool/poolmetrics.py): pools that live in worker processes
export their waits and sizes through prometheus_client's multiprocess mode, summed across
workers at scrape time; a dead worker's gauges go away; off, nothing changes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import free_port, wait_until

import mppool

pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

APP_DIR = Path(__file__).parent / "gunicorn_app"


def samples(text: str, pool: str) -> dict[str, float]:
    """{sample name: value} of one pool's series in a Prometheus exposition (no buckets)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("pool") == pool and "le" not in s.labels:
                out[s.name] = s.value
    return out


def scrape(directory: str, pool: str) -> dict[str, float]:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return samples(generate_latest(registry).decode(), pool)


# A worker: a pool of max_size 1 named "w", its one object held, one thread blocked in get().
WORKER = textwrap.dedent("""
    import sys, threading, time
    import mppool
    pool = mppool.Pool(lambda i: object(), max_size=1, min_size=0, name="w")
    held = pool.get()
    t = threading.Thread(target=lambda: pool.ret(pool.get()), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while pool.waiting() != 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    pool.ret(held)
    t.join(10)
    pool.shutdown()
""")


def start_worker(directory: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=directory)
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
@pytest.mark.kill
def test_waits_and_sizes_summed_across_processes_and_a_dead_ones_gauges_go(tmp_path):
    directory = str(tmp_path)
    a, b = start_worker(directory), start_worker(directory)
    try:
        s = scrape(directory, "w")
        assert s["mppool_pool_objects"] == 2  # one object in each worker
        assert s["mppool_pool_in_use"] == 2
        assert s["mppool_pool_idle"] == 0
        assert s["mppool_pool_waiting"] == 2  # one blocked get in each
        assert s["mppool_pool_max_size"] == 1  # livemax: the bound, not a sum
        assert s["mppool_acquire_wait_seconds_count"] == 2  # the held gets (the waiters wait)

        a.kill()  # SIGKILL: its atexit never runs; the parent says it is dead, as gunicorn's
        a.wait(10)  # child_exit hook does
        multiprocess.mark_process_dead(a.pid, directory)
        s = scrape(directory, "w")
        assert s["mppool_pool_objects"] == 1 and s["mppool_pool_waiting"] == 1
        assert s["mppool_acquire_wait_seconds_count"] == 2  # a running total stays

        assert b.stdin is not None
        b.stdin.close()  # a clean exit: its waiter is served, then it takes its gauges away
        assert b.wait(10) == 0
        s = scrape(directory, "w")
        assert s.get("mppool_pool_objects", 0) == 0 and s.get("mppool_pool_waiting", 0) == 0
        assert s["mppool_acquire_wait_seconds_count"] == 3  # b's waiter got its object
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()  # a worker this test started
                p.wait(5)
            for f in (p.stdin, p.stdout):
                if f is not None and not f.closed:
                    f.close()


def test_off_by_default_nothing_imported_nothing_wrapped():
    code = textwrap.dedent("""
        import sys, mppool
        p = mppool.Pool(lambda i: object(), max_size=1)
        p.ret(p.get())
        assert type(p) is mppool.Pool, type(p)
        assert "get" not in vars(p)
        assert "prometheus_client" not in sys.modules
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_supervisor_never_writes_to_the_workers_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with mppool.Server() as server, server.client() as client:
        pool = client.pool("shared", lambda i: i, max_size=1)
        pool.ret(pool.get())
        assert client.stats()["shared"]["nborrows"] == 1
        assert not [f for f in os.listdir(tmp_path) if str(server.pid) in f]
    assert scrape(str(tmp_path), "shared") == {}


@pytest.mark.gunicorn
@pytest.mark.slow
@pytest.mark.kill
@pytest.mark.timeout(120)
def test_gunicorn_workers_local_pools_scraped_summed_dead_worker_removed(tmp_path):
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    assert gunicorn, "gunicorn is a test dependency"
    port = free_port()
    prom = tmp_path / "prom"
    prom.mkdir()
    address = os.path.join(tempfile.mkdtemp(prefix="mpm"), "s.sock")
    env = dict(os.environ, MPPOOL_ADDRESS=address, PROMETHEUS_MULTIPROC_DIR=str(prom),
               PYTHONPATH=os.pathsep.join([str(APP_DIR), *sys.path]))
    env.pop("MPPOOL_AUTHKEY", None)
    with open(tmp_path / "gunicorn.log", "w") as log:
        proc = subprocess.Popen([gunicorn, "-c", str(APP_DIR / "gunicorn.conf.py"), "-w", "3",
                                 "-b", f"127.0.0.1:{port}", "metrics_app:app"],
                                cwd=APP_DIR, env=env, stdout=subprocess.DEVNULL, stderr=log)
    arbiter = psutil.Process(proc.pid)
    try:
        workers = wait_until(lambda: _workers(arbiter, 3), timeout=30, interval=0.05,
                             what="3 gunicorn workers")
        used: set[int] = set()
        nuses = 0

        def use_all() -> bool:
            nonlocal nuses
            r = _request(port, "/use")
            if r is not None:
                nuses += 1
                used.add(int(r))
            return used >= workers

        wait_until(use_all, timeout=60, interval=0.01, what="every worker to serve /use")
        s = samples(_request(port, "/metrics") or "", "local")
        assert s["mppool_pool_objects"] == 3  # one object kept idle in each worker's pool
        assert s["mppool_pool_idle"] == 3 and s["mppool_pool_in_use"] == 0
        assert s["mppool_pool_max_size"] == 2
        assert s["mppool_acquire_wait_seconds_count"] == nuses

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)  # a worker of the gunicorn this test started
        # child_exit (mppool.gunicorn) removes its live gauges; its replacement has no pool yet.
        wait_until(lambda: samples(_request(port, "/metrics") or "", "local")
                   .get("mppool_pool_objects") == 2, timeout=30, interval=0.05,
                   what="the dead worker's gauges to go")
        s = samples(_request(port, "/metrics") or "", "local")
        assert s["mppool_pool_idle"] == 2
        assert s["mppool_acquire_wait_seconds_count"] == nuses  # its gets still count
    finally:
        _stop(proc, arbiter)


def _workers(arbiter: psutil.Process, n: int) -> set[int] | None:
    # The supervisor is the arbiter's child too: workers are the gunicorn processes.
    pids = {p.pid for p in arbiter.children() if "gunicorn" in " ".join(p.cmdline())}
    return pids if len(pids) == n else None


def _request(port: int, path: str) -> str | None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.read().decode() if r.status == 200 else None
    except OSError:
        time.sleep(0.05)  # not bound yet, or a worker restarting
        return None
    finally:
        conn.close()


def _stop(proc: Any, arbiter: psutil.Process) -> None:
    children = arbiter.children(recursive=True) if arbiter.is_running() else []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:  # processes this test started, by pid
        p.kill()
    assert not alive, f"left running after gunicorn stopped: {[p.pid for p in alive]}"


# ---------------------------------------------------------------- psycopg_pool's counters

COUNTER_NAMES = ("requests_num", "requests_queued", "requests_wait_ms", "requests_errors",
                 "usage_ms", "connections_num", "connections_ms", "connections_errors",
                 "connections_lost", "returns_bad")


def run_in_worker(directory: str, code: str) -> str:
    """Run ``code`` in a new process exporting to ``directory``; what it printed last."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=directory)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def counters_of(directory: str, pool: str) -> dict[str, float]:
    s = scrape(directory, pool)
    return {k: s[f"mppool_pool_{k}_total"] for k in COUNTER_NAMES}


# Each worker: 3 uses, pop_stats() (the counters restart at 0 in stats), 2 uses, a use
# during which a get fails at once, that object returned broken: 7 requests, 1 error, 1
# creation, 1 bad return.
CORE_WORKER = """
    import mppool
    p = mppool.Pool(lambda i: object(), max_size=1, min_size=0, name="c")
    for _ in range(3):
        p.ret(p.get())
    assert p.pop_stats()["requests_num"] == 3
    for _ in range(2):
        p.ret(p.get())
    held = p.get()
    try:
        p.get(timeout=0)
    except mppool.TimeOut:
        pass
    p.ret(held, discard=True)
    s = p.stats()
    assert (s["requests_num"], s["returns_bad"]) == (4, 1), s
    p.shutdown()
    print("ok")
"""


@pytest.mark.slow
def test_core_counters_are_running_totals_through_pop_stats_summed_over_workers(tmp_path):
    directory = str(tmp_path)
    for _ in range(2):  # one after the other: a counter stays after its process ended
        assert run_in_worker(directory, CORE_WORKER) == "ok"
    c = counters_of(directory, "c")
    assert (c["requests_num"], c["requests_errors"]) == (14, 2), c
    assert (c["connections_num"], c["returns_bad"], c["connections_errors"]) == (2, 2, 0), c
    assert c["requests_queued"] == 0 and c["connections_lost"] == 0


@pytest.mark.slow
def test_raw_connection_pool_counters(tmp_path):
    label = run_in_worker(str(tmp_path), """
        import sqlite3
        from mppool import db_pool
        p = db_pool.RawConnectionPool(sqlite3, min_size=0, max_size=1, database=":memory:",
                                      check_same_thread=False)
        for _ in range(3):
            conn = p.get()
            conn.cursor().execute("select 1")
            p.put(conn)
        p.pop_stats()
        p.put(p.get())
        print(p._pool._name)  # the core pool's, "#<n>": the metrics' label
        p.close()
    """)
    c = counters_of(str(tmp_path), label)
    assert (c["requests_num"], c["connections_num"], c["requests_errors"]) == (4, 1, 0), c


@pytest.mark.slow
def test_aio_pool_counters_are_running_totals_through_pop_stats(tmp_path):
    assert run_in_worker(str(tmp_path), """
        import asyncio
        from mppool.aio import ConnectionPool, ConnectionStrategy

        class S(ConnectionStrategy):
            async def make_connection(self):
                return object()
            def connection_is_closed(self, conn):
                return False
            def close_connection(self, conn):
                pass

        async def main():
            pool = ConnectionPool(strategy=S(), max_size=1, name="a")
            assert type(pool).__mro__[1] is ConnectionPool  # the exporting subclass
            for _ in range(3):
                async with pool.get_connection():
                    pass
            assert pool.pop_stats()["requests_num"] == 3
            async with pool.get_connection():
                try:
                    async with asyncio.timeout(0.01):  # queued, then given up
                        async with pool.get_connection():
                            pass
                except TimeoutError:
                    pass
            await pool.close()

        asyncio.run(main())
        print("ok")
    """) == "ok"
    c = counters_of(str(tmp_path), "a")
    assert (c["requests_num"], c["requests_errors"], c["requests_queued"]) == (5, 1, 1), c
    assert c["connections_num"] == 1 and c["requests_wait_ms"] >= 10, c


@pytest.mark.slow
def test_queuepool_counters_are_running_totals_through_pop_stats(tmp_path):
    assert run_in_worker(str(tmp_path), """
        import mppool
        from mppool.queuepool import Pool, ResourceManager
        pool = Pool("q", 1)
        pool.put(ResourceManager("r"))
        for _ in range(3):
            pool.put(pool.take())
        assert pool.pop_stats()["requests_num"] == 3
        r = pool.take()
        try:
            pool.take(timeout=0)
        except mppool.TimeOut:
            pass
        pool.put(r)
        pool.close()
        print("ok")
    """) == "ok"
    c = counters_of(str(tmp_path), "q")
    assert (c["requests_num"], c["requests_errors"], c["connections_num"]) == (5, 1, 1), c


def test_aio_and_queuepool_off_by_default_nothing_imported_nothing_wrapped():
    code = textwrap.dedent("""
        import sys
        from mppool.aio import ConnectionPool, ConnectionStrategy
        from mppool.queuepool import Pool

        class S(ConnectionStrategy):
            async def make_connection(self):
                return object()
            def connection_is_closed(self, conn):
                return False
            def close_connection(self, conn):
                pass

        assert type(ConnectionPool(strategy=S(), max_size=1)) is ConnectionPool
        assert type(Pool("q", 1)) is Pool
        assert "prometheus_client" not in sys.modules
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def start_script(directory: str, code: str) -> subprocess.Popen[str]:
    """Start ``code`` exporting to ``directory``; returns once it printed "ready"."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=directory)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop_script(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    try:
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()  # a process this test started
            proc.wait(5)
        proc.stdout.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["core", "aio"])
def test_the_last_counts_are_written_without_further_calls(tmp_path, kind):
    """Counters are written at most every FLUSH_EVERY from the calls: gets in a burst leave
    their last counts to a deferred write (the scheduler's, or the event loop's), which
    comes while the pool sits unused and open."""
    code = {"core": """
        import sys
        import mppool
        p = mppool.Pool(lambda i: object(), max_size=1, min_size=0, name="burst")
        for _ in range(5):
            p.ret(p.get())
        print("ready", flush=True)
        sys.stdin.read()
        p.shutdown()
    """, "aio": """
        import asyncio, sys
        from mppool.aio import ConnectionPool, ConnectionStrategy

        class S(ConnectionStrategy):
            async def make_connection(self):
                return object()
            def connection_is_closed(self, conn):
                return False
            def close_connection(self, conn):
                pass

        async def main():
            pool = ConnectionPool(strategy=S(), max_size=1, name="burst")
            for _ in range(5):
                async with pool.get_connection():
                    pass
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            await pool.close()

        asyncio.run(main())
    """}[kind]
    directory = str(tmp_path)
    proc = start_script(directory, code)
    try:
        wait_until(lambda: scrape(directory, "burst").get("mppool_pool_requests_num_total") == 5,
                   timeout=10, what="the deferred write of the burst's counts")
    finally:
        stop_script(proc)
    assert scrape(directory, "burst")["mppool_pool_requests_num_total"] == 5


@pytest.mark.slow
def test_a_forked_child_adds_only_its_own_counts(tmp_path):
    """A pool carried across fork(): the parent's counts so far (written or still to write,
    by the parent) are not written again by the child, which writes only what it adds."""
    assert run_in_worker(str(tmp_path), """
        import os
        import mppool
        p = mppool.Pool(lambda i: object(), max_size=1, min_size=0, name="forked")
        for _ in range(3):
            p.ret(p.get())  # the first written at once, the others left to a deferred write
        pid = os.fork()
        if pid == 0:
            for _ in range(2):
                p.ret(p.get())
            p.shutdown()  # writes the child's counts at once
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        p.shutdown()
        print("ok")
    """) == "ok"
    c = counters_of(str(tmp_path), "forked")
    assert c["requests_num"] == 5, c  # 3 + 2, not 3 + 2 + what the parent had not written
