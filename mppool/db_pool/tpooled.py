"""TpooledConnectionPool: connections kept in the supervisor, shared by every process.

    this process                                   supervisor
    TpooledConnectionPool(db_module, ..., args)    shared pool "db_pool:<module>:<hash of args>"
      _open(): attach by name, or create it  ───▶    fun = _Connector, closer/stats hooks
                                                     (served.py); the first creator's sizes
      get()  ── SharedPool.get ──────────────────▶   a slot, lent as an ObjectProxy
      put()  ── cleanup through the proxy,
                SharedPool.ret (discard: the slot's connection is closed first) ──▶

Every process passing the same module and connection arguments gets the same name, hence
the same connections; the name is a hash, so passwords never show in stats or logs.
"""

from __future__ import annotations

import hashlib
import logging
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..budget import Budget
from ..errors import TimeOut
from .base import BaseConnectionPool, _NotOpen
from .connecting import module_name
from .served import _close_served, _Connector, _served_stats

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


def shared_pool_name(db_module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The supervisor-side name of the TpooledConnectionPool for these connection arguments.

    Hashed, so that passwords in the arguments never show in stats or logs.
    """
    modname = module_name(db_module)
    digest = hashlib.sha256(repr((modname, _canonical(args), _canonical(kwargs))).encode())
    return f"db_pool:{modname}:{digest.hexdigest()[:32]}"


class TpooledConnectionPool(BaseConnectionPool):
    """Connections kept in the supervisor, shared by every process (eventlet's default pool).

    Every process that builds one with the same ``db_module`` and connection arguments, on the
    same supervisor, uses the same connections: at most ``max_size`` in total (the first
    process's sizes and limits apply; later ones attach). Connections and cursors are used
    through proxies; if a process dies holding one, the supervisor rolls it back and reuses it.
    ``db_module`` may be a module or its import name: only the name travels, and the
    supervisor imports it. ``client`` is the supervisor to use (``mppool.connect(...)``);
    None means ``mppool.connect(autostart=True)``. ``budget`` must be None.

    ``free()``, ``stats()`` etc. read the shared pool; ``shutdown()`` and ``resize()`` change
    it for every process. After a connection was closed for a failed cleanup or ``put(None)``,
    its slot reconnects on first use, so a connect error then surfaces from that call.
    """

    def _check_home(self, budget: Budget | None, client: Client | None) -> None:
        if budget is not None:
            raise TypeError("budget must be None for a TpooledConnectionPool: its connections "
                            "are already bounded by max_size in the supervisor (use "
                            f"RawConnectionPool(budget=...) for local connections), got {budget!r}")
        if client is not None and not callable(getattr(client, "pool", None)):
            raise TypeError(f"client must be an mppool client (mppool.connect()), got {client!r}")

    def _open(self, budget: Budget | None, client: Client | None) -> None:
        from ..client import default_client

        self._client = client if client is not None else default_client()
        db_module, args, kwargs = self._db_module, self._args, self._kwargs
        self.name = shared_pool_name(db_module, args, kwargs)
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
        self._pool = self._attach(self._fun, options) if self._start_open \
            else _NotOpen(f"TpooledConnectionPool {self.name!r}")

    def open(self, wait: bool = False, timeout: float | None = 30.0) -> None:
        if isinstance(self._pool, _NotOpen):
            self._pool = self._attach(self._fun, self._options)
        if wait:
            self.wait(timeout)

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
