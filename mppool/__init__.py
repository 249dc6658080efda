"""mppool: one bounded pool of resources shared by many processes.

The public names live in private modules and are re-exported here.
"""

from .client import Client, SharedPool, connect
from .errors import ConnectTimeout, PoolClosed, PoolException, ServerUnavailable, TimeOut
from .pool import Pool
from .server import Server

__all__ = [
           "Client",
           "ConnectTimeout",
           "Pool",
           "PoolClosed",
           "PoolException",
           "Server",
           "ServerUnavailable",
           "SharedPool",
           "TimeOut",
           "connect",
]
__version__ = "0.1.0"
