"""psycopg_pool's lifecycle and reconnect options on queuepool's `Pool`: ``open=``,
``pool.open()``, ``pool.wait()``, ``with Pool(...) as pool:``, ``reconnect_timeout=`` and
``reconnect_failed=``.

    Pool(..., open=False)     managers may be put in, but takes raise PoolClosed until
                              ``pool.open()`` (and the budget recall starts only then);
                              nothing is opened before (nothing is anyway: managers open
                              their resource at their first take)
    pool.wait(timeout=30.0)   returns once a manager's resource is open (idle or taken),
                              else takes a manager, opens it and puts it back: the resource
                              can be opened now; TimeOut (naming the last open() error) if
                              that did not work in time (no manager put in, all taken, or
                              every open() failing)
    with Pool(...) as pool:   opened on entry if it was not, closed on exit (`Pool.close`)

queuepool's pool has no ``min_size`` (it opens nothing ahead), so ``wait()`` means what it
means for psycopg_pool's ``NullConnectionPool``, whose minimum is 0 too: a resource can be
opened now. The one opened is kept open in its manager, for the next take.

A manager's ``open()`` raising is an *outage*, with the core pool's rules (`mppool.outage`):
the next attempt is allowed after 1 s, then 2, 4, 8... (x2, +-10% jitter); meanwhile a take
that would open a manager raises a copy of the last error at once without calling ``open()``
(the manager goes back to the pool, closed), and takes of managers that are open go on as
usual. The first take (or ``wait()``) after the delay makes the one attempt that is due. When
an attempt fails ``reconnect_timeout`` seconds after the first failure,
``reconnect_failed(pool)`` is called, once per outage. An ``open()`` that works ends the
outage. Attempts are made by takes and ``wait()`` only (no background task).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..budget import Budget, draw_token, give_back
from ..clock import clamp_wait
from ..errors import PoolClosed, TimeOut
from ..lifetime import OpenClose
from ..outage import Outage, admit, failed, gave_up, succeeded
from ..validate import check_callable, check_duration, check_timeout

if TYPE_CHECKING:
    from .pool import ResourceManager

log = logging.getLogger("mppool")


class Lifecycle(OpenClose):
    """The lifecycle and outage side of queuepool's `Pool` (see the module docstring)."""

    # The pool's, read here.
    name: str
    _budget: Budget | None
    _tokens: dict[int, Any]
    _lock: threading.Lock
    _closed: bool
    _idle: list[ResourceManager]
    _out: set[int]

    def _init_lifecycle(self, reconnect_timeout: float | None,
                        reconnect_failed: Callable[[Any], Any] | None, open: bool) -> None:
        if not isinstance(open, bool):
            raise TypeError(f"open must be a bool, got {open!r}")
        check_callable("reconnect_failed", reconnect_failed)
        self._outage = Outage(check_duration("reconnect_timeout", reconnect_timeout))
        self.reconnect_failed = reconnect_failed
        # Why takes are refused (None: they are not); take() reads this one attribute.
        self._refused: str | None = (None if open else
                                     f"queuepool {self.name!r} is not open (open=False): "
                                     "call pool.open() first")

    def open(self) -> None:
        """Open a pool made with ``open=False`` (a no-op if it is open); PoolClosed once it
        was closed."""
        with self._lock:
            if self._closed:
                raise PoolClosed(f"queuepool {self.name!r} was closed: it cannot be opened again")
            opened, self._refused = self._refused is not None, None
        if opened:
            self._start_recall()

    def wait(self, timeout: float | None = 30.0) -> None:
        """Return once a manager's resource is open (idle or taken); if none is, take a
        manager, open it and put it back. ``TimeOut`` if that did not work within ``timeout``
        seconds (None: as long as it takes): open() failures are retried on the backoff's
        schedule meanwhile. PoolClosed if the pool is not open."""
        limit = check_timeout("timeout", timeout)
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            with self._lock:
                if self._refused is not None:
                    raise PoolClosed(self._refused)
                if self._out or any(r._isOpen for r in self._idle):
                    return
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                r = self._take(left)  # not take(): not a request for the counters
            except TimeOut:
                raise self._not_ready(timeout) from None
            except Exception:  # open() failed, or failed fast: wait for the next attempt
                with self._lock:
                    if not self._outage.active:
                        raise  # not opening (a repair, a check): not for wait() to retry
                    pause = self._outage.next_at - self._now()
                if deadline is not None:
                    pause = min(pause, deadline - time.monotonic())
                time.sleep(clamp_wait(max(0.0, pause)) or 0.0)
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._not_ready(timeout) from None
                continue
            self.put(r)
            return

    def _not_ready(self, timeout: float | None) -> TimeOut:
        error = self._outage.error
        return TimeOut(f"queuepool {self.name!r}: no resource could be opened in {timeout} s"
                       + (f": {type(error).__name__}: {error}" if error is not None else ""))

    # ---------------------------------------------------------------- the outage, for _open

    def _open(self, r: ResourceManager, timeout: float | None) -> None:
        """Open a closed manager through the outage: fail fast during one (a copy of the
        last error, open() not called), one attempt when it is due. Its budget token is
        drawn first, within ``timeout`` (TimeOut: no token in time)."""
        who = f"queuepool {self.name!r}"
        with self._lock:
            ticket = admit(self._outage, self._now(), "open()")
        try:
            token = draw_token(self._budget, False, timeout)
        except BaseException:
            with self._lock:
                self._outage.abort(ticket)  # not an attempt: open() was not called
            raise
        since = self._now()
        try:
            r.open()
        except BaseException as exc:
            self._count(connections_num=1, connections_errors=1,
                        connections_s=self._now() - since)
            give_back(self._budget, token, str(self.name))
            r._isOpen = False
            with self._lock:
                due = failed(self._outage, self._now(), exc, ticket, who)
            if due:
                gave_up(self._outage, who)
                if self.reconnect_failed is not None:
                    try:
                        self.reconnect_failed(self)
                    except Exception:
                        log.exception("mppool: %s: reconnect_failed raised", who)
            raise
        now = self._now()
        self._count(connections_num=1, connections_s=now - since)
        with self._lock:
            succeeded(self._outage, now, who)
            if token is not None:
                self._tokens[id(r)] = token

    def _prefer_open(self, top: ResourceManager) -> ResourceManager:
        """Under the lock, during an outage: ``top`` (just popped) is closed and opening it
        would fail fast; take the open manager nearest the top instead, if there is one
        (``top`` keeps its place)."""
        for i in range(len(self._idle) - 1, -1, -1):
            if self._idle[i]._isOpen:
                r = self._idle.pop(i)
                self._idle.append(top)
                return r
        return top

    # The pool's.
    def _now(self) -> float:
        raise NotImplementedError

    def _count(self, **amounts: float) -> None:
        raise NotImplementedError

    def _start_recall(self) -> None:
        raise NotImplementedError

    def _take(self, timeout: float | None) -> ResourceManager:
        raise NotImplementedError

    def put(self, r: ResourceManager) -> None:
        raise NotImplementedError

