"""The supervisor's control-plane accept loop, hardened against peers that do not play along.

multiprocess's ``Listener.accept()`` runs the authentication challenge on the accepting
thread, with no deadline: one peer that connects and never answers stops the control plane
for everybody. Here the accept thread only accepts; each new connection is authenticated on a
thread of its own, under a deadline:

- at most ``max_pending`` connections may be authenticating at once; beyond that the oldest
  one is cut off (an honest client answers the challenge in a millisecond, so the oldest is
  the likeliest to be a peer that never will), so a flood of silent peers costs a bounded
  number of threads and descriptors and never locks honest clients out;
- a connection still authenticating after ``deadline`` seconds is shut down by one reaper
  thread (``shutdown(SHUT_RDWR)`` wakes the thread blocked reading it, which closes it); a
  deadline on the whole handshake, not per read, so a peer trickling a byte at a time gains
  nothing;
- once authenticated the same thread serves the connection (``serve_authenticated``: what
  multiprocess's ``Server.handle_request`` does after its own challenge, which must not run
  a second time);
- out of descriptors (``EMFILE``/``ENFILE``): one spare descriptor is kept in reserve, so the
  loop can still accept the waiting connection and close it at once — a client is refused
  promptly instead of hanging in the backlog — then it backs off briefly;
- a thread that cannot start (``RuntimeError: can't start new thread``) costs only that
  connection;
- nothing kills the loop: every exception is caught and logged, and every such log line is
  rate-limited (at most one a second per kind, with a count of what was suppressed), so
  exhaustion never becomes a log storm.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from multiprocess.connection import answer_challenge, deliver_challenge

from ..ratelog import RateLimitedLog
from .console import describe_peer, set_caller

log = logging.getLogger("mppool")

AUTH_DEADLINE = 5.0
MAX_PENDING = 64
EMFILE_BACKOFF = 0.05


class FdReserve:
    """One descriptor kept in reserve, so that a listener out of descriptors can still take
    the connection that waits and close it: its client fails at once instead of hanging in
    the backlog until its timeout, and the listener stops being readable."""

    def __init__(self) -> None:
        self._fd: int | None = self._open()

    @staticmethod
    def _open() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def refuse_one(self, accept: Callable[[], Any]) -> None:
        """Close the reserve, accept one connection and close it, take the reserve back."""
        if self._fd is None:
            self._fd = self._open()
            return
        os.close(self._fd)
        self._fd = None
        try:
            conn = accept()
            (conn[0] if isinstance(conn, tuple) else conn).close()
        except OSError:
            pass
        self._fd = self._open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _shutdown_fd(fd: int) -> None:
    """shutdown(SHUT_RDWR) a socket we do not own the descriptor of (it stays open)."""
    s = socket.socket(fileno=fd)
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.detach()


def serve_authenticated(server: Any, conn: Any) -> None:
    """Serve one authenticated control connection for a multiprocess manager ``server``.

    ``multiprocess.managers.Server.handle_request`` minus its authentication (done already,
    under a deadline): read the request, run it (``accept_connection`` serves the connection
    until the client leaves), send the result; close the connection in every case.
    """
    set_caller(describe_peer(conn.fileno()) or "an unknown peer")
    try:
        request = None
        try:
            request = conn.recv()
            _ignore, funcname, args, kwds = request
            if funcname not in server.public:
                raise ValueError(f"{funcname!r} unrecognized")
            func = getattr(server, funcname)
        except Exception:
            msg: tuple[str, Any] = ("#TRACEBACK", traceback.format_exc())
        else:
            try:
                msg = ("#RETURN", func(conn, *args, **kwds))
            except Exception:
                msg = ("#TRACEBACK", traceback.format_exc())
        try:
            conn.send(msg)
        except Exception:
            try:
                conn.send(("#TRACEBACK", traceback.format_exc()))
            except Exception:
                pass
    except SystemExit:
        pass  # serve_client() calls sys.exit(0) when its client leaves
    finally:
        conn.close()


class ControlAcceptor:
    """Accept control connections on ``listener`` (a multiprocess ``Listener``) until
    ``stop`` is set; authenticate each with ``authkey`` and pass it to ``handle`` (which
    must close it)."""

    def __init__(self, listener: Any, authkey: bytes, handle: Callable[[Any], None],
                 stop: threading.Event, *, deadline: float = AUTH_DEADLINE,
                 max_pending: int = MAX_PENDING,
                 start_thread: Callable[[threading.Thread], None] = threading.Thread.start) -> None:
        self.listener = listener
        self.authkey = authkey
        self.handle = handle
        self.stop = stop
        self.deadline = deadline
        self.max_pending = max_pending
        self.start_thread = start_thread  # a seam for tests: make thread starts fail
        self.logs = RateLimitedLog()
        self._lock = threading.Condition()
        # Connections still authenticating, oldest first: id -> (deadline, fd).
        self._pending: collections.OrderedDict[int, tuple[float, int]] = collections.OrderedDict()
        self._next_id = 0
        self.reserve = FdReserve()
        self.naccepted = 0
        self.nrefused = 0
        self.ntimedout = 0

    # --------------------------------------------------------------------------- threads

    def start(self) -> None:
        threading.Thread(target=self.run, name="mppool-control", daemon=True).start()
        threading.Thread(target=self._reap, name="mppool-control-deadline", daemon=True).start()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._accept_one()
            except Exception as exc:  # never let the loop die: log (rate-limited) and go on
                if self.stop.is_set():
                    break
                self.logs.warning("loop", "mppool: control accept loop: %s: %s",
                                  type(exc).__name__, exc)
                self.stop.wait(EMFILE_BACKOFF)
        with self._lock:
            self._lock.notify_all()
        self.reserve.close()

    def _accept_one(self) -> None:
        raw = self.listener._listener
        if raw is None:  # the listener was closed: we are stopping
            self.stop.wait(0.1)
            return
        try:
            conn = raw.accept()  # the bare connection: no authentication on this thread
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._out_of_descriptors(raw, exc)
                return
            if self.stop.is_set():
                return
            raise
        self.naccepted += 1
        with self._lock:
            cid = self._next_id
            self._next_id += 1
            if len(self._pending) >= self.max_pending:
                _old, (_d, old_fd) = self._pending.popitem(last=False)
                _shutdown_fd(old_fd)  # its thread wakes up, fails the handshake, closes it
                self.ntimedout += 1
                evicted = True
            else:
                evicted = False
            self._pending[cid] = (time.monotonic() + self.deadline, conn.fileno())
            self._lock.notify_all()
        if evicted:
            self.logs.warning("evict", "mppool: more than %d control connections authenticating "
                                       "at once: cut off the oldest", self.max_pending)
        t = threading.Thread(target=self._serve, args=(cid, conn), name="mppool-control-conn",
                             daemon=True)
        try:
            self.start_thread(t)
        except Exception as exc:  # RuntimeError: can't start new thread
            self._done(cid)
            conn.close()
            self.nrefused += 1
            self.logs.warning("thread", "mppool: refused a control connection: cannot start a "
                                        "thread for it (%s)", exc)

    def _out_of_descriptors(self, raw: Any, exc: OSError) -> None:
        """EMFILE/ENFILE: refuse the waiting connection now (with the reserve descriptor),
        back off, log at most once a second."""
        self.nrefused += 1
        self.logs.warning("emfile", "mppool: out of file descriptors (%s): refusing new control "
                                    "connections until some close", exc.strerror or exc)
        self.reserve.refuse_one(raw.accept)
        self.stop.wait(EMFILE_BACKOFF)

    # --------------------------------------------------------------------------- per connection

    def _done(self, cid: int) -> bool:
        """Leave the pending set; False if the reaper (or an eviction) got there first."""
        with self._lock:
            return self._pending.pop(cid, None) is not None

    def _serve(self, cid: int, conn: Any) -> None:
        try:
            try:
                deliver_challenge(conn, self.authkey)
                answer_challenge(conn, self.authkey)
            except Exception as exc:
                timed_out = not self._done(cid)
                conn.close()
                if timed_out:
                    self.logs.warning("deadline", "mppool: closed a control connection that did "
                                                  "not authenticate within %.0f s", self.deadline)
                else:
                    self.logs.warning("auth", "mppool: refused a control connection: %s: %s",
                                      type(exc).__name__, exc)
                return
            if not self._done(cid):  # cut off just as it finished: its socket is shut down
                conn.close()
                return
            self.handle(conn)  # closes conn when the client goes
        except Exception as exc:
            self.logs.warning("serve", "mppool: control connection failed: %s: %s",
                              type(exc).__name__, exc)
            try:
                conn.close()
            except Exception:
                pass

    def _reap(self) -> None:
        """Shut down connections whose handshake outlived its deadline."""
        while not self.stop.is_set():
            try:
                with self._lock:
                    now = time.monotonic()
                    while self._pending:
                        cid, (due, fd) = next(iter(self._pending.items()))
                        if due > now:
                            break
                        del self._pending[cid]
                        _shutdown_fd(fd)
                        self.ntimedout += 1
                    # Entries are in deadline order (same deadline for all, added in order).
                    wait = (next(iter(self._pending.values()))[0] - now) if self._pending else 1.0
                    self._lock.wait(min(max(wait, 0.01), 1.0))
            except Exception as exc:
                self.logs.warning("reaper", "mppool: control deadline thread: %s: %s",
                                  type(exc).__name__, exc)
                self.stop.wait(0.1)
