"""Small helpers shared by the tests: wait on observable state with a deadline, drive
housekeeping by hand on a fake clock, run threads that are always joined."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from mppool.clock import FakeClock


def run_bounded(coro: Coroutine[Any, Any, Any], deadline: float) -> Any:
    """``asyncio.run(coro)``, failing with TimeoutError after ``deadline`` seconds."""

    async def bounded() -> Any:
        async with asyncio.timeout(deadline):
            return await coro

    return asyncio.run(bounded())


# Bad values of the lifecycle and reconnect options, for every pool that takes them:
# (options, exception, message pattern).
BAD_LIFECYCLE_OPTIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"reconnect_timeout": math.nan}, ValueError, "reconnect_timeout.*nan"),
    ({"reconnect_timeout": -1}, ValueError, "reconnect_timeout.*-1"),
    ({"reconnect_failed": "log"}, TypeError, "reconnect_failed must be callable"),
    ({"open": 1}, TypeError, "open must be a bool"),
]


class ModuleClock:
    """A fake ``time.monotonic`` for modules that read their clock through a module-level
    ``_now`` (mppool.aio.connection_pool, mppool.queuepool.pool): it moves only when a test
    changes ``t``. Installed by `patch_now`."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def patch_now(monkeypatch: Any, module: Any, start: float = 1000.0) -> ModuleClock:
    """Replace ``module._now`` with a `ModuleClock` for the test (``monkeypatch`` undoes it)."""
    clock = ModuleClock(start)
    monkeypatch.setattr(module, "_now", clock)
    return clock


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.002,
               what: str | None = None) -> Any:
    """Poll ``pred`` until it returns something true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or pred!r}")
        time.sleep(interval)


class _ManualTask:
    __slots__ = ("cancelled", "due", "fn", "seq")

    def __init__(self, due: float, seq: int, fn: Callable[[], None]) -> None:
        self.due, self.seq, self.fn, self.cancelled = due, seq, fn, False

    def __lt__(self, other: _ManualTask) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)

    def cancel(self) -> None:
        self.cancelled = True


class ManualScheduler:
    """A scheduler with no threads: due tasks run in the test's thread on ``advance()``.

    Pass it as ``Pool._made_with(..., clock=sched.clock, scheduler=sched)``; ``sched.advance(s)`` moves
    the fake clock and runs every housekeeping round that has become due, deterministically.
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self._heap: list[_ManualTask] = []
        self._seq = itertools.count()
        self.entered: list[float] = []  # delays asked for, in order

    def enter(self, delay: float, fn: Callable[[], None]) -> _ManualTask:
        self.entered.append(delay)
        task = _ManualTask(self.clock.now() + delay, next(self._seq), fn)
        heapq.heappush(self._heap, task)
        return task

    def close(self, wait: bool = False) -> None:
        self._heap.clear()

    def pending(self) -> list[float]:
        """Due times of the live tasks."""
        return sorted(t.due for t in self._heap if not t.cancelled)

    def run_due(self) -> int:
        """Run every task due now (a task re-entered by a task runs only once it is due)."""
        ran = 0
        now = self.clock.now()
        while self._heap and self._heap[0].due <= now:
            task = heapq.heappop(self._heap)
            if task.cancelled:
                continue
            task.fn()
            ran += 1
        return ran

    def advance(self, seconds: float) -> int:
        self.clock.advance(seconds)
        return self.run_due()


class Recorder:
    """``fun`` and hooks that record what the pool did with them."""

    def __init__(self, fail: Callable[[int], bool] | None = None) -> None:
        self.lock = threading.Lock()
        self.nums: list[int] = []
        self.closed: list[Any] = []
        self.fail = fail

    def fun(self, i: int) -> dict[str, int]:
        with self.lock:
            self.nums.append(i)
        if self.fail is not None and self.fail(i):
            raise RuntimeError(f"cannot create object {i}")
        return {"num": i}

    def closer(self, obj: Any) -> None:
        with self.lock:
            self.closed.append(obj)


class Runner:
    """Start threads that record their result or exception; ``join_all()`` joins them."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def start(self, fn: Callable[[], Any], name: str | None = None) -> dict[str, Any]:
        box: dict[str, Any] = {"done": False}

        def run() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:  # reported to the test through box
                box["error"] = e
            finally:
                box["done"] = True

        t = threading.Thread(target=run, name=name, daemon=True)
        box["thread"] = t
        self.threads.append(t)
        t.start()
        return box

    def join_all(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        self.threads.clear()
        assert not alive, f"threads still running: {alive}"


def fork_ctx() -> Any:
    """The start method of the cross-process tests: fast, and what gunicorn does."""
    import multiprocessing

    return multiprocessing.get_context("fork")


def start_ready(procs: list[Any], target: Callable[..., Any], *args: Any,
                timeout: float = 10.0) -> tuple[Any, Any]:
    """Fork a process running ``target(*args, ready)``, track it in ``procs`` (killed at
    teardown), and wait until it says it is ready: returns it and what it put on ``ready``."""
    ctx = fork_ctx()
    ready = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, ready))
    procs.append(p)
    p.start()
    return p, ready.get(timeout=timeout)


class RawLease:
    """A raw lease-channel connection that does the real handshake, then sends whatever a
    test wants: the hostile client of the reliability tests."""

    def __init__(self, client: Any, pid: int | None = None, start: float = 0.0,
                 host: str = "test-host", handshake: bool = True) -> None:
        import os
        import socket

        from mppool import framing
        from mppool import handshake as hs
        from mppool import protocol as P
        from mppool.channel import _recv_frame

        address = client.info()["lease_address"]
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(address if isinstance(address, str) else tuple(address))
        self.P = P
        self.rids = itertools.count(1)
        if handshake:
            nonce = hs.decode_nonce(_recv_frame(self.sock))
            self.sock.sendall(hs.encode_hello(hs.digest(client.authkey, nonce), hs.new_nonce(),
                                             os.getpid() if pid is None else pid, start, host))
            _, self.conn_id, _ = hs.decode_ack(_recv_frame(self.sock))
        self.reader = framing.FrameReader(1 << 30)
        self.frames: list[Any] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, timeout: float = 5.0) -> Any:
        """The next reply, decoded."""
        self.sock.settimeout(timeout)
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("closed by the supervisor")
            self.frames = self.reader.feed(data)
        return self.P.decode_reply(self.frames.pop(0))

    def get(self, pool_id: int, timeout: float | None = 1.0) -> Any:
        rid = next(self.rids)
        self.send(self.P.encode_get(rid, pool_id, timeout))
        return self.reply()

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the supervisor has closed this connection (reading what it sent);
        the socket is closed here either way."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    if not self.sock.recv(65536):
                        return True
                except TimeoutError:
                    return False
                except OSError:
                    return True
            return False
        finally:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()


def stop_pid(pid: int) -> None:
    """Stop a supervisor this test started (detached, so not our child), by its pid:
    SIGTERM, then SIGKILL."""
    import signal

    import psutil

    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    except psutil.NoSuchProcess:
        pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, timeout: float = 30.0) -> tuple[int, str]:
    """GET / on 127.0.0.1:port: (status, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def _no_fast_path() -> str | None:
    """Why the shared-memory fast path cannot run here (None: it can)."""
    from mppool import shm

    try:
        shm.available()
    except shm.Unavailable as exc:
        return str(exc)
    return None


# The fast path's tests: they need Linux memfds and mppool's C module, which pip builds
# wherever a C compiler is (without one, token pools keep the normal path, tested anyway).
NEEDS_FAST_PATH = pytest.mark.skipif(_no_fast_path() is not None,
                                     reason=f"no fast path here: {_no_fast_path()}")


def check_outage_half_a_second_in(stats: dict[str, Any]) -> None:
    """``stats()`` of a pool whose only creation attempt failed 0.5 s ago (a fake clock) with
    ConnectionRefusedError("the database is down"): its ``outage`` entry says so."""
    outage = stats["outage"]
    assert outage["failing_for"] == pytest.approx(0.5) and outage["attempts"] == 1
    assert 0.4 - 1e-9 <= outage["next_attempt_in"] <= 0.6 + 1e-9  # 1 s +-10%, 0.5 s ago
    assert outage["error"] == "ConnectionRefusedError: the database is down"
    json.dumps(stats)  # JSON-compatible, outage included
