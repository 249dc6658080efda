"""TpooledConnectionPool: connections kept in the supervisor, used through proxies.

    this process                                   supervisor
    TpooledConnectionPool(db_module, ..., args)    shared pool (transfer="proxy") named
      _open(): create (private) or attach  ───▶      private: "db_pool:<module>:<hash>:<unique>"
               (share="name"), then join              shared:  "db_pool:<name>:<module>:<hash>"
                                                     fun = _Connector, closer/stats hooks
      get()  ── SharedPool.get ──────────────────▶   a slot, lent as an ObjectProxy
      put()  ── cleanup through the proxy,
                SharedPool.ret (discard: the slot's connection is closed first) ──▶
      close() / garbage collected / exit ── leave ─▶ the last user out drops the pool:
                                                     every slot's connection is closed

Which pools share connections, and why:

- By default each ``TpooledConnectionPool`` is its own pool, as in eventlet: its own sizes
  and limits apply, and two pools built with the same arguments in one process never wait on
  each other. It is still shared with the processes that inherit it through ``fork()`` (a
  gunicorn app preloaded in the arbiter, a ``multiprocessing`` fork worker): they use the
  same supervisor-side connections, so their total stays within ``max_size``.
- ``share="name"`` shares one pool between every process (and every pool object) that names
  it, with the same module and connection arguments, on the same supervisor: the first
  one's sizes and limits apply, later ones attach. This is how independent programs, or
  workers that each build their own pool after the fork, bound their connections together.
  Sharing is explicit because sharing by arguments alone made two unrelated pools (a test's
  second pool, a second tenant) silently block each other under the first one's sizes.
  The connection arguments are part of the identity too (hashed), so one name can never
  hand a connection to another database.

When the connections close: ``clear()`` closes the idle ones (as in eventlet); every process
using a pool is registered in the supervisor, and leaves when it calls ``close()``, when its
pool object is garbage collected, when it exits, or (SIGKILL) when the supervisor notices it
died; when the last one leaves, the supervisor drops the pool and closes every connection, so
the database can be dropped after its pools. ``shutdown()`` drops it at once, for everyone.

Names are hashes, so passwords in the arguments never show in stats or logs.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import secrets
import types
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import dill

from ..budget import Budget
from ..errors import PoolClosed, TimeOut
from ..holder import current_holder
from .base import BaseConnectionPool, _NotOpen
from .connecting import module_name, timed_connect
from .served import _close_served, _Connector, _join, _leave, _served_stats
from .wrappers import ServedConnectionWrapper

if TYPE_CHECKING:
    from ..client import Client, SharedPool

log = logging.getLogger("mppool")


def _canonical(value: Any) -> Any:
    """A stable description of connection arguments, the same in every process."""
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((repr(k), _canonical(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canonical(v) for v in value))
    return repr(value)


def shared_pool_name(db_module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                     share: str | None = None) -> str:
    """The supervisor-side name of a TpooledConnectionPool's pool.

    With ``share``: the same for every process passing that name and these arguments.
    Without: unique to one pool object (and the processes that inherit it by fork).
    Hashed, so that passwords in the arguments never show in stats or logs.
    """
    modname = module_name(db_module)
    digest = hashlib.sha256(repr((modname, _canonical(args), _canonical(kwargs))).encode())
    if share is not None:
        return f"db_pool:{share}:{modname}:{digest.hexdigest()[:16]}"
    return f"db_pool:{modname}:{digest.hexdigest()[:16]}:{secrets.token_hex(6)}"


def _check_share(share: Any) -> None:
    if share is None:
        return
    if not isinstance(share, str):
        raise TypeError(f"share must be a name (str) or None, got {share!r}")
    if not share or not share.isprintable() or len(share) > 100:
        raise ValueError(f"share must be a printable name of 1 to 100 characters, got {share!r}")


def _in_supervisor(client: Client, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in the supervisor, within the client's timeout (client.execute waits
    as long as its user code runs; these calls are ours and short)."""
    return client._call("execute", dill.dumps((fn, args, {}), recurse=True))


def _leave_from(client: Client, name: str, user: tuple[int, float, str, str]) -> None:
    """A finalizer: may run at garbage collection or at exit, so it never raises. Only the
    process that joined leaves (a fork child inherits the finalizer, not the membership).
    It talks to the supervisor without the client's autostart: leaving must never start one."""
    if user[0] != os.getpid() or client._closed:
        return
    try:
        client._call("execute", dill.dumps((_leave, (name, user), {}), recurse=True), start=False)
    except Exception as exc:  # the supervisor notices the process is gone soon enough
        log.debug("mppool: db_pool: leaving %s failed: %r", name, exc)


class TpooledConnectionPool(BaseConnectionPool):
    """Connections kept in the supervisor, used through proxies (eventlet's default pool).

    Its own pool by default: its ``max_size`` and limits apply, shared only with processes
    forked from this one. ``share="name"`` shares the connections with every process passing
    the same name and connection arguments (the first one's sizes apply). Connections and
    cursors are used through proxies; if a process dies holding one, the supervisor rolls it
    back and reuses it. ``db_module`` may be a module or its import name: only the name
    travels, and the supervisor imports it. ``client`` is the supervisor to use
    (``mppool.connect(...)``); None means ``mppool.connect(autostart=True)``. ``budget``
    must be None.

    ``clear()`` closes the idle connections; ``close()``, garbage collection or exit make this
    process leave the pool, and the last one to leave closes every connection;
    ``shutdown()`` closes them at once for every process. ``free()``, ``stats()`` read the
    shared pool; ``resize()`` changes it for every process.
    """

    _finalizer: weakref.finalize | None = None
    _closed = False
    _wrapper_type = ServedConnectionWrapper
    _cursor_error: type[Exception] | None = None

    def _closed_cursor_error(self) -> type[Exception]:
        """What using a closed cursor raises, as the driver would: InterfaceError for the
        psycopg family, ProgrammingError for sqlite3, PyMySQL and MySQLdb (RuntimeError for
        a driver that has neither, or that cannot be imported here)."""
        err = self._cursor_error
        if err is None:
            name = module_name(self._db_module)
            try:
                mod = importlib.import_module(name)
            except ImportError:  # the driver need not be importable in this process
                mod = None
            order = ("InterfaceError", "ProgrammingError") if name.startswith("psycopg") else \
                ("ProgrammingError", "InterfaceError")
            err = next((e for e in (getattr(mod, n, None) for n in order)
                        if isinstance(e, type) and issubclass(e, Exception)), RuntimeError)
            self._cursor_error = err
        return err

    def _check_home(self, budget: Budget | None, client: Client | None, share: str | None) -> None:
        if budget is not None:
            raise TypeError("budget must be None for a TpooledConnectionPool: its connections "
                            "are already bounded by max_size in the supervisor (use "
                            f"RawConnectionPool(budget=...) for local connections), got {budget!r}")
        if client is not None and not callable(getattr(client, "pool", None)):
            raise TypeError(f"client must be an mppool client (mppool.connect()), got {client!r}")
        _check_share(share)

    def _open(self, budget: Budget | None, client: Client | None, share: str | None) -> None:
        from ..client import default_client

        self._client = client if client is not None else default_client()
        db_module, args, kwargs = self._db_module, self._args, self._kwargs
        self.share = share
        self.name = shared_pool_name(db_module, args, kwargs, share)
        target = module_name(db_module) if isinstance(db_module, (str, types.ModuleType)) \
            else db_module
        options: dict[str, Any] = {
            "max_size": self.max_size,
            "min_size": self.min_size,
            "max_avail_delay": 0.0 if self._close_on_put else self.max_idle,
            "max_lifetime": 0.0 if self._close_on_put else self.max_age,
            # eventlet's max_idle=0/max_age=0: closed at every return, by the supervisor.
            "max_use": 1 if self._close_on_put else 0,
            "closer": _close_served,
            "stats": _served_stats,
            **self._pool_options,  # check=ping runs in the supervisor, on the served slots
        }
        self._fun = _Connector(target, args, dict(kwargs), self.connect_timeout)
        self._options = options
        if self._start_open:
            self._attach_and_join()
        else:
            self._pool = _NotOpen(f"TpooledConnectionPool {self.name!r}")

    def open(self, wait: bool = False, timeout: float | None = 30.0) -> None:
        if isinstance(self._pool, _NotOpen):
            self._attach_and_join()
        if wait:
            self.wait(timeout)

    def _attach_and_join(self) -> None:
        """Create (or, with ``share``, attach to) the pool in the supervisor and count this
        process as one of its users."""
        fun, options = self._fun, self._options
        if self.share is None:
            self._pool = self._client.pool(self.name, fun, transfer="proxy", **options)
            try:
                joined = self._join()
            except BaseException:
                self._pool.shutdown()  # nothing half-created: nobody else knows this pool
                raise
            if not joined:
                raise PoolClosed(f"the supervisor dropped {self.name} as it was being created")
            return
        for _ in range(3):
            self._pool = self._attach(fun, options)
            if self._join():
                return
            # Its last user left between our attach and our join: it is gone, create it again.
        raise PoolClosed(f"{self.name} kept being dropped by its last user as it was attached")

    def _attach(self, fun: _Connector, options: dict[str, Any]) -> SharedPool:
        client = self._client
        try:
            return client.pool(self.name)  # the common case: another process created it
        except ValueError:
            pass
        try:
            return client.pool(self.name, fun, transfer="proxy", **options)
        except ValueError:
            # Created meanwhile by another process with other sizes: its sizes apply.
            return client.pool(self.name)

    # ------------------------------------------------------------ users

    def _join(self) -> bool:
        """Register this process as a user of the pool (again after a fork); False if the
        supervisor has no such pool any more."""
        me = current_holder()
        user = (me.pid, me.start, me.host, secrets.token_hex(8))
        if _in_supervisor(self._client, _join, self.name, user) is False:
            return False  # (None: a supervisor of an older version, which counts no users)
        if self._finalizer is not None:
            self._finalizer.detach()  # the parent's: never run it here
        self._finalizer = weakref.finalize(self, _leave_from, self._client, self.name, user)
        self._user_pid = me.pid
        return True

    def close(self) -> None:
        """This pool object is done: this process leaves the pool, and if it was the last
        user the supervisor closes every connection. Later ``get()`` raise PoolClosed."""
        self._closed = True
        finalizer = self._finalizer
        if finalizer is not None and self._user_pid == os.getpid():
            finalizer()

    # ------------------------------------------------------------ pool hooks

    def _checkout(self, timeout: float | None) -> tuple[Any, Any]:
        if self._closed:
            raise PoolClosed(f"this TpooledConnectionPool ({self.name}) was closed: shutting down")
        if isinstance(self._pool, _NotOpen):
            self._pool.get(timeout)  # raises: not open yet
        if self._user_pid != os.getpid():
            with self._lock:  # a fork child: it uses the pool now, it counts as a user
                if self._user_pid != os.getpid() and not self._join():
                    raise PoolClosed(f"{self.name} was dropped by its last user: shutting down")
        proxy = self._pool.get(timeout)
        return proxy, proxy

    def _checkin(self, handle: Any, discard: bool) -> None:
        if discard:
            try:
                handle._mppool_discard()
            except Exception:
                log.warning("mppool: db_pool: could not close a discarded shared connection",
                            exc_info=True)
        # discard: the supervisor counts it in returns_bad and closes the slot (its closer,
        # _mppool_discard again, finds nothing left to close).
        self._pool.ret(handle, discard=discard)

    def clear(self) -> None:
        # Idle slots are only reachable by borrowing them: take as many as are idle, close
        # their connections (each slot reconnects on its next use), give them back.
        shared = self._pool
        borrowed = []
        try:
            for _ in range(int(shared.stats()["navail"])):
                try:
                    borrowed.append(shared.get(timeout=0))
                except TimeOut:
                    break
                borrowed[-1]._mppool_discard()
        finally:
            for proxy in borrowed:
                shared.ret(proxy)

    def shutdown(self) -> None:
        self._closed = True
        try:
            super().shutdown()
        finally:
            if self._finalizer is not None:
                self._finalizer.detach()  # the pool is gone for everyone: nothing to leave

    def _free_items(self) -> list[tuple[float, float, Any]]:
        # The connections are in the supervisor: eventlet's tuples with None for the
        # connection, for the idle slots that hold one, most recently used first.
        s = self._pool.stats()
        now = float(s["now"])
        items = [(now + a["last_ret"], a["stats"].get("since", now), None) for a in s["avail"]
                 if a.get("stats", {}).get("connected")]
        items.sort(key=lambda item: -item[0])
        return items

    @classmethod
    def connect(cls, db_module: Any, connect_timeout: float | None, *args: Any, **kw: Any) -> Any:
        """eventlet's: a connection made *in this process* on a tpool thread, wrapped in a
        ``tpool.Proxy`` that hands out proxied cursors (the pool's own connections are made
        in the supervisor instead). ConnectTimeout after ``connect_timeout`` seconds."""
        from .. import tpool

        conn = timed_connect(lambda: tpool.execute(db_module.connect, *args, **kw),
                             connect_timeout, module_name(db_module))
        return tpool.Proxy(conn, autowrap_names=("cursor",))


# The default connection pool is the supervisor one, as eventlet's is the tpool one.
ConnectionPool = TpooledConnectionPool
