"""queuepool's psycopg2 resource managers: ``ConnectionManager`` and its query helpers.

``ConnectionManager(name, isolation_level=None, readonly=None, deferrable=None,
autocommit=None, *args, **kwargs)`` opens ``psycopg2.connect(*args, **kwargs)`` and applies
the session settings with ``set_session``. At every put it repairs the connection: a
transaction left open or failed is rolled back; a connection whose server is gone, or that
was closed behind the manager's back, is closed (and reopened at the next take). A rollback
that fails also closes it, instead of handing a broken connection to the next user.

``ConnectionManagerExtended`` adds queuepool's helpers: ``query`` (rows as dicts),
``querys`` (rows and ``cursor.description``), ``query1`` (the only row as a dict, else
None), ``qexec`` (no result), ``now_expr`` and ``geojson`` (PostGIS).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import psycopg2
from psycopg2 import extensions as _ext
from psycopg2 import sql as pgsql

from ..db_pool.connecting import CLOSE_WAIT, _wait_eof, peer_socket
from .pool import ResourceManager

__all__ = ["ConnectionManager", "ConnectionManagerExtended"]

log = logging.getLogger("mppool")


class ConnectionManager(ResourceManager):
    """One psycopg2 connection, opened lazily by the pool and repaired at every put."""

    def __init__(self, name: str, isolation_level: Any = None, readonly: bool | None = None,
                 deferrable: bool | None = None, autocommit: bool | None = None,
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(name)
        self.autocommit = autocommit
        self.isolation_level = isolation_level
        self.readonly = readonly
        self.deferrable = deferrable
        self._args = args
        self._kwargs = kwargs
        self._sock: Any = None  # a duplicate of the connection's socket (see close())

    def __repr__(self) -> str:
        return str({"autocommit": self.autocommit, "isolation_level": self.isolation_level,
                    "readonly": self.readonly, "deferrable": self.deferrable,
                    "ResourceManager": super().__repr__()})

    def open(self) -> None:
        conn = psycopg2.connect(*self._args, **self._kwargs)
        try:
            conn.set_session(isolation_level=self.isolation_level, readonly=self.readonly,
                             deferrable=self.deferrable, autocommit=self.autocommit)
        except BaseException:
            sock = peer_socket(conn)  # a half-set-up connection is never kept
            conn.close()
            if sock is not None:
                with sock:
                    _wait_eof(sock, CLOSE_WAIT)
            raise
        self.resource = conn
        self._sock = peer_socket(conn)
        super().open()

    def close(self) -> None:
        """Close the connection and wait (up to a few seconds) until the server dropped it:
        ``close()`` only asks, and the server process lingers for a moment, still counted
        in ``pg_stat_activity``. With a budget the token goes back after this returns, so
        without the wait a connection opened elsewhere with it could overlap this one. The
        socket duplicated at open() lets it wait even when the connection was closed
        behind the manager's back."""
        conn, self.resource = self.resource, None
        sock, self._sock = self._sock, None
        try:
            if conn is not None and not conn.closed:
                conn.close()
        finally:
            if sock is not None:
                with sock:
                    _wait_eof(sock, CLOSE_WAIT)
            super().close()

    def repair(self) -> None:
        """Roll back a transaction left open or failed; close a connection that is lost."""
        if not self._isOpen:
            return
        conn = self.resource
        if conn is None or conn.closed:
            self.close()  # closed outside the manager
            return
        status = conn.info.transaction_status
        if status == _ext.TRANSACTION_STATUS_UNKNOWN:
            self.close()  # the server connection is lost
        elif status != _ext.TRANSACTION_STATUS_IDLE:
            try:
                conn.rollback()  # INTRANS, INERROR, or ACTIVE
            except psycopg2.Error:
                log.info("mppool: queuepool connection %s: rollback failed, closing it", self.name)
                self.close()

    def putRepair(self) -> None:
        self.repair()
        super().putRepair()


class ConnectionManagerExtended(ConnectionManager):
    """`ConnectionManager` with queuepool's query helpers, run on ``resource``."""

    def now_expr(self, t: float = 0) -> str:
        """SQL for now + ``t`` seconds, as epoch milliseconds (a bigint)."""
        return f"((extract(epoch from now())+{float(t)!r})*1000)::bigint"

    def querys(self, query: Any, args: Any = None) -> tuple[list[tuple[Any, ...]], Any]:
        """The rows (tuples) and the cursor's description."""
        with self.resource.cursor() as c:
            c.execute(query, args)
            return c.fetchall(), c.description

    def query(self, query: Any, args: Any = None) -> list[dict[str, Any]]:
        """The rows, each a dict of column name to value."""
        rows, desc = self.querys(query, args)
        names = [d[0] for d in desc]
        return [dict(zip(names, row, strict=True)) for row in rows]

    def query1(self, query: Any, args: Any = None) -> dict[str, Any] | None:
        """The only row as a dict; None if there are none or several."""
        rows = self.query(query, args)
        return rows[0] if len(rows) == 1 else None

    def qexec(self, query: Any, args: Any = None) -> None:
        """Run a statement, fetching nothing."""
        with self.resource.cursor() as c:
            c.execute(query, args)

    def geojson(self, geomColumn: str, attrColumns: list[str], selectQuery: str,
                args: Any = None, prec: int = 5) -> dict[str, Any]:
        """A GeoJSON FeatureCollection of ``selectQuery``'s rows (needs PostGIS)."""
        q = pgsql.SQL("with x as (" + selectQuery + ") select ST_AsGeoJSON({}, "
                      + str(int(prec)) + ") as geometry, {} from x").format(
            pgsql.Identifier(geomColumn),
            pgsql.SQL(", ").join(map(pgsql.Identifier, attrColumns)))
        features = [{"type": "Feature", "geometry": json.loads(r["geometry"]),
                     "properties": {k: v for k, v in r.items() if k != "geometry"}}
                    for r in self.query(q, args)]
        return {"type": "FeatureCollection", "features": features}
