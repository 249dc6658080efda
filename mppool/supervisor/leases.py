"""The supervisor's lease loop: get and put for every client, on one thread.

    client process                        supervisor
    SharedPool.get() ── Get(rid) ──────▶  LeaseLoop (epoll, one thread)
                                            pool._acquire(holder, RemoteWaiter)
                                              idle entry → reply at once
                                              CREATE     → fun() on the pool's own threads, then reply
                                              waiter     → queued in the Pool; a deadline here
                     ◀── Granted(rid, lease, blob)
    SharedPool.ret() ── Put(lease) ────▶  pool._checkin(lease, holder=this connection)

No thread ever blocks on behalf of a client: a waiter is an entry in the pool's queue tied to
its connection. When a connection closes (exit, crash, SIGKILL) the loop drops its waiters
and gives back every lease it holds, at once. User code (``fun``, hooks, proxied methods)
never runs on this thread: it runs on the threads of the pool it belongs to.

One client cannot hurt the others. Whatever a connection sends is decoded by
`mppool.protocol`, which refuses any malformed field; frames are capped before their body is
read (4 KiB before the key is proved, ``max_message`` after), the handshake has a deadline,
a client that does not read its replies is cut off past ``max_unread`` bytes, and a lease is
returned, or its proxied object called, only by the connection that holds it. On any breach
the loop closes that one connection, which gives back what it held. Running out of file
descriptors or threads refuses new work, logged at most once a second, and never stops the
loop.
"""

from __future__ import annotations

import errno
import heapq
import hmac
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import handshake
from .. import protocol as P
from ..clock import Clock
from ..errors import TimeOut
from ..holder import peer_holder
from ..protocol import KIND_DISCARD, KIND_GET
from ..ratelog import RateLimitedLog
from .acceptor import FdReserve
from .conn import Conn, RemoteWaiter
from .requests import Requests

if TYPE_CHECKING:
    from .core import Supervisor
    from .fastregion import FastRegion

log = logging.getLogger("mppool")

# Hang-up and error count as readable: recv() then sees the EOF and closes the connection.
_READ = select.POLLIN | select.POLLHUP | select.POLLERR
_WRITE = select.POLLOUT
MAX_POLL = 3600.0  # no OS wait is ever handed more than this (epoll overflows past ~24 days)
MAX_HANDSHAKING = 256  # connections that have not proved the key yet, at once
ACCEPT_BACKOFF = 0.1


class _Poller:
    """epoll where there is one (Linux), poll elsewhere (macOS); timeouts in seconds."""

    poll: Callable[[float | None, int], list[tuple[int, int]]]  # (timeout, max events)

    def __init__(self) -> None:
        self._epoll = hasattr(select, "epoll")
        p: Any = select.epoll() if self._epoll else select.poll()
        self._p = p
        self.register = p.register
        self.modify = p.modify
        self.unregister = p.unregister
        # epoll takes seconds (None: for ever) as they come: its own method, no Python frame
        # per turn. maxevents matters: by default epoll allocates a FD_SETSIZE-long array per
        # call.
        self.poll = p.poll if self._epoll else self._poll_ms

    def _poll_ms(self, timeout: float | None, nfds: int) -> list[tuple[int, int]]:
        return self._p.poll(None if timeout is None else timeout * 1000)

    def close(self) -> None:
        if self._epoll:
            self._p.close()


class LeaseLoop(Requests):
    def __init__(self, sup: Supervisor, address: str | tuple[str, int], authkey: bytes, *,
                 max_message: int = P.DEFAULT_MAX_MESSAGE, max_unread: int = P.DEFAULT_MAX_UNREAD,
                 handshake_timeout: float = P.DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        self.sup = sup
        self.records = sup.by_id  # pool id -> Record (the same dict, read on the hot path)
        # The fast path's regions by pool id (fastregion.py), kept after a pool is dropped so
        # that tokens given back while it shuts down still reach it.
        self.fast_regions: dict[int, FastRegion] = {}
        self.authkey = authkey
        self.max_message = max_message
        self.max_unread = max_unread
        self.handshake_timeout = handshake_timeout
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.lsock = socket.socket(family, socket.SOCK_STREAM)
        if isinstance(address, str):
            try:
                os.unlink(address)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)  # sockets are created 0777 & ~umask: 0600
            try:
                self.lsock.bind(address)
            finally:
                os.umask(old)
            os.chmod(address, 0o600)
            self.address: str | tuple[str, int] = address
        else:
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.lsock.bind(address)
            self.address = self.lsock.getsockname()[:2]
        self.lsock.listen(256)
        self.lsock.setblocking(False)
        self.poller = _Poller()
        self.fds: dict[int, Conn] = {}
        self.poller.register(self.lsock.fileno(), _READ)
        self.listening = True
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.poller.register(self.wake_r.fileno(), _READ)
        self.pending: list[Callable[[], None]] = []
        self.plock = threading.Lock()
        # (when, seq, kind, obj): get deadlines (obj: RemoteWaiter), handshake deadlines (obj:
        # Conn), and the listener's re-arming after running out of descriptors (obj: None).
        self.timers: list[tuple[float, int, int, Any]] = []
        self.seq = itertools.count()
        self.conns: dict[int, Conn] = {}
        self.handshaking = 0
        self.ids = itertools.count(1)
        self.refs = itertools.count(1)
        self.stopping = False
        self.ratelog = RateLimitedLog()
        self.reserve = FdReserve()
        self.thread = threading.Thread(target=self.run, name="mppool-leases", daemon=True)

    # -------------------------------------------------------------- cross-thread entry points

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread, after the events at hand (from any thread)."""
        with self.plock:
            self.pending.append(fn)
        if threading.get_ident() == self.thread.ident:
            return  # the loop runs every pending callback before it waits again
        try:
            self.wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are stopping

    def stop(self) -> None:
        self.stopping = True
        self.call_soon(lambda: None)
        self.thread.join(5.0)

    # --------------------------------------------------------------------------- the loop

    def run(self) -> None:
        while not self.stopping:
            try:
                self.turns()
            except Exception:  # the loop serves everybody: it must survive anything
                self.ratelog(logging.ERROR, "loop", "mppool: lease loop error", exc_info=True)
        for conn in list(self.conns.values()):
            self.close(conn)
        self.poller.close()
        self.reserve.close()
        self.lsock.close()
        self.wake_r.close()
        self.wake_w.close()

    def turns(self) -> None:
        """Turn the loop until stopped (an exception ends it; run() starts it again)."""
        clock = self.sup.clock
        # The real clock is time.monotonic itself: no Python frame per turn for it.
        now = time.monotonic if type(clock) is Clock else clock.now
        fds = self.fds
        poll = self.poller.poll
        read = self.read
        lfd, wfd = self.lsock.fileno(), self.wake_r.fileno()
        while not self.stopping:
            timers = self.timers  # expire() may prune it into a new list
            timeout: float | None = None
            if self.pending:
                timeout = 0.0  # callbacks queued by the loop itself: no sleeping on them
            elif timers:
                # A timer whose purpose is gone (a handshake done, a waiter served) goes now,
                # not at its deadline: until then every turn would read the clock twice.
                while timers and _spent(timers[0]):
                    heapq.heappop(timers)
                if timers:
                    timeout = timers[0][0] - now()
                    timeout = 0.0 if timeout < 0.0 else MAX_POLL if timeout > MAX_POLL else timeout
            for fd, mask in poll(timeout, len(fds) + 2):
                conn = fds.get(fd)
                if conn is not None:
                    if mask & _READ:
                        read(conn)
                    if mask & _WRITE and not conn.closed:
                        self.flush(conn)
                elif fd == lfd:
                    self.accept()
                elif fd == wfd:
                    try:
                        while self.wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
            if self.pending:
                self.run_pending()
            timers = self.timers
            if timers and timers[0][0] <= now():
                self.expire(now())

    def run_pending(self) -> None:
        while self.pending:
            with self.plock:
                todo, self.pending = self.pending, []
            for fn in todo:
                try:
                    fn()
                except Exception:
                    self.ratelog(logging.ERROR, "callback", "mppool: lease loop callback failed",
                                 exc_info=True)

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Refuse the one that waits (it fails at once rather than at its timeout),
                    # and stop watching the listener for a moment, or the loop would spin.
                    # Connected clients are served meanwhile.
                    self.ratelog(logging.WARNING, "accept", "mppool: cannot accept lease "
                                 "connections (%s): refusing new ones for %.1f s", exc.strerror,
                                 ACCEPT_BACKOFF)
                    self.reserve.refuse_one(self.lsock.accept)
                    self.pause_listening()
                else:
                    self.ratelog(logging.WARNING, "accept", "mppool: accept failed: %s", exc)
                return
            if self.handshaking >= MAX_HANDSHAKING:
                self.ratelog(logging.WARNING, "handshaking", "mppool: %d lease connections have "
                             "not finished their handshake: refusing more", self.handshaking)
                sock.close()
                continue
            sock.setblocking(False)
            conn = Conn(self, sock, next(self.ids))
            self.conns[conn.id] = conn
            self.fds[conn.fd] = conn
            self.handshaking += 1
            self.poller.register(conn.fd, _READ)
            self.at(self.sup.clock.now() + self.handshake_timeout, 1, conn)
            conn.send_raw(handshake.encode_nonce(conn.nonce))

    def pause_listening(self) -> None:
        if self.listening:
            self.listening = False
            self.poller.unregister(self.lsock.fileno())
            self.at(self.sup.clock.now() + ACCEPT_BACKOFF, 2, None)

    def at(self, when: float, kind: int, obj: Any) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), kind, obj))

    def read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(P.RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        try:
            frames = conn.reader.feed(data)
            if conn.holder is None and frames:
                # Nothing is unpickled before the client proved it has the key.
                self.hello(conn, frames[0])
                if conn.closed:
                    return
                del frames[0]
            for msg in frames:
                try:
                    # The two messages of every lease cycle come decoded by the reader, as
                    # tuples (framing.RequestReader); anything else is a payload.
                    # No *args: a call with a star goes the slow way through the interpreter.
                    if type(msg) is tuple:
                        if msg[0] == KIND_GET:
                            timeout = msg[3]
                            self.get(conn, msg[1], msg[2],
                                     None if timeout == P.POOL_TIMEOUT else timeout)
                        else:
                            self.put(conn, msg[1], msg[2], msg[0] == KIND_DISCARD)
                    else:
                        self.dispatch(conn, P.decode_request(msg))
                except P.ProtocolError:
                    raise
                except Exception:
                    self.ratelog(logging.ERROR, "request", "mppool: conn %d: a request failed",
                                 conn.id, exc_info=True)
                if conn.closed:
                    return
        except P.ProtocolError as exc:
            self.close(conn, f"it broke the protocol: {exc}")

    def hello(self, conn: Conn, payload: Any) -> None:
        try:
            answer, client_nonce, pid, start, host = handshake.decode_hello(payload)
            ok = hmac.compare_digest(answer, handshake.digest(self.authkey, conn.nonce))
        except P.ProtocolError:
            ok = False
        if not ok:
            self.ratelog(logging.WARNING, "key", "mppool: refused a lease connection with a wrong "
                         "key or no handshake")
            self.close(conn)
            return
        conn.holder = peer_holder(conn.sock, pid, start, host, conn.id)
        conn.reader.limit = self.max_message
        self.handshaking -= 1
        conn.send_raw(handshake.encode_ack(handshake.digest(self.authkey, client_nonce),
                                           conn.id, self.sup.instance))

    def flush(self, conn: Conn) -> None:
        with conn.wlock:
            try:
                n = conn.sock.send(conn.wbuf)
            except BlockingIOError:
                return
            except OSError:
                n = -1
            if n >= 0:
                del conn.wbuf[:n]
                if not conn.wbuf:
                    self.poller.modify(conn.fd, _READ)
                return
        self.close(conn)

    def want_write(self, conn: Conn) -> None:
        if not conn.closed and conn.wbuf:
            self.poller.modify(conn.fd, _READ | _WRITE)

    def close(self, conn: Conn, why: str | None = None) -> None:
        """The client is gone (or cut off): forget its waiters, give back what it held."""
        with conn.wlock:
            if conn.closed:
                return
            conn.closed = True
        if why:
            pid = conn.holder.pid if conn.holder is not None else "?"
            self.ratelog(logging.WARNING, "cut", "mppool: closing lease connection %d (pid %s): %s",
                         conn.id, pid, why)
        if conn.holder is None:
            self.handshaking -= 1
        self.conns.pop(conn.id, None)
        self.fds.pop(conn.fd, None)
        try:
            self.poller.unregister(conn.fd)
        except (KeyError, ValueError, OSError):
            pass
        conn.sock.close()
        conn.refs.clear()
        conn.waiters.clear()
        conn.held_puts.clear()  # what they would give back, release_conn takes back
        if conn.holder is not None:
            self.sup.release_conn(conn)

    def expire(self, now: float) -> None:
        timers = self.timers
        if len(timers) > 1024:  # satisfied waiters linger until their deadline: prune
            self.timers = timers = [t for t in timers if not _spent(t)]
            heapq.heapify(timers)
        while timers and timers[0][0] <= now:
            _, _, kind, obj = heapq.heappop(timers)
            if kind == 0:
                waiter: RemoteWaiter = obj
                if not waiter.done and waiter.rec.pool._cancel(waiter):
                    waiter.conn.waiters.pop(waiter.rid, None)
                    waiter.conn.fail(waiter.rid, TimeOut(
                        f"pool {waiter.rec.name!r}: no object available in time"))
            elif kind == 1:
                if obj.holder is None and not obj.closed:
                    self.close(obj, f"no handshake within {self.handshake_timeout:g} s")
            elif kind == 3:  # a callback at a time (the fast path's retries)
                try:
                    obj()
                except Exception:
                    self.ratelog(logging.ERROR, "timer", "mppool: a timed callback failed",
                                 exc_info=True)
            elif not self.listening and not self.stopping:
                self.listening = True
                self.poller.register(self.lsock.fileno(), _READ)


def _spent(timer: tuple[float, int, int, Any]) -> bool:
    kind, obj = timer[2], timer[3]
    if kind == 0:
        return bool(obj.done)
    if kind == 1:
        return obj.holder is not None or obj.closed
    return False
