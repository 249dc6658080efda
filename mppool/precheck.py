"""``check=``: a pre-ping of idle objects just before a get hands them out.

A database connection can die while it sits idle (``pg_terminate_backend``, a server
restart, an idle-session timeout); housekeeping's ``health`` only finds out at its next
round, and the user would be handed the corpse. With ``check`` the get finds out first:

    get ── an idle entry, leased to the caller (acquire) ──▶ _verify(entry), outside the lock:
             idle less than check_after s ─▶ handed out unchecked
             check(obj) True              ─▶ handed out
             False, or raised             ─▶ the lease is void, the object is closed
                                             (connections_lost), and the get goes on, within
                                             its deadline: another idle object, a new one,
                                             or the queue

Objects just created are not checked, nor objects handed from one holder to a waiter
within ``check_after``. In the supervisor, ``check`` is user code like any hook: it runs on
the pool's own threads, never on the lease loop.
"""

from __future__ import annotations

import logging
from typing import Any

from .state import Entry, PoolState
from .validate import check_callable, check_period

log = logging.getLogger("mppool")


class Checking(PoolState):
    """The pre-ping side of the core `mppool.Pool` (see the module docstring)."""

    def _init_check(self, check: Any, check_after: Any) -> None:
        """Check and keep the options (no other state: nothing is created yet)."""
        check_callable("check", check)
        self._check_after = check_period("check_after", check_after)
        self._check = check

    def _check_due(self, entry: Entry) -> bool:
        """Must ``entry`` (just leased from the idle ones) be checked before it goes out?"""
        return self._check is not None and (
            not self._check_after or self._clock.now() - entry.last_ret >= self._check_after)

    def _verify(self, entry: Entry) -> bool:
        """Outside the lock, for an entry just leased from the idle ones: run ``check`` if it
        is due. False: the object was broken and is closed (its lease is void); the get must
        look again."""
        if not self._check_due(entry):
            return True
        try:
            ok = bool(self._check(entry.obj))  # type: ignore[misc]
            why = "check returned False"
        except Exception as exc:
            ok, why = False, f"check raised {type(exc).__name__}: {exc}"
        if ok:
            return True
        with self._lock:
            lost = self._using.get(entry.lease) is entry
            if lost:  # else killed or reclaimed meanwhile: no longer this get's to close
                del self._using[entry.lease]
                entry.holder = None
                self._counts["connections_lost"] += 1
                self._counts["requests_adj"] -= 1  # its get goes on: one request, not two
                self._to_close.append(entry)
                if not self._using:
                    self._drained.notify_all()
        if lost:
            log.info("mppool: pool %r: closing an idle object found broken before a get (%.200s)",
                     self._name, why)
            self._settle()
        return False
