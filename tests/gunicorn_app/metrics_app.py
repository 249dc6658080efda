"""A WSGI app for the worker-side metrics test: ``/use`` takes an object from the worker's
own budget-backed pool and gives it back; ``/metrics`` is prometheus_client's multiprocess
exposition (every worker's files summed), as an application would serve it."""

from __future__ import annotations

import os
import threading
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

import mppool

_pool: mppool.Pool | None = None
_lock = threading.Lock()


def _get_pool() -> mppool.Pool:
    global _pool
    with _lock:
        if _pool is None:
            budget = mppool.connect().token_pool("metrics-budget", 8)
            _pool = mppool.Pool(lambda i: object(), max_size=2, min_size=0, budget=budget,
                                name="local")
        return _pool


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    if environ["PATH_INFO"] == "/metrics":
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body, ctype = generate_latest(registry), CONTENT_TYPE_LATEST
    else:
        pool = _get_pool()
        with pool.obj():
            pass
        body, ctype = str(os.getpid()).encode(), "text/plain"
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]
