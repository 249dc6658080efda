"""The client end of the control plane: calls on the supervisor's ``Control`` object.

The supervisor serves ``Control`` through a multiprocess ``SyncManager``; this module speaks
that manager's protocol itself instead of going through a multiprocess proxy, for two
reasons a proxy cannot meet:

- **deadlines**: a proxy blocks in ``recv`` for ever when the supervisor is frozen (SIGSTOP,
  a stuck host). Here the socket carries kernel timeouts (``SO_RCVTIMEO``/``SO_SNDTIMEO``),
  so the handshake and every call return or raise within the client's ``timeout``;
- **no retry on a refused connection**: nobody listening means no supervisor, said at once.

One connection per thread (a call in one thread never waits behind another's), made on first
use and dropped, never closed, in the child of a fork. An exception raised in the supervisor
arrives packed (`mppool.remote.RemoteFailure`) and is rebuilt as its own class, with the
supervisor's traceback in ``remote_traceback``.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from typing import Any

from multiprocess.connection import Connection, answer_challenge, deliver_challenge
from multiprocess.context import AuthenticationError

from .address import Address, display
from .channel import set_socket_timeouts
from .errors import ServerUnavailable
from .remote import control_result

_REFUSED = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)


class ControlConnection:
    """Calls on the supervisor's Control object, each within ``timeout`` seconds."""

    def __init__(self, address: Address, authkey: bytes, timeout: float) -> None:
        self.address = address
        self.authkey = authkey
        self.timeout = timeout
        self._local = threading.local()
        self._pid = os.getpid()
        self._all: list[Connection] = []
        self._lock = threading.Lock()

    def call(self, method: str, *args: Any, timeout: float | None = -1.0) -> Any:
        """``Control.<method>(*args)``; ``timeout=None`` waits as long as the call runs."""
        limit = self.timeout if timeout == -1.0 else timeout
        for attempt in (1, 2):
            cached = getattr(self._local, "conn", None) is not None and self._pid == os.getpid()
            conn = self._connection()
            try:
                _set_timeouts(conn, limit, self.timeout)
                conn.send((self._local.ident, method, args, {}))
                kind, result = conn.recv()
                break
            except (OSError, EOFError) as exc:
                self._drop(conn)
                if isinstance(exc, BlockingIOError):
                    raise ServerUnavailable(f"supervisor at {display(self.address)} did not "
                                            f"answer {method}() within {limit} s (frozen?)") from None
                if cached and attempt == 1:
                    continue  # a connection to a supervisor that is gone: dial once more
                raise ServerUnavailable(f"supervisor at {display(self.address)} is gone: "
                                        f"{exc or 'connection closed'}") from None
        return control_result(kind, result, method)

    def _connection(self) -> Connection:
        if self._pid != os.getpid():
            self.forget()
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        # The Control object's id in this supervisor's manager: asked with each new
        # connection, since a supervisor restarted at the address has a new one.
        first = self._dial()
        try:
            ident = self._dispatch(first, "create", ("Control",))[0]
        finally:
            first.close()
        conn = self._dial()
        try:
            self._dispatch(conn, "accept_connection", ("mppool",))
        except BaseException:
            conn.close()
            raise
        self._local.conn = conn
        self._local.ident = ident
        with self._lock:
            self._all.append(conn)
        return conn

    def _dial(self) -> Connection:
        address = self.address
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        where = display(address)
        try:
            sock.settimeout(self.timeout)
            sock.connect(address if isinstance(address, str) else tuple(address))
            sock.settimeout(None)
            set_socket_timeouts(sock, self.timeout, self.timeout)
        except OSError as exc:
            sock.close()
            if exc.errno in _REFUSED:
                raise ServerUnavailable(f"no supervisor at {where} ({exc.strerror}): start one "
                                        "with mppool.Server(...).start(), `mppool serve`, or "
                                        "connect(autostart=True)") from None
            raise ServerUnavailable(f"cannot reach the supervisor at {where}: {exc}") from None
        conn = Connection(sock.detach())
        try:
            answer_challenge(conn, self.authkey)
            deliver_challenge(conn, self.authkey)
        except AuthenticationError:
            conn.close()
            raise ServerUnavailable(f"supervisor at {where} refused the key (wrong authkey)") from None
        except (OSError, EOFError, AssertionError) as exc:
            conn.close()
            why = "did not answer the handshake in time (frozen?)" \
                if isinstance(exc, BlockingIOError) else f"broke the handshake: {exc or 'closed'}"
            raise ServerUnavailable(f"supervisor at {where} {why}") from None
        return conn

    def _dispatch(self, conn: Connection, method: str, args: tuple[Any, ...]) -> Any:
        try:
            conn.send((None, method, args, {}))
            kind, result = conn.recv()
        except (OSError, EOFError) as exc:
            raise ServerUnavailable(f"supervisor at {display(self.address)} did not answer "
                                    f"({exc or 'connection closed'})") from None
        if kind != "#RETURN":
            raise ServerUnavailable(f"supervisor at {display(self.address)} refused {method}: "
                                    f"{result}")
        return result

    def _drop(self, conn: Connection) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        try:
            conn.close()
        except OSError:
            pass

    def forget(self) -> None:
        """In a forked child: drop the parent's connections without closing them."""
        self._local = threading.local()
        self._all = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass
        self._local = threading.local()


def _set_timeouts(conn: Connection, recv: float | None, send: float | None) -> None:
    """Kernel deadlines on ``conn``'s descriptor, which stays ``conn``'s."""
    s = socket.socket(fileno=conn.fileno())
    try:
        set_socket_timeouts(s, recv, send)
    finally:
        s.detach()
