"""``ObjectProxy``: the client side of ``transfer="proxy"`` pools and of ``client.host()``.

The object stays in the supervisor; every method call or attribute read is one request on
the lease channel, run there on the pool's own threads. Results that are plain data come back
by value, anything else (a DB cursor) as another proxy. The supervisor honours a call only
from the connection that holds the lease.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from . import protocol as P
from .errors import PoolClosed, ServerUnavailable

if TYPE_CHECKING:
    from .channel import Channel


class Owner(Protocol):
    """Where a proxy's requests go: a shared pool, or the hosted objects (pool id 0)."""

    def _mp_route(self) -> tuple[Channel, int]: ...


# What a proxied attribute is when it is a method (qualified type names, as the supervisor
# sends them): calling it then needs one round trip, not two.
_CALLABLE_TYPES = frozenset(("builtins.method", "builtins.builtin_function_or_method",
                             "builtins.function", "builtins.method-wrapper"))


class ObjectProxy:
    """A proxied object: method calls run in the supervisor, on the real object."""

    __slots__ = ("__weakref__", "_mp_chan", "_mp_lease", "_mp_pool", "_mp_pool_id", "_mp_ref",
                 "_mp_type")
    _callables: dict[str, set[str]] = {}

    def __init__(self, pool: Owner, lease: int, ref: int, typename: str,
                 chan: Channel | None = None, pool_id: int = 0) -> None:
        if chan is None:
            chan, pool_id = pool._mp_route()
        object.__setattr__(self, "_mp_pool", pool)
        object.__setattr__(self, "_mp_lease", lease)
        object.__setattr__(self, "_mp_ref", ref)
        object.__setattr__(self, "_mp_type", typename)
        # The channel the lease was granted on: after a reconnect the lease is void.
        object.__setattr__(self, "_mp_chan", chan)
        object.__setattr__(self, "_mp_pool_id", pool_id)

    def _mp_request(self, name: str, args: tuple[Any, ...] | None, kwargs: dict[str, Any]) -> Any:
        if not self._mp_lease and not self._mp_ref:
            raise PoolClosed("this object was returned to its pool and is no longer "
                                "yours: get() another one")
        chan: Channel = self._mp_chan
        rid = chan.next_rid()
        reply = chan.request(rid, P.encode_call(rid, self._mp_pool_id, self._mp_lease,
                                                self._mp_ref, name, args, kwargs))
        if isinstance(reply, P.Reply):
            if reply.status == P.OK:
                return reply.value
            if reply.status == P.REF:
                # (ref, type name), and a plain value when the method returned a WithValue.
                ref, typename, *extra = reply.value
                proxy = ObjectProxy(self._mp_pool, self._mp_lease, ref, typename, chan,
                                    self._mp_pool_id)
                return (proxy, extra[0]) if extra else proxy
            if reply.status == P.ERR:
                raise reply.value.unpack()
        raise ServerUnavailable(f"unexpected reply {reply!r}")

    def _mp_call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        # name is positional-only: a keyword argument called "name" (cursor(name=...)) is
        # the proxied method's.
        return self._mp_request(name, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        known = ObjectProxy._callables.setdefault(self._mp_type, set())
        if name in known:
            return _Method(self, name)
        value = self._mp_request(name, None, {})
        if isinstance(value, ObjectProxy) and value._mp_type in _CALLABLE_TYPES:
            value._mp_release()
            known.add(name)
            return _Method(self, name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self._mp_call("__setattr__", name, value)

    def __enter__(self) -> Any:
        return self._mp_call("__enter__")

    def __exit__(self, t: Any, v: Any, tb: Any) -> Any:
        return self._mp_call("__exit__", None, None, None) if t is None else \
            self._mp_call("__exit__", t, v if _picklable(v) else None, None)

    def __iter__(self) -> Iterator[Any]:
        it = self._mp_call("__iter__")
        while True:
            try:
                yield it._mp_call("__next__") if isinstance(it, ObjectProxy) else next(it)
            except StopIteration:
                return

    def __len__(self) -> int:
        return self._mp_call("__len__")

    def __getitem__(self, key: Any) -> Any:
        return self._mp_call("__getitem__", key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._mp_call("__setitem__", key, value)

    def __delitem__(self, key: Any) -> None:
        self._mp_call("__delitem__", key)

    def __contains__(self, key: Any) -> bool:
        return self._mp_call("__contains__", key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._mp_call("__call__", *args, **kwargs)

    def __repr__(self) -> str:
        return f"<mppool proxy of {self._mp_type or 'pooled object'} lease={self._mp_lease}>"

    def _mp_release(self) -> None:
        if self._mp_ref:
            try:
                self._mp_chan.post(P.encode_dropref(self._mp_ref))
            except Exception:
                pass
            object.__setattr__(self, "_mp_ref", 0)

    def __del__(self) -> None:
        if getattr(self, "_mp_ref", 0):
            try:
                self._mp_release()
            except Exception:
                pass


class _Method:
    __slots__ = ("_name", "_proxy")

    def __init__(self, proxy: ObjectProxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._proxy._mp_call(self._name, *args, **kwargs)


def _picklable(v: Any) -> bool:
    try:
        pickle.dumps(v)
        return True
    except Exception:
        return False
