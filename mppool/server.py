"""``mppool.Server``: start and stop a supervisor process; a context manager.

``start()`` runs the supervisor in a fresh interpreter (see `mppool.launch`), not a fork of the
caller: it inherits no threads, locks or listening sockets (a gunicorn arbiter's, say) and
needs no ``if __name__ == "__main__"`` guard in the caller's script. An address where a
supervisor died is taken over only when nothing answers there; a live one makes start()
refuse. The supervisor's own reason is the message when it cannot start.

``Server`` is a plain object, not a multiprocess manager: the manager that serves the control
plane lives in the supervisor process (`mppool.supervisor.control`), and none of its factories
(``Queue``, ``Lock``, ``dict``...) is offered here, where they could not work.
"""

from __future__ import annotations

import math
import os
import subprocess
from types import TracebackType
from typing import Any

from multiprocess.connection import Client as MPClient
from multiprocess.managers import dispatch

from .address import (
    Address,
    beside,
    display,
    fresh_address,
    parse_address,
    require_address_dir,
    server_authkey,
    socket_leftovers,
)
from .addrlock import remove_if_unused
from .launch import launch, take_over, wait_gone
from .protocol import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_MESSAGE, DEFAULT_MAX_UNREAD
from .validate import check_delay, check_int


class Server:
    """The supervisor process; a context manager.

    ``Server(address=None)`` listens on a fresh unix socket in a private directory.
    """

    def __init__(self, address: object = None, authkey: object = None, *,
                 max_message: int = DEFAULT_MAX_MESSAGE, max_unread: int = DEFAULT_MAX_UNREAD,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        """``max_message``: the largest message (bytes) a client may send; ``max_unread``:
        a client with more unread replies (bytes) is disconnected; ``handshake_timeout``:
        seconds a new connection has to prove it holds the key."""
        key = server_authkey(authkey)  # checked first: a bad key must leave no directory
        self._options = {
            "max_message": check_int("max_message", max_message, minimum=4096),
            "max_unread": check_int("max_unread", max_unread, minimum=65536),
            "handshake_timeout": check_delay("handshake_timeout", handshake_timeout),
        }
        if math.isinf(self._options["handshake_timeout"]) or not handshake_timeout:
            raise ValueError(f"handshake_timeout must be a finite number of seconds > 0, "
                             f"got {handshake_timeout!r}")
        fresh = fresh_address() if address is None else None
        addr: Address = fresh if fresh is not None else parse_address(address)
        # The private directory of a fresh address is ours to remove at shutdown.
        self._own_dir: str | None = None
        if fresh is not None:
            self._own_directory(os.path.dirname(fresh))
        self._authkey = key
        self._address: Address = addr
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    def _own_directory(self, directory: str) -> None:
        """The socket's directory is ours (made for ``Server(address=None)``, or inherited
        from such a supervisor this one replaces): removed at shutdown, and by the
        supervisor itself when it stops, in case our process is killed first."""
        self._own_dir = directory
        self._options["remove_dir"] = 1

    @property
    def address(self) -> Address:
        """Where the supervisor listens: a socket path, or ``(host, port)`` (a port 0 given
        is the real port once started)."""
        return self._address

    @property
    def authkey(self) -> bytes:
        """The key clients must present (also in the key file beside the socket)."""
        return bytes(self._authkey)

    @property
    def pid(self) -> int | None:
        """The supervisor's pid while it runs (None before ``start()`` and after
        ``shutdown()``)."""
        return self._pid

    def start(self, detach: bool = False) -> Server:
        """Start the supervisor process and wait until it serves; returns self.

        With ``detach=True`` it outlives this process (autostart): it is started through a
        launcher that exits at once (a double fork), so it is nobody's child here and never
        lingers as our zombie; it logs to ``log_path(address)``. Otherwise it is our child
        and stops when this process dies.

        The leftovers of a dead supervisor at this address are taken over; a live one makes
        this raise ``ServerUnavailable``.
        """
        if self._pid is not None:
            raise RuntimeError("this Server is already started")
        require_address_dir(self._address)
        take_over(self._address)
        started = launch(self._address, self.authkey, detach, self._options)
        self._address, self._pid, self._proc = started.address, started.pid, started.proc
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the supervisor: every pool is shut down; its sockets, key file, autostart lock
        file (unless somebody holds it) and, for ``Server(address=None)``, private directory
        are removed."""
        pid = self._pid
        if pid is None:
            return
        try:
            conn = MPClient(self._address, authkey=self.authkey)
            try:
                dispatch(conn, None, "shutdown")
            finally:
                conn.close()
        except Exception:
            pass  # already gone, or unreachable: the pid below still ends it
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()  # only the pid we started
                self._proc.wait(5)
        else:
            wait_gone(pid, timeout)
        self._proc = None
        self._pid = None
        for path in socket_leftovers(self._address):
            try:
                os.unlink(path)
            except OSError:
                pass
        # The autostart lock a connect(autostart=True) made here, unless one holds it now.
        remove_if_unused(beside(self._address, ".lock"))
        if self._own_dir:
            try:
                os.rmdir(self._own_dir)
            except OSError:
                pass  # not empty: something of the user's is there, leave it

    def client(self, timeout: float = 5.0) -> Any:
        """A client of this supervisor (``mppool.connect(server.address, server.authkey)``)."""
        from .client import connect
        return connect(self._address, self.authkey, timeout=timeout)

    def __enter__(self) -> Server:
        return self.start() if self._proc is None else self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<mppool.Server {display(self._address)} pid={self.pid}>"
