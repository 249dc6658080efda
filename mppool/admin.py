"""What an operator does to a running core pool: pause and resume it, resize it, close its
idle objects (``clear``) or replace them all (``drain``).

Each is one decision under the pool lock (state.py), followed by the closes it decided,
outside it; objects in use are never touched. The supervisor's console verbs (``mppool
pause``, ``resize``, ``drain``...) call these on the pools it serves.
"""

from __future__ import annotations

from .errors import PoolClosed
from .state import PoolState
from .validate import check_resize, check_size


class Admin(PoolState):
    """The operator's side of the core `mppool.Pool` (see the module docstring)."""

    def clear(self) -> int:
        """Close every idle object (those in use are not touched); returns how many.

        min_size is refilled by housekeeping, as after any other close.
        """
        with self._lock:
            idle = list(self._avail)
            self._avail.clear()
            self._to_close.extend(idle)
        self._settle()
        return len(idle)

    def resize(self, max_size: int) -> None:
        """Change the bound; extra idle objects are closed, new room goes to waiters.

        With ``burst_limit``, the new ``max_size`` must be between 1 and ``burst_limit``
        (ValueError otherwise); ``burst_limit`` itself does not change.
        """
        max_size = check_size("max_size", max_size)
        with self._lock:
            check_resize(max_size, self._min_size, self._burst_limit)
            self._max_size = max_size
            while max_size and self._avail and self._total() > max_size:
                self._to_close.append(self._avail.popleft())
            self._grant_slots()
        self._settle()

    def pause(self) -> bool:
        """Stop handing out objects: every ``get()`` queues (FIFO) as if the pool were empty,
        and times out as usual. Leases out continue and are returned as usual; housekeeping
        goes on. Returns False if the pool was already paused."""
        with self._lock:
            if self._shutdown:
                raise PoolClosed(f"pool {self._id} is shutting down")
            was, self._paused = self._paused, True
            return not was

    def resume(self) -> bool:
        """Undo `pause`: the queued gets are served, oldest first (idle objects, then room
        to create). Returns False if the pool was not paused."""
        with self._lock:
            if not self._paused:
                return False
            self._paused = False
            while self._avail and any(not w.done for w in self._waiters):
                self._put_back(self._avail.popleft() if self._fifo else self._avail.pop())
            self._grant_slots()
            return True

    @property
    def paused(self) -> bool:
        """Whether the pool is paused (see `pause`)."""
        return self._paused

    def drain(self) -> int:
        """Replace every idle object (after a credential rotation, say): close them all
        now and refill ``min_size`` at once, without waiting for the next housekeeping
        round. Objects in use are not touched. Returns how many were closed."""
        n = self.clear()
        with self._lock:
            if self._shutdown:
                return n
        self._offload("fill", self._fill)
        return n
