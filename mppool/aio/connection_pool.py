"""asyncio-connection-pool's ``ConnectionPool`` and ``ConnectionStrategy``, drop-in, with an
optional cross-process ``budget``.

The pool is single-threaded asyncio code with no lock: every decision (take an idle
connection, reserve a slot, hand a returned connection to a waiter) is made between two
awaits, so it is atomic for the event loop. An idle connection is handed out without any
await that suspends: the caller does not yield to the event loop.

Nothing here binds an event loop when the pool is built: waiters' futures and the budget's
recall task are created in the running loop when they are needed, so a pool built at import
time works in whichever loop uses it.

mppool's options, keyword-only and off by default, so asyncio-connection-pool code behaves
as before:

- ``check=`` (a plain or ``async`` callable, ``check(conn) -> bool``) pre-pings a connection
  that was idle (or handed over by another task) before it is handed out, after
  ``connection_is_closed``; False or an exception closes it and the acquire goes on (another
  idle connection, a new one, or the queue), within the caller's own deadline
  (``asyncio.timeout()``). ``check_after=`` seconds: only connections idle at least that long
  are checked. A check interrupted (the caller cancelled) closes its connection: it may be
  left in the middle of a query.
- ``max_waiting=``: a caller that would queue behind ``max_waiting`` others raises
  ``mppool.TooManyRequests`` at once.
- psycopg_pool's counters (see `mppool.counters`) in ``stats()``, and ``pop_stats()``. A hand-out
  reads the clock once and a return once (for ``usage_ms``); the rest are counted on the slow
  paths only. With ``PROMETHEUS_MULTIPROC_DIR`` set, they are exported to Prometheus
  (measures.py).
- ``name=``: how errors, logs and ``stats()`` name the pool (psycopg_pool's ``name``).
- psycopg_pool's lifecycle and reconnect options (`mppool.aio.lifecycle`): ``open=True``
  (False: acquires raise ``PoolClosed`` until ``await pool.open()``), ``await
  pool.wait(timeout=30.0)``, ``async with pool:``, ``reconnect_timeout=300.0`` and
  ``reconnect_failed=`` (a plain or async ``hook(pool)``): a failing ``make_connection`` is
  retried with backoff (1 s, doubling, +-10% jitter), acquires fail fast with its error
  meanwhile, and ``reconnect_failed`` is called once per outage after ``reconnect_timeout``.
  There is no ``min_size`` (nothing is kept open ahead, as in asyncio-connection-pool), so
  ``wait()`` has the meaning psycopg_pool gives it for ``AsyncNullConnectionPool``: it
  returns once a connection can be made (one exists, or it makes one and keeps it idle).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Generic

from ..errors import PoolClosed, TooManyRequests
from ..outage import REFUSED
from ..validate import check_callable, check_int, check_period
from .lifecycle import Lifecycle, ReconnectFailed
from .measures import Measures
from .recall import RECALL_PERIOD, Recall
from .strategy import AsyncBudget, Conn, ConnectionStrategy

__all__ = ["RECALL_PERIOD", "AsyncBudget", "ConnectionPool", "ConnectionStrategy"]

log = logging.getLogger("mppool")

# The clock of check_after and of the counters' durations (tests replace it).
_now = time.monotonic


class _Slot(Generic[Conn]):
    """A live connection, the budget token it holds (None without a budget), when it was
    made, when it was last handed out or returned (`_now`) and how many times it was handed
    out (recall.py reads the last three)."""

    __slots__ = ("conn", "created", "stamp", "token", "uses")

    def __init__(self, conn: Conn, token: Any) -> None:
        self.conn = conn
        self.token = token
        self.created = _now()
        self.stamp = 0.0
        self.uses = 0


class _Create:
    """Given to a waiter instead of a connection: a slot is reserved for it, make one."""

    def __repr__(self) -> str:
        return "CREATE"


_CREATE = _Create()


class _Available:
    """asyncio-connection-pool's ``pool.available`` as far as it is read: a size."""

    __slots__ = ("_idle",)

    def __init__(self, idle: deque[Any]) -> None:
        self._idle = idle

    def qsize(self) -> int:
        return len(self._idle)

    def empty(self) -> bool:
        return not self._idle

    def __len__(self) -> int:
        return len(self._idle)


class ConnectionPool(Measures, Lifecycle, Recall, Generic[Conn]):
    """A pool of connections for one event loop at a time, optionally burstable, optionally
    under a budget shared by many processes.

    ``max_size`` connections are kept; with ``burst_limit``, up to ``burst_limit`` exist
    when demand needs them, and those above ``max_size`` are closed when returned while
    nobody waits. With ``budget=`` (an async token pool), every live connection, burst ones
    included, holds one token: taken before ``make_connection`` runs, given back once the
    connection is closed. When another process waits for the budget, connections go back
    to it once they are due, with the core pool's hysteresis (recall.py: checked every 50 ms
    while this pool holds any).
    ``check``, ``check_after``, ``max_waiting``, ``reconnect_timeout``,
    ``reconnect_failed``, ``open``: see the module docstring. ``name``: how errors, logs
    and ``stats()`` name the pool.

    Not thread-safe: use a pool from one thread (and one event loop at a time).
    """

    def __init__(
        self,
        *,
        strategy: ConnectionStrategy[Conn],
        max_size: int,
        burst_limit: int | None = None,
        budget: AsyncBudget | None = None,
        check: Callable[[Conn], bool | Awaitable[bool]] | None = None,
        check_after: float = 0.0,
        max_waiting: int = 0,
        reconnect_timeout: float | None = 300.0,
        reconnect_failed: ReconnectFailed | None = None,
        open: bool = True,
        name: str | None = None,
    ) -> None:
        check_int("max_size", max_size)
        if burst_limit is not None:
            check_int("burst_limit", burst_limit)
            if burst_limit < max_size:
                raise ValueError(
                    "burst_limit must be greater than or equal to max_size "
                    f"(burst_limit={burst_limit}, max_size={max_size})")
        if (max_size if burst_limit is None else burst_limit) < 1:
            raise ValueError(f"no connection could ever be made with max_size={max_size} "
                             f"and burst_limit={burst_limit}")
        if budget is not None and not (callable(getattr(budget, "get", None))
                                       and callable(getattr(budget, "put", None))):
            raise TypeError(f"budget must be an async token pool (get/put), got {budget!r}")
        check_callable("check", check)
        self.check = check
        self.check_after = check_period("check_after", check_after)
        self.max_waiting = check_int("max_waiting", max_waiting)
        self._init_lifecycle(reconnect_timeout, reconnect_failed, open, name)
        self.strategy = strategy
        self.max_size = max_size
        self.burst_limit = burst_limit
        self.budget = budget
        self.in_use = 0  # handed out to callers
        self.currently_allocating = 0  # slots reserved: waiting for a token or make_connection
        self.currently_deallocating = 0  # being closed (their token not given back yet)
        self._idle: deque[_Slot[Conn]] = deque()
        self._waitq: deque[asyncio.Future[Any]] = deque()
        self._init_recall()
        self._background: set[asyncio.Task[Any]] = set()
        self._init_measures()
        self._export_metrics()  # PROMETHEUS_MULTIPROC_DIR: see measures.py

    # ---------------------------------------------------------------- counters

    @property
    def _total(self) -> int:
        """Connections that exist or are being made or closed: never above the limit."""
        return (self.in_use + self.currently_allocating + len(self._idle)
                + self.currently_deallocating)

    @property
    def _waiters(self) -> int:
        return sum(not fut.done() for fut in self._waitq)

    @property
    def available(self) -> _Available:
        """The idle connections (``qsize()``, ``empty()``), as asyncio-connection-pool's."""
        return _Available(self._idle)

    def _limit(self) -> int:
        return self.max_size if self.burst_limit is None else max(self.burst_limit, self.max_size)

    def _room(self) -> bool:
        return self._total < self._limit()

    def _now(self) -> float:
        return _now()

    # ---------------------------------------------------------------- getting

    @asynccontextmanager
    async def get_connection(self) -> AsyncIterator[Conn]:
        """``async with pool.get_connection() as conn:`` a live connection for the block.

        An idle connection is handed out without yielding to the event loop; otherwise a new
        one is made (up to ``burst_limit``), or the caller waits for one to be returned.
        Wrap it in ``asyncio.timeout()`` to bound the wait.
        """
        slot = await self._acquire()
        try:
            yield slot.conn
        finally:
            await self._release(slot)

    async def _acquire(self) -> _Slot[Conn]:
        if self.budget is not None:
            self._ensure_recall()
        try:
            while True:
                if self._closed:
                    raise self._refusal()
                slot: _Slot[Conn]
                fresh = False
                if self._idle:
                    slot = self._idle.popleft()  # no await on this path
                    self.in_use += 1
                elif self._total < self._limit():
                    self.currently_allocating += 1
                    slot, fresh = await self._make(), True
                else:
                    if self.max_waiting and self._waiters >= self.max_waiting:
                        raise TooManyRequests(
                            f"{self._who}: {self.max_waiting} tasks wait already "
                            f"(max_waiting={self.max_waiting})")
                    got = await self._wait()
                    if got is _CREATE:
                        slot, fresh = await self._make(), True
                    else:
                        slot = got
                try:
                    closed = self.strategy.connection_is_closed(slot.conn)
                except BaseException:
                    await self._discard(slot)
                    raise
                if (not closed and (fresh or self.check is None)) or await self._usable(
                        slot, closed):
                    self._pcounts["nuses"] += 1
                    slot.uses += 1
                    slot.stamp = _now()
                    return slot
        except BaseException:
            self._pcounts["requests_errors"] += 1
            self._pcounts["requests_adj"] += 1  # an acquire that failed: no use counted
            raise

    async def _usable(self, slot: _Slot[Conn], closed: bool) -> bool:
        """May ``slot`` (now counted in use, not just made) be handed out? ``check`` runs if
        it is due and ``connection_is_closed`` said no; False: it was closed instead."""
        why = "connection_is_closed() is true"
        if closed:
            self._counts["stale"] += 1
        elif self.check is None or (self.check_after
                                    and _now() - slot.stamp < self.check_after):
            return True
        else:
            why = "check returned False"
            try:
                result = self.check(slot.conn)
                if inspect.isawaitable(result):
                    result = await result
                closed = not result
            except Exception as exc:
                closed, why = True, f"check raised {type(exc).__name__}: {exc}"
            except BaseException:  # cancelled mid-check: the connection may be mid-query
                await self._discard(slot)
                raise
            if not closed:
                return True
        self._pcounts["connections_lost"] += 1
        log.info("mppool.aio: closing a connection found broken before it was handed out "
                 "(%.200s)", why)
        await self._discard(slot)
        return False

    async def _discard(self, slot: _Slot[Conn]) -> None:
        """Close a connection counted in use that is not handed out after all."""
        self.in_use -= 1
        self.currently_deallocating += 1
        await self._close(slot, quiet=True)

    async def _wait(self) -> Any:
        """Queue until a connection is handed over or a slot is reserved for us."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waitq.append(fut)
        self._pcounts["requests_queued"] += 1
        since = _now()
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Granted just as we were cancelled: pass it on, nothing is lost.
                got = fut.result()
                if got is _CREATE:
                    self.currently_allocating -= 1
                    self._wake()
                else:
                    await self._release(got)
            else:
                try:
                    self._waitq.remove(fut)
                except ValueError:
                    pass
            raise
        finally:
            self._pcounts["requests_wait_s"] += _now() - since

    async def _make(self) -> _Slot[Conn]:
        """Make a connection in a slot counted in ``currently_allocating``; during an outage
        (lifecycle.py) only the attempt that is due calls make_connection, the others raise
        its last error at once."""
        token = None
        ticket = REFUSED
        due = refused = False
        try:
            try:
                ticket = self._admit()
            except Exception:
                refused = True  # failed fast: make_connection was not called
                raise
            if self.budget is not None:
                try:
                    token = await self.budget.get()  # before make_connection: the cap holds
                except BaseException:
                    self._outage.abort(ticket)  # not an attempt: make_connection not called
                    ticket = REFUSED
                    raise
            self._pcounts["connections_num"] += 1
            since = _now()
            try:
                conn = await self.strategy.make_connection()
            except BaseException as exc:
                self._pcounts["connections_errors"] += 1
                due = self._make_failed(exc, ticket)
                raise
            finally:
                self._pcounts["connections_s"] += _now() - since
        except BaseException:
            self._counts["make_refused" if refused else "make_errors"] += 1
            try:
                if token is not None:
                    await self._give_token(token)
            finally:
                self.currently_allocating -= 1
                self._wake()
                if due:
                    await self._report_outage()
            raise
        self._make_succeeded()
        self.currently_allocating -= 1
        self.in_use += 1
        self._counts["made"] += 1
        return _Slot(conn, token)

    def _wake(self) -> None:
        """Reserve slots for waiters while the pool is below its limit."""
        while self._waitq and self._total < self._limit():
            fut = self._waitq.popleft()
            if fut.done():
                continue
            self.currently_allocating += 1
            fut.set_result(_CREATE)

    # ---------------------------------------------------------------- returning

    def _put_back(self, slot: _Slot[Conn], recall: bool) -> bool:
        """Give a returned connection to a waiter or keep it idle; False: close it instead
        (``recall``: it goes back to the budget, see recall.py)."""
        self.in_use -= 1
        now = _now()
        self._pcounts["usage_s"] += now - slot.stamp
        slot.stamp = now  # idle (or handed over) since
        if self._closed:
            return False
        if recall and self._recall_n > 0:
            self._recall_n -= 1  # another process waits for the budget: give it back
            self._counts["recalled"] += 1
            return False
        while self._waitq:
            fut = self._waitq.popleft()
            if not fut.done():
                self.in_use += 1
                fut.set_result(slot)
                return True
        if self.in_use + self.currently_allocating + len(self._idle) >= self.max_size:
            self._counts["burst_closed"] += 1  # above max_size and nobody waits
            return False
        self._idle.append(slot)
        return True

    async def _release(self, slot: _Slot[Conn]) -> None:
        recall = False
        try:
            if self._recall_n > 0:  # asks the budget: cancelled meanwhile, the slot is kept
                recall = await self._recall_wanted(slot)
        finally:
            if not self._put_back(slot, recall):
                self.currently_deallocating += 1
                await self._close(slot)

    async def _close(self, slot: _Slot[Conn], quiet: bool = False) -> None:
        """Close a connection counted in ``currently_deallocating``; give its token back.

        Shielded: a caller cancelled meanwhile does not leave a half-closed connection
        uncounted (or its token given back while the server still sees it)."""
        await self._shielded(self._close_now(slot, quiet))

    async def _close_now(self, slot: _Slot[Conn], quiet: bool) -> None:
        try:
            result = self.strategy.close_connection(slot.conn)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self._counts["close_errors"] += 1
            if not quiet:
                raise
            log.warning("mppool.aio: closing a connection failed", exc_info=True)
        finally:
            try:
                if slot.token is not None:
                    await self._give_token(slot.token)
            finally:
                self.currently_deallocating -= 1
                self._counts["closed"] += 1
                self._wake()

    async def _give_token(self, token: Any) -> None:
        """Give a budget token back, even if the caller is cancelled meanwhile."""
        budget = self.budget
        assert budget is not None

        async def put() -> None:
            try:
                await budget.put(token)
            except Exception:
                log.warning("mppool.aio: could not give a budget token back", exc_info=True)

        await self._shielded(put())

    async def _shielded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` to its end even if the caller is cancelled meanwhile."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._forget)
        await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # seen by the caller, or by nobody if it was cancelled

    # ---------------------------------------------------------------- closing

    async def close(self) -> None:
        """Close idle connections now and the others when they are returned; waiters and
        later ``get_connection()`` calls raise ``PoolClosed``."""
        self._closed = self._shut = True
        while self._waitq:
            fut = self._waitq.popleft()
            if not fut.done():
                fut.set_exception(PoolClosed(f"{self._who} is shutting down"))
        await self._stop_recall()
        slots = list(self._idle)
        self._idle.clear()
        self.currently_deallocating += len(slots)
        for slot in slots:
            await self._close(slot, quiet=True)
