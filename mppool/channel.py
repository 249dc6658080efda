"""The blocking client end of the lease channel: many threads, one socket.

Replies are matched to requests by id. Whoever finds the reader lock free reads frames for
everybody until its own reply arrives, then wakes one still-waiting thread to take over
(leader/follower), so the common request costs one send and one recv.

Every wait has a deadline, so a frozen supervisor (SIGSTOP, a stuck host) cannot hang a
caller past its own timeout:

- the socket's ``SO_RCVTIMEO`` is a short slice, so a reading thread looks at the clock
  regularly without paying a system call per request for it;
- ``SO_SNDTIMEO`` is the client's timeout: a supervisor that stops reading breaks the
  channel instead of blocking ``put()`` for ever;
- a request whose deadline passes is *abandoned*: its caller gets `TimeOut`, and a reply that
  arrives later is handed to the request's ``on_late`` callback, which for a get gives the
  lease back at once. Nothing granted to a caller that gave up stays stranded.
"""

from __future__ import annotations

import atexit
import hmac
import itertools
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import framing, handshake
from . import protocol as P
from .address import Address, display
from .errors import ServerUnavailable, TimeOut
from .holder import current_holder

READ_SLICE = 0.1  # how often a reader blocked in recv() checks the deadlines
MAX_REPLY = 1 << 31


def set_socket_timeouts(sock: socket.socket, recv: float | None, send: float | None) -> None:
    """Kernel-level deadlines on a blocking socket (a recv/send past them raises EAGAIN)."""
    for opt, seconds in ((socket.SO_RCVTIMEO, recv), (socket.SO_SNDTIMEO, send)):
        s = 0.0 if seconds is None else max(seconds, 0.001)
        sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", int(s), int((s % 1) * 1e6)))


class _Slot:
    """A request's reply box. Its Event is made only if its thread has to wait for another
    reader: most requests read their own reply and never need one. (Class-level defaults
    and no ``__init__``: one fewer Python call per request.)"""

    event: threading.Event | None = None
    reply: Any = None


class Channel:
    def __init__(self, address: Address, authkey: bytes, timeout: float) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address if isinstance(address, str) else tuple(address))
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = handshake.decode_nonce(_recv_frame(sock))
            mine = handshake.new_nonce()
            h = current_holder()
            sock.sendall(handshake.encode_hello(handshake.digest(authkey, nonce), mine, h.pid,
                                                h.start, h.host))
            answer, conn_id, instance = handshake.decode_ack(_recv_frame(sock))
            if not hmac.compare_digest(answer, handshake.digest(authkey, mine)):
                raise P.ProtocolError("the supervisor does not know the key")
        except (OSError, EOFError, P.ProtocolError) as exc:
            sock.close()
            raise ServerUnavailable(f"cannot open the lease channel at {display(address)}: "
                                    f"{exc or 'refused (wrong key?)'}") from None
        sock.settimeout(None)
        set_socket_timeouts(sock, READ_SLICE, timeout)
        self.conn_id = conn_id
        self.instance = instance  # which run of the supervisor this channel reaches
        self.timeout = timeout
        self._sock = sock
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._pending: dict[int, _Slot] = {}
        self._late: dict[int, Callable[[Any], None]] = {}
        self._drain_lock = threading.Lock()
        self._draining = False
        self._reader = framing.ReplyReader(MAX_REPLY)
        self._frames: list[Any] = []
        self._rids = itertools.count(1)
        self._broken: str | None = None
        self._pid = os.getpid()  # a forked child must not say Bye on its parent's channel
        _open.add(self)
        self.unsynced = False  # puts sent whose effect this process has not yet observed

    @property
    def broken(self) -> str | None:
        return self._broken

    def next_rid(self) -> int:
        return next(self._rids) & P.MAX_RID or 1  # 32 bits on the wire, never 0

    def request(self, rid: int, frame: bytes, deadline: float | None = None,
                on_late: Callable[[Any], None] | None = None) -> Any:
        """Send ``frame`` (request ``rid``) and return its reply (`protocol.Granted` or
        `protocol.Reply`). Past ``deadline`` (monotonic) raise `TimeOut`; a reply arriving
        after that goes to ``on_late``."""
        if self._broken:
            raise ServerUnavailable(self._broken)
        slot = _Slot()
        pending = self._pending
        pending[rid] = slot
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as exc:
            self._fail(f"supervisor unreachable: {exc}")
        while slot.reply is None:
            if deadline is not None and time.monotonic() >= deadline:
                if self._abandon(rid, on_late):
                    raise TimeOut(f"the supervisor did not answer in time (request {rid})")
                continue  # the reply is being delivered to us right now
            if self._read_lock.acquire(blocking=False):
                try:
                    self._read_until(slot, deadline)
                finally:
                    self._read_lock.release()
                    if self._pending:  # somebody else waits for a reply: hand the reading over
                        self._hand_over()
            else:
                if slot.event is None:
                    slot.event = threading.Event()
                    continue  # the reader may have left before seeing our event: try again
                # The bound only recovers a hand-over that raced with making our Event.
                slot.event.wait(0.05)
                slot.event.clear()
        if isinstance(slot.reply, str):
            raise ServerUnavailable(slot.reply)
        return slot.reply

    def _release_reader(self) -> None:
        self._read_lock.release()
        self._hand_over()

    def _hand_over(self) -> None:
        for waiting in self._pending.values():  # hand the reading over to one waiter
            if waiting.event is not None:
                waiting.event.set()
            break

    def _abandon(self, rid: int, on_late: Callable[[Any], None] | None) -> bool:
        """Give up on ``rid``; False if its reply is already on its way to the caller.

        Its reply still comes (the supervisor answers every request), and must be read even
        if this process sends nothing more: a drainer thread reads until no abandoned
        request is left, so a late grant goes back at once, not at the next request.
        """
        self._late[rid] = on_late or _ignore  # before the pop: a reader checks late second
        if self._pending.pop(rid, None) is None:
            self._late.pop(rid, None)
            return False
        self._start_drainer()
        return True

    def _start_drainer(self) -> None:
        with self._drain_lock:
            if self._draining:
                return
            self._draining = True
        try:
            threading.Thread(target=self._drain, name="mppool-drain", daemon=True).start()
        except RuntimeError:  # no thread to be had: the next request reads the late replies
            self._draining = False

    def _drain(self) -> None:
        while self._late and not self._broken:
            if self._read_lock.acquire(timeout=READ_SLICE):
                try:
                    self._read_until(None, time.monotonic() + READ_SLICE)
                finally:
                    self._release_reader()
        with self._drain_lock:
            self._draining = False
        if self._late and not self._broken:  # abandoned while we were leaving
            self._start_drainer()

    def _read_until(self, slot: _Slot | None, deadline: float | None) -> None:
        """Read and hand out replies until ``slot`` has its own (None: until no abandoned
        request is left), the deadline passes, or the connection fails."""
        pending, late = self._pending, self._late
        try:
            while (slot.reply is None) if slot is not None else late:
                frames = self._frames
                if not frames:
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    try:
                        data = self._sock.recv(P.RECV_SIZE)
                    except BlockingIOError:
                        continue  # a READ_SLICE passed: look at the deadline again
                    if not data:
                        raise EOFError("connection closed")
                    frames = self._frames = self._reader.feed(data)
                    if not frames:
                        continue  # part of a frame: read on
                # A frame (bytes, or a view of immutable bytes) stays valid after the next feed.
                reply = frames.pop(0)
                if type(reply) is not P.Granted:  # a grant comes decoded (ReplyReader)
                    reply = P.decode_reply(reply)
                other = pending.pop(reply.rid, None)
                if other is not None:
                    other.reply = reply
                    if other.event is not None:
                        other.event.set()
                else:
                    handler = late.pop(reply.rid, None)
                    if handler is not None:
                        handler(reply)
        except (OSError, EOFError) as exc:
            self._fail(f"supervisor connection lost: {exc or 'closed'}")
        except Exception as exc:
            # A reply that cannot be read may be another thread's: fail them all rather than
            # leave one waiting for ever.
            self._fail(f"unreadable reply from the supervisor: {exc!r}")

    def post(self, frame: bytes) -> None:
        """Send without waiting for a reply (put): order on the socket is kept."""
        if self._broken:
            raise ServerUnavailable(self._broken)
        try:
            with self._send_lock:
                self._sock.sendall(frame)
            self.unsynced = True
        except OSError as exc:
            self._fail(f"supervisor unreachable: {exc}")
            raise ServerUnavailable(self._broken or str(exc)) from None

    def sync(self, deadline: float | None = None) -> None:
        """Wait until the supervisor has handled every put sent so far (it keeps order)."""
        if self.unsynced:
            self.unsynced = False
            rid = self.next_rid()
            self.request(rid, P.encode_ping(rid), deadline)

    def _fail(self, why: str) -> None:
        self._broken = why
        try:
            self._sock.close()
        except OSError:
            pass
        self._late.clear()
        for rid in list(self._pending):
            slot = self._pending.pop(rid, None)
            if slot is not None:
                slot.reply = why
                if slot.event is not None:
                    slot.event.set()

    def bye(self) -> None:
        """Tell the supervisor this channel closes on purpose (`protocol.Bye`): leases still
        held are then logged as a clean exit, not as a crash. Never blocks, never raises."""
        if self._broken or self._pid != os.getpid():
            return
        if not self._send_lock.acquire(timeout=0.1):
            return  # another thread is mid-send: a Bye now would cut its frame
        try:
            self._sock.send(P.encode_bye(), socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            self._send_lock.release()

    def close(self) -> None:
        self.bye()
        self._broken = self._broken or "client closed"
        _open.discard(self)
        try:
            self._sock.close()
        except OSError:
            pass


# Channels of this process still open at interpreter exit say Bye: the end of a script, a
# gunicorn worker's graceful exit. Their sockets close with the process.
_open: weakref.WeakSet[Channel] = weakref.WeakSet()


@atexit.register
def _bye_at_exit() -> None:
    for chan in list(_open):
        chan.bye()


def _ignore(reply: Any) -> None:
    pass


def _recv_frame(sock: socket.socket) -> bytes:
    """One handshake frame (nothing is unpickled here)."""
    (n,) = P.HEADER.unpack(_recv_exact(sock, P.HEADER.size))
    if n > P.MAX_HANDSHAKE:
        raise P.ProtocolError(f"handshake frame of {n} bytes refused")
    return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)
