"""A FastAPI app whose worker processes share one budget of PostgreSQL connections.

Run it with ``uvicorn fastapi_app:app --workers 4``: whatever the number of workers, at most
two connections to PostgreSQL exist at any moment. The same code is shown in docs/asyncio.md,
and tests/test_fastapi_example.py runs it.
"""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI

import mppool.aio
from mppool.aio.strategies import PsycopgStrategy

DSN = os.environ.get("APP_DSN", "postgresql://postgres@127.0.0.1:5432/test")
state = {}


@asynccontextmanager
async def lifespan(app):
    # MPPOOL_ADDRESS, else the per-user default; the first worker starts the supervisor.
    client = await mppool.aio.connect(autostart=True)
    budget = await client.token_pool("pg", 2)  # two connections, all workers together
    state["pool"] = mppool.aio.ConnectionPool(
        strategy=PsycopgStrategy(DSN, autocommit=True), max_size=2, budget=budget)
    yield
    await state["pool"].close()
    await client.close()


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def index():
    async with state["pool"].get_connection() as conn:
        cur = await conn.execute("select pg_backend_pid()")
        (backend,) = await cur.fetchone()
    return {"backend": backend}
