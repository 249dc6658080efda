"""No client, clock step, frozen peer or restart can break the supervisor.

Each test here reproduces a way one ordinary program could break the promise (a unit is
never lost and never held twice; one client never hurts another) and checks it holds.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import pickle
import signal
import statistics
import struct
import threading
import time
from typing import Any

import psutil
import pytest
from helpers import RawLease, start_ready, wait_until
from workers import hold_and_fork_keeper

import mppool
from mppool import protocol as P
from mppool.holder import Holder, current_holder, process_start

pytestmark = [pytest.mark.slow]


def _pool_id(pool: Any) -> int:
    return pool._mp_route()[1]


def _canary_ms(pool: Any, n: int = 20) -> float:
    """Median get+ret round trip of a normal client, in ms."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        pool.ret(pool.get(timeout=2))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _lease_of(client: Any, name: str, obj: Any) -> int:
    return next(held[0] for o, held in client._held[name].items() if o is obj)


def _supervisor_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


# ----------------------------------------------------------------------------- timeouts


def test_get_timeout_inf_waits_forever_and_the_loop_lives(client):
    """timeout=inf reached epoll.poll as a deadline and killed the lease loop thread."""
    pool = client.pool("inf", lambda i: i, max_size=1)
    other = client.token_pool("inf-other", 1)
    held = pool.get()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(pool.get(timeout=math.inf)))
    t.start()
    wait_until(lambda: pool.waiting() == 1, what="the inf waiter queued")
    assert _canary_ms(other) < 50  # every other get/put still served
    pool.ret(held)
    t.join(5)
    assert got == [held]
    pool.ret(got[0])
    with pytest.raises(ValueError, match="timeout"):
        pool.get(timeout=float("nan"))
    with pytest.raises(ValueError, match="timeout"):
        pool.get(timeout=-1)


def test_nan_timeout_frame_is_refused_and_timers_keep_working(client, server):
    """A get frame with a NaN timeout poisoned the timer heap: no timeout fired for anyone
    afterwards and the loop spun at 100% CPU."""
    pool = client.pool("nan", lambda i: i, max_size=1)
    held = pool.get()
    raw = RawLease(client)
    raw.send(P.HEADER.pack(P.GET_SIZE) + struct.pack("!BIId", P.KIND_GET, 1, _pool_id(pool),
                                                     float("nan")))
    assert raw.closed_by_peer(), "a NaN timeout must cost the sender its connection"
    t0 = time.monotonic()
    with pytest.raises(mppool.TimeOut):
        pool.get(timeout=0.2)
    assert time.monotonic() - t0 < 1.0  # the timer heap is healthy
    cpu0 = _supervisor_cpu(server.pid)
    time.sleep(0.5)  # measuring idle CPU over a wall-clock window is the point here
    assert _supervisor_cpu(server.pid) - cpu0 < 0.2, "the supervisor spins"
    pool.ret(held)
    for bad in (float("inf"), -2.0, 1e300):
        raw = RawLease(client)
        raw.send(P.HEADER.pack(P.GET_SIZE) + struct.pack("!BIId", P.KIND_GET, 1,
                                                         _pool_id(pool), bad))
        assert raw.closed_by_peer(), bad


# ----------------------------------------------------------------------------- ownership


def test_put_of_another_connections_lease_is_refused(client, server):
    """A put of a lease held by another connection was honoured: two holders of one unit."""
    pool = client.pool("own", lambda i: i, max_size=1)
    mine = pool.get()
    lease = _lease_of(client, "own", mine)
    hostile = RawLease(client)
    hostile.send(P.encode_put(_pool_id(pool), lease))
    hostile.send(P.encode_put(_pool_id(pool), lease, discard=True))
    other = mppool.connect(server.address, server.authkey)
    try:
        with pytest.raises(mppool.TimeOut):
            other.pool("own").get(timeout=0.3)  # still held, by us alone
        s = pool.stats()
        assert s["nusing"] == 1 and s["using"][0]["holder"]["conn"] == client._channel().conn_id
        # ... and our own return still works
        pool.ret(mine)
        assert other.pool("own").get(timeout=1) == mine
    finally:
        other.close()
        hostile.close()


def test_proxy_call_on_another_connections_lease_is_refused(client):
    pool = client.pool("ownp", lambda i: {"secret": i}, transfer="proxy", max_size=1)
    mine = pool.get()
    lease = _lease_of(client, "ownp", mine)
    hostile = RawLease(client)
    rid = next(hostile.rids)
    hostile.send(P.encode_call(rid, _pool_id(pool), lease, 0, "get", ("secret",), {}))
    reply = hostile.reply()
    assert reply.status == P.ERR
    assert isinstance(reply.value.unpack(), mppool.PoolClosed)
    assert mine.get("secret") == 0
    pool.ret(mine)
    hostile.close()


def test_lease_ids_are_not_a_counter(client):
    pool = client.token_pool("ids", 4, fast=False)  # leases of the lease channel
    toks = [pool.get() for _ in range(4)]
    leases = sorted(_lease_of(client, "ids", t) for t in toks)
    assert all(b - a > 1000 for a, b in itertools.pairwise(leases)), leases
    for t in toks:
        pool.ret(t)


def test_dropped_shared_pool_keeps_its_lease(client):
    """Leases were tracked per SharedPool object: dropping it lost the lease for good."""
    pool = client.pool("drop", lambda i: [i], max_size=1)
    obj = pool.get()
    del pool
    gc.collect()
    client.pool("drop").put(obj)
    assert client.pool("drop").stats()["nusing"] == 0
    assert client.pool("drop").get(timeout=1) == [0]


# ----------------------------------------------------------------------------- watchdog


def test_scan_reclaim_serves_the_waiter_without_other_traffic(client, procs):
    """A reclaim by the psutil scan (not a socket close) queued its reply from the loop
    thread without waking the loop: the waiter waited for unrelated traffic."""
    pool = client.pool("scanwake", lambda i: i, max_size=1)
    p, (holder_pid, keeper_pid) = start_ready(procs, hold_and_fork_keeper, pool)
    got: list[float] = []
    t = threading.Thread(target=lambda: (pool.get(timeout=10), got.append(time.monotonic())))
    t.start()
    wait_until(lambda: pool.waiting() == 1, what="parent waiting")
    t0 = time.monotonic()
    os.kill(holder_pid, signal.SIGKILL)
    p.join(5)
    t.join(10)  # nothing else talks to the supervisor meanwhile
    try:
        assert got, "the waiter was never served"
        assert got[0] - t0 < 2.0, got[0] - t0  # two scan periods and change
    finally:
        os.kill(keeper_pid, signal.SIGKILL)


def test_clock_step_does_not_make_a_live_holder_look_dead(monkeypatch):
    """psutil's create_time() follows the wall clock (boot time is read from btime): a step
    of a second made every live holder look dead. Start times here count from boot."""
    me = current_holder()
    assert me.alive()
    with open(f"/proc/{os.getpid()}/stat", "rb") as f:
        ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
    assert process_start(os.getpid()) == ticks / os.sysconf("SC_CLK_TCK")
    real = psutil.Process.create_time
    # The wall clock jumps 5 s: whatever psutil now says, the holder is the same process.
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real(self) + 5.0)
    assert me.alive()
    assert Holder(me.pid, me.start, me.host).alive()
    assert not Holder(me.pid, me.start - 1.0, me.host).alive()  # a reused pid still is not


def test_unix_peer_pid_comes_from_the_kernel(client):
    pool = client.pool("cred", lambda i: i, max_size=1)
    liar = RawLease(client, pid=1, start=123.0, host="elsewhere")
    granted = liar.get(_pool_id(pool))
    assert isinstance(granted, P.Granted)
    holder = pool.stats()["using"][0]["holder"]
    assert holder["pid"] == os.getpid() and holder["verified"]
    assert holder["start"] == process_start(os.getpid())
    liar.close()
    wait_until(lambda: pool.stats()["nusing"] == 0, what="the liar's lease reclaimed")


def test_kill_holder_never_signals_a_pid_claimed_over_tcp(tmp_path, procs):
    import multiprocessing

    bystander = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    procs.append(bystander)
    bystander.start()
    with mppool.Server("127.0.0.1:0") as srv, mppool.connect(srv.address, srv.authkey) as c:
        pool = c.pool("tcpkill", lambda i: i, max_size=1, max_using_delay_kill=0.3,
                      kill_holder=True)
        liar = RawLease(c, pid=bystander.pid, start=process_start(bystander.pid))
        assert isinstance(liar.get(_pool_id(pool)), P.Granted)
        wait_until(lambda: pool.stats()["nkilled"] == 1, what="the lease killed")
        time.sleep(0.3)  # give a wrongful SIGTERM time to land: the bystander must live on
        assert bystander.is_alive()
        liar.close()


# ----------------------------------------------------------------------------- limits


def test_huge_frame_before_the_handshake_is_refused(client, server):
    """A frame header claiming 4 GiB was buffered (copied on every read) before any key."""
    tokens = client.token_pool("huge", 1)
    rss0 = psutil.Process(server.pid).memory_info().rss
    raw = RawLease(client, handshake=False)
    try:
        raw.send(P.HEADER.pack(0xFFFFFFFF) + b"x" * (1 << 20))
    except OSError:
        pass  # closed on us mid-send: that is the point
    assert raw.closed_by_peer()
    assert psutil.Process(server.pid).memory_info().rss - rss0 < 16 << 20
    assert _canary_ms(tokens) < 50


def test_oversized_message_after_the_handshake_is_refused(client):
    tokens = client.token_pool("huge2", 1)
    raw = RawLease(client)
    try:
        raw.send(P.HEADER.pack(P.DEFAULT_MAX_MESSAGE + 1) + b"x" * 65536)
    except OSError:
        pass
    assert raw.closed_by_peer()
    assert _canary_ms(tokens) < 50


def test_silent_connection_is_closed_after_the_handshake_deadline(client):
    raw = RawLease(client, handshake=False)
    assert raw.closed_by_peer(timeout=8.0)


def test_client_that_never_reads_is_cut_off_and_loses_its_leases(client):
    """A client sending gets without reading the replies grew the supervisor by 250 MB."""
    pool = client.pool("big", lambda i: b"x" * (1 << 20), max_size=0, min_size=0)
    raw = RawLease(client)
    raw.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    pid = _pool_id(pool)
    for rid in range(1, 40):
        try:
            raw.send(P.encode_get(rid, pid, 1.0))
        except OSError:
            break
    assert raw.closed_by_peer(timeout=10)
    wait_until(lambda: pool.stats()["nusing"] == 0, what="its leases reclaimed")


# ----------------------------------------------------------------------------- frozen peer


def test_frozen_supervisor_every_call_keeps_its_deadline(server, client):
    """SIGSTOP of the supervisor blocked get(timeout=1), stats() and connect() for as long
    as it was stopped. A grant that arrives after its get gave up goes back at once."""
    fast = mppool.connect(server.address, server.authkey, timeout=1.0)
    pool = fast.pool("frozen", lambda i: i, max_size=1)
    held = pool.get()
    os.kill(server.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(mppool.TimeOut, match="did not answer"):
            pool.get(timeout=0.5)
        assert time.monotonic() - t0 < 0.5 + 1.0 + 0.5
        t0 = time.monotonic()
        with pytest.raises(mppool.ServerUnavailable):
            fast.stats()
        assert time.monotonic() - t0 < 1.5
        t0 = time.monotonic()
        with pytest.raises(mppool.ServerUnavailable):
            mppool.connect(server.address, server.authkey, timeout=1.0)
        assert time.monotonic() - t0 < 1.5
        pool.ret(held)  # queued in the socket: the supervisor sees it when it wakes up
    finally:
        os.kill(server.pid, signal.SIGCONT)
    # The get the supervisor answers late (the unit was returned meanwhile) is given back.
    wait_until(lambda: client.pool("frozen").stats()["nusing"] == 0, timeout=5,
               what="the late grant given back")
    assert client.pool("frozen").get(timeout=1) == 0
    fast.close()


# ----------------------------------------------------------------------------- restart


def test_clients_and_unpickled_pools_survive_a_supervisor_restart(tmp_path):
    address = str(tmp_path / "r.sock")
    key = os.urandom(16)
    srv = mppool.Server(address, key).start()
    try:
        c = mppool.connect(address, key)
        pool = c.pool("r", lambda i: ("obj", i), max_size=2)
        copy = pickle.loads(pickle.dumps(pool))
        held = pool.get()
        assert copy.get(timeout=1) == ("obj", 1)
        os.kill(srv.pid, signal.SIGKILL)
        srv._proc.wait(5)  # type: ignore[union-attr]
        t0 = time.monotonic()
        with pytest.raises(mppool.ServerUnavailable):
            pool.get(timeout=1)
        assert time.monotonic() - t0 < 1.0, "a dead supervisor must fail calls at once"
        for leftover in (address, address + ".lease"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        srv = mppool.Server(address, key).start()
        pool.ret(held)  # a lease of the dead supervisor: ignored, no error
        assert pool.get(timeout=1) == ("obj", 0)  # re-created from the options it knew
        assert copy.get(timeout=1) == ("obj", 1)
        assert pool.stats()["nusing"] == 2
        c.close()
    finally:
        srv.shutdown()


# ----------------------------------------------------------------------------- errors


class UserError(Exception):
    """An exception class the caller can import (this test module)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"user error {code}")
        self.code = code


def _raise_user_error(i: int) -> Any:
    raise UserError(7)


def test_user_exception_arrives_as_its_class_with_the_remote_traceback(client):
    pool = client.pool("uerr", _raise_user_error, max_size=1, min_size=0)
    with pytest.raises(UserError) as info:
        pool.get(timeout=1)
    assert info.value.code == 7
    assert "_raise_user_error" in info.value.remote_traceback  # type: ignore[attr-defined]
    with pytest.raises(UserError):
        client.execute(_raise_user_error, 0)


def test_unimportable_exception_arrives_as_remote_error(client):
    def fun(i: int) -> Any:
        class LocalError(Exception):
            pass

        raise LocalError("made in the supervisor")

    pool = client.pool("lerr", fun, max_size=1, min_size=0)
    with pytest.raises(mppool.RemoteError, match="LocalError: made in the supervisor") as info:
        pool.get(timeout=1)
    assert "raise LocalError" in info.value.remote_traceback  # type: ignore[attr-defined]
    restored = pickle.loads(pickle.dumps(info.value))
    assert type(restored) is mppool.RemoteError and str(restored) == str(info.value)


# ----------------------------------------------------------------------------- waiters


def test_interrupted_waiter_leaves_nothing_stranded(monkeypatch):
    """A waiter interrupted by KeyboardInterrupt stayed queued: the next returned object
    was leased to it, and lost."""
    from mppool import pool as pool_mod

    pool = mppool.Pool(lambda i: i, max_size=1)
    held = pool.get()

    def interrupted(self: Any, timeout: float | None) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(pool_mod.Waiter, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.get()
    assert pool.waiting() == 0
    pool.ret(held)
    assert pool.free() == 1 and pool.get(timeout=0) == held


def test_interrupted_waiter_gives_back_what_it_was_handed(monkeypatch):
    from mppool import pool as pool_mod

    pool = mppool.Pool(lambda i: i, max_size=1)
    held = pool.get()

    def served_then_interrupted(self: Any, timeout: float | None) -> bool:
        pool.ret(held)  # handed to this waiter...
        assert self.done
        raise KeyboardInterrupt  # ... which is interrupted before it returns

    monkeypatch.setattr(pool_mod.Waiter, "wait", served_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.get()
    assert pool.stats()["nusing"] == 0 and pool.free() == 1


def test_two_grants_that_unpickle_to_one_object_are_two_leases(client):
    """Copies of 0 (or None, or an interned string) are one object here: the client kept one
    lease per object and lost the other."""
    pool = client.pool("zeros", lambda i: 0, max_size=2, min_size=0)
    a, b = pool.get(timeout=1), pool.get(timeout=1)
    assert a is b
    pool.ret(a)
    pool.ret(b)
    assert pool.stats()["nusing"] == 0
