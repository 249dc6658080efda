"""Ready ``ConnectionStrategy`` classes for psycopg's ``AsyncConnection`` and redis-py's
asyncio client. The drivers are imported when the first connection is made, so this module
imports without them; a missing one raises ``ImportError`` naming the package to install.

``connection_is_closed`` must answer without awaiting. Both strategies therefore look at the
socket too: an idle connection whose server end was closed (a restart, ``pg_terminate_backend``,
``CLIENT KILL``, an idle timeout) is seen as closed before it is handed out, not at its
first failed query.
"""

from __future__ import annotations

import asyncio
import importlib
import select
from types import ModuleType
from typing import Any

from .connection_pool import ConnectionStrategy

__all__ = ["PsycopgStrategy", "RedisStrategy"]


def _require(module: str, package: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs the {package!r} package: pip install {package}") from exc


def _readable(fd: int) -> bool:
    """Is there something to read on ``fd`` right now (data, EOF or an error)? No wait."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # pragma: no cover (no poll: Windows)


class PsycopgStrategy(ConnectionStrategy[Any]):
    """psycopg 3 ``AsyncConnection``s: ``PsycopgStrategy(conninfo, **kwargs)`` passes its
    arguments to ``await psycopg.AsyncConnection.connect(conninfo, **kwargs)``.

    A connection is closed when psycopg says it is closed or broken, or when, idle outside a
    transaction, its socket has something to read and libpq then finds the connection bad
    (the server ended it). Connections are handed out as they were returned: commit or roll
    back inside the block, or use ``autocommit=True``.
    """

    def __init__(self, conninfo: str = "", **kwargs: Any) -> None:
        self.conninfo = conninfo
        self.kwargs = kwargs

    async def make_connection(self) -> Any:
        psycopg = _require("psycopg", "psycopg", "mppool.aio.strategies.PsycopgStrategy")
        return await psycopg.AsyncConnection.connect(self.conninfo, **self.kwargs)

    def connection_is_closed(self, conn: Any) -> bool:
        if conn.closed or conn.broken:
            return True
        from psycopg import pq

        pgconn = conn.pgconn
        if pgconn.transaction_status != pq.TransactionStatus.IDLE:
            return False  # in a transaction or a query: not ours to probe
        try:
            # Non-blocking reads of what the server sent: a terminated backend sends its
            # error, then EOF, which libpq sees on the next read and marks the connection bad.
            for _ in range(4):
                if not _readable(pgconn.socket):
                    break
                pgconn.consume_input()
                if pgconn.status != pq.ConnStatus.OK:
                    return True
        except Exception:
            return True
        return bool(pgconn.status != pq.ConnStatus.OK)

    async def close_connection(self, conn: Any) -> None:
        """Close, then wait (up to ``db_pool.CLOSE_WAIT`` s) for the server to drop its end.

        ``close()`` only sends "terminate": the server process lives on for a moment, still
        counted in ``pg_stat_activity`` and against ``max_connections``. The budget token goes
        back when this returns, so without the wait a connection opened with that token in
        another process could overlap this one, server side, and the cap would be exceeded
        where PostgreSQL counts it.
        """
        from ..db_pool.connecting import CLOSE_WAIT, peer_socket

        sock = peer_socket(conn)
        await conn.close()
        if sock is None:
            return
        with sock:
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(CLOSE_WAIT):
                    while await loop.sock_recv(sock, 4096):
                        pass  # what the server still had to say; EOF means it is gone
            except (TimeoutError, OSError):
                pass  # reset, or slow to go: either way, stop waiting


class RedisStrategy(ConnectionStrategy[Any]):
    """redis-py asyncio clients, one server connection each: ``RedisStrategy(url, **kwargs)``
    calls ``redis.asyncio.Redis.from_url(url, single_connection_client=True, **kwargs)`` and
    opens its connection before handing it out.

    A client is closed when it has no connection, its connection is not connected, or the
    server closed it (the stream reader saw EOF).
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", **kwargs: Any) -> None:
        self.url = url
        self.kwargs = kwargs

    async def make_connection(self) -> Any:
        _require("redis", "redis", "mppool.aio.strategies.RedisStrategy")
        from redis.asyncio import Redis

        client = Redis.from_url(self.url, single_connection_client=True, **self.kwargs)
        try:
            await client.initialize()  # connects now: every client holds one connection
        except BaseException:
            await client.aclose()
            raise
        return client

    def connection_is_closed(self, conn: Any) -> bool:
        connection = getattr(conn, "connection", None)
        if connection is None or not connection.is_connected:
            return True
        reader = getattr(connection, "_reader", None)
        return bool(reader is not None and reader.at_eof())

    async def close_connection(self, conn: Any) -> None:
        await conn.aclose()
