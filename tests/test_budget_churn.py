"""Budgets on real PostgreSQL: the cap holds, tokens move without churning connections, and
a process SIGKILLed while holding a connection loses nothing.

Four processes share a budget of 2 connections (``db_pool.RawConnectionPool(max_size=1,
budget=...)``), each running a fixed number of queries at a steady pace; a fifth holds a
connection and is killed. The test counts connections opened (each pool's ``ncreated``, and
the distinct server backends the queries ran on), not time: with a token moved at every
query, as a naive recall does, the opens would be in the same range as the queries.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import pytest
from helpers import fork_ctx, wait_until

import mppool
from mppool import db_pool

psycopg = pytest.importorskip("psycopg")

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.kill]

WORKERS, BUDGET, QUERIES, PACE = 4, 2, 60, 0.005


def _querier(address: Any, authkey: bytes, dsn: str, app: str, out: Any) -> None:
    client = mppool.connect(address, authkey)
    pool = db_pool.RawConnectionPool(psycopg, min_size=0, max_size=1,
                                     budget=client.token_pool("churn"), conninfo=dsn,
                                     application_name=app)
    backends: set[int] = set()
    for _ in range(QUERIES):
        conn = pool.get(timeout=30)
        try:
            cur = conn.cursor()
            cur.execute("SELECT pg_backend_pid()")
            backends.add(cur.fetchone()[0])
        finally:
            pool.put(conn)
        time.sleep(PACE)  # the pace of the load, not a wait for a result
    out.put({"queries": QUERIES, "opens": pool.stats()["ncreated"], "backends": sorted(backends)})
    pool.shutdown()
    client.close()


def _holder(address: Any, authkey: bytes, dsn: str, app: str, out: Any) -> None:
    client = mppool.connect(address, authkey)
    pool = db_pool.RawConnectionPool(psycopg, min_size=0, max_size=1,
                                     budget=client.token_pool("churn"), conninfo=dsn,
                                     application_name=app)
    conn = pool.get(timeout=30)
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    out.put(cur.fetchone()[0])
    while True:  # holds its connection, and its token, until killed
        time.sleep(1)


def _backends(dsn: str, app: str, exclude: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                            " AND pid <> %s", (app, exclude)).fetchone()[0]


def test_budget_caps_connections_and_moves_tokens_without_churn(server, client, procs, postgres_dsn):
    budget = client.token_pool("churn", BUDGET)
    app = f"mppool-churn-{uuid.uuid4().hex[:8]}"
    ctx = fork_ctx()
    held, out = ctx.Queue(), ctx.Queue()
    victim = ctx.Process(target=_holder, args=(server.address, server.authkey, postgres_dsn, app, held))
    procs.append(victim)
    victim.start()
    victim_backend = held.get(timeout=30)
    for _ in range(WORKERS):
        p = ctx.Process(target=_querier, args=(server.address, server.authkey, postgres_dsn, app, out))
        procs.append(p)
        p.start()
    wait_until(lambda: budget.waiting() >= 1, timeout=30, what="the queriers queue for the budget")
    peak_tokens = peak_backends = 0
    killed = False
    while any(p.is_alive() for p in procs[1:]):
        s = budget.stats()
        peak_tokens = max(peak_tokens, s["nusing"])
        # The killed process's backend is ended by PostgreSQL when its socket closes; every
        # live process's connection holds a token, so the others never exceed the budget.
        peak_backends = max(peak_backends, _backends(postgres_dsn, app, victim_backend))
        if not killed:
            os.kill(victim.pid, signal.SIGKILL)  # holding a connection and a token
            killed = True
        time.sleep(0.005)  # the observer's sampling period, not a wait for a result
    results = [out.get(timeout=30) for _ in range(WORKERS)]
    victim.join(5)
    assert victim.exitcode == -signal.SIGKILL
    assert all(p.exitcode == 0 for p in procs[1:]), [p.exitcode for p in procs]
    assert peak_tokens <= BUDGET and peak_backends <= BUDGET, (peak_tokens, peak_backends)
    queries = sum(r["queries"] for r in results)
    opens = sum(r["opens"] for r in results)
    backends = len({b for r in results for b in r["backends"]})
    assert queries == WORKERS * QUERIES and backends <= opens
    # A token moves at most once per recall patience while its process keeps using it: far
    # fewer opens than queries (one per 8 here; a token moved at every query is one per 1-4).
    assert opens <= queries / 8, (opens, queries)
    wait_until(lambda: budget.free() == BUDGET, what="every token back, the killed process's too")
