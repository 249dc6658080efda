"""Cluster pools against the real Redis: supervisors on this machine with distinct host ids
share one token pool; processes are killed and frozen on purpose.

Every test uses its own key prefix (cleaned at the end). What each test measured (peaks,
reclaim times, FIFO order) is printed, for the record (``pytest -s``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_kit import (
    TTL,
    Sampler,
    clean_prefix,
    live_leases,
    new_prefix,
    peak_overlap,
    queue_key,
    sigkill,
    start_supervisor,
    start_workers,
    wait_released,
)
from helpers import fork_ctx, wait_until

import mppool
from mppool.errors import ServerUnavailable, TimeOut

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.kill]

CAP = 3


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    p = new_prefix()
    yield p
    clean_prefix(redis_url, p)


@pytest.fixture
def servers(reap: None) -> Iterator[list[mppool.Server]]:
    started: list[mppool.Server] = []
    yield started
    for s in started:
        if s.pid is not None:
            try:
                os.kill(s.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        s.shutdown()


def _record(msg: str) -> None:
    print(f"\n[cluster figures] {msg}")


@pytest.mark.parametrize("nsup", [2, 4])
def test_cap_holds_across_supervisors(nsup: int, redis_url: str, prefix: str,
                                      servers: list[Any], procs: list[Any],
                                      tmp_path: Path) -> None:
    """16 workers over 2 or 4 supervisors, a cluster budget of 3: Redis, every supervisor
    and the workers' own logs never see more than 3 held, and every unit comes back."""
    for i in range(nsup):
        servers.append(start_supervisor(redis_url, prefix, f"h{i}"))
    clients = [s.client() for s in servers]
    try:
        for c in clients:
            c.token_pool("db", CAP, scope="cluster")
        with Sampler(redis_url, prefix, "db", clients) as sampler:
            workers = []
            for s in servers:
                workers += start_workers(procs, s, "db", CAP, tmp_path, 16 // nsup,
                                         hold=0.002, seconds=4.0)
            for p in workers:
                p.join(30)
                assert p.exitcode == 0
        peak, n = peak_overlap(tmp_path)
        stats = [c.stats()["db"] for c in clients]
        hosts = stats[0]["cluster"]["hosts"]
    finally:
        for c in clients:
            c.close()
    _record(f"{nsup} supervisors, 16 workers, cap {CAP}: {n} holds; peak held by workers "
            f"{peak}/{CAP}, peak in Redis {sampler.peak_redis}/{CAP} ({sampler.samples} "
            f"samples), peak on one supervisor {sampler.peak_host}/{CAP}")
    assert n > 50, "the workers barely got anything"
    assert sampler.samples > 100 and sampler.errors == 0
    assert 1 <= peak <= CAP
    assert sampler.peak_redis <= CAP
    assert sampler.peak_host <= CAP
    assert all(s["lost_leases"] == 0 for s in stats)
    # Every hold was a borrow (a grant that reached a get which had just timed out is
    # borrowed and given back unseen by the worker's log).
    assert sum(s["nborrows"] for s in stats) >= n
    assert not hosts or set(hosts) <= {f"h{i}" for i in range(nsup)}
    wait_released(redis_url, prefix, "db", 5.0)


def _fifo_waiter(address: Any, authkey: bytes, name: str, log: str, ready: Any) -> None:
    client = mppool.connect(address, authkey)
    tokens = client.token_pool(name, 1, scope="cluster")
    ready.put(os.getpid())
    tok = tokens.get(timeout=30)
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {time.monotonic():.6f}\n")
    time.sleep(0.02)
    tokens.put(tok)
    client.close()


def test_fifo_across_supervisors(redis_url: str, prefix: str, servers: list[Any],
                                 procs: list[Any], tmp_path: Path) -> None:
    """Waiters queued one after the other on three supervisors are served in that order."""
    import redis

    for i in range(3):
        servers.append(start_supervisor(redis_url, prefix, f"f{i}"))
    holder_client = servers[0].client()
    r = redis.Redis.from_url(redis_url)
    try:
        tokens = holder_client.token_pool("one", 1, scope="cluster")
        tok = tokens.get(timeout=5)
        ctx = fork_ctx()
        order = []
        log = str(tmp_path / "order.log")
        for i in range(9):
            sup = servers[[1, 2, 0][i % 3]]
            ready = ctx.Queue()
            p = ctx.Process(target=_fifo_waiter, args=(sup.address, sup.authkey, "one", log, ready))
            procs.append(p)
            p.start()
            order.append(ready.get(timeout=20))
            # Queued in Redis before the next one starts.
            wait_until(lambda i=i: r.zcard(queue_key(prefix, "one")) == i + 1, 10,
                       what=f"waiter {i} queued")
        tokens.put(tok)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        served = [int(line.split()[0]) for line in Path(log).read_text().splitlines()]
    finally:
        holder_client.close()
        r.close()
    _record(f"FIFO: queued {order} (supervisors f1,f2,f0,...), served {served}")
    assert served == order


def _holder(address: Any, authkey: bytes, name: str, cap: int, ready: Any) -> None:
    client = mppool.connect(address, authkey)
    tokens = client.token_pool(name, cap, scope="cluster")
    tokens.get(timeout=10)
    ready.put(os.getpid())
    time.sleep(600)  # holds until killed


def _waiter_timed(address: Any, authkey: bytes, name: str, cap: int, out: Any,
                  ready: Any) -> None:
    client = mppool.connect(address, authkey)
    tokens = client.token_pool(name, cap, scope="cluster")
    ready.put(os.getpid())
    try:
        tokens.get(timeout=30)
        out.put(time.monotonic())
    except Exception as exc:
        out.put(repr(exc))
    client.close()


def _start(procs: list[Any], target: Any, *args: Any) -> tuple[Any, Any]:
    ctx = fork_ctx()
    ready = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, ready))
    procs.append(p)
    p.start()
    return p, ready.get(timeout=20)


def test_dead_worker_unit_back_at_once(redis_url: str, prefix: str, servers: list[Any],
                                       procs: list[Any]) -> None:
    """SIGKILL a holder on one host: a waiter on another host gets its unit in milliseconds."""
    import redis

    a = start_supervisor(redis_url, prefix, "a")
    b = start_supervisor(redis_url, prefix, "b")
    servers += [a, b]
    r = redis.Redis.from_url(redis_url)
    times = []
    try:
        for _ in range(3):
            holder, _ = _start(procs, _holder, a.address, a.authkey, "k", 1)
            out = fork_ctx().Queue()
            waiter, _ = _start(procs, _waiter_timed, b.address, b.authkey, "k", 1, out)
            wait_until(lambda: r.zcard(queue_key(prefix, "k")) == 1, 10, what="waiter queued")
            t0 = time.monotonic()
            sigkill(holder.pid)
            got = out.get(timeout=10)
            assert isinstance(got, float), got
            times.append(got - t0)
            waiter.join(10)
            holder.join(5)
    finally:
        r.close()
    _record("dead worker: unit back on another host after "
            + ", ".join(f"{t * 1000:.1f} ms" for t in times))
    assert max(times) < 1.0  # milliseconds in practice: a generous margin for a busy machine


def test_dead_host_units_back_within_ttl(redis_url: str, prefix: str, servers: list[Any],
                                         procs: list[Any]) -> None:
    """SIGKILL a supervisor and its workers: their units come back within the lease TTL plus
    one renewal period, and waiters on another supervisor get them."""
    a = start_supervisor(redis_url, prefix, "dead")
    b = start_supervisor(redis_url, prefix, "live")
    servers += [a, b]
    holders = [_start(procs, _holder, a.address, a.authkey, "h", 2)[0] for _ in range(2)]
    out = fork_ctx().Queue()
    waiters = [_start(procs, _waiter_timed, b.address, b.authkey, "h", 2, out)[0]
               for _ in range(2)]
    import redis

    with redis.Redis.from_url(redis_url) as r:
        wait_until(lambda: r.zcard(queue_key(prefix, "h")) == 2, 10, what="waiters queued")
    t0 = time.monotonic()
    sigkill(a.pid)  # the supervisor first: nobody is left to give the units back
    for h in holders:
        sigkill(h.pid)
    got = [out.get(timeout=TTL * 4 + 10) for _ in waiters]
    assert all(isinstance(g, float) for g in got), got
    back = max(got) - t0  # type: ignore[operator]
    _record(f"dead host: its 2 units back on another host after {back:.3f} s "
            f"(lease TTL {TTL} s, renewal every {TTL / 3:.2f} s)")
    assert back <= TTL + TTL / 3 + 1.0  # + a margin for a busy machine
    a.shutdown()  # reaps the killed child; nothing to stop


def _hold_until(address: Any, authkey: bytes, name: str, cap: int, go: Any, out: Any,
                ready: Any) -> None:
    client = mppool.connect(address, authkey)
    tokens = client.token_pool(name, cap, scope="cluster")
    tok = tokens.get(timeout=10)
    ready.put(os.getpid())
    go.wait(60)
    tokens.put(tok)  # the lease was lost meanwhile: ignored
    out.put("returned")
    client.close()


def test_frozen_supervisor_loses_its_leases(redis_url: str, prefix: str, servers: list[Any],
                                            procs: list[Any]) -> None:
    """SIGSTOP a supervisor past its TTL: its lease lapses and another host takes the unit;
    after SIGCONT the lease is found lost (counted, logged), its holder's return is
    ignored, and Redis never held more than the cap."""
    a = start_supervisor(redis_url, prefix, "frozen")
    b = start_supervisor(redis_url, prefix, "other")
    servers += [a, b]
    ca, cb = a.client(), b.client()
    ctx = fork_ctx()
    go = ctx.Event()
    out = ctx.Queue()
    try:
        ca.token_pool("s", 1, scope="cluster")
        with Sampler(redis_url, prefix, "s") as sampler:
            holder, _ = _start(procs, _hold_until, a.address, a.authkey, "s", 1, go, out)
            tb = cb.token_pool("s", 1, scope="cluster")
            os.kill(a.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                tok = tb.get(timeout=TTL * 4)  # the frozen host's lease lapses
                took = time.monotonic() - t0
            finally:
                os.kill(a.pid, signal.SIGCONT)
            stats = wait_until(lambda: (s := ca.stats()["s"])["lost_leases"] >= 1 and s, 10,
                               what="the lost lease counted")
            assert stats["nusing"] == 0  # the holder is no longer counted as holding
            go.set()
            assert out.get(timeout=10) == "returned"
            holder.join(10)
            # The ignored return gave nothing back: b's unit is still the only one out.
            with pytest.raises(TimeOut):
                tb.get(timeout=0.5)
            tb.put(tok)
        after = ca.stats()["s"]
    finally:
        ca.close()
        cb.close()
    _record(f"frozen supervisor: other host got the unit after {took:.3f} s; lost_leases="
            f"{after['lost_leases']}; peak in Redis {sampler.peak_redis}/1")
    assert after["lost_leases"] == 1
    assert sampler.peak_redis <= 1


def test_redis_restart_mid_traffic(tmp_path: Path, servers: list[Any], procs: list[Any]) -> None:
    """A private redis-server stops and starts again: cluster gets raise ServerUnavailable
    within their timeout, host pools keep working, and service resumes."""
    from cluster_kit import PrivateRedis

    with PrivateRedis(tmp_path) as rs:
        sup = start_supervisor(rs.url, "restart", "r1")
        servers.append(sup)
        c = sup.client()
        try:
            tokens = c.token_pool("c", 2, scope="cluster")
            local = c.token_pool("local", 2)
            for _ in range(50):
                tokens.put(tokens.get(timeout=2))
            workers = start_workers(procs, sup, "c", 2, tmp_path, 4, hold=0.002, seconds=8.0)
            wait_until(lambda: peak_overlap(tmp_path)[1] > 20, 10, what="traffic")
            rs.stop()
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailable):
                tokens.get(timeout=1.0)
            failed_in = time.monotonic() - t0
            for _ in range(50):  # the host pool does not care
                local.put(local.get(timeout=1))
            rs.start()
            t1 = time.monotonic()

            def served() -> bool:
                try:
                    tokens.put(tokens.get(timeout=1.0))
                    return True
                except ServerUnavailable:
                    return False

            wait_until(served, 15, interval=0.1, what="cluster gets served again")
            resumed = time.monotonic() - t1
            for _ in range(50):
                tokens.put(tokens.get(timeout=2))
            # A frozen Redis (SIGSTOP) answers nothing: gets still end within their timeout.
            rs.proc.send_signal(signal.SIGSTOP)
            try:
                t2 = time.monotonic()
                with pytest.raises(ServerUnavailable):
                    tokens.get(timeout=1.0)
                frozen_in = time.monotonic() - t2
                local.put(local.get(timeout=1))
            finally:
                rs.proc.send_signal(signal.SIGCONT)
            wait_until(served, 15, interval=0.1, what="cluster gets served after SIGCONT")
            peak, nholds = peak_overlap(tmp_path)
            for p in workers:
                p.join(30)
            assert sum(1 for line in (tmp_path).glob("w-*.log")) == 4
        finally:
            c.close()
    _record(f"Redis restart: a cluster get failed with ServerUnavailable after {failed_in:.3f} s "
            f"(timeout 1 s); served again {resumed:.3f} s after Redis came back; with Redis "
            f"frozen a get failed after {frozen_in:.3f} s; 4 workers made {nholds} holds "
            f"meanwhile, peak held by them {peak}/2 (Redis lost every lease in the restart: "
            "holders from before it overlap those after, the documented failover window)")
    assert failed_in < 1.0 + 1.0
    assert frozen_in < 1.0 + 1.0


def test_scope_errors_name_the_problem(client: Any) -> None:
    with pytest.raises(ValueError, match="scope must be one of"):
        client.token_pool("x", 2, scope="galaxy")
    with pytest.raises(ValueError, match="needs a supervisor started with a cluster"):
        client.token_pool("x", 2, scope="cluster")
    with pytest.raises(ValueError, match="cluster must be a Redis URL"):
        mppool.Server(cluster="http://nope")
    with pytest.raises(ValueError, match="cluster_lease_ttl"):
        mppool.Server(cluster="redis://127.0.0.1:6379/0", cluster_lease_ttl=0)


def test_max_size_is_the_clusters(redis_url: str, prefix: str, servers: list[Any]) -> None:
    servers += [start_supervisor(redis_url, prefix, "m1"), start_supervisor(redis_url, prefix, "m2")]
    c1, c2 = servers[0].client(), servers[1].client()
    try:
        c1.token_pool("m", 3, scope="cluster")
        with pytest.raises(ValueError, match="max_size=3 in the cluster"):
            c2.token_pool("m", 4, scope="cluster")
        assert c2.token_pool("m", 3, scope="cluster").free() == 3
    finally:
        c1.close()
        c2.close()


def test_asyncio_client_and_unreachable_redis_at_start(redis_url: str, prefix: str,
                                                        servers: list[Any]) -> None:
    """The asyncio client takes cluster tokens too; a supervisor whose Redis is not there
    starts, serves its host pools, and says ServerUnavailable for cluster pools."""
    import asyncio

    from helpers import free_port

    import mppool.aio

    sup = start_supervisor(redis_url, prefix, "aio")
    down = start_supervisor(f"redis://127.0.0.1:{free_port()}/0", prefix, "down")
    servers += [sup, down]

    async def run() -> None:
        async with await mppool.aio.connect(sup.address, sup.authkey) as c:
            tokens = await c.token_pool("a", 2, scope="cluster")
            toks = [await tokens.get(timeout=5) for _ in range(2)]
            with pytest.raises(TimeOut):
                await tokens.get(timeout=0.2)
            for t in toks:
                await tokens.put(t)
            assert (await tokens.stats())["nborrows"] == 2

    asyncio.run(run())
    with down.client() as c:
        with pytest.raises(ServerUnavailable, match="cannot reach the cluster's Redis"):
            c.token_pool("a", 2, scope="cluster")
        local = c.token_pool("local", 1)
        local.put(local.get(timeout=1))


def test_dead_waiter_leaves_the_queue_at_once(redis_url: str, prefix: str, servers: list[Any],
                                              procs: list[Any]) -> None:
    """A worker SIGKILLed while queued costs nothing: its ticket leaves the Redis queue at
    once, and the unit goes to the next waiter, on another host."""
    import redis

    a = start_supervisor(redis_url, prefix, "qa")
    b = start_supervisor(redis_url, prefix, "qb")
    servers += [a, b]
    ca = a.client()
    r = redis.Redis.from_url(redis_url)
    try:
        tokens = ca.token_pool("q", 1, scope="cluster")
        tok = tokens.get(timeout=5)
        out = fork_ctx().Queue()
        doomed, _ = _start(procs, _waiter_timed, b.address, b.authkey, "q", 1, out)
        wait_until(lambda: r.zcard(queue_key(prefix, "q")) == 1, 10, what="first waiter queued")
        survivor, _ = _start(procs, _waiter_timed, a.address, a.authkey, "q", 1, out)
        wait_until(lambda: r.zcard(queue_key(prefix, "q")) == 2, 10, what="second waiter queued")
        t0 = time.monotonic()
        sigkill(doomed.pid)
        wait_until(lambda: r.zcard(queue_key(prefix, "q")) == 1, 5, what="dead waiter's ticket gone")
        gone = time.monotonic() - t0
        tokens.put(tok)
        got = out.get(timeout=10)
        assert isinstance(got, float), got
        survivor.join(10)
        assert survivor.exitcode == 0
        wait_until(lambda: live_leases(r, prefix, "q") == 0, 5, what="the unit back")
    finally:
        ca.close()
        r.close()
    _record(f"dead waiter: its ticket left the Redis queue after {gone * 1000:.1f} ms")
    assert gone < 1.0
