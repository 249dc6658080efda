"""Logging that cannot flood: a message that repeats in a loop is let through at most once
per interval, and the next one that passes says how many were held back.

Every loop of the supervisor that can fail over and over (an accept loop out of file
descriptors, a scheduler, a watchdog scan, a client sending garbage) logs through one of
these, so that a failure is seen once, with its count, instead of megabytes a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mppool")


class RateLimitedLog:
    """At most one log line per ``interval`` seconds for each key."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, level: int, key: str, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` was logged less than an interval
        ago; True if it was logged."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            if not args:
                msg = msg.replace("%", "%%")  # it is formatted now, with the count
            msg += " (and %d more like it in the last %g s)"
            args = (*args, held, self.interval)
        log.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args: Any) -> bool:
        return self(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: Any, exc_info: bool = False) -> bool:
        return self(logging.ERROR, key, msg, *args, exc_info=exc_info)
