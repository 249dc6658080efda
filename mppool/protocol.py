"""The lease channel's protocol, without I/O: bytes in, named messages out, and back.

Every client end (the blocking `mppool.channel.Channel`, an asyncio client) and the
supervisor's lease loop speak it through this module only, so the format, its limits and its
validation live in one place::

    client                                             supervisor (lease loop)
      encode_get / encode_put / encode_request ──▶ RequestReader.feed ─▶ decode_request
      ReplyReader.feed ─▶ decode_reply        ◀── encode_granted / encode_reply

(The readers, in `mppool.framing`, decode the messages of every lease cycle, a get, a put
and a grant, as they cut them out of the stream; the decoders here take every other message.
The handshake that comes first is `mppool.handshake`.)

A frame is a 4-byte big-endian length and a payload. The payload of the three messages of
every lease cycle is a fixed struct, told apart by its first byte; every other message is a
stdlib pickle of a tuple (pickle always starts with 0x80), and dill never travels here::

    b"G" rid pool_id timeout      Get          (timeout -1.0: the pool's own timeout)
    b"P" pool_id lease            Put          (no reply; order is kept per connection)
    b"D" pool_id lease            Put(discard=True)
    b"O" rid lease <blob>         Granted      (the pickled object follows as is)
    b"K" pool_id                  FastPoke     (a fast lease given back in slow mode)
    b"k" pool_id slot generation  FastGive     (a fast lease given back through the supervisor)

Nothing is unpickled before the peer proved it holds the key (the handshake is raw
structs). After that, every field of every request is still checked as strictly as the API
checks its arguments: a NaN or negative timeout, an unknown operation or a frame longer than
the limit is a `ProtocolError`, on which the supervisor closes that one connection.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct("!I")
HEADER_SIZE = HEADER.size  # a constant: Struct.size is a lookup CPython 3.11 does the slow way
# How much one recv() asks for. Above glibc's mmap threshold (128 KiB) every call would
# mmap and munmap its buffer: recv(262144) measured 15 us against 1.9 us for 64 KiB.
RECV_SIZE = 65536
# Payloads up to this size are copied out of what was received; larger ones are views.
COPY_MAX = 4096
MAX_HANDSHAKE = 4096  # a frame before the key is proved: a hello is ~110 bytes
# The supervisor's limits on a connection (each a Server option): the largest message, the
# unread replies past which a client is cut off, the time to prove the key.
DEFAULT_MAX_MESSAGE = 64 << 20
DEFAULT_MAX_UNREAD = 16 << 20
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
# The longest wait a request may ask for, in seconds (~31 years). Anything longer is
# "forever" to the client, which sends the pool's own timeout (-1.0) or None instead.
MAX_TIMEOUT = 1e9
POOL_TIMEOUT = -1.0  # a get's timeout on the wire for "the pool's own"

_GET = struct.Struct("!BIId")
_PUT = struct.Struct("!BIQ")
_OK = struct.Struct("!IBIQ")  # the frame header and b"O" rid lease, packed at once
_GET_FRAME = struct.Struct("!IBIId")  # the frame header and a get, packed at once
_PUT_FRAME = struct.Struct("!IBIQ")  # the frame header and a put, packed at once
_OK_BODY = struct.Struct("!IQ")
_POKE = struct.Struct("!BI")  # b"K" pool_id: FastPoke, a fixed struct (it comes per put)
_GIVE = struct.Struct("!BIIQ")  # b"k" pool_id slot generation: FastGive
KIND_GET, KIND_PUT, KIND_DISCARD, KIND_OK = b"G"[0], b"P"[0], b"D"[0], b"O"[0]
KIND_POKE, KIND_GIVE = b"K"[0], b"k"[0]
_PUT_KINDS = frozenset((KIND_PUT, KIND_DISCARD))
GET_SIZE, PUT_SIZE, POKE_SIZE, GIVE_SIZE = _GET.size, _PUT.size, _POKE.size, _GIVE.size
_OK_BODY_SIZE = _OK_BODY.size
_GRANTED_BLOB = HEADER_SIZE + 1 + _OK_BODY_SIZE  # where a whole Granted frame's blob starts
# Bound methods of the hot structs, looked up once.
_unpack_header, _unpack_get, _unpack_put = HEADER.unpack_from, _GET.unpack_from, _PUT.unpack_from
_unpack_ok_body = _OK_BODY.unpack_from
_pack_get_frame, _pack_put_frame = _GET_FRAME.pack, _PUT_FRAME.pack
MAX_RID = 0xFFFFFFFF

# Operations of the pickled requests, and statuses of the pickled replies.
CALL, GETATTR, DROPREF, PING, WAITING, CANCEL, BYE, FASTMAP = range(2, 10)
OK, ERR, REF, GRANTED = range(4)  # GRANTED: a lease on an object that stays there (a proxy)


_new_granted = object.__new__


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot be trusted any further."""


# --------------------------------------------------------------------------- messages


@dataclass(slots=True)
class Get:
    rid: int
    pool_id: int
    timeout: float | None  # None: the pool's own timeout


@dataclass(slots=True)
class Put:
    pool_id: int
    lease: int
    discard: bool = False


@dataclass(slots=True)
class Call:
    """A method call (``args is None``: an attribute read) on a proxied object."""

    rid: int
    pool_id: int  # 0: an object hosted with client.host()
    lease: int
    ref: int  # nonzero: a sub-object (a cursor) returned by an earlier call
    name: str
    args: tuple[Any, ...] | None
    kwargs: dict[str, Any]


@dataclass(slots=True)
class DropRef:
    ref: int


@dataclass(slots=True)
class Ping:
    """Answered once every put sent before it has taken effect (read your own writes)."""

    rid: int


@dataclass(slots=True)
class Waiting:
    rid: int
    pool_id: int


@dataclass(slots=True)
class Cancel:
    """Withdraw this connection's get ``rid`` if it is still queued (no reply of its own).

    A get still queued is answered with an error, which the client ignores; a get already
    served has its grant on the wire, and the client gives that lease back. Either way the
    pool keeps no waiter for a caller that left (an asyncio task cancelled while waiting).
    """

    rid: int


@dataclass(slots=True)
class Bye:
    """The client is closing this channel on purpose (``close()``, interpreter exit): the
    leases it still holds are taken back as usual, but logged as a clean exit (INFO), not as
    a holder that went away (WARNING: a crash, a kill). No reply."""


@dataclass(slots=True)
class FastMap:
    """Ask for a token pool's shared-memory region (`mppool.fastpath`), on a connection of
    its own: the reply carries the region's memfd (``SCM_RIGHTS``). ``conn`` is the asking
    process's lease channel, which its fast leases are tied to (it must be the same process)."""

    rid: int
    pool_id: int
    conn: int


@dataclass(slots=True)
class FastPoke:
    """A fast lease was given back while the region is in slow mode: look at it. No reply."""

    pool_id: int


@dataclass(slots=True)
class FastGive:
    """Give back the fast lease (slot, generation) through the supervisor: the region's
    mutex could not be had in time (its holder is stopped). The supervisor applies it under
    the mutex as soon as it can, if the slot is still this connection's. No reply."""

    pool_id: int
    slot: int
    gen: int


@dataclass(slots=True)
class Granted:
    rid: int
    lease: int
    blob: Any  # bytes or memoryview: the pickled object; None: a proxy (it stays there)


@dataclass(slots=True)
class Reply:
    rid: int
    status: int  # OK: value; ERR: value is a packed exception; REF: value is (ref, type name)
    value: Any


Request = (Get | Put | Call | DropRef | Ping | Waiting | Cancel | Bye | FastMap | FastPoke
           | FastGive)


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


# --------------------------------------------------------------------------- client → supervisor


def encode_get(rid: int, pool_id: int, timeout: float | None) -> bytes:
    return _pack_get_frame(GET_SIZE, KIND_GET, rid, pool_id,
                           POOL_TIMEOUT if timeout is None else timeout)


def encode_put(pool_id: int, lease: int, discard: bool = False) -> bytes:
    return _pack_put_frame(PUT_SIZE, KIND_DISCARD if discard else KIND_PUT, pool_id, lease)


def encode_call(rid: int, pool_id: int, lease: int, ref: int, name: str,
                args: tuple[Any, ...] | None, kwargs: dict[str, Any]) -> bytes:
    return frame(pickle.dumps((CALL, rid, pool_id, lease, ref, name, args, kwargs), protocol=5))


def encode_dropref(ref: int) -> bytes:
    return frame(pickle.dumps((DROPREF, ref), protocol=5))


def encode_ping(rid: int) -> bytes:
    return frame(pickle.dumps((PING, rid), protocol=5))


def encode_waiting(rid: int, pool_id: int) -> bytes:
    return frame(pickle.dumps((WAITING, rid, pool_id), protocol=5))


def encode_cancel(rid: int) -> bytes:
    return frame(pickle.dumps((CANCEL, rid), protocol=5))


def encode_fastmap(rid: int, pool_id: int, conn: int) -> bytes:
    return frame(pickle.dumps((FASTMAP, rid, pool_id, conn), protocol=5))


def encode_fastpoke(pool_id: int) -> bytes:
    return HEADER.pack(POKE_SIZE) + _POKE.pack(KIND_POKE, pool_id)


def encode_fastgive(pool_id: int, slot: int, gen: int) -> bytes:
    return HEADER.pack(GIVE_SIZE) + _GIVE.pack(KIND_GIVE, pool_id, slot, gen)


BYE_FRAME = frame(pickle.dumps((BYE,), protocol=5))


def encode_bye() -> bytes:
    return BYE_FRAME


def _u32(v: Any) -> bool:
    return type(v) is int and 0 <= v <= MAX_RID


def _u64(v: Any) -> bool:
    return type(v) is int and 0 <= v < 1 << 64


def decode_request(payload: Any) -> Request:
    """One request from a client that proved the key; ProtocolError if it is malformed."""
    n = len(payload)
    if not n:
        raise ProtocolError("an empty frame")
    kind = payload[0]
    if kind == KIND_GET:
        return Get(*parse_get(payload))
    if kind in (KIND_PUT, KIND_DISCARD):
        return Put(*parse_put(payload))
    if kind == KIND_POKE:
        if len(payload) != POKE_SIZE:
            raise ProtocolError(f"a poke frame of {len(payload)} bytes")
        return FastPoke(_POKE.unpack_from(payload)[1])
    if kind == KIND_GIVE:
        if len(payload) != GIVE_SIZE:
            raise ProtocolError(f"a give frame of {len(payload)} bytes")
        return FastGive(*_GIVE.unpack_from(payload)[1:])
    if kind != 0x80:
        raise ProtocolError(f"unknown frame kind {kind:#x}")
    try:
        msg = pickle.loads(payload)
    except Exception as exc:
        raise ProtocolError(f"an unreadable request: {exc!r}") from None
    if type(msg) is not tuple or not msg:
        raise ProtocolError(f"a request that is not a tuple: {type(msg).__name__}")
    op, args = msg[0], msg[1:]
    if op == CALL and len(args) == 7:
        rid, pool_id, lease, ref, name, cargs, kwargs = args
        if (_u32(rid) and rid and _u32(pool_id) and _u64(lease) and _u64(ref)
                and type(name) is str and (cargs is None or type(cargs) is tuple)
                and type(kwargs) is dict and all(type(k) is str for k in kwargs)):
            return Call(rid, pool_id, lease, ref, name, cargs, kwargs)
    elif op == DROPREF and len(args) == 1 and _u64(args[0]):
        return DropRef(args[0])
    elif op == PING and len(args) == 1 and _u32(args[0]) and args[0]:
        return Ping(args[0])
    elif op == WAITING and len(args) == 2 and _u32(args[0]) and args[0] and _u32(args[1]):
        return Waiting(args[0], args[1])
    elif op == CANCEL and len(args) == 1 and _u32(args[0]) and args[0]:
        return Cancel(args[0])
    elif op == BYE and not args:
        return Bye()
    elif op == FASTMAP and len(args) == 3 and _u32(args[0]) and args[0] and _u32(args[1]) \
            and _u64(args[2]):
        return FastMap(*args)
    raise ProtocolError(f"a malformed request: op {op!r} with {len(args)} fields")


def parse_get(payload: Any) -> tuple[int, int, float | None]:
    """(rid, pool_id, timeout) of a get frame: the lease loop's hot path, without a message
    object."""
    if len(payload) != GET_SIZE:
        raise ProtocolError(f"a get frame of {len(payload)} bytes")
    _, rid, pool_id, timeout = _GET.unpack_from(payload)
    if not rid:
        raise ProtocolError("a get with request id 0")
    if timeout == -1.0:
        return rid, pool_id, None
    if not (0.0 <= timeout <= MAX_TIMEOUT):  # also false for NaN
        raise ProtocolError(f"a get with timeout {timeout!r}")
    return rid, pool_id, timeout


def parse_put(payload: Any) -> tuple[int, int, bool]:
    """(pool_id, lease, discard) of a put frame."""
    if len(payload) != PUT_SIZE:
        raise ProtocolError(f"a put frame of {len(payload)} bytes")
    kind, pool_id, lease = _PUT.unpack_from(payload)
    return pool_id, lease, kind == KIND_DISCARD


def check_wire_timeout(timeout: float) -> float | None:
    """-1.0 is "the pool's timeout"; otherwise a finite number of seconds in range."""
    if timeout == -1.0:
        return None
    if not (0.0 <= timeout <= MAX_TIMEOUT):  # also false for NaN
        raise ProtocolError(f"a get with timeout {timeout!r}")
    return timeout


# --------------------------------------------------------------------------- supervisor → client


def encode_granted(rid: int, lease: int, blob: bytes) -> bytes:
    return _OK.pack(1 + _OK_BODY_SIZE + len(blob), KIND_OK, rid, lease) + blob


def encode_reply(rid: int, status: int, value: Any) -> bytes:
    return frame(pickle.dumps((rid, status, value), protocol=5))


def decode_reply(payload: Any) -> Granted | Reply:
    if len(payload) > _OK_BODY_SIZE and payload[0] == KIND_OK:
        rid, lease = _OK_BODY.unpack_from(payload, 1)
        return Granted(rid, lease, payload[1 + _OK_BODY_SIZE:])
    rid, status, value = pickle.loads(payload)
    if status == GRANTED:
        return Granted(rid, value, None)  # a proxy: the object stays in the supervisor
    return Reply(rid, status, value)


def encode_granted_proxy(rid: int, lease: int) -> bytes:
    return encode_reply(rid, GRANTED, lease)
