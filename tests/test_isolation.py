"""A hook that hangs delays only the pool it belongs to.

In-process: a housekeeping round decides under the lock and hands user code to the pool's
``runner``; the scheduler's threads (shared by pools) never wait on a hook. ``HookExecutor``
bounds the threads one pool's hooks may hold, and ``Record.submit`` is how the supervisor
runs a pool's user code. The supervisor tests at the end run real supervisor processes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mppool import Pool
from mppool.clock import FakeClock
from mppool.sched import HookExecutor, Scheduler
from mppool.supervisor import Record

try:
    from helpers import ManualScheduler, Recorder, start_ready, wait_until
except ImportError:  # tests/ became a package
    from tests.helpers import ManualScheduler, Recorder, start_ready, wait_until


class JobQueue:
    """A runner that only queues jobs: the test runs them when it wants (or never)."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []
        self.fail: Exception | None = None

    def __call__(self, job: Callable[[], None]) -> None:
        if self.fail is not None:
            raise self.fail
        self.jobs.append(job)

    def run_all(self) -> int:
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()
        return len(jobs)


@pytest.fixture
def sched() -> ManualScheduler:
    return ManualScheduler(FakeClock())


@pytest.fixture
def pools() -> Iterator[list[Pool]]:
    made: list[Pool] = []
    yield made
    for p in made:
        p.shutdown()


@pytest.fixture
def executors() -> Iterator[list[HookExecutor]]:
    made: list[HookExecutor] = []
    yield made
    for ex in made:
        ex.close()


class Gate:
    """User code that blocks until the test opens the gate (with a deadline of its own,
    so that a failed test never leaves a thread blocked for good)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.entered = 0
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def block(self, *args: Any) -> Any:
        with self.lock:
            self.entered += 1
            self.threads.add(threading.current_thread().name)
        self.event.wait(30)
        return True


# ------------------------------------------------------------------- Pool's runner option


def test_round_decides_now_and_runs_user_code_on_the_runner(sched: ManualScheduler,
                                                            pools: list[Pool]) -> None:
    rec, jobs, killed = Recorder(), JobQueue(), []
    pool = Pool._made_with(rec.fun, max_size=3, min_size=1, max_lifetime=1, max_using_delay_kill=1,
                           closer=rec.closer, clock=sched.clock, scheduler=sched, runner=jobs,
                           kill_holder=True)
    pool.on_kill_holder = lambda holder, age: killed.append(holder)
    pools.append(pool)
    pool.get()  # held too long
    pool.ret(pool.get())  # idle, then too old
    sched.advance(1.0)  # one round: the lease is too old, the idle object expired
    s = pool.stats()
    # Decided at once: the lease left the books and its holder is being terminated ...
    assert (s["nkilled"], s["nusing"], s["nexpired"], s["nobjs"], len(killed)) == (1, 0, 1, 0, 1)
    # ... while neither closer nor fun ran in the round's thread: that is the runner's work.
    assert rec.closed == [] and s["ntodel"] == 2 and rec.nums == [0, 1]
    assert len(jobs.jobs) == 3  # the long-use warning (tracer), closing, refilling
    jobs.run_all()
    assert sorted(o["num"] for o in rec.closed) == [0, 1]
    assert rec.nums == [0, 1, 2] and pool.stats()["nobjs"] == 1


def test_one_job_of_a_kind_at_a_time(sched: ManualScheduler, pools: list[Pool]) -> None:
    """A job that hangs (never run here) is not joined by one more each round."""
    jobs = JobQueue()
    pool = Pool._made_with(lambda i: i, max_size=5, min_size=0, health=lambda o: True, delay=1,
                           clock=sched.clock, scheduler=sched, runner=jobs)
    pools.append(pool)
    pool.ret(pool.get())
    for _ in range(5):
        sched.advance(1.0)
    assert pool.stats()["hk_rounds"] == 5
    assert len(jobs.jobs) == 1  # the first health job, still "running"
    jobs.run_all()
    sched.advance(1.0)
    assert len(jobs.jobs) == 1 and pool.stats()["hc_rounds"] == 1


def test_a_runner_that_fails_is_retried_next_round(sched: ManualScheduler, pools: list[Pool],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    rec, jobs = Recorder(), JobQueue()
    pool = Pool._made_with(rec.fun, max_size=2, min_size=0, max_avail_delay=1, closer=rec.closer,
                           clock=sched.clock, scheduler=sched, runner=jobs)
    pools.append(pool)
    pool.ret(pool.get())
    jobs.fail = RuntimeError("can't start new thread")
    with caplog.at_level(logging.ERROR, logger="mppool"):
        sched.advance(1.0)
        sched.advance(0.5)
    assert pool.stats()["nrecycled"] == 1 and rec.closed == []
    assert sum("can't start new thread" in r.getMessage() for r in caplog.records) == 1
    jobs.fail = None
    sched.advance(0.5)
    jobs.run_all()
    assert rec.closed == [{"num": 0}]


def test_long_use_warning_runs_the_tracer_on_the_runner(sched: ManualScheduler,
                                                        pools: list[Pool]) -> None:
    traced: list[str] = []
    jobs = JobQueue()

    def tracer(obj: Any) -> str:
        traced.append(threading.current_thread().name)
        return "traced"

    pool = Pool._made_with(lambda i: i, max_size=1, max_using_delay=1, tracer=tracer, clock=sched.clock,
                           scheduler=sched, runner=jobs)
    pools.append(pool)
    pool.get()
    sched.advance(1.0)
    assert traced == []  # the tracer is user code: not in the round
    jobs.run_all()
    assert len(traced) == 1


def test_hung_closer_holds_only_its_pool(pools: list[Pool],
                                         executors: list[HookExecutor]) -> None:
    """Two pools share a scheduler with a single thread; A's closer hangs. B's lease is
    still killed on time, and A's closer never ran on the scheduler's thread."""
    gate = Gate()
    sched = Scheduler(workers=1, name="mppool-test-shared")
    try:
        ex_a, ex_b = HookExecutor(2, "mppool-A"), HookExecutor(2, "mppool-B")
        executors += [ex_a, ex_b]
        a = Pool._made_with(lambda i: i, max_size=4, min_size=0, max_avail_delay=0.05,
                            closer=gate.block, scheduler=sched, runner=ex_a.run)
        b = Pool._made_with(lambda i: i, max_size=1, max_using_delay_kill=0.3, scheduler=sched,
                            runner=ex_b.run)
        pools += [a, b]
        objs = [a.get() for _ in range(4)]
        for o in objs:
            a.ret(o)
        wait_until(lambda: gate.entered >= 1, timeout=5, what="A's closer to hang")
        b.get()
        wait_until(lambda: b.stats()["nkilled"] == 1, timeout=3, what="B's lease kill")
        assert ex_a.counts()["threads"] <= 2
        assert all(name.startswith("mppool-A") for name in gate.threads), gate.threads
    finally:
        gate.event.set()
        for p in pools:
            p.shutdown()
        sched.close(wait=True)


# -------------------------------------------------------------------------- HookExecutor


def test_executor_is_bounded_and_queues_the_rest(executors: list[HookExecutor]) -> None:
    gate = Gate()
    ex = HookExecutor(3, "mppool-bound")
    executors.append(ex)
    futs = [ex.submit(gate.block) for _ in range(10)]
    wait_until(lambda: gate.entered == 3, what="three calls running")
    assert ex.counts() == {"threads": 3, "busy": 3, "queued": 7}
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("mppool-bound"))
    gate.event.set()
    assert all(f.result(timeout=5) is True for f in futs)


def test_executor_result_exception_and_idle_exit(executors: list[HookExecutor]) -> None:
    ex = HookExecutor(2, "mppool-idle", idle_timeout=0.05)
    executors.append(ex)
    assert ex.submit(lambda x: x + 1, 1).result(timeout=5) == 2
    with pytest.raises(ZeroDivisionError):
        ex.submit(lambda: 1 / 0).result(timeout=5)
    wait_until(lambda: ex.counts()["threads"] == 0, what="idle threads to exit")
    assert ex.submit(lambda: 3).result(timeout=5) == 3  # and they come back on demand


def test_executor_thread_start_failure_means_never_runs(monkeypatch: pytest.MonkeyPatch,
                                                        executors: list[HookExecutor]) -> None:
    ex = HookExecutor(2, "mppool-nothreads")
    executors.append(ex)
    ran: list[int] = []

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError, match="can't start"):
        ex.submit(ran.append, 1)
    monkeypatch.undo()
    assert ex.counts() == {"threads": 0, "busy": 0, "queued": 0}
    assert ex.submit(ran.append, 2).result(timeout=5) is None
    assert ran == [2]


def test_executor_close_cancels_queued(executors: list[HookExecutor]) -> None:
    gate = Gate()
    ex = HookExecutor(1, "mppool-close")
    executors.append(ex)
    running, queued = ex.submit(gate.block), ex.submit(gate.block)
    wait_until(lambda: gate.entered == 1)
    ex.close()
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="closed"):
        ex.submit(gate.block)
    gate.event.set()
    assert running.result(timeout=5) is True


# -------------------------------------------------------------------------- Record.submit


def _record(name: str, pools: list[Pool]) -> Record:
    pool = Pool(lambda i: i, min_size=0)
    pools.append(pool)
    return Record(name, 1, pool, "copy", "pool", None, {})


def test_record_submit_isolates_pools(pools: list[Pool]) -> None:
    gate = Gate()
    a, b = _record("a", pools), _record("b", pools)
    try:
        futs = [a.submit(gate.block) for _ in range(12)]  # a fun that hangs, 12 times
        assert all(f is not None for f in futs)
        wait_until(lambda: gate.entered == 4, what="a's four threads busy")
        fut = b.submit(lambda x: x * 2, 21)
        assert fut is not None and fut.result(timeout=2) == 42
        assert a.executor.counts()["threads"] == 4
        assert all(n.startswith("mppool-a") for n in gate.threads)
    finally:
        gate.event.set()
        a.close()
        b.close()


def test_record_submit_returns_none_when_no_thread(monkeypatch: pytest.MonkeyPatch,
                                                   pools: list[Pool],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    rec = _record("nothreads", pools)
    ran: list[int] = []

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with caplog.at_level(logging.ERROR, logger="mppool"):
        assert rec.submit(ran.append, 1) is None
        assert rec.submit(ran.append, 2) is None  # logged once: rate-limited
    monkeypatch.undo()
    assert sum("can't start new thread" in r.getMessage() for r in caplog.records) == 1
    rec.close()
    assert rec.submit(ran.append, 3) is None  # a dropped pool runs nothing more
    assert ran == []


# --------------------------------------------------------------- real supervisor processes


def _release_path(tmp_path: Any) -> str:
    return str(tmp_path / "release")


def _call_within(fn: Callable[[], Any], timeout: float, threads: list[threading.Thread]) -> Any:
    """Run a client call that must not hang, with a deadline (the thread is joined at the
    end of the test, once the supervisor is gone and every call has returned)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    threads.append(t)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"call did not return within {timeout} s"
    if "error" in box:
        raise box["error"]
    return box.get("result")


@pytest.fixture
def call_threads() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for t in threads:
        t.join(15)  # the supervisor is shut down by now: a blocked call has returned
    assert not any(t.is_alive() for t in threads)


def _assert_other_pool_kills(client: Any, call_threads: list[threading.Thread]) -> Any:
    """A healthy pool next to stuck ones: its lease is killed within its delay (0.3 s) plus
    one housekeeping period. Returns that pool."""
    other = client.pool("other", lambda i: i, max_size=1, max_using_delay_kill=0.3)
    other.get(timeout=5)
    t0 = time.monotonic()
    wait_until(lambda: _call_within(lambda: other.stats()["nkilled"], 5, call_threads) == 1,
               timeout=5, what="the lease kill of the other pool")
    assert time.monotonic() - t0 < 0.3 + 1.0
    return other


def _stuck_pools(client: Any, n: int, release: str, hook: str, **opts: Any) -> list[Any]:
    """n pools whose ``hook`` hangs until the test creates ``release`` (at most 60 s)."""
    from hang import wait_for_file

    def hung(*args: Any, path: str = release) -> bool:
        return wait_for_file(path)

    return [client.pool(f"stuck{k}", lambda i: i, min_size=0, max_size=4, **{hook: hung}, **opts)
            for k in range(n)]


@pytest.mark.timeout(60)
def test_hung_closers_do_not_stop_kills_or_the_watchdog(client: Any, procs: list[Any],
                                                        tmp_path: Any,
                                                        call_threads: list[threading.Thread]
                                                        ) -> None:
    from workers import hold_and_fork_keeper

    release = _release_path(tmp_path)
    try:
        stuck = _stuck_pools(client, 6, release, "closer", max_avail_delay=0.05)
        for p in stuck:  # objects that go idle, are recycled, and whose closer hangs
            objs = [p.get(timeout=5) for _ in range(2)]
            for o in objs:
                p.ret(o)
        # Four or more closers hanging held every thread of the old shared scheduler.
        wait_until(lambda: sum(p.stats()["nrecycled"] >= 1 for p in stuck) >= 4, timeout=5,
                   what="closers of the stuck pools to start")
        other = _assert_other_pool_kills(client, call_threads)
        assert _call_within(lambda: other.get(timeout=2), 5, call_threads) == 1
        other.ret(1)
        # The watchdog scan (its own thread) still sees a holder die whose socket lives on.
        watched = client.pool("watched", lambda i: i, max_size=1)
        p, (holder_pid, keeper_pid) = start_ready(procs, hold_and_fork_keeper, watched)
        try:
            os.kill(holder_pid, signal.SIGKILL)
            p.join(5)
            t0 = time.monotonic()
            assert _call_within(lambda: watched.get(timeout=5), 6, call_threads) == 0
            assert time.monotonic() - t0 < 1.0
        finally:
            try:
                os.kill(keeper_pid, signal.SIGKILL)  # the grandchild this test started
            except ProcessLookupError:
                pass
    finally:
        open(release, "w").close()


@pytest.mark.timeout(60)
def test_hung_health_checks_do_not_delay_other_kills(client: Any, tmp_path: Any,
                                                     call_threads: list[threading.Thread]
                                                     ) -> None:
    release = _release_path(tmp_path)
    try:
        stuck = _stuck_pools(client, 6, release, "health", delay=0.05)
        for p in stuck:
            p.ret(p.get(timeout=5))
        wait_until(lambda: sum(p.stats()["nhealth"] >= 1 for p in stuck) >= 4, timeout=5,
                   what="health checks of the stuck pools to start")
        _assert_other_pool_kills(client, call_threads)
    finally:
        open(release, "w").close()


@pytest.mark.timeout(60)
def test_hung_fun_does_not_stop_other_pools(client: Any, tmp_path: Any,
                                            call_threads: list[threading.Thread]) -> None:
    from hang import wait_for_file

    release = _release_path(tmp_path)

    def hung_fun(i: int, path: str = release) -> int:
        return wait_for_file(path) and i

    try:
        stuck = client.pool("stuckfun", hung_fun, min_size=0, max_size=12)
        for _ in range(10):  # ten creations that hang, more than any shared worker pool
            t = threading.Thread(target=lambda: stuck.ret(stuck.get()), daemon=True)
            call_threads.append(t)
            t.start()
        wait_until(lambda: stuck.stats()["ncreating"] == 10, timeout=5, what="ten stuck creations")
        other = client.pool("other", lambda i: i, min_size=0, max_size=1,
                            max_using_delay_kill=0.3)
        assert _call_within(lambda: other.get(timeout=2), 3, call_threads) == 0  # a creation
        wait_until(lambda: _call_within(lambda: other.stats()["nkilled"], 5, call_threads) == 1,
                   timeout=2, what="the lease kill of the other pool")
        assert _call_within(lambda: other.get(timeout=2), 3, call_threads) == 1
    finally:
        open(release, "w").close()


@pytest.mark.timeout(60)
def test_supervisor_exits_although_closers_hang(tmp_path: Any) -> None:
    from hang import wait_for_file

    import mppool

    release = _release_path(tmp_path)

    def hung(obj: Any, path: str = release) -> bool:
        return wait_for_file(path)

    srv = mppool.Server().start()
    proc = srv._proc
    try:
        c = mppool.connect(srv.address, srv.authkey)
        try:
            pool = c.pool("closing", lambda i: i, min_size=0, max_size=3, closer=hung)
            objs = [pool.get(timeout=5) for _ in range(3)]
            for o in objs:
                pool.ret(o)
        finally:
            c.close()
        t0 = time.monotonic()
        srv.shutdown()  # closes the 3 objects: every closer hangs
        assert time.monotonic() - t0 < 9.0  # well before shutdown() resorts to SIGKILL
        assert proc is not None and proc.returncode == 0
    finally:
        open(release, "w").close()
        srv.shutdown()
