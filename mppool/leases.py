"""The supervisor's lease loop: get and put for every client, on one thread.

    client process                      supervisor
    SharedPool.get() ── (rid, GET) ──▶  LeaseLoop (epoll, one thread)
                                          ├ pool.acquire(holder, RemoteWaiter)
                                          │   idle entry  → reply at once
                                          │   CREATE      → fun() on a worker thread, then reply
                                          │   none        → waiter queued in the Pool, deadline here
                     ◀── (rid, OK, lease, blob)
    SharedPool.ret() ── (0, PUT) ─────▶  pool.checkin(lease)  (no reply: order is kept per socket)

No thread ever blocks on behalf of a client: a waiter is an entry in the pool's queue tied to
its connection. When a connection closes (exit, crash, SIGKILL) the loop drops its waiters
and gives back every lease it holds, at once (DESIGN.md, traps 1 and 6).
"""

from __future__ import annotations

import heapq
import hmac
import itertools
import logging
import os
import pickle
import select
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import wire
from .errors import PoolClosed, TimeOut
from .holder import HOSTNAME, Holder
from .pool import CREATE, Entry, _Create
from .remote import is_plain

if TYPE_CHECKING:
    from .supervisor import Record, Supervisor

log = logging.getLogger("mppool")


# Hang-up and error count as readable: recv() then sees the EOF and closes the connection.
_READ = select.POLLIN | select.POLLHUP | select.POLLERR
_WRITE = select.POLLOUT


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


class RemoteWaiter:
    """A get() from a client, queued in a Pool. ``set``/``cancel`` run under the pool lock."""

    __slots__ = ("conn", "done", "holder", "rec", "rid", "since")

    def __init__(self, conn: Conn, rid: int, rec: Record) -> None:
        self.conn = conn
        self.rid = rid
        self.rec = rec
        self.holder = conn.holder
        self.done = False
        self.since = conn.loop.sup.clock.now()  # for the acquire-wait histogram

    def set(self, result: Any) -> bool:
        if self.done or self.conn.closed:
            return False
        self.done = True
        # Under the pool lock: only record. The reply (hooks, pickling, and on failure a
        # checkin that takes that same lock) is made by the loop once the lock is released.
        self.conn.loop.call_soon(lambda: self.conn.loop.deliver(self, result))
        return True

    def cancel(self) -> bool:
        if self.done:
            return False
        self.done = True
        return True

    def __lt__(self, other: RemoteWaiter) -> bool:
        return self.rid < other.rid


class Conn:
    """One client process's channel. ``send`` may be called from any thread."""

    def __init__(self, loop: LeaseLoop, sock: socket.socket, cid: int) -> None:
        self.loop = loop
        self.sock = sock
        self.id = cid
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.wlock = threading.Lock()
        self.closed = False
        self.nonce = wire.new_nonce()
        self.holder: Holder | None = None
        self.refs: dict[int, tuple[int, Any]] = {}  # proxied sub-objects: ref -> (lease, obj)
        # Puts still running on a worker thread (hooks): a PING is answered after them, so
        # a client's sync() means "every put I sent has taken effect".
        self.puts_running: set[Future[Any]] = set()

    def send(self, msg: Any) -> None:
        self.send_raw(wire.dumps(msg))

    def send_raw(self, data: bytes) -> None:
        with self.wlock:
            if self.closed:
                return
            if self.wbuf:
                self.wbuf += data
                return
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.loop.call_soon(lambda: self.loop.close(self))
                return
            if n < len(data):
                self.wbuf += data[n:]
                self.loop.call_soon(lambda: self.loop.want_write(self))


class LeaseLoop:
    def __init__(self, sup: Supervisor, address: str | tuple[str, int], authkey: bytes,
                 workers: int = 8) -> None:
        self.sup = sup
        self.records = sup.by_id  # pool id -> Record (the same dict, read on the hot path)
        self.authkey = authkey
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
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.poller.register(self.wake_r.fileno(), _READ)
        self.pending: list[Callable[[], None]] = []
        self.plock = threading.Lock()
        self.timers: list[tuple[float, RemoteWaiter]] = []
        self.conns: dict[int, Conn] = {}
        self.ids = itertools.count(1)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="mppool-work")
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="mppool-leases", daemon=True)

    # -------------------------------------------------------------- cross-thread entry points

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread, after the events at hand (from any thread)."""
        with self.plock:
            self.pending.append(fn)
        if threading.get_ident() == self.thread.ident:
            return  # the loop runs pending callbacks before it waits again
        try:
            self.wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are stopping

    def deliver(self, waiter: RemoteWaiter, result: Any) -> None:
        """A waiter was handed ``result`` under the pool lock: act on it, never blocking."""
        if result is CREATE:
            self.executor.submit(self.create, waiter)
        elif isinstance(result, BaseException):
            waiter.conn.send((waiter.rid, wire.ERR, result))
        else:
            self.reply_entry(waiter.conn, waiter.rid, waiter.rec, result, waiter.since)

    def stop(self) -> None:
        self.stopping = True
        self.call_soon(lambda: None)
        self.thread.join(5.0)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --------------------------------------------------------------------------- the loop

    def run(self) -> None:
        clock = self.sup.clock
        poll = self.poller.poll
        fds = self.fds
        lfd, wfd = self.lsock.fileno(), self.wake_r.fileno()
        while not self.stopping:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - clock.now())
            for fd, mask in poll(timeout, len(fds) + 2):
                conn = fds.get(fd)
                if conn is not None:
                    if mask & _READ:
                        self.read(conn)
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
                with self.plock:
                    todo, self.pending = self.pending, []
                for fn in todo:
                    try:
                        fn()
                    except Exception:
                        log.exception("mppool: lease loop callback failed")
            if self.timers:
                self.expire(clock.now())
        for conn in list(self.conns.values()):
            self.close(conn)
        self.poller.close()
        self.lsock.close()
        self.wake_r.close()
        self.wake_w.close()

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.warning("mppool: accept failed", exc_info=True)
                return
            sock.setblocking(False)
            conn = Conn(self, sock, next(self.ids))
            self.conns[conn.id] = conn
            self.fds[sock.fileno()] = conn
            self.poller.register(sock.fileno(), _READ)
            conn.send_raw(wire.dump_nonce(conn.nonce))

    def read(self, conn: Conn) -> None:
        try:
            data: bytes | bytearray = conn.sock.recv(wire.RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        if conn.rbuf:
            conn.rbuf += data
            data, conn.rbuf = conn.rbuf, bytearray()
        view = memoryview(data)
        end = len(data)
        pos = 0
        size = wire.HEADER.size
        unpack = wire.HEADER.unpack_from
        authed = conn.holder is not None
        while end - pos >= size:
            (n,) = unpack(data, pos)
            start = pos + size
            if end - start < n:
                break
            pos = start + n
            kind = data[start] if n else 0
            try:
                # The two messages of every lease cycle, decoded in place (no tuple, no copy).
                if kind == wire.KIND_GET and authed:
                    _, rid, pool_id, timeout = wire.GET_FRAME.unpack_from(data, start)
                    self.get(conn, rid, pool_id, None if timeout < 0 else timeout)
                elif kind == wire.KIND_PUT and authed:
                    _, pool_id, lease = wire.PUT_FRAME.unpack_from(data, start)
                    self.put(conn, pool_id, lease)
                elif not authed:
                    # Nothing is unpickled before the client proved it has the key.
                    if not self.hello(conn, view[start:pos]):
                        return
                    authed = True
                else:
                    try:
                        msg = wire.loads(view[start:pos])
                    except Exception:
                        log.warning("mppool: conn %d sent an unreadable frame, closing it", conn.id)
                        self.close(conn)
                        return
                    if msg[1] == wire.PUT:  # a put with discard=True
                        self.put(conn, msg[2], msg[3], len(msg) > 4 and msg[4])
                    else:
                        self.dispatch(conn, msg)
            except Exception:
                log.exception("mppool: conn %d: a request failed", conn.id)
            if conn.closed:
                return
        if pos < end:
            conn.rbuf = bytearray(view[pos:])  # a partial frame: wait for the rest

    def hello(self, conn: Conn, frame: Any) -> bool:
        try:
            answer, client_nonce, pid, start, host = wire.parse_hello(frame)
            ok = hmac.compare_digest(answer, wire.digest(self.authkey, conn.nonce))
        except Exception:
            ok = False
        if not ok:
            log.warning("mppool: refused a lease connection with a wrong key or no handshake")
            self.close(conn)
            return False
        if conn.sock.family == socket.AF_UNIX:
            # The kernel's word beats the client's for who is on the other end.
            creds = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid = int.from_bytes(creds[:4], "little")
            host = HOSTNAME
        conn.holder = Holder(pid, start, host, conn.id)
        conn.send_raw(wire.dump_ack(wire.digest(self.authkey, client_nonce), conn.id))
        return True

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
                    self.poller.modify(conn.sock.fileno(), _READ)
                return
        self.close(conn)

    def want_write(self, conn: Conn) -> None:
        if not conn.closed and conn.wbuf:
            self.poller.modify(conn.sock.fileno(), _READ | _WRITE)

    def close(self, conn: Conn) -> None:
        """The client is gone: forget its waiters and give back everything it held."""
        with conn.wlock:
            if conn.closed:
                return
            conn.closed = True
        self.conns.pop(conn.id, None)
        try:
            fd = conn.sock.fileno()
            self.fds.pop(fd, None)
            self.poller.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass
        conn.sock.close()
        conn.refs.clear()
        if conn.holder is not None:
            self.sup.release_conn(conn)

    # ------------------------------------------------------------------------- requests

    def dispatch(self, conn: Conn, msg: tuple[Any, ...]) -> None:
        rid, op = msg[0], msg[1]
        if op == wire.GET:
            self.get(conn, rid, msg[2], msg[3])
        elif op == wire.PUT:
            self.put(conn, msg[2], msg[3])
        elif op in (wire.CALL, wire.GETATTR):
            self.executor.submit(self.call, conn, msg)
        elif op == wire.DROPREF:
            conn.refs.pop(msg[2], None)
        elif op == wire.WAITING:
            rec = self.records.get(msg[2])
            conn.send((rid, wire.OK, rec.pool.waiting() if rec is not None else 0))
        elif op == wire.PING:
            reply = (rid, wire.OK, os.getpid())
            running = list(conn.puts_running)
            if not running:
                conn.send(reply)
            else:
                left = [len(running)]
                lock = threading.Lock()

                def one_done(_: Future[Any]) -> None:
                    with lock:
                        left[0] -= 1
                        last = left[0] == 0
                    if last:
                        conn.send(reply)

                for fut in running:
                    fut.add_done_callback(one_done)
        else:
            conn.send((rid, wire.ERR, ValueError(f"unknown op {op!r}")))

    def get(self, conn: Conn, rid: int, pool_id: int, timeout: float | None) -> None:
        rec = self.records.get(pool_id)
        if rec is None:
            conn.send((rid, wire.ERR, PoolClosed(f"pool {pool_id} is shutting down or unknown")))
            return
        pool = rec.pool
        if timeout is None:
            timeout = pool._timeout
        waiter = None
        try:
            with pool._lock:
                got = pool.acquire(conn.holder, None)  # type: ignore[arg-type]
                if got is None and timeout != 0:  # nothing now: queue a waiter (rare path)
                    waiter = RemoteWaiter(conn, rid, rec)
                    got = pool.acquire(conn.holder, waiter)  # type: ignore[arg-type]
        except PoolClosed as exc:
            conn.send((rid, wire.ERR, exc))
            return
        if pool._todel:
            self.executor.submit(pool._flush)
        if got is None:
            if waiter is None:
                conn.send((rid, wire.ERR, TimeOut(f"pool {rec.name!r}: no object available (timeout=0)")))
            elif timeout is not None:
                heapq.heappush(self.timers, (self.sup.clock.now() + timeout, waiter))
            return
        if isinstance(got, _Create):
            if waiter is None:
                waiter = RemoteWaiter(conn, rid, rec)
            waiter.done = True
            self.executor.submit(self.create, waiter)
        else:
            self.reply_entry(conn, rid, rec, got)

    def expire(self, now: float) -> None:
        if len(self.timers) > 1024:  # satisfied waiters linger until their deadline: prune
            self.timers = [t for t in self.timers if not t[1].done]
            heapq.heapify(self.timers)
        while self.timers and self.timers[0][0] <= now:
            _, waiter = heapq.heappop(self.timers)
            if waiter.done:
                continue
            rec = waiter.rec
            if rec.pool.drop_waiters(lambda w, waiter=waiter: w is waiter):  # type: ignore[misc]
                waiter.conn.send((waiter.rid, wire.ERR,
                                  TimeOut(f"pool {rec.name!r}: no object available in time")))

    def create(self, waiter: RemoteWaiter) -> None:
        """On a worker thread: run fun for a waiter that was granted a slot."""
        rec, conn = waiter.rec, waiter.conn
        if conn.closed:
            rec.pool.release_slot()
            return
        try:
            entry = rec.pool.create_for(conn.holder)  # type: ignore[arg-type]
        except BaseException as exc:
            conn.send((waiter.rid, wire.ERR, _portable(exc)))
            return
        # create_for() already ran the getter hook.
        self.reply_entry(conn, waiter.rid, rec, entry, waiter.since, getter=False)

    def reply_entry(self, conn: Conn, rid: int, rec: Record, entry: Entry,
                    since: float = 0.0, getter: bool = True) -> None:
        metrics = self.sup.metrics
        if metrics is not None:
            metrics.wait.labels(rec.name).observe(self.sup.clock.now() - since if since else 0.0)
        hook = rec.pool._getter
        if getter and hook is not None:
            rec.pool._hook("getter", hook, entry.obj)
        try:
            blob = rec.blob(entry)
        except Exception as exc:
            rec.pool.checkin(entry.lease)
            conn.send((rid, wire.ERR, _portable(exc)))
            return
        if blob is None:
            conn.send((rid, wire.OK, entry.lease, None))
        else:
            conn.send_raw(wire.dump_ok(rid, entry.lease, blob))
        if conn.closed:
            # The connection went away while we were leasing: it never got the object.
            rec.pool.reclaim(lambda h: h.conn == conn.id)

    def put(self, conn: Conn, pool_id: int, lease: int, discard: bool = False) -> None:
        rec = self.records.get(pool_id)
        if rec is None:
            return
        if conn.refs:
            # list(): worker threads add refs (call()) while the loop drops them here.
            for ref in [r for r, (ls, _) in list(conn.refs.items()) if ls == lease]:
                del conn.refs[ref]
        metrics = self.sup.metrics
        if metrics is not None:
            entry = rec.pool._using.get(lease)
            if entry is not None:
                metrics.hold.labels(rec.name).observe(self.sup.clock.now() - entry.last_get)
        if rec.slow_ret or discard:  # a discard runs the closer: off the loop
            fut = self.executor.submit(rec.pool.checkin, lease, discard)
            conn.puts_running.add(fut)
            fut.add_done_callback(conn.puts_running.discard)
        else:
            rec.pool.checkin(lease)

    def call(self, conn: Conn, msg: tuple[Any, ...]) -> None:
        """On a worker thread: a method call or attribute read on a proxied object."""
        rid, op, pool_id, lease, ref, name = msg[:6]
        try:
            if ref:
                owner, target = conn.refs[ref]
            elif pool_id == 0:  # a tpool.Proxy: hosted, shared by every process
                owner, target = 0, self.sup.hosted[lease]
            else:
                rec = self.records.get(pool_id)
                entry = rec.pool._using.get(lease) if rec is not None else None
                if entry is None or entry.holder is None or entry.holder.conn != conn.id:
                    raise PoolClosed(f"lease {lease} was killed, reclaimed or returned "
                                     "(pool shutting down or object no longer yours)")
                owner, target = lease, entry.obj
            if op == wire.GETATTR:
                value = getattr(target, name)
            else:
                args, kwargs = msg[6], msg[7]
                value = getattr(target, name)(*args, **kwargs)
        except BaseException as exc:
            conn.send((rid, wire.ERR, _portable(exc)))
            return
        try:
            if is_plain(value):
                conn.send((rid, wire.OK, value))
            else:
                newref = next(self.ids)
                conn.refs[newref] = (owner, value)
                kind = type(value)
                conn.send((rid, wire.REF, newref, f"{kind.__module__}.{kind.__qualname__}"))
        except Exception as exc:  # a result that does not pickle: the caller must not hang
            conn.send((rid, wire.ERR, _portable(exc)))


def _portable(exc: BaseException) -> BaseException:
    """An exception that will unpickle in the client: the original when possible."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
