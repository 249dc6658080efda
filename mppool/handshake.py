"""The lease channel's handshake, without I/O: mutual proof of the key, before any pickle.

Raw structs, never pickle: nothing is unpickled from a peer that has not proved it knows the
key (a pickle can run code). Mutual: each side answers the other's nonce::

    supervisor -> client  b"N" nonce(32)
    client -> supervisor  b"H" hmac(key, nonce)(32) client_nonce(32) pid start_time host
    supervisor -> client  b"A" hmac(key, client_nonce)(32) conn_id instance

``instance`` names this run of the supervisor (random at start): pool ids are valid only on
the instance that issued them, and a client that reconnects to a restarted supervisor at
the same address learns so from it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
from typing import Any

from .protocol import ProtocolError, frame

NONCE_SIZE = 32
_HELLO = struct.Struct("!c32s32sId")
_ACK = struct.Struct("!c32sQQ")


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def digest(authkey: bytes, nonce: bytes) -> bytes:
    return hmac.new(authkey, nonce, hashlib.sha256).digest()


def encode_nonce(nonce: bytes) -> bytes:
    return frame(b"N" + nonce)


def decode_nonce(payload: bytes) -> bytes:
    if len(payload) != 1 + NONCE_SIZE or payload[:1] != b"N":
        raise ProtocolError("not a supervisor's greeting")
    return bytes(payload[1:])


def encode_hello(answer: bytes, client_nonce: bytes, pid: int, start: float, host: str) -> bytes:
    return frame(_HELLO.pack(b"H", answer, client_nonce, pid, start) + host.encode()[:255])


def decode_hello(payload: Any) -> tuple[bytes, bytes, int, float, str]:
    if len(payload) < _HELLO.size or len(payload) > _HELLO.size + 255 or payload[0] != b"H"[0]:
        raise ProtocolError("not a hello")
    _, answer, client_nonce, pid, start = _HELLO.unpack_from(payload)
    if not math.isfinite(start):
        raise ProtocolError("a hello with a start time that is not a number")
    return answer, client_nonce, pid, start, bytes(payload[_HELLO.size:]).decode(errors="replace")


def encode_ack(answer: bytes, conn_id: int, instance: int) -> bytes:
    return frame(_ACK.pack(b"A", answer, conn_id, instance))


def decode_ack(payload: bytes) -> tuple[bytes, int, int]:
    if len(payload) != _ACK.size or payload[:1] != b"A":
        raise ProtocolError("not a handshake acknowledgement")
    _, answer, conn_id, instance = _ACK.unpack(payload)
    return answer, conn_id, instance
