"""The blocking client end of the lease channel (``mppool.channel.Channel``), against a fake
supervisor: a thread of the test serving an abstract unix socket with ``mppool.protocol``.

The fake does the real handshake, then hands every request it reads to the test, which
answers, withholds the answer, or closes the connection, as the case needs.
"""

from __future__ import annotations

import hmac
import pickle
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mppool import ServerUnavailable, TimeOut, framing, handshake
from mppool import protocol as P
from mppool.channel import READ_SLICE, Channel

try:
    from helpers import Runner, wait_until
except ImportError:  # tests/ became a package
    from tests.helpers import Runner, wait_until

KEY = b"unit-test-key-" + bytes(18)


class FakeSupervisor:
    """One lease connection, served in a thread: the handshake, then requests queued for the
    test (``read=False``: nothing is ever read after the handshake)."""

    def __init__(self, read: bool = True, key: bytes = KEY, conn_id: int = 7,
                 greeting: bytes | None = None) -> None:
        self.address = f"\0mppool-unit-{uuid.uuid4().hex}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.address)
        self.listener.listen(1)
        self.read, self.key, self.conn_id, self.greeting = read, key, conn_id, greeting
        self.requests: queue.Queue[P.Request] = queue.Queue()
        self.conn: socket.socket | None = None
        self.hello: tuple[bytes, bytes, int, float, str] | None = None
        self.error: BaseException | None = None
        self.eof = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="fake-supervisor", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.listener.settimeout(10)
            conn, _ = self.listener.accept()
            self.conn = conn
            conn.settimeout(10)
            if self.greeting == b"":  # closed before a word is said
                conn.close()
                return
            nonce = handshake.new_nonce()
            conn.sendall(self.greeting if self.greeting is not None else handshake.encode_nonce(nonce))
            reader = framing.FrameReader(P.MAX_HANDSHAKE)
            frames: list[Any] = []
            while not frames:
                data = conn.recv(4096)
                if not data:
                    return  # the client gave up on the handshake
                frames = reader.feed(data)
            self.hello = handshake.decode_hello(frames[0])
            answer, client_nonce = self.hello[0], self.hello[1]
            assert hmac.compare_digest(answer, handshake.digest(KEY, nonce)), "wrong answer"
            conn.sendall(handshake.encode_ack(handshake.digest(self.key, client_nonce), self.conn_id, 7))
            if not self.read:
                return
            conn.settimeout(None)
            reader = framing.FrameReader(1 << 26)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                for frame in reader.feed(data):
                    self.requests.put(P.decode_request(frame))
            self.eof.set()
        except OSError:
            pass  # closed by the test
        except BaseException as exc:  # reported by close()
            self.error = exc

    def next_request(self, timeout: float = 5.0) -> P.Request:
        return self.requests.get(timeout=timeout)

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(data)

    def close(self) -> None:
        """Close the connection (the client sees EOF)."""
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()

    def stop(self) -> None:
        self.close()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeSupervisor]]:
    made: list[FakeSupervisor] = []

    def make(**kw: Any) -> FakeSupervisor:
        fake = FakeSupervisor(**kw)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.stop()


@pytest.fixture
def channels() -> Iterator[Callable[..., Channel]]:
    made: list[Channel] = []

    def make(fake: FakeSupervisor, timeout: float = 5.0, key: bytes = KEY) -> Channel:
        chan = Channel(fake.address, key, timeout)
        made.append(chan)
        return chan

    yield make
    for chan in made:
        chan.close()


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.join_all(10)


def ping(chan: Channel, deadline: float | None = None,
         on_late: Callable[[Any], None] | None = None) -> tuple[int, Any]:
    rid = chan.next_rid()
    return rid, chan.request(rid, P.encode_ping(rid), deadline, on_late)


# ---------------------------------------------------------------------------- handshake


def test_handshake_sends_this_process_and_keeps_the_connection_id(
        fakes: Callable[..., FakeSupervisor], channels: Callable[..., Channel]) -> None:
    import os

    from mppool.holder import current_holder

    fake = fakes(conn_id=1234)
    chan = channels(fake)
    assert chan.conn_id == 1234 and chan.broken is None
    h = current_holder()
    assert fake.hello is not None and fake.hello[2:] == (os.getpid(), h.start, h.host)


def test_a_supervisor_that_does_not_know_the_key_is_refused(
        fakes: Callable[..., FakeSupervisor]) -> None:
    fake = fakes(key=b"another key")
    with pytest.raises(ServerUnavailable, match="does not know the key"):
        Channel(fake.address, KEY, 5.0)


@pytest.mark.parametrize("greeting", [
    P.HEADER.pack(P.MAX_HANDSHAKE + 1),  # an oversized frame is refused from its header
    P.frame(b"X" + bytes(32)),
    b"",  # closed at once
])
def test_a_bad_greeting_is_refused(fakes: Callable[..., FakeSupervisor], greeting: bytes) -> None:
    fake = fakes(greeting=greeting)
    with pytest.raises(ServerUnavailable, match="cannot open the lease channel"):
        Channel(fake.address, KEY, 5.0)


def test_nothing_listening_is_server_unavailable() -> None:
    with pytest.raises(ServerUnavailable):
        Channel(f"\0mppool-unit-nobody-{uuid.uuid4().hex}", KEY, 1.0)


# ---------------------------------------------------------------------------- replies


def test_a_reply_goes_to_its_request(fakes: Callable[..., FakeSupervisor],
                                     channels: Callable[..., Channel],
                                     runner: Runner) -> None:
    fake = fakes()
    chan = channels(fake)
    box = runner.start(lambda: ping(chan, time.monotonic() + 5))
    msg = fake.next_request()
    assert isinstance(msg, P.Ping)
    fake.send(P.encode_reply(msg.rid, P.OK, 4242))
    wait_until(lambda: box["done"])
    rid, reply = box["result"]
    assert rid == msg.rid and reply == P.Reply(rid, P.OK, 4242)


def test_a_grant_carries_its_blob(fakes: Callable[..., FakeSupervisor],
                                  channels: Callable[..., Channel], runner: Runner) -> None:
    fake = fakes()
    chan = channels(fake)
    rid = chan.next_rid()
    box = runner.start(lambda: chan.request(rid, P.encode_get(rid, 3, 1.5)))
    assert fake.next_request() == P.Get(rid, 3, 1.5)
    blob = pickle.dumps({"conn": 1}, protocol=5)
    fake.send(P.encode_granted(rid, 99, blob))
    wait_until(lambda: box["done"])
    reply = box["result"]
    assert isinstance(reply, P.Granted) and (reply.rid, reply.lease) == (rid, 99)
    assert pickle.loads(reply.blob) == {"conn": 1}


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "in-one-send"])
def test_concurrent_requests_get_their_own_replies(fakes: Callable[..., FakeSupervisor],
                                                   channels: Callable[..., Channel],
                                                   runner: Runner, together: bool) -> None:
    """Several threads wait at once: whoever reads hands every other reply over, then the
    reading to one still waiting (leader/follower), whatever order the replies come in."""
    fake = fakes()
    chan = channels(fake)
    n = 6
    for _ in range(15):
        boxes = [runner.start(lambda: ping(chan, time.monotonic() + 10)) for _ in range(n)]
        rids = [fake.next_request().rid for _ in range(n)]  # type: ignore[union-attr]
        assert sorted(rids) == sorted(set(rids))
        replies = [P.encode_reply(rid, P.OK, rid * 1000) for rid in reversed(rids)]
        if together:
            fake.send(b"".join(replies))
        else:
            for data in replies:
                fake.send(data)
        runner.join_all(10)
        for box in boxes:
            assert "error" not in box, box["error"]
            rid, reply = box["result"]
            assert reply == P.Reply(rid, P.OK, rid * 1000)
    assert chan.broken is None


def test_a_reader_hands_over_while_others_keep_waiting(fakes: Callable[..., FakeSupervisor],
                                                       channels: Callable[..., Channel],
                                                       runner: Runner) -> None:
    """Replies come one at a time, some time apart: each thread that got its reply leaves,
    and one of those still waiting must take the reading over, or nobody reads again."""
    fake = fakes()
    chan = channels(fake)
    boxes = [runner.start(lambda: ping(chan, time.monotonic() + 10)) for _ in range(3)]
    rids = [fake.next_request().rid for _ in range(3)]  # type: ignore[union-attr]
    for rid in rids:
        time.sleep(READ_SLICE * 1.2)  # let the leader leave and the next one take over
        fake.send(P.encode_reply(rid, P.OK, rid))
        wait_until(lambda r=rid: any(b.get("result", (0,))[0] == r for b in boxes),
                   what=f"reply {rid} delivered")
    runner.join_all(10)
    assert sorted(b["result"][0] for b in boxes) == sorted(rids)


# ---------------------------------------------------------------------------- deadlines


def test_no_answer_by_the_deadline_raises_timeout(fakes: Callable[..., FakeSupervisor],
                                                  channels: Callable[..., Channel]) -> None:
    fake = fakes()
    chan = channels(fake)
    t0 = time.monotonic()
    with pytest.raises(TimeOut):
        ping(chan, t0 + 0.2)
    elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 0.2 + READ_SLICE + 1.0, elapsed
    assert isinstance(fake.next_request(), P.Ping)  # it was sent, just never answered
    assert chan.broken is None  # a timeout does not break the channel


def test_a_late_reply_goes_to_on_late_with_no_further_request(
        fakes: Callable[..., FakeSupervisor], channels: Callable[..., Channel]) -> None:
    """After the caller gave up, the channel's drainer thread still reads the reply and hands
    it to ``on_late`` (a late grant goes back at once), although nothing else is sent."""
    fake = fakes()
    chan = channels(fake)
    late: queue.Queue[Any] = queue.Queue()
    rid = chan.next_rid()
    with pytest.raises(TimeOut):
        chan.request(rid, P.encode_get(rid, 1, 0.0), time.monotonic() + 0.2, late.put)
    fake.next_request()
    time.sleep(READ_SLICE)  # the caller is long gone
    fake.send(P.encode_granted(rid, 55, b"obj"))
    reply = late.get(timeout=5)
    assert isinstance(reply, P.Granted) and (reply.rid, reply.lease) == (rid, 55)
    assert bytes(reply.blob) == b"obj"
    # The channel still works, and the late reply did not land anywhere else.
    t = threading.Thread(target=lambda: fake.send(P.encode_reply(fake.next_request().rid,
                                                                 P.OK, "fresh")), daemon=True)
    t.start()
    rid2, reply2 = ping(chan, time.monotonic() + 5)
    t.join(5)
    assert reply2 == P.Reply(rid2, P.OK, "fresh")
    assert late.empty()


def test_a_late_reply_beside_a_live_request(fakes: Callable[..., FakeSupervisor],
                                            channels: Callable[..., Channel],
                                            runner: Runner) -> None:
    fake = fakes()
    chan = channels(fake)
    late: list[Any] = []
    with pytest.raises(TimeOut):
        ping(chan, time.monotonic() + 0.2, late.append)
    old = fake.next_request().rid  # type: ignore[union-attr]
    box = runner.start(lambda: ping(chan, time.monotonic() + 5))
    new = fake.next_request().rid  # type: ignore[union-attr]
    fake.send(P.encode_reply(old, P.OK, "late") + P.encode_reply(new, P.OK, "live"))
    runner.join_all(10)
    assert box["result"][1] == P.Reply(new, P.OK, "live")
    wait_until(lambda: late)
    assert late == [P.Reply(old, P.OK, "late")]


# ---------------------------------------------------------------------------- failures


def test_the_peer_closing_fails_every_pending_request(fakes: Callable[..., FakeSupervisor],
                                                      channels: Callable[..., Channel],
                                                      runner: Runner) -> None:
    fake = fakes()
    chan = channels(fake)
    boxes = [runner.start(lambda: ping(chan)) for _ in range(4)]  # no deadline at all
    boxes.append(runner.start(lambda: ping(chan, time.monotonic() + 30)))
    for _ in boxes:
        fake.next_request()
    fake.close()
    runner.join_all(5)
    for box in boxes:
        assert isinstance(box.get("error"), ServerUnavailable), box
    assert chan.broken
    with pytest.raises(ServerUnavailable):
        ping(chan)
    with pytest.raises(ServerUnavailable):
        chan.post(P.encode_put(1, 2))


def test_an_unreadable_reply_fails_every_pending_request(fakes: Callable[..., FakeSupervisor],
                                                         channels: Callable[..., Channel],
                                                         runner: Runner) -> None:
    fake = fakes()
    chan = channels(fake)
    boxes = [runner.start(lambda: ping(chan, time.monotonic() + 30)) for _ in range(3)]
    for _ in boxes:
        fake.next_request()
    fake.send(P.frame(b"\x80\x05not a pickle"))
    runner.join_all(5)
    for box in boxes:
        assert isinstance(box.get("error"), ServerUnavailable), box
        assert "unreadable" in str(box["error"])


def test_post_sends_in_order_without_waiting(fakes: Callable[..., FakeSupervisor],
                                             channels: Callable[..., Channel]) -> None:
    fake = fakes()
    chan = channels(fake)
    assert not chan.unsynced
    for lease in range(1, 51):
        chan.post(P.encode_put(3, lease, discard=lease % 2 == 0))
    assert chan.unsynced
    got = [fake.next_request() for _ in range(50)]
    assert got == [P.Put(3, lease, lease % 2 == 0) for lease in range(1, 51)]


def test_sync_pings_once_after_puts(fakes: Callable[..., FakeSupervisor],
                                    channels: Callable[..., Channel], runner: Runner) -> None:
    fake = fakes()
    chan = channels(fake)
    chan.sync()  # nothing posted: no round trip
    chan.post(P.encode_put(1, 1))
    box = runner.start(lambda: chan.sync(time.monotonic() + 5))
    assert fake.next_request() == P.Put(1, 1, False)
    msg = fake.next_request()
    assert isinstance(msg, P.Ping)
    fake.send(P.encode_reply(msg.rid, P.OK, 1))
    runner.join_all(5)
    assert "error" not in box and not chan.unsynced
    chan.sync()
    with pytest.raises(queue.Empty):
        fake.next_request(timeout=0.2)


def test_post_to_a_supervisor_that_stopped_reading_fails_within_the_timeout(
        fakes: Callable[..., FakeSupervisor], channels: Callable[..., Channel],
        runner: Runner) -> None:
    """SO_SNDTIMEO is the client's timeout: a supervisor that never reads fills the socket's
    buffers, and post() then fails with ServerUnavailable instead of blocking for ever."""
    fake = fakes(read=False)
    chan = channels(fake, timeout=0.3)
    big = P.frame(bytes(8 << 20))  # far more than the socket buffers of both ends hold
    t0 = time.monotonic()
    box = runner.start(lambda: chan.post(big))
    runner.join_all(10)
    elapsed = time.monotonic() - t0
    assert isinstance(box.get("error"), ServerUnavailable), box
    # Up to twice the timeout: the send that fills the buffers waits once, returns what it
    # wrote, and the next one waits again before failing.
    assert 0.3 <= elapsed < 2.5, elapsed
    assert chan.broken
