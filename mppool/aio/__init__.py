"""mppool from asyncio code: ``client = await mppool.aio.connect()``.

The same shared pools, supervisor, lease channel and watchdog as `mppool.connect`, with
coroutines that never block the event loop (`mppool.aio.client`), over an asyncio end of the
lease channel (`mppool.aio.channel`) and of the control plane (`mppool.aio.control`).
"""

from .client import AsyncClient, AsyncSharedPool, connect

__all__ = ["AsyncClient", "AsyncSharedPool", "connect"]
