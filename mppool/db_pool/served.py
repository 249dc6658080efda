"""The supervisor's side of a TpooledConnectionPool: the slots its shared pool lends.

    client process                            supervisor
    TpooledConnectionPool ── _Connector ────▶ the shared pool's fun (pickled once, at creation)
      get() ◀── ObjectProxy ────────────────  a _ServedConnection slot, lent by the pool:
      conn.cursor(), conn.commit(), ... ────▶   every attribute forwarded to its connection,
                                                (re)connected on first use; discard or
                                                close() closes the connection, never the slot

Everything here runs in the supervisor: the DB module is imported there, by name. These
names travel by pickle (the pool's fun, closer and stats hooks), so they keep their names.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Any

from ..remote import WithValue, is_plain
from .connecting import module_name, safe_close, timed_connect

log = logging.getLogger("mppool")


class _Connector:
    """The shared pool's ``fun``: runs in the supervisor, where it imports the DB module."""

    def __init__(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 connect_timeout: float | None) -> None:
        self.target = target  # an import name, or a module-like object shipped as is
        self.args = args
        self.kwargs = kwargs
        self.connect_timeout = connect_timeout

    def module(self) -> Any:
        return importlib.import_module(self.target) if isinstance(self.target, str) else self.target

    def connect(self) -> Any:
        module = self.module()
        return timed_connect(lambda: module.connect(*self.args, **self.kwargs),
                             self.connect_timeout, module_name(self.target))

    def __call__(self, num: int) -> _ServedConnection:
        return _ServedConnection(self)


class _ServedConnection:
    """One slot of a shared pool, in the supervisor: holds at most one real connection.

    Clients reach it through an ObjectProxy, and it forwards everything to the connection.
    A client cannot make the supervisor drop a pooled object, so "discard" closes the
    connection inside the slot instead, and the slot reconnects on its next use: the number
    of connections never exceeds the number of slots, hence ``max_size``.
    """

    def __init__(self, connector: _Connector) -> None:
        self._mppool_connector = connector
        self._mppool_lock = threading.Lock()
        self._mppool_conn: Any = None
        self._mppool_since = time.time()  # when the connection was made (eventlet's created_at)
        self._mppool_conn = connector.connect()  # errors propagate to get(): no slot taken

    def _mppool_ensure(self) -> Any:
        with self._mppool_lock:
            if self._mppool_conn is None:
                self._mppool_conn = self._mppool_connector.connect()
                self._mppool_since = time.time()
            return self._mppool_conn

    def _mppool_discard(self) -> None:
        with self._mppool_lock:
            conn, self._mppool_conn = self._mppool_conn, None
        if conn is not None:
            safe_close(conn, quiet=True)

    def _mppool_connected(self) -> bool:
        return self._mppool_conn is not None

    def rollback(self) -> None:
        # Also the supervisor's reset when a holder dies: no connection, nothing to undo.
        conn = self._mppool_conn
        if conn is not None:
            conn.rollback()

    def _mppool_execute(self, cargs: tuple[Any, ...], ckwargs: dict[str, Any], method: str,
                        args: tuple[Any, ...], kwargs: dict[str, Any]) -> WithValue:
        """``conn.cursor(*cargs, **ckwargs).<method>(*args, **kwargs)`` in one call: the first
        execute of a client's deferred cursor (cursor.py). Returns the cursor (to proxy) with
        what the method returned: "self" when it returned the cursor (psycopg, sqlite3), else
        its value (None for psycopg2, a row count for MySQLdb). A cursor whose method raised
        is closed, and the error is the caller's, as if the execute had raised alone."""
        cur = self._mppool_ensure().cursor(*cargs, **ckwargs)
        try:
            ret = getattr(cur, method)(*args, **kwargs)
        except BaseException:
            try:
                cur.close()
            except Exception:
                log.debug("mppool: db_pool: closing a cursor whose %s raised", method,
                          exc_info=True)
            raise
        return WithValue(cur, ("self", None) if ret is cur
                         else ("value", ret if is_plain(ret) else None))

    def close(self) -> None:
        """A client closing the raw proxy closes the connection; the slot reconnects later."""
        self._mppool_discard()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_mppool"):
            raise AttributeError(name)  # not yet set in __init__: never forward those
        return getattr(self._mppool_ensure(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_mppool"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._mppool_ensure(), name, value)

    def __repr__(self) -> str:
        state = "open" if self._mppool_conn is not None else "not connected"
        return f"<{module_name(self._mppool_connector.target)} connection, {state}>"


def _close_served(slot: _ServedConnection) -> None:
    slot._mppool_discard()


def _served_stats(slot: _ServedConnection) -> dict[str, Any]:
    return {"connected": slot._mppool_connected(), "since": slot._mppool_since}


# ---------------------------------------------------------------- who uses which pool
#
# A TpooledConnectionPool's shared pool must close its connections once nobody uses it any
# more (so that, say, DROP DATABASE works after the pools are gone). Every process that uses
# one registers here, by control call, as (pid, start time, host, instance token): leaving
# (close(), the pool object garbage collected, the interpreter exiting) unregisters, and a
# reaper thread unregisters processes that died without leaving. The last one out drops the
# pool: the supervisor shuts it down and every slot's connection is closed.

User = tuple[int, float, str, str]

REAP_PERIOD = 0.5  # seconds between two scans for users that died without leaving

_users_lock = threading.Lock()
_users: dict[str, set[User]] = {}
_reaper: threading.Thread | None = None


def _join(name: str, user: User) -> bool:
    """Runs in the supervisor: ``user`` now uses the shared pool ``name``. False if there is
    no such pool (its last user left just before: the caller creates it again)."""
    global _reaper
    with _users_lock:
        if not _served(name):
            return False
        _users.setdefault(name, set()).add(user)
        if _reaper is None or not _reaper.is_alive():
            _reaper = threading.Thread(target=_reap_forever, name="mppool-db_pool-users",
                                       daemon=True)
            _reaper.start()
    return True


def _leave(name: str, user: User) -> bool:
    """Runs in the supervisor: ``user`` is done with ``name``; True if that dropped it.

    The drop happens under the lock, so that a user joining at the same moment either
    counts (and nothing is dropped) or finds the pool gone (and creates it again)."""
    with _users_lock:
        users = _users.get(name)
        if users is None or user not in users:
            return False
        users.discard(user)
        if users:
            return False
        del _users[name]
        _drop(name)
    return True


def _users_of(name: str) -> int:
    """Runs in the supervisor: how many users ``name`` has (for tests and stats)."""
    with _users_lock:
        return len(_users.get(name, ()))


def _reap_forever() -> None:
    from ..holder import Holder

    while True:
        time.sleep(REAP_PERIOD)
        try:
            with _users_lock:
                snapshot = {name: set(users) for name, users in _users.items()}
            for name, users in snapshot.items():
                for user in users:
                    if not Holder(user[0], user[1], user[2]).alive():
                        log.info("mppool: db_pool: process %d died without leaving %s", user[0],
                                 name)
                        _leave(name, user)
        except Exception:  # the reaper must outlive any surprise
            log.warning("mppool: db_pool: scanning pool users failed", exc_info=True)


def _served(name: str) -> bool:
    from ..supervisor.control import get_control

    return name in get_control()._sup.registry.records


def _drop(name: str) -> None:
    from ..supervisor.control import get_control

    if not _served(name):
        return  # shut down already (shutdown(), or the operator)
    log.info("mppool: db_pool: the last user of %s left: closing its connections", name)
    try:
        get_control()._sup.drop(name)
    except Exception:
        log.warning("mppool: db_pool: dropping %s failed", name, exc_info=True)
