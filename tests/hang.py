"""User code that hangs, for the isolation tests: shipped to the supervisor by reference
(this module is importable there), released when the test creates a file."""

from __future__ import annotations

import os
import time


def wait_for_file(path: str, limit: float = 60.0) -> bool:
    """Block until ``path`` exists (a hook that hangs), giving up after ``limit`` s so that a
    failed test never leaves a thread blocked for good."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
