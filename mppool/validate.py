"""Argument checks whose messages name the parameter and the bad value.

Durations follow one rule, applied here at the edge so that nothing further in sees an odd
number: ``None`` or ``math.inf`` mean "forever" (or "never"); any finite number >= 0 is a
number of seconds, however large; NaN, negatives, bools and non-numbers raise ``ValueError`` or
``TypeError`` naming the parameter. NaN must never get in: it compares false with everything,
so a NaN deadline would never expire. Which function to use depends on what "forever" means
for the option:

- ``check_duration`` / ``check_timeout``: a wait; forever is returned as ``None``.
- ``check_period``: an option where 0 means "off" (``max_avail_delay=0``: never recycle);
  "never" is returned as ``0.0``, so no arithmetic or OS call ever sees ``inf``.
- ``check_delay``: the number, validated (``inf`` passes through); for callers that do
  their own mapping.

Pool sizes have one rule too, for the core pool and eventlet's pools alike (``check_size``,
``check_sizes``, ``check_resize``): ints, ``min_size`` never above a bounded ``max_size``.
The core pool reads ``max_size=0`` as "unbounded"; eventlet would read it as "nothing ever
available", so its pools pass ``bounded=True`` and require at least 1.
"""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_delay(name: str, value: Any) -> float:
    """A number of seconds >= 0 (``inf`` included): TypeError/ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds (or None), got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float: longer than anything, i.e. forever
        return math.inf
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0 (or None), got {value!r}")
    return seconds


def check_duration(name: str, value: Any) -> float | None:
    """A wait: None or ``inf`` -> None (forever), else finite seconds >= 0."""
    if value is None:
        return None
    seconds = check_delay(name, value)
    return None if math.isinf(seconds) else seconds


def check_timeout(name: str, value: Any) -> float | None:
    """A timeout: None or ``inf`` -> None (wait forever), else finite seconds >= 0."""
    return check_duration(name, value)


def check_period(name: str, value: Any) -> float:
    """An option where 0 means off: None or ``inf`` (never) -> 0.0, else finite seconds."""
    seconds = check_duration(name, value)
    return 0.0 if seconds is None else seconds


def check_callable(name: str, value: Any, required: bool = False) -> None:
    if value is None:
        if required:
            raise TypeError(f"{name} must be a callable, got None")
        return
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")


def check_size(name: str, value: Any, bounded: bool = False) -> int:
    """A pool bound: an int >= 0, 0 meaning unbounded, or >= 1 with ``bounded=True``."""
    return check_int(name, value, minimum=1 if bounded else 0)


def check_sizes(min_size: Any, max_size: Any, bounded: bool = False) -> tuple[int, int]:
    """A pool's ``(min_size, max_size)`` at construction, checked in that order of names:
    ``max_size`` first (see `check_size`), then ``min_size`` (an int >= 0), then the pair."""
    max_size = check_size("max_size", max_size, bounded)
    min_size = check_int("min_size", min_size)
    if max_size and min_size > max_size:
        raise ValueError(f"min_size={min_size!r} must not exceed max_size={max_size!r}")
    return min_size, max_size


def check_resize(max_size: int, min_size: int, burst_limit: int = 0) -> None:
    """A new bound for a pool whose ``min_size`` (and ``burst_limit``, 0 if none) is fixed
    (``max_size`` already checked)."""
    if max_size and min_size > max_size:
        raise ValueError(f"max_size={max_size!r} is below min_size={min_size!r}")
    if burst_limit:
        check_burst(burst_limit, max_size)


def check_burst(burst_limit: Any, max_size: int) -> int:
    """``burst_limit`` for a pool of ``max_size`` (already checked): None -> 0 (off), else an
    int >= ``max_size``; a burst limit needs a bounded pool (``max_size`` >= 1)."""
    if burst_limit is None:
        return 0
    burst_limit = check_int("burst_limit", burst_limit)
    if not max_size:
        raise ValueError(f"burst_limit={burst_limit!r} needs a bounded pool, "
                         f"got max_size={max_size!r} (unbounded)")
    if burst_limit < max_size:
        raise ValueError(f"burst_limit={burst_limit!r} must be >= max_size={max_size!r}")
    return burst_limit
