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
