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


# The handshake is raw structs, never pickle: nothing is unpickled from a peer that has not
# proved it knows the key (a pickle can run code). Mutual: each side answers the other's nonce.
#   supervisor -> client  b"N" nonce(32)
#   client -> supervisor  b"H" hmac(key, nonce)(32) client_nonce(32) pid start_time host
#   supervisor -> client  b"A" hmac(key, client_nonce)(32) conn_id
_HELLO = struct.Struct("!c32s32sId")
_ACK = struct.Struct("!c32sQ")


def dump_nonce(nonce: bytes) -> bytes:
    return HEADER.pack(1 + len(nonce)) + b"N" + nonce


def dump_hello(answer: bytes, client_nonce: bytes, pid: int, start: float, host: str) -> bytes:
    body = _HELLO.pack(b"H", answer, client_nonce, pid, start) + host.encode()[:255]
    return HEADER.pack(len(body)) + body


def parse_hello(frame: Any) -> tuple[bytes, bytes, int, float, str]:
    """ValueError unless ``frame`` is a well-formed hello."""
    if len(frame) < _HELLO.size or frame[0] != b"H"[0]:
        raise ValueError("not a hello")
    _, answer, client_nonce, pid, start = _HELLO.unpack_from(frame)
    return answer, client_nonce, pid, start, bytes(frame[_HELLO.size:]).decode(errors="replace")


def dump_ack(answer: bytes, conn_id: int) -> bytes:
    return HEADER.pack(_ACK.size) + _ACK.pack(b"A", answer, conn_id)


def recv_raw(sock: socket.socket) -> bytes:
    """One frame's payload, as bytes (for the handshake: nothing is unpickled)."""
    (n,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    if n > 4096:
        raise EOFError(f"handshake frame of {n} bytes refused")
    return recv_exact(sock, n)


def parse_ack(frame: bytes) -> tuple[bytes, int]:
    if len(frame) != _ACK.size or frame[:1] != b"A":
        raise EOFError("not a handshake acknowledgement")
    _, answer, conn_id = _ACK.unpack(frame)
    return answer, conn_id


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
