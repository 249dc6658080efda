"""Batch jobs: multiprocessing.Pool and ProcessPoolExecutor, fork and spawn (docs/batch.md)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
from helpers import wait_until
from workers import batch_init, batch_task, batch_task_with_pool

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_pool_executor_with_initializer(server, client, method):
    tokens = client.token_pool("batch", 2)
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(3, mp_context=ctx, initializer=batch_init,
                             initargs=(server.address, server.authkey.hex())) as ex:
        results = list(ex.map(batch_task, range(30)))
    assert [sq for _, sq in results] == [i * i for i in range(30)]
    assert all(pid != os.getpid() for pid, _ in results)
    assert tokens.stats()["nborrows"] == 30
    wait_until(lambda: tokens.free() == 2, what="every token back after the executor exits")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_pool_executor_passing_the_pool(client, method):
    tokens = client.token_pool("batch-pass", 2)
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(3, mp_context=ctx) as ex:
        results = list(ex.map(batch_task_with_pool, [(tokens, i) for i in range(12)]))
    assert [sq for _, sq in results] == [i * i for i in range(12)]
    wait_until(lambda: tokens.free() == 2, what="every token back")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_pool_with_initializer(server, client, method):
    tokens = client.token_pool("batch", 1)
    with multiprocessing.get_context(method).Pool(
            3, initializer=batch_init, initargs=(server.address, server.authkey.hex())) as mp:
        results = mp.map(batch_task, range(20))
    assert [sq for _, sq in results] == [i * i for i in range(20)]
    assert tokens.stats()["nborrows"] == 20
