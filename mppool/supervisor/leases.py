"""The supervisor's lease loop: get and put for every client, on one thread.

    client process                        supervisor
    SharedPool.get() ── Get(rid) ──────▶  LeaseLoop (epoll, one thread)
                                            pool.acquire(holder, RemoteWaiter)
                                              idle entry → reply at once
                                              CREATE     → fun() on the pool's own threads, then reply
                                              waiter     → queued in the Pool; a deadline here
                     ◀── Granted(rid, lease, blob)
    SharedPool.ret() ── Put(lease) ────▶  pool.checkin(lease, holder=this connection)

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
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from ..clock import Clock
from ..errors import PoolClosed, ServerUnavailable, TimeOut
from ..holder import peer_holder
from ..pool import CREATE, Entry
from ..ratelog import RateLimitedLog
from ..remote import is_plain
from .acceptor import FdReserve
from .conn import Conn, RemoteWaiter

if TYPE_CHECKING:
    from .core import Supervisor
    from .registry import Record

log = logging.getLogger("mppool")

# Hang-up and error count as readable: recv() then sees the EOF and closes the connection.
_READ = select.POLLIN | select.POLLHUP | select.POLLERR
_WRITE = select.POLLOUT
MAX_POLL = 3600.0  # no OS wait is ever handed more than this (epoll overflows past ~24 days)
MAX_HANDSHAKING = 256  # connections that have not proved the key yet, at once
ACCEPT_BACKOFF = 0.1


class _Poller:
    """epoll where there is one (Linux), poll elsewhere (macOS); timeouts in seconds."""

    def __init__(self) -> None:
        self._epoll = hasattr(select, "epoll")
        self._p: Any = select.epoll() if self._epoll else select.poll()
        self.register = self._p.register
        self.modify = self._p.modify
        self.unregister = self._p.unregister

    def poll(self, timeout: float | None, nfds: int) -> list[tuple[int, int]]:
        if self._epoll:
            # maxevents matters: by default epoll allocates a FD_SETSIZE-long array per call.
            return self._p.poll(-1 if timeout is None else timeout, nfds)
        return self._p.poll(None if timeout is None else timeout * 1000)

    def close(self) -> None:
        if self._epoll:
            self._p.close()


class LeaseLoop:
    def __init__(self, sup: Supervisor, address: str | tuple[str, int], authkey: bytes, *,
                 max_message: int = P.DEFAULT_MAX_MESSAGE, max_unread: int = P.DEFAULT_MAX_UNREAD,
                 handshake_timeout: float = P.DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        self.sup = sup
        self.records = sup.by_id  # pool id -> Record (the same dict, read on the hot path)
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

    def deliver(self, waiter: RemoteWaiter, result: Any) -> None:
        """A waiter was handed ``result`` under the pool lock: act on it, never blocking."""
        waiter.conn.waiters.pop(waiter.rid, None)
        if result is CREATE:
            self.create(waiter)
        elif isinstance(result, BaseException):
            waiter.conn.fail(waiter.rid, result)
        else:
            self.reply_entry(waiter.conn, waiter.rid, waiter.rec, result, waiter.since)

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
            conn.send_raw(P.encode_nonce(conn.nonce))

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
            for payload in frames:
                if conn.holder is None:
                    # Nothing is unpickled before the client proved it has the key.
                    self.hello(conn, payload)
                else:
                    kind = payload[0] if len(payload) else 0
                    try:
                        # The two messages of every lease cycle, decoded in place.
                        if kind == P.KIND_GET:
                            self.get(conn, *P.parse_get(payload))
                        elif kind == P.KIND_PUT or kind == P.KIND_DISCARD:
                            self.put(conn, *P.parse_put(payload))
                        else:
                            self.dispatch(conn, P.decode_request(payload))
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
            answer, client_nonce, pid, start, host = P.decode_hello(payload)
            ok = hmac.compare_digest(answer, P.digest(self.authkey, conn.nonce))
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
        conn.send_raw(P.encode_ack(P.digest(self.authkey, client_nonce), conn.id,
                                   self.sup.instance))

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
                if not waiter.done and waiter.rec.pool.cancel(waiter):
                    waiter.conn.waiters.pop(waiter.rid, None)
                    waiter.conn.fail(waiter.rid, TimeOut(
                        f"pool {waiter.rec.name!r}: no object available in time"))
            elif kind == 1:
                if obj.holder is None and not obj.closed:
                    self.close(obj, f"no handshake within {self.handshake_timeout:g} s")
            elif not self.listening and not self.stopping:
                self.listening = True
                self.poller.register(self.lsock.fileno(), _READ)

    # ------------------------------------------------------------------------- requests

    def dispatch(self, conn: Conn, msg: P.Request) -> None:
        if isinstance(msg, P.Call):
            self.call(conn, msg)
        elif isinstance(msg, P.DropRef):
            conn.refs.pop(msg.ref, None)
        elif isinstance(msg, P.Waiting):
            rec = self.records.get(msg.pool_id)
            conn.send_raw(P.encode_reply(msg.rid, P.OK, rec.pool.waiting() if rec else 0))
        elif isinstance(msg, P.Ping):
            self.ping(conn, msg.rid)
        elif isinstance(msg, P.Cancel):
            self.cancel_get(conn, msg.rid)
        # Get and Put never get here: read() decodes them in place, before anything else.

    def ping(self, conn: Conn, rid: int) -> None:
        reply = P.encode_reply(rid, P.OK, os.getpid())
        running = list(conn.puts_running)
        if not running:
            conn.send_raw(reply)
            return
        left = [len(running)]
        lock = threading.Lock()

        def one_done(_: Future[Any]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                conn.send_raw(reply)

        for fut in running:
            fut.add_done_callback(one_done)

    def get(self, conn: Conn, rid: int, pool_id: int, timeout: float | None) -> None:
        rec = self.records.get(pool_id)
        if rec is None:
            conn.fail(rid, PoolClosed(f"pool #{pool_id} is shutting down or unknown"))
            return
        pool = rec.pool
        if timeout is None:
            timeout = pool.timeout
        try:
            got = pool.acquire(conn.holder)  # type: ignore[arg-type]
            if got is None and timeout != 0:  # nothing now: queue a waiter (the rare path)
                got = pool.acquire(conn.holder,  # type: ignore[arg-type]
                                   lambda h: RemoteWaiter(conn, rid, rec))
        except PoolClosed:
            conn.fail(rid, PoolClosed(f"pool {rec.name!r} is shutting down"))
            return
        if got is None:
            conn.fail(rid, TimeOut(f"pool {rec.name!r}: no object available (timeout=0)"))
        elif type(got) is Entry:
            self.reply_entry(conn, rid, rec, got)
        elif got is CREATE:
            waiter = RemoteWaiter(conn, rid, rec)
            waiter.done = True
            self.create(waiter)
        else:  # queued: the client may withdraw it, and its deadline is ours to keep
            conn.waiters[rid] = got  # type: ignore[assignment]  # the waiter made above
            if timeout is not None:
                self.at(self.sup.clock.now() + timeout, 0, got)

    def cancel_get(self, conn: Conn, rid: int) -> None:
        """The client gave up on its get ``rid`` (an asyncio task cancelled): withdraw it if
        it is still queued. If it was served meanwhile, the grant is already on its way and
        the client gives it back."""
        waiter = conn.waiters.pop(rid, None)
        if waiter is not None and waiter.rec.pool.cancel(waiter):
            conn.fail(rid, TimeOut(f"pool {waiter.rec.name!r}: the get was withdrawn"))

    def create(self, waiter: RemoteWaiter) -> None:
        """Run fun for a waiter that was granted a slot, on the pool's own threads."""
        if self.submit(waiter.rec, waiter.conn, waiter.rid, self._create, waiter) is None:
            waiter.rec.pool.release_slot()

    def _create(self, waiter: RemoteWaiter) -> None:
        rec, conn = waiter.rec, waiter.conn
        if conn.closed:
            rec.pool.release_slot()
            return
        try:
            entry = rec.pool.create_for(conn.holder)  # type: ignore[arg-type]
        except BaseException as exc:
            conn.fail(waiter.rid, exc)
            return
        # create_for() already handed it out (getter hook).
        self.reply_entry(conn, waiter.rid, rec, entry, waiter.since, handed=True)

    def submit(self, rec: Record, conn: Conn, rid: int, fn: Callable[..., Any],
               *args: Any) -> Future[Any] | None:
        """Run user code for ``rec`` on its own threads; None (and an error to the client)
        when no thread could be had."""
        fut = rec.submit(fn, *args)
        if fut is None and rid:
            conn.fail(rid, ServerUnavailable("the supervisor is out of threads; try again"))
        return fut

    def reply_entry(self, conn: Conn, rid: int, rec: Record, entry: Entry,
                    since: float = 0.0, handed: bool = False) -> None:
        if not handed and rec.has_getter and threading.get_ident() == self.thread.ident:
            # The getter hook is user code: on the pool's threads, never on the loop.
            if self.submit(rec, conn, rid, self.reply_entry, conn, rid, rec, entry, since) is None:
                rec.pool.checkin(entry.lease)
            return
        metrics = self.sup.metrics
        if metrics is not None:
            metrics.wait.labels(rec.name).observe(self.sup.clock.now() - since if since else 0.0)
        if not handed:
            rec.pool.hand_out(entry)
        try:
            blob = rec.blob(entry)
        except Exception as exc:
            rec.pool.checkin(entry.lease)
            conn.fail(rid, exc)
            return
        if blob is None:
            conn.send_raw(P.encode_granted_proxy(rid, entry.lease))
        else:
            conn.send_raw(P.encode_granted(rid, entry.lease, blob))
        if conn.closed:
            # The connection went away while we were leasing: it never got the object.
            rec.pool.reclaim(lambda h: h.conn == conn.id)

    def put(self, conn: Conn, pool_id: int, lease: int, discard: bool = False) -> None:
        rec = self.records.get(pool_id)
        if rec is None:
            return
        pool = rec.pool
        if conn.refs:
            # list(): pool threads add refs (call()) while the loop drops them here.
            for ref in [r for r, (ls, _) in list(conn.refs.items()) if ls == lease]:
                del conn.refs[ref]
        metrics = self.sup.metrics
        if metrics is not None:
            entry = pool.lent(lease, conn.holder)
            if entry is not None:
                metrics.hold.labels(rec.name).observe(self.sup.clock.now() - entry.last_get)
        if rec.slow_ret or discard:  # hooks run: on the pool's threads, off the loop
            fut = self.submit(rec, conn, 0, self._checkin, conn, rec, lease, discard)
            if fut is not None:
                conn.puts_running.add(fut)
                fut.add_done_callback(conn.puts_running.discard)
        elif not pool.checkin(lease, discard, holder=conn.holder):
            self._refused(conn, rec, lease)

    def _checkin(self, conn: Conn, rec: Record, lease: int, discard: bool) -> None:
        if not rec.pool.checkin(lease, discard, holder=conn.holder):
            self._refused(conn, rec, lease)

    def _refused(self, conn: Conn, rec: Record, lease: int) -> None:
        conn.refused += 1
        self.ratelog(logging.WARNING, "refused", "mppool: pool %r: refused a return of lease "
                     "%d by pid %s: not its lease (returned twice, killed, or another's)",
                     rec.name, lease, conn.holder.pid if conn.holder else "?")

    def call(self, conn: Conn, msg: P.Call) -> None:
        if msg.pool_id == 0:
            fut = self.sup.submit_hosted(self._call, conn, msg)
            if fut is None:
                conn.fail(msg.rid, ServerUnavailable("the supervisor is out of threads"))
            return
        rec = self.records.get(msg.pool_id)
        if rec is None:
            conn.fail(msg.rid, PoolClosed(f"pool #{msg.pool_id} is shutting down or unknown"))
            return
        self.submit(rec, conn, msg.rid, self._call, conn, msg, rec)

    def _call(self, conn: Conn, msg: P.Call, rec: Record | None = None) -> None:
        """On a pool's thread: a method call or attribute read on a proxied object."""
        try:
            if msg.ref:
                owner, target = conn.refs[msg.ref]
            elif rec is None:  # an object hosted with client.host(), shared by every process
                owner, target = 0, self.sup.hosted[msg.lease]
            else:
                entry = rec.pool.lent(msg.lease, conn.holder)
                if entry is None:
                    raise PoolClosed(f"pool {rec.name!r}: lease {msg.lease} was killed, reclaimed "
                                     "or returned (pool shutting down or object no longer yours)")
                owner, target = msg.lease, entry.obj
            if msg.args is None:
                value = getattr(target, msg.name)
            else:
                value = getattr(target, msg.name)(*msg.args, **msg.kwargs)
        except BaseException as exc:
            conn.fail(msg.rid, exc)
            return
        try:
            if is_plain(value):
                conn.send_raw(P.encode_reply(msg.rid, P.OK, value))
            else:
                newref = next(self.refs)
                conn.refs[newref] = (owner, value)
                kind = type(value)
                conn.send_raw(P.encode_reply(msg.rid, P.REF,
                                             (newref, f"{kind.__module__}.{kind.__qualname__}")))
        except Exception as exc:  # a result that does not pickle: the caller must not hang
            conn.fail(msg.rid, exc)


def _spent(timer: tuple[float, int, int, Any]) -> bool:
    kind, obj = timer[2], timer[3]
    if kind == 0:
        return bool(obj.done)
    if kind == 1:
        return obj.holder is not None or obj.closed
    return False
