"""Lease ages on the fast path: ``max_using_delay`` warns and ``max_using_delay_kill`` takes a
fast token back (and terminates its holder with ``kill_holder``), as on the normal path.

The pools come from a config file served by ``mppool serve`` (host token pools get those
options there), and the clients take their tokens in shared memory.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import NEEDS_FAST_PATH, fork_ctx, start_ready, wait_until
from test_console import Served

import mppool
from mppool.errors import TimeOut
from mppool.fastpath import FastToken

pytestmark = [pytest.mark.slow, pytest.mark.kill, NEEDS_FAST_PATH]


KILL = 1.0  # max_using_delay_kill of these tests: the parent never holds a token that long


def hold(address: str, name: str, ready: Any) -> None:
    client = mppool.connect(address)
    pool = client.token_pool(name, fast=True)
    tok = pool.get(timeout=10)
    ready.put((os.getpid(), type(tok).__name__))
    time.sleep(KILL + 0.3)  # past max_using_delay_kill: the lease is killed meanwhile
    pool.put(tok)  # a late put: a no-op (it does not free the unit a second time)
    ready.put("put")
    time.sleep(3600)


def test_kill_delay_takes_a_fast_token_back(tmp_path: Path, sockdir: Path, procs: list[Any]) -> None:
    srv = Served(tmp_path, sockdir, {"api": {"kind": "token", "max_size": 1,
                                             "max_using_delay_kill": KILL}})
    try:
        client = mppool.connect(srv.address)
        pool = client.token_pool("api", fast=True)
        tok = pool.get(timeout=5)
        assert type(tok) is FastToken, "the fast path was not taken"
        pool.put(tok)

        ready = fork_ctx().Queue()
        p = fork_ctx().Process(target=hold, args=(srv.address, "api", ready))
        procs.append(p)
        p.start()
        _, kind = ready.get(timeout=10)
        assert kind == "FastToken"
        t0 = time.monotonic()
        got = pool.get(timeout=10)  # served once the holder's lease is killed
        after = time.monotonic() - t0
        assert KILL - 0.2 <= after < KILL + 2.0, after
        assert client.stats()["api"]["nkilled"] == 1
        assert ready.get(timeout=10) == "put"  # its late put changed nothing:
        with pytest.raises(TimeOut):
            pool.get(timeout=0.2)  # one unit, and we hold it
        assert p.is_alive(), "without kill_holder the holder process lives on"
        pool.put(got)
        wait_until(lambda: client.stats()["api"]["nusing"] == 0, what="the unit back")
        assert "killing fast lease held for" in srv.text()
        client.close()
    finally:
        srv.stop()


def test_kill_holder_terminates_the_fast_holder(tmp_path: Path, sockdir: Path,
                                                procs: list[Any]) -> None:
    srv = Served(tmp_path, sockdir, {"api": {"kind": "token", "max_size": 1,
                                             "max_using_delay": 0.3,
                                             "max_using_delay_kill": KILL,
                                             "kill_holder": True}})
    try:
        client = mppool.connect(srv.address)
        pool = client.token_pool("api", fast=True)
        pool.put(pool.get(timeout=5))
        p, (pid, kind) = start_ready(procs, hold, srv.address, "api")
        assert kind == "FastToken"
        got = pool.get(timeout=10)
        p.join(10)
        assert p.exitcode == -signal.SIGTERM, p.exitcode  # terminated, by its verified pid
        text = srv.text()
        assert "object held for" in text and f"by pid {pid}" in text  # warned first
        assert text.count("object held for") == 1, "warned once per lease"
        pool.put(got)
        client.close()
    finally:
        srv.stop()
