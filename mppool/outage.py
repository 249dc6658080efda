"""An outage of object creation, as a pure state machine: backoff, one probe at a time, and
when to give up (see reconnect.py for what the pool does with it).

    failed()    fun raised: the next attempt in 1 s, then 2, 4, 8... (x2, ±10% jitter, at
                most MAX_DELAY); before ``timeout`` the last attempt lands on it; the call
                that sees the outage last ``timeout`` returns True, once per outage
    begin()     may a creation start? NORMAL without an outage; during one, PROBE for the
                one attempt that is due, REFUSED for everything else
    succeeded() fun worked: the outage is over

No lock and no clock of its own: the pool calls it under its lock, with the time, so the
rules are unit-tested by feeding it times.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable
from typing import Any

INITIAL_DELAY = 1.0
BACKOFF = 2.0
JITTER = 0.1
MAX_DELAY = 60.0

REFUSED, NORMAL, PROBE = 0, 1, 2  # what Outage.begin() allows

log = logging.getLogger("mppool")


class Outage:
    """The creation failures of one pool (see the module docstring). No lock and no clock of
    its own: the pool calls it under its lock, with the time."""

    __slots__ = ("_rand", "attempts", "delay", "error", "next_at", "probing", "reported",
                 "since", "timeout")

    def __init__(self, timeout: float | None, rand: Callable[[], float] = random.random) -> None:
        self.timeout = timeout  # None: never give up (reconnect_failed is never called)
        self._rand = rand
        self.since: float | None = None  # the first failure of the outage; None: no outage
        self.delay = 0.0
        self.next_at = 0.0
        self.attempts = 0
        self.probing = False
        self.reported = False
        self.error: BaseException | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def begin(self, now: float) -> int:
        """May a creation start now? NORMAL (no outage), PROBE (the one attempt that is due),
        or REFUSED (raise `error` instead)."""
        if self.since is None:
            return NORMAL
        if self.probing or now < self.next_at:
            return REFUSED
        self.probing = True
        return PROBE

    def abort(self, ticket: int) -> None:
        """A creation allowed by begin() did not call fun after all (no budget token)."""
        if ticket == PROBE:
            self.probing = False

    def failed(self, now: float, exc: BaseException, ticket: int) -> bool:
        """fun raised: plan the next attempt. True when the outage has just lasted
        ``timeout``: call reconnect_failed (once per outage)."""
        self.error = exc
        if self.since is not None and ticket != PROBE:
            return False  # started before the outage began: the probe sets the pace
        self.probing = False
        self.attempts += 1
        if self.since is None:
            self.since, self.delay = now, INITIAL_DELAY
        else:
            self.delay = min(self.delay * BACKOFF, MAX_DELAY)
        delay = self.delay * (1.0 + JITTER * (2.0 * self._rand() - 1.0))
        give_up = None if self.timeout is None else self.since + self.timeout
        if give_up is not None and not self.reported:
            if now >= give_up:
                self.reported = True
                self.next_at = now + delay
                return True
            delay = min(delay, give_up - now)  # the last attempt lands on the deadline
        self.next_at = now + delay
        return False

    def succeeded(self) -> float | None:
        """fun worked: the outage (if any) is over. Returns how long it lasted, or None."""
        since = self.since
        if since is None:
            return None
        self.since, self.delay, self.next_at, self.attempts = None, 0.0, 0.0, 0
        self.probing = self.reported = False
        self.error = None
        return since

    def describe(self, now: float) -> dict[str, Any] | None:
        """For stats(): None, or how the outage stands."""
        if self.since is None:
            return None
        return {"failing_for": now - self.since, "attempts": self.attempts,
                "next_attempt_in": max(0.0, self.next_at - now),
                "error": f"{type(self.error).__name__}: {self.error}"[:200]}


def fail_fast_error(exc: BaseException, next_in: float, creator: str = "fun") -> BaseException:
    """A copy of the last creation error to raise from a get during an outage (the same
    class and message; the original, which other threads may be raising, is not touched)."""
    try:
        again = copy.copy(exc)
    except Exception:
        return exc
    notes = list(getattr(exc, "__notes__", ()))
    notes.append(f"mppool: raised again without calling {creator}: creating objects fails; "
                 f"next attempt in {next_in:.1f} s")
    try:
        again.__notes__ = notes
    except Exception:
        pass
    return again


# What every pool that creates things does with its Outage, under its own lock (the core pool,
# mppool.aio.ConnectionPool, mppool.queuepool.Pool); ``who`` names the pool in the logs.

def admit(outage: Outage, now: float, creator: str = "fun") -> int:
    """``outage.begin(now)``, raising a fail-fast copy of the last creation error when the
    creation may not start (REFUSED): the ticket to give to `failed`/``abort``. ``creator``
    names what was not called, in the copy's note."""
    ticket = outage.begin(now)
    if ticket == REFUSED:
        raise fail_fast_error(outage.error, outage.next_at - now,  # type: ignore[arg-type]
                              creator)
    return ticket


def failed(outage: Outage, now: float, exc: BaseException, ticket: int, who: str) -> bool:
    """A creation raised: ``outage.failed()``, with a warning at the start of an outage.
    True when ``reconnect_failed`` is due (see `gave_up`). Not an Exception (cancelled,
    interrupted): no verdict on the server, the attempt is only given back."""
    if not isinstance(exc, Exception):
        outage.abort(ticket)
        return False
    first = not outage.active
    due = outage.failed(now, exc, ticket)
    if first:
        log.warning("mppool: %s: creating an object failed (%s: %s): retrying with "
                    "backoff, gets fail fast meanwhile", who, type(exc).__name__, exc,
                    exc_info=exc)
    return due


def succeeded(outage: Outage, now: float, who: str) -> None:
    """A creation worked: the outage, if any, is over (logged)."""
    since = outage.succeeded()
    if since is not None:
        log.warning("mppool: %s: creating objects works again after %.1f s", who, now - since)


def gave_up(outage: Outage, who: str) -> None:
    """Log that the outage lasted ``reconnect_timeout``; the caller then calls the hook."""
    log.error("mppool: %s: could not create objects for %s s (reconnect_timeout)",
              who, outage.timeout)
