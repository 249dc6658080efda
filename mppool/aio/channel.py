"""The asyncio end of the lease channel: one connection per process, one reader task.

    task: pool.get() ── encode_get(rid) ─▶ writer        (never waits on the socket)
          await future[rid] ◀── reader task: FrameReader.feed ─▶ decode_reply ─▶ future[rid]

Requests are matched to replies by id. Sending is ``writer.write`` (buffered by the event
loop, never blocking); only the reader task reads. A get is a future in ``_pending``; its
entry stays there until the supervisor answers, whatever happens to the task that waits:

- the task is cancelled, or its deadline passes, while the get is queued: the future is
  cancelled, a `protocol.Cancel` withdraws the waiter in the supervisor, and the get's reply
  (an error, or a grant that crossed the Cancel) is read later by the reader task, which
  returns a grant at once (``encode_put``);
- the reply was delivered to the future but the task was cancelled before it ran: the
  task itself gives that lease back as it unwinds (`AsyncChannel.abandon`).

So a unit is never stranded and a waiter never stays queued for a task that left.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
from typing import Any

from .. import framing, handshake
from .. import protocol as P
from ..address import Address, display
from ..errors import ServerUnavailable
from ..holder import current_holder
from .control import open_stream

MAX_REPLY = 1 << 31
MAX_UNSENT = 1 << 20  # past this many bytes buffered for the supervisor, a request waits


class AsyncChannel:
    """A lease-channel connection; make one with `AsyncChannel.open`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn_id: int, instance: int, timeout: float) -> None:
        self.conn_id = conn_id
        self.instance = instance  # which run of the supervisor this channel reaches
        self.timeout = timeout
        self._reader = reader
        self._writer = writer
        # rid -> (future, pool id: the pool a late grant goes back to; 0 for other requests)
        self._pending: dict[int, tuple[asyncio.Future[Any], int]] = {}
        self._rids = itertools.count(1)
        self._broken: str | None = None
        self.unsynced = False  # puts sent whose effect this process has not yet observed
        self.late_returned = 0  # grants that arrived for a get nobody waited for any more
        self.loop = asyncio.get_running_loop()
        self._task = self.loop.create_task(self._read_loop(), name="mppool-aio-reader")

    @classmethod
    async def open(cls, address: Address, authkey: bytes, timeout: float) -> AsyncChannel:
        """Connect and do the handshake (each side proves it knows the key)."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await open_stream(address, limit=P.RECV_SIZE)
                nonce = handshake.decode_nonce(await _read_frame(reader))
                mine = handshake.new_nonce()
                h = current_holder()
                writer.write(handshake.encode_hello(handshake.digest(authkey, nonce), mine, h.pid,
                                                    h.start, h.host))
                answer, conn_id, instance = handshake.decode_ack(await _read_frame(reader))
                if not hmac.compare_digest(answer, handshake.digest(authkey, mine)):
                    raise P.ProtocolError("the supervisor does not know the key")
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError,
                P.ProtocolError) as exc:
            if writer is not None:
                writer.close()
            why = "no answer in time" if isinstance(exc, TimeoutError) else \
                str(exc) or "refused (wrong key?)"
            raise ServerUnavailable(f"cannot open the lease channel at {display(address)}: "
                                    f"{why}") from None
        return cls(reader, writer, conn_id, instance, timeout)

    @property
    def broken(self) -> str | None:
        return self._broken

    def next_rid(self) -> int:
        return next(self._rids) & P.MAX_RID or 1  # 32 bits on the wire, never 0

    # ------------------------------------------------------------------ sending

    def post(self, frame: bytes) -> None:
        """Send without waiting for a reply (put, cancel): order on the socket is kept."""
        if self._broken:
            raise ServerUnavailable(self._broken)
        self._writer.write(frame)
        self.unsynced = True

    async def request(self, rid: int, frame: bytes, wait: float | None,
                      pool_id: int = 0) -> Any:
        """Send ``frame`` (request ``rid``) and return its reply (`protocol.Granted` or
        `protocol.Reply`) within ``wait`` seconds (`TimeoutError` past it). A get names its
        ``pool_id``: if its caller leaves first, a grant goes back to that pool."""
        if self._broken:
            raise ServerUnavailable(self._broken)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (fut, pool_id)
        self._writer.write(frame)
        try:
            async with asyncio.timeout(wait):
                if self._writer.transport.get_write_buffer_size() > MAX_UNSENT:
                    await self._writer.drain()
                return await fut
        except BaseException:
            self.abandon(rid, fut, pool_id)
            raise

    def abandon(self, rid: int, fut: asyncio.Future[Any], pool_id: int) -> None:
        """The caller of request ``rid`` leaves without its reply (cancelled, timed out)."""
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.give_back(pool_id, fut.result())  # delivered, but never seen by the caller
            return
        fut.cancel()
        if pool_id and rid in self._pending and not self._broken:
            # Still queued, or its grant is on the wire: withdraw it; the reader task
            # returns a grant that crossed the withdrawal.
            self.post(P.encode_cancel(rid))

    def give_back(self, pool_id: int, reply: Any) -> None:
        if pool_id and isinstance(reply, P.Granted) and not self._broken:
            self.late_returned += 1
            self.post(P.encode_put(pool_id, reply.lease))

    async def sync(self) -> None:
        """Wait until the supervisor has handled every put sent so far (it keeps order)."""
        if self.unsynced and not self._broken:
            self.unsynced = False
            rid = self.next_rid()
            await self.request(rid, P.encode_ping(rid), self.timeout)

    # ------------------------------------------------------------------ the reader task

    async def _read_loop(self) -> None:
        frames = framing.ReplyReader(MAX_REPLY)
        pending = self._pending
        why = "supervisor connection lost: closed"
        try:
            while True:
                data = await self._reader.read(P.RECV_SIZE)
                if not data:
                    break
                for reply in frames.feed(data):
                    if type(reply) is not P.Granted:  # a grant comes decoded (ReplyReader)
                        reply = P.decode_reply(reply)
                    entry = pending.pop(reply.rid, None)
                    if entry is None:
                        continue
                    fut, pool_id = entry
                    if not fut.done():
                        fut.set_result(reply)
                    else:  # its caller left: a grant goes back at once
                        self.give_back(pool_id, reply)
        except asyncio.CancelledError:
            why = self._broken or "client closed"
            raise
        except (OSError, EOFError) as exc:
            why = f"supervisor connection lost: {exc or 'closed'}"
        except Exception as exc:  # a reply that cannot be read may be anyone's: fail them all
            why = f"unreadable reply from the supervisor: {exc!r}"
        finally:
            self._fail(why)

    def _fail(self, why: str) -> None:
        self._broken = self._broken or why
        self._writer.close()
        pending, self._pending = self._pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(ServerUnavailable(self._broken))

    def forget(self) -> list[Any]:
        """In a forked child: drop this connection without closing it (what is returned is
        to be kept alive: closing it would touch the parent's event loop)."""
        self._broken = "forked"
        return [self._reader, self._writer, self._task]

    async def close(self) -> None:
        if not self._broken:
            try:  # a clean close (protocol.Bye): leases still held are not reported as a crash
                self._writer.write(P.encode_bye())
            except (OSError, ConnectionError, RuntimeError):
                pass
        self._broken = self._broken or "client closed"
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        try:
            await self._writer.wait_closed()
        except (OSError, ConnectionError):
            pass


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    """One handshake frame (nothing is unpickled here)."""
    (n,) = P.HEADER.unpack(await reader.readexactly(P.HEADER.size))
    if n > P.MAX_HANDSHAKE:
        raise P.ProtocolError(f"handshake frame of {n} bytes refused")
    return await reader.readexactly(n)
