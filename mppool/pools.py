"""eventlet's ``pools`` module on native threads: ``Pool``, ``TokenPool`` and ``Token``.

These classes are a thin layer over the core `mppool.pool.Pool`, which does all of the
counting, creating and waiting (first come, first served, a timed-out waiter never swallows
an item):

    get() ── core._checkout() ──▶ an entry; its lease noted by item (LeaseMap)
    put(item) ── LeaseMap.take(item) ──▶ core._checkin(lease)
              └ no lease: an item the pool holds is ignored, any other is adopted
    core pool ── fun = _make(): an adopted item if one waits, else create()
              └ closer = _forget(): the item left the pool for good

The layer adds what eventlet users expect on top of the core pool:

- items come from a nullary `Pool.create` (eventlet's name) instead of ``fun(i)``;
- ``order_as_stack`` picks which idle item comes out next: the core pool hands out the oldest
  idle item when its ``_fifo`` flag is set, the most recently returned one otherwise;
- `Pool.put` of an item the pool never lent is adopted rather than ignored (see there).

Differences from eventlet, all in the direction of keeping ``max_size`` a hard bound:
``max_size`` must be at least 1 (the core pool reads 0 as "unbounded", eventlet as "nothing
ever available"); ``free()`` never goes negative after shrinking; ``resize()`` below
``min_size`` raises ``ValueError``; an error in ``create()`` while pre-filling ``min_size``
items is logged, not raised (the core pool's rule), and surfaces at the next ``get()``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .holder import current_holder
from .leasemap import LeaseMap
from .lender import Lender
from .pool import Pool as _CorePool
from .validate import check_callable, check_size, check_sizes

__all__ = ["Pool", "Token", "TokenPool"]

log = logging.getLogger("mppool")

T = TypeVar("T")


class Pool(Lender, Generic[T]):
    """A bounded pool of items made by `create`, shared by threads (eventlet's API).

    Provide the items either with ``create`` (a function of no arguments) or by overriding
    `create` in a subclass. ``min_size`` items are created at construction; the others
    lazily, when ``get()`` finds no idle item and fewer than ``max_size`` exist. ``get()``
    then blocks until an item is put back (or ``timeout`` expires), and blocked callers are
    served in arrival order. Always ``put()`` what you ``get()``, or use ``with pool.item()``.
    """

    def __init__(
        self,
        min_size: int = 0,
        max_size: int = 4,
        order_as_stack: bool = False,
        create: Callable[[], T] | None = None,
    ) -> None:
        """``order_as_stack=False`` (the default) hands out the item idle the longest, so
        items are used in turn; ``True`` hands out the one returned last, so a few hot items
        are reused and the rest stay idle."""
        min_size, max_size = check_sizes(min_size, max_size, bounded=True)
        if not isinstance(order_as_stack, bool):
            raise TypeError(f"order_as_stack must be a bool, got {order_as_stack!r}")
        check_callable("create", create)
        self.min_size = min_size
        self._max_size = max_size
        self._create = create
        # Guards the lease and member bookkeeping below; never held while calling the core
        # pool, and the core calls our hooks outside its own lock, so it cannot deadlock.
        self._lock = threading.Lock()
        # Keeps _max_size in step with the core pool's bound when resize() calls race.
        self._resize_lock = threading.Lock()
        self._leases = LeaseMap()  # item -> leases lent out, for put(item)
        self._members: Counter[int] = Counter()  # id(item) -> copies alive in the core pool
        self._adopted: deque[T] = deque()  # foreign items waiting to replace a create()
        # The core pool calls _make(), hence create(), for min_size right here: a subclass's
        # create() must work once Pool.__init__ has started, as in eventlet.
        self._pool = _CorePool(self._make, max_size=max_size, min_size=min_size,
                               closer=self._forget)
        self._pool._fifo = not order_as_stack

    # ------------------------------------------------------------------ eventlet's API

    def get(self, timeout: float | None = None) -> T:
        """Return an item, creating one if there is room, else waiting for a ``put()``.

        ``timeout=None`` waits forever, ``0`` does not wait; ``mppool.TimeOut`` when nothing
        came in time. An exception from `create` propagates and costs no room.
        """
        entry = self._pool._checkout(current_holder(), timeout)
        with self._lock:
            self._leases.add(entry.obj, entry.lease)
        return entry.obj

    def put(self, item: T) -> None:
        """Give an item back: to the oldest blocked ``get()``, else to the idle items.

        - An item got from this pool is returned. If `resize` shrank the pool while it
          was out and the pool still holds too many items, it is discarded instead, as in
          eventlet, even when a ``get()`` is waiting (the core pool does this).
        - An item this pool already holds idle (put twice) is ignored with a warning.
        - Any other item is *adopted*: it is used in place of the next `create` call.
          eventlet appends such items to its free list, so that the pool can grow past
          ``max_size`` or lend one object to two callers; adopting keeps the bound exact and
          still lets a pool be filled by hand with ``put()``. An adopted item therefore does
          not wake a ``get()`` blocked on a full pool, and does not change ``free()``. At most
          ``max_size`` items wait for adoption; more are dropped with a warning.
        """
        with self._lock:
            lease = self._leases.take(item)
            if not lease:
                if self._members[id(item)] or any(a is item for a in self._adopted):
                    outcome = "already in the pool, ignored"
                elif len(self._adopted) < self._max_size:
                    self._adopted.append(item)
                    return
                else:
                    outcome = f"{len(self._adopted)} items already wait for adoption, dropped"
        if not lease:
            log.warning("mppool: pools.Pool: put() of an item it did not lend: %s: %.80r",
                        outcome, item)
            return
        self._pool._checkin(lease)

    def resize(self, new_size: int) -> None:
        """Set ``max_size`` to ``new_size``.

        Growing lets blocked ``get()`` calls create items at once. Shrinking closes idle items
        above the new size at once and discards items put back while the pool is too big.
        """
        new_size = check_size("new_size", new_size, bounded=True)
        with self._resize_lock:
            self._pool.resize(new_size)
            self._max_size = new_size

    def free(self) -> int:
        """How many ``get()`` calls would succeed without waiting: idle items plus room to
        create more (never negative, unlike eventlet's right after a shrink)."""
        return self._pool.free()

    def waiting(self) -> int:
        """How many threads are blocked in ``get()``."""
        return self._pool.waiting()

    def create(self) -> T:
        """Make a new item; override in a subclass or pass ``create=`` to the constructor.

        Called lazily: only when ``get()`` finds no idle item and the pool has room (and
        ``min_size`` times at construction).
        """
        if self._create is None:
            raise NotImplementedError("Implement in subclass, or pass create= to Pool()")
        return self._create()

    # ------------------------------------------------------------------ attributes and extras

    @property
    def max_size(self) -> int:
        """The bound on items alive at once; change it with `resize`."""
        return self._max_size

    @property
    def order_as_stack(self) -> bool:
        return not self._pool._fifo

    @order_as_stack.setter
    def order_as_stack(self, value: bool) -> None:
        # eventlet reads the attribute at every put(), so changing it live must work too.
        if not isinstance(value, bool):
            raise TypeError(f"order_as_stack must be a bool, got {value!r}")
        self._pool._fifo = not value

    @property
    def current_size(self) -> int:
        """Items alive: idle plus lent out (eventlet's counter, read from the core pool)."""
        return len(self._pool)

    def stats(self) -> dict[str, Any]:
        """The core pool's JSON-compatible stats."""
        return self._pool.stats()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} max_size={self._max_size} current_size={self.current_size}"
                f" free={self.free()} waiting={self.waiting()}>")

    # ------------------------------------------------------------------ core pool hooks

    def _make(self, num: int) -> T:
        """The core pool's ``fun``: an adopted item if one waits, else ``create()``."""
        with self._lock:
            if self._adopted:
                item = self._adopted.popleft()
                self._members[id(item)] += 1
                return item
        # As in eventlet, where create= becomes an instance attribute, it beats a subclass's
        # create(); looking self.create up each time also honours a later ``pool.create = f``.
        item = self._create() if self._create is not None else self.create()
        with self._lock:
            self._members[id(item)] += 1
        return item

    def _forget(self, item: T) -> None:
        """The core pool's ``closer``: the item left the pool for good."""
        with self._lock:
            self._members[id(item)] -= 1
            if self._members[id(item)] <= 0:
                del self._members[id(item)]


class Token:
    """An opaque, unique object: holding one is the right to use a limited resource.

    ``number`` is its creation number in its pool (shown by ``repr``, ``mppool top``)."""

    def __init__(self, number: int | None = None) -> None:
        self.number = number

    def __repr__(self) -> str:
        return f"token #{self.number}" if self.number is not None else f"<Token {id(self):#x}>"


class TokenPool(Pool[Token]):
    """A pool of ``max_size`` distinct `Token` objects bounding concurrency.

    Tokens out plus tokens available always make ``max_size``; ``stats()`` reads
    both from one snapshot. ``max_size`` comes first, as in ``client.token_pool(name,
    max_size)``; the other eventlet arguments are keyword-only, so an eventlet-style
    positional ``TokenPool(0, 10)`` fails loudly instead of meaning something else.
    """

    def __init__(self, max_size: int = 4, *, min_size: int = 0, order_as_stack: bool = False) -> None:
        super().__init__(min_size=min_size, max_size=max_size, order_as_stack=order_as_stack)

    def create(self) -> Token:
        return Token()

    def stats(self) -> dict[str, Any]:
        """The core stats plus ``out`` (lent or being created) and ``available`` (idle plus
        room to create), both from one snapshot; ``out + available == max_size`` except
        right after a shrinking resize(), until the surplus tokens come back."""
        s = self._pool.stats()
        return {**s, "out": s["nusing"] + s["ncreating"], "available": s["sem"]["value"]}
