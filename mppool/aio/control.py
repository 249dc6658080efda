"""The asyncio end of the control plane: calls on the supervisor's ``Control`` object.

The supervisor serves ``Control`` through a multiprocess manager. This module speaks that
manager's protocol over asyncio streams, so no call ever blocks the event loop::

    AsyncControl.call("stats")
      ├ first use: dial ─ challenge/answer (HMAC) ─ ("create", "Control") ─▶ ident; close
      │            dial ─ challenge/answer ─ ("accept_connection", "mppool") ─▶ kept open
      └ (ident, method, args, {}) ─▶ dill pickle in a frame ─▶ ("#RETURN" | "#ERROR", result)

A frame is a 4-byte big-endian signed length and its payload (the format of
``multiprocess.connection.Connection``). The manager serves one request at a time per
connection, so calls take turns on the one connection (an asyncio lock). Every call, the
dialling included, finishes within the client's ``timeout``; a call interrupted half-way
(timeout, cancellation) leaves the connection in an unknown state, so it is closed and the
next call dials again. An exception raised in the supervisor arrives packed
(`mppool.remote.RemoteFailure`) and is rebuilt as its own class.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import struct
from typing import Any

from multiprocess.connection import CHALLENGE, MESSAGE_LENGTH, WELCOME
from multiprocess.reduction import ForkingPickler

from ..address import Address, display
from ..errors import ServerUnavailable
from ..remote import control_result

_LENGTH = struct.Struct("!i")
_LONG = struct.Struct("!Q")
_REFUSED = (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
MAX_AUTH = 256  # what multiprocess accepts for a challenge message


async def open_stream(address: Address, limit: int = 1 << 20) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to a unix socket path or a (host, port) address."""
    if isinstance(address, str):
        return await asyncio.open_unix_connection(address, limit=limit)
    host, port = address
    return await asyncio.open_connection(host, port, limit=limit)


class _Conn:
    """One multiprocess ``Connection``, as asyncio streams."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send_bytes(self, payload: bytes | memoryview) -> None:
        self.writer.write(_LENGTH.pack(len(payload)) + bytes(payload))

    async def recv_bytes(self, limit: int | None = None) -> bytes:
        (n,) = _LENGTH.unpack(await self.reader.readexactly(_LENGTH.size))
        if n == -1:
            (n,) = _LONG.unpack(await self.reader.readexactly(_LONG.size))
        if n < 0 or (limit is not None and n > limit):
            raise EOFError(f"a control frame of {n} bytes")
        return await self.reader.readexactly(n)

    async def send(self, obj: Any) -> None:
        self.send_bytes(ForkingPickler.dumps(obj))
        await self.writer.drain()

    async def recv(self) -> Any:
        return ForkingPickler.loads(await self.recv_bytes())

    def close(self) -> None:
        self.writer.close()


class AsyncControl:
    """Calls on the supervisor's Control object, each within ``timeout`` seconds."""

    def __init__(self, address: Address, authkey: bytes, timeout: float) -> None:
        self.address = address
        self.authkey = authkey
        self.timeout = timeout
        self._conn: _Conn | None = None
        self._ident: Any = None
        self._lock: asyncio.Lock | None = None  # made in the loop that first calls

    async def call(self, method: str, *args: Any) -> Any:
        """``Control.<method>(*args)``, or `ServerUnavailable` within ``timeout``."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        where = display(self.address)
        try:
            async with asyncio.timeout(self.timeout), self._lock:
                for attempt in (1, 2):
                    cached = self._conn is not None
                    try:
                        conn = self._conn or await self._open()
                        await conn.send((self._ident, method, args, {}))
                        kind, result = await conn.recv()
                        break
                    except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
                        self._drop()
                        if isinstance(exc, OSError) and exc.errno in _REFUSED:
                            raise ServerUnavailable(
                                f"no supervisor at {where} ({exc.strerror}): start one with "
                                "mppool.Server(...).start(), `mppool serve`, or "
                                "connect(autostart=True)") from None
                        if cached and attempt == 1:
                            continue  # a connection to a supervisor that is gone: dial again
                        raise ServerUnavailable(f"supervisor at {where} is gone: "
                                                f"{exc or 'connection closed'}") from None
                    except BaseException:
                        self._drop()  # interrupted half-way: its state is unknown
                        raise
        except TimeoutError:
            raise ServerUnavailable(f"supervisor at {where} did not answer {method}() within "
                                    f"{self.timeout} s (frozen?)") from None
        return control_result(kind, result, method)

    async def _open(self) -> _Conn:
        # The Control object's id in this run of the supervisor: asked with each new
        # connection, since a supervisor restarted at the address has a new one.
        first = await self._dial()
        try:
            ident = (await self._dispatch(first, "create", ("Control",)))[0]
        finally:
            first.close()
        conn = await self._dial()
        try:
            await self._dispatch(conn, "accept_connection", ("mppool",))
        except BaseException:
            conn.close()
            raise
        self._conn, self._ident = conn, ident
        return conn

    async def _dial(self) -> _Conn:
        conn = _Conn(*await open_stream(self.address))
        try:
            await self._answer_challenge(conn)
            await self._deliver_challenge(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _answer_challenge(self, conn: _Conn) -> None:
        """multiprocess.connection.answer_challenge: prove we know the key."""
        message = await conn.recv_bytes(MAX_AUTH)
        if message[:len(CHALLENGE)] != CHALLENGE:
            raise EOFError("not a challenge")
        conn.send_bytes(hmac.new(self.authkey, message[len(CHALLENGE):], "md5").digest())
        if await conn.recv_bytes(MAX_AUTH) != WELCOME:
            raise ServerUnavailable(f"supervisor at {display(self.address)} refused the key "
                                    "(wrong authkey)")

    async def _deliver_challenge(self, conn: _Conn) -> None:
        """multiprocess.connection.deliver_challenge: the supervisor proves it knows it."""
        import os

        message = os.urandom(MESSAGE_LENGTH)
        conn.send_bytes(CHALLENGE + message)
        answer = await conn.recv_bytes(MAX_AUTH)
        if not hmac.compare_digest(answer, hmac.new(self.authkey, message, "md5").digest()):
            conn.send_bytes(b"#FAILURE#")
            raise ServerUnavailable(f"supervisor at {display(self.address)} does not know the key")
        conn.send_bytes(WELCOME)

    async def _dispatch(self, conn: _Conn, method: str, args: tuple[Any, ...]) -> Any:
        await conn.send((None, method, args, {}))
        kind, result = await conn.recv()
        if kind != "#RETURN":
            raise ServerUnavailable(f"supervisor at {display(self.address)} refused {method}: "
                                    f"{result}")
        return result

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def forget(self) -> list[Any]:
        """In a forked child: drop the parent's connection without closing it (returned, to
        be kept alive: closing it would touch the parent's event loop)."""
        conn, self._conn, self._lock = self._conn, None, None
        return [] if conn is None else [conn]

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            try:
                await conn.writer.wait_closed()
            except (OSError, ConnectionError):
                pass
