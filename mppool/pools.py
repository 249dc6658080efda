"""eventlet's ``pools`` module on native threads: ``Pool``, ``TokenPool`` and ``Token``.

These classes are a thin layer over the core `mppool.pool.Pool`, which does all of the
counting, creating and waiting (first come, first served, a timed-out waiter never swallows
an item):

    get() ── an idle foreign item, if one waits (_extra) ──▶ it
          └ core._acquire(): an idle entry, CREATE (create() runs), or a queued waiter
    put(item) ── LeaseMap.take(item) ──▶ core._checkin(lease)
              └ no lease: an item the pool holds idle is ignored; any other (foreign)
                goes to the oldest waiter, else joins the idle items (_extra)
    core pool ── fun = _make(): create()
              └ closer = _forget(): the item left the pool for good

The layer adds what eventlet users expect on top of the core pool:

- items come from a nullary `Pool.create` (eventlet's name) instead of ``fun(i)``;
- ``order_as_stack`` picks which idle item comes out next: the core pool hands out the oldest
  idle item when its ``_fifo`` flag is set, the most recently returned one otherwise;
- `Pool.put` of an item the pool never lent makes it free at once, as eventlet does: it goes
  to a blocked ``get()`` or joins the idle items, outside the ``max_size`` count (eventlet
  does not count it in ``current_size`` either). Foreign items are kept in ``_extra``,
  guarded by the core pool's lock, so that a put and a get about to queue cannot miss each
  other: the waiter a get queues is made under that lock and takes a foreign item at once
  if one is idle.

Differences from eventlet, all in the direction of keeping ``max_size`` a hard bound on what
`create` makes: ``max_size`` must be at least 1 (the core pool reads 0 as "unbounded",
eventlet as "nothing ever available"); ``free()`` never goes negative after shrinking;
``resize()`` below ``min_size`` raises ``ValueError``; an error in ``create()`` while
pre-filling ``min_size`` items is logged, not raised (the core pool's rule), and surfaces at
the next ``get()``; an item put back while it is already idle is ignored with a warning
(eventlet would hold it twice and lend it to two callers).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Generic, SupportsIndex, TypeVar

from .clock import REAL_CLOCK
from .errors import TimeOut
from .holder import Holder, current_holder
from .leasemap import LeaseMap
from .lender import Lender
from .pool import Pool as _CorePool
from .state import Entry
from .validate import check_callable, check_size, check_sizes, check_timeout
from .waiters import CREATE, Waiter

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
        # Idle foreign items (see put()), outside the max_size count; guarded by the core
        # pool's lock, never by ours.
        self._extra: deque[T] = deque()
        # The core pool calls _make(), hence create(), for min_size right here: a subclass's
        # create() must work once Pool.__init__ has started, as in eventlet.
        self._pool = _CorePool(self._make, max_size=max_size, min_size=min_size,
                               closer=self._forget)
        self._pool._fifo = not order_as_stack

    # ------------------------------------------------------------------ eventlet's API

    def get(self, timeout: float | None = None) -> T:
        """Return an item, creating one if there is room, else waiting for a ``put()``.

        ``timeout=None`` waits forever, ``0`` does not wait; ``mppool.TimeOut`` when nothing
        came in time. An exception from `create` propagates and costs no room. An idle
        foreign item (see `put`) is handed out first, as eventlet's free list would.
        """
        timeout = check_timeout("timeout", timeout)
        core = self._pool
        with core._lock:
            if self._extra and not any(not w.done for w in core._waiters):
                return self._take_extra()
        holder = current_holder()
        got = core._acquire(holder, None if timeout == 0 else self._waiter)
        if got is None:
            raise TimeOut(f"pool {core._name!r}: no object available, timeout after 0 s "
                          "(timeout=0: do not wait)")
        if isinstance(got, Waiter):
            got = self._wait(got, timeout)
        if isinstance(got, _Gift):
            return got.obj
        entry = core._create_for(holder) if got is CREATE else core._hand_out(got)  # type: ignore[arg-type]
        with self._lock:
            self._leases.add(entry.obj, entry.lease)
        return entry.obj

    def _waiter(self, holder: Holder) -> Waiter:
        """Called by the core pool, under its lock, when a get must queue: a foreign item
        put meanwhile is taken at once (the waiter is queued already served)."""
        w = Waiter(holder)
        if self._extra:
            w.set(_Gift(self._take_extra()))
        return w

    def _take_extra(self) -> T:
        """Under the core pool's lock: the next idle foreign item, in the pool's order."""
        return self._extra.popleft() if self._pool._fifo else self._extra.pop()

    def _wait(self, waiter: Waiter, timeout: float | None) -> Any:
        core = self._pool
        if timeout is None:
            timeout = core.timeout
        try:
            waiter.wait(timeout)
        except BaseException:  # KeyboardInterrupt and the like: nothing may be stranded
            if not core._cancel(waiter):  # served meanwhile: give back what it was handed
                if isinstance(waiter.result, _Gift):
                    self._give_foreign(waiter.result.obj)
                else:
                    core._abandon(waiter)
            raise
        if core._cancel(waiter):
            raise TimeOut(f"pool {core._name!r}: no object available, timeout after {timeout} s")
        got = waiter.result
        if isinstance(got, BaseException):
            raise got
        return got

    def put(self, item: T) -> None:
        """Give an item back: to the oldest blocked ``get()``, else to the idle items.

        - An item got from this pool is returned. If `resize` shrank the pool while it
          was out and the pool still holds too many items, it is discarded instead, as in
          eventlet, even when a ``get()`` is waiting (the core pool does this).
        - An item this pool holds idle (put twice) is ignored with a warning: eventlet
          would keep it twice and lend one object to two callers.
        - Any other item (one the pool never lent, as eventlet allows) is free at once: it
          goes to the oldest blocked ``get()``, else joins the idle items, where ``free()``
          and ``free_items`` count it. As in eventlet it does not count in ``current_size``
          or against ``max_size``, and is never closed by the pool.
        """
        with self._lock:
            lease = self._leases.take(item)
            known = not lease and self._members[id(item)] > 0
        if lease:
            self._pool._checkin(lease)
            return
        if known or not self._give_foreign(item):
            log.warning("mppool: pools.Pool: put() of an item already idle in the pool, "
                        "ignored: %.80r", item)

    def _give_foreign(self, item: T) -> bool:
        """A foreign item: to the oldest live waiter, else to the idle ones; False if it
        already is idle here."""
        core = self._pool
        with core._lock:
            if any(x is item for x in self._extra):
                return False
            while core._waiters:
                if core._waiters.popleft().set(_Gift(item)):
                    return True
            self._extra.append(item)
            return True

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
        with self._pool._lock:
            extra = len(self._extra)
        return self._pool.free() + extra

    @property
    def free_items(self) -> deque[T]:
        """The idle items, the next one to be handed out first (a snapshot: eventlet's
        attribute, for reading; changing it changes nothing in the pool)."""
        core = self._pool
        with core._lock:
            idle = [e.obj for e in core._avail]
            extra = list(self._extra)
        if not core._fifo:
            idle.reverse()
            extra.reverse()
        return deque(extra + idle)

    @property
    def channel(self) -> _Channel:
        """eventlet's rendezvous queue, read-only: ``channel.getting()`` is the number of
        blocked ``get()`` calls and ``channel.putting()`` is 0, since ``put()`` never
        blocks; handing items over goes through the core pool's queue of waiters."""
        return _Channel(self)

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
        """The core pool's ``fun``: ``create()``."""
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


class _Gift(Entry):
    """A foreign item handed to a waiter instead of an entry of the core pool."""

    def __init__(self, obj: Any) -> None:
        super().__init__(obj, -1, REAL_CLOCK.now(), 0.0, None)


class _Channel:
    """What eventlet's ``Pool.channel`` (a zero-size queue) tells, read-only."""

    def __init__(self, pool: Pool[Any]) -> None:
        self._pool = pool

    def getting(self) -> int:
        return self._pool.waiting()

    def putting(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"<pools channel getting={self.getting()} putting=0>"


class Token:
    """An opaque, unique object: holding one is the right to use a limited resource.

    ``number`` is its creation number in its pool (shown by ``repr``, ``mppool top``)."""

    def __init__(self, number: int | None = None) -> None:
        self.number = number

    def __repr__(self) -> str:
        return f"token #{self.number}" if self.number is not None else f"<Token {id(self):#x}>"

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        # Unpickled by every get of a shared token pool: a call with the number costs less
        # than the default, which rebuilds the instance's __dict__ from a pickled dict.
        if type(self) is Token:
            return Token, (self.number,)
        return super().__reduce_ex__(protocol)


class TokenPool(Pool[Token]):
    """A pool of ``max_size`` distinct `Token` objects bounding concurrency.

    Tokens out plus tokens available always make ``max_size``; ``stats()`` reads
    both from one snapshot. The arguments are eventlet's, in eventlet's order:
    ``TokenPool(5)`` means ``min_size=5`` (5 tokens made now, ``max_size`` still 4), so
    name ``max_size`` when you mean it: ``TokenPool(max_size=5)``.
    """

    def __init__(self, min_size: int = 0, max_size: int = 4, order_as_stack: bool = False) -> None:
        super().__init__(min_size=min_size, max_size=max_size, order_as_stack=order_as_stack)

    def create(self) -> Token:
        return Token()

    def stats(self) -> dict[str, Any]:
        """The core stats plus ``out`` (lent or being created) and ``available`` (idle plus
        room to create), both from one snapshot; ``out + available == max_size`` except
        right after a shrinking resize(), until the surplus tokens come back."""
        s = self._pool.stats()
        return {**s, "out": s["nusing"] + s["ncreating"], "available": s["sem"]["value"]}
