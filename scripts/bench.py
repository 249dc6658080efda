"""Benchmarks: mppool against its peers, all measured in the same run (issue #6).

    python scripts/bench.py [--quick] [--reps 3] [--seconds 1.0] [--out bench-results]

What is measured, each cell for a fixed duration (or a fixed cycle count), the repetitions
interleaved (for rep: for config: for peer, the peer order rotated every rep) and reported
as medians over the reps:

- lease cycles (get + put) through a server, N = 1, 2, 4, 8 worker processes and a budget
  of C = N and C = N/2 units: mppool's supervisor (a token pool) against the stdlib
  ``SyncManager().BoundedSemaphore(C)`` and, when Redis answers, a Redis semaphore (a list
  of C tokens, BLPOP/RPUSH, under a fresh key per cell); mppool's fast path
  (``token_pool(..., fast=True)``, leases in shared memory),
  C ``filelock`` lock files, and
  the in-kernel floor, a process-shared POSIX (futex) semaphore;
- in-process get + ret: ``mppool.Pool`` against ProxyPatternPool's ``Pool``, queuepool's
  ``Pool`` and SQLAlchemy's ``QueuePool`` (when installed), and ``mppool.Pool`` with a shared
  budget whose token it already holds (min_size=1);
- supervisor CPU per lease (psutil cpu_times of the supervisor around a fixed number of
  cycles), against the stdlib manager's server process;
- reclaim latency after SIGKILL (scripts/reclaim_latency.py's ``measure``);
- supervisor memory with 256 connected clients (8 processes x 32 clients);
- connection churn under a budget against per-process pools, TpooledConnectionPool and
  PgBouncer, on the local PostgreSQL (scripts/bench_churn.py's ``run``; skipped with a
  message when PostgreSQL does not answer, its PgBouncer column when pgbouncer is not
  installed; ``--no-churn`` leaves it out).
- cluster pools, when Redis answers (scripts/bench_cluster.py's ``run``): lease cycles
  through two supervisors against a Redis semaphore used directly, and the time for a dead
  host's units to come back.

Workers are forked (multiprocessing 'fork' context), warm up, then wait on a barrier so they
start together; each records every cycle's latency with ``time.perf_counter_ns`` and sends a
sample back. Results go to ``<out>/bench.json`` and ``<out>/bench.png`` (a full run also
copies the plot to docs/img/bench.png). Goals are printed PASS/FAIL; the exit status is 0
whatever they say, non-zero only if the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import psutil

import mppool

ROOT = Path(__file__).resolve().parents[1]
CTX = multiprocessing.get_context("fork")

NS = (1, 2, 4, 8)
# mppool-fast: a token pool with fast=True (leases in shared memory, mppool.fastpath);
# filelock: C lock files (the filelock package), tried in turn, then waited on one;
# futex-sem: a process-shared POSIX semaphore (sem_t in shared memory, futex-based): the
# in-kernel floor, which gives nothing back when a holder dies.
SERVER_PEERS = ("mppool", "mppool-fast", "stdlib", "redis", "filelock", "futex-sem")
INPROC_PEERS = ("mppool.Pool", "mppool.Pool+budget", "ProxyPatternPool", "queuepool",
                "sqlalchemy.QueuePool")
INPROC_SIZE = 4  # max_size of every in-process pool (one thread uses one object)
SAMPLE = 20_000  # latencies each worker sends back at most (evenly strided)
BARRIER_TIMEOUT = 60.0
MEM_PROCS, MEM_CLIENTS = 8, 32
LEASE_WARMUP, INPROC_WARMUP = 200, 2_000

Acquire = Callable[[], Any]
Release = Callable[[Any], Any]
Close = Callable[[], Any]


# ------------------------------------------------------------------------------ peers


class _Obj:
    """A pooled object: hashable (ProxyPatternPool keys its bookkeeping by object)."""

    __slots__ = ("i",)

    def __init__(self, i: int = 0) -> None:
        self.i = i

    def close(self) -> None:
        pass

    def rollback(self) -> None:
        pass


def _make_obj(i: int) -> _Obj:
    return _Obj(i)


def _sa_creator() -> Any:
    return _Obj()


def _noop() -> None:
    pass


def _open_peer(kind: str, spec: dict[str, Any]) -> tuple[Acquire, Release, Close]:
    """Open one peer in a worker: (acquire, release, close)."""
    if kind in ("mppool", "mppool-fast"):
        client = mppool.connect(spec["address"], spec["authkey"])
        tokens = client.token_pool(spec["name"], spec["size"], fast=kind == "mppool-fast")
        return tokens.get, tokens.put, client.close
    if kind == "stdlib":
        sem = spec["sem"]  # a SyncManager proxy inherited through fork: reconnects here

        def acquire() -> None:
            sem.acquire()

        def release(_: Any) -> None:
            sem.release()

        return acquire, release, _noop
    if kind == "redis":
        import redis

        r = redis.Redis.from_url(spec["url"])
        key = spec["key"]

        def blpop() -> Any:
            return r.blpop([key], timeout=0)[1]  # type: ignore[index]

        def rpush(token: Any) -> None:
            r.rpush(key, token)

        return blpop, rpush, r.close
    if kind == "filelock":
        from filelock import FileLock, Timeout

        locks = [FileLock(path) for path in spec["paths"]]
        mine = locks[os.getpid() % len(locks)]

        def take_file() -> Any:
            for lock in locks:
                try:
                    lock.acquire(timeout=0)
                    return lock
                except Timeout:
                    continue
            mine.acquire()
            return mine

        def release_file(lock: Any) -> None:
            lock.release()

        return take_file, release_file, _noop
    if kind == "futex-sem":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        sem = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(spec["mem"])))
        sem_wait, sem_post = libc.sem_wait, libc.sem_post

        def down() -> None:
            sem_wait(sem)

        def up(_: Any) -> None:
            sem_post(sem)

        return down, up, _noop
    if kind == "mppool.Pool":
        pool = mppool.Pool(_make_obj, max_size=INPROC_SIZE, min_size=1)
        return pool.get, pool.ret, pool.shutdown
    if kind == "mppool.Pool+budget":
        client = mppool.connect(spec["address"], spec["authkey"])
        budget = client.token_pool(spec["name"], spec["size"])
        # min_size=1: the object is made (and draws its token) now, and keeps it.
        bpool = mppool.Pool(_make_obj, max_size=INPROC_SIZE, min_size=1, budget=budget)

        def close_budget() -> None:
            bpool.shutdown()
            client.close()

        return bpool.get, bpool.ret, close_budget
    if kind == "ProxyPatternPool":
        from ProxyPatternPool import Pool as PPPool

        ppool = PPPool(_make_obj, max_size=INPROC_SIZE, min_size=1)
        return ppool.get, ppool.ret, ppool.shutdown
    if kind == "queuepool":
        import queuepool

        # No recycling limits: the cycle itself is measured, not reopening resources.
        qpool = queuepool.Pool("bench", INPROC_SIZE, maxIdleTime=None, maxOpenTime=None,
                               maxUsageCount=None)
        for i in range(INPROC_SIZE):
            qpool.put(queuepool.ResourceManager(f"r{i}"))
        return qpool.take, qpool.put, _noop
    if kind == "sqlalchemy.QueuePool":
        from sqlalchemy.pool import QueuePool

        sapool = QueuePool(_sa_creator, pool_size=INPROC_SIZE, max_overflow=0, reset_on_return=None)

        def checkin(conn: Any) -> None:
            conn.close()

        return sapool.connect, checkin, sapool.dispose
    raise ValueError(f"unknown peer {kind!r}")


# ------------------------------------------------------------------------------ workers


def _cycle_worker(kind: str, spec: dict[str, Any], barrier: Any, seconds: float, cycles: int,
                  warmup: int, out: Any) -> None:
    """Run get+put cycles after the start barrier; send (count, start, end, latency sample)."""
    try:
        acquire, release, close = _open_peer(kind, spec)
    except BaseException as exc:
        barrier.abort()
        out.put(("error", os.getpid(), f"{kind}: setup failed: {exc!r}"))
        return
    try:
        for _ in range(warmup):
            release(acquire())
        barrier.wait(BARRIER_TIMEOUT)
        lat: list[int] = []
        append = lat.append
        now = time.perf_counter_ns
        t0 = prev = now()
        if cycles:
            for _ in range(cycles):
                release(acquire())
                t = now()
                append(t - prev)
                prev = t
        else:
            end = t0 + int(seconds * 1e9)
            while prev < end:
                release(acquire())
                t = now()
                append(t - prev)
                prev = t
        step = max(1, len(lat) // SAMPLE)
        out.put(("ok", os.getpid(), len(lat), t0, prev, lat[::step]))
    except BaseException as exc:
        barrier.abort()
        out.put(("error", os.getpid(), f"{kind}: {exc!r}"))
    finally:
        try:
            close()
        except Exception:
            pass


def _memory_worker(address: Any, authkey: bytes, clients: int, threaded: bool, ready: Any,
                   release: Any) -> None:
    """Open ``clients`` clients (each with its lease channel), report, hold them until released.

    ``threaded``: one thread per client, so each has its own control connection too, as
    separate worker processes would; else all clients of this process share one thread.
    """
    made: list[mppool.Client] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    done = threading.Semaphore(0)

    def open_one() -> None:
        try:
            client = mppool.connect(address, authkey, timeout=30.0)
            tokens = client.token_pool("mem", 8)
            tokens.put(tokens.get(timeout=30.0))
            with lock:
                made.append(client)
        except Exception as exc:
            with lock:
                errors.append(repr(exc))

    def hold() -> None:
        open_one()
        done.release()
        stop.wait()

    threads: list[threading.Thread] = []
    if threaded:
        for _ in range(clients):
            t = threading.Thread(target=hold, daemon=True)
            t.start()
            threads.append(t)
        for _ in range(clients):
            done.acquire(timeout=120)
    else:
        for _ in range(clients):
            open_one()
    ready.put((os.getpid(), len(made), errors[:3]))
    release.wait(120)
    for client in made:
        client.close()
    stop.set()
    for t in threads:
        t.join(10)


# ------------------------------------------------------------------------------ harness


@dataclass
class Harness:
    """Starts worker processes and makes sure every one of them is gone afterwards."""

    procs: list[Any] = field(default_factory=list)

    def start(self, target: Callable[..., None], args: tuple[Any, ...]) -> Any:
        p = CTX.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def reap(self, procs: Iterable[Any], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()  # only a process this harness started, by its pid
                p.join(5)
            if p in self.procs:
                self.procs.remove(p)

    def reap_all(self) -> None:
        self.reap(list(self.procs), timeout=5.0)


def _cpu(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _collect(out: Any, procs: list[Any], n: int, timeout: float) -> list[tuple[Any, ...]]:
    """n results from the workers; fail fast when one reports an error or dies silently."""
    results: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout
    while len(results) < n:
        try:
            msg = out.get(timeout=0.2)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers gave {len(results)} of {n} results in {timeout:.0f} s"
                                   ) from None
            dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead and out.empty():
                raise RuntimeError(f"worker pid {dead[0].pid} died (exit code {dead[0].exitcode})"
                                   ) from None
            continue
        if msg[0] == "error":
            raise RuntimeError(f"worker pid {msg[1]} failed: {msg[2]}")
        results.append(msg)
    return results


def _pct(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0  # -> us


def run_cell(h: Harness, kind: str, spec: dict[str, Any], n: int, *, seconds: float = 0.0,
             cycles: int = 0, warmup: int = LEASE_WARMUP, cpu_pid: int | None = None
             ) -> dict[str, Any]:
    """One cell: n workers of one peer, started together; throughput, p50/p99, server CPU."""
    barrier = CTX.Barrier(n + 1)
    out = CTX.Queue()
    procs = [h.start(_cycle_worker, (kind, spec, barrier, seconds, cycles // n if cycles else 0,
                                     warmup, out)) for _ in range(n)]
    try:
        try:
            barrier.wait(BARRIER_TIMEOUT)
        except threading.BrokenBarrierError:
            _collect(out, procs, n, 10.0)  # raises with the worker's error
            raise RuntimeError(f"{kind}: start barrier broken") from None
        cpu0 = _cpu(cpu_pid)
        results = _collect(out, procs, n, (seconds or 120.0) + 120.0)
        cpu1 = _cpu(cpu_pid)
    finally:
        h.reap(procs)
        out.close()
    total = sum(r[2] for r in results)
    wall = (max(r[4] for r in results) - min(r[3] for r in results)) / 1e9
    lat = sorted(x for r in results for x in r[5])
    return {"peer": kind, "n": n, "cycles": total, "wall_s": wall, "rate": total / wall,
            "p50_us": _pct(lat, 0.50), "p99_us": _pct(lat, 0.99),
            "server_cpu_us_per_cycle": (cpu1 - cpu0) / total * 1e6 if cpu_pid else None}


# ------------------------------------------------------------------------------ sections


@dataclass
class Peers:
    server: mppool.Server
    client: mppool.Client
    manager: SyncManager
    redis_url: str | None
    notes: list[str]

    def spec(self, kind: str, size: int) -> tuple[dict[str, Any], Callable[[], None]]:
        """A fresh primitive of ``size`` units for one cell, and how to dispose of it."""
        if kind in ("mppool", "mppool-fast", "mppool.Pool+budget"):
            name = f"bench-{uuid.uuid4().hex[:12]}"
            tokens = self.client.token_pool(name, size)
            spec = {"address": self.server.address, "authkey": self.server.authkey,
                    "name": name, "size": size}
            return spec, tokens.shutdown
        if kind == "stdlib":
            sem = self.manager.BoundedSemaphore(size)
            return {"sem": sem}, _noop
        if kind == "filelock":
            tmp = tempfile.mkdtemp(prefix="mppool-bench-")
            paths = [os.path.join(tmp, f"unit-{i}.lock") for i in range(size)]
            return {"paths": paths}, lambda: shutil.rmtree(tmp, ignore_errors=True)
        if kind == "futex-sem":
            import ctypes
            import mmap

            mem = mmap.mmap(-1, 64)  # shared with the forked workers
            libc = ctypes.CDLL(None, use_errno=True)
            libc.sem_init(ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(mem))), 1, size)
            return {"mem": mem}, _noop
        if kind == "redis":
            import redis

            key = f"mppool-bench:{uuid.uuid4().hex}"
            r = redis.Redis.from_url(self.redis_url or "")
            r.delete(key)
            r.rpush(key, *[str(i).encode() for i in range(size)])

            def drop() -> None:
                r.delete(key)
                r.close()

            return {"url": self.redis_url, "key": key}, drop
        return {}, _noop

    def cpu_pid(self, kind: str) -> int | None:
        if kind in ("mppool", "mppool-fast"):
            return self.server.pid
        if kind == "stdlib":
            return self.manager._process.pid  # type: ignore[attr-defined]
        return None


def lease_configs() -> list[tuple[int, int]]:
    return [(n, c) for n in NS for c in sorted({n, max(1, n // 2)}, reverse=True)]


def _rotate(items: list[str], k: int) -> list[str]:
    k %= len(items)
    return items[k:] + items[:k]


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_reps(h: Harness, peers: Peers, reps: int, seconds: float, cpu_cycles: int
             ) -> dict[str, list[dict[str, Any]]]:
    server_peers = [p for p in SERVER_PEERS if p != "redis" or peers.redis_url]
    inproc_peers = [p for p in INPROC_PEERS if _available(p)]
    for p in INPROC_PEERS:
        if p not in inproc_peers:
            peers.notes.append(f"{p}: not installed, skipped")
    cells: dict[str, list[dict[str, Any]]] = {"lease": [], "inproc": [], "cpu": []}
    for rep in range(reps):
        t_rep = time.monotonic()
        for n, c in lease_configs():
            for kind in _rotate(server_peers, rep + n + c):
                spec, dispose = peers.spec(kind, c)
                try:
                    cell = run_cell(h, kind, spec, n, seconds=seconds, cpu_pid=peers.cpu_pid(kind))
                finally:
                    dispose()
                cell.update(rep=rep, c=c)
                cells["lease"].append(cell)
        for kind in _rotate(inproc_peers, rep):
            spec, dispose = peers.spec(kind, INPROC_SIZE)
            try:
                cell = run_cell(h, kind, spec, 1, seconds=seconds, warmup=INPROC_WARMUP)
            finally:
                dispose()
            cell.update(rep=rep, c=INPROC_SIZE)
            cells["inproc"].append(cell)
        for n in (1, 8):
            for kind in _rotate(["mppool", "mppool-fast", "stdlib"], rep + n):
                spec, dispose = peers.spec(kind, n)
                try:
                    cell = run_cell(h, kind, spec, n, cycles=cpu_cycles, cpu_pid=peers.cpu_pid(kind))
                finally:
                    dispose()
                cell.update(rep=rep, c=n)
                cells["cpu"].append(cell)
        _say(f"  rep {rep + 1}/{reps} done in {time.monotonic() - t_rep:.1f} s")
    return cells


def _available(kind: str) -> bool:
    module = {"ProxyPatternPool": "ProxyPatternPool", "queuepool": "queuepool",
              "sqlalchemy.QueuePool": "sqlalchemy"}.get(kind)
    return module is None or importlib.util.find_spec(module) is not None


def measure_memory(h: Harness, threaded: bool) -> dict[str, Any]:
    """Supervisor RSS before and with MEM_PROCS x MEM_CLIENTS connected clients."""
    with mppool.Server() as srv:
        sup = psutil.Process(srv.pid)
        with mppool.connect(srv.address, srv.authkey) as client:
            tokens = client.token_pool("mem", 8)
            tokens.put(tokens.get())
            client.stats()  # waits until the put is handled
            before = sup.memory_info().rss
            threads0, fds0 = sup.num_threads(), sup.num_fds()
            ready, release = CTX.Queue(), CTX.Event()
            procs = [h.start(_memory_worker, (srv.address, srv.authkey, MEM_CLIENTS, threaded,
                                              ready, release)) for _ in range(MEM_PROCS)]
            try:
                got = _collect(ready, procs, MEM_PROCS, 180.0)
                opened = sum(g[1] for g in got)
                errors = [e for g in got for e in g[2]]
                during = sup.memory_info().rss
                threads1, fds1 = sup.num_threads(), sup.num_fds()
            finally:
                release.set()
                h.reap(procs, timeout=30.0)
                ready.close()
            deadline = time.monotonic() + 5.0
            while sup.num_fds() > fds0 and time.monotonic() < deadline:
                time.sleep(0.05)  # the supervisor notices the closed connections
            after = sup.memory_info().rss
    clients = MEM_PROCS * MEM_CLIENTS
    return {"clients": clients, "opened": opened, "errors": errors,
            "layout": f"{MEM_PROCS} processes x {MEM_CLIENTS} clients"
                      + (" (one thread each)" if threaded else " (one thread per process)"),
            "rss_before_mib": before / 2**20, "rss_with_clients_mib": during / 2**20,
            "rss_after_leave_mib": after / 2**20,
            "per_client_kib": (during - before) / max(1, opened) / 1024,
            "threads_before": threads0, "threads_with_clients": threads1,
            "fds_before": fds0, "fds_with_clients": fds1}


def _load_script(name: str) -> Any:
    """A sibling script of this one, imported as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure_reclaim(kills: int) -> dict[str, Any]:
    mod = _load_script("reclaim_latency")
    # The supervisor it starts inherits our stderr and logs one warning per reclaim, which is
    # the expected outcome here: keep those out of the report, pass anything else through.
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            res: dict[str, Any] = mod.measure(kills)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        lines = log.read().splitlines()
    # The warnings the kills cause on purpose: "... whose holder (pid N) went away without closing".
    other = [line for line in lines if "went away without closing" not in line]
    for line in other:
        print(line, file=sys.stderr)
    res["supervisor_reclaim_warnings"] = len(lines) - len(other)
    return res


def _bench_cluster() -> Any:
    path = Path(__file__).with_name("bench_cluster.py")
    spec = importlib.util.spec_from_file_location("bench_cluster", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure_cluster(redis_url: str, quick: bool, reps: int) -> dict[str, Any]:
    """Cluster pools against a Redis semaphore; the supervisors' log lines (reclaims and
    lapsed leases, expected here) are kept out of the report."""
    mod = _bench_cluster()
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            res: dict[str, Any] = mod.run(redis_url, quick, reps=reps)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    res["report"] = mod.report(res)
    return res


def idle_cpu(pid: int | None, seconds: float) -> float:
    """The supervisor's CPU use while nobody uses it, in percent of one core."""
    c0, t0 = _cpu(pid), time.monotonic()
    time.sleep(seconds)  # a measuring window, not a wait for some state
    return (_cpu(pid) - c0) / (time.monotonic() - t0) * 100


def redis_url_if_up(url: str, notes: list[str]) -> str | None:
    try:
        import redis
    except ImportError:
        notes.append("redis: redis-py not installed, Redis semaphore skipped")
        return None
    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        r.ping()
        r.close()
        return url
    except Exception as exc:
        notes.append(f"redis: {url} unreachable ({exc.__class__.__name__}), Redis semaphore skipped")
        return None


# ------------------------------------------------------------------------------ summary


def _median(xs: Iterable[float]) -> float:
    vals = [x for x in xs if x is not None and x == x]
    return statistics.median(vals) if vals else float("nan")


def summarize(cells: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(tuple(cell[k] for k in keys), []).append(cell)
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for key, group in groups.items():
        rates = [g["rate"] for g in group]
        out[key] = {**dict(zip(keys, key, strict=True)), "reps": len(group),
                    "rate": _median(rates), "rate_min": min(rates), "rate_max": max(rates),
                    "p50_us": _median(g["p50_us"] for g in group),
                    "p99_us": _median(g["p99_us"] for g in group),
                    "server_cpu_us_per_cycle": _median(g["server_cpu_us_per_cycle"] for g in group
                                                       if g["server_cpu_us_per_cycle"] is not None)}
    return out


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not b or a != a or b != b:
        return float("nan")
    return a / b


@dataclass
class Goal:
    name: str
    value: float
    target: str
    ok: bool


def evaluate(lease: dict[tuple[Any, ...], dict[str, Any]], inproc: dict[tuple[Any, ...], dict[str, Any]],
             cpu: dict[tuple[Any, ...], dict[str, Any]], reclaim: dict[str, Any]) -> list[Goal]:
    def get(table: dict[tuple[Any, ...], dict[str, Any]], key: tuple[Any, ...], what: str) -> float:
        row = table.get(key)
        return float("nan") if row is None else row[what]

    goals: list[Goal] = []
    for c in (8, 4):
        r = _ratio(get(lease, (8, c, "mppool"), "rate"), get(lease, (8, c, "stdlib"), "rate"))
        goals.append(Goal(f"lease cycles/s, N=8 C={c}: mppool vs stdlib SyncManager", r,
                          ">= 2.00x", r >= 2.0))
    for c in (8, 4):
        r = _ratio(get(lease, (8, c, "mppool"), "p99_us"), get(lease, (8, c, "stdlib"), "p99_us"))
        goals.append(Goal(f"p99 latency, N=8 C={c}: mppool vs stdlib SyncManager", r,
                          "< 1.00x", r < 1.0))
    r = _ratio(get(lease, (1, 1, "mppool"), "rate"), get(lease, (1, 1, "stdlib"), "rate"))
    goals.append(Goal("lease cycles/s, N=1: mppool vs stdlib SyncManager", r, ">= 1.00x", r >= 1.0))
    base = get(inproc, ("ProxyPatternPool",), "rate")
    r = _ratio(get(inproc, ("mppool.Pool",), "rate"), base)
    goals.append(Goal("in-process get+ret/s: mppool.Pool vs ProxyPatternPool", r, ">= 1.00x", r >= 1.0))
    r = _ratio(get(inproc, ("mppool.Pool+budget",), "rate"), base)
    goals.append(Goal("get+ret/s with a held shared-budget token: mppool.Pool vs ProxyPatternPool",
                      r, ">= 0.80x", r >= 0.8))
    v = get(cpu, (8, "mppool"), "server_cpu_us_per_cycle")
    goals.append(Goal("supervisor CPU per lease, N=8 (us)", v, "<= 10 us", v <= 10.0))
    # The fast path (opt-in, token_pool(fast=True)): the goals of its issue.
    r = _ratio(get(lease, (8, 8, "mppool-fast"), "rate"), get(lease, (8, 8, "stdlib"), "rate"))
    goals.append(Goal("fast path lease cycles/s, N=8 C=8 vs stdlib SyncManager", r, ">= 10.00x",
                      r >= 10.0))
    v = get(lease, (1, 1, "mppool-fast"), "p50_us")
    goals.append(Goal("fast path p50 per cycle, N=1 (us)", v, "<= 5 us", v <= 5.0))
    v = get(lease, (8, 8, "mppool-fast"), "p99_us")
    goals.append(Goal("fast path p99 per cycle, N=8 C=8 uncontended (us)", v, "<= 50 us", v <= 50.0))
    for n in (2, 4, 8):
        r = _ratio(get(lease, (n, n // 2, "mppool-fast"), "rate"),
                   get(lease, (n, n // 2, "mppool"), "rate"))
        goals.append(Goal(f"fast path contended N={n} C={n // 2} vs the supervisor path", r,
                          ">= 1.00x", r >= 1.0))
    v = get(cpu, (8, "mppool-fast"), "server_cpu_us_per_cycle")
    goals.append(Goal("supervisor CPU per fast-path lease, N=8 (us)", v, "~0 (<= 1 us)", v <= 1.0))
    v = reclaim.get("max_ms", float("nan"))
    goals.append(Goal("reclaim after SIGKILL, max over kills (ms, target)", v, "< 100 ms",
                      v < 100.0))
    return goals


# ------------------------------------------------------------------------------ output


def _k(x: float) -> str:
    return "-" if x != x else f"{x / 1000:.1f}"


def _f(x: float, nd: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def _x(x: float) -> str:
    return "-" if x != x else f"{x:.2f}x"


def print_tables(res: dict[str, Any], lease: dict[tuple[Any, ...], dict[str, Any]],
                 inproc: dict[tuple[Any, ...], dict[str, Any]], cpu: dict[tuple[Any, ...], dict[str, Any]],
                 goals: list[Goal]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(180, shutil.get_terminal_size((180, 40)).columns))
    meta = res["meta"]
    peers = [p for p in SERVER_PEERS if any(k[2] == p for k in lease)]

    t = Table(title=f"Lease cycles (get+put) through a server — medians of {meta['reps']} reps x "
                    f"{meta['seconds']} s; p50/p99 per cycle; CPU = server process per lease")
    t.add_column("N", justify="right")
    t.add_column("C", justify="right")
    for p in peers:
        t.add_column(f"{p} k/s", justify="right")
    for p in peers[1:]:
        t.add_column(f"x {p}", justify="right")
    t.add_column("p50 us " + " / ".join(peers), justify="right")
    t.add_column("p99 us " + " / ".join(peers), justify="right")
    t.add_column("p99 x stdlib", justify="right")
    t.add_column("CPU us mppool / stdlib", justify="right")
    fast = "mppool-fast" in peers
    if fast:
        t.add_column("fast x mppool", justify="right")
    for n, c in lease_configs():
        rows = {p: lease.get((n, c, p)) for p in peers}
        rate = {p: (rows[p] or {}).get("rate", float("nan")) for p in peers}
        p50 = " / ".join(_f((rows[p] or {}).get("p50_us", float("nan"))) for p in peers)
        p99 = " / ".join(_f((rows[p] or {}).get("p99_us", float("nan"))) for p in peers)
        p99x = _ratio((rows["mppool"] or {}).get("p99_us"), (rows["stdlib"] or {}).get("p99_us"))
        cpus = " / ".join(_f((rows[p] or {}).get("server_cpu_us_per_cycle", float("nan")))
                          for p in ("mppool", "stdlib"))
        extra = [_x(_ratio(rate["mppool-fast"], rate["mppool"]))] if fast else []
        t.add_row(str(n), str(c), *[_k(rate[p]) for p in peers],
                  *[_x(_ratio(rate["mppool"], rate[p])) for p in peers[1:]], p50, p99, _x(p99x), cpus,
                  *extra)
    console.print(t)

    t = Table(title="In-process get+ret, one thread (max_size=4, min_size=1) — medians")
    for col in ("pool", "k cycles/s", "p50 us", "p99 us", "x ProxyPatternPool"):
        t.add_column(col, justify="left" if col == "pool" else "right")
    base = inproc.get(("ProxyPatternPool",), {}).get("rate", float("nan"))
    for p in INPROC_PEERS:
        row = inproc.get((p,))
        if row is None:
            continue
        t.add_row(p, _k(row["rate"]), _f(row["p50_us"], 2), _f(row["p99_us"], 2),
                  _x(_ratio(row["rate"], base)))
    console.print(t)

    t = Table(title="Supervisor")
    t.add_column("measure")
    t.add_column("mppool", justify="right")
    t.add_column("peer", justify="right")
    t.add_column("ratio", justify="right")
    for n in (1, 8):
        m = cpu.get((n, "mppool"), {}).get("server_cpu_us_per_cycle", float("nan"))
        s = cpu.get((n, "stdlib"), {}).get("server_cpu_us_per_cycle", float("nan"))
        t.add_row(f"server CPU per lease, N={n}, {meta['cpu_cycles']} cycles (us)", _f(m, 2),
                  f"stdlib manager {_f(s, 2)}", _x(_ratio(m, s)))
        f = cpu.get((n, "mppool-fast"), {}).get("server_cpu_us_per_cycle")
        if f is not None:
            t.add_row(f"server CPU per fast-path lease, N={n} (us)", _f(f, 2), "", "")
    t.add_row("supervisor idle CPU (% of a core)", _f(res["idle_cpu_percent"], 2), "", "")
    rec = res["reclaim"]
    if rec:
        t.add_row(f"reclaim after SIGKILL, {rec['kills']} kills: p50 / p90 / max (ms)",
                  f"{rec['p50_ms']:.2f} / {rec['p90_ms']:.2f} / {rec['max_ms']:.2f}",
                  "stdlib / Redis: never (unit lost)", "")
    for mem in res["memory"]:
        t.add_row(f"RSS, {mem['clients']} clients: {mem['layout']} (MiB)",
                  f"{mem['rss_before_mib']:.1f} -> {mem['rss_with_clients_mib']:.1f} "
                  f"(after they leave {mem['rss_after_leave_mib']:.1f})", "", "")
        t.add_row("  per client (KiB); supervisor threads; fds",
                  f"{mem['per_client_kib']:.1f}; {mem['threads_before']} -> "
                  f"{mem['threads_with_clients']}; {mem['fds_before']} -> {mem['fds_with_clients']}",
                  "", "")
    console.print(t)

    t = Table(title="Goals (issue #6)")
    t.add_column("goal")
    t.add_column("measured", justify="right")
    t.add_column("target", justify="right")
    t.add_column("", justify="center")
    for g in goals:
        value = (_x(g.value) if g.target.endswith("x") else _f(g.value, 2))
        t.add_row(g.name, value, g.target, "[green]PASS[/]" if g.ok else "[red]FAIL[/]")
    console.print(t)
    for g in goals:
        print(f"{'PASS' if g.ok else 'FAIL'}: {g.name}: {g.value:.3g} (target {g.target})")
    for note in res["notes"]:
        print(f"note: {note}")


def plot(res: dict[str, Any], lease: dict[tuple[Any, ...], dict[str, Any]],
         inproc: dict[tuple[Any, ...], dict[str, Any]], cpu: dict[tuple[Any, ...], dict[str, Any]],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mppool": "tab:blue", "mppool-fast": "tab:green", "stdlib": "tab:orange",
              "redis": "tab:red", "filelock": "tab:brown", "futex-sem": "tab:gray"}
    labels = {"mppool": "mppool supervisor", "mppool-fast": "mppool fast path (shared memory)",
              "filelock": "filelock (C lock files)", "futex-sem": "futex semaphore (floor)",
              "stdlib": "stdlib SyncManager semaphore",
              "redis": "Redis list semaphore"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 10), layout="constrained")
    ax_rate, ax_p99, ax_in, ax_cpu = axes.flat
    for p in SERVER_PEERS:
        for half in (False, True):
            pts = [(n, lease[(n, c, p)]) for n, c in lease_configs() if (n, c, p) in lease
                   and (c == n) != half and (not half or n > 1)]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            style = dict(color=colors[p], linestyle="--" if half else "-",
                         marker="s" if half else "o",
                         label=f"{labels[p]}, C={'N/2' if half else 'N'}")
            rate = [r["rate"] / 1000 for _, r in pts]
            err = [[(r["rate"] - r["rate_min"]) / 1000 for _, r in pts],
                   [(r["rate_max"] - r["rate"]) / 1000 for _, r in pts]]
            ax_rate.errorbar(xs, rate, yerr=err, capsize=3, **style)
            ax_p99.plot(xs, [r["p99_us"] for _, r in pts], **style)
    for ax, title, ylabel in ((ax_rate, "Lease cycles through a server (get+put); bars: min-max of reps",
                               "k cycles/s"),
                              (ax_p99, "p99 latency per cycle", "µs (log scale)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(NS), [str(n) for n in NS])
        ax.set_xlabel("worker processes N")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_p99.set_yscale("log")
    ax_rate.set_ylim(bottom=0)
    handles, names_ = ax_p99.get_legend_handles_labels()
    fig.legend(handles, names_, loc="outside lower center", ncol=3, fontsize=8)

    names = [p for p in INPROC_PEERS if (p,) in inproc]
    rates = [inproc[(p,)]["rate"] / 1000 for p in names]
    bars = ax_in.barh(names, rates, color=["tab:blue" if p.startswith("mppool") else "tab:gray"
                                           for p in names])
    for bar, p in zip(bars, names, strict=True):
        ax_in.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                   f" {bar.get_width():.0f}k/s, p99 {inproc[(p,)]['p99_us']:.1f} µs",
                   va="center", fontsize=8)
    ax_in.invert_yaxis()
    ax_in.set_xlabel("k get+ret cycles/s (one thread)")
    ax_in.set_title("In-process pools")
    ax_in.set_xlim(0, max(rates, default=1) * 1.45)

    groups = [(f"N={n}", [cpu.get((n, p), {}).get("server_cpu_us_per_cycle", float("nan"))
                          for p in ("mppool", "stdlib")]) for n in (1, 8)]
    width = 0.35
    for i, p in enumerate(("mppool", "stdlib")):
        vals = [g[1][i] for g in groups]
        xpos = [j + (i - 0.5) * width for j in range(len(groups))]
        ax_cpu.bar(xpos, vals, width, color=colors[p], label=labels[p] + " server")
        for x, v in zip(xpos, vals, strict=True):
            ax_cpu.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax_cpu.axhline(10.0, color="black", linestyle=":", label="goal: 10 µs")
    ax_cpu.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax_cpu.set_ylabel("server CPU µs per lease")
    ax_cpu.set_title(f"Server CPU per lease ({res['meta']['cpu_cycles']} cycles)")
    ax_cpu.legend(fontsize=7, loc="upper left")
    top = max((v for g in groups for v in g[1] if v == v), default=10.0)
    ax_cpu.set_ylim(0, max(top, 10.0) * 1.45)
    lines = []
    rec = res["reclaim"]
    if rec:
        lines.append(f"reclaim after SIGKILL: p50 {rec['p50_ms']:.1f} ms, max {rec['max_ms']:.1f} ms")
    for mem in res["memory"][:1]:
        lines.append(f"{mem['clients']} clients: RSS {mem['rss_before_mib']:.0f} -> "
                     f"{mem['rss_with_clients_mib']:.0f} MiB ({mem['per_client_kib']:.0f} KiB/client)")
    if lines:
        ax_cpu.text(0.98, 0.97, "\n".join(lines), transform=ax_cpu.transAxes, ha="right", va="top",
                    fontsize=8, bbox=dict(facecolor="white", alpha=0.9, edgecolor="0.8"))
    meta = res["meta"]
    fig.suptitle(f"mppool benchmarks — {meta['date'][:16]}, {meta['cpus']} CPUs, Python "
                 f"{meta['python']}, medians of {meta['reps']} reps x {meta['seconds']} s")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("mppool", "multiprocess", "ProxyPatternPool", "queuepool", "SQLAlchemy", "redis",
                 "psutil", "matplotlib", "asyncio-connection-pool"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _keyed(table: dict[tuple[Any, ...], dict[str, Any]]) -> list[dict[str, Any]]:
    return list(table.values())


# ------------------------------------------------------------------------------ async section
#
# (a) lease cycles (get + put on a token pool) through the supervisor from N processes, each
#     running C concurrent asyncio tasks on one mppool.aio client, against the blocking client
#     doing the same with C threads; (b) in-process get_connection cycles of
#     mppool.aio.ConnectionPool against asyncio_connection_pool.ConnectionPool, same strategy.

ASYNC_NS = (1, 8)  # worker processes
ASYNC_CS = (1, 8)  # concurrent tasks (or threads) per process
ASYNC_PEERS = ("mppool.aio", "mppool sync")
ACP_PEERS = ("mppool.aio.ConnectionPool", "asyncio_connection_pool")
ACP_TASKS = (1, 16)
ACP_SIZE = 4  # max_size of both connection pools
ACP_WARMUP = 2_000


async def _aio_lease_loop(spec: dict[str, Any], barrier: Any, seconds: float, tasks: int,
                          warmup: int) -> tuple[int, int, int, list[int]]:
    import asyncio

    import mppool.aio

    client = await mppool.aio.connect(spec["address"], spec["authkey"])
    try:
        tokens = await client.token_pool(spec["name"], spec["size"])
        for _ in range(warmup):
            await tokens.put(await tokens.get())
        barrier.wait(BARRIER_TIMEOUT)  # blocks the loop, before anything is measured
        lat: list[int] = []
        now = time.perf_counter_ns
        t0 = now()
        end = t0 + int(seconds * 1e9)
        ends: list[int] = []

        async def one() -> None:
            get, put, append = tokens.get, tokens.put, lat.append
            prev = now()
            while prev < end:
                await put(await get())
                t = now()
                append(t - prev)
                prev = t
            ends.append(prev)

        await asyncio.gather(*(one() for _ in range(tasks)))
        return len(lat), t0, max(ends), lat
    finally:
        await client.close()


def _sync_lease_loop(spec: dict[str, Any], barrier: Any, seconds: float, tasks: int,
                     warmup: int) -> tuple[int, int, int, list[int]]:
    client = mppool.connect(spec["address"], spec["authkey"])
    try:
        # fast=False: the asyncio client has no shared-memory fast path, so the sync peer
        # goes through the supervisor too (the same round trip, measured side by side).
        tokens = client.token_pool(spec["name"], spec["size"], fast=False)
        for _ in range(warmup):
            tokens.put(tokens.get())
        barrier.wait(BARRIER_TIMEOUT)
        now = time.perf_counter_ns
        t0 = now()
        end = t0 + int(seconds * 1e9)
        lats: list[list[int]] = []
        ends: list[int] = []
        errors: list[BaseException] = []

        def one() -> None:
            lat: list[int] = []
            get, put, append = tokens.get, tokens.put, lat.append
            try:
                prev = now()
                while prev < end:
                    put(get())
                    t = now()
                    append(t - prev)
                    prev = t
                ends.append(prev)
            except BaseException as exc:
                errors.append(exc)
            lats.append(lat)

        threads = [threading.Thread(target=one) for _ in range(tasks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        lat = [x for chunk in lats for x in chunk]
        return len(lat), t0, max(ends), lat
    finally:
        client.close()


def _async_lease_worker(kind: str, spec: dict[str, Any], barrier: Any, seconds: float, tasks: int,
                        warmup: int, out: Any) -> None:
    """One process of an async-section cell: C tasks (or threads) of get+put cycles."""
    import asyncio

    try:
        if kind == "mppool.aio":
            count, t0, t1, lat = asyncio.run(_aio_lease_loop(spec, barrier, seconds, tasks, warmup))
        else:
            count, t0, t1, lat = _sync_lease_loop(spec, barrier, seconds, tasks, warmup)
        step = max(1, len(lat) // SAMPLE)
        out.put(("ok", os.getpid(), count, t0, t1, lat[::step]))
    except BaseException as exc:
        barrier.abort()
        out.put(("error", os.getpid(), f"{kind}: {exc!r}"))


def run_async_lease_cell(h: Harness, kind: str, spec: dict[str, Any], n: int, tasks: int,
                         seconds: float) -> dict[str, Any]:
    barrier = CTX.Barrier(n + 1)
    out = CTX.Queue()
    procs = [h.start(_async_lease_worker, (kind, spec, barrier, seconds, tasks, LEASE_WARMUP, out))
             for _ in range(n)]
    try:
        try:
            barrier.wait(BARRIER_TIMEOUT)
        except threading.BrokenBarrierError:
            _collect(out, procs, n, 10.0)  # raises with the worker's error
            raise RuntimeError(f"{kind}: start barrier broken") from None
        results = _collect(out, procs, n, seconds + 120.0)
    finally:
        h.reap(procs)
        out.close()
    total = sum(r[2] for r in results)
    wall = (max(r[4] for r in results) - min(r[3] for r in results)) / 1e9
    lat = sorted(x for r in results for x in r[5])
    return {"peer": kind, "n": n, "tasks": tasks, "cycles": total, "wall_s": wall,
            "rate": total / wall, "p50_us": _pct(lat, 0.50), "p99_us": _pct(lat, 0.99),
            "server_cpu_us_per_cycle": None}


class _Conn:
    """A "connection" for the connection-pool cell: a plain object."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


def _acp_strategy(base: type) -> Any:
    """The same trivial strategy, subclassing each library's own ConnectionStrategy."""

    class Trivial(base):  # type: ignore[misc, valid-type]
        async def make_connection(self) -> _Conn:
            return _Conn()

        def connection_is_closed(self, conn: _Conn) -> bool:
            return conn.closed

        async def close_connection(self, conn: _Conn) -> None:
            conn.closed = True

    return Trivial()


async def _acp_loop(kind: str, tasks: int, seconds: float) -> dict[str, Any]:
    import asyncio

    if kind == "asyncio_connection_pool":
        import asyncio_connection_pool as acp

        pool: Any = acp.ConnectionPool(strategy=_acp_strategy(acp.ConnectionStrategy), max_size=ACP_SIZE)
    else:
        import mppool.aio

        pool = mppool.aio.ConnectionPool(strategy=_acp_strategy(mppool.aio.ConnectionStrategy),
                                         max_size=ACP_SIZE)
    now = time.perf_counter_ns
    sleep = asyncio.sleep

    async def cycles(lat: list[int] | None, end: int, count: int) -> None:
        # One yield inside the block, as a query would: with more tasks than connections
        # the waiting path is exercised too.
        prev = now()
        i = 0
        while (prev < end) if end else (i < count):
            async with pool.get_connection():
                await sleep(0)
            t = now()
            if lat is not None:
                lat.append(t - prev)
            prev = t
            i += 1

    await asyncio.gather(*(cycles(None, 0, ACP_WARMUP // tasks) for _ in range(tasks)))
    lat: list[int] = []
    t0 = now()
    end = t0 + int(seconds * 1e9)
    await asyncio.gather(*(cycles(lat, end, 0) for _ in range(tasks)))
    wall = (now() - t0) / 1e9
    if kind != "asyncio_connection_pool":
        await pool.close()
    lat.sort()
    return {"peer": kind, "n": 1, "tasks": tasks, "cycles": len(lat), "wall_s": wall,
            "rate": len(lat) / wall, "p50_us": _pct(lat, 0.50), "p99_us": _pct(lat, 0.99),
            "server_cpu_us_per_cycle": None}


def run_acp_cell(kind: str, tasks: int, seconds: float) -> dict[str, Any]:
    """In this process, in a fresh event loop (asyncio-connection-pool binds the loop at
    construction, so its pool is built inside it)."""
    import asyncio

    return asyncio.run(_acp_loop(kind, tasks, seconds))


def run_async_section(h: Harness, server: mppool.Server, client: mppool.Client, reps: int,
                      seconds: float, notes: list[str]) -> dict[str, Any]:
    acp_peers = list(ACP_PEERS)
    if importlib.util.find_spec("asyncio_connection_pool") is None:
        acp_peers = []
        msg = ("asyncio-connection-pool is not installed (pip install -e '.[bench]'): "
               "the in-process ConnectionPool comparison is skipped")
        notes.append(msg)
        _say(f"  async: {msg}")
    cells: dict[str, list[dict[str, Any]]] = {"lease": [], "conn_pool": []}
    for rep in range(reps):
        t_rep = time.monotonic()
        for n in ASYNC_NS:
            for c in ASYNC_CS:
                for kind in _rotate(list(ASYNC_PEERS), rep + n + c):
                    name = f"bench-async-{uuid.uuid4().hex[:12]}"
                    size = n * c  # a token for every task: the round trip is measured
                    tokens = client.token_pool(name, size)
                    spec = {"address": server.address, "authkey": server.authkey, "name": name,
                            "size": size}
                    try:
                        cell = run_async_lease_cell(h, kind, spec, n, c, seconds)
                    finally:
                        tokens.shutdown()
                    cell.update(rep=rep, c=c)
                    cells["lease"].append(cell)
        for tasks in ACP_TASKS:
            for kind in (_rotate(acp_peers, rep + tasks) if acp_peers else []):
                cell = run_acp_cell(kind, tasks, seconds)
                cell.update(rep=rep, c=ACP_SIZE)
                cells["conn_pool"].append(cell)
        _say(f"  async rep {rep + 1}/{reps} done in {time.monotonic() - t_rep:.1f} s")
    lease = summarize(cells["lease"], ("n", "tasks", "peer"))
    conn_pool = summarize(cells["conn_pool"], ("tasks", "peer"))
    ratios: dict[str, float] = {}
    for n in ASYNC_NS:
        for c in ASYNC_CS:
            a, s = lease.get((n, c, "mppool.aio"), {}), lease.get((n, c, "mppool sync"), {})
            ratios[f"lease N={n} C={c}: rate async/sync"] = _ratio(a.get("rate"), s.get("rate"))
            ratios[f"lease N={n} C={c}: p99 async/sync"] = _ratio(a.get("p99_us"), s.get("p99_us"))
    for tasks in ACP_TASKS:
        m = conn_pool.get((tasks, "mppool.aio.ConnectionPool"), {})
        p = conn_pool.get((tasks, "asyncio_connection_pool"), {})
        if m and p:
            ratios[f"ConnectionPool {tasks} task(s): rate mppool.aio/asyncio-connection-pool"] = \
                _ratio(m.get("rate"), p.get("rate"))
    return {"seconds": seconds, "reps": reps, "lease": _keyed(lease), "conn_pool": _keyed(conn_pool),
            "ratios": ratios, "cells": cells}


def print_async(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, shutil.get_terminal_size((150, 40)).columns))
    lease = {(r["n"], r["tasks"], r["peer"]): r for r in res["lease"]}
    t = Table(title=f"async: lease cycles (get+put on a token pool of N x C) through the supervisor — "
                    f"medians of {res['reps']} reps x {res['seconds']} s; C tasks (async) or threads "
                    f"(sync) per process")
    for col in ("N", "C", "async k/s", "sync k/s", "async/sync", "p50 us async / sync",
                "p99 us async / sync", "p99 async/sync"):
        t.add_column(col, justify="right")
    for n in ASYNC_NS:
        for c in ASYNC_CS:
            a, s = lease.get((n, c, "mppool.aio")), lease.get((n, c, "mppool sync"))
            if not a or not s:
                continue
            t.add_row(str(n), str(c), _k(a["rate"]), _k(s["rate"]), _x(_ratio(a["rate"], s["rate"])),
                      f"{_f(a['p50_us'])} / {_f(s['p50_us'])}", f"{_f(a['p99_us'])} / {_f(s['p99_us'])}",
                      _x(_ratio(a["p99_us"], s["p99_us"])))
    console.print(t)
    pools = {(r["tasks"], r["peer"]): r for r in res["conn_pool"]}
    if pools:
        t = Table(title=f"async: in-process get_connection cycles (max_size={ACP_SIZE}, trivial "
                        f"strategy, one await inside the block) — medians")
        for col in ("tasks", "mppool.aio k/s", "asyncio-connection-pool k/s", "ratio",
                    "p50 us mppool / acp", "p99 us mppool / acp"):
            t.add_column(col, justify="right")
        for tasks in ACP_TASKS:
            m, p = pools.get((tasks, ACP_PEERS[0])), pools.get((tasks, ACP_PEERS[1]))
            if not m or not p:
                continue
            t.add_row(str(tasks), _k(m["rate"]), _k(p["rate"]), _x(_ratio(m["rate"], p["rate"])),
                      f"{_f(m['p50_us'], 2)} / {_f(p['p50_us'], 2)}",
                      f"{_f(m['p99_us'], 2)} / {_f(p['p99_us'], 2)}")
        console.print(t)
    for name, r in res["ratios"].items():
        print(f"ratio: {name}: {_x(r)}")


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a ~30 s smoke run (short cells, 1 rep)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    ap.add_argument("--seconds", type=float, help="seconds per cell (default 1.0, quick 0.5)")
    ap.add_argument("--cpu-cycles", type=int, help="cycles per CPU cell (default 20000, quick 4000)")
    ap.add_argument("--kills", type=int, help="SIGKILLs for the reclaim figure (default 40, quick 10)")
    ap.add_argument("--redis-url", default=os.environ.get("MPPOOL_BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results", help="results folder")
    ap.add_argument("--no-docs", action="store_true", help="do not copy the plot to docs/img/")
    ap.add_argument("--only", choices=["async"], help="run only this section (results in bench-async.json)")
    ap.add_argument("--no-churn", action="store_true", help="leave out the PostgreSQL churn section")
    ap.add_argument("--async-seconds", type=float,
                    help="seconds per cell of the async section (default 0.4, quick 0.3)")
    ns = ap.parse_args(argv)
    reps = ns.reps or (1 if ns.quick else 3)
    seconds = ns.seconds or (0.5 if ns.quick else 1.0)
    cpu_cycles = ns.cpu_cycles or (4_000 if ns.quick else 20_000)
    kills = ns.kills or (10 if ns.quick else 40)
    async_seconds = ns.async_seconds or (0.3 if ns.quick else 0.4)
    if ns.only == "async":
        return main_async(ns, reps, async_seconds)

    t_start = time.monotonic()
    notes: list[str] = []
    res: dict[str, Any] = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "python": platform.python_version(), "platform": platform.platform(),
                 "cpus": os.cpu_count(), "reps": reps, "seconds": seconds, "cpu_cycles": cpu_cycles,
                 "quick": ns.quick, "versions": _versions(),
                 "method": "interleaved reps (for rep: for config: for peer, order rotated), "
                           "medians over reps; ratios are ratios of medians"},
        "notes": notes,
    }
    h = Harness()
    server: mppool.Server | None = None
    manager: SyncManager | None = None
    try:
        redis_url = redis_url_if_up(ns.redis_url, notes)
        _say(f"mppool bench: {reps} rep(s) x {seconds} s per cell, {len(lease_configs())} lease configs, "
             f"Redis {'at ' + redis_url if redis_url else 'skipped'}")
        manager = SyncManager(ctx=CTX)
        manager.start()
        server = mppool.Server().start()
        client = mppool.connect(server.address, server.authkey)
        peers = Peers(server, client, manager, redis_url, notes)
        res["idle_cpu_percent"] = idle_cpu(server.pid, 0.5 if ns.quick else 1.0)
        cells = run_reps(h, peers, reps, seconds, cpu_cycles)
        _say(f"  async section ({reps} rep(s) x {async_seconds} s per cell)...")
        res["async"] = run_async_section(h, server, client, reps, async_seconds, notes)
        client.close()
        server.shutdown()
        server = None
        manager.shutdown()
        manager = None

        _say(f"  reclaim latency ({kills} kills)...")
        res["reclaim"] = measure_reclaim(kills)
        _say("  memory with 256 clients...")
        res["memory"] = [measure_memory(h, threaded=True), measure_memory(h, threaded=False)]
        churn = _load_script("bench_churn") if not ns.no_churn else None
        if churn is not None:
            _say("  connection churn on PostgreSQL (scripts/bench_churn.py)...")
            res["churn"] = churn.run(quick=ns.quick)
        if redis_url:
            _say("  cluster pools...")
            res["cluster"] = measure_cluster(redis_url, ns.quick, reps)
    finally:
        h.reap_all()
        if server is not None:
            server.shutdown()
        if manager is not None:
            manager.shutdown()

    lease = summarize(cells["lease"], ("n", "c", "peer"))
    inproc = summarize(cells["inproc"], ("peer",))
    cpu = summarize(cells["cpu"], ("n", "peer"))
    goals = evaluate(lease, inproc, cpu, res["reclaim"])
    res["meta"]["runtime_s"] = round(time.monotonic() - t_start, 1)
    res.update(lease=_keyed(lease), inproc=_keyed(inproc), cpu=_keyed(cpu),
               goals=[g.__dict__ for g in goals], cells=cells)

    ns.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = ns.out / "bench.json", ns.out / "bench.png"
    json_path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    plot(res, lease, inproc, cpu, png_path)
    print_tables(res, lease, inproc, cpu, goals)
    print_async(res["async"])
    if churn is not None:
        churn.report(res["churn"])
    if "cluster" in res:
        print(res["cluster"]["report"])
    print(f"wrote {json_path} and {png_path}")
    if not ns.quick and not ns.no_docs:
        docs = ROOT / "docs" / "img"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png_path, docs / "bench.png")
        print(f"copied the plot to {docs / 'bench.png'}")
    print(f"runtime {time.monotonic() - t_start:.1f} s")
    return 0


def main_async(ns: argparse.Namespace, reps: int, seconds: float) -> int:
    """``--only async``: the async section alone, against a supervisor of its own."""
    t_start = time.monotonic()
    notes: list[str] = []
    h = Harness()
    _say(f"mppool bench, async section only: {reps} rep(s) x {seconds} s per cell")
    try:
        with mppool.Server() as server, mppool.connect(server.address, server.authkey) as client:
            res = run_async_section(h, server, client, reps, seconds, notes)
    finally:
        h.reap_all()
    res["meta"] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "python": platform.python_version(), "cpus": os.cpu_count(), "quick": ns.quick,
                   "versions": _versions(), "runtime_s": round(time.monotonic() - t_start, 1)}
    res["notes"] = notes
    ns.out.mkdir(parents=True, exist_ok=True)
    json_path = ns.out / "bench-async.json"
    json_path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print_async(res)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {json_path}")
    print(f"runtime {time.monotonic() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
