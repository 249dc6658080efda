"""The get/put channel: length-prefixed frames over a stream socket.

dill stays off this path (DESIGN.md, trap 4): ``fun`` and hooks go once through the
SyncManager control plane. A frame's payload is either a stdlib pickle of a tuple, or, for
the three messages of every lease cycle, a fixed struct (pickle always starts with 0x80, so
the first byte tells them apart):

    b"G" rid pool_id timeout      get           (timeout < 0: None)
    b"P" pool_id lease            put           (no reply)
    b"O" rid lease <blob>         get's answer  (the pickled object follows as is)

Decoded, every message is a tuple: client → supervisor ``(rid, op, *args)``, supervisor →
client ``(rid, status, *values)``. A request with rid 0 expects no reply.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import socket
import struct
from typing import Any

HEADER = struct.Struct("!I")
# How much one recv() asks for. Above glibc's mmap threshold (128 KiB) every call would
# mmap and munmap its buffer: recv(262144) measured 15 us against 1.9 us for 64 KiB.
RECV_SIZE = 65536
MAX_FRAME = 1 << 30

# ops
GET, PUT, CALL, GETATTR, DROPREF, PING, WAITING = range(1, 8)
# statuses
OK, ERR, REF = range(3)

NONCE_SIZE = 32


GET_FRAME = _GET = struct.Struct("!BIId")
PUT_FRAME = _PUT = struct.Struct("!BIQ")
_OK = struct.Struct("!IBIQ")  # the frame header and b"O" rid lease, packed at once
_OK_BODY = struct.Struct("!IQ")
KIND_GET, KIND_PUT, KIND_OK = b"G"[0], b"P"[0], b"O"[0]


def dumps(msg: Any) -> bytes:
    data = pickle.dumps(msg, protocol=5)
    return HEADER.pack(len(data)) + data


def dump_get(rid: int, pool_id: int, timeout: float | None) -> bytes:
    return HEADER.pack(_GET.size) + _GET.pack(KIND_GET, rid, pool_id, -1.0 if timeout is None else timeout)


def dump_put(pool_id: int, lease: int) -> bytes:
    return HEADER.pack(_PUT.size) + _PUT.pack(KIND_PUT, pool_id, lease)


def dump_ok(rid: int, lease: int, blob: bytes) -> bytes:
    return _OK.pack(1 + _OK_BODY.size + len(blob), KIND_OK, rid, lease) + blob


def loads(frame: Any) -> Any:
    """Decode one payload (bytes or memoryview) into its tuple."""
    kind = frame[0]
    if kind == KIND_OK:
        rid, lease = _OK_BODY.unpack_from(frame, 1)
        return (rid, OK, lease, frame[1 + _OK_BODY.size:])
    if kind == KIND_GET:
        _, rid, pool_id, timeout = _GET.unpack_from(frame)
        return (rid, GET, pool_id, None if timeout < 0 else timeout)
    if kind == KIND_PUT:
        _, pool_id, lease = _PUT.unpack_from(frame)
        return (0, PUT, pool_id, lease)
    return pickle.loads(frame)


def digest(authkey: bytes, nonce: bytes) -> bytes:
    return hmac.new(authkey, nonce, hashlib.sha256).digest()


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> Any:
    (n,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    if n > MAX_FRAME:
        raise EOFError(f"frame of {n} bytes refused")
    return pickle.loads(recv_exact(sock, n))
