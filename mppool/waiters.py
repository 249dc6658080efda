"""A get that waits: the waiter protocol of the core pool, and what a waiter is handed.

Runs in every process with a core pool: a worker's in-process `mppool.Pool`, and the
supervisor, whose pools queue the gets of its clients (``supervisor.conn.RemoteWaiter``).

    a get finds no idle object and no room  ──▶  Waiter queued in pool._waiters (under _lock)
    a return or freed room, under _lock     ──▶  waiter.set(entry | CREATE | exception)
                                                 (False if it gave up: the next one is tried)
    the waiter, woken (_wake), outside the lock:  uses the entry, or creates one for CREATE
    a waiter that times out                 ──▶  withdraw(): cancel, then leave the queue

The pool's side of these moves is `mppool.state` (`PoolState._put_back`, `_grant_slots`).
"""

from __future__ import annotations

import threading
from typing import Any

from .clock import wait_event
from .holder import Holder


class _Create:
    """Handed to a waiter instead of an object: a slot is reserved, create one."""

    def __repr__(self) -> str:
        return "CREATE"


CREATE = _Create()


class WaiterBase:
    """The waiter protocol, one for every queued get: a thread blocked here (`Waiter`) or a
    client's get queued in the supervisor (``supervisor.conn.RemoteWaiter``).

    ``holder``; ``set(result)`` and ``cancel()``, called under the pool lock, so they must
    not block; ``set`` returns False once the waiter gave up (``done``) or can no longer take
    anything (``_can_take``: its client went away), so that an object is never handed to a
    waiter that timed out or whose process died; ``result`` is what it was handed: an entry,
    ``CREATE``, or an exception to raise. ``_wake`` tells the waiter, without blocking.
    """

    __slots__ = ("done", "holder", "result", "since")

    def __init__(self, holder: Holder) -> None:
        self.holder = holder
        self.result: Any = None
        self.done = False
        self.since: float | None = None  # when it was queued (the pool's clock), for stats()

    def set(self, result: Any) -> bool:
        if self.done or not self._can_take():
            return False
        self.result = result
        self.done = True
        self._wake(result)
        return True

    def cancel(self) -> bool:
        if self.done:
            return False
        self.done = True
        return True

    def _can_take(self) -> bool:
        return True

    def _wake(self, result: Any) -> None:
        raise NotImplementedError


def withdraw(queue: Any, waiter: WaiterBase) -> bool:
    """Under the caller's lock: take a waiter that gave up out of ``queue``; False if it was
    served first (its result is then the caller's to give back)."""
    if not waiter.cancel():
        return False
    try:
        queue.remove(waiter)
    except ValueError:
        pass
    return True


class Waiter(WaiterBase):
    """A getter blocked in this process."""

    __slots__ = ("_event",)

    def __init__(self, holder: Holder) -> None:
        super().__init__(holder)
        self._event = threading.Event()

    def _wake(self, result: Any) -> None:
        self._event.set()

    def wait(self, timeout: float | None) -> bool:
        return wait_event(self._event, timeout)  # any timeout, however large
