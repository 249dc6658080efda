"""Argument checks whose messages name the parameter and the bad value."""

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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or math.isnan(value):
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def check_timeout(name: str, value: Any) -> float | None:
    return None if value is None else check_delay(name, value)


def check_callable(name: str, value: Any, required: bool = False) -> None:
    if value is None:
        if required:
            raise TypeError(f"{name} must be a callable, got None")
        return
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")


def check_budget(budget: Any) -> None:
    """A budget is a token pool: something with get() and put() (a shared token pool)."""
    if budget is not None and not (callable(getattr(budget, "get", None))
                                   and callable(getattr(budget, "put", None))):
        raise TypeError(f"budget must be a token pool with get() and put(), got {budget!r}")
