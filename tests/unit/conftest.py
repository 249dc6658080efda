"""Keeps ``tests/unit`` honest: a test here that tries to start a process fails at once.

Every way a test could start one goes through a primitive patched here for the duration of
each test: ``os.fork`` (multiprocessing's fork context, ``mppool.Server``), the fork-exec
primitive of ``subprocess`` and of multiprocessing's spawn and forkserver contexts,
``os.posix_spawn*`` and ``os.system``. Such a test belongs in ``tests/``.

``tests/conftest.py`` applies here too, and ``from helpers import ...`` works: pytest (default
``prepend`` import mode) puts ``tests/`` on ``sys.path`` when it loads that conftest, which it
does for ``pytest tests/unit`` as well, since the rootdir is the repository.
"""

from __future__ import annotations

import _posixsubprocess
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mppool import Pool
from mppool.clock import FakeClock

try:
    from helpers import ManualScheduler, Recorder, Runner
except ImportError:  # tests/ became a package
    from tests.helpers import ManualScheduler, Recorder, Runner


@pytest.fixture(autouse=True)
def _no_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a test in tests/unit must not start a process: move it to tests/")

    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(_posixsubprocess, "fork_exec", refuse)
    if hasattr(subprocess, "_fork_exec"):  # subprocess keeps its own reference to it
        monkeypatch.setattr(subprocess, "_fork_exec", refuse)
    for name in ("forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    yield


# ------------------------------------------------ pools on a fake clock (the core's unit tests)


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.join_all()


@pytest.fixture
def sched() -> ManualScheduler:
    return ManualScheduler(FakeClock())


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def make_pool(runner: Runner, sched: ManualScheduler, rec: Recorder) -> Iterator[Callable[..., Pool]]:
    """Build pools on the fake clock and manual scheduler; shut them down (before the runner
    joins its threads, so that a getter still blocked is woken)."""
    made: list[Pool] = []

    def make(fun: Any = None, **kw: Any) -> Pool:
        kw.setdefault("clock", sched.clock)
        kw.setdefault("scheduler", sched)
        kw.setdefault("closer", rec.closer)
        pool = Pool._made_with(rec.fun if fun is None else fun, **kw)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.shutdown()
