"""Pools shared across real processes through a supervisor."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import stat
import time

import pytest
from helpers import fork_ctx, wait_until
from workers import churn, task_use_pool, wait_for_one

import mppool
from mppool.address import key_path, parse_address

pytestmark = pytest.mark.slow


def test_get_ret_copy_and_closure(client):
    base = 100
    pool = client.pool("closure", lambda i: {"n": base + i}, max_size=2, min_size=0)
    a = pool.get()
    b = pool.get()
    assert sorted([a["n"], b["n"]]) == [100, 101]
    with pytest.raises(mppool.TimeOut):
        pool.get(timeout=0)
    pool.ret(a)
    with pool.obj() as c:
        assert c == a  # the same supervisor object, a fresh copy
    pool.ret(b)
    s = pool.stats()
    assert s["nobjs"] == 2 and s["nusing"] == 0 and s["ncreated"] == 2
    assert pool.free() == 2 and pool.waiting() == 0 and len(pool) == 2


def test_stats_show_holder_pid_and_json(client):
    import json

    pool = client.pool("st", lambda i: i, max_size=3)
    obj = pool.get()
    s = pool.stats()
    assert [u["pid"] for u in s["using"]] == [os.getpid()]
    assert json.loads(str(pool))["nusing"] == 1
    assert client.stats()["st"]["nusing"] == 1
    pool.ret(obj)


def test_attach_and_option_conflicts(client, server):
    client.pool("p", lambda i: i, max_size=2)
    other = mppool.connect(server.address, server.authkey)
    try:
        same = other.pool("p")  # attach without options
        assert same.get() in (0, 1)
        with pytest.raises(ValueError, match="other options"):
            other.pool("p", lambda i: i, max_size=3)
        with pytest.raises(ValueError, match="no pool named"):
            other.pool("missing")
        with pytest.raises(TypeError, match="bogus"):
            other.pool("q", lambda i: i, bogus=1)
        with pytest.raises(TypeError, match="max_size"):
            other.pool("q", lambda i: i, max_size="x")
        with pytest.raises(ValueError, match="transfer"):
            other.pool("q", lambda i: i, transfer="teleport")
        assert "q" not in other.stats()  # nothing half-created
    finally:
        other.close()


def test_fun_error_propagates_and_costs_no_slot(client):
    def fun(i):
        if i == 0:
            raise RuntimeError("cannot connect")
        return i

    pool = client.pool("err", fun, max_size=1, min_size=0)
    with pytest.raises(RuntimeError, match="cannot connect"):
        pool.get()
    # Within the backoff (1 s) a get fails fast with the same error, without calling fun;
    # then fun is tried again, in the slot that was not lost.
    with pytest.raises(RuntimeError, match="cannot connect"):
        pool.get(timeout=1)
    assert pool.stats()["connections_num"] == 1

    def get_or_none():
        try:
            return pool.get(timeout=1)
        except RuntimeError:
            return None

    assert wait_until(get_or_none, timeout=5, interval=0.05, what="fun tried again") == 1


def test_proxy_transfer_calls_run_in_supervisor(client):
    pool = client.pool("lists", lambda i: [i], transfer="proxy", max_size=1)
    obj = pool.get()
    obj.append(os.getpid())
    assert obj.pop() == os.getpid()
    assert obj.count(0) == 1
    assert len(obj) == 1 and obj[0] == 0
    pool.ret(obj)
    with pytest.raises(mppool.PoolException, match="returned"):
        obj.append(1)
    again = pool.get()
    assert again.copy() == [0]  # the same object, kept in the supervisor
    pool.ret(again)


def test_proxy_method_takes_a_keyword_named_name(client):
    # The proxy's own call path has a parameter for the method's name: a keyword argument
    # called "name" (psycopg's cursor(name=...)) must still reach the method.
    pool = client.pool("dicts", lambda i: {}, transfer="proxy", max_size=1)
    obj = pool.get()
    obj.update(name="x", args=1, kwargs=2)
    assert obj.copy() == {"name": "x", "args": 1, "kwargs": 2}
    pool.ret(obj)


def test_token_pool_invariant(client):
    tokens = client.token_pool("tok", 3)
    got = [tokens.get() for _ in range(3)]
    assert len({id(t) for t in got}) == 3
    with pytest.raises(mppool.TimeOut):
        tokens.get(timeout=0.05)
    s = tokens.stats()
    assert s["nusing"] + tokens.free() == 3
    for t in got:
        tokens.put(t)
    wait_until(lambda: tokens.free() == 3, what="all tokens back")


def test_wrong_key_is_refused_and_server_keeps_serving(server):
    with pytest.raises(mppool.ServerUnavailable, match="key"):
        mppool.connect(server.address, b"not the key")
    c = mppool.connect(server.address, server.authkey)
    assert c.info()["pid"] == server.pid
    c.close()


def test_socket_and_key_file_are_private(server):
    path = server.address
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path + ".lease").st_mode) == 0o600
    key = key_path(path)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert bytes.fromhex(key.read_text()) == server.authkey
    # a client finds the key file beside the socket
    c = mppool.connect(path)
    assert c.info()["pid"] == server.pid
    c.close()


def test_tcp_address():
    with mppool.Server("127.0.0.1:0") as srv:
        host, port = srv.address
        assert host == "127.0.0.1" and port > 0
        c = mppool.connect(f"127.0.0.1:{port}", srv.authkey)
        pool = c.token_pool("t", 1)
        with pool.obj():
            assert pool.free() == 0
        c.close()


@pytest.mark.parametrize("bad", ["", "no-slash-no-port", "host:port", ("h", 70000), 42, ("h",)])
def test_bad_address(bad):
    with pytest.raises((ValueError, TypeError), match="address"):
        parse_address(bad)
    with pytest.raises((ValueError, TypeError), match="address"):
        mppool.Server(bad)


def test_supervisor_gone_raises_server_unavailable():
    srv = mppool.Server().start()
    c = mppool.connect(srv.address, srv.authkey)
    pool = c.token_pool("t", 1)
    pool.get()
    srv.shutdown()
    with pytest.raises(mppool.ServerUnavailable):
        pool.get(timeout=1)
    with pytest.raises(mppool.ServerUnavailable):
        pool.stats()
    c.close()


def test_bound_never_exceeded_by_many_processes(client, procs):
    ctx = fork_ctx()
    pool = client.pool("bound", lambda i: i, max_size=2, min_size=0)
    inuse, peak, lock, errors = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Lock(), ctx.Queue()
    for _ in range(6):
        p = ctx.Process(target=churn, args=(pool, 2, inuse, lock, peak, 150, errors))
        procs.append(p)
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert errors.empty(), errors.get()
    assert 1 <= peak.value <= 2
    # A put is sent without waiting: the last ones may still be on their way when the
    # processes have exited (seen once under -n 2). Wait for them, with a deadline.
    s = wait_until(lambda: (st := pool.stats())["nusing"] == 0 and st, timeout=10,
                   what="the last puts applied")
    assert s["nobjs"] <= 2 and s["nborrows"] == 900


def test_fifo_order_across_processes(client, procs):
    ctx = fork_ctx()
    pool = client.pool("fifo", lambda i: i, max_size=1)
    held = pool.get()
    started, results, seq = ctx.Queue(), ctx.Queue(), ctx.Value("i", 0)
    for tag in range(4):
        p = ctx.Process(target=wait_for_one, args=(pool, started, results, tag, None, seq))
        procs.append(p)
        p.start()
        wait_until(lambda tag=tag: pool.waiting() == tag + 1, timeout=10, what=f"waiter {tag}")
    pool.ret(held)
    order = [tag for _, tag, _ in sorted(results.get(timeout=10) for _ in range(4))]
    assert order == [0, 1, 2, 3]


def test_waiter_that_timed_out_never_swallows(client, procs):
    ctx = fork_ctx()
    pool = client.pool("to", lambda i: i, max_size=1)
    held = pool.get()
    started, results = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=wait_for_one, args=(pool, started, results, "late", 0.2))
    procs.append(p)
    p.start()
    p.join(10)
    assert p.exitcode != 0  # it timed out
    pool.ret(held)
    assert pool.get(timeout=1) == held


def test_bare_fork_child_gets_only_its_own_answers(client):
    pool = client.pool("echo", lambda i: [], transfer="proxy", max_size=8, min_size=0)
    tokens = client.token_pool("ftok", 8)
    obj = pool.get()  # the parent's channel exists before the fork
    obj.append(-1)
    assert obj.pop() == -1
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                me = os.getpid()
                for i in range(200):
                    with pool.obj(timeout=20) as o:
                        o.append((me, i))
                        assert o.pop() == (me, i)
                    with tokens.obj(timeout=20):
                        pass
                    if i % 50 == 0:
                        assert "echo" in client.stats()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for i in range(200):  # the parent keeps using its own connection meanwhile
        obj.append(("parent", i))
        assert obj.pop() == ("parent", i)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    pool.ret(obj)
    wait_until(lambda: tokens.free() == 8, what="tokens back")


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_shared_pool_pickles_into_multiprocessing_pool(client, method):
    pool = client.pool("mp", lambda i: f"obj{i}", max_size=2)
    restored = pickle.loads(pickle.dumps(pool))
    assert restored.name == "mp"
    with multiprocessing.get_context(method).Pool(2) as mp:
        results = mp.map(task_use_pool, [pool] * 6)
    assert {obj for _, obj in results} <= {"obj0", "obj1"}
    assert all(pid != os.getpid() for pid, _ in results)
    wait_until(lambda: pool.stats()["nusing"] == 0, what="all returned")


def test_shutdown_wakes_remote_waiters(client, procs):
    ctx = fork_ctx()
    pool = client.pool("sd", lambda i: i, max_size=1)
    pool.get()
    started, results = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=wait_for_one, args=(pool, started, results, 0))
    procs.append(p)
    p.start()
    wait_until(lambda: pool.waiting() == 1, timeout=10)
    pool.shutdown()
    p.join(10)
    assert p.exitcode == 1  # PoolClosed raised in the child
    with pytest.raises(mppool.PoolClosed, match="shutting down"):
        pool.get(timeout=0)




def test_ret_discard_closes_the_object(client):
    pool = client.pool("disc", lambda i: i, max_size=1)
    obj = pool.get()
    pool.ret(obj, discard=True)
    wait_until(lambda: pool.stats()["ndestroys"] == 1, what="discarded object closed")
    assert pool.get(timeout=1) == 1  # a new one in the freed slot


def test_returned_proxy_refuses_clearly(client):
    pool = client.pool("retp", lambda i: [i], transfer="proxy", max_size=1)
    obj = pool.get()
    pool.ret(obj)
    with pytest.raises(mppool.PoolException, match="returned to its pool"):
        obj.append(1)


def test_reconnect_to_a_restarted_supervisor_at_the_same_address(tmp_path):
    addr = str(tmp_path / "s.sock")
    key = os.urandom(16)
    first = mppool.Server(addr, key).start()
    stale = mppool.connect(addr, key)
    assert stale.stats() == {}
    os.kill(first.pid, signal.SIGKILL)  # the supervisor this test started
    first.shutdown()
    with mppool.Server(addr, key) as second:
        fresh = mppool.connect(addr, key, timeout=5)
        assert fresh.info()["pid"] == second.pid
        fresh.close()
    stale.close()


def test_dropped_clients_close_their_sockets(server):
    """A client dropped without close() closes its socket at once, by refcount: it is in no
    reference cycle, so it never waits for the cyclic GC (which may finalize the socket
    first and warn about an unclosed socket)."""
    import gc

    probe = mppool.connect(server.address, server.authkey)
    gc.disable()  # only refcounting may close them
    try:
        for _ in range(10):
            c = mppool.connect(server.address, server.authkey)
            tokens = c.token_pool("drop", 2)
            tokens.put(tokens.get())
            del c, tokens
        wait_until(lambda: probe.info()["connections"] == 0, what="the supervisor saw every close")
    finally:
        gc.enable()
        gc.collect()
    probe.close()


def test_read_your_writes_with_a_slow_retter(client):
    """A put with a hook runs on a worker thread; stats() right after ret() still sees it."""
    import time as _time

    def slow_retter(obj):
        _time.sleep(0.05)

    pool = client.pool("slowret", lambda i: i, max_size=2, retter=slow_retter)
    for _ in range(10):
        pool.ret(pool.get())
        assert pool.free() == 2  # not 1: the sync waited for the put to finish


def test_proxy_method_cache_is_per_pool(client):
    """``pop`` is a method of a list and a key-like attribute elsewhere: what one pool's
    objects taught the client must not be applied to another pool's objects."""
    import types

    lists = client.pool("plists", lambda i: [1, 2], transfer="proxy", max_size=1)
    ns = client.pool("pns", lambda i: types.SimpleNamespace(pop=7), transfer="proxy", max_size=1)
    with lists.obj() as lst:
        assert lst.pop() == 2  # learnt: "pop" is a method, for this pool's objects
    with ns.obj() as n:
        assert n.pop == 7  # still an attribute here


def test_clear_closes_idle_objects_only(client):
    pool = client.pool("clr", lambda i: i, max_size=3, min_size=0)
    a, b = pool.get(), pool.get()
    pool.ret(b)
    assert pool.clear() == 1
    s = pool.stats()
    assert s["navail"] == 0 and s["nusing"] == 1 and s["ndestroys"] == 1
    pool.ret(a)


class _Evil:
    """A pickle that runs code when loaded: it must never be loaded unauthenticated."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("address", ["unix", "tcp"])
def test_no_pickle_is_loaded_before_the_key_is_proved(address, tmp_path):
    import socket as _socket

    from mppool import handshake
    from mppool import protocol as P
    from mppool.channel import _recv_frame

    marker = tmp_path / "pwned"
    addr = str(tmp_path / "s.sock") if address == "unix" else "127.0.0.1:0"
    with mppool.Server(addr) as srv:
        c = mppool.connect(srv.address, srv.authkey)
        lease_addr = c.info()["lease_address"]
        c.close()
        family = _socket.AF_UNIX if isinstance(lease_addr, str) else _socket.AF_INET
        with _socket.socket(family, _socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(lease_addr if isinstance(lease_addr, str) else tuple(lease_addr))
            _recv_frame(s)  # the greeting
            s.sendall(P.frame(pickle.dumps(_Evil(str(marker)))))  # instead of a hello
            assert s.recv(100) == b""  # closed on us
        # and a hello with a wrong key is refused too
        with _socket.socket(family, _socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(lease_addr if isinstance(lease_addr, str) else tuple(lease_addr))
            nonce = handshake.decode_nonce(_recv_frame(s))
            s.sendall(handshake.encode_hello(handshake.digest(b"wrong", nonce),
                                             handshake.new_nonce(), 1, 0.0, "h"))
            assert s.recv(100) == b""
        assert mppool.connect(srv.address, srv.authkey).info()["pid"] == srv.pid  # still serving
    assert not marker.exists()


def test_handing_an_unpicklable_object_to_a_waiter_does_not_deadlock(client):
    """Handing an object to a queued waiter runs the getter and pickles the object; when
    that fails the lease is given back, which takes the pool lock: it must not happen
    under that lock (it deadlocked the lease loop)."""
    from workers import unpicklable_on_second_get

    pool = client.pool("unpk", lambda i: [], max_size=1, min_size=0,
                       getter=unpicklable_on_second_get)
    first = pool.get()
    assert first == [1]  # the getter ran once, not twice, for a newly created object
    errors: list[BaseException] = []

    def waiter():
        try:
            pool.get(timeout=5)
        except BaseException as exc:
            errors.append(exc)

    import threading as _threading

    t = _threading.Thread(target=waiter)
    t.start()
    wait_until(lambda: pool.waiting() == 1, what="the waiter queued")
    pool.ret(first)
    t.join(10)
    assert not t.is_alive(), "the waiter hangs: the lease loop deadlocked"
    assert len(errors) == 1  # its object could not be sent: it gets the error
    other = client.pool("unpk-other", lambda i: i, max_size=1)
    assert other.get(timeout=2) == 0  # and the supervisor still serves


def test_a_result_that_cannot_travel_fails_the_call_not_the_caller(client):
    import io

    buf = client.host(io.BytesIO(b"abc"))
    view = buf.getbuffer()  # a memoryview: not plain data, so it comes back as a proxy
    assert bytes(view.tobytes()) == b"abc"


def test_request_ids_wrap_at_32_bits(client):
    tokens = client.token_pool("rid", 1)
    chan = client._channel()
    import itertools as _itertools

    chan._rids = _itertools.count(2**32 - 2)
    for _ in range(4):  # crosses 2**32: ids wrap, skipping 0 (which means "no reply")
        tokens.put(tokens.get(timeout=2))


def test_same_name_with_another_fun_is_refused(client, server):
    dsn = "db-one"
    client.pool("fp", lambda i: (dsn, i), max_size=2)
    other = mppool.connect(server.address, server.authkey)
    try:
        with pytest.raises(ValueError, match="other options"):
            other.pool("fp", lambda i: ("db-two", i), max_size=2)  # another constant
        dsn2 = "db-two"
        with pytest.raises(ValueError, match="other options"):
            other.pool("fp", lambda i: (dsn2, i), max_size=2)  # another closure value
        same = other.pool("fp", lambda i: (dsn, i), max_size=2)  # the same: attaches
        assert same.get(timeout=1)[0] == "db-one"
    finally:
        other.close()


def test_a_slow_pool_creation_does_not_stall_other_creations(client, server):
    import threading as _threading

    from workers import slow_make

    done: list[str] = []
    t = _threading.Thread(target=lambda: (client.pool("slow", slow_make, min_size=1, max_size=1),
                                          done.append("slow")))
    t.start()
    other = mppool.connect(server.address, server.authkey)
    try:
        time.sleep(0.1)  # let the slow creation start its fun first (the point of the test)
        t0 = time.monotonic()
        other.pool("fast", lambda i: i, max_size=1)
        assert time.monotonic() - t0 < 0.8  # not behind the 1 s fun of "slow"
    finally:
        t.join(10)
        other.close()
    assert done == ["slow"]


def test_racing_creators_of_one_pool_share_it(client, server):
    import threading as _threading

    from workers import slow_make

    others = [mppool.connect(server.address, server.authkey) for _ in range(3)]
    pools: list[object] = []
    threads = [_threading.Thread(target=lambda c=c: pools.append(
        c.pool("race", slow_make, min_size=1, max_size=2))) for c in others]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    try:
        assert len(pools) == 3
        s = client.stats()["race"]
        assert s["nobjs"] == 1  # one pool stands; the losers' objects were closed
    finally:
        for c in others:
            c.close()
