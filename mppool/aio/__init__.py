"""mppool from asyncio code."""

from .connection_pool import ConnectionPool, ConnectionStrategy

__all__ = ["ConnectionPool", "ConnectionStrategy"]
