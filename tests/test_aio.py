"""mppool.aio: the asyncio client against a real supervisor.

Cancellation safety is the heart of it: a task cancelled at any point of ``get()`` leaves no
waiter queued and no unit stranded or held twice. ``MPPOOL_AIO_CHAOS`` raises the number of
cancellations of the chaos test (default 3000).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import mppool
import mppool.aio
import mppool.client
from mppool.aio import AsyncSharedPool

pytestmark = pytest.mark.slow


def run(coro: Awaitable[Any], debug: bool = False) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60), debug=debug)  # type: ignore[arg-type]


async def until(pred: Callable[[], Awaitable[bool]], what: str, timeout: float = 5.0) -> None:
    """Wait on observable state, with a deadline."""
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def make(i: int) -> dict[str, int]:
    return {"i": i}


async def check_balance(pool: AsyncSharedPool, held: list[dict[str, int]], max_size: int) -> None:
    """out + available == max_size, and no unit held twice (by us or in the supervisor)."""
    st = await pool.stats()
    using = [u["trace"] for u in st["using"]]
    assert len(using) == len(set(using)), f"a unit is held twice: {using}"
    assert sorted(using) == sorted(str(o) for o in held)
    assert st["nwaiting"] == 0, "a waiter was left behind"
    assert len(held) + await pool.free() == max_size


# ------------------------------------------------------------------------ the API


def test_api_roundtrip(server):
    async def main() -> None:
        async with await mppool.aio.connect(server.address, server.authkey) as client:
            pool = await client.pool("api", make, max_size=2)
            o = await pool.get()
            assert o == {"i": 0}
            assert (await pool.stats())["nusing"] == 1
            await pool.ret(o)
            async with pool.obj() as o2, pool.item(timeout=1) as o3:
                assert {o2["i"], o3["i"]} == {0, 1}
                assert await pool.free() == 0
            assert await pool.free() == 2
            assert await pool.waiting() == 0
            assert set(await client.stats()) == {"api"}
            same = await client.pool("api")  # attach
            assert same is pool
            tokens = await client.token_pool("tok", max_size=3)
            t = await tokens.get()
            await tokens.put(t)
            await pool.resize(3)
            assert (await pool.stats())["max_size"] == 3
            with pytest.raises(mppool.TimeOut):
                held = [await pool.get() for _ in range(3)]
                await pool.get(timeout=0)
            for h in held:
                await pool.ret(h)
            with pytest.raises(TypeError, match="unknown pool option"):
                await client.pool("bad", make, nope=1)
            with pytest.raises(NotImplementedError):
                await client.pool("px", make, transfer="proxy")
            await pool.shutdown()
            with pytest.raises(mppool.PoolClosed):
                await pool.get(timeout=0)

    run(main())


def test_wrong_key_and_no_server(server, tmp_path):
    async def main() -> None:
        with pytest.raises(mppool.ServerUnavailable, match="key"):
            await mppool.aio.connect(server.address, os.urandom(16))
        with pytest.raises(mppool.ServerUnavailable):
            await mppool.aio.connect(str(tmp_path / "none.sock"), os.urandom(16))

    run(main())


# ------------------------------------------------------------------------ cancellation


def test_cancelled_queued_get_leaves_no_waiter(server):
    async def main() -> None:
        async with await mppool.aio.connect(server.address, server.authkey) as client:
            pool = await client.pool("cq", make, max_size=1)
            held = await pool.get()
            task = asyncio.create_task(pool.get())
            await until(lambda: _eq(pool.waiting(), 1), "the get to be queued")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: _eq(pool.waiting(), 0), "the waiter to be withdrawn")
            await pool.ret(held)
            await check_balance(pool, [], 1)
            assert await pool.get(timeout=0) == held  # nobody took it on the way

    run(main())


async def _eq(aw: Awaitable[Any], value: Any) -> bool:
    return await aw == value


def test_timeout_and_wait_for_around_get(server):
    async def main() -> None:
        async with await mppool.aio.connect(server.address, server.authkey) as client:
            pool = await client.pool("to", make, max_size=1)
            held = await pool.get()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await pool.get()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.get(), 0.05)
            with pytest.raises(mppool.TimeOut):
                await pool.get(timeout=0.05)  # the pool's own deadline
            await until(lambda: _eq(pool.waiting(), 0), "no waiter left")
            await pool.ret(held)
            await check_balance(pool, [], 1)

    run(main())


def test_grant_crossing_a_cancel_goes_back(server):
    """The unit is returned (the grant is sent) just as the waiting task is cancelled."""
    async def main() -> None:
        async with await mppool.aio.connect(server.address, server.authkey) as client:
            pool = await client.pool("cross", make, max_size=1)
            chan = await client._channel()
            for _ in range(20):
                held = await pool.get()
                task = asyncio.create_task(pool.get())
                await until(lambda: _eq(pool.waiting(), 1), "the get to be queued")
                await pool.ret(held)  # the supervisor grants it to the queued get...
                task.cancel()  # ...which the task gives up before seeing it
                with pytest.raises(asyncio.CancelledError):
                    await task
                await until(lambda: _eq(pool.free(), 1), "the unit to come back")
                await check_balance(pool, [], 1)
            assert chan.late_returned >= 1  # the late grant was given back

    run(main())


def test_cancel_inside_obj_returns_the_unit(server):
    async def main() -> None:
        async with await mppool.aio.connect(server.address, server.authkey) as client:
            pool = await client.pool("inobj", make, max_size=1)
            inside = asyncio.Event()

            async def user() -> None:
                async with pool.obj():
                    inside.set()
                    await asyncio.sleep(3600)

            task = asyncio.create_task(user())
            await asyncio.wait_for(inside.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await check_balance(pool, [], 1)

    run(main())


def test_cancellation_chaos(server):
    """Cancel tasks at random points of get() (before the send, queued, granted but not yet
    delivered, inside obj()) thousands of times, then prove nothing is lost or held twice."""
    target = int(os.environ.get("MPPOOL_AIO_CHAOS", "3000"))
    max_size = 2

    async def main() -> dict[str, int]:
        async with await mppool.aio.connect(server.address, server.authkey) as client:
            pool = await client.pool("chaos", make, max_size=max_size)
            rng = random.Random(11)
            counts = {"cancelled": 0, "got": 0, "in_obj": 0}
            held: list[dict[str, int]] = []

            async def in_obj() -> None:
                async with pool.obj():
                    counts["in_obj"] += 1  # cancelled in here, mostly
                    await asyncio.sleep(0.001)

            async def worker() -> None:
                while counts["cancelled"] < target:
                    if rng.random() < 0.1:
                        task = asyncio.create_task(in_obj())
                    else:
                        task = asyncio.create_task(pool.get())
                    if rng.random() < 0.5:
                        for _ in range(rng.randrange(40)):
                            await asyncio.sleep(0)
                    else:
                        await asyncio.sleep(rng.uniform(0, 0.002))
                    task.cancel()
                    try:
                        got = await task
                    except asyncio.CancelledError:
                        counts["cancelled"] += 1
                        continue
                    if got is None:
                        continue
                    counts["got"] += 1
                    held.append(got)
                    await asyncio.sleep(0)
                    held.remove(got)
                    await pool.ret(got)

            async def audit() -> None:  # in the middle of it all
                while counts["cancelled"] < target:
                    await asyncio.sleep(0.2)
                    st = await pool.stats()
                    using = [u["trace"] for u in st["using"]]
                    assert len(using) == len(set(using)) <= max_size, using

            await asyncio.gather(*(worker() for _ in range(6)), audit())
            await until(lambda: _eq(pool.waiting(), 0), "every waiter withdrawn")
            await check_balance(pool, [], max_size)
            # Every unit obtainable at once, and distinct.
            units = [await pool.get(timeout=0) for _ in range(max_size)]
            assert len({u["i"] for u in units}) == max_size
            await check_balance(pool, units, max_size)
            for u in units:
                await pool.ret(u)
            counts["late_returned"] = (await client._channel()).late_returned
            return counts

    counts = run(main())
    print(f"\ncancellation chaos: {counts}, units lost 0, held twice 0")
    assert counts["cancelled"] >= target
    assert counts["late_returned"] > 0  # the granted-but-not-delivered case did occur


# ------------------------------------------------------------------------ the event loop


class StallDetector:
    """Times every callback the event loop runs (asyncio's ``Handle._run``, patched for
    the test), with the thread's CPU time and its voluntary context switches.

    A callback that blocks the loop (a blocking socket call, a lock, a sleep, a thread hop)
    makes the thread wait: a voluntary context switch; heavy work shows as CPU time. A
    callback that only looks long because the machine preempted the process (the suite
    runs in parallel on few cores) has neither: it is counted, not blamed.
    """

    LIMIT = 0.02

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import resource

        self.longest = 0.0  # wall time of the longest callback
        self.blocking: list[tuple[float, float, int]] = []  # (wall, cpu, voluntary switches)
        self.preempted = 0
        orig = asyncio.events.Handle._run
        usage = resource.getrusage
        who = resource.RUSAGE_THREAD
        detector = self

        def timed(handle: asyncio.Handle) -> None:
            t0, c0, v0 = time.perf_counter(), time.thread_time(), usage(who).ru_nvcsw
            try:
                orig(handle)
            finally:
                wall = time.perf_counter() - t0
                if wall >= detector.LIMIT:
                    cpu, vol = time.thread_time() - c0, usage(who).ru_nvcsw - v0
                    if vol or cpu >= detector.LIMIT:
                        detector.blocking.append((wall, cpu, vol))
                    else:
                        detector.preempted += 1
                detector.longest = max(detector.longest, wall)

        monkeypatch.setattr(asyncio.events.Handle, "_run", timed)


def test_stall_detector_sees_a_blocking_call(monkeypatch):
    detector = StallDetector(monkeypatch)

    async def blocker() -> None:
        time.sleep(0.03)  # what the client must never do

    run(blocker())
    assert detector.blocking and detector.blocking[0][2] > 0


def test_nothing_blocks_the_event_loop(server, monkeypatch):
    """8 tasks hammer a pool: no callback of the event loop blocks for 20 ms; a heartbeat
    task measures how late the loop runs it."""

    async def main() -> tuple[float, int]:
        async with await mppool.aio.connect(server.address, server.authkey) as client:
            pool = await client.pool("hammer", make, max_size=3)
            stop = time.monotonic() + 2.0
            cycles = 0
            worst = 0.0

            async def heartbeat() -> None:
                nonlocal worst
                while time.monotonic() < stop:
                    t = time.monotonic()
                    await asyncio.sleep(0.001)
                    worst = max(worst, time.monotonic() - t - 0.001)

            async def hammer() -> None:
                nonlocal cycles
                while time.monotonic() < stop:
                    async with pool.obj(timeout=5):
                        cycles += 1

            await asyncio.gather(heartbeat(), *(hammer() for _ in range(8)))
            return worst, cycles

    detector = StallDetector(monkeypatch)
    worst, cycles = run(main())
    print(f"\nloop stalls over {cycles} lease cycles: longest callback "
          f"{detector.longest * 1000:.1f} ms, heartbeat late by at most {worst * 1000:.1f} ms, "
          f"callbacks over 20 ms: {len(detector.blocking)} blocking, "
          f"{detector.preempted} preempted by the machine")
    assert cycles > 100
    assert not detector.blocking, f"callbacks blocked the loop (wall, cpu, waits): " \
                                  f"{detector.blocking}"


# ------------------------------------------------------------------------ processes


CHILD = textwrap.dedent("""
    import asyncio, os, sys, mppool.aio
    async def main():
        client = await mppool.aio.connect(os.environ["ADDR"], bytes.fromhex(os.environ["KEY"]))
        pool = await client.pool("killed")
        held = [await pool.get(timeout=5) for _ in range(2)]
        print("held", flush=True)
        await asyncio.sleep(60)
    asyncio.run(main())
""")


@pytest.mark.kill
def test_sigkilled_async_holder_gives_units_back(server):
    async def main() -> float:
        async with await mppool.aio.connect(server.address, server.authkey) as client:
            pool = await client.pool("killed", make, max_size=2)
            env = dict(os.environ, ADDR=server.address, KEY=server.authkey.hex())
            child = subprocess.Popen([sys.executable, "-c", CHILD], env=env,
                                     stdout=subprocess.PIPE, text=True)
            try:
                line = await asyncio.wait_for(
                    asyncio.get_running_loop().run_in_executor(None, child.stdout.readline), 20)
                assert line.strip() == "held"
                assert await pool.free() == 0
                os.kill(child.pid, signal.SIGKILL)  # the child this test started
                t0 = time.monotonic()
                units = [await pool.get(timeout=5) for _ in range(2)]
                back = time.monotonic() - t0
                for u in units:
                    await pool.ret(u)
                return back
            finally:
                if child.poll() is None:
                    child.kill()
                child.wait(10)
                child.stdout.close()

    back = run(main())
    assert back < 1.0, f"units came back after {back:.3f} s"


def test_restarted_supervisor_is_found_again(tmp_path):
    addr = str(tmp_path / "s.sock")
    key = os.urandom(16)
    first = mppool.Server(addr, key).start()
    second: mppool.Server | None = None
    try:
        async def before() -> tuple[mppool.aio.AsyncClient, AsyncSharedPool]:
            client = await mppool.aio.connect(addr, key)
            pool = await client.pool("again", make, max_size=2)
            await pool.ret(await pool.get())
            return client, pool

        async def main() -> None:
            nonlocal second
            client, pool = await before()
            try:
                os.kill(first.pid, signal.SIGKILL)  # the supervisor this test started
                first.shutdown()
                second = mppool.Server(addr, key).start()
                o = await pool.get(timeout=5)  # the pool is created again there
                assert (await client.info())["pid"] == second.pid
                assert (await pool.stats())["nusing"] == 1
                await pool.ret(o)
                await check_balance(pool, [], 2)
            finally:
                await client.close()

        run(main())
    finally:
        first.shutdown()
        if second is not None:
            second.shutdown()


def test_sync_and_async_clients_and_a_bare_fork(server):
    sync_client = mppool.connect(server.address, server.authkey)
    try:
        spool = sync_client.pool("both", make, max_size=2)

        async def child_main(pool: AsyncSharedPool, parent: int) -> None:
            o = await pool.get(timeout=5)
            st = await pool.stats()
            assert sorted(u["pid"] for u in st["using"]) == sorted([parent, os.getpid()])
            await pool.ret(o)
            await until(lambda: _eq(pool.free(), 1), "the child's unit back")

        async def main() -> None:
            async with await mppool.aio.connect(server.address, server.authkey) as client:
                pool = await client.pool("both")
                s = spool.get()
                a = await pool.get()
                assert s != a
                pids = {u["pid"] for u in (await pool.stats())["using"]}
                assert pids == {os.getpid()}
                spool.ret(s)
                parent = os.getpid()
                pid = os.fork()
                if pid == 0:  # the child: its own connections, never the parent's
                    code = 1
                    try:
                        asyncio.run(asyncio.wait_for(child_main(pool, parent), 20))
                        code = 0
                    except BaseException:
                        import traceback
                        traceback.print_exc()
                    finally:
                        os._exit(code)
                deadline = time.monotonic() + 20
                while True:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        break
                    if time.monotonic() > deadline:
                        os.kill(pid, signal.SIGKILL)  # the child this test forked
                        os.waitpid(pid, 0)
                        raise AssertionError("the forked child hung")
                    await asyncio.sleep(0.01)
                assert os.waitstatus_to_exitcode(status) == 0
                # The parent's connection still works, and still holds its unit.
                assert (await pool.stats())["nusing"] == 1
                await pool.ret(a)
                await check_balance(pool, [], 2)

        run(main())
    finally:
        sync_client.close()


# ------------------------------------------------------------------------ the Cancel message


def test_cancel_message_is_validated():
    from mppool import protocol as P

    payload = P.encode_cancel(5)[P.HEADER.size:]
    assert P.decode_request(payload) == P.Cancel(5)
    import pickle

    for bad in ((P.CANCEL, 0), (P.CANCEL, -1), (P.CANCEL, "x"), (P.CANCEL, 1, 2)):
        with pytest.raises(P.ProtocolError):
            P.decode_request(pickle.dumps(bad, protocol=5))


def test_cancel_of_an_unknown_or_served_get_changes_nothing(server):
    from mppool import protocol as P

    async def main() -> None:
        async with await mppool.aio.connect(server.address, server.authkey) as client:
            pool = await client.pool("unk", make, max_size=1)
            chan = await client._channel()
            held = await pool.get()
            chan.post(P.encode_cancel(987654))  # nobody's get
            chan.post(P.encode_cancel(chan.next_rid() - 1))  # a get already served
            await check_balance(pool, [held], 1)
            await pool.ret(held)
            await check_balance(pool, [], 1)

    run(main())


def test_a_client_belongs_to_its_event_loop(server):
    async def first() -> tuple[mppool.aio.AsyncClient, AsyncSharedPool]:
        client = await mppool.aio.connect(server.address, server.authkey)
        return client, await client.pool("loop", make, max_size=1)

    loop = asyncio.new_event_loop()
    try:
        client, pool = loop.run_until_complete(first())

        async def elsewhere() -> None:
            with pytest.raises(RuntimeError, match="another event loop"):
                await pool.get()

        asyncio.run(elsewhere())
        loop.run_until_complete(client.close())
    finally:
        loop.close()


# ------------------------------------------------------------------------ starting, freezing


def test_autostart_starts_one_supervisor(tmp_path):
    import psutil

    (tmp_path / "auto").mkdir(mode=0o700)  # autostart refuses a missing directory
    addr = str(tmp_path / "auto" / "s.sock")

    async def main() -> int:
        client = await mppool.aio.connect(addr, autostart=True)
        async with client, await mppool.aio.connect(addr, autostart=True) as again:
            pid = (await client.info())["pid"]
            assert (await again.info())["pid"] == pid
            pool = await client.pool("auto", make, max_size=1)
            async with pool.obj(timeout=5) as o:
                assert o == {"i": 0}
            return pid

    pid = run(main())
    try:
        assert pid != os.getpid()
    finally:  # stop the detached supervisor this test started, by its pid
        os.kill(pid, signal.SIGTERM)
        if psutil.pid_exists(pid):
            psutil.Process(pid).wait(10)


def _async(pred: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return pred()

    return check


def test_a_frozen_supervisor_cannot_hang_a_task(tmp_path):
    import psutil

    srv = mppool.Server(str(tmp_path / "f.sock")).start()
    try:
        async def main() -> None:
            # 1.5 s: under a loaded CI machine, creating the pool or answering right after
            # SIGCONT may take longer than a tighter bound; the frozen part checks it holds.
            async with await mppool.aio.connect(srv.address, srv.authkey,
                                                timeout=1.5) as client:
                pool = await client.pool("frozen", make, max_size=1)
                held = await pool.get()
                os.kill(srv.pid, signal.SIGSTOP)  # the supervisor this test started
                try:
                    proc = psutil.Process(srv.pid)
                    await until(_async(lambda: proc.status() == psutil.STATUS_STOPPED),
                                "the supervisor to stop")
                    t0 = time.monotonic()
                    with pytest.raises(mppool.ServerUnavailable, match="frozen"):
                        await client.stats()
                    assert time.monotonic() - t0 < 1.5 + 0.5
                    t0 = time.monotonic()
                    with pytest.raises(mppool.TimeOut, match="frozen"):
                        await pool.get(timeout=0.1)
                    assert time.monotonic() - t0 < 0.1 + mppool.client.GRACE + 0.5
                finally:
                    os.kill(srv.pid, signal.SIGCONT)
                await pool.ret(held)
                await until(lambda: _eq(pool.waiting(), 0), "the late get answered")
                await check_balance(pool, [], 1)

        run(main())
    finally:
        srv.shutdown()


def test_an_error_of_fun_arrives_as_its_own_class(server):
    def fun(i: int) -> Any:
        raise KeyError(f"no unit {i}")

    async def main() -> None:
        async with await mppool.aio.connect(server.address, server.authkey) as client:
            pool = await client.pool("err", fun, max_size=1)
            with pytest.raises(KeyError, match="no unit"):
                await pool.get(timeout=1)
            assert await pool.free() == 1  # the failed creation cost no slot
            with pytest.raises(ValueError):
                await client.pool("err", make, max_size=2)  # other options

    run(main())
