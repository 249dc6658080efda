"""mppool: one bounded pool of resources shared by many processes.

The public names live in private modules and are re-exported here.
"""

from . import fastpath as _fastpath  # noqa: F401  (registers token_pool(fast=True))
from .client import Client, SharedPool, connect
from .errors import (
    ConnectTimeout,
    PoolClosed,
    PoolException,
    RemoteError,
    ServerUnavailable,
    TimeOut,
    TooManyRequests,
)
from .pool import Pool
from .server import Server
from .version import __version__ as __version__

__all__ = [
           "Client",
           "ConnectTimeout",
           "Pool",
           "PoolClosed",
           "PoolException",
           "RemoteError",
           "Server",
           "ServerUnavailable",
           "SharedPool",
           "TimeOut",
           "TooManyRequests",
           "connect",
]
