"""Which lease an object gives back: ``pool.ret(obj)`` and ``put(obj)`` take the object, not
the lease, so every pool that lends objects by value keeps this map from object to lease.

    get():  entry leased ──▶ LeaseMap.add(entry.obj, entry.lease)
    ret(obj): LeaseMap.take(obj) ──▶ lease ──▶ the pool's checkin(lease)

Used by the core `mppool.Pool` (``ret``), eventlet's `mppool.pools.Pool` (``put``) and
`mppool.db_pool` (``put`` of a bare connection).
"""

from __future__ import annotations

from typing import Any


class LeaseMap:
    """A multimap ``id(obj)`` -> leases of ``obj`` out now, most recent last (a lease is a
    non-zero int).

    Keyed by ``id()`` because pooled objects need not be hashable, and one object may be out
    under several leases at once (a ``fun`` that returns the same object twice, say ``0``). Each
    lease is stored with its object, and a lookup compares identity: holding the object keeps
    its ``id()`` from being reused meanwhile, so a stranger that happens to get the same id
    later can never return somebody's lease. Not thread-safe: callers hold their own lock.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[int, list[tuple[Any, int]]] = {}

    def add(self, obj: Any, lease: int) -> None:
        key = id(obj)
        held = self._held.get(key)
        if held is None:
            self._held[key] = [(obj, lease)]
        else:
            held.append((obj, lease))

    def take(self, obj: Any) -> int:
        """Forget and return the most recent lease of ``obj``; 0 if it has none."""
        key = id(obj)
        held = self._held.get(key)
        if held is None:
            return 0
        last, lease = held[-1]
        if last is not obj:  # not while held objects keep their ids: see the class
            return self._take_older(obj, key, held)
        if len(held) == 1:
            del self._held[key]
        else:
            held.pop()
        return lease

    def _take_older(self, obj: Any, key: int, held: list[tuple[Any, int]]) -> int:
        for i in range(len(held) - 2, -1, -1):
            if held[i][0] is obj:
                lease = held.pop(i)[1]
                if not held:
                    del self._held[key]
                return lease
        return 0

    def discard(self, obj: Any, lease: int) -> None:
        """Forget one lease of ``obj`` that was given back another way."""
        key = id(obj)
        held = self._held.get(key)
        if held is None:
            return
        for i in range(len(held) - 1, -1, -1):
            if held[i][0] is obj and held[i][1] == lease:
                del held[i]
                if not held:
                    del self._held[key]
                return

    def clear(self) -> None:
        self._held.clear()

    def __len__(self) -> int:
        return sum(len(held) for held in self._held.values())
