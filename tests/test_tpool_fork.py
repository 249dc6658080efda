"""mppool.tpool after os.fork(): the child gets a pool of its own (the parent's threads do
not exist there), and nothing of it involves a supervisor."""

from __future__ import annotations

import os
import threading

import pytest
from helpers import fork_ctx

from mppool import tpool

pytestmark = pytest.mark.slow


def _child(out):
    out.put((os.getpid(), tpool.execute(os.getpid), tpool.execute(lambda: threading.current_thread().name)))


def test_a_forked_child_runs_its_own_threads(procs):
    assert tpool.execute(os.getpid) == os.getpid()  # the parent's pool is running
    ctx = fork_ctx()
    out = ctx.Queue()
    p = ctx.Process(target=_child, args=(out,))
    procs.append(p)
    p.start()
    pid, ran_in, thread = out.get(timeout=20)
    p.join(10)
    assert p.exitcode == 0
    assert ran_in == pid != os.getpid() and thread.startswith("mppool-tpool-")
    tpool.killall()
