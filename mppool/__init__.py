"""mppool: one bounded pool of resources shared by many processes.

The public names live in private modules and are re-exported here.
"""

from .errors import ConnectTimeout, PoolClosed, PoolException, ServerUnavailable, TimeOut
from .pool import Pool

__all__ = ["Pool", "PoolException", "TimeOut", "PoolClosed", "ServerUnavailable",
           "ConnectTimeout"]
__version__ = "0.1.0"
