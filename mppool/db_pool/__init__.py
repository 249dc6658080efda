"""eventlet's ``db_pool`` on native threads: pools of DB-API 2 connections.

Two pools, one API (``get``/``put``/``item``/``clear``/``free``/``waiting``):

    RawConnectionPool                      TpooledConnectionPool (= ConnectionPool)
    ┌ this process ───────────────┐        ┌ any process ───────┐      ┌ supervisor ────────────────┐
    │ get() → PooledConnection-   │        │ get() → Pooled-    │ ───▶ │ shared pool "db_pool:..."  │
    │         Wrapper(conn)       │        │   ConnectionWrapper│      │  └ _ServedConnection slots │
    │ core mppool.Pool            │        │   (ObjectProxy)    │ ◀─── │     └ the real connection  │
    │  └ budget token per conn ───┼──▶ shared token pool        │      └────────────────────────────┘
    └─────────────────────────────┘        └────────────────────┘

- ``RawConnectionPool`` keeps connections in the calling process, in a core
  `mppool.Pool` (``max_idle`` → ``max_avail_delay``, ``max_age`` → ``max_lifetime``).
  With ``budget=<token pool>`` every connection holds a token, so the total across processes
  is capped, and idle connections are given back when another process waits.
- ``TpooledConnectionPool`` keeps connections in the supervisor, in a shared pool created
  with ``transfer="proxy"``; every process uses them through proxies (cursors too). Each pool
  object is its own pool (shared with the processes forked from its own); ``share="name"``
  makes one pool for every process passing that name and the same connection arguments (the
  first one's sizes apply). The last process to leave closes its connections (tpooled.py
  says why and how).

Differences from eventlet, all deliberate:

- ``get(timeout=None)`` also takes a timeout (``mppool.TimeOut``), as ``mppool.pools`` does.
- ``put(None)`` gives up the slot of the calling thread's most recent connection: that
  connection is closed (it must not outlive its slot, or the bound would be a lie) and its
  wrapper becomes unusable. eventlet only shrinks a counter. With no connection out in the
  calling thread, ``put(None)`` logs a warning and changes nothing.
- ``put()`` of a wrapper already returned, or of an object this pool never lent, logs a
  warning and changes nothing (eventlet would count it as a lost connection and let the pool
  grow past ``max_size``).
- ``connect_timeout`` is enforced by running ``connect`` in a helper thread; a connection
  arriving after the timeout is closed at once. ``connect_timeout=None`` means no limit
  (the connection is then made in the calling thread).
- sqlite3: connections are made in a helper thread and shared between threads, so pass
  ``check_same_thread=False``.
- Connection-wrapper: every attribute not defined on the wrapper is forwarded to the
  connection (reads and writes), so driver-specific API (``conn.execute``, ``conn.autocommit
  = True``) works with any DB-API module, not only eventlet's MySQLdb list.
- ``free_items`` is a snapshot, not the pool's own deque; a TpooledConnectionPool's items
  carry None for the connection (it is in the supervisor).
- ``clear()`` on a RawConnectionPool with ``min_size > 0``: housekeeping opens ``min_size``
  connections again at its next round (eventlet: at the next ``get()``).

The package, by concept (every name above is importable from ``mppool.db_pool``):

    base.py        BaseConnectionPool: eventlet's API and constructor, put()'s rules
    raw.py         RawConnectionPool: connections in this process, in a core mppool.Pool
    tpooled.py     TpooledConnectionPool (= ConnectionPool): connections in the supervisor
    served.py      what a TpooledConnectionPool's shared pool runs in the supervisor
    wrappers.py    the connection wrappers that get() returns
    connecting.py  connect with a timeout, close and wait for the server to let go
    databases.py   DatabaseConnector: a pool per (host, database)

The constructor is written once, on BaseConnectionPool, and inherited: its signature (eventlet's,
plus ``budget=`` and ``client=``) is what IDEs and the docs show for both pools. Each pool adapts
it to where its connections live with two hooks instead of an ``__init__`` of its own:
``_check_home`` refuses the other pool's keyword before anything else is checked, and ``_open``
builds the pool underneath once the arguments are checked.
"""

from __future__ import annotations

# ``X as X``: importable from here as before, though not in ``from mppool.db_pool import *``.
# The served.py names travel to the supervisor by pickle: older pickles name them here.
from ..budget import Budget as Budget
from ..errors import ConnectTimeout
from .base import BaseConnectionPool, cleanup_rollback
from .base import Cleanup as Cleanup
from .connecting import CLOSE_WAIT as CLOSE_WAIT
from .databases import DatabaseConnector
from .raw import RawConnectionPool
from .served import _close_served as _close_served
from .served import _Connector as _Connector
from .served import _served_stats as _served_stats
from .served import _ServedConnection as _ServedConnection
from .tpooled import ConnectionPool, TpooledConnectionPool
from .tpooled import shared_pool_name as shared_pool_name
from .wrappers import GenericConnectionWrapper, PooledConnectionWrapper

__all__ = [
    "BaseConnectionPool",
    "ConnectTimeout",
    "ConnectionPool",
    "DatabaseConnector",
    "GenericConnectionWrapper",
    "PooledConnectionWrapper",
    "RawConnectionPool",
    "TpooledConnectionPool",
    "cleanup_rollback",
]
