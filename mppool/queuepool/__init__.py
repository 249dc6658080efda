"""queuepool's API on mppool: a LIFO pool of resource managers the user puts in.

``from mppool.queuepool import Pool, ResourceManager`` and
``from mppool.queuepool.psycopg2cm import ConnectionManager`` replace queuepool's imports.
``take(timeout=...)`` and ``Pool(..., budget=...)`` are mppool's additions: a bounded wait,
and a cap on the resources open at once across processes. See pool.py for the details and
the differences from queuepool.
"""

from .pool import Pool, ResourceManager

__all__ = ["Pool", "ResourceManager"]
