"""What ``get()`` hands out: a wrapper that forwards everything to the connection.

    pool.get() ──▶ PooledConnectionWrapper(conn, pool, key)
                     every attribute ──▶ conn (reads and writes; eventlet's method list
                                                is defined, so lookups survive a return)
                     close() ──▶ pool.put(wrapper): the wrapper forgets conn and is false
                                 from then on, so no two holders ever share a connection
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .cursor import DeferredCursor, deferrable

if TYPE_CHECKING:
    from .base import BaseConnectionPool


class GenericConnectionWrapper:
    """Forwards everything to the DB-API connection ``_base`` (eventlet's wrapper; ``_base``
    is eventlet's name for the driver's connection, for code that needs the object itself).

    eventlet's list of methods (MySQLdb's) is defined here as methods, so that looking one up
    on a wrapper whose connection went back to the pool still works and the *call* raises
    AttributeError, as in eventlet. Any other attribute is forwarded on demand, reads and
    writes, so the driver's own API works too. ``autocommit`` is left to forwarding: it is a
    method in MySQLdb but a property in psycopg and sqlite3.
    """

    _base: Any

    def __init__(self, baseconn: Any) -> None:
        self._base = baseconn

    def __enter__(self) -> Any:
        return self._base.__enter__()

    def __exit__(self, exc: Any, value: Any, tb: Any) -> Any:
        return self._base.__exit__(exc, value, tb)

    def __repr__(self) -> str:
        base = self.__dict__.get("_base")
        if base is None:
            return f"<{type(self).__name__} (connection returned to its pool)>"
        return repr(base)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # copy/pickle probes must not reach the connection
        try:
            base = self.__dict__["_base"]
        except KeyError:
            raise AttributeError(f"{name!r}: this connection was returned to its pool") from None
        return getattr(base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._base, name, value)


_PROXY_METHODS = (
    "affected_rows", "begin", "change_user", "character_set_name", "close", "commit", "cursor",
    "dump_debug_info", "errno", "error", "errorhandler", "insert_id", "literal", "ping", "query",
    "rollback", "select_db", "server_capabilities", "set_character_set", "set_isolation_level",
    "set_server_option", "set_sql_mode", "show_warnings", "shutdown", "sqlstate", "stat",
    "store_result", "string_literal", "thread_id", "use_result", "warning_count",
)


def _forwarder(name: str) -> Callable[..., Any]:
    def method(self: GenericConnectionWrapper, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._base, name)(*args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"GenericConnectionWrapper.{name}"
    return method


for _name in _PROXY_METHODS:
    setattr(GenericConnectionWrapper, _name, _forwarder(_name))
del _name


class PooledConnectionWrapper(GenericConnectionWrapper):
    """What ``get()`` returns: ``close()`` gives the connection back to its pool.

    After ``close()`` (or ``pool.put(wrapper)``) the wrapper is false and every use of it
    raises AttributeError, so a connection cannot be used by two holders. As in eventlet, a
    wrapper that is garbage collected without ``close()`` does *not* return its connection
    (a finalizer may run in any thread, at any time, even inside the pool's lock).
    """

    def __init__(self, baseconn: Any, pool: BaseConnectionPool, key: int = 0) -> None:
        super().__init__(baseconn)
        self._pool: BaseConnectionPool | None = pool
        self._db_pool_key = key

    def __bool__(self) -> bool:
        # Not bool(self._base): a proxied connection would answer with a remote __len__ call.
        return "_base" in self.__dict__

    def _destroy(self) -> None:
        self._pool = None
        self.__dict__.pop("_base", None)

    def close(self) -> None:
        """Return the connection to the pool; this wrapper cannot be used afterwards."""
        pool = self.__dict__.get("_pool")
        if self and pool is not None:
            pool.put(self)
        self._destroy()


class ServedConnectionWrapper(PooledConnectionWrapper):
    """What a TpooledConnectionPool's ``get()`` returns: ``cursor()`` gives a cursor made in
    the supervisor by its first execute, in the same round trip (cursor.py)."""

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        base = self._base  # AttributeError once returned, as every method
        pool = self.__dict__.get("_pool")
        if pool is None or not deferrable(args, kwargs):
            return base.cursor(*args, **kwargs)
        return DeferredCursor(base, args, kwargs, pool._closed_cursor_error())
