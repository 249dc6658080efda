"""Time, injectable so that time-based rules are tested by jumping a fake clock.

Every duration in mppool is measured with ``Clock.now()`` (monotonic) and every timed wait in
the housekeeping scheduler goes through ``Clock.wait()``; a ``FakeClock`` only moves when a
test calls ``advance()``, and wakes every waiter when it does.

The operating system refuses long waits: ``Condition.wait``, ``Event.wait``, ``time.sleep``
and ``epoll.poll`` raise ``OverflowError`` somewhere past 2e6 s, and for ``inf``. mppool
accepts any finite duration (``max_lifetime=1e308`` is legal), so no wait is ever handed to
the OS as is: ``clamp_wait()`` caps it at ``MAX_WAIT`` and the caller waits again, in a loop
that re-checks its deadline, until the real deadline has passed.
"""

from __future__ import annotations

import threading
import time
import weakref

MAX_WAIT = 3600.0
"""The longest single wait handed to the OS, in seconds; longer waits are done in pieces."""


def clamp_wait(seconds: float | None) -> float | None:
    """A wait the OS accepts: None (forever) stays None, anything else ends up in
    ``[0, MAX_WAIT]``.

    ``inf``, NaN and huge values become ``MAX_WAIT`` (the caller re-checks its deadline and
    waits again, so waking early is harmless, while a NaN turned into 0 would spin).
    """
    if seconds is None:
        return None
    if not seconds < MAX_WAIT:  # also catches NaN and inf
        return MAX_WAIT
    return seconds if seconds > 0 else 0.0


def wait_event(event: threading.Event, timeout: float | None) -> bool:
    """``event.wait(timeout)`` for any timeout (None or a finite number of seconds, however
    large): waits in clamped pieces until the event is set or ``timeout`` has elapsed."""
    if timeout is None:
        return event.wait()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return event.is_set()
        if event.wait(clamp_wait(left)):
            return True


class Clock:
    """The real, monotonic clock."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Wait on ``cond`` (held by the caller) until notified or ``timeout`` elapses.

        It may return early (a notify, or a wait longer than ``MAX_WAIT`` cut short): callers
        re-check their state and deadline in a loop, as with any condition variable.
        """
        cond.wait(clamp_wait(timeout))


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
