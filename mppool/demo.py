"""The workload behind ``mppool demo``: worker processes sharing one token budget.

A private supervisor serves a token pool ``budget``; worker processes take a token, hold it a
few milliseconds and give it back, over and over. The bound is checked from outside the code
that could break it: the supervisor's own count of tokens out, sampled by the parent and read
by each worker while it holds a token, and a cross-process count of holders kept in shared
memory. One worker is SIGKILLed while holding a token to show the watchdog giving it back.

Nothing here writes to the terminal (``mppool.cli`` renders what `Demo` reports).
Workers are module-level functions so that the 'spawn' start method can import them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
import signal
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from .client import Client, SharedPool
from .errors import PoolException, TimeOut
from .server import Server

log = logging.getLogger("mppool")

POOL_NAME = "budget"
HOLD = (0.002, 0.008)  # seconds a worker holds a token: "work" of a few ms
START_TIMEOUT = 30.0  # spawned interpreters import mppool; a loaded 2-core box is slow
VICTIM_TIMEOUT = 30.0  # a victim never killed gives its token back and exits on its own
JOIN_TIMEOUT = 5.0
RECLAIM_TIMEOUT = 5.0


@dataclass
class Shared:
    """Cross-process state handed to every worker when it is spawned.

    Flags are plain shared bytes, polled, never ``multiprocessing.Event``: an Event's
    condition variable counts its sleepers, so SIGKILLing the victim while it sleeps in
    ``wait()`` would leave every later ``set()`` waiting for it to wake up, forever.
    """

    parent: int
    ready: Any  # Value('i'): workers connected and waiting for ``go``
    go: Any  # Value('b') flag
    stop: Any  # Value('b') flag
    victim: Any  # Value('i'): index of the worker that must hold its next token until killed
    holding: Any  # Value('b') flag: the victim holds its token
    lock: Any  # Lock guarding ``inflight``/``inflight_peak``
    inflight: Any  # Value('i'): workers between get() and ret() (the victim excluded)
    inflight_peak: Any  # Value('i')
    leases: Any  # Array('i'): leases per worker, each slot written by its worker only
    peaks: Any  # Array('i'): per worker, the most tokens out the supervisor reported


def _wait_flag(flag: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not flag.value:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def worker(index: int, pool: SharedPool, sh: Shared) -> None:
    """Take a token, hold it briefly, give it back, until told to stop.

    ``pool`` arrived pickled: unpickling it connected this process to the supervisor.
    """
    # Ctrl-C reaches the whole process group; the parent alone decides how the run ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rng = random.Random(os.getpid())
    with sh.lock:
        sh.ready.value += 1
    if not _wait_flag(sh.go, START_TIMEOUT):
        return
    try:
        # getppid: a parent that died without cleaning up must not leave us running.
        while not sh.stop.value and os.getppid() == sh.parent:
            try:
                token = pool.get(timeout=0.25)
            except TimeOut:
                continue
            try:
                sh.leases[index] += 1
                if sh.victim.value == index:
                    sh.holding.value = 1
                    _wait_flag(sh.stop, VICTIM_TIMEOUT)  # the parent SIGKILLs us in here
                    return
                with sh.lock:
                    sh.inflight.value += 1
                    sh.inflight_peak.value = max(sh.inflight_peak.value, sh.inflight.value)
                # Ask the supervisor, not ourselves, how many tokens are out right now.
                out = int(pool.stats()["nusing"])
                sh.peaks[index] = max(sh.peaks[index], out)
                time.sleep(rng.uniform(*HOLD))
                with sh.lock:
                    sh.inflight.value -= 1
            finally:
                pool.ret(token)
    except PoolException as exc:
        # The supervisor went away: the parent notices and reports it.
        log.warning("mppool demo: worker %d stops: %s", index, exc)


@dataclass
class Sample:
    elapsed: float
    out: int  # tokens out, as the supervisor sees them
    available: int
    waiting: int
    leases: int  # total so far, from the workers' counters


@dataclass
class KillReport:
    index: int
    pid: int
    held: bool  # the supervisor listed the victim's pid among the holders before the kill
    reclaim_ms: float | None  # kill -> pid gone from the holders; None if it never went
    out: int
    available: int
    budget: int
    exitcode: int | None

    @property
    def ok(self) -> bool:
        return self.held and self.reclaim_ms is not None and self.out + self.available == self.budget


@dataclass
class WorkerReport:
    index: int
    pid: int
    leases: int
    peak_seen: int  # most tokens out the supervisor reported to this worker
    fate: str


@dataclass
class DemoResult:
    budget: int
    seconds: float
    workers: list[WorkerReport]
    peak_sampled: int  # most tokens out seen by the parent's sampler
    peak_inflight: int  # most workers between get() and ret() at once
    nsamples: int
    kill: KillReport | None
    final_out: int
    final_available: int
    nreclaimed: int
    errors: list[str] = field(default_factory=list)

    @property
    def total_leases(self) -> int:
        return sum(w.leases for w in self.workers)

    @property
    def peak_workers(self) -> int:
        return max((w.peak_seen for w in self.workers), default=0)

    @property
    def peak(self) -> int:
        return max(self.peak_sampled, self.peak_workers, self.peak_inflight)

    @property
    def bound_held(self) -> bool:
        return self.peak <= self.budget

    @property
    def ok(self) -> bool:
        return (self.bound_held and not self.errors and self.kill is not None and self.kill.ok
                and self.final_out + self.final_available == self.budget)


def _counts(stats: dict[str, Any]) -> tuple[int, int, int]:
    """(tokens out, tokens available, waiters) from one stats snapshot.

    Available is the semaphore's value, not ``navail``: token pools create tokens lazily, so
    a slot not yet turned into a token is available too.
    """
    sem = stats.get("sem") or {}
    return int(stats["nusing"]), int(sem.get("value", stats["navail"])), int(stats["nwaiting"])


def _holder_pids(stats: dict[str, Any]) -> set[int]:
    return {u["pid"] for u in stats.get("using", ()) if "pid" in u}


class Demo:
    """One demo run. Use as a context manager: leaving it ends every process it started."""

    def __init__(self, workers: int = 6, budget: int = 2, seconds: float = 5.0,
                 address: object = None, authkey: object = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
            raise ValueError(f"workers must be an int >= 2 (one of them is killed), got {workers!r}")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an int >= 1, got {budget!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"seconds must be a number > 0, got {seconds!r}")
        self.nworkers = workers
        self.budget = budget
        self.seconds = float(seconds)
        self._address = address
        self._authkey = authkey
        self.server: Server | None = None
        self._client: Client | None = None
        self._pool: SharedPool | None = None
        self._procs: list[Any] = []
        self._sh: Shared | None = None
        self._t0 = 0.0
        self._peak_sampled = 0
        self._nsamples = 0
        self._errors: list[str] = []
        self._kill: KillReport | None = None
        self._fates: dict[int, str] = {}

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Demo:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> None:
        """Start the supervisor and the workers; return once every worker is connected."""
        self.server = Server(self._address, self._authkey).start()
        self._client = self.server.client()
        self._pool = self._client.token_pool(POOL_NAME, self.budget)
        # spawn: fresh interpreters inherit none of this process's threads, locks or sockets,
        # and each reconnects by unpickling the pool, as a real worker would.
        ctx = multiprocessing.get_context("spawn")
        n = self.nworkers
        sh = self._sh = Shared(
            parent=os.getpid(), ready=ctx.Value("i", 0, lock=False), go=ctx.Value("b", 0, lock=False),
            stop=ctx.Value("b", 0, lock=False), victim=ctx.Value("i", -1, lock=False),
            holding=ctx.Value("b", 0, lock=False),
            lock=ctx.Lock(), inflight=ctx.Value("i", 0, lock=False),
            inflight_peak=ctx.Value("i", 0, lock=False), leases=ctx.Array("i", n, lock=False),
            peaks=ctx.Array("i", n, lock=False))
        for i in range(n):
            p = ctx.Process(target=worker, args=(i, self._pool, sh), name=f"mppool-demo-{i}",
                            daemon=True)
            p.start()
            self._procs.append(p)
        deadline = time.monotonic() + START_TIMEOUT
        while sh.ready.value < n:
            dead = [p for p in self._procs if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"demo worker pid {dead[0].pid} exited during start-up "
                                   f"(exit status {dead[0].exitcode})")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"only {sh.ready.value} of {n} demo workers started within "
                                   f"{START_TIMEOUT:.0f} s")
            time.sleep(0.01)

    def go(self) -> None:
        assert self._sh is not None
        self._t0 = time.monotonic()
        self._sh.go.value = 1

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _stats(self) -> dict[str, Any]:
        assert self._pool is not None
        return self._pool.stats()

    def sample(self) -> Sample:
        """One look at the supervisor's view of the budget."""
        assert self._sh is not None
        out, avail, waiting = _counts(self._stats())
        self._nsamples += 1
        self._peak_sampled = max(self._peak_sampled, out)
        return Sample(self.elapsed(), out, avail, waiting, sum(self._sh.leases))

    def kill_one(self) -> KillReport:
        """SIGKILL a worker while the supervisor lists it as holding a token; time the reclaim."""
        sh = self._sh
        assert sh is not None
        index = self.nworkers - 1
        proc = self._procs[index]
        sh.victim.value = index
        held = _wait_flag(sh.holding, RECLAIM_TIMEOUT)
        held = held and proc.pid in _holder_pids(self._stats())
        reclaim_ms: float | None = None
        if proc.exitcode is None:
            t = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)  # our own child, by pid
            deadline = t + RECLAIM_TIMEOUT
            while time.monotonic() < deadline:
                if proc.pid not in _holder_pids(self._stats()):
                    reclaim_ms = (time.monotonic() - t) * 1000
                    break
                time.sleep(0.001)
            proc.join(JOIN_TIMEOUT)
        self._fates[index] = "SIGKILLed holding a token"
        # Tokens out + available is read from one snapshot, but a token being created right
        # now is in neither: look again until no creation is under way.
        out, avail, _ = _counts(self._stats())
        deadline = time.monotonic() + 1.0
        while out + avail != self.budget and time.monotonic() < deadline:
            time.sleep(0.005)
            out, avail, _ = _counts(self._stats())
        self._kill = KillReport(index, proc.pid, held, reclaim_ms, out, avail, self.budget,
                                proc.exitcode)
        return self._kill

    def finish(self) -> DemoResult:
        """Stop the workers, wait for every token to come back, and report."""
        sh = self._sh
        assert sh is not None and self._client is not None
        sh.stop.value = 1
        deadline = time.monotonic() + JOIN_TIMEOUT
        for i, p in enumerate(self._procs):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                self._errors.append(f"worker {i} (pid {p.pid}) did not stop within "
                                    f"{JOIN_TIMEOUT:.0f} s: killed")
                self._fates[i] = "killed at clean-up"
                p.kill()
                p.join(JOIN_TIMEOUT)
            elif i not in self._fates:
                self._fates[i] = "exited" if p.exitcode == 0 else f"exit status {p.exitcode}"
                if p.exitcode != 0:
                    self._errors.append(f"worker {i} (pid {p.pid}) exit status {p.exitcode}")
        # Returns are asynchronous: wait for the last ones to land before the final count.
        out, avail, _ = _counts(self._stats())
        deadline = time.monotonic() + RECLAIM_TIMEOUT
        while (out or out + avail != self.budget) and time.monotonic() < deadline:
            time.sleep(0.005)
            out, avail, _ = _counts(self._stats())
        nreclaimed = int(self._client.info().get("nreclaimed", 0))
        reports = [WorkerReport(i, p.pid, sh.leases[i], sh.peaks[i], self._fates.get(i, "?"))
                   for i, p in enumerate(self._procs)]
        return DemoResult(self.budget, self.seconds, reports, self._peak_sampled,
                          sh.inflight_peak.value, self._nsamples, self._kill, out, avail,
                          nreclaimed, list(self._errors))

    def close(self) -> None:
        """End every process this run started (workers by pid, then the supervisor)."""
        if self._sh is not None:
            self._sh.stop.value = 1
        for p in self._procs:
            if p.exitcode is None:
                p.join(0.5)
            if p.exitcode is None:
                p.kill()
                p.join(JOIN_TIMEOUT)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self.server is not None:
            self.server.shutdown()
