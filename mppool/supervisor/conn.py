"""One client connection as the lease loop sees it, and a get it has queued in a pool.

A ``Conn`` is a client process: its socket, its read buffer (a `framing.RequestReader` capped
at 4 KiB until the key is proved, ``max_message`` after), its unread replies (capped at
``max_unread``: past that the client is cut off), its holder (pid and start time, from the
kernel on unix sockets) and the proxied sub-objects (cursors) it holds. ``send_raw`` may be
called from any thread; everything else runs on the loop's thread.

A ``RemoteWaiter`` is a get that found nothing: an entry in the pool's FIFO queue, tied to its
connection, whose ``set()`` (under the pool lock) only records the result and asks the loop to
deliver it, and returns False once the connection is gone, so a unit is never handed to a
client that left.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .. import framing, handshake
from .. import protocol as P
from ..holder import Holder
from ..remote import PackedException
from ..waiters import WaiterBase

if TYPE_CHECKING:
    import socket

    from .leases import LeaseLoop
    from .registry import Record


class RemoteWaiter(WaiterBase):
    """A get() from a client, queued in a Pool (the waiter protocol of `mppool.waiters`)."""

    __slots__ = ("conn", "deadline", "rec", "rid")

    def __init__(self, holder: Holder, conn: Conn, rid: int, rec: Record) -> None:
        super().__init__(holder)
        self.conn = conn
        self.rid = rid
        self.rec = rec
        self.since: float = conn.loop.sup.clock.now()  # the acquire-wait histogram, stats()
        self.deadline: float | None = None  # set when queued with a timeout

    def _can_take(self) -> bool:
        return not self.conn.closed

    def _wake(self, result: Any) -> None:
        # Under the pool lock: only record. The reply (hooks, pickling, and on failure a
        # checkin that takes that same lock) is made by the loop once the lock is released.
        self.conn.loop.call_soon(lambda: self.conn.loop.deliver(self, result))


class Conn:
    """One client process's channel. ``send_raw`` may be called from any thread."""

    def __init__(self, loop: LeaseLoop, sock: socket.socket, cid: int) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.id = cid
        self.reader = framing.RequestReader(P.MAX_HANDSHAKE)
        self.wbuf = bytearray()
        self.wlock = threading.Lock()
        self.closed = False
        self.nonce = handshake.new_nonce()
        self.holder: Holder | None = None
        # Proxied sub-objects (cursors): ref -> (lease, obj, its pool; None: a hosted object's).
        self.refs: dict[int, tuple[int, Any, Any]] = {}
        # Gets queued in a pool, by request id, so that the client may withdraw one (Cancel).
        self.waiters: dict[int, RemoteWaiter] = {}
        self.refused = 0  # puts and calls refused (somebody else's lease)
        self.bye = False  # the client said it is closing on purpose (protocol.Bye)
        # Puts still running on a pool's threads (hooks): a Ping is answered after them, so
        # a client's sync() means "every put I sent has taken effect".
        self.puts_running: set[Future[Any]] = set()
        # Proxied calls still running on a lease's object, by lease, and the puts of those
        # leases held until they end (lease -> (pool id, discard, done)): the object is not
        # lent again while a call of its last holder still runs on it.
        self.calls: dict[int, int] = {}  # under calls_lock: pool threads end the calls
        self.calls_lock = threading.Lock()
        self.held_puts: dict[int, tuple[int, bool, Future[Any]]] = {}

    def send_raw(self, data: bytes) -> None:
        with self.wlock:
            if self.closed:
                return
            if self.wbuf:
                self.wbuf += data
                if len(self.wbuf) > self.loop.max_unread:
                    self._close_soon(f"it left more than {self.loop.max_unread} bytes of "
                                     "replies unread")
                return
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._close_soon()
                return
            if n < len(data):
                self.wbuf += data[n:]
                self._write_soon()

    # What send_raw asks of the loop, in methods of their own: a lambda in send_raw would
    # make ``self`` a cell, created on every send (CPython 3.11).

    def _close_soon(self, why: str | None = None) -> None:
        loop = self.loop
        loop.call_soon(lambda: loop.close(self, why))

    def _write_soon(self) -> None:
        loop = self.loop
        loop.call_soon(lambda: loop.want_write(self))

    def fail(self, rid: int, exc: BaseException) -> None:
        self.send_raw(P.encode_reply(rid, P.ERR, PackedException(exc)))
