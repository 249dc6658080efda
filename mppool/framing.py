"""The lease channel's framing, without I/O: a byte stream in, whole frames out.

A frame is a 4-byte big-endian length and a payload (`mppool.protocol`). Each end of the
channel feeds what it received to its reader and gets the frames it completed:

    supervisor (lease loop)   RequestReader.feed(bytes) -> [a get or put, decoded | payload]
    client                    ReplyReader.feed(bytes)   -> [Granted | payload]
    either, raw               FrameReader.feed(bytes)   -> [payload]

The messages of every lease cycle (a get, a put, a grant) come out decoded as they are cut,
with no Python call per frame; every other payload goes to `mppool.protocol`'s decoders.
A frame longer than the reader's limit is a `ProtocolError` as soon as its header arrives.
"""

from __future__ import annotations

from typing import Any

from .protocol import (
    _GRANTED_BLOB,
    _OK_BODY_SIZE,
    _PUT_KINDS,
    COPY_MAX,
    GET_SIZE,
    HEADER_SIZE,
    KIND_GET,
    KIND_OK,
    MAX_TIMEOUT,
    POOL_TIMEOUT,
    PUT_SIZE,
    Granted,
    ProtocolError,
    _new_granted,
    _unpack_get,
    _unpack_header,
    _unpack_ok_body,
    _unpack_put,
)


class FrameReader:
    """Splits a byte stream into payloads, refusing any frame longer than ``limit``.

    Small payloads are slices of what was received (copying a few dozen bytes costs less
    than making a view of them); payloads over ``COPY_MAX`` are views, never copies. Only the
    start of an incomplete frame is kept, and the buffer then grows by appending until the
    frame is complete, so a large frame arriving in many pieces costs linear time, never a
    copy of the whole buffer per piece.
    """

    __slots__ = ("_buf", "_need", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._need = HEADER_SIZE  # bytes the next frame needs before it is worth parsing

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Any]:
        """Payloads completed by ``data`` (bytes, or views of immutable bytes: both stay
        valid)."""
        if self._buf:
            joined = self._joined(data)
            if joined is None:
                return []
            data = joined
        end = len(data)
        if end >= HEADER_SIZE:
            (n,) = _unpack_header(data)
            if end == HEADER_SIZE + n and n <= self.limit:  # exactly one whole frame: the common case
                return [data[HEADER_SIZE:] if n <= COPY_MAX else memoryview(data)[HEADER_SIZE:]]
        return self._split(data, end)

    def _joined(self, data: bytes) -> bytes | None:
        """The buffered start of a frame and ``data``, if that completes it (else None, and
        ``data`` is kept)."""
        self._buf += data
        if len(self._buf) < self._need:
            return None
        joined, self._buf = bytes(self._buf), bytearray()
        return joined

    def _split(self, data: bytes, end: int) -> list[Any]:
        """Every frame in ``data`` (usually whole ones: a put and a get in one recv), each
        as `_cut` makes it; the start of an incomplete one is kept."""
        size = HEADER_SIZE
        limit = self.limit
        cut = self._cut
        frames: list[Any] = []
        pos = 0
        while end - pos >= size:
            (n,) = _unpack_header(data, pos)
            if n > limit:
                raise ProtocolError(f"a frame of {n} bytes is over the limit of {limit}")
            start = pos + size
            if start + n > end:
                self._need = size + n
                break
            pos = start + n
            frames.append(cut(data, start, n))
        else:
            self._need = size
        if pos < end:
            self._buf = bytearray(memoryview(data)[pos:])  # the start of a frame: wait for the rest
        return frames

    def _cut(self, data: bytes, start: int, n: int) -> Any:
        """The frame of ``n`` bytes at ``start``: its payload."""
        return data[start:start + n] if n <= COPY_MAX else memoryview(data)[start:start + n]


class RequestReader(FrameReader):
    """The supervisor's reader (see `FrameReader`): a well-formed get or put, the two
    requests of every lease cycle, comes out decoded as it is cut, as the tuple its struct
    unpacks to: ``(KIND_GET, rid, pool_id, timeout)`` (``timeout`` `POOL_TIMEOUT`: the pool's
    own) or ``(KIND_PUT or KIND_DISCARD, pool_id, lease)``. No payload is copied and no
    function called for them. Any other frame (the handshake's included: a hello is neither)
    comes out as its payload, for `decode_request`, which refuses a malformed get or put in
    its turn."""

    __slots__ = ()

    def feed(self, data: bytes) -> list[Any]:
        # FrameReader._split with the decoding inline: no Python call per frame.
        if self._buf:
            joined = self._joined(data)
            if joined is None:
                return []
            data = joined
        end = len(data)
        limit = self.limit
        frames: list[Any] = []
        pos = 0
        while end - pos >= HEADER_SIZE:
            (n,) = _unpack_header(data, pos)
            if n > limit:
                raise ProtocolError(f"a frame of {n} bytes is over the limit of {limit}")
            start = pos + HEADER_SIZE
            if start + n > end:
                self._need = HEADER_SIZE + n
                break
            pos = start + n
            kind = data[start] if n else 0
            if kind == KIND_GET and n == GET_SIZE:
                msg = _unpack_get(data, start)
                timeout = msg[3]
                if msg[1] and (0.0 <= timeout <= MAX_TIMEOUT or timeout == POOL_TIMEOUT):
                    frames.append(msg)
                    continue
            elif n == PUT_SIZE and kind in _PUT_KINDS:
                frames.append(_unpack_put(data, start))
                continue
            frames.append(data[start:pos] if n <= COPY_MAX else memoryview(data)[start:pos])
        else:
            self._need = HEADER_SIZE
        if pos < end:
            self._buf = bytearray(memoryview(data)[pos:])  # the start of a frame: wait for the rest
        return frames


class ReplyReader(FrameReader):
    """A client's reader (see `FrameReader`): a grant of a copied object, the reply of every
    lease cycle, comes out decoded as it is cut, a `Granted` (its blob is the only copy made
    of it); any other frame comes out as its payload, for `decode_reply`."""

    __slots__ = ()

    def feed(self, data: bytes) -> list[Any]:
        if self._buf:
            joined = self._joined(data)
            if joined is None:
                return []
            data = joined
        end = len(data)
        if end >= HEADER_SIZE:
            (n,) = _unpack_header(data)
            if end == HEADER_SIZE + n and n <= self.limit:
                # Exactly one whole frame, the common case: _cut's decoding, inline.
                if n > _OK_BODY_SIZE and data[HEADER_SIZE] == KIND_OK:
                    rid, lease = _unpack_ok_body(data, HEADER_SIZE + 1)
                    # No __init__ call: a dataclass's is a Python function.
                    reply = _new_granted(Granted)
                    reply.rid = rid
                    reply.lease = lease
                    reply.blob = data[_GRANTED_BLOB:] if n <= COPY_MAX \
                        else memoryview(data)[_GRANTED_BLOB:]
                    return [reply]
                return [data[HEADER_SIZE:] if n <= COPY_MAX else memoryview(data)[HEADER_SIZE:]]
        return self._split(data, end)

    def _cut(self, data: bytes, start: int, n: int) -> Any:
        if n > _OK_BODY_SIZE and data[start] == KIND_OK:
            rid, lease = _unpack_ok_body(data, start + 1)
            blob = start + 1 + _OK_BODY_SIZE
            return Granted(rid, lease, data[blob:start + n] if n <= COPY_MAX
                           else memoryview(data)[blob:start + n])
        return data[start:start + n] if n <= COPY_MAX else memoryview(data)[start:start + n]
