"""mppool.tpool: eventlet's tpool on native threads of this process (no supervisor).

Written from eventlet's documented and observable behaviour: where a call runs, what comes
back, which values are wrapped. Every test ends with ``killall`` (the fixture), so a test
that leaves a thread blocked shows up as a hung ``killall``, not as a later test's failure.
"""

from __future__ import annotations

import copy
import re
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import Runner, wait_until

import mppool
from mppool import tpool


@pytest.fixture(autouse=True)
def fresh_pool() -> Iterator[None]:
    tpool.killall()
    tpool.set_num_threads(20)
    yield
    tpool.killall()
    tpool.set_num_threads(20)


def here() -> str:
    return threading.current_thread().name


class Failure(Exception):
    pass


class Unusual(BaseException):
    """Not an Exception: eventlet's workers would die of it."""


# ---------------------------------------------------------------- execute


def test_execute_runs_on_a_pool_thread_of_this_process() -> None:
    assert tpool.execute(here).startswith("mppool-tpool-")
    assert here() == "MainThread"
    factor = 3
    assert tpool.execute(lambda a, b=0: (a + b) * factor, 1, b=2) == 9


def test_nothing_is_pickled() -> None:
    lock = threading.Lock()  # cannot be pickled, nor can a generator or a module
    gen = (i * i for i in range(3))
    assert tpool.execute(lambda: lock) is lock
    assert tpool.execute(list, gen) == [0, 1, 4]
    assert tpool.execute(lambda: re) is re


def test_exceptions_propagate_as_raised_with_their_traceback() -> None:
    def inner() -> None:
        raise Failure("from the pool")

    def outer() -> None:
        inner()

    with pytest.raises(Failure, match="from the pool") as info:
        tpool.execute(outer)
    names = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "outer" in names and names[-1] == "inner"


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), Unusual("x")])
def test_base_exceptions_propagate_and_the_worker_survives(exc: BaseException) -> None:
    tpool.set_num_threads(1)

    def raise_it() -> None:
        raise exc

    with pytest.raises(type(exc)) as info:
        tpool.execute(raise_it)
    assert info.value is exc
    assert tpool.execute(here) == tpool.execute(here)  # the same, single, living worker
    assert tpool._pool is not None and len(tpool._pool) == 1


def test_execute_checks_fn() -> None:
    with pytest.raises(TypeError, match=r"fn.*42"):
        tpool.execute(42)


def test_calls_run_concurrently_up_to_the_number_of_threads() -> None:
    tpool.set_num_threads(2)
    release = threading.Event()
    running: list[str] = []
    lock = threading.Lock()

    def block() -> str:
        with lock:
            running.append(here())
        assert release.wait(10)
        return here()

    runner = Runner()
    boxes = [runner.start(lambda: tpool.execute(block)) for _ in range(3)]
    wait_until(lambda: len(running) == 2, what="two calls running")
    pool = tpool._pool
    assert pool is not None
    wait_until(lambda: pool._pending == 1, what="the third call queued, not running")
    assert len(running) == 2 and len(pool) == 2
    release.set()
    runner.join_all(10)
    assert all("result" in b for b in boxes), boxes
    assert len({b["result"] for b in boxes}) == 2  # two threads served three calls


def test_execute_from_a_pool_thread_runs_inline() -> None:
    tpool.set_num_threads(1)  # waiting for another worker would deadlock
    outer, inner = tpool.execute(lambda: (here(), tpool.execute(here)))
    assert outer == inner


def test_zero_threads_runs_in_the_caller() -> None:
    tpool.set_num_threads(0)
    assert tpool.execute(here) == "MainThread"


def test_set_num_threads_checks_its_argument() -> None:
    with pytest.raises(ValueError, match=r"nthreads.*-1"):
        tpool.set_num_threads(-1)
    with pytest.raises(TypeError, match=r"nthreads.*'3'"):
        tpool.set_num_threads("3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nthreads.*True"):
        tpool.set_num_threads(True)
    tpool.set_num_threads(5)
    assert tpool._nthreads == 5


def test_set_num_threads_shrinks_a_running_pool() -> None:
    tpool.set_num_threads(3)
    barrier = threading.Barrier(4, timeout=10)
    runner = Runner()
    for _ in range(3):
        runner.start(lambda: tpool.execute(barrier.wait))
    barrier.wait()  # three workers exist, all were busy at once
    runner.join_all(10)
    pool = tpool._pool
    assert pool is not None and len(pool) == 3
    tpool.set_num_threads(1)
    wait_until(lambda: len(pool) == 1, what="the surplus workers gone")
    assert tpool.execute(lambda: 7) == 7


def test_killall_runs_queued_calls_then_restarts_on_demand() -> None:
    tpool.set_num_threads(1)
    gate = threading.Event()
    runner = Runner()
    first = runner.start(lambda: tpool.execute(lambda: gate.wait(10)))
    second = runner.start(lambda: tpool.execute(lambda: "queued"))
    pool = tpool._pool
    wait_until(lambda: pool is not None and pool._pending == 1, what="the second call queued")
    killer = runner.start(tpool.killall)
    gate.set()
    runner.join_all(10)
    assert "error" not in killer, killer
    assert first["result"] is True and second["result"] == "queued"
    assert pool is not None and len(pool) == 0
    tpool.setup()
    assert tpool._pool is not pool  # a new pool
    assert tpool.execute(lambda: 1) == 1


def test_killall_does_not_wait_forever_for_a_hung_call() -> None:
    tpool.set_num_threads(1)
    hang = threading.Event()
    runner = Runner()
    hung = runner.start(lambda: tpool.execute(hang.wait, 30))
    behind = runner.start(lambda: tpool.execute(lambda: "never"))
    pool = tpool._pool
    wait_until(lambda: pool is not None and pool._busy == 1 and pool._pending == 1,
               what="one call running, one queued")
    assert pool is not None
    t0 = time.monotonic()
    tpool.killall(0.2)
    assert time.monotonic() - t0 < 5  # its deadline, not the hung call's 30 s
    assert len(pool) == 1  # the hung worker, left behind
    wait_until(lambda: "error" in behind, what="the queued call failed")
    assert isinstance(behind["error"], mppool.PoolClosed)
    assert tpool.execute(lambda: "fresh") == "fresh"  # a new pool serves at once
    hang.set()
    runner.join_all(10)
    assert hung["result"] is True  # the hung call finished on its own thread
    wait_until(lambda: len(pool) == 0, what="the hung worker gone once its call returned")


def test_killall_checks_timeout() -> None:
    with pytest.raises(ValueError, match="timeout"):
        tpool.killall(-1)


# ---------------------------------------------------------------- Proxy


class Thing:
    label = "thing"
    count = 3

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.entered: list[str] = []
        self.exited: list[Any] = []

    def where(self) -> str:
        self.calls.append(here())
        return here()

    def fail(self) -> None:
        raise Failure("method failed")

    def numbers(self) -> Iterator[int]:
        for i in range(3):
            self.calls.append(here())
            yield i

    def make(self) -> Thing:
        return Thing()

    def __copy__(self) -> str:
        return f"copied on {here()}"

    def __enter__(self) -> str:
        self.entered.append(here())
        return "entered"

    def __exit__(self, t: Any, v: Any, tb: Any) -> bool:
        self.exited.append((here(), t))
        return True  # swallow


def test_proxy_forwards_calls_to_the_pool_and_attributes_directly() -> None:
    thing = Thing()
    p = tpool.Proxy(thing)
    assert p.where().startswith("mppool-tpool-")
    assert p.label == "thing" and p.count == 3
    with pytest.raises(Failure, match="method failed"):
        p.fail()
    with pytest.raises(AttributeError):
        p.never_named_like_this  # noqa: B018
    p.attribute = 1  # eventlet's Proxy sets attributes on itself, not on the object
    assert not hasattr(thing, "attribute")


def test_proxy_is_transparent_for_builtins() -> None:
    s = tpool.Proxy("whatever")
    assert str(s) == "whatever" and repr(s) == "'whatever'" and len(s) == 8
    assert s == "whatever" and s == "whatever" and s != "other"
    assert hash(s) == hash("whatever")
    assert s.join(["a", "b"]) == "awhateverb"
    assert {s: 1}["whatever"] == 1
    d = tpool.Proxy({"a": 1})
    assert str(d) == "{'a': 1}" and repr(d) == "{'a': 1}"
    with pytest.raises(TypeError, match="unhashable"):
        hash(tpool.Proxy([]))
    assert bool(tpool.Proxy([1])) and not tpool.Proxy([]) and not tpool.Proxy(0)
    assert tpool.Proxy(4) == 4
    a, b = tpool.Proxy(re).compile("."), tpool.Proxy(re).compile(".")
    assert a == b and a != re.compile("/")  # results are the real objects


def test_proxy_items_iteration_and_membership() -> None:
    p = tpool.Proxy([0, 1, 2])
    p[1] = 5
    assert p[1] == 5 and list(p) == [0, 5, 2]
    del p[0]
    assert list(p) == [5, 2] and 5 in p and 7 not in p
    with pytest.raises(IndexError):
        p[10]
    with pytest.raises(TypeError):
        p["a"]
    assert tpool.Proxy(range(4)).count(2) == 1
    assert list(tpool.Proxy(range(4))) == [0, 1, 2, 3]


def test_proxy_of_a_generator_runs_each_step_on_the_pool() -> None:
    thing = Thing()
    p = tpool.Proxy(thing.numbers())
    assert iter(p) is p  # a generator is its own iterator: the proxy too
    assert list(p) == [0, 1, 2]
    assert len(thing.calls) == 3 and all(c.startswith("mppool-tpool-") for c in thing.calls)
    callable_gen = tpool.Proxy(thing.numbers, autowrap_names=("__call__",))
    result = callable_gen()
    assert isinstance(result, tpool.Proxy)
    assert list(result) == [0, 1, 2]


def test_proxy_as_a_context_manager() -> None:
    thing = Thing()
    p = tpool.Proxy(thing)
    with p as value:
        assert value == "entered"
        raise Failure("inside")  # swallowed by Thing.__exit__
    assert thing.entered[0].startswith("mppool-tpool-")
    assert thing.exited[0][0].startswith("mppool-tpool-") and thing.exited[0][1] is Failure


def test_proxy_copy_and_call() -> None:
    p = tpool.Proxy([1, [2]])
    assert copy.copy(tpool.Proxy(Thing())).startswith("copied on mppool-tpool-")
    with pytest.raises(AttributeError):
        copy.deepcopy(p)  # a list has no __deepcopy__: as in eventlet, the call raises

    def double(x: int) -> int:
        return x * 2

    assert tpool.Proxy(double)(21) == 42
    wrapped = tpool.Proxy(double, autowrap_names=("__call__",))(2)
    assert isinstance(wrapped, tpool.Proxy) and str(wrapped) == "4"


def test_autowrap_by_type() -> None:
    p = tpool.Proxy({"a": 1, "b": "x"}, autowrap=(int,))
    got = p.get("a")
    assert isinstance(got, tpool.Proxy) and got == 1
    assert not isinstance(p.get("b"), tpool.Proxy)
    assert not isinstance(p.items(), tpool.Proxy)
    t = tpool.Proxy(Thing(), autowrap=(int, Thing))
    assert isinstance(t.count, tpool.Proxy)  # attributes too
    assert not isinstance(t.label, tpool.Proxy)
    made = t.make()
    assert isinstance(made, tpool.Proxy) and made._autowrap == (int, Thing)  # passed on
    assert isinstance(made.count, tpool.Proxy)


def test_autowrap_by_name() -> None:
    p = tpool.Proxy({"a": 1}, autowrap_names=("get",))
    assert isinstance(p.get("a"), tpool.Proxy)
    assert not isinstance(p.items(), tpool.Proxy)
    t = tpool.Proxy(Thing(), autowrap_names=("count",))
    assert isinstance(t.count, tpool.Proxy) and not isinstance(t.label, tpool.Proxy)
    both = tpool.Proxy(Thing(), autowrap=(int,), autowrap_names=("count",))
    assert isinstance(both.count, tpool.Proxy)
    assert not isinstance(both.count._obj, tpool.Proxy)  # never wrapped twice
    one = tpool.Proxy(Thing(), autowrap_names="make")  # a single name
    assert isinstance(one.make(), tpool.Proxy)


def test_a_db_api_connection_hands_out_proxied_cursors() -> None:
    import sqlite3

    conn = tpool.Proxy(tpool.execute(sqlite3.connect, ":memory:", check_same_thread=False),
                       autowrap_names=("cursor",))
    cur = conn.cursor()
    assert isinstance(cur, tpool.Proxy)
    cur.execute("select 1")
    assert cur.fetchall() == [(1,)]
    conn.close()


def test_proxy_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"autowrap.*42"):
        tpool.Proxy({}, autowrap=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"autowrap.*'int'"):
        tpool.Proxy({}, autowrap=("int",))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"autowrap_names.*1"):
        tpool.Proxy({}, autowrap_names=(1,))  # type: ignore[arg-type]
    assert tpool.Proxy({}, autowrap=int)._autowrap == (int,)


def test_proxy_call_nonblocking_runs_in_the_caller() -> None:
    assert tpool.proxy_call((), here, nonblocking=True) == "MainThread"
    assert tpool.proxy_call((), here).startswith("mppool-tpool-")
    assert isinstance(tpool.proxy_call((int,), lambda: 3), tpool.Proxy)


def test_killall_from_a_pool_thread_does_not_wait_for_itself() -> None:
    tpool.execute(lambda: None)
    old = tpool._pool
    assert old is not None
    assert tpool.execute(tpool.killall) is None  # no "cannot join current thread"
    wait_until(lambda: len(old) == 0, what="the killing worker gone once its call returned")
    assert tpool.execute(lambda: 2) == 2
