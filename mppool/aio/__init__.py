"""mppool from asyncio code.

- ``client = await mppool.aio.connect()``: the same shared pools, supervisor, lease channel
  and watchdog as `mppool.connect`, with coroutines that never block the event loop
  (`mppool.aio.client`), over an asyncio end of the lease channel (`mppool.aio.channel`) and
  of the control plane (`mppool.aio.control`).
- ``mppool.aio.ConnectionPool``: asyncio-connection-pool's pool, drop-in, with an optional
  cross-process ``budget=`` (an async token pool) and psycopg_pool's ``check=``,
  ``max_waiting=`` and counters (`mppool.aio.connection_pool`), its lifecycle (``open=``,
  ``await pool.open()``/``wait()``, ``async with pool:``) and its backoff when connecting
  fails (``reconnect_timeout=``, ``reconnect_failed=``; `mppool.aio.lifecycle`); ready
  strategies in `mppool.aio.strategies`.
"""

from .client import AsyncClient, AsyncSharedPool, connect
from .connection_pool import ConnectionPool, ConnectionStrategy

__all__ = ["AsyncClient", "AsyncSharedPool", "ConnectionPool", "ConnectionStrategy", "connect"]
