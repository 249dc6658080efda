"""What both connection pools share: eventlet's API, its constructor, and put()'s rules.

    get() ── _checkout(timeout) ──▶ (conn, handle) ── wrapped ──▶ PooledConnectionWrapper
             (the subclass's pool)    noted in _out (by key) and _by_conn (by connection)
    put(wrapper | conn | None) ── _take(): which lease, by wrapper key, by connection
             (LeaseMap), or the calling thread's most recent ──▶ the wrapper is disabled
        └─ cleanup(conn) (rollback) ── ok ──▶ _checkin(handle, discard=False)
                                    └ raised, put(None), max_idle/max_age 0
                                             ──▶ _checkin(handle, discard=True): closed

The options of ``mppool.Pool`` that a database pool needs most are keywords here too, passed
to the pool underneath: ``check`` (``check=ping`` runs "SELECT 1" on a connection idle at
least ``check_after`` seconds before a get hands it out, and closes it if that fails),
``max_waiting``, ``reconnect_timeout``/``reconnect_failed``, and the lifecycle (``open``,
``open()``, ``wait()``, ``close()``, ``with``).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..budget import Budget, check_budget
from ..errors import PoolClosed
from ..leasemap import LeaseMap
from ..validate import (
    check_callable,
    check_delay,
    check_duration,
    check_int,
    check_period,
    check_size,
    check_sizes,
    check_timeout,
)
from .connecting import check_connect_timeout, check_db_module, module_name, safe_close
from .wrappers import PooledConnectionWrapper

if TYPE_CHECKING:
    from ..client import Client

log = logging.getLogger("mppool")

Cleanup = Callable[[Any], Any]


class _Missing:
    def __repr__(self) -> str:
        return "<default cleanup>"


_MISSING: Any = _Missing()


def cleanup_rollback(conn: Any) -> None:
    """The default cleanup: end whatever transaction the last user left open."""
    conn.rollback()


def ping(conn: Any) -> bool:
    """For ``check=``: True if ``conn`` answers a trivial query (``SELECT 1``), False if it
    is closed or the query fails. The transaction a DB-API driver opens for it is rolled
    back, so the connection goes out as idle as it came in."""
    try:
        if getattr(conn, "closed", False):  # psycopg, psycopg2: closed by either side
            return False
        cur = conn.cursor()
        try:
            cur.execute("SELECT 1")
            cur.fetchall()
        finally:
            cur.close()
        conn.rollback()
        return True
    except Exception:
        return False


class _NotOpen:
    """The pool underneath of a pool made with ``open=False``, until ``open()``."""

    def __init__(self, what: str) -> None:
        self._what = what

    def shutdown(self, delay: float = 0.0) -> None:
        """Nothing to close."""

    def __getattr__(self, name: str) -> Any:
        raise PoolClosed(f"{self._what} is not open yet (open=False): call open() first")


def pool_options(check: Any, check_after: Any, max_waiting: Any, reconnect_timeout: Any,
                 reconnect_failed: Any) -> dict[str, Any]:
    """The ``mppool.Pool`` options a database pool passes on, checked; only those that
    differ from the defaults (a shared pool's options are compared across processes)."""
    check_callable("check", check)
    check_callable("reconnect_failed", reconnect_failed)
    check_after = check_period("check_after", check_after)
    max_waiting = check_int("max_waiting", max_waiting)
    reconnect_timeout = check_duration("reconnect_timeout", reconnect_timeout)
    options: dict[str, Any] = {}
    if check is not None:
        options["check"] = check
    if check_after:
        options["check_after"] = check_after
    if max_waiting:
        options["max_waiting"] = max_waiting
    if reconnect_timeout != 300.0:  # None (never give up) included
        options["reconnect_timeout"] = reconnect_timeout
    if reconnect_failed is not None:
        options["reconnect_failed"] = reconnect_failed
    return options


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

    Two keywords depend on where the connections live. ``budget=`` (RawConnectionPool: in
    this process) is a token pool shared by processes (``client.token_pool(name, n)``) that
    caps the connections of every pool drawing on it. ``client=`` (TpooledConnectionPool: in
    the supervisor) is the supervisor to use (``mppool.connect(...)``; None means
    ``mppool.connect(autostart=True)``). Each pool refuses the other's keyword, but for
    ``client``, which a RawConnectionPool passes on to ``connect`` like any other.
    """

    # What get() wraps a connection in (a TpooledConnectionPool's defers its cursors).
    _wrapper_type: type[PooledConnectionWrapper] = PooledConnectionWrapper


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
        client: Client | None = None,
        share: str | None = None,
        check: Callable[[Any], bool] | None = None,
        check_after: float = 0.0,
        max_waiting: int = 0,
        reconnect_timeout: float | None = 300.0,
        reconnect_failed: Callable[[Any], Any] | None = None,
        open: bool = True,
        **kwargs: Any,
    ) -> None:
        # eventlet's signature, written once for every pool here: a subclass adapts to where
        # its connections live with _check_home() and _open(), not with an __init__ of its own.
        # Everything is checked before any state exists: nothing is half-created on error.
        self._check_home(budget, client, share)
        check_db_module(db_module)
        min_size, max_size = check_sizes(min_size, max_size, bounded=True)
        max_idle = check_delay("max_idle", max_idle)
        max_age = check_delay("max_age", max_age)
        connect_timeout = check_connect_timeout(connect_timeout)
        check_callable("cleanup", cleanup)
        check_budget(budget)
        self._pool_options = pool_options(check, check_after, max_waiting, reconnect_timeout,
                                          reconnect_failed)
        if not isinstance(open, bool):
            raise TypeError(f"open must be a bool, got {open!r}")
        self._start_open = open
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
        self._out: dict[int, _Lease] = {}  # key -> lent connection, oldest first
        self._by_conn = LeaseMap()  # connection -> its key, for put() of a bare connection
        self._keys = itertools.count(1)
        self._open(budget, client, share)

    # ------------------------------------------------------------------ eventlet's API

    def get(self, timeout: float | None = None) -> PooledConnectionWrapper:
        """A connection, wrapped so that ``close()`` returns it; waits while all are in use.

        ``timeout=None`` waits forever, ``0`` does not wait (``mppool.TimeOut``). An error
        from ``connect`` (including `ConnectTimeout`) propagates and costs no slot.
        """
        conn, handle = self._checkout(timeout)
        key = next(self._keys)
        wrapper = self._wrapper_type(conn, self, key)
        with self._lock:
            self._out[key] = _Lease(conn, handle, wrapper)
            self._by_conn.add(conn, key)
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
            # None: given up as broken (returns_bad); max_idle=0/max_age=0: closed at every
            # return by the pool's max_use=1, not a bad return.
            self._checkin(lease.handle, discard=conn is None)
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
        new_size = check_size("new_size", new_size, bounded=True)
        self._pool.resize(new_size)
        self.max_size = new_size

    def create(self) -> Any:
        """Make a new connection; RawConnectionPool implements it (subclasses may override)."""
        raise NotImplementedError("Implement in subclass")

    @property
    def free_items(self) -> deque[tuple[float, float, Any]]:
        """eventlet's idle connections, most recently used first, as ``(last_used,
        created_at, conn)`` with wall-clock times: a snapshot (changing it changes nothing)."""
        return deque(self._free_items())

    def _unwrap_connection(self, conn: Any) -> Any:
        """eventlet's helper: the driver's connection of a live wrapper, which becomes
        unusable; None for a spent wrapper or anything else."""
        base = None
        try:
            if conn:
                base = conn._base
                conn._destroy()
        except AttributeError:
            pass  # no _base: None; no _destroy (a duck-typed wrapper): its _base all the same
        return base

    def _safe_close(self, conn: Any, quiet: bool = False) -> None:
        """eventlet's helper: close a (driver) connection; what ``close()`` raises is logged
        (unless ``quiet``), never raised, and None or junk is ignored."""
        safe_close(conn, quiet=quiet)

    @property
    def current_size(self) -> int:
        """Connections alive: idle plus lent out (eventlet's counter)."""
        return len(self._pool)

    def stats(self) -> dict[str, Any]:
        """The underlying pool's JSON-compatible stats (those of ``mppool.Pool``)."""
        return self._pool.stats()

    def pop_stats(self) -> dict[str, int]:
        """psycopg_pool's counters and gauges (see ``mppool.Pool.pop_stats``); the counters
        restart at 0."""
        return self._pool.pop_stats()

    # ------------------------------------------------------------ psycopg_pool's lifecycle

    def open(self, wait: bool = False, timeout: float | None = 30.0) -> None:
        """Open a pool made with ``open=False`` (a no-op if it is open): ``min_size``
        connections are made; ``wait=True`` then waits for them (`wait`)."""
        raise NotImplementedError

    def wait(self, timeout: float | None = 30.0) -> None:
        """Block until ``min_size`` connections exist; ``mppool.TimeOut`` after ``timeout``
        seconds (None: as long as it takes)."""
        self._pool.wait(check_timeout("timeout", timeout))

    def close(self) -> None:
        """`shutdown` (psycopg_pool's name)."""
        self.shutdown()

    def __enter__(self) -> Any:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def shutdown(self) -> None:
        """Close every connection; later ``get()`` calls raise ``mppool.PoolClosed``.

        For a TpooledConnectionPool this shuts the shared pool down for every process.
        """
        with self._lock:
            leases = list(self._out.values())
            self._out.clear()
            self._by_conn.clear()
        for lease in leases:
            lease.wrapper._destroy()
        self._pool.shutdown()

    def __repr__(self) -> str:
        with self._lock:
            out = len(self._out)
        return (f"<{type(self).__name__} {module_name(self._db_module)} [connections: {out} lent "
                f"by this process | max_size: {self.max_size}]>")

    # ------------------------------------------------------------------ subclass hooks

    def _check_home(self, budget: Budget | None, client: Client | None, share: str | None) -> None:
        """Refuse, before anything else is checked, what makes no sense where this pool
        keeps its connections. Here: ``share`` (``budget`` is checked with the rest)."""
        if share is not None:
            raise TypeError(f"share is for a TpooledConnectionPool (connections in the "
                            f"supervisor); a {type(self).__name__} keeps its connections in "
                            f"this process, got share={share!r}")

    def _open(self, budget: Budget | None, client: Client | None, share: str | None) -> None:
        """Set up ``_pool`` once the arguments are checked and stored. Here: no supervisor,
        so a ``client`` keyword is one more argument for ``connect``, as in eventlet."""
        if client is not None:
            self._kwargs["client"] = client

    def _checkout(self, timeout: float | None) -> tuple[Any, Any]:
        """Lease a connection: (the connection, a handle for _checkin)."""
        raise NotImplementedError

    def _free_items(self) -> list[tuple[float, float, Any]]:
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
                key = self._by_conn.take(conn)
            lease = self._out.pop(key, None)
            if lease is not None:
                self._by_conn.discard(lease.conn, key)  # if found by thread or wrapper
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
