"""SQLAlchemy engines whose connections, across all processes, stay under one budget.

::

    import mppool, mppool.sqlalchemy
    budget = mppool.connect(autostart=True).token_pool("pg-connections", 20)
    engine = mppool.sqlalchemy.create_engine("postgresql+psycopg://app@localhost/app", budget=budget)

SQLAlchemy does no pooling of its own (``NullPool``); each process keeps its connections in a
`mppool.db_pool.RawConnectionPool` drawing on ``budget``, a shared token pool: every open
connection holds one token. Build the engine in each process after a fork, never before.
Supported URLs: ``postgresql+psycopg`` (or ``postgresql``), ``postgresql+psycopg2``, ``sqlite``.
"""

from __future__ import annotations

import weakref
from typing import Any

import sqlalchemy
from sqlalchemy.pool import NullPool

from .db_pool import RawConnectionPool

__all__ = ["ReturnsToPool", "create_engine", "engine_on", "pool_of"]

_pools: weakref.WeakKeyDictionary[Any, RawConnectionPool] = weakref.WeakKeyDictionary()


class ReturnsToPool:
    """Mixed into a driver's connection class: while SQLAlchemy holds the connection, its
    close() gives it back to the pool; otherwise (the pool closing it) it really closes."""

    def close(self) -> None:
        pool = self.__dict__.pop("_mppool_pool", None)
        if pool is None:
            super().close()  # type: ignore[misc]
        else:
            pool.put(self)


def engine_on(pool: RawConnectionPool, url: str | sqlalchemy.URL,
              **engine_options: Any) -> sqlalchemy.Engine:
    """An engine that borrows its connections from ``pool`` and returns them there; the URL
    only picks the dialect. The pool's driver must make `ReturnsToPool` connections."""

    def creator() -> Any:
        conn = pool.get()._base  # the driver's connection, inside the pool's wrapper
        conn._mppool_pool = pool
        return conn

    engine = sqlalchemy.create_engine(url, creator=creator, poolclass=NullPool, **engine_options)
    _pools[engine] = pool
    return engine


def pool_of(engine: sqlalchemy.Engine) -> RawConnectionPool:
    """The `RawConnectionPool` behind an engine of this module (``shutdown()`` it at the end)."""
    return _pools[engine]


def create_engine(url: str | sqlalchemy.URL, *, budget: Any, max_size: int = 5,
                  max_idle: float = 10.0, max_age: float = 300.0,
                  pool_options: dict[str, Any] | None = None,
                  **engine_options: Any) -> sqlalchemy.Engine:
    """An engine for ``url`` whose connections hold a token of ``budget`` each.

    ``max_size``: this process's own bound; ``max_idle``/``max_age`` (seconds): close idle or
    old connections (giving their tokens back); ``pool_options``: more `RawConnectionPool`
    options (``connect_timeout``, ``min_size``...); ``engine_options`` go to SQLAlchemy.
    """
    u = sqlalchemy.make_url(url)
    backend = u.get_backend_name()
    # A bare postgresql:// (libpq's spelling, as in MPPOOL_PG_DSN) means psycopg 3 here.
    driver = "psycopg" if u.drivername == "postgresql" else u.get_driver_name()
    options = dict(max_size=max_size, max_idle=max_idle, max_age=max_age, budget=budget,
                   **(pool_options or {}))
    if backend == "postgresql" and driver == "psycopg":
        dsn = u.set(drivername="postgresql").render_as_string(hide_password=False)
        pool = RawConnectionPool(_psycopg_class(), conninfo=dsn, **options)
        dialect = "postgresql+psycopg://"
    elif backend == "postgresql" and driver == "psycopg2":
        import psycopg2

        dsn = u.set(drivername="postgresql").render_as_string(hide_password=False)
        pool = RawConnectionPool(psycopg2, dsn=dsn, connection_factory=_psycopg2_class(),
                                 **options)
        dialect = "postgresql+psycopg2://"
    elif backend == "sqlite" and driver in ("pysqlite", "sqlite"):
        import sqlite3

        class SqliteConnection(ReturnsToPool, sqlite3.Connection):
            pass

        # check_same_thread=False: made in a helper thread, used by whichever thread checks out.
        pool = RawConnectionPool(sqlite3, database=u.database or ":memory:",
                                 factory=SqliteConnection, check_same_thread=False, **options)
        dialect = "sqlite://"
    else:
        raise ValueError(f"mppool.sqlalchemy.create_engine supports postgresql+psycopg, "
                         f"postgresql+psycopg2 and sqlite URLs, got {u.drivername!r}; for "
                         "another driver, build a RawConnectionPool and use engine_on()")
    return engine_on(pool, dialect, **engine_options)


def _psycopg_class() -> type:
    import psycopg

    class PGConnection(ReturnsToPool, psycopg.Connection):
        def add_notice_handler(self, callback: Any) -> None:
            # SQLAlchemy takes each checkout for a new connection and adds its handler each
            # time: add it once.
            handlers = self.__dict__.setdefault("_mppool_notice_handlers", set())
            if callback not in handlers:
                handlers.add(callback)
                super().add_notice_handler(callback)

    return PGConnection


def _psycopg2_class() -> type:
    import psycopg2.extensions

    class PG2Connection(ReturnsToPool, psycopg2.extensions.connection):
        pass

    return PG2Connection
