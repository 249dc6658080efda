"""The lease channel's readers, attacked: framing.RequestReader (the supervisor's, which
decodes gets and puts inline as it cuts them) and framing.ReplyReader (a client's, which
decodes grants inline).

The readers alone: any stream cut at any byte boundary yields what it yields in one piece,
and what the inline decoding accepts is exactly what ``decode_request`` accepts. Then a real
supervisor (small ``max_message`` so that the limits are cheap to reach) and raw hostile
connections (tests/helpers.py ``RawLease``): after each attack the supervisor serves the
canary (an ordinary client) at once, every unit is accounted for, the canary's own lease is
still its own, and the hostile connection is closed, or not, as the protocol says. Last, a
fake supervisor that knows the key sends garbage to a real ``Channel``: the caller gets an
error within its timeout, never a hang.
"""

from __future__ import annotations

import math
import pickle
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import RawLease, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

import mppool
from mppool import framing, handshake
from mppool import protocol as P
from mppool.channel import Channel

_GET = struct.Struct("!BIId")
_PUT = struct.Struct("!BIQ")
MAX_MESSAGE = 1 << 20
DEADLINE = 2.0  # what any one step of the canary may take, seconds
TOKENS, OBJS, ONE = "ar-tokens", "ar-objs", "ar-one"
SIZES = {TOKENS: 2, OBJS: 2, ONE: 1}


def _frame(payload: bytes) -> bytes:
    return P.HEADER.pack(len(payload)) + payload


def _get(rid: int, pool_id: int, timeout: float) -> bytes:
    return _frame(_GET.pack(P.KIND_GET, rid, pool_id, timeout))


def _put(pool_id: int, lease: int, kind: bytes = b"P") -> bytes:
    return _frame(_PUT.pack(kind[0], pool_id, lease))


def _make_obj(i: int) -> dict[str, Any]:
    return {"n": i}


# ------------------------------------------------------------------------ the readers alone


def _normal(frames: list[Any]) -> list[Any]:
    """Frames as comparable values (a payload may be bytes or a view)."""
    return [f if type(f) is tuple or (isinstance(f, P.Granted) and f.blob is None)
            else (f.rid, f.lease, bytes(f.blob)) if isinstance(f, P.Granted) else bytes(f)
            for f in frames]


def _feed_in_pieces(reader: framing.FrameReader, stream: bytes, cuts: list[int]) -> list[Any]:
    out: list[Any] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out += reader.feed(stream[last:cut])
        last = cut
    return _normal(out)


REQUESTS = [
    _get(7, 3, 0.5), _put(3, 1 << 62), _put(3, (1 << 64) - 1, b"D"),
    P.encode_ping(9), _get(8, 3, P.POOL_TIMEOUT), _get(0xFFFFFFFF, 0xFFFFFFFF, 1e9),
    # Malformed gets and puts: these come out as payloads, for decode_request to refuse.
    _frame(_GET.pack(P.KIND_GET, 0, 3, 1.0)), _frame(_GET.pack(P.KIND_GET, 5, 3, math.nan)),
    _frame(_GET.pack(P.KIND_GET, 5, 3, -0.5)), _frame(_GET.pack(P.KIND_GET, 5, 3, math.inf)),
    _frame(_GET.pack(P.KIND_GET, 5, 3, 1e9 + 1)),
    _frame(_GET.pack(P.KIND_GET, 5, 3, 1.0)[:-1]), _frame(_GET.pack(P.KIND_GET, 5, 3, 1.0) + b"\0"),
    _frame(_PUT.pack(P.KIND_PUT, 3, 1)[:-1]), _frame(_PUT.pack(P.KIND_PUT, 3, 1) + b"\0"),
    _frame(b""), _frame(b"G"), _frame(b"P" * 5000), P.encode_fastpoke(3),
]
STREAM = b"".join(REQUESTS)


def test_request_reader_gives_the_same_frames_however_the_stream_is_cut() -> None:
    whole = _feed_in_pieces(framing.RequestReader(1 << 20), STREAM, [])
    assert len(whole) == len(REQUESTS)
    assert [type(f) is tuple for f in whole] == [True] * 3 + [False] + [True] * 2 + [False] * 13
    for cut in range(1, len(STREAM)):
        assert _feed_in_pieces(framing.RequestReader(1 << 20), STREAM, [cut]) == whole, cut
    # Byte by byte, and in pieces of 2, 3, ... 64 bytes.
    for step in range(1, 65):
        cuts = list(range(step, len(STREAM), step))
        assert _feed_in_pieces(framing.RequestReader(1 << 20), STREAM, cuts) == whole, step


def test_request_reader_refuses_a_header_over_its_limit_before_the_body() -> None:
    r = framing.RequestReader(4096)
    assert r.feed(P.HEADER.pack(4096)) == []  # at the limit: waits for its body
    assert r.feed(b"\x80" * 4095) == []
    assert _normal(r.feed(b"\x80")) == [b"\x80" * 4096]
    with pytest.raises(P.ProtocolError, match="4097 bytes is over the limit"):
        r.feed(P.HEADER.pack(4097))  # nothing of the body sent yet
    r = framing.RequestReader(4096)
    with pytest.raises(P.ProtocolError):  # behind a valid get, in the same recv
        r.feed(_get(1, 1, 0.0) + P.HEADER.pack(0xFFFFFFFF))
    r = framing.RequestReader(4096)
    assert r.feed(_get(1, 1, 0.0)[:10]) == []
    with pytest.raises(P.ProtocolError):  # the rest of a frame, then a header over the limit
        r.feed(_get(1, 1, 0.0)[10:] + P.HEADER.pack(1 << 31))


@settings(max_examples=400, deadline=None, database=None)
@given(kind=st.sampled_from(b"GPDKk\x80\x00"), body=st.binary(max_size=24),
       rid=st.integers(0, 0xFFFFFFFF), timeout=st.floats(allow_nan=True, allow_infinity=True) |
       st.sampled_from([-1.0, -0.0, 0.0, 1e9, 1e9 + 1, -1e-300, 5e-324]),
       shape=st.sampled_from(["get", "put", "raw"]))
def test_inline_decoding_accepts_exactly_what_decode_request_accepts(
        kind: int, body: bytes, rid: int, timeout: float, shape: str) -> None:
    if shape == "get":
        payload = _GET.pack(P.KIND_GET, rid, 3, timeout)
    elif shape == "put":
        payload = bytes([kind]) + body[:12].ljust(12, b"\0")
    else:
        payload = bytes([kind]) + body
    (out,) = framing.RequestReader(1 << 20).feed(_frame(payload))
    try:
        decoded: Any = P.decode_request(payload)
    except P.ProtocolError:
        decoded = None
    if type(out) is tuple:
        # What the lease loop does with the tuple is what it would do with the message.
        if out[0] == P.KIND_GET:
            assert decoded == P.Get(out[1], out[2], None if out[3] == P.POOL_TIMEOUT else out[3])
        else:
            assert decoded == P.Put(out[1], out[2], out[0] == P.KIND_DISCARD)
    else:
        assert bytes(out) == payload
        assert not isinstance(decoded, (P.Get, P.Put)), decoded


REPLIES = [P.encode_granted(1, 2, b"blob"), P.encode_granted(0xFFFFFFFF, (1 << 64) - 1, b""),
           P.encode_reply(3, P.OK, 5), _frame(b"O" * 12), _frame(b"O" * 13), _frame(b""),
           P.encode_granted(4, 5, b"x" * 5000), _frame(b"\xff garbage")]
REPLY_STREAM = b"".join(REPLIES)


def test_reply_reader_gives_the_same_frames_however_the_stream_is_cut() -> None:
    whole = _feed_in_pieces(framing.ReplyReader(1 << 20), REPLY_STREAM, [])
    assert whole[:2] == [(1, 2, b"blob"), (0xFFFFFFFF, (1 << 64) - 1, b"")]
    assert len(whole) == len(REPLIES)
    for cut in range(1, len(REPLY_STREAM)):
        assert _feed_in_pieces(framing.ReplyReader(1 << 20), REPLY_STREAM, [cut]) == whole, cut
    for step in (1, 2, 3, 7, 13, 64):
        cuts = list(range(step, len(REPLY_STREAM), step))
        assert _feed_in_pieces(framing.ReplyReader(1 << 20), REPLY_STREAM, cuts) == whole, step
    with pytest.raises(P.ProtocolError):  # one whole frame over the limit, the fast path's case
        framing.ReplyReader(8).feed(_frame(b"O" * 9))


# ------------------------------------------------------------------------ a real supervisor


@dataclass
class World:
    server: mppool.Server
    client: Any
    pools: dict[str, Any]
    ids: dict[str, int]
    held_one: Any
    held_one_lease: int
    canary_conn: int
    baseline_conns: int


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    srv = mppool.Server(max_message=MAX_MESSAGE).start()
    c = None
    try:
        c = mppool.connect(srv.address, srv.authkey)
        pools = {TOKENS: c.token_pool(TOKENS, SIZES[TOKENS], fast=False),
                 OBJS: c.pool(OBJS, _make_obj, max_size=SIZES[OBJS]),
                 ONE: c.token_pool(ONE, SIZES[ONE], fast=False)}
        # Every unit made now: a get is then served on the loop at once, never by a create
        # on the pool's threads (which a connection closed meanwhile never sees answered).
        for name in (TOKENS, OBJS):
            made = [pools[name].get(timeout=5) for _ in range(SIZES[name])]
            for obj in made:
                pools[name].ret(obj)
        one = pools[ONE].get(timeout=5)
        (lease,) = [u["lease"] for u in c.stats()[ONE]["using"]]
        yield World(srv, c, pools, {n: p._mp_route()[1] for n, p in pools.items()}, one, lease,
                    c._channel().conn_id, c.info()["connections"])
    finally:
        if c is not None:
            c.close()
        srv.shutdown()


def healthy(w: World) -> None:
    """Every hostile connection gone with what it held; the canary served at once; the
    books balance; the canary's unit of ONE still its own."""
    wait_until(lambda: w.client.info()["connections"] == w.baseline_conns, timeout=5,
               what="the hostile connections to be closed")

    def settled() -> bool:
        stats = w.client.stats()
        return all([u["holder"]["conn"] for u in stats[n]["using"]]
                   == [w.canary_conn] * (n == ONE) and stats[n]["nwaiting"] == 0
                   and stats[n]["ncreating"] == 0 for n in SIZES)

    wait_until(settled, timeout=5, what="only the canary's lease left")
    for name in (TOKENS, OBJS):
        pool = w.pools[name]
        t0 = time.monotonic()
        got = [pool.get(timeout=DEADLINE) for _ in range(SIZES[name])]
        for obj in got:
            pool.ret(obj)
        assert time.monotonic() - t0 < DEADLINE, name
    w.client._channel().sync(time.monotonic() + DEADLINE)
    stats = w.client.stats()
    for name, size in SIZES.items():
        s = stats[name]
        assert s["nusing"] + w.pools[name].free() == size, (name, s)
    assert [u["lease"] for u in stats[ONE]["using"]] == [w.held_one_lease]
    t0 = time.monotonic()
    with pytest.raises(mppool.TimeOut):  # the supervisor's timers still fire
        w.pools[ONE].get(timeout=0.02)
    assert time.monotonic() - t0 < 0.5


def closed_soon(raw: RawLease) -> bool:
    return raw.closed_by_peer(timeout=DEADLINE)


def test_gets_and_puts_split_at_every_byte_with_pauses(world: World) -> None:
    w = world
    raw = RawLease(w.client)
    try:
        pid = w.ids[TOKENS]
        for cut in range(1, len(_get(1, pid, 1.0))):
            rid = next(raw.rids)
            frame = _get(rid, pid, 1.0)
            raw.send(frame[:cut])
            time.sleep(0.002)  # most often a recv of its own (the result does not depend on it)
            raw.send(frame[cut:])
            granted = raw.reply(timeout=DEADLINE)
            assert isinstance(granted, P.Granted) and granted.rid == rid, granted
            put = _put(pid, granted.lease)
            raw.send(put[:cut % len(put) or 1])
            time.sleep(0.002)
            raw.send(put[cut % len(put) or 1:])
        rid = next(raw.rids)
        raw.send(P.encode_ping(rid))
        assert raw.reply(timeout=DEADLINE).rid == rid
        assert w.client.stats()[TOKENS]["nusing"] == 0
    finally:
        raw.close()
    healthy(w)


def test_many_gets_and_puts_in_one_send(world: World) -> None:
    w = world
    raw = RawLease(w.client)
    try:
        pid, n = w.ids[TOKENS], 300
        raw.send(b"".join(_get(rid, pid, 0.0) for rid in range(1, n + 1)))
        replies = [raw.reply(timeout=DEADLINE) for _ in range(n)]
        granted = [r for r in replies if isinstance(r, P.Granted)]
        assert len(granted) == SIZES[TOKENS] and sorted(r.rid for r in replies) == \
            list(range(1, n + 1))
        # Both returned twice, and a ping, in one send: the second puts are refused.
        raw.send(b"".join(_put(pid, g.lease) for g in granted * 2) + P.encode_ping(n + 1))
        assert raw.reply(timeout=DEADLINE).rid == n + 1
        assert w.client.stats()[TOKENS]["nusing"] == 0
    finally:
        raw.close()
    healthy(w)


@pytest.mark.parametrize("bad", [
    pytest.param(_frame(_GET.pack(P.KIND_GET, 1, 1, 1.0)[:-1]), id="get-short"),
    pytest.param(_frame(_GET.pack(P.KIND_GET, 1, 1, 1.0) + b"\0"), id="get-long"),
    pytest.param(_frame(b"G" * (MAX_MESSAGE // 2)), id="get-huge"),
    pytest.param(_frame(_PUT.pack(P.KIND_PUT, 1, 1)[:-1]), id="put-short"),
    pytest.param(_frame(_PUT.pack(P.KIND_DISCARD, 1, 1) + b"\0" * 4), id="discard-long"),
    pytest.param(_frame(b"P" * (MAX_MESSAGE // 2)), id="put-huge"),
    pytest.param(_frame(b"G"), id="get-kind-only"),
    pytest.param(_frame(b""), id="empty"),
    pytest.param(_frame(_GET.pack(P.KIND_GET, 0, 1, 1.0)), id="get-rid-0"),
    *[pytest.param(_frame(_GET.pack(P.KIND_GET, 1, 1, t)), id=f"get-timeout-{t!r}")
      for t in (math.nan, -math.nan, math.inf, -math.inf, -0.5, -2.0, 1e9 + 1, 1e308)],
    pytest.param(P.encode_call(1, 1, -1, 0, "x", (), {}), id="call-lease-negative"),
    pytest.param(P.encode_call(1, 1, 1 << 64, 0, "x", (), {}), id="call-lease-2**64"),
    pytest.param(P.encode_dropref(-1), id="dropref-negative"),
    pytest.param(P.HEADER.pack(MAX_MESSAGE + 1), id="header-over-the-limit"),
    pytest.param(P.HEADER.pack(0xFFFFFFFF), id="header-4GiB"),
])
def test_a_malformed_frame_closes_that_connection_and_gives_back_what_it_held(
        world: World, bad: bytes) -> None:
    w = world
    raw = RawLease(w.client)
    try:
        pid = w.ids[OBJS]
        granted = raw.get(pid, timeout=DEADLINE)  # something to give back when it is cut off
        assert isinstance(granted, P.Granted), granted
        rid = next(raw.rids)
        raw.send(_get(rid, w.ids[TOKENS], 0.0) + bad)
        if len(bad) > P.HEADER_SIZE:
            # A well-cut frame that does not decode: the get before it is served first.
            reply = raw.reply(timeout=DEADLINE)
            assert isinstance(reply, P.Granted) and reply.rid == rid, reply
        # (A header over the limit fails the cutting of the whole recv: nothing of it is
        # served, and the connection is closed with all it holds, that get's unit included.)
        assert closed_soon(raw), "the supervisor kept a connection that broke the protocol"
    finally:
        raw.close()
    healthy(w)


@pytest.mark.parametrize("first", [
    pytest.param(lambda pid: _get(1, pid, 0.0), id="get"),
    pytest.param(lambda pid: _put(pid, 1), id="put"),
    pytest.param(lambda pid: _put(pid, 1, b"D"), id="discard"),
])
def test_a_get_or_put_before_the_key_is_proved_is_refused(world: World, first: Any) -> None:
    """The reader decodes a well-formed get or put before the handshake too: taken for the
    hello, it is refused like any other frame that is not one, and nothing is served."""
    w = world
    raw = RawLease(w.client, handshake=False)
    try:
        from mppool.channel import _recv_frame

        handshake.decode_nonce(_recv_frame(raw.sock))
        raw.send(first(w.ids[TOKENS]) + _get(2, w.ids[TOKENS], 0.0))
        raw.sock.settimeout(DEADLINE)
        try:
            data = raw.sock.recv(65536)
        except ConnectionResetError:  # closed with some of what we sent unread: also refused
            data = b""
        assert data == b"", "a peer without the key got an answer"
    finally:
        raw.close()
    healthy(w)


def test_a_get_sent_with_the_hello_is_served_after_the_ack(world: World) -> None:
    w = world
    raw = RawLease(w.client, handshake=False)
    try:
        from mppool.channel import _recv_frame

        nonce = handshake.decode_nonce(_recv_frame(raw.sock))
        hello = handshake.encode_hello(handshake.digest(w.server.authkey, nonce),
                                       handshake.new_nonce(), 1, 0.0, "x")
        raw.send(hello + _get(1, w.ids[TOKENS], 0.0))
        handshake.decode_ack(_recv_frame(raw.sock))
        granted = raw.reply(timeout=DEADLINE)
        assert isinstance(granted, P.Granted) and granted.rid == 1, granted
    finally:
        raw.close()
    healthy(w)


def test_frames_at_the_limit_are_served(world: World) -> None:
    w = world
    raw = RawLease(w.client)
    try:
        rid = next(raw.rids)
        # A request of exactly max_message bytes: a call on a lease nobody holds (refused
        # after decoding, which proves it was read and decoded whole).
        pad = MAX_MESSAGE
        for _ in range(5):  # pickle's framing adds a few bytes to a large string
            frame = P.encode_call(rid, w.ids[OBJS], 1, 0, "x", ("y" * pad,), {})
            pad -= len(frame) - P.HEADER_SIZE - MAX_MESSAGE
        assert len(frame) == P.HEADER_SIZE + MAX_MESSAGE
        raw.send(frame)
        reply = raw.reply(timeout=DEADLINE)
        assert reply.rid == rid and reply.status == P.ERR, reply
        assert isinstance(reply.value.unpack(), mppool.PoolClosed)
    finally:
        raw.close()
    healthy(w)


@pytest.mark.parametrize("timeout", [0.0, -0.0, P.POOL_TIMEOUT, 1e-3, 1e9])
def test_timeouts_in_range_are_served(world: World, timeout: float) -> None:
    w = world
    raw = RawLease(w.client)
    try:
        rid = next(raw.rids)
        raw.send(_get(rid, w.ids[ONE], timeout))  # the canary holds the only unit
        if timeout in (0.0, 1e-3):
            reply = raw.reply(timeout=DEADLINE)
            assert reply.status == P.ERR and isinstance(reply.value.unpack(), mppool.TimeOut)
        else:  # queued: the supervisor keeps the deadline, the canary's timers still fire
            wait_until(lambda: w.client.stats()[ONE]["nwaiting"] == 1, timeout=DEADLINE)
            t0 = time.monotonic()
            with pytest.raises(mppool.TimeOut):
                w.pools[ONE].get(timeout=0.02)
            assert time.monotonic() - t0 < 0.5
        rid = next(raw.rids)
        raw.send(P.encode_ping(rid))
        assert raw.reply(timeout=DEADLINE).rid == rid  # still open
    finally:
        raw.close()
    healthy(w)


@pytest.mark.parametrize("lease", [0, 1, 1 << 63, (1 << 64) - 1, "canary"])
@pytest.mark.parametrize("kind", [b"P", b"D"])
def test_puts_of_leases_not_its_own_change_nothing(world: World, lease: Any,
                                                   kind: bytes) -> None:
    w = world
    raw = RawLease(w.client)
    try:
        lease = w.held_one_lease if lease == "canary" else lease
        raw.send(b"".join(_put(pid, lease, kind) for pid in [*w.ids.values(), 0, 0xFFFFFFFF]))
        rid = next(raw.rids)
        raw.send(P.encode_ping(rid))  # answered once the puts have taken effect
        assert raw.reply(timeout=DEADLINE).rid == rid  # refused, not cut off
    finally:
        raw.close()
    healthy(w)


class _Gated:
    """A pool's ``fun`` that hangs until the file ``gate`` exists (10 s at most)."""

    def __init__(self, gate: str) -> None:
        self.gate = gate

    def __call__(self, i: int) -> dict[str, int]:
        deadline = time.monotonic() + 10
        while not Path(self.gate).exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        return {"n": i}


def test_discards_of_leases_not_its_own_are_refused_on_the_loop(world: World,
                                                                 tmp_path: Path) -> None:
    """A discard of a lease that is not the sender's is refused at once, on the loop, not
    handed to the pool's threads: a flood of them cost a thread hand-off each (100 000 took
    2.4 s and stalled other clients up to 0.5 s, against 0.2 s), and queued behind that
    pool's user code, however stuck."""
    from mppool.supervisor.registry import POOL_THREADS

    w = world
    gate = tmp_path / "gate"
    stuck = w.client.pool("ar-stuck", _Gated(str(gate)), min_size=0, max_size=POOL_THREADS)
    pid = stuck._mp_route()[1]
    creating, raw = RawLease(w.client), RawLease(w.client)
    try:
        for rid in range(1, POOL_THREADS + 1):  # every thread of the pool stuck in its fun
            creating.send(_get(rid, pid, 5.0))
        wait_until(lambda: w.client.stats()["ar-stuck"]["ncreating"] == POOL_THREADS,
                   timeout=DEADLINE, what="the pool's threads all busy")
        raw.send(b"".join(_put(pid, lease, b"D") for lease in range(1, 1001)))
        rid = next(raw.rids)
        raw.send(P.encode_ping(rid))  # answered once every discard has taken effect
        assert raw.reply(timeout=DEADLINE).rid == rid
    finally:
        gate.touch()
        creating.close()
        raw.close()
    wait_until(lambda: w.client.stats()["ar-stuck"]["nusing"] == 0, timeout=DEADLINE)
    stuck.shutdown()
    healthy(w)


def test_garbage_after_valid_puts_in_one_send(world: World) -> None:
    """The valid frames before the garbage take effect; then the connection is cut."""
    w = world
    raw = RawLease(w.client)
    try:
        pid = w.ids[OBJS]
        granted = [raw.get(pid, timeout=DEADLINE) for _ in range(SIZES[OBJS])]
        raw.send(_put(pid, granted[0].lease) + _frame(b"\x01 no such kind")
                 + _put(pid, granted[1].lease))
        assert closed_soon(raw)
    finally:
        raw.close()
    healthy(w)


def test_a_client_that_never_reads_hurts_nobody(world: World) -> None:
    """A client pipelines gets whose replies it never reads (its socket's buffers fill up):
    the loop keeps serving everybody else at once, it holds what it was granted until it is
    cut off or leaves, and then all of it comes back."""
    w = world
    raw = RawLease(w.client)
    try:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        pid = w.ids[OBJS]
        for _ in range(20):  # 20 000 gets: far more replies than its buffers take
            raw.send(b"".join(_get(next(raw.rids), pid, 0.0) for _ in range(1000)))
        wait_until(lambda: w.client.stats()[OBJS]["nusing"] == SIZES[OBJS], timeout=DEADLINE)
        for _ in range(5):
            t0 = time.monotonic()
            tok = w.pools[TOKENS].get(timeout=DEADLINE)
            w.pools[TOKENS].ret(tok)
            assert w.pools[TOKENS].waiting() == 0
            assert time.monotonic() - t0 < 0.5
        with pytest.raises(mppool.TimeOut):
            w.pools[OBJS].get(timeout=0.05)  # both held by the one that does not read
    finally:
        raw.close()
    healthy(w)


# ------------------------------------------------------------------------ a fake supervisor


class FakeSupervisor:
    """Does the real handshake with the key, then sends what a test gives it."""

    def __init__(self, path: Path, authkey: bytes) -> None:
        self.path, self.authkey = str(path), authkey
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(self.path)
        self.lsock.listen(1)
        self.lsock.settimeout(5)
        self.script: bytes = b""
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        from mppool.channel import _recv_frame

        try:
            conn, _ = self.lsock.accept()
        except OSError:
            return
        self.conn = conn
        conn.settimeout(5)
        try:
            nonce = handshake.new_nonce()
            conn.sendall(handshake.encode_nonce(nonce))
            answer, client_nonce, *_ = handshake.decode_hello(_recv_frame(conn))
            assert answer == handshake.digest(self.authkey, nonce)
            conn.sendall(handshake.encode_ack(handshake.digest(self.authkey, client_nonce), 1, 1))
            conn.recv(65536)  # the client's first request, whatever it is
            conn.sendall(self.script)
            conn.recv(65536)  # stay open: the client must not need an EOF to give up
        except OSError:
            pass

    def close(self) -> None:
        self.lsock.close()
        if self.conn is not None:
            self.conn.close()
        self.thread.join(5)


GARBAGE_REPLIES = [
    pytest.param(_frame(b"\x80garbage"), id="unreadable-pickle"),
    pytest.param(_frame(b""), id="empty-frame"),
    pytest.param(_frame(b"O" * 5), id="short-grant"),
    pytest.param(_frame(pickle.dumps((1, 2), protocol=5)), id="reply-of-two-fields"),
    pytest.param(_frame(pickle.dumps(([1], P.OK, None), protocol=5)), id="unhashable-rid"),
    pytest.param(P.HEADER.pack(0xFFFFFFFF) + b"x" * 100, id="header-over-the-limit"),
    pytest.param(P.HEADER.pack(1000) + b"x" * 10, id="frame-never-finished"),
    pytest.param(b"\x00\x00", id="header-never-finished"),
    pytest.param(P.encode_granted(999, 5, b"blob"), id="grant-for-nobody"),
]


@pytest.mark.parametrize("script", GARBAGE_REPLIES)
def test_the_client_refuses_garbage_from_a_supervisor_within_its_timeout(
        sockdir: Path, script: bytes) -> None:
    key = b"k" * 32
    fake = FakeSupervisor(sockdir / "fake.sock", key)
    try:
        chan = Channel(fake.path, key, timeout=2.0)
        fake.script = script
        rid = chan.next_rid()
        t0 = time.monotonic()
        with pytest.raises((mppool.ServerUnavailable, mppool.TimeOut)):
            chan.request(rid, P.encode_ping(rid), deadline=time.monotonic() + 1.0)
        assert time.monotonic() - t0 < 1.5
        chan.close()
    finally:
        fake.close()
