"""mppool: one bounded pool of resources shared by many processes.

The public names live in private modules and are re-exported here.
"""

from .errors import ConnectTimeout, PoolClosed, PoolException, ServerUnavailable, TimeOut
from .client import Client, SharedPool, connect
from .pool import Pool
from .server import Server

__all__ = ["Pool", "Server", "connect", "Client", "SharedPool", "PoolException", "TimeOut", "PoolClosed", "ServerUnavailable",
           "ConnectTimeout"]
__version__ = "0.1.0"
