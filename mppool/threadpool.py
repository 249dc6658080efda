"""A small pool of native daemon threads that run calls for the threads of this process.

    caller thread                          worker threads (started on demand, up to ``size``)
    submit(fn, args) ── queue ───────────▶ take (future, fn, args) ── run fn ──┐
    future.result() ◀── result / exception, raised as it was raised ◀───────────┘

What ``mppool.tpool`` runs on. Why not ``concurrent.futures.ThreadPoolExecutor``: its workers
are joined at interpreter exit, so one call that hangs would keep the process from ever
exiting; eventlet's threads are daemons, and so are these. ``stop(timeout)`` lets queued calls
run (as eventlet's ``killall`` does), waits for the workers at most ``timeout`` seconds, then
fails the calls that never started and leaves the hung workers behind (logged): a hung function
costs its own thread and its own caller, nobody else.

Every worker survives whatever a call raises, ``BaseException`` subclasses included: the
exception goes to the caller's future, never up the worker's stack.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any

from .errors import PoolClosed

log = logging.getLogger("mppool")

_STOP = None  # what a worker takes off the queue to exit


class ThreadPool:
    """Native daemon threads, at most ``size``, started when calls need them."""

    def __init__(self, size: int, name: str = "mppool-tpool") -> None:
        self._name = name
        self._size = size
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._pending = 0  # calls queued, not yet taken by a worker
        self._busy = 0  # workers running a call
        self._stopping = 0  # workers told to exit but not yet gone (a shrink)
        self._closed = False
        self._counter = 0

    # ---------------------------------------------------------------- callers

    def is_worker(self) -> bool:
        """Whether the calling thread is one of this pool's workers."""
        return threading.current_thread() in self._threads

    def submit(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise PoolClosed("the thread pool was killed (killall): shutting down")
            self._queue.put((fut, fn, args, kwargs))
            self._pending += 1
            # Each worker neither busy nor told to exit takes one queued call: start one more
            # when they are too few, so that no call waits behind a slow one (up to size).
            live = len(self._threads) - self._stopping
            if live - self._busy < self._pending and live < self._size:
                self._start_worker()
        return fut

    def resize(self, size: int) -> None:
        """At most ``size`` workers from now on; surplus ones exit once they are idle."""
        with self._lock:
            self._size = size
            surplus = len(self._threads) - self._stopping - size
            for _ in range(max(0, surplus)):
                self._stopping += 1
                self._queue.put(_STOP)

    def stop(self, timeout: float | None) -> list[threading.Thread]:
        """Run what is queued, stop every worker; returns those still running after
        ``timeout`` seconds (left behind: they are daemons). Calls still queued then fail
        with PoolClosed."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(_STOP)
        # Called from a worker (a call that kills the pool): it exits once that call returns.
        me = threading.current_thread()
        threads = [t for t in threads if t is not me]
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            t.join(None if deadline is None else
                   min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX))
        hung = [t for t in threads if t.is_alive()]
        while True:  # nobody will run these any more
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item[0].set_running_or_notify_cancel():
                item[0].set_exception(PoolClosed("the thread pool was killed (killall) before "
                                                 "this call started: shutting down"))
        # The drain took the stop items too: one for each worker still busy (the caller, one
        # left hung), so that it exits when its call returns.
        for _ in range(len(hung) + (me in self._threads)):
            self._queue.put(_STOP)
        if hung:
            log.warning("mppool: tpool: %d thread(s) still running a call after %s s: left "
                        "behind (%s)", len(hung), timeout, ", ".join(t.name for t in hung))
        return hung

    def __len__(self) -> int:
        return len(self._threads)

    # ---------------------------------------------------------------- workers

    def _start_worker(self) -> None:
        """Under the lock."""
        self._counter += 1
        t = threading.Thread(target=self._work, name=f"{self._name}-{self._counter}", daemon=True)
        self._threads.add(t)
        try:
            t.start()
        except RuntimeError:  # out of threads: the queued call waits for a running worker
            self._threads.discard(t)
            if not self._threads:
                raise
            log.warning("mppool: tpool: cannot start another thread", exc_info=True)

    def _work(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                with self._lock:
                    self._pending -= 1
                    self._busy += 1
                fut, fn, args, kwargs = item
                item = None
                if fut.set_running_or_notify_cancel():
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as exc:  # every one goes to the caller, as raised
                        # The frames' locals would keep every argument of the failed call
                        # alive as long as the caller keeps the exception (eventlet does this too).
                        traceback.clear_frames(exc.__traceback__)
                        fut.set_exception(exc)
                    else:
                        fut.set_result(result)
                        result = None
                fut = fn = args = kwargs = None
                with self._lock:
                    self._busy -= 1
        finally:
            with self._lock:
                self._threads.discard(me)
                if item is _STOP and self._stopping and not self._closed:
                    self._stopping -= 1
