"""The lease channel's protocol (``mppool.protocol``), without any socket.

Every message goes through its encoder and back through the decoder the other end uses; every
field a peer could get wrong is refused with ``ProtocolError``; ``FrameReader`` gives the same
frames however the stream is cut, refuses an oversized frame from its header alone, and costs
linear time for a large frame that arrives in many pieces.
"""

from __future__ import annotations

import math
import os
import pickle
import statistics
import struct
import time
from typing import Any

import pytest

from mppool import framing, handshake
from mppool import protocol as P
from mppool.remote import PackedException


def payload(frame: bytes) -> memoryview:
    """The one payload of an encoded frame, as the other end's FrameReader hands it over."""
    frames = framing.FrameReader(1 << 30).feed(frame)
    assert len(frames) == 1
    return frames[0]


def request(frame: bytes) -> P.Request:
    return P.decode_request(payload(frame))


def reply(frame: bytes) -> P.Granted | P.Reply:
    return P.decode_reply(payload(frame))


def pickled(*msg: Any) -> bytes:
    return pickle.dumps(msg, protocol=5)


def get_payload(rid: int, pool_id: int, timeout: float) -> bytes:
    """A get frame's payload packed by hand, so that any timeout can be sent."""
    return struct.pack("!BIId", P.KIND_GET, rid, pool_id, timeout)


# ------------------------------------------------------------------- requests: round trips


@pytest.mark.parametrize("timeout", [None, 0.0, 0.001, 2.5, 3600.0, P.MAX_TIMEOUT])
def test_get_round_trip(timeout: float | None) -> None:
    frame = P.encode_get(7, 3, timeout)
    assert len(frame) == P.HEADER.size + P.GET_SIZE
    assert request(frame) == P.Get(7, 3, timeout)


def test_get_round_trip_of_the_extreme_ids() -> None:
    assert request(P.encode_get(P.MAX_RID, P.MAX_RID, 1.0)) == P.Get(P.MAX_RID, P.MAX_RID, 1.0)
    assert request(P.encode_get(1, 0, 1.0)) == P.Get(1, 0, 1.0)


@pytest.mark.parametrize("discard", [False, True])
@pytest.mark.parametrize("pool_id,lease", [(0, 0), (5, 123456789), (P.MAX_RID, (1 << 64) - 1)])
def test_put_round_trip(pool_id: int, lease: int, discard: bool) -> None:
    frame = P.encode_put(pool_id, lease, discard)
    assert len(frame) == P.HEADER.size + P.PUT_SIZE
    assert request(frame) == P.Put(pool_id, lease, discard)


def test_put_defaults_to_keeping_the_object() -> None:
    assert request(P.encode_put(1, 2)) == P.Put(1, 2, False)


@pytest.mark.parametrize("args,kwargs", [
    (None, {}),  # an attribute read
    ((), {}),
    ((1, "two", b"3", None, (4.5,)), {"timeout": 2, "name": "x"}),
])
def test_call_round_trip(args: tuple[Any, ...] | None, kwargs: dict[str, Any]) -> None:
    frame = P.encode_call(9, 4, (1 << 64) - 1, 17, "execute", args, kwargs)
    assert request(frame) == P.Call(9, 4, (1 << 64) - 1, 17, "execute", args, kwargs)


def test_call_on_a_hosted_object_has_pool_id_zero() -> None:
    assert request(P.encode_call(1, 0, 8, 0, "m", (), {})) == P.Call(1, 0, 8, 0, "m", (), {})


def test_dropref_ping_waiting_round_trips() -> None:
    assert request(P.encode_dropref(0)) == P.DropRef(0)
    assert request(P.encode_dropref((1 << 64) - 1)) == P.DropRef((1 << 64) - 1)
    assert request(P.encode_ping(P.MAX_RID)) == P.Ping(P.MAX_RID)
    assert request(P.encode_waiting(5, 0)) == P.Waiting(5, 0)
    assert request(P.encode_waiting(5, P.MAX_RID)) == P.Waiting(5, P.MAX_RID)


def test_parse_get_and_parse_put_are_the_fields_of_the_messages() -> None:
    assert P.parse_get(payload(P.encode_get(3, 4, None))) == (3, 4, None)
    assert P.parse_get(payload(P.encode_get(3, 4, 1.5))) == (3, 4, 1.5)
    assert P.parse_put(payload(P.encode_put(3, 4, True))) == (3, 4, True)


def test_decoders_take_bytes_as_well_as_memoryviews() -> None:
    frame = P.encode_call(2, 1, 1, 0, "m", None, {})
    assert P.decode_request(frame[4:]) == P.decode_request(memoryview(frame)[4:])
    assert P.decode_request(bytearray(P.encode_get(1, 2, 3.0)[4:])) == P.Get(1, 2, 3.0)


# ------------------------------------------------------------------- requests: validation


@pytest.mark.parametrize("timeout", [
    math.nan, -math.nan, math.inf, -math.inf, -0.5, -1.5, -2.0, -1e300,
    P.MAX_TIMEOUT * 1.0000001, 1e10, 1e308,
])
def test_get_with_a_bad_timeout_is_refused(timeout: float) -> None:
    with pytest.raises(P.ProtocolError, match="timeout"):
        P.decode_request(get_payload(1, 1, timeout))
    with pytest.raises(P.ProtocolError):
        P.check_wire_timeout(timeout)


def test_minus_one_is_the_pools_timeout_and_the_only_negative_accepted() -> None:
    assert P.decode_request(get_payload(1, 1, -1.0)) == P.Get(1, 1, None)
    assert P.check_wire_timeout(-1.0) is None
    assert P.check_wire_timeout(0.0) == 0.0
    assert P.check_wire_timeout(P.MAX_TIMEOUT) == P.MAX_TIMEOUT


def test_get_with_request_id_zero_is_refused() -> None:
    with pytest.raises(P.ProtocolError, match="request id 0"):
        P.decode_request(get_payload(0, 1, 1.0))


@pytest.mark.parametrize("body", [
    get_payload(1, 1, 1.0)[:-1],
    get_payload(1, 1, 1.0) + b"\0",
    b"G",
    struct.pack("!BQ", P.KIND_PUT, 1),
    struct.pack("!BIQ", P.KIND_PUT, 1, 2) + b"\0",
    struct.pack("!BIQ", P.KIND_DISCARD, 1, 2)[:-1],
    b"P",
    b"D",
])
def test_fixed_frames_of_the_wrong_length_are_refused(body: bytes) -> None:
    with pytest.raises(P.ProtocolError, match="frame of"):
        P.decode_request(body)


@pytest.mark.parametrize("body", [b"", b"X", b"O" + bytes(20), b"\x00", b"\x7f", b"\x81\x05",
                                  b"g" + bytes(16)])
def test_unknown_frame_kinds_are_refused(body: bytes) -> None:
    with pytest.raises(P.ProtocolError):
        P.decode_request(body)


@pytest.mark.parametrize("body", [b"\x80", b"\x80\x05garbage", pickled(P.PING, 1)[:-1]])
def test_unreadable_pickles_are_refused(body: bytes) -> None:
    with pytest.raises(P.ProtocolError, match="unreadable"):
        P.decode_request(body)


class TupleSubclass(tuple):
    pass


@pytest.mark.parametrize("msg", [
    [P.PING, 1], {P.PING: 1}, P.PING, "ping", None, (), TupleSubclass((P.PING, 1)),
])
def test_requests_that_are_not_tuples_are_refused(msg: Any) -> None:
    with pytest.raises(P.ProtocolError):
        P.decode_request(pickle.dumps(msg, protocol=5))


GOOD_CALL = (P.CALL, 1, 2, 3, 4, "name", (), {})


def _call(**changes: Any) -> tuple[Any, ...]:
    fields = dict(zip(("op", "rid", "pool_id", "lease", "ref", "name", "args", "kwargs"),
                      GOOD_CALL, strict=True))
    fields.update(changes)
    return tuple(fields.values())


@pytest.mark.parametrize("msg", [
    # wrong arity
    (P.CALL, 1, 2, 3, 4, "name", ()),
    (*GOOD_CALL, None),
    (P.DROPREF,),
    (P.DROPREF, 1, 2),
    (P.PING,),
    (P.PING, 1, 2),
    (P.WAITING, 1),
    (P.WAITING, 1, 2, 3),
    # unknown operations
    (0, 1), (1, 1), (P.GETATTR, 1, 2, 3, 4, "name"), (99, 1), ("ping", 1), (None,),
    # request id 0, and ids out of range or of the wrong type
    _call(rid=0), _call(rid=-1), _call(rid=P.MAX_RID + 1), _call(rid=True), _call(rid=1.0),
    _call(rid="1"),
    _call(pool_id=-1), _call(pool_id=P.MAX_RID + 1), _call(pool_id=None),
    _call(lease=-1), _call(lease=1 << 64), _call(lease=2.0),
    _call(ref=-1), _call(ref=1 << 64), _call(ref=False),
    # name, args, kwargs of the wrong types
    _call(name=b"name"), _call(name=None), _call(name=3),
    _call(args=[1, 2]), _call(args="ab"), _call(args={}),
    _call(kwargs=None), _call(kwargs=[("a", 1)]), _call(kwargs={1: "a"}), _call(kwargs={b"a": 1}),
    (P.DROPREF, -1), (P.DROPREF, 1 << 64), (P.DROPREF, "1"), (P.DROPREF, None),
    (P.PING, 0), (P.PING, -1), (P.PING, P.MAX_RID + 1), (P.PING, True), (P.PING, 1.0),
    (P.WAITING, 0, 1), (P.WAITING, 1, -1), (P.WAITING, 1, P.MAX_RID + 1), (P.WAITING, 1, "1"),
])
def test_malformed_requests_are_refused(msg: tuple[Any, ...]) -> None:
    with pytest.raises(P.ProtocolError):
        P.decode_request(pickle.dumps(msg, protocol=5))


def test_protocol_error_is_not_a_pool_exception() -> None:
    """A broken peer is not a pool's answer: nothing catches it as one by mistake."""
    import mppool

    assert not issubclass(P.ProtocolError, mppool.PoolException)


# ------------------------------------------------------------------------------- replies


@pytest.mark.parametrize("blob", [b"", b"x", pickle.dumps({"conn": 1}, protocol=5), bytes(70000)])
def test_granted_round_trip(blob: bytes) -> None:
    back = reply(P.encode_granted(P.MAX_RID, (1 << 64) - 1, blob))
    assert isinstance(back, P.Granted)
    assert (back.rid, back.lease, bytes(back.blob)) == (P.MAX_RID, (1 << 64) - 1, blob)


def test_granted_proxy_round_trip() -> None:
    assert reply(P.encode_granted_proxy(5, 77)) == P.Granted(5, 77, None)


@pytest.mark.parametrize("status,value", [
    (P.OK, None), (P.OK, 12345), (P.OK, "granted"), (P.OK, ("row", 1)), (P.OK, [1, 2]),
    (P.OK, {"a": (1, 2)}), (P.OK, ("granted",)), (P.OK, ("granted", 5, 6)),
    (P.REF, (3, "sqlite3.Cursor")),
    (P.ERR, ("granted", 5)),
])
def test_reply_round_trip(status: int, value: Any) -> None:
    assert reply(P.encode_reply(9, status, value)) == P.Reply(9, status, value)


def test_a_call_that_returns_the_tuple_granted_n_is_still_a_reply() -> None:
    """A proxied method may return any plain value, a row such as ("granted", 5) included:
    the client must get that value, not mistake it for the grant of a proxied object."""
    back = reply(P.encode_reply(9, P.OK, ("granted", 5)))
    assert back == P.Reply(9, P.OK, ("granted", 5))


def test_error_reply_carries_a_packed_exception() -> None:
    back = reply(P.encode_reply(4, P.ERR, PackedException(KeyError("k"))))
    assert isinstance(back, P.Reply) and back.status == P.ERR
    exc = back.value.unpack()
    assert type(exc) is KeyError and exc.args == ("k",)


# ----------------------------------------------------------------------------- handshake


def test_nonce_round_trip() -> None:
    nonce = handshake.new_nonce()
    assert len(nonce) == handshake.NONCE_SIZE and nonce != handshake.new_nonce()
    frame = handshake.encode_nonce(nonce)
    assert handshake.decode_nonce(frame[4:]) == nonce
    assert handshake.decode_nonce(payload(frame)) == nonce  # a memoryview too


@pytest.mark.parametrize("body", [b"", b"N", b"N" + bytes(31), b"N" + bytes(33), b"H" + bytes(32)])
def test_a_bad_greeting_is_refused(body: bytes) -> None:
    with pytest.raises(P.ProtocolError):
        handshake.decode_nonce(body)


@pytest.mark.parametrize("host", ["", "web-1", "h\u00f6st.example", "x" * 255])
def test_hello_round_trip(host: str) -> None:
    answer, nonce = handshake.digest(b"key", b"n" * 32), handshake.new_nonce()
    frame = handshake.encode_hello(answer, nonce, 4242, 1234.56, host)
    for body in (frame[4:], payload(frame)):
        assert handshake.decode_hello(body) == (answer, nonce, 4242, 1234.56, host)


def test_hello_host_is_cut_to_255_bytes() -> None:
    hello = handshake.encode_hello(bytes(32), bytes(32), 1, 0.0, "h" * 1000)
    _, _, _, _, host = handshake.decode_hello(hello[4:])
    assert host == "h" * 255


def test_a_bad_hello_is_refused() -> None:
    good = handshake.encode_hello(bytes(32), bytes(32), 1, 2.0, "host")[4:]
    size = struct.calcsize("!c32s32sId")
    for body in (good[:size - 1], b"X" + good[1:], good[:size] + b"h" * 256, b""):
        with pytest.raises(P.ProtocolError):
            handshake.decode_hello(body)
    for start in (math.nan, math.inf, -math.inf):
        bad = struct.pack("!c32s32sId", b"H", bytes(32), bytes(32), 1, start)
        with pytest.raises(P.ProtocolError, match="start time"):
            handshake.decode_hello(bad)


def test_ack_round_trip() -> None:
    answer = handshake.digest(b"key", b"nonce")
    frame = handshake.encode_ack(answer, (1 << 64) - 1, 12345)
    assert handshake.decode_ack(frame[4:]) == (answer, (1 << 64) - 1, 12345)
    assert handshake.decode_ack(bytes(payload(frame))) == (answer, (1 << 64) - 1, 12345)
    for body in (frame[4:-1], frame[4:] + b"\0", b"N" + frame[5:], b""):
        with pytest.raises(P.ProtocolError):
            handshake.decode_ack(body)


def test_digest_is_hmac_sha256_of_the_nonce() -> None:
    import hashlib
    import hmac

    key, nonce = os.urandom(32), handshake.new_nonce()
    assert handshake.digest(key, nonce) == hmac.new(key, nonce, hashlib.sha256).digest()
    assert handshake.digest(key, nonce) != handshake.digest(key + b"x", nonce)


def test_handshake_frames_fit_the_handshake_limit() -> None:
    hello = handshake.encode_hello(bytes(32), bytes(32), 1, 0.0, "h" * 1000)
    for frame in (handshake.encode_nonce(bytes(32)), hello, handshake.encode_ack(bytes(32), 1, 2)):
        (n,) = P.HEADER.unpack_from(frame)
        assert n == len(frame) - 4 <= P.MAX_HANDSHAKE


# ---------------------------------------------------------------------------- FrameReader


def _stream() -> tuple[bytes, list[bytes]]:
    """Frames of every kind, one empty, one longer than a recv."""
    frames = [
        P.encode_get(1, 2, None), P.encode_put(3, 4), P.frame(b""), P.encode_ping(5),
        P.encode_granted(6, 7, b"blob"), P.encode_call(8, 9, 10, 0, "m", (1,), {}),
        P.frame(bytes(range(256)) * 300),  # 76800 bytes
        P.encode_put(11, 12, discard=True),
    ]
    return b"".join(frames), [f[4:] for f in frames]


def _feed_all(reader: framing.FrameReader, pieces: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for piece in pieces:
        out.extend(bytes(f) for f in reader.feed(piece))  # copied before the next feed
    return out


def test_many_frames_in_one_feed() -> None:
    stream, expected = _stream()
    reader = framing.FrameReader(1 << 20)
    assert _feed_all(reader, [stream]) == expected
    assert reader.buffered == 0


def test_frames_split_at_every_byte_boundary() -> None:
    stream, expected = _stream()
    # The first frames (up to the large one), cut in two at every byte.
    n = 6
    head = stream[:sum(4 + len(body) for body in expected[:n])]
    for cut in range(len(head) + 1):
        reader = framing.FrameReader(1 << 20)
        assert _feed_all(reader, [head[:cut], head[cut:]]) == expected[:n], cut
        assert reader.buffered == 0
    # The whole stream, one byte at a time, and in pieces of every size up to 7 bytes.
    for size in range(1, 8):
        reader = framing.FrameReader(1 << 20)
        pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
        assert _feed_all(reader, pieces) == expected, size


def test_frames_split_around_every_cut_of_the_large_frame() -> None:
    stream, expected = _stream()
    for cut in [*range(0, len(stream), 997), len(stream)]:
        reader = framing.FrameReader(1 << 20)
        assert _feed_all(reader, [stream[:cut], stream[cut:]]) == expected, cut


def test_empty_feeds_change_nothing() -> None:
    reader = framing.FrameReader(100)
    assert reader.feed(b"") == []
    assert reader.feed(P.encode_ping(1)[:3]) == []
    assert reader.feed(b"") == []
    assert [bytes(f) for f in reader.feed(P.encode_ping(1)[3:])] == [P.encode_ping(1)[4:]]


def test_the_limit_is_enforced_from_the_header_alone() -> None:
    reader = framing.FrameReader(1000)
    with pytest.raises(P.ProtocolError, match="1001 bytes"):
        reader.feed(P.HEADER.pack(1001))  # no byte of the body has arrived
    reader = framing.FrameReader(1000)
    assert reader.feed(P.HEADER.pack(0xFFFFFFFF)[:2]) == []
    with pytest.raises(P.ProtocolError):
        reader.feed(P.HEADER.pack(0xFFFFFFFF)[2:])


def test_the_limit_is_enforced_after_good_frames_and_for_a_whole_frame() -> None:
    reader = framing.FrameReader(1000)
    with pytest.raises(P.ProtocolError):
        reader.feed(P.encode_ping(1) + P.HEADER.pack(1001))
    reader = framing.FrameReader(1000)
    with pytest.raises(P.ProtocolError):
        reader.feed(P.frame(bytes(1001)))  # the whole frame in one feed
    reader = framing.FrameReader(1000)
    assert [bytes(f) for f in reader.feed(P.frame(bytes(1000)))] == [bytes(1000)]


def test_handshake_limit_refuses_a_large_first_frame() -> None:
    with pytest.raises(P.ProtocolError):
        framing.FrameReader(P.MAX_HANDSHAKE).feed(P.HEADER.pack(P.MAX_HANDSHAKE + 1))


def _feed_times(size: int, piece: int = 65536) -> list[float]:
    """The time of each feed() of one frame of ``size`` bytes arriving in ``piece``-byte
    recv()s."""
    chunk = bytes(piece)
    reader = framing.FrameReader(1 << 30)
    pieces = [P.HEADER.pack(size) + chunk[:piece - 4]]
    left = size - (piece - 4)
    pieces += [chunk] * (left // piece)
    pieces.append(chunk[:left % piece])
    times, frames = [], []
    clock = time.perf_counter
    for data in pieces:
        t0 = clock()
        frames += reader.feed(data)
        times.append(clock() - t0)
    assert len(frames) == 1 and len(frames[0]) == size
    return times


def _append_times(size: int, piece: int = 65536) -> list[float]:
    """The time of each ``+=`` of a ``piece``-byte chunk to a bytearray growing to ``size``:
    the least any reader must pay per piece, page faults of the growing buffer included."""
    chunk, buf, times = bytes(piece), bytearray(), []
    clock = time.perf_counter
    for _ in range(size // piece):
        t0 = clock()
        buf += chunk
        times.append(clock() - t0)
    return times


def test_a_large_frame_in_many_pieces_costs_linear_time() -> None:
    """A 64 KiB piece of a 32 MB frame, arriving when 28 MB of it are already buffered, costs
    about what appending 64 KiB to a bytearray that large costs: a reader that copied its
    buffer on each piece (quadratic in the frame) would pay for copying 28 MB, hundreds of
    times more. Medians of the last 64 pieces, so that a stray preemption or a reallocation
    of the buffer does not count, and the same growth (page faults included) on both sides."""
    late = statistics.median(_feed_times(32 << 20)[-65:-1])  # not the completing feed
    floor = statistics.median(_append_times(32 << 20)[-64:])
    assert late < 10 * floor + 100e-6, (late, floor)


# ------------------------------------------------------------- RequestReader, ReplyReader


def _decoded_requests(pieces: list[bytes]) -> list[Any]:
    """What the supervisor's reader hands over for ``pieces``, a payload copied to bytes."""
    reader = framing.RequestReader(1 << 20)
    out: list[Any] = []
    for piece in pieces:
        out.extend(m if type(m) is tuple else bytes(m) for m in reader.feed(piece))
    assert reader.buffered == 0
    return out


def _as_request(item: Any) -> P.Request:
    """A RequestReader item as the message it stands for (how the lease loop reads it)."""
    if type(item) is tuple:
        if item[0] == P.KIND_GET:
            return P.Get(item[1], item[2], None if item[3] == P.POOL_TIMEOUT else item[3])
        return P.Put(item[1], item[2], item[0] == P.KIND_DISCARD)
    return P.decode_request(item)


def test_request_reader_decodes_gets_and_puts_as_decode_request_does() -> None:
    frames = [P.encode_get(1, 2, None), P.encode_get(3, 4, 0.0), P.encode_get(5, 6, 2.5),
              P.encode_put(7, 8), P.encode_put(9, 10, discard=True), P.encode_ping(11),
              P.encode_call(12, 1, 13, 0, "m", None, {})]
    expected = [P.decode_request(f[4:]) for f in frames]
    stream = b"".join(frames)
    for size in (1, 3, 7, len(stream)):
        items = _decoded_requests([stream[i:i + size] for i in range(0, len(stream), size)])
        assert [_as_request(m) for m in items] == expected, size
        assert [type(m) is tuple for m in items] == [True] * 5 + [False] * 2, size
    for frame, want in zip(frames, expected, strict=True):  # one whole frame per feed
        assert [_as_request(m) for m in _decoded_requests([frame])] == [want]


@pytest.mark.parametrize("body", [
    struct.pack("!BIId", P.KIND_GET, 0, 1, 1.0),  # request id 0
    struct.pack("!BIId", P.KIND_GET, 1, 1, math.nan),
    struct.pack("!BIId", P.KIND_GET, 1, 1, -2.0),
    struct.pack("!BIId", P.KIND_GET, 1, 1, 1.0) + b"x",  # too long
    struct.pack("!BIQ", P.KIND_PUT, 1, 2)[:-1],  # too short
    b"H" + bytes(80),  # a hello is never decoded
])
def test_request_reader_hands_a_malformed_get_or_put_over_as_it_came(body: bytes) -> None:
    """Not decoded: decode_request refuses it in its turn, after the frames before it."""
    for pieces in ([P.frame(body)], [P.encode_ping(1) + P.frame(body)]):
        items = _decoded_requests(pieces)
        assert items[-1] == body
        if body[0] != ord("H"):
            with pytest.raises(P.ProtocolError):
                P.decode_request(items[-1])


def test_reply_reader_decodes_grants_as_decode_reply_does() -> None:
    frames = [P.encode_granted(1, 2, b"blob"), P.encode_granted(3, 4, bytes(5000)),
              P.encode_reply(5, P.OK, 6), P.encode_granted_proxy(7, 8),
              P.encode_granted(9, 10, b"")]
    expected = [P.decode_reply(f[4:]) for f in frames]
    stream = b"".join(frames)
    for size in (1, 5, 4096, len(stream)):
        reader = framing.ReplyReader(1 << 20)
        got = []
        for i in range(0, len(stream), size):
            for item in reader.feed(stream[i:i + size]):
                rep = item if type(item) is P.Granted else P.decode_reply(item)
                if type(rep) is P.Granted and rep.blob is not None:
                    rep = P.Granted(rep.rid, rep.lease, bytes(rep.blob))
                got.append(rep)
        assert got == expected, size
    for frame, want in zip(frames, expected, strict=True):  # one whole frame per feed
        (item,) = framing.ReplyReader(1 << 20).feed(frame)
        rep = item if type(item) is P.Granted else P.decode_reply(item)
        if type(rep) is P.Granted and rep.blob is not None:
            rep = P.Granted(rep.rid, rep.lease, bytes(rep.blob))
        assert rep == want
