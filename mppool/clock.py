"""Time, injectable so that time-based rules are tested by jumping a fake clock.

Every duration in mppool is measured with ``Clock.now()`` (monotonic) and every timed wait in
the housekeeping scheduler goes through ``Clock.wait()``; a ``FakeClock`` only moves when a
test calls ``advance()``, and wakes every waiter when it does.
"""

from __future__ import annotations

import threading
import time
import weakref


class Clock:
    """The real, monotonic clock."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Wait on ``cond`` (held by the caller) until notified or ``timeout`` elapses."""
        cond.wait(timeout)


class FakeClock(Clock):
    """A clock that moves only when told to: ``advance(seconds)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._conds: weakref.WeakSet[threading.Condition] = weakref.WeakSet()

    def now(self) -> float:
        with self._lock:
            return self._now

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        with self._lock:
            self._conds.add(cond)
        # Fake time cannot elapse by itself: sleep until advance() or another notify wakes us.
        # The short real timeout only guards against a notify lost between add() and wait().
        cond.wait(0.05)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            conds = list(self._conds)
        for cond in conds:
            with cond:
                cond.notify_all()


REAL_CLOCK = Clock()
