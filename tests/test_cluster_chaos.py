"""Chaos on a cluster pool: three supervisors ("hosts") with their workers on one Redis,
random SIGKILLs of workers and of whole supervisors with their workers, replaced as they
die. The cap is never exceeded (the workers' own logs and Redis say so), and at the end
every unit is accounted for: all of them come back, and a fresh host can take them all.

10 s by default; ``MPPOOL_CLUSTER_CHAOS_SECONDS`` runs it longer.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_kit import (
    TTL,
    Sampler,
    clean_prefix,
    new_prefix,
    peak_overlap,
    sigkill,
    start_supervisor,
    start_workers,
    wait_released,
)

import mppool
from mppool.errors import TimeOut

SECONDS = float(os.environ.get("MPPOOL_CLUSTER_CHAOS_SECONDS", "10"))
CAP = 3
HOSTS = 3
WORKERS = 4

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.kill,
              pytest.mark.timeout(SECONDS + 180)]


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    p = new_prefix()
    yield p
    clean_prefix(redis_url, p)


def test_cluster_chaos(redis_url: str, prefix: str, reap: None, procs: list[Any],
                       tmp_path: Path) -> None:
    rng = random.Random(os.environ.get("MPPOOL_CHAOS_SEED") or time.time_ns())
    until = time.monotonic() + SECONDS
    hosts: list[tuple[mppool.Server, list[Any]]] = []
    generation = [0]
    ends: dict[str, float] = {}
    kills = {"workers": 0, "supervisors": 0}

    def spawn_host() -> tuple[mppool.Server, list[Any]]:
        generation[0] += 1
        sup = start_supervisor(redis_url, prefix, f"c{generation[0]}")
        left = max(0.5, until - time.monotonic())
        return sup, start_workers(procs, sup, "x", CAP, tmp_path, WORKERS, hold=0.002,
                                  seconds=left)

    def log_of(p: Any) -> str:
        return str(p.log_name)

    try:
        with Sampler(redis_url, prefix, "x") as sampler:
            hosts = [spawn_host() for _ in range(HOSTS)]
            while time.monotonic() < until - 1.0:
                time.sleep(rng.uniform(0.1, 0.4))
                i = rng.randrange(len(hosts))
                sup, workers = hosts[i]
                if rng.random() < 0.15:  # a whole host dies
                    sigkill(sup.pid)  # type: ignore[arg-type]
                    now = time.monotonic()
                    for w in workers:
                        sigkill(w.pid)
                        ends[log_of(w)] = now
                    kills["supervisors"] += 1
                    sup.shutdown()  # reaps it
                    hosts[i] = spawn_host()
                else:
                    w = rng.choice(workers)
                    sigkill(w.pid)
                    ends[log_of(w)] = time.monotonic()
                    kills["workers"] += 1
                    workers.remove(w)
                    left = until - time.monotonic()
                    if left > 0.5:
                        workers += start_workers(procs, sup, "x", CAP, tmp_path, 1, hold=0.002,
                                                 seconds=left)
            for _, workers in hosts:
                for w in workers:
                    w.join(30)
        peak, n = peak_overlap(tmp_path, ends)
        for sup, _ in hosts:
            sup.shutdown()
        t0 = time.monotonic()
        wait_released(redis_url, prefix, "x", TTL * 3 + 5)
        released_in = time.monotonic() - t0
        # Every unit accounted for: a fresh host takes all of them, and no more.
        fresh = start_supervisor(redis_url, prefix, "final")
        try:
            with fresh.client() as c:
                tokens = c.token_pool("x", CAP, scope="cluster")
                held = [tokens.get(timeout=TTL * 3) for _ in range(CAP)]
                with pytest.raises(TimeOut):
                    tokens.get(timeout=0.3)
                for t in held:
                    tokens.put(t)
        finally:
            fresh.shutdown()
    finally:
        for sup, _ in hosts:
            sup.shutdown()
    print(f"\n[cluster figures] chaos {SECONDS:g} s: {kills['workers']} workers and "
          f"{kills['supervisors']} supervisors SIGKILLed; {n} holds; peak held by workers "
          f"{peak}/{CAP}; peak in Redis {sampler.peak_redis}/{CAP}; every unit back "
          f"{released_in:.3f} s after the last supervisor stopped")
    assert n > 100
    assert peak <= CAP
    assert sampler.peak_redis <= CAP
    assert kills["workers"] > 0
