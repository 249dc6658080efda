"""The get/put channel: length-prefixed stdlib-pickle frames over a stream socket.

dill stays off this path (DESIGN.md, trap 4): only plain tuples travel here; ``fun`` and
hooks go once through the SyncManager control plane.

Client → supervisor: ``(rid, op, *args)``; supervisor → client: ``(rid, status, *values)``.
A request with rid 0 expects no reply (put).
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
MAX_FRAME = 1 << 30

# ops
GET, PUT, CALL, GETATTR, DROPREF, PING, WAITING = range(1, 8)
# statuses
OK, ERR, REF = range(3)

NONCE_SIZE = 32


def dumps(msg: Any) -> bytes:
    data = pickle.dumps(msg, protocol=5)
    return HEADER.pack(len(data)) + data


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
