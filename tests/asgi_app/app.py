"""A plain ASGI app for the uvicorn-worker end-to-end test: every request uses a PostgreSQL
connection from a per-worker ``mppool.aio.ConnectionPool`` whose budget is a token pool of 2
shared by every worker through the supervisor the gunicorn hooks started."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import mppool.aio
from mppool.aio import ConnectionPool
from mppool.aio.strategies import PsycopgStrategy

_client: mppool.aio.AsyncClient | None = None
_pool: ConnectionPool[Any] | None = None
_lock: asyncio.Lock | None = None


async def _get_pool() -> ConnectionPool[Any]:
    """This worker's pool, built at first use, in the worker's own event loop."""
    global _client, _pool, _lock
    if _pool is not None:
        return _pool
    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        if _pool is None:
            _client = await mppool.aio.connect()  # MPPOOL_ADDRESS/MPPOOL_AUTHKEY from the hooks
            budget = await _client.token_pool("pg", int(os.environ.get("APP_BUDGET", "2")))
            _pool = ConnectionPool(
                strategy=PsycopgStrategy(os.environ["APP_DSN"], autocommit=True,
                                         application_name=os.environ["APP_NAME"]),
                max_size=1, budget=budget)
    return _pool


async def _lifespan(receive: Any, send: Any) -> None:
    global _client, _pool
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await _get_pool()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if _pool is not None:
                await _pool.close()  # idle connections closed, their tokens given back
            if _client is not None:
                await _client.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    assert scope["type"] == "http"
    pool = await _get_pool()
    async with pool.get_connection() as conn:
        cur = await conn.execute("select pg_backend_pid(), pg_sleep(0.002)")
        backend = (await cur.fetchone())[0]
    body = f"{os.getpid()} {backend}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
