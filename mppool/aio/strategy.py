"""What a `mppool.aio.ConnectionPool` is given: a ``ConnectionStrategy`` (how to make, check
and close one kind of connection; asyncio-connection-pool's interface) and, optionally, an
``AsyncBudget`` (a token pool shared by processes). Ready strategies are in
`mppool.aio.strategies`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["AsyncBudget", "Conn", "ConnectionStrategy"]

Conn = TypeVar("Conn")


class AsyncBudget(Protocol):
    """An async token pool capping live connections across processes (``await
    client.token_pool(...)`` of an ``mppool.aio`` client). ``waiting()`` is optional: without
    it, idle connections are never given back early."""

    async def get(self, timeout: float | None = None) -> Any: ...
    async def put(self, token: Any) -> None: ...


class ConnectionStrategy(ABC, Generic[Conn]):
    """How to make, check and close one kind of connection.

    ``close_connection`` may be a plain or an ``async`` method; the pool awaits its result
    when it is awaitable. It is also called on connections found stale, so it must accept a
    connection that is already closed or broken.
    """

    @abstractmethod
    async def make_connection(self) -> Conn:
        """Open a new connection."""

    @abstractmethod
    def connection_is_closed(self, conn: Conn) -> bool:
        """True if ``conn`` can no longer be used; checked (without awaiting) before every
        hand-out."""

    @abstractmethod
    def close_connection(self, conn: Conn) -> Awaitable[None] | None:
        """Close ``conn``."""
