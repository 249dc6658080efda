"""Exceptions mppool raises on purpose.

They cross process boundaries (the supervisor raises, a worker catches), so each one pickles
to the same class and message: ``Exception`` pickles as ``cls(*args)``, and every class here
takes the message as its only argument.
"""

from __future__ import annotations

__all__ = [
    "ConnectTimeout",
    "PoolClosed",
    "PoolException",
    "RemoteError",
    "ServerUnavailable",
    "TimeOut",
    "TooManyRequests",
]


class PoolException(Exception):
    """Base of everything mppool raises on purpose."""


class TimeOut(PoolException):
    """No object or token became available in time."""


class PoolClosed(PoolException):
    """The pool was shut down; the message always contains "shutting down"."""

    def __init__(self, message: str = "pool is shutting down") -> None:
        if "shutting down" not in message:
            message = f"{message} (pool is shutting down)"
        super().__init__(message)


class ServerUnavailable(PoolException):
    """The supervisor cannot be reached, refused the key, or died."""


class ConnectTimeout(PoolException):
    """db_pool: creating a connection took longer than ``connect_timeout``."""


class TooManyRequests(PoolException):
    """The pool's queue of waiters is full (``max_waiting``)."""


class RemoteError(PoolException):
    """User code raised in the supervisor an exception whose class this process cannot
    import; the message names the original class, ``remote_traceback`` holds its traceback."""


SQLITE_THREAD_HINT = (
    "mppool: a pooled sqlite3 connection is used by whichever thread gets it (and a proxied "
    "one by the supervisor's pool threads): create it with "
    "sqlite3.connect(..., check_same_thread=False)")


def add_hint(exc: BaseException) -> BaseException:
    """Add a note saying how to fix a mistake mppool recognises in ``exc`` (once); returns
    ``exc``. Today: sqlite3's "objects created in a thread can only be used in that same
    thread", raised by a connection made without ``check_same_thread=False``. A note travels
    with the exception across the process boundary and shows in its traceback."""
    if (type(exc).__module__ == "sqlite3" and type(exc).__name__ == "ProgrammingError"
            and "same thread" in str(exc)
            and SQLITE_THREAD_HINT not in getattr(exc, "__notes__", ())):
        exc.add_note(SQLITE_THREAD_HINT)
    return exc
