"""psycopg_pool's lifecycle and reconnect options on `mppool.aio.ConnectionPool`: ``open=``,
``await pool.open()``, ``await pool.wait()``, ``async with pool:``, ``reconnect_timeout=`` and
``reconnect_failed=``.

    ConnectionPool(..., open=False)  acquires raise PoolClosed until ``await pool.open()``;
                                     nothing is made before (nothing is anyway: no min_size)
    await pool.wait(timeout=30.0)    returns once a connection exists (idle or in use), else
                                     makes one and keeps it idle: the database is reachable;
                                     TimeOut (naming the last creation error) if none could
                                     be made in time
    async with pool:                 opened on entry if it was not, closed on exit

The pool has no ``min_size`` (asyncio-connection-pool keeps no connection open ahead), so
``wait()`` means what it means for psycopg_pool's ``AsyncNullConnectionPool``, whose minimum
is 0 too: a connection can be made now. Unlike the null pool, the connection made is kept
idle for the next acquire.

Creation failures (``make_connection`` raising) are an *outage*, with the core pool's rules
(`mppool.outage`): the next attempt is allowed after 1 s, then 2, 4, 8... (x2, +-10%
jitter); meanwhile an acquire that would make a connection raises a copy of the last error
at once, without calling ``make_connection`` (no hammering a database that is down, no
caller waiting for a connect that will fail). The first acquire (or ``wait()``) after the
delay makes the one attempt that is due. When an attempt fails ``reconnect_timeout`` seconds
after the first failure, ``reconnect_failed(pool)`` (a plain or ``async`` callable) is called,
once per outage. A connection made ends the outage. Attempts are made by acquires and
``wait()`` only: there is no background task (nothing is kept open ahead to refill).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from ..errors import PoolClosed, TimeOut
from ..outage import Outage, admit, failed, gave_up, succeeded
from ..validate import check_callable, check_duration, check_timeout

log = logging.getLogger("mppool")

WHO = "mppool.aio.ConnectionPool"
POLL = 0.05  # wait() with every slot being made or closed by others: look again this soon

ReconnectFailed = Callable[[Any], Awaitable[None] | None]


class Lifecycle:
    """The lifecycle and outage side of `mppool.aio.ConnectionPool` (module docstring)."""

    # The pool's, read here.
    _closed: bool
    _idle: Any
    in_use: int
    currently_allocating: int

    def _init_lifecycle(self, reconnect_timeout: float | None,
                        reconnect_failed: ReconnectFailed | None, open: bool,
                        name: str | None) -> None:
        if not isinstance(open, bool):
            raise TypeError(f"open must be a bool, got {open!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self.name = name
        # How errors, logs and stats name the pool.
        self._who = f"{WHO} {name!r}" if name else WHO
        check_callable("reconnect_failed", reconnect_failed)
        self._outage = Outage(check_duration("reconnect_timeout", reconnect_timeout))
        self.reconnect_failed = reconnect_failed
        self._shut = False  # close() was called: for good
        self._closed = not open  # acquires check this one flag: not open, or closed

    def _refusal(self) -> PoolClosed:
        if self._shut:
            return PoolClosed(f"{self._who} is shutting down")
        return PoolClosed(f"{self._who} is not open (open=False): await pool.open() first")

    async def open(self) -> None:
        """Open a pool made with ``open=False`` (a no-op if it is open); PoolClosed once it
        was closed."""
        if self._shut:
            raise PoolClosed(f"{self._who} was closed: it cannot be opened again")
        self._closed = False

    async def wait(self, timeout: float | None = 30.0) -> None:
        """Return once a connection exists (idle or in use); if none does, make one (kept
        idle). ``TimeOut`` if none could be made within ``timeout`` seconds (None: as long as
        it takes): creation failures are retried on the backoff's schedule meanwhile.
        PoolClosed if the pool is not open."""
        limit = check_timeout("timeout", timeout)
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        while True:
            if self._closed:
                raise self._refusal()
            if self._idle or self.in_use:
                return
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                error = self._outage.error
                raise TimeOut(f"{self._who}: no connection could be made in {timeout} s"
                              + (f": {type(error).__name__}: {error}"
                                 if error is not None else ""))
            pause = await self._try_make(deadline) if self._room() else POLL
            if pause is None:
                return  # made: even if it was closed at once (max_size=0 with a burst_limit)
            await asyncio.sleep(max(0.0, pause if left is None else min(pause, left)))

    async def _try_make(self, deadline: float | None) -> float | None:
        """For wait(): make a connection and keep it idle. None when made, else how long to
        sleep before looking again."""
        self.currently_allocating += 1
        try:
            async with asyncio.timeout_at(deadline):
                slot = await self._make()
        except TimeoutError:
            return 0.0  # the deadline (the loop raises TimeOut) or make_connection's own
        except Exception:  # a creation error, or its fail-fast copy: the next attempt's time
            if not self._outage.active:
                return POLL  # not make_connection's failure (the budget's): look again soon
            return max(0.0, self._outage.next_at - self._now())
        await self._release(slot)
        return None

    async def __aenter__(self) -> Any:
        await self.open()
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ---------------------------------------------------------------- the outage, for _make

    def _admit(self) -> int:
        """May make_connection run? A ticket, or a fail-fast copy of the last error."""
        return admit(self._outage, self._now(), "make_connection()")

    def _make_failed(self, exc: BaseException, ticket: int) -> bool:
        """make_connection raised; True if reconnect_failed is due."""
        return failed(self._outage, self._now(), exc, ticket, self._who)

    def _make_succeeded(self) -> None:
        succeeded(self._outage, self._now(), self._who)

    async def _report_outage(self) -> None:
        """The outage lasted reconnect_timeout: log, and call the user's hook (never raising:
        the caller must see the creation error)."""
        gave_up(self._outage, self._who)
        if self.reconnect_failed is None:
            return
        try:
            result = self.reconnect_failed(self)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("mppool: %s: reconnect_failed raised", self._who)

    # The pool's.
    def _now(self) -> float:
        raise NotImplementedError

    def _room(self) -> bool:
        raise NotImplementedError

    async def _make(self) -> Any:
        raise NotImplementedError

    async def _release(self, slot: Any) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError
