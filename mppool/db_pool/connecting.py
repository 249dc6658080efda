"""Opening and closing DB-API connections, with a time limit each way.

    timed_connect(connect, timeout)                  safe_close(conn)
    ───────────────────────────────                  ────────────────
    caller ── starts ──▶ helper thread: connect()    close(), errors logged
      waits up to ``timeout``                        then, for a driver with fileno() (libpq):
      in time: the connection, or its error          wait up to CLOSE_WAIT s for the server
      late: ConnectTimeout; the helper closes        to drop its end, so that the budget
            whatever arrives afterwards              token goes back only once the server
                                                     no longer counts the connection

Used by both pools: RawConnectionPool connects and closes in this process, the supervisor
does it for a TpooledConnectionPool's slots (served.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from ..errors import ConnectTimeout
from ..validate import check_delay

log = logging.getLogger("mppool")


class _Attempt:
    """One ``connect()`` running in a helper thread, which the caller may abandon."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self.connect = connect
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.finished = False
        self.abandoned = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            result = self.connect()
        except BaseException as exc:  # handed to the caller, never left to the thread
            with self.lock:
                self.finished, self.error = True, exc
            self.done.set()
            return
        with self.lock:
            late = self.abandoned
            if not late:
                self.finished, self.result = True, result
        self.done.set()
        if late:
            # Nobody will ever use it, and left open it would count against the database.
            log.info("mppool: db_pool: closing a connection that arrived after connect_timeout")
            safe_close(result, quiet=True)


def timed_connect(connect: Callable[[], Any], timeout: float | None, what: str) -> Any:
    """``connect()``, or ConnectTimeout once ``timeout`` seconds have passed.

    A thread cannot be interrupted, so the connect runs in a daemon helper thread that the
    caller stops waiting for; whatever it produces late is closed (see _Attempt.run).
    """
    if timeout is None:
        return connect()
    attempt = _Attempt(connect)
    threading.Thread(target=attempt.run, name="mppool-connect", daemon=True).start()
    attempt.done.wait(timeout)
    with attempt.lock:
        if not attempt.finished:
            attempt.abandoned = True
            raise ConnectTimeout(f"connecting with {what} took longer than connect_timeout={timeout!r} s")
    if attempt.error is not None:
        raise attempt.error
    return attempt.result


# How long closing a connection waits for the server to drop it (see safe_close).
CLOSE_WAIT = 2.0


def safe_close(conn: Any, quiet: bool = False) -> None:
    """Close a connection, logging (not raising) what ``close()`` raises.

    For a driver whose connection has ``fileno()`` (psycopg, psycopg2), wait until the server
    has closed its end too: ``close()`` only sends "terminate", and the server process lives
    on for a moment, still counted in ``pg_stat_activity`` and against ``max_connections``.
    The budget token goes back after this returns, so without the wait a connection opened
    with that token elsewhere could overlap the old one and exceed the cap, server side.
    """
    close = getattr(conn, "close", None)
    if not callable(close):
        return
    sock = peer_socket(conn)
    try:
        close()
    except Exception:
        if not quiet:
            log.warning("mppool: db_pool: closing a connection raised, ignored", exc_info=True)
    if sock is not None:
        with sock:
            _wait_eof(sock, CLOSE_WAIT)


def peer_socket(conn: Any) -> socket.socket | None:
    """A duplicate of the connection's socket, if it has one, to watch the server leave."""
    fileno = getattr(conn, "fileno", None)
    if not callable(fileno):
        return None
    try:
        fd = os.dup(fileno())
    except Exception:
        return None  # closed already, or not a file descriptor
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)  # not a socket
        return None
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        return None
    return sock


def _wait_eof(sock: socket.socket, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(4096):
                return  # the server closed its end: its process is gone
    except OSError:
        return  # reset or timed out: either way, stop waiting
    log.debug("mppool: db_pool: the server did not drop a closed connection within %s s", timeout)


def module_name(db_module: Any) -> str:
    if isinstance(db_module, str):
        return db_module
    if isinstance(db_module, types.ModuleType):
        return db_module.__name__
    return f"{type(db_module).__module__}.{type(db_module).__qualname__}"


def check_db_module(db_module: Any) -> None:
    if isinstance(db_module, str):
        if not db_module or not all(part.isidentifier() for part in db_module.split(".")):
            raise ValueError(f"db_module must be a module, its import name or an object with "
                             f"connect(), got {db_module!r}")
        return
    if not callable(getattr(db_module, "connect", None)):
        raise TypeError(f"db_module must be a DB-API module (with connect()) or its import name, "
                        f"got {db_module!r}")


def check_connect_timeout(value: Any) -> float | None:
    if value is None:
        return None
    value = check_delay("connect_timeout", value)
    if value == 0:
        raise ValueError("connect_timeout must be > 0 seconds, or None for no limit, got 0")
    return value
