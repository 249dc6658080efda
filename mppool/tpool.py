"""eventlet's ``tpool``: blocking calls on a pool of native threads of *this* process.

    execute(fn, *a, **kw) ──▶ the module's ThreadPool (daemon threads, up to _nthreads)
          ◀── fn's result, or its exception raised as it was raised (traceback kept)
    Proxy(obj) ── method calls, [], iteration steps, with ──▶ execute(...)
               ── str, repr, ==, hash, len, bool ──▶ obj directly, in the calling thread

Nothing is pickled and nothing leaves the process: ``fn`` and ``obj`` may be anything
(modules, generators, closures, sockets). To run code or keep objects in the *supervisor*,
shared by every process, use ``client.execute(fn, ...)`` and ``client.host(obj)``.

Behaviour kept from eventlet: ``execute`` called from one of the pool's own threads, or with
``set_num_threads(0)``, runs ``fn`` directly (no deadlock, no thread); ``Proxy``'s autowrap
rules (``autowrap`` types and ``autowrap_names`` names wrap attribute values and call results
in another Proxy); ``killall()`` lets queued calls run, then stops the threads, and the next
``execute`` starts them again (``setup()``); the pool's size is ``EVENTLET_THREADPOOL_SIZE``
(default 20), as in eventlet, so existing deployments keep their setting.

Deliberate differences, each for a reason:

- Every exception propagates, ``BaseException`` subclasses too (``SystemExit``,
  ``KeyboardInterrupt``, ``GeneratorExit``): eventlet re-raises those in the worker thread,
  which kills it and leaves the caller waiting forever.
- ``killall(timeout=5.0)`` waits at most ``timeout`` seconds for running calls: a call that
  hangs is left running on its daemon thread (logged) instead of blocking ``killall``, and
  the process's exit, forever; calls queued behind it fail with ``mppool.PoolClosed``.
- ``set_num_threads(n)`` takes effect at once (eventlet: at the next ``setup()``) and checks
  ``n`` (an int >= 0).
- ``Proxy`` also forwards ``in`` and ``del proxy[key]`` through the pool (eventlet: ``in``
  iterates, ``del`` raises TypeError); ``autowrap`` may be any collection of types and
  ``autowrap_names`` a single name; both are checked.
- After ``os.fork()`` the child starts with a fresh pool: the parent's threads do not exist
  there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import PoolClosed
from .threadpool import ThreadPool
from .validate import check_callable, check_duration, check_int

__all__ = ["Proxy", "execute", "killall", "proxy_call", "set_num_threads", "setup"]

KILLALL_TIMEOUT = 5.0


def _size_from_env() -> int:
    raw = os.environ.get("EVENTLET_THREADPOOL_SIZE", "20")
    try:
        return check_int("EVENTLET_THREADPOOL_SIZE", int(raw))
    except ValueError:
        raise ValueError(f"EVENTLET_THREADPOOL_SIZE must be an integer >= 0, got {raw!r}") from None


_nthreads = _size_from_env()
_pool: ThreadPool | None = None
_lock = threading.Lock()


def setup() -> None:
    """Start the thread pool (``execute`` does it when needed); a no-op once started."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPool(_nthreads)


def execute(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on a native thread of the pool and return its result;
    whatever it raises is raised here, with its traceback."""
    check_callable("fn", fn, required=True)
    while True:
        pool = _pool
        if pool is None:
            setup()
            pool = _pool
        if pool is None or _nthreads == 0 or pool.is_worker():
            # eventlet's rules: no threads, or already on one of them (waiting for another
            # worker from a worker could deadlock a full pool).
            return fn(*args, **kwargs)
        try:
            future = pool.submit(fn, args, kwargs)
        except PoolClosed:
            if _pool is pool:
                raise
            continue  # a killall() raced with us: the next pool takes the call
        return future.result()


def killall(timeout: float | None = KILLALL_TIMEOUT) -> None:
    """Stop the pool's threads once the calls already queued have run.

    Waits at most ``timeout`` seconds (None: forever); threads still running a call then are
    left behind and the calls queued behind them fail with ``mppool.PoolClosed``. The next
    ``execute`` starts a new pool.
    """
    global _pool
    timeout = check_duration("timeout", timeout)
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.stop(timeout)


def set_num_threads(nthreads: int) -> None:
    """How many native threads the pool may run (0: ``execute`` runs in the caller)."""
    global _nthreads
    nthreads = check_int("nthreads", nthreads)
    with _lock:
        _nthreads = nthreads
        if _pool is not None:
            _pool.resize(nthreads)


def proxy_call(autowrap: tuple[type, ...], f: Any, *args: Any, **kwargs: Any) -> Any:
    """``f(*args, **kwargs)`` on the pool (directly with ``nonblocking=True``); a result
    whose type is in ``autowrap`` comes back wrapped in a Proxy."""
    nonblocking = kwargs.pop("nonblocking", False)
    rv = f(*args, **kwargs) if nonblocking else execute(f, *args, **kwargs)
    if autowrap and isinstance(rv, autowrap):
        return Proxy(rv, autowrap)
    return rv


def _types(autowrap: Any) -> tuple[type, ...]:
    items = (autowrap,) if isinstance(autowrap, type) else autowrap
    try:
        found = tuple(items)
    except TypeError:
        found = None
    if found is None or not all(isinstance(t, type) for t in found):
        raise TypeError(f"autowrap must be a type or a collection of types, got {autowrap!r}")
    return found


def _names(autowrap_names: Any) -> frozenset[str]:
    items = (autowrap_names,) if isinstance(autowrap_names, str) else autowrap_names
    try:
        found = frozenset(items)
    except TypeError:
        found = None
    if found is None or not all(isinstance(n, str) for n in found):
        raise TypeError(f"autowrap_names must be a collection of attribute names, "
                        f"got {autowrap_names!r}")
    return found


class Proxy:
    """``obj`` with its method calls run on the thread pool (eventlet's ``tpool.Proxy``).

    Attribute reads return the attribute itself, or for a callable a function that runs it
    on the pool. ``autowrap`` (types) and ``autowrap_names`` (attribute names) choose which
    attribute values and call results come back wrapped in a Proxy too, as in eventlet: a
    DB-API connection proxied with ``autowrap_names=("cursor",)`` hands out proxied cursors.
    ``str``, ``repr``, ``==``, ``hash``, ``len`` and ``bool`` read ``obj`` directly.
    """

    _obj: Any
    _autowrap: tuple[type, ...]
    _autowrap_names: frozenset[str]

    def __init__(self, obj: Any, autowrap: Iterable[type] | type = (),
                 autowrap_names: Iterable[str] | str = ()) -> None:
        self._obj = obj
        self._autowrap = _types(autowrap)
        self._autowrap_names = _names(autowrap_names)

    def __getattr__(self, attr_name: str) -> Any:
        if attr_name in ("_obj", "_autowrap", "_autowrap_names"):
            raise AttributeError(attr_name)  # not set yet (copy, unpickle): never recurse
        f = getattr(self._obj, attr_name)
        if not callable(f):
            if (self._autowrap and isinstance(f, self._autowrap)) or attr_name in self._autowrap_names:
                return Proxy(f, self._autowrap)
            return f
        autowrap, wrap_result = self._autowrap, attr_name in self._autowrap_names

        def doit(*args: Any, **kwargs: Any) -> Any:
            result = proxy_call(autowrap, f, *args, **kwargs)
            if wrap_result and not isinstance(result, Proxy):
                return Proxy(result)
            return result

        doit.__name__ = attr_name
        return doit

    # Special methods are looked up on the type, never through __getattr__: each is here.
    def __getitem__(self, key: Any) -> Any:
        return proxy_call(self._autowrap, self._obj.__getitem__, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        proxy_call(self._autowrap, self._obj.__setitem__, key, value)

    def __delitem__(self, key: Any) -> None:
        proxy_call(self._autowrap, self._obj.__delitem__, key)

    def __contains__(self, item: Any) -> bool:
        return bool(execute(lambda: item in self._obj))

    def __deepcopy__(self, memo: Any = None) -> Any:
        return proxy_call(self._autowrap, self._obj.__deepcopy__, memo)

    def __copy__(self) -> Any:
        return proxy_call(self._autowrap, self._obj.__copy__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = proxy_call(self._autowrap, self._obj, *args, **kwargs)
        if "__call__" in self._autowrap_names and not isinstance(result, Proxy):
            return Proxy(result)
        return result

    def __enter__(self) -> Any:
        return proxy_call(self._autowrap, self._obj.__enter__)

    def __exit__(self, *exc: Any) -> Any:
        return proxy_call(self._autowrap, self._obj.__exit__, *exc)

    # Not on the pool, as in eventlet: called often, and they rarely block.
    def __eq__(self, other: object) -> Any:
        return self._obj == other

    def __hash__(self) -> int:
        return hash(self._obj)

    def __repr__(self) -> str:
        return repr(self._obj)

    def __str__(self) -> str:
        return str(self._obj)

    def __len__(self) -> int:
        return len(self._obj)

    def __bool__(self) -> bool:
        return bool(self._obj)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self._obj)
        return self if it is self._obj else Proxy(it)

    def __next__(self) -> Any:
        return proxy_call(self._autowrap, next, self._obj)

    next = __next__  # eventlet's name


def _forget_in_child() -> None:
    global _pool, _lock
    _pool = None  # the parent's threads do not exist here
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
