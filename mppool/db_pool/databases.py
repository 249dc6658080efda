"""DatabaseConnector: one connection pool per (host, database), made on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..validate import check_callable
from .base import BaseConnectionPool
from .connecting import check_db_module
from .tpooled import ConnectionPool


class DatabaseConnector:
    """A connection pool per (host, database) (eventlet's ``DatabaseConnector``).

    ``credentials`` maps a host name (or ``"default"``) to connect keyword arguments.
    ``get(host, dbname)`` returns the pool for that pair, created on first use with
    ``conn_pool(module, *args, **kwargs, db=dbname, host=host, **credentials)`` — eventlet's
    keywords (MySQLdb's); a subclass may set ``database_keyword = "dbname"`` for libpq drivers.
    """

    database_keyword = "db"

    def __init__(self, module: Any, credentials: Mapping[str, Mapping[str, Any]],
                 conn_pool: Callable[..., BaseConnectionPool] | None = None,
                 *args: Any, **kwargs: Any) -> None:
        check_db_module(module)
        if not isinstance(credentials, Mapping):
            raise TypeError(f"credentials must be a mapping of host to connect arguments, "
                            f"got {credentials!r}")
        check_callable("conn_pool", conn_pool)
        self._conn_pool_class = conn_pool if conn_pool is not None else ConnectionPool
        self._module = module
        self._args = args
        self._kwargs = kwargs
        self._credentials = credentials
        self._databases: dict[tuple[str, str], BaseConnectionPool] = {}
        self._lock = threading.Lock()

    def credentials_for(self, host: str) -> Mapping[str, Any] | None:
        if host in self._credentials:
            return self._credentials[host]
        return self._credentials.get("default", None)

    def get(self, host: str, dbname: str) -> BaseConnectionPool:
        """The connection pool for ``dbname`` on ``host``."""
        key = (host, dbname)
        with self._lock:
            pool = self._databases.get(key)
            if pool is None:
                credentials = self.credentials_for(host)
                if credentials is None:
                    raise ValueError(f"no credentials for host {host!r} and no 'default' entry")
                new_kwargs = dict(self._kwargs)
                new_kwargs[self.database_keyword] = dbname
                new_kwargs["host"] = host
                new_kwargs.update(credentials)
                pool = self._databases[key] = self._conn_pool_class(
                    self._module, *self._args, **new_kwargs)
            return pool
