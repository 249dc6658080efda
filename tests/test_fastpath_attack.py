"""Attacks on the fast path of token pools (mppool.fastpath, mppool.shm, fastregion): a client
that holds the key and does anything to the shared region, its memfd and the fast-path
messages. Whatever it does, the guarantees hold once it is gone:

- the supervisor stays alive, and ``stats()`` and other pools keep answering;
- nothing is lost: every unit comes back, and all of them can be taken at once;
- never more than max_size units out through the supervisor's own accounting.

Each attacker runs in a forked process of its own (killed by pid at the end of the test).
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import socket
import struct
import time
from typing import Any

import pytest
from helpers import NEEDS_FAST_PATH, fork_ctx, start_ready, wait_until
from test_fastpath import accounted, fast_pool

import mppool
from mppool import framing, shm
from mppool import protocol as P
from mppool.errors import TimeOut
from mppool.fastpath import FastToken

pytestmark = [pytest.mark.slow, pytest.mark.kill, NEEDS_FAST_PATH]


# ------------------------------------------------------------------ helpers


def kept_fd(pool: Any) -> tuple[Any, int]:
    """Map ``pool``'s region and keep a duplicate of its memfd (what any client can do: the
    descriptor comes with the FastMap reply)."""
    kept: list[int] = []
    orig = shm.Region.__init__

    def init(self: shm.Region, fd: int, nslots: int | None = None) -> None:
        kept.append(os.dup(fd))
        orig(self, fd, nslots)

    shm.Region.__init__ = init  # type: ignore[method-assign]
    try:
        tok = pool.get(timeout=10)
    finally:
        shm.Region.__init__ = orig  # type: ignore[method-assign]
    assert type(tok) is FastToken and kept
    pool.put(tok)
    return pool._where[1], kept[0]


def can_take_all(pool: Any, size: int, timeout: float = 5.0) -> None:
    """All ``size`` units at once, and not one more."""
    held = [pool.get(timeout=timeout) for _ in range(size)]
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    for tok in held:
        pool.put(tok)


def alive_and_serving(client: Any, server: Any, name: str) -> None:
    """The supervisor process lives, another pool serves, stats() answers within a second."""
    assert server._proc is None or server._proc.poll() is None, "the supervisor died"
    other = client.token_pool(name, 1, fast=False)
    t0 = time.monotonic()
    other.put(other.get(timeout=2))
    client.stats()
    assert time.monotonic() - t0 < 1.0


# ------------------------------------------------------------------ attackers (forked)


def flush_exit(ready: Any) -> None:
    """Exit at once, once what was put on ``ready`` has left (its feeder thread)."""
    ready.close()
    ready.join_thread()
    os._exit(0)


def truncate_memfd(pool: Any, ready: Any) -> None:
    """Shrink the region's memfd under everybody's mapping: any access past the new end is a
    SIGBUS, in the supervisor as much as in the clients."""
    _, fd = kept_fd(pool)
    try:
        os.ftruncate(fd, 0)
        ready.put("truncated")
    except OSError as exc:
        ready.put(f"refused: {exc}")
    flush_exit(ready)  # never touch the mapping again


def scribble_lock_word(pool: Any, value: int, ready: Any) -> None:
    """Write the lock word directly, as a bogus owner, then exit."""
    region = pool._where[1]
    pool.put(pool.get(timeout=10))
    struct.pack_into("=i", region.mm, shm.MUTEX_AT, value)
    ready.put(os.getpid())
    flush_exit(ready)


def scribble_mutex_kind(pool: Any, kind: int, ready: Any) -> None:
    """Overwrite the mutex's kind (glibc: the int at offset 16 of pthread_mutex_t on x86-64),
    then exit."""
    region = pool._where[1]
    pool.put(pool.get(timeout=10))
    struct.pack_into("=i", region.mm, shm.MUTEX_AT + 16, kind)
    ready.put(os.getpid())
    flush_exit(ready)


def scribble_mutex(pool: Any, kind: int, word: int, ready: Any) -> None:
    """Overwrite the mutex's kind and lock word at once (``word`` -1: this process's pid,
    which is dead once it exits), then exit."""
    region = pool._where[1]
    pool.put(pool.get(timeout=10))
    struct.pack_into("=i", region.mm, shm.MUTEX_AT, os.getpid() if word == -1 else word)
    struct.pack_into("=i", region.mm, shm.MUTEX_AT + 16, kind)
    ready.put(os.getpid())
    flush_exit(ready)


def honest_churn(pool: Any, seconds: float, errors: Any) -> None:
    """get/put for ``seconds``; TimeOut is allowed (a scribbler may hold the pool up), any
    other error is reported."""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            try:
                tok = pool.get(timeout=0.5)
            except TimeOut:
                continue
            pool.put(tok)
    except BaseException as exc:
        errors.put(repr(exc))
    os._exit(0)


def random_scribbler(pool: Any, seconds: float, seed: int, mutex: bool, ready: Any) -> None:
    """Write random values everywhere in the region (header, flags, pending, states, slots,
    and the mutex's first 20 bytes if ``mutex``) for ``seconds``, then exit."""
    rnd = random.Random(seed)
    pool.put(pool.get(timeout=10))
    region = pool._where[1]
    mm, size = region.mm, len(region.mm)
    ready.put(os.getpid())
    nan = struct.pack("=d", float("nan"))
    values = [nan, struct.pack("=d", float("inf")), struct.pack("=d", -1e300),
              b"\xff" * 8, b"\x00" * 8, b"\x01", b"\x02", b"\x03", b"\x07",
              struct.pack("=Q", 2**64 - 1), struct.pack("=I", os.getppid()),
              struct.pack("=I", 1), struct.pack("=I", 2**31)]
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        at = rnd.choice((rnd.randrange(0, 20), rnd.randrange(shm.STATES_AT, size),
                         rnd.randrange(shm.STATES_AT, region.slots_at),
                         rnd.randrange(region.slots_at, size)))
        if mutex and rnd.random() < 0.02:
            at = rnd.randrange(shm.MUTEX_AT, shm.MUTEX_AT + 20)  # now and then the mutex too
        v = rnd.choice(values) if rnd.random() < 0.7 else rnd.randbytes(rnd.randrange(1, 9))
        v = v[:size - at]
        mm[at:at + len(v)] = v
        n += 1
        if n % 64 == 0:
            time.sleep(0.0005)
    flush_exit(ready)


def flood_gives_and_pokes(pool: Any, victim_slot: int, n: int, seed: int, ready: Any) -> None:
    """Map the region, then send ``n`` FastGive (random slots and generations, and the
    victim's slot with its current generation, read from the region) and FastPoke, for this
    pool and for pool ids that are not its own."""
    rnd = random.Random(seed)
    pool.put(pool.get(timeout=10))
    region = pool._where[1]
    chan = pool._client._channel()
    pid = pool._id
    for _ in range(n):
        gen = region.slot(victim_slot)[0]
        msgs = [P.encode_fastgive(pid, victim_slot, gen),
                P.encode_fastgive(pid, rnd.randrange(2**32), rnd.randrange(2**64)),
                P.encode_fastgive(rnd.randrange(2**32), rnd.randrange(4), gen),
                P.encode_fastpoke(pid), P.encode_fastpoke(rnd.randrange(2**32))]
        chan.post(b"".join(msgs))
    ready.put(n)
    flush_exit(ready)


def fastmap(client: Any, pool_id: Any, conn: Any) -> str:
    """Send a FastMap with whatever ``pool_id`` and ``conn`` (pickled: any object), on a
    connection of its own; the reply's status, with how many descriptors came."""
    from mppool.channel import Channel
    chan = client._channel()
    side = Channel(chan._sock.getpeername(), client.authkey, 5.0)
    try:
        side._sock.sendall(P.frame(pickle.dumps((P.FASTMAP, 1, pool_id, conn))))
        side._sock.settimeout(5.0)
        data, fds, _, _ = socket.recv_fds(side._sock, 1 << 16, 4)
        for fd in fds:
            os.close(fd)
        if not data:
            return "closed"
        reply = P.decode_reply(framing.FrameReader(1 << 16).feed(data)[0])
        return f"{'OK' if reply.status == P.OK else 'ERR'} fds={len(fds)}"
    finally:
        side.close()


def dead_tid() -> int:
    """A thread id that is not running now."""
    ctx = fork_ctx()
    p = ctx.Process(target=os._exit, args=(0,))
    p.start()
    p.join(5)
    assert p.pid is not None
    return int(p.pid)


# ------------------------------------------------------------------ tests


def test_truncating_the_memfd_does_not_kill_the_supervisor(client, server, procs):
    size = 2
    pool = fast_pool(client, "a-trunc", size)
    p, what = start_ready(procs, truncate_memfd, pool)
    p.join(5)
    time.sleep(0.3)  # the supervisor's next touches of the region (gets, watchdog scan)
    pool._where = None  # our own mapping would fault too: start over as a fresh client
    pool.put(pool.get(timeout=2))
    alive_and_serving(client, server, "a-trunc-other")
    assert what.startswith("refused"), "a client could shrink the region's memfd"
    wait_until(lambda: accounted(pool, size), what="every unit accounted")
    can_take_all(pool, size)
    alive_and_serving(client, server, "a-trunc-other")


def test_a_bogus_owner_in_the_lock_word_loses_nothing(client, server, procs):
    """A client writes a dead thread's id as the lock's owner and exits: whoever next needs
    the lock finds its owner gone and takes it over. The parked tokens are not lost."""
    size = 2
    pool = fast_pool(client, "a-owner", size)
    tid = dead_tid()
    p, _ = start_ready(procs, scribble_lock_word, pool, tid)
    p.join(5)  # (the supervisor may take the lock over before we look: no race to test)
    alive_and_serving(client, server, "a-owner-other")
    can_take_all(pool, size, timeout=5.0)
    wait_until(lambda: accounted(pool, size), what="every unit accounted")
    alive_and_serving(client, server, "a-owner-other")


@pytest.mark.parametrize("kind", [0x7F, 0x30, 0x22])
def test_a_scribbled_mutex_kind_does_not_break_the_supervisor(client, server, procs, kind):
    """A mutex kind that glibc rejects (EINVAL), or a PI kind (other futex calls): the
    supervisor survives, other pools serve, and the pool's units are not lost."""
    size = 2
    pool = fast_pool(client, f"a-kind-{kind:x}", size)
    p, _ = start_ready(procs, scribble_mutex_kind, pool, kind)
    p.join(5)
    alive_and_serving(client, server, f"a-kind-other-{kind:x}")
    can_take_all(pool, size, timeout=5.0)
    wait_until(lambda: accounted(pool, size), what="every unit accounted")
    alive_and_serving(client, server, f"a-kind-other-{kind:x}")


# glibc's kinds: 0x10 robust, 0x20 priority inheritance, 0x40 priority protect, 0x80 shared.
@pytest.mark.parametrize("kind", [0xB0, 0x30, 0x90, 0xC0, 0xB2, 0x91])
@pytest.mark.parametrize("word", [-1, 0x40000000 | 1, 1])
def test_a_scribbled_mutex_kind_and_owner(client, server, procs, kind, word):
    size = 2
    name = f"a-mx-{kind:x}-{word & 0xFFFFFFFF:x}"
    pool = fast_pool(client, name, size)
    p, _ = start_ready(procs, scribble_mutex, pool, kind, word)
    p.join(5)
    alive_and_serving(client, server, name + "-other")
    can_take_all(pool, size, timeout=5.0)
    wait_until(lambda: accounted(pool, size), what="every unit accounted")
    alive_and_serving(client, server, name + "-other")
    tok = pool.get(timeout=5)
    pool.put(tok)


@pytest.mark.parametrize("mutex", [False, True], ids=["data", "data+lock"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_scribbler_while_honest_clients_cycle(client, server, procs, seed, mutex):
    """data: header, flags, pending, states and slots (never the lock). data+lock: the lock
    word too, while other processes hold it and take it (only atomics touch it: a wrong lock
    for a moment, never a crash)."""
    size, nhonest = 3, 3
    name = f"a-scrib-{seed}-{int(mutex)}"
    pool = fast_pool(client, name, size)
    ctx = fork_ctx()
    errors = ctx.Queue()
    for _ in range(nhonest):
        p = ctx.Process(target=honest_churn, args=(pool, 3.0, errors))
        procs.append(p)
        p.start()
    s, _ = start_ready(procs, random_scribbler, pool, 1.5, seed, mutex)
    s.join(10)
    alive_and_serving(client, server, name + "-other")
    for p in procs:
        p.join(15)
        assert p.exitcode == 0, p.exitcode
    assert errors.empty(), errors.get()
    alive_and_serving(client, server, name + "-other")
    pool._where = None  # our own mapping may have kept a scribbled take: map afresh
    try:
        wait_until(lambda: accounted(pool, size), timeout=10, what="every unit accounted")
    except AssertionError:
        st = pool.stats()
        raise AssertionError(f"not every unit came back: free={pool.free()} "
                             f"nusing={st['nusing']} nwaiting={st['nwaiting']} "
                             f"fast={st['fast']} using={st['using']}") from None
    can_take_all(pool, size)
    wait_until(lambda: pool.stats()["fast"]["free"] == size, timeout=10, what="fast again")
    tok = pool.get(timeout=5)
    assert type(tok) is FastToken, "the fast path is back after the repairs"
    pool.put(tok)


def holder_of_one(pool: Any, ready: Any) -> None:
    tok = pool.get(timeout=10)
    ready.put((os.getpid(), type(tok).__name__, getattr(tok, "slot", -1)))
    while True:
        time.sleep(3600)


def test_fastgive_and_fastpoke_floods(client, server, procs):
    """FastGive of another's slot (its live generation), of random slots and generations, of
    other pool ids, and FastPoke floods: nothing is freed that its holder did not give, and
    the supervisor keeps serving."""
    size = 2
    pool = fast_pool(client, "a-flood", size)
    _, (vpid, kind, vslot) = start_ready(procs, holder_of_one, pool)
    assert kind == "FastToken"
    t0 = time.monotonic()
    attackers = [start_ready(procs, flood_gives_and_pokes, pool, vslot, 3000, seed,
                             timeout=30)[0] for seed in range(2)]
    alive_and_serving(client, server, "a-flood-other")
    for p in attackers:
        p.join(10)
    assert time.monotonic() - t0 < 20
    mine = pool.get(timeout=5)
    with pytest.raises(TimeOut):
        pool.get(timeout=0.2)  # the victim still holds its unit: 2 out, not 3
    s = pool.stats()
    assert s["nusing"] == 2 and vpid in [u["pid"] for u in s["using"]], s["using"]
    pool.put(mine)
    os.kill(vpid, signal.SIGKILL)
    wait_until(lambda: accounted(pool, size), what="every unit accounted")
    can_take_all(pool, size)
    alive_and_serving(client, server, "a-flood-other")


def test_fastmap_abuse(client, server, procs):
    """FastMap for pools that do not exist, for a pool that is not a token pool, for
    another process's connection, and with fields of the wrong types: refused, and the
    supervisor keeps serving."""
    pool = fast_pool(client, "a-map", 1)
    objs = client.pool("a-map-objs", lambda i: i, max_size=1) \
        if hasattr(client, "pool") else None
    own = client._channel().conn_id
    _, (vpid, _, _) = start_ready(procs, holder_of_one, pool)
    s = pool.stats()
    other_conn = next(u["holder"]["conn"] for u in s["using"] if u["pid"] == vpid)
    assert fastmap(client, pool._id, own).startswith("OK fds=1")
    assert fastmap(client, pool._id, other_conn).startswith("ERR")
    assert fastmap(client, 987654, own).startswith("ERR")
    if objs is not None:
        assert fastmap(client, objs._id, own).startswith("ERR")
    for bad_pool, bad_conn in ((pool._id, [1]), ({}, own), (pool._id, float("nan")),
                               (pool._id, 2**200), (-1, -1), (pool._id, -1)):
        assert fastmap(client, bad_pool, bad_conn) in ("closed", "ERR fds=0"), \
            (bad_pool, bad_conn)
        alive_and_serving(client, server, "a-map-other")
    os.kill(vpid, signal.SIGKILL)
    wait_until(lambda: accounted(pool, 1), what="every unit accounted")
    can_take_all(pool, 1)


def churn_forever(pool: Any, ready: Any) -> None:
    pool.put(pool.get(timeout=10))
    ready.put(os.getpid())
    while True:
        try:
            tok = pool.get(timeout=1)
        except TimeOut:
            continue
        pool.put(tok)


def test_sigkill_storm_at_random_points(client, server, procs):
    """Processes cycling get/put, SIGKILLed at random moments (inside take, give, the
    mutex, a slow-mode get on its way): every unit comes back, never more than max_size
    out meanwhile."""
    size, rounds, nproc = 2, 6, 5
    pool = fast_pool(client, "a-storm", size)
    rnd = random.Random(7)
    ctx = fork_ctx()
    for _ in range(rounds):
        batch = []
        for _ in range(nproc):
            ready = ctx.Queue()
            p = ctx.Process(target=churn_forever, args=(pool, ready))
            procs.append(p)
            p.start()
            batch.append((p, ready))
        for _, ready in batch:
            ready.get(timeout=10)
        for p, _ in batch:
            time.sleep(rnd.uniform(0.0, 0.03))
            st = pool.stats()
            assert st["nusing"] <= size, st["using"]
            assert p.pid is not None
            os.kill(p.pid, signal.SIGKILL)
        for p, _ in batch:
            p.join(5)
    alive_and_serving(client, server, "a-storm-other")
    wait_until(lambda: accounted(pool, size), timeout=10, what="every unit accounted")
    can_take_all(pool, size)
    # The puts of can_take_all are one-way messages: wait until the supervisor has parked
    # the tokens again, else this get may look at the region before it does (a test race).
    wait_until(lambda: pool.stats()["fast"]["free"] == size, what="fast again")
    tok = pool.get(timeout=5)
    assert type(tok) is FastToken
    pool.put(tok)


def hold_other(address: str, ready: Any) -> None:
    """An honest process that holds a token of *another* pool (the normal path)."""
    c = mppool.connect(address)
    tok = c.token_pool("other", fast=False).get(timeout=10)
    ready.put((os.getpid(), repr(tok)))
    while True:
        time.sleep(3600)


def forge_holder(address: str, victim_pid: int, victim_conn: int, ready: Any) -> None:
    """Take a fast token of "api", then write the victim's connection and pid into its slot,
    with a start long ago: the supervisor's lease-age killer sees a lease of the victim's."""
    c = mppool.connect(address)
    pool = c.token_pool("api", fast=True)
    tok = pool.get(timeout=10)
    assert type(tok) is FastToken
    region = pool._where[1]
    gen = region.slot(tok.slot)[0]
    region.write_holder(tok.slot, gen, victim_conn, victim_pid, 0.0, 0.0)
    ready.put(os.getpid())
    while True:
        time.sleep(3600)


def test_a_forged_holder_does_not_get_another_process_killed(tmp_path, sockdir, procs):
    """kill_holder terminates the holder of a fast lease held too long, by the pid of its
    connection. The slot's conn and pid are written by clients: a client of "api" that
    writes another process's connection and pid into its own slot must not get the
    supervisor to SIGTERM that process (which does not even use "api")."""
    from test_console import Served
    srv = Served(tmp_path, sockdir, {"api": {"kind": "token", "max_size": 1,
                                             "max_using_delay": 0.2,
                                             "max_using_delay_kill": 0.5,
                                             "kill_holder": True},
                                     "other": {"kind": "token", "max_size": 1}})
    try:
        client = mppool.connect(srv.address)
        victim, (vpid, _) = start_ready(procs, hold_other, srv.address)
        using = client.stats()["other"]["using"]
        vconn = next(u["holder"]["conn"] for u in using if u["pid"] == vpid)
        start_ready(procs, forge_holder, srv.address, vpid, vconn)
        wait_until(lambda: client.stats()["api"]["nkilled"] >= 1 or not victim.is_alive(),
                   timeout=5, what="the forged lease killed")
        victim.join(0.5)  # a SIGTERM on its way would end it within that
        assert victim.is_alive(), "the supervisor terminated a process that held no fast lease"
        client.close()
    finally:
        srv.stop()


def test_a_forged_owner_naming_a_live_client_loses_nothing(client, server, procs):
    """A client writes the tid of another, live, client's thread as the lock's owner, and
    exits. That thread runs (it is not stopped), so it cannot be inside a critical section of
    nanoseconds for three watchdog scans: the supervisor frees the lock, and the parked unit
    is served while the victim lives on (random scribbling of the lock word produced such
    owners: a byte changed in a live tid names a neighbouring process of the same test)."""
    size = 2
    pool = fast_pool(client, "a-live-owner", size)
    _, (vpid, _, _) = start_ready(procs, holder_of_one, pool)
    p, _ = start_ready(procs, scribble_lock_word, pool, vpid)
    p.join(5)
    alive_and_serving(client, server, "a-live-owner-other")
    tok = pool.get(timeout=10)  # the unit that is not the victim's, while the victim lives
    with pytest.raises(TimeOut):
        pool.get(timeout=0.3)  # ...and only that one: the victim still holds its own
    pool.put(tok)
    os.kill(vpid, signal.SIGKILL)  # the victim's own unit comes back when it dies
    can_take_all(pool, size)


def test_no_reset_of_a_client_stopped_inside_the_mutex(client, procs):
    """A client stopped inside the mutex for longer than three watchdog scans is its real
    owner: the supervisor must wait for it, not set the mutex up again under it."""
    from test_fastpath_stopped import stop_inside_the_mutex, wait_stopped
    pool = fast_pool(client, "a-stopped", 1)
    _, spid = start_ready(procs, stop_inside_the_mutex, pool)
    wait_stopped(spid)
    region = pool._where[1]
    with pytest.raises(TimeOut):
        pool.get(timeout=1.0)  # five scans: the parked token waits for the stopped owner
    assert region.owner_tid() in (-1, spid)
    assert pool.stats()["fast"]["repairs"] == 0
    os.kill(spid, signal.SIGCONT)
    tok = pool.get(timeout=5)
    pool.put(tok)
    wait_until(lambda: accounted(pool, 1), what="the unit back")


def cycle_for(pool: Any, seconds: float, errors: Any) -> None:
    """get/put for ``seconds``; TimeOut and PoolClosed (a shutdown) are expected."""
    from mppool.errors import PoolClosed
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            try:
                tok = pool.get(timeout=0.3)
            except TimeOut:
                continue
            except (PoolClosed, mppool.ServerUnavailable):
                break
            pool.put(tok)
    except BaseException as exc:
        errors.put(repr(exc))
    os._exit(0)


def test_resize_pause_resume_while_fast_clients_cycle(client, server, procs):
    size, nproc = 3, 4
    pool = fast_pool(client, "a-rpr", size)
    ctx = fork_ctx()
    errors = ctx.Queue()
    for _ in range(nproc):
        p = ctx.Process(target=cycle_for, args=(pool, 2.5, errors))
        procs.append(p)
        p.start()
    rnd = random.Random(3)
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        op = rnd.choice(("up", "down", "pause"))
        if op == "pause":
            assert client.pause("a-rpr")
            time.sleep(0.02)
            assert client.resume("a-rpr")
        else:
            pool.resize(rnd.choice((1, 2, 4, 5)) if op == "down" else size + 2)
        st = pool.stats()
        assert st["nusing"] <= max(st["max_size"], size + 2), st
    pool.resize(size)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert errors.empty(), errors.get()
    wait_until(lambda: accounted(pool, size), timeout=10, what="every unit accounted")
    can_take_all(pool, size)
    pool.shutdown()


def test_shutdown_while_fast_clients_cycle(client, server, procs):
    pool = fast_pool(client, "a-shut", 2)
    ctx = fork_ctx()
    errors = ctx.Queue()
    for _ in range(4):
        p = ctx.Process(target=cycle_for, args=(pool, 10.0, errors))
        procs.append(p)
        p.start()
    wait_until(lambda: pool.stats()["fast"]["clients"] >= 4, what="the clients mapped")
    pool.shutdown()
    for p in procs:
        p.join(10)
        assert p.exitcode == 0, "a fast client kept going (or hung) after the shutdown"
    assert errors.empty(), errors.get()
    alive_and_serving(client, server, "a-shut-other")


def test_late_put_after_the_connection_was_reopened(client, server):
    pool = fast_pool(client, "a-reopen", 1)
    tok = pool.get()
    assert type(tok) is FastToken
    client._channel().close()  # the lease channel goes: the supervisor takes the unit back
    wait_until(lambda: accounted(pool, 1), what="the unit back")
    mine = pool.get(timeout=5)  # on a new channel (and a new mapping)
    pool.put(tok)  # the old token, late: a no-op
    with pytest.raises(TimeOut):
        pool.get(timeout=0.2)
    pool.put(mine)
    wait_until(lambda: accounted(pool, 1), what="the unit back")
    can_take_all(pool, 1)

