"""Which lease an object gives back: ``pool.ret(obj)`` and ``put(obj)`` take the object, not
the lease, so every pool that lends objects by value keeps this map from object to lease.

    get():  entry leased ──▶ LeaseMap.add(entry.obj, entry.lease)
    ret(obj): LeaseMap.take(obj) ──▶ lease ──▶ the pool's checkin(lease)

Used by the core `mppool.Pool` (``ret``), eventlet's `mppool.pools.Pool` (``put``),
`mppool.db_pool` (``put`` of a bare connection) and the clients' shared pools, whose "lease"
is what a put needs: (lease id, channel, pool id).
"""

from __future__ import annotations

from typing import Any

_Pair = tuple[Any, Any]


class LeaseMap:
    """A multimap ``id(obj)`` -> leases of ``obj`` out now, most recent last (a lease is any
    true value: a non-zero int in a pool, a tuple in a client).

    Keyed by ``id()`` because pooled objects need not be hashable, and one object may be out
    under several leases at once (a ``fun`` that returns the same object twice, say ``0``; two
    copies of ``0`` unpickled in a client are one object too). Each
    lease is stored with its object, and a lookup compares identity: holding the object keeps
    its ``id()`` from being reused meanwhile, so a stranger that happens to get the same id
    later can never return somebody's lease. Not thread-safe: callers hold their own lock.

    The common case, one lease per object, is one ``(obj, lease)`` tuple under its key: an add
    and a take cost about what the dict-of-lists they replace cost inline, which matters in
    ``Pool.get``/``Pool.ret``'s fast paths. Several leases are a list of tuples, oldest first.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[int, _Pair | list[_Pair]] = {}

    def add(self, obj: Any, lease: Any) -> None:
        key = id(obj)
        held = self._held.get(key)
        if held is None:
            self._held[key] = (obj, lease)
        elif type(held) is tuple:
            self._held[key] = [held, (obj, lease)]
        else:
            held.append((obj, lease))  # type: ignore[union-attr]

    def take(self, obj: Any) -> Any:
        """Forget and return the most recent lease of ``obj``; 0 if it has none."""
        key = id(obj)
        held = self._held.pop(key, None)
        if held is None:
            return 0
        if type(held) is tuple:
            if held[0] is obj:
                return held[1]
            self._held[key] = held  # not while held objects keep their ids: see the class
            return 0
        return self._remove(key, held, obj, None)  # type: ignore[arg-type]

    def discard(self, obj: Any, lease: Any) -> None:
        """Forget one lease of ``obj`` that was given back another way."""
        key = id(obj)
        held = self._held.pop(key, None)
        if held is None:
            return
        if type(held) is tuple:
            if held[0] is not obj or held[1] != lease:
                self._held[key] = held
            return
        self._remove(key, held, obj, lease)  # type: ignore[arg-type]

    def _remove(self, key: int, held: list[_Pair], obj: Any, lease: Any) -> Any:
        """Out of the several leases under ``key`` (already popped from the map), remove the
        most recent one of ``obj`` (``lease``, if given), put the rest back, return it."""
        found = 0
        for i in range(len(held) - 1, -1, -1):
            if held[i][0] is obj and (lease is None or held[i][1] == lease):
                found = held.pop(i)[1]
                break
        if held:
            self._held[key] = held[0] if len(held) == 1 else held
        return found

    def items(self) -> list[tuple[Any, Any]]:
        """Every (object, lease) out now."""
        return [pair for held in self._held.values()
                for pair in ([held] if type(held) is tuple else held)]

    def clear(self) -> None:
        self._held.clear()

    def __len__(self) -> int:
        return sum(1 if type(held) is tuple else len(held) for held in self._held.values())
