"""A cluster token pool as the budget of process-local pools: PostgreSQL connections opened
by worker processes on two supervisors ("hosts") never exceed the cluster's cap, as
PostgreSQL itself counts them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cluster_kit import clean_prefix, new_prefix, start_supervisor
from helpers import fork_ctx

import mppool
from mppool.errors import PoolException

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

CAP = 3


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    p = new_prefix()
    yield p
    clean_prefix(redis_url, p)


def _pg_worker(address: Any, authkey: bytes, dsn: str, app: str, seconds: float,
               out: Any) -> None:
    import psycopg

    from mppool.db_pool import RawConnectionPool

    client = mppool.connect(address, authkey)
    budget = client.token_pool("pg", CAP, scope="cluster")
    pool = RawConnectionPool(psycopg, min_size=0, max_size=CAP, max_idle=10, max_age=30,
                             budget=budget, conninfo=dsn, application_name=app)
    done = 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            conn = pool.get()
        except PoolException:
            continue
        try:
            conn.cursor().execute("select 1")
            time.sleep(0.003)
        finally:
            pool.put(conn)
        done += 1
    pool.clear()
    client.close()
    out.put(done)


def test_cluster_budget_caps_postgres_connections(redis_url: str, postgres_dsn: str,
                                                  prefix: str, reap: None,
                                                  procs: list[Any]) -> None:
    import psycopg

    app = f"mppool-cluster-{uuid.uuid4().hex[:8]}"
    servers = [start_supervisor(redis_url, prefix, f"pg{i}") for i in range(2)]
    peak = [0]
    samples = [0]
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            while not stop.is_set():
                n = conn.execute("select count(*) from pg_stat_activity where "
                                 "application_name = %s", (app,)).fetchone()[0]  # type: ignore[index]
                peak[0] = max(peak[0], int(n))
                samples[0] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        ctx = fork_ctx()
        out = ctx.Queue()
        for s in servers:
            for _ in range(2):
                p = ctx.Process(target=_pg_worker, args=(s.address, s.authkey, postgres_dsn,
                                                         app, 4.0, out))
                procs.append(p)
                p.start()
        done = [out.get(timeout=60) for _ in range(4)]
        for p in procs:
            p.join(20)
            assert p.exitcode == 0
    finally:
        stop.set()
        sampler.join(10)
        for s in servers:
            s.shutdown()
    print(f"\n[cluster figures] PostgreSQL under a cluster budget of {CAP}: 4 processes on 2 "
          f"supervisors ran {done} queries; peak connections seen by PostgreSQL {peak[0]}/{CAP} "
          f"({samples[0]} samples)")
    assert samples[0] > 20
    assert 1 <= peak[0] <= CAP
    assert all(n > 0 for n in done), "a process was starved"
