"""A small WSGI app for the gunicorn end-to-end test: every request uses a PostgreSQL
connection from a per-worker RawConnectionPool that draws on a shared budget of 2."""

from __future__ import annotations

import os
import threading
from typing import Any

import psycopg

import mppool
from mppool import db_pool

_pool: db_pool.RawConnectionPool | None = None
_lock = threading.Lock()


def _get_pool() -> db_pool.RawConnectionPool:
    global _pool
    with _lock:
        if _pool is None:
            client = mppool.connect()  # MPPOOL_ADDRESS/MPPOOL_AUTHKEY exported by the hooks
            budget = client.token_pool("pg", int(os.environ.get("APP_BUDGET", "2")))
            _pool = db_pool.RawConnectionPool(
                psycopg, min_size=0, max_size=1, budget=budget,
                conninfo=os.environ["APP_DSN"], application_name=os.environ["APP_NAME"])
        return _pool


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    pool = _get_pool()
    conn = pool.get()
    try:
        cur = conn.cursor()
        cur.execute("select pg_backend_pid(), pg_sleep(0.002)")
        backend = cur.fetchone()[0]
        cur.close()
    finally:
        pool.put(conn)
    body = f"{os.getpid()} {backend}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
