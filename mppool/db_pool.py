"""eventlet's ``db_pool`` on native threads pools of DB-API 2 connections.

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
  with ``transfer="proxy"``; every process uses them through proxies (cursors too). Its name
  is derived from the module and the connection arguments, so every process passing the same
  ones shares the same connections; the first one's sizes apply.

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
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import logging
import os
import socket
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .budget import check_budget
from .errors import ConnectTimeout, PoolClosed, TimeOut
from .holder import current_holder
from .pool import Budget
from .pool import Pool as _CorePool
from .validate import check_callable, check_delay, check_int

if TYPE_CHECKING:
    from .client import Client, SharedPool

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

log = logging.getLogger("mppool")

Cleanup = Callable[[Any], Any]


class _Missing:
    def __repr__(self) -> str:
        return "<default cleanup>"


_MISSING: Any = _Missing()


def cleanup_rollback(conn: Any) -> None:
    """The default cleanup: end whatever transaction the last user left open."""
    conn.rollback()


# ---------------------------------------------------------------------------------- connecting


class _Attempt:
    """One ``connect()`` running in a helper thread, which the caller may abandon."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self.connect = connect
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.finished = False
        self.abandoned = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            result = self.connect()
        except BaseException as exc:  # handed to the caller, never left to the thread
            with self.lock:
                self.finished, self.error = True, exc
            self.done.set()
            return
        with self.lock:
            late = self.abandoned
            if not late:
                self.finished, self.result = True, result
        self.done.set()
        if late:
            # Nobody will ever use it, and left open it would count against the database.
            log.info("mppool: db_pool: closing a connection that arrived after connect_timeout")
            _safe_close(result, quiet=True)


def _timed_connect(connect: Callable[[], Any], timeout: float | None, what: str) -> Any:
    """``connect()``, or ConnectTimeout once ``timeout`` seconds have passed.

    A thread cannot be interrupted, so the connect runs in a daemon helper thread that the
    caller stops waiting for; whatever it produces late is closed (see _Attempt.run).
    """
    if timeout is None:
        return connect()
    attempt = _Attempt(connect)
    threading.Thread(target=attempt.run, name="mppool-connect", daemon=True).start()
    attempt.done.wait(timeout)
    with attempt.lock:
        if not attempt.finished:
            attempt.abandoned = True
            raise ConnectTimeout(f"connecting with {what} took longer than connect_timeout={timeout!r} s")
    if attempt.error is not None:
        raise attempt.error
    return attempt.result


# How long closing a connection waits for the server to drop it (see _safe_close).
CLOSE_WAIT = 2.0


def _safe_close(conn: Any, quiet: bool = False) -> None:
    """Close a connection, logging (not raising) what ``close()`` raises.

    For a driver whose connection has ``fileno()`` (psycopg, psycopg2), wait until the server
    has closed its end too: ``close()`` only sends "terminate", and the server process lives
    on for a moment, still counted in ``pg_stat_activity`` and against ``max_connections``.
    The budget token goes back after this returns, so without the wait a connection opened
    with that token elsewhere could overlap the old one and exceed the cap, server side.
    """
    close = getattr(conn, "close", None)
    if not callable(close):
        return
    sock = _peer_socket(conn)
    try:
        close()
    except Exception:
        if not quiet:
            log.warning("mppool: db_pool: closing a connection raised, ignored", exc_info=True)
    if sock is not None:
        with sock:
            _wait_eof(sock, CLOSE_WAIT)


def _peer_socket(conn: Any) -> socket.socket | None:
    """A duplicate of the connection's socket, if it has one, to watch the server leave."""
    fileno = getattr(conn, "fileno", None)
    if not callable(fileno):
        return None
    try:
        fd = os.dup(fileno())
    except Exception:
        return None  # closed already, or not a file descriptor
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)  # not a socket
        return None
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        return None
    return sock


def _wait_eof(sock: socket.socket, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(4096):
                return  # the server closed its end: its process is gone
    except OSError:
        return  # reset or timed out: either way, stop waiting
    log.debug("mppool: db_pool: the server did not drop a closed connection within %s s", timeout)


def _module_name(db_module: Any) -> str:
    if isinstance(db_module, str):
        return db_module
    if isinstance(db_module, types.ModuleType):
        return db_module.__name__
    return f"{type(db_module).__module__}.{type(db_module).__qualname__}"


def _check_db_module(db_module: Any) -> None:
    if isinstance(db_module, str):
        if not db_module or not all(part.isidentifier() for part in db_module.split(".")):
            raise ValueError(f"db_module must be a module, its import name or an object with "
                             f"connect(), got {db_module!r}")
        return
    if not callable(getattr(db_module, "connect", None)):
        raise TypeError(f"db_module must be a DB-API module (with connect()) or its import name, "
                        f"got {db_module!r}")


def _check_connect_timeout(value: Any) -> float | None:
    if value is None:
        return None
    value = check_delay("connect_timeout", value)
    if value == 0:
        raise ValueError("connect_timeout must be > 0 seconds, or None for no limit, got 0")
    return value


# ------------------------------------------------------------------------------------ wrappers


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


# --------------------------------------------------------------------------------------- pools


class _Lease:
    __slots__ = ("conn", "handle", "thread", "wrapper")

    def __init__(self, conn: Any, handle: Any, wrapper: PooledConnectionWrapper) -> None:
        self.conn = conn
        self.handle = handle
        self.wrapper = wrapper
        self.thread = threading.get_ident()


class BaseConnectionPool:
    """A bounded pool of DB-API connections (eventlet's ``db_pool.BaseConnectionPool``).

    ``min_size`` connections are opened at construction, at most ``max_size`` exist at once.
    A connection idle for more than ``max_idle`` seconds, or older than ``max_age`` seconds, is
    closed; with ``max_idle=0`` or ``max_age=0`` every connection is closed when it is put
    back, which leaves the pool a concurrency limiter. A ``db_module.connect()`` slower than
    ``connect_timeout`` seconds raises `ConnectTimeout` from ``get()`` and costs no slot.
    ``cleanup(conn)`` runs at every ``put()`` (rollback by default); if it raises, the
    connection is closed instead of kept. ``*args``/``**kwargs`` go to ``db_module.connect``.
    ``budget=`` is a token pool shared by processes (``client.token_pool(name, n)``) that
    caps the connections of every pool drawing on it (RawConnectionPool only).
    """

    # The pool underneath, which every method below delegates to: a core mppool.Pool
    # (RawConnectionPool) or a SharedPool (TpooledConnectionPool), which share one API.
    _pool: Any

    def __init__(
        self,
        db_module: Any,
        min_size: int = 0,
        max_size: int = 4,
        max_idle: float = 10,
        max_age: float = 30,
        connect_timeout: float | None = 5,
        cleanup: Cleanup | None = cleanup_rollback,
        *args: Any,
        budget: Budget | None = None,
        **kwargs: Any,
    ) -> None:
        # Everything is checked before any state exists: nothing is half-created on error.
        _check_db_module(db_module)
        max_size = check_int("max_size", max_size, minimum=1)
        min_size = check_int("min_size", min_size)
        if min_size > max_size:
            raise ValueError(f"min_size={min_size!r} must not exceed max_size={max_size!r}")
        max_idle = check_delay("max_idle", max_idle)
        max_age = check_delay("max_age", max_age)
        connect_timeout = _check_connect_timeout(connect_timeout)
        check_callable("cleanup", cleanup)
        check_budget(budget)
        self._db_module = db_module
        self._args = args
        self._kwargs = kwargs
        self.min_size = min_size
        self.max_size = max_size
        self.max_idle = max_idle
        self.max_age = max_age
        self.connect_timeout = connect_timeout
        self.cleanup = cleanup
        self._budget = budget
        # eventlet: with either limit at 0, every connection is closed when it comes back.
        self._close_on_put = max_idle == 0 or max_age == 0
        self._lock = threading.Lock()
        self._out: dict[int, _Lease] = {}  # lent connections, oldest first
        self._keys = itertools.count(1)

    # ------------------------------------------------------------------ eventlet's API

    def get(self, timeout: float | None = None) -> PooledConnectionWrapper:
        """A connection, wrapped so that ``close()`` returns it; waits while all are in use.

        ``timeout=None`` waits forever, ``0`` does not wait (``mppool.TimeOut``). An error
        from ``connect`` (including `ConnectTimeout`) propagates and costs no slot.
        """
        conn, handle = self._checkout(timeout)
        key = next(self._keys)
        wrapper = PooledConnectionWrapper(conn, self, key)
        with self._lock:
            self._out[key] = _Lease(conn, handle, wrapper)
        return wrapper

    def put(self, conn: Any, cleanup: Cleanup | None = _MISSING) -> None:
        """Give a connection back: ``cleanup`` runs first (the pool's by default, None for
        none); a cleanup that fails closes the connection instead of keeping it.

        ``conn`` is what ``get()`` returned (or its underlying connection). ``None`` gives up
        the slot of the calling thread's most recent connection, which is closed.
        """
        if cleanup is not _MISSING:
            check_callable("cleanup", cleanup)
        lease = self._take(conn)
        if lease is None:
            return
        if conn is None or self._close_on_put:
            self._checkin(lease.handle, discard=True)
            return
        fn = self.cleanup if cleanup is _MISSING else cleanup
        discard = False
        if fn is not None:
            try:
                fn(lease.conn)
            except Exception as exc:
                # Whatever went wrong, the connection's state is unknown: never lend it again.
                log.warning("mppool: db_pool: cleanup %r raised %r: closing the connection", fn, exc)
                discard = True
            except BaseException:
                self._checkin(lease.handle, discard=True)
                raise
        self._checkin(lease.handle, discard)

    @contextmanager
    def item(self, cleanup: Cleanup | None = _MISSING, *,
             timeout: float | None = None) -> Iterator[PooledConnectionWrapper]:
        """``with pool.item() as conn:`` gets a connection and always puts it back."""
        conn = self.get(timeout)
        try:
            yield conn
        finally:
            self.put(conn, cleanup=cleanup)

    def clear(self) -> None:
        """Close the idle connections (those in use are not touched)."""
        raise NotImplementedError

    def free(self) -> int:
        """How many ``get()`` calls would succeed right now without waiting."""
        return self._pool.free()

    def waiting(self) -> int:
        """How many ``get()`` calls are blocked."""
        return self._pool.waiting()

    def resize(self, new_size: int) -> None:
        """Change ``max_size``; idle connections above it are closed."""
        new_size = check_int("new_size", new_size, minimum=1)
        self._pool.resize(new_size)
        self.max_size = new_size

    def create(self) -> Any:
        """Make a new connection; RawConnectionPool implements it (subclasses may override)."""
        raise NotImplementedError("Implement in subclass")

    @property
    def current_size(self) -> int:
        """Connections alive: idle plus lent out (eventlet's counter)."""
        return len(self._pool)

    def stats(self) -> dict[str, Any]:
        """The underlying pool's JSON-compatible stats (those of ``mppool.Pool``)."""
        return self._pool.stats()

    def shutdown(self) -> None:
        """Close every connection; later ``get()`` calls raise ``mppool.PoolClosed``.

        For a TpooledConnectionPool this shuts the shared pool down for every process.
        """
        with self._lock:
            leases = list(self._out.values())
            self._out.clear()
        for lease in leases:
            lease.wrapper._destroy()
        self._pool.shutdown()

    def __repr__(self) -> str:
        with self._lock:
            out = len(self._out)
        return (f"<{type(self).__name__} {_module_name(self._db_module)} [connections: {out} lent "
                f"by this process | max_size: {self.max_size}]>")

    # ------------------------------------------------------------------ subclass hooks

    def _checkout(self, timeout: float | None) -> tuple[Any, Any]:
        """Lease a connection: (the connection, a handle for _checkin)."""
        raise NotImplementedError

    def _checkin(self, handle: Any, discard: bool) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ internals

    def _take(self, conn: Any) -> _Lease | None:
        """Find and forget the lease that ``conn`` returns; its wrapper becomes unusable."""
        with self._lock:
            key = 0
            if conn is None:
                me = threading.get_ident()
                key = next((k for k, ls in reversed(self._out.items()) if ls.thread == me), 0)
            elif isinstance(conn, PooledConnectionWrapper):
                if conn.__dict__.get("_pool") is self:
                    key = conn._db_pool_key
            else:
                key = next((k for k, ls in reversed(self._out.items()) if ls.conn is conn), 0)
            lease = self._out.pop(key, None)
        if lease is None:
            if conn is None:
                log.warning("mppool: db_pool: put(None) but this thread holds no connection of "
                            "this pool: ignored")
            else:
                log.warning("mppool: db_pool: put() of a connection this pool did not lend or "
                            "already got back: ignored: %.80r", conn)
            return None
        lease.wrapper._destroy()
        return lease


class _WeakFun:
    """The core pool's ``fun``, not keeping the RawConnectionPool alive.

    The core pool lives as long as its housekeeping task does; a strong reference back would
    keep a forgotten RawConnectionPool (and its connections and budget tokens) alive forever.
    """

    def __init__(self, pool: RawConnectionPool) -> None:
        self._ref = weakref.ref(pool)

    def __call__(self, num: int) -> Any:
        pool = self._ref()
        if pool is None:
            raise PoolClosed("the RawConnectionPool was garbage collected: shutting down")
        return pool._make()


class RawConnectionPool(BaseConnectionPool):
    """Plain connections, kept in this process (eventlet's ``RawConnectionPool``).

    With ``budget=`` (a shared token pool) each connection holds one token from before
    ``connect`` until after ``close``, so the total across processes never exceeds the
    budget; idle connections above ``min_size`` are closed when another process waits for it.
    Do not carry a RawConnectionPool across ``fork()``: build one in each process.
    """

    def __init__(
        self,
        db_module: Any,
        min_size: int = 0,
        max_size: int = 4,
        max_idle: float = 10,
        max_age: float = 30,
        connect_timeout: float | None = 5,
        cleanup: Cleanup | None = cleanup_rollback,
        *args: Any,
        budget: Budget | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(db_module, min_size, max_size, max_idle, max_age, connect_timeout,
                         cleanup, *args, budget=budget, **kwargs)
        if isinstance(db_module, str):
            self._db_module = importlib.import_module(db_module)
        self._pool = _CorePool(
            _WeakFun(self), max_size=max_size, min_size=min_size,
            max_avail_delay=0.0 if self._close_on_put else max_idle,
            max_lifetime=0.0 if self._close_on_put else max_age,
            closer=_safe_close, budget=budget)
        # Stack order, as eventlet: the most recently used connection goes out first, so the
        # surplus stays idle and max_idle can close it.
        self._pool._fifo = False

    @classmethod
    def connect(cls, db_module: Any, connect_timeout: float | None, *args: Any, **kw: Any) -> Any:
        """``db_module.connect(*args, **kw)``, or ConnectTimeout after ``connect_timeout`` s."""
        return _timed_connect(lambda: db_module.connect(*args, **kw), connect_timeout,
                              _module_name(db_module))

    def create(self) -> Any:
        now = time.time()
        return now, now, self.connect(self._db_module, self.connect_timeout, *self._args,
                                      **self._kwargs)

    def _make(self) -> Any:
        made = self.create()
        # eventlet's create() returns (last_used, created_at, conn); a subclass may return conn.
        return made[2] if isinstance(made, tuple) and len(made) == 3 else made

    def _checkout(self, timeout: float | None) -> tuple[Any, Any]:
        entry = self._pool.checkout(current_holder(), timeout)
        return entry.obj, entry.lease

    def _checkin(self, handle: Any, discard: bool) -> None:
        self._pool.checkin(handle, discard)

    def clear(self) -> None:
        self._pool.clear()

    def __del__(self) -> None:
        # eventlet closes its connections when the pool goes away; so do we, budget tokens too.
        pool = self.__dict__.get("_pool")
        if pool is not None:
            try:
                pool.shutdown()
            except Exception:
                pass


# ------------------------------------------------------------------ the tpooled (shared) pool

def _canonical(value: Any) -> Any:
    """A stable description of connection arguments, the same in every process."""
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((repr(k), _canonical(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canonical(v) for v in value))
    return repr(value)


def shared_pool_name(db_module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The supervisor-side name of the TpooledConnectionPool for these connection arguments.

    Hashed, so that passwords in the arguments never show in stats or logs.
    """
    modname = _module_name(db_module)
    digest = hashlib.sha256(repr((modname, _canonical(args), _canonical(kwargs))).encode())
    return f"db_pool:{modname}:{digest.hexdigest()[:32]}"


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
        return _timed_connect(lambda: module.connect(*self.args, **self.kwargs),
                              self.connect_timeout, _module_name(self.target))

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
        self._mppool_conn = connector.connect()  # errors propagate to get(): no slot taken

    def _mppool_ensure(self) -> Any:
        with self._mppool_lock:
            if self._mppool_conn is None:
                self._mppool_conn = self._mppool_connector.connect()
            return self._mppool_conn

    def _mppool_discard(self) -> None:
        with self._mppool_lock:
            conn, self._mppool_conn = self._mppool_conn, None
        if conn is not None:
            _safe_close(conn, quiet=True)

    def _mppool_connected(self) -> bool:
        return self._mppool_conn is not None

    def rollback(self) -> None:
        # Also the supervisor's reset when a holder dies: no connection, nothing to undo.
        conn = self._mppool_conn
        if conn is not None:
            conn.rollback()

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
        return f"<{_module_name(self._mppool_connector.target)} connection, {state}>"


def _close_served(slot: _ServedConnection) -> None:
    slot._mppool_discard()


def _served_stats(slot: _ServedConnection) -> dict[str, Any]:
    return {"connected": slot._mppool_connected()}


class TpooledConnectionPool(BaseConnectionPool):
    """Connections kept in the supervisor, shared by every process (eventlet's default pool).

    Every process that builds one with the same ``db_module`` and connection arguments, on the
    same supervisor, uses the same connections: at most ``max_size`` in total (the first
    process's sizes and limits apply; later ones attach). Connections and cursors are used
    through proxies; if a process dies holding one, the supervisor rolls it back and reuses it.
    ``db_module`` may be a module or its import name: only the name travels, and the
    supervisor imports it. ``client`` is the supervisor to use (``mppool.connect(...)``);
    None means ``mppool.connect(autostart=True)``.

    ``free()``, ``stats()`` etc. read the shared pool; ``shutdown()`` and ``resize()`` change
    it for every process. After a connection was closed for a failed cleanup or ``put(None)``,
    its slot reconnects on first use, so a connect error then surfaces from that call.
    """

    def __init__(
        self,
        db_module: Any,
        min_size: int = 0,
        max_size: int = 4,
        max_idle: float = 10,
        max_age: float = 30,
        connect_timeout: float | None = 5,
        cleanup: Cleanup | None = cleanup_rollback,
        *args: Any,
        budget: Budget | None = None,
        client: Client | None = None,
        **kwargs: Any,
    ) -> None:
        if budget is not None:
            raise TypeError("budget must be None for a TpooledConnectionPool: its connections "
                            "are already bounded by max_size in the supervisor (use "
                            f"RawConnectionPool(budget=...) for local connections), got {budget!r}")
        if client is not None and not callable(getattr(client, "pool", None)):
            raise TypeError(f"client must be an mppool client (mppool.connect()), got {client!r}")
        super().__init__(db_module, min_size, max_size, max_idle, max_age, connect_timeout,
                         cleanup, *args, **kwargs)
        from .client import default_client

        self._client = client if client is not None else default_client()
        self.name = shared_pool_name(db_module, args, kwargs)
        target = _module_name(db_module) if isinstance(db_module, (str, types.ModuleType)) \
            else db_module
        options: dict[str, Any] = {
            "max_size": max_size,
            "min_size": min_size,
            "max_avail_delay": 0.0 if self._close_on_put else max_idle,
            "max_lifetime": 0.0 if self._close_on_put else max_age,
            # eventlet's max_idle=0/max_age=0: closed at every return, by the supervisor.
            "max_use": 1 if self._close_on_put else 0,
            "closer": _close_served,
            "stats": _served_stats,
        }
        self._pool = self._attach(_Connector(target, args, dict(kwargs), connect_timeout),
                                    options)

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

    def _checkout(self, timeout: float | None) -> tuple[Any, Any]:
        proxy = self._pool.get(timeout)
        return proxy, proxy

    def _checkin(self, handle: Any, discard: bool) -> None:
        if discard and not self._close_on_put:
            try:
                handle._mppool_discard()
            except Exception:
                log.warning("mppool: db_pool: could not close a discarded shared connection",
                            exc_info=True)
        self._pool.ret(handle)

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



# The default connection pool is the shared one, as eventlet's is the tpool one.
ConnectionPool = TpooledConnectionPool


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
        _check_db_module(module)
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
