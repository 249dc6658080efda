"""mppool.pools: eventlet's pools tests (tests/pools_test.py) ported to native threads, plus the
behaviours mppool adds (timeouts, foreign items put() in, the TokenPool invariant).

Where eventlet yields to the hub (``eventlet.sleep(0)``) and relies on the other green thread
having run, these tests wait, with a deadline, until the pool shows it (``waiting()``).
"""

from __future__ import annotations

import copy as copy_module
import itertools
import logging
import pickle
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers import wait_until

from mppool import TimeOut
from mppool.pools import Pool, Token, TokenPool

DEADLINE = 10.0  # seconds; only reached when something is broken


class Worker:
    """A thread whose result or exception comes back to the test at join()."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:
            self.error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> Any:
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "worker thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


class IntPool(Pool[int]):
    """eventlet's test pool: items are 1, 2, 3, ... in creation order."""

    def create(self) -> int:
        self.current_integer = getattr(self, "current_integer", 0) + 1
        return self.current_integer


class RaisePool(Pool[Any]):
    def create(self) -> Any:
        raise RuntimeError("create failed")


# ---------------------------------------------------------------- eventlet's TestIntPool


@pytest.fixture
def pool() -> IntPool:
    return IntPool(min_size=0, max_size=4)


def test_integers(pool: IntPool) -> None:
    assert [pool.get() for _ in range(4)] == [1, 2, 3, 4]


def test_free(pool: IntPool) -> None:
    assert pool.free() == 4
    gotten = pool.get()
    assert pool.free() == 3
    pool.put(gotten)
    assert pool.free() == 4


def test_exhaustion(pool: IntPool) -> None:
    one, *_ = pool.get(), pool.get(), pool.get(), pool.get()
    assert pool.free() == 0
    consumer = Worker(pool.get)
    wait_until(lambda: pool.waiting() == 1, DEADLINE, what="the consumer to block")
    pool.put(one)  # wakes the consumer
    assert consumer.join() == one
    assert pool.waiting() == 0


def test_blocks_on_pool(pool: IntPool) -> None:
    reached: queue.Queue[str] = queue.Queue()

    def greedy() -> int:
        for _ in range(4):
            pool.get()
        assert pool.waiting() == 0  # no one is waiting yet
        item = pool.get()  # blocks: the pool is exhausted
        reached.put("past the fifth get")
        return item

    assert pool.waiting() == 0
    worker = Worker(greedy)
    wait_until(lambda: pool.waiting() == 1, DEADLINE, what="greedy to block on its fifth get")
    assert reached.empty()
    # eventlet kills the green thread here; a native thread is released instead, and joined.
    pool.put(2)
    assert worker.join() == 2
    assert reached.get_nowait() == "past the fifth get"


def test_ordering(pool: IntPool) -> None:
    # By default items come back out in the order they were put.
    one, two = pool.get(), pool.get()
    pool.put(one)
    pool.put(two)
    assert pool.get() == one
    assert pool.get() == two


def test_putting_to_queue() -> None:
    size = 2
    pool = IntPool(min_size=0, max_size=size)
    done: queue.Queue[int] = queue.Queue()
    putters = []

    def just_put(item: int, index: int) -> None:
        pool.put(item)
        done.put(index)

    for index in range(size + 1):
        item = pool.get(timeout=DEADLINE)  # the last one waits for a putter
        putters.append(Worker(lambda item=item, index=index: just_put(item, index)))  # type: ignore[misc]
    for w in putters:
        w.join()
    assert sorted(done.get_nowait() for _ in range(size + 1)) == list(range(size + 1))


def test_resize() -> None:
    pool = IntPool(max_size=2)
    a, b = pool.get(), pool.get()
    assert pool.free() == 0
    # The pool discards excess items put into it.
    pool.resize(1)
    pool.put(a)
    pool.put(b)
    assert pool.free() == 1
    assert pool.current_size == 1
    # Resize larger: there are more free items.
    pool.resize(2)
    assert pool.free() == 2


def test_create_contention() -> None:
    creates = itertools.count()
    go = threading.Event()

    def slow_create() -> str:
        next(creates)
        go.wait(DEADLINE)  # hold the creators until every other thread has queued
        return "slept"

    p: Pool[str] = Pool(max_size=4, create=slow_create)

    def do_get() -> None:
        x = p.get()
        assert x == "slept"
        p.put(x)

    workers = [Worker(do_get) for _ in range(100)]
    wait_until(lambda: p.waiting() == 96, DEADLINE, what="96 threads to queue behind 4 creators")
    go.set()
    for w in workers:
        w.join()
    assert next(creates) == 4
    assert p.free() == 4
    assert p.current_size == 4


def test_abstract() -> None:
    # A Pool cannot be used without overriding create() or passing create=.
    pool: Pool[Any] = Pool()
    with pytest.raises(NotImplementedError):
        pool.get()
    assert pool.free() == 4


def test_min_size_prefills() -> None:
    pool = IntPool(min_size=3, max_size=3)
    assert pool.current_size == 3
    assert pool.free() == 3
    # Taken from the idle items, not created on get.
    assert pool.get() == 1
    assert pool.current_integer == 3


def test_order_as_stack() -> None:
    # Items come out in the reverse order they were put.
    pool = IntPool(max_size=3, order_as_stack=True)
    one, two = pool.get(), pool.get()
    pool.put(one)
    pool.put(two)
    assert pool.get() == two
    assert pool.get() == one


def test_create_raises_costs_no_room() -> None:
    pool = RaisePool(max_size=3)
    assert pool.free() == 3
    with pytest.raises(RuntimeError):
        pool.get()
    assert pool.free() == 3
    assert pool.current_size == 0


def test_item_context_manager() -> None:
    # eventlet's doctest for Pool.item().
    pool = TokenPool(max_size=4)
    with pool.item() as obj:
        assert isinstance(obj, Token)
        assert pool.free() == 3
    assert pool.free() == 4


def test_item_returns_on_error() -> None:
    pool = IntPool(max_size=1)
    with pytest.raises(KeyError), pool.item() as obj:
        raise KeyError(obj)
    assert pool.free() == 1
    assert pool.get(timeout=0) == 1


# ---------------------------------------------------------------- construction and create()


def test_defaults_and_attributes() -> None:
    pool: Pool[int] = Pool(create=lambda: 7)
    assert (pool.min_size, pool.max_size, pool.order_as_stack, pool.current_size) == (0, 4, False, 0)
    assert pool.get() == 7
    assert pool.current_size == 1
    assert "max_size=4" in repr(pool)


def test_create_is_lazy() -> None:
    calls = itertools.count()
    pool: Pool[int] = Pool(max_size=4, create=lambda: next(calls))
    assert pool.current_size == 0  # nothing made at construction with min_size=0
    first = pool.get()
    pool.put(first)
    assert pool.get() is first  # reused, not created again
    assert next(calls) == 1


def test_create_argument_beats_subclass_create() -> None:
    class Sub(Pool[str]):
        def create(self) -> str:
            return "sub"

    # eventlet stores create= as an instance attribute, which shadows the method.
    assert Sub(create=lambda: "kw").get() == "kw"
    assert Sub().get() == "sub"
    patched: Pool[str] = Pool()
    patched.create = lambda: "patched"  # type: ignore[method-assign]
    assert patched.get() == "patched"


@pytest.mark.parametrize(
    ("kwargs", "exc", "names"),
    [
        ({"max_size": 0}, ValueError, "max_size"),
        ({"max_size": -1}, ValueError, "max_size"),
        ({"max_size": 2.5}, TypeError, "max_size"),
        ({"min_size": 5, "max_size": 4}, ValueError, "min_size"),
        ({"min_size": -1}, ValueError, "min_size"),
        ({"order_as_stack": 1}, TypeError, "order_as_stack"),
        ({"create": 42}, TypeError, "create"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], exc: type[Exception], names: str) -> None:
    with pytest.raises(exc, match=names):
        Pool(**kwargs)


def test_min_size_create_error_is_logged_then_raised_by_get(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mppool"):
        pool = RaisePool(min_size=2, max_size=3)
    assert "min_size" in caplog.text
    assert pool.current_size == 0
    with pytest.raises(RuntimeError):
        pool.get()


# ---------------------------------------------------------------- order


def test_fifo_round_robin() -> None:
    pool = IntPool(max_size=3)
    items = [pool.get() for _ in range(3)]
    for i in items:
        pool.put(i)
    # Each get takes the item idle the longest, so the three are used in turn.
    seen = []
    for _ in range(6):
        x = pool.get()
        seen.append(x)
        pool.put(x)
    assert seen == [1, 2, 3, 1, 2, 3]


def test_lifo_reuses_the_hot_item() -> None:
    pool = IntPool(max_size=3, order_as_stack=True)
    items = [pool.get() for _ in range(3)]
    for i in items:
        pool.put(i)
    seen = []
    for _ in range(4):
        x = pool.get()
        seen.append(x)
        pool.put(x)
    assert seen == [3, 3, 3, 3]


def test_order_as_stack_can_change_live() -> None:
    pool = IntPool(max_size=2)
    one, two = pool.get(), pool.get()
    pool.put(one)
    pool.put(two)
    pool.order_as_stack = True
    assert pool.order_as_stack is True
    assert pool.get() == two
    with pytest.raises(TypeError, match="order_as_stack"):
        pool.order_as_stack = "yes"  # type: ignore[assignment]


# ---------------------------------------------------------------- timeouts and waiters


def test_timeout_zero_does_not_wait() -> None:
    pool = IntPool(max_size=1)
    pool.get()
    start = time.monotonic()
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    assert time.monotonic() - start < 1.0
    assert pool.waiting() == 0


def test_timeout_raises_and_the_waiter_swallows_nothing() -> None:
    pool = IntPool(max_size=1)
    one = pool.get()
    start = time.monotonic()
    with pytest.raises(TimeOut):
        pool.get(timeout=0.05)
    assert time.monotonic() - start >= 0.05
    assert pool.waiting() == 0
    pool.put(one)
    assert pool.free() == 1  # not handed to the waiter that gave up
    assert pool.get(timeout=0) == one


def test_timeout_is_met_by_a_put_in_time() -> None:
    pool = IntPool(max_size=1)
    one = pool.get()
    waiter = Worker(lambda: pool.get(timeout=DEADLINE))
    wait_until(lambda: pool.waiting() == 1, DEADLINE, what="the waiter to block")
    pool.put(one)
    assert waiter.join() == one


def test_item_timeout() -> None:
    pool = IntPool(max_size=1)
    pool.get()
    with pytest.raises(TimeOut), pool.item(timeout=0):
        pytest.fail("must not enter the block")


def test_waiters_are_served_in_arrival_order() -> None:
    pool = IntPool(max_size=1)
    one = pool.get()
    served: queue.Queue[str] = queue.Queue()

    def waiter(name: str) -> None:
        x = pool.get(timeout=DEADLINE)
        served.put(name)
        pool.put(x)

    workers = []
    for n, name in enumerate("abc", start=1):
        workers.append(Worker(lambda name=name: waiter(name)))  # type: ignore[misc]
        wait_until(lambda n=n: pool.waiting() == n, DEADLINE, what=f"waiter {name} to queue")  # type: ignore[misc]
    pool.put(one)
    for w in workers:
        w.join()
    assert [served.get_nowait() for _ in range(3)] == ["a", "b", "c"]


# ---------------------------------------------------------------- resize


def test_resize_up_wakes_a_waiter_with_a_new_item() -> None:
    pool = IntPool(max_size=1)
    pool.get()
    waiter = Worker(lambda: pool.get(timeout=DEADLINE))
    wait_until(lambda: pool.waiting() == 1, DEADLINE, what="the waiter to block")
    pool.resize(2)
    assert pool.max_size == 2
    assert waiter.join() == 2
    assert pool.current_size == 2


def test_resize_down_closes_idle_items_at_once() -> None:
    pool = IntPool(max_size=3)
    items = [pool.get() for _ in range(3)]
    for i in items:
        pool.put(i)
    assert (pool.free(), pool.current_size) == (3, 3)
    pool.resize(1)
    assert (pool.max_size, pool.free(), pool.current_size) == (1, 1, 1)
    assert pool.get() == 3  # the item idle the longest went first


def test_resize_down_while_out_discards_on_put() -> None:
    pool = IntPool(max_size=3)
    a, b, c = pool.get(), pool.get(), pool.get()
    pool.resize(1)
    assert pool.free() == 0  # eventlet says -2 here; mppool never goes below zero
    pool.put(a)
    assert pool.current_size == 2
    pool.put(b)
    assert pool.current_size == 1
    pool.put(c)
    assert (pool.free(), pool.current_size) == (1, 1)
    x = pool.get()
    with pytest.raises(TimeOut):
        pool.get(timeout=0)  # the new bound holds
    pool.put(x)


def test_resize_down_while_out_keeps_waiters_waiting() -> None:
    pool = IntPool(max_size=2)
    a, b = pool.get(), pool.get()
    pool.resize(1)
    waiter = Worker(lambda: pool.get(timeout=DEADLINE))
    wait_until(lambda: pool.waiting() == 1, DEADLINE, what="the waiter to block")
    try:
        pool.put(a)  # discarded, not handed over: the pool is now at its new size
        assert (pool.waiting(), pool.current_size) == (1, 1)
    finally:
        pool.put(b)
        got = waiter.join()
    assert got == b
    pool.put(got)
    assert (pool.free(), pool.current_size) == (1, 1)


def test_resize_rejects_bad_sizes() -> None:
    pool = IntPool(min_size=2, max_size=4)
    with pytest.raises(ValueError, match="new_size"):
        pool.resize(0)  # the core pool would read 0 as "unbounded"
    with pytest.raises(ValueError, match="min_size"):
        pool.resize(1)
    with pytest.raises(TypeError, match="new_size"):
        pool.resize(None)  # type: ignore[arg-type]
    assert pool.max_size == 4


# ---------------------------------------------------------------- put() of foreign items


def test_foreign_item_is_free_at_once_outside_the_bound() -> None:
    # eventlet: a put() of an item the pool never lent joins the free items; it does not
    # count in current_size, so the pool can lend max_size created items plus it.
    pool = IntPool(max_size=2)
    pool.put(100)
    assert pool.free() == 3 and list(pool.free_items) == [100] and pool.current_size == 0
    assert pool.get() == 100  # the free list comes first
    assert [pool.get(), pool.get()] == [1, 2]
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    pool.put(100)  # lent foreign items come back as free items too
    assert pool.free() == 1 and pool.current_size == 2


def test_foreign_item_goes_to_a_blocked_getter() -> None:
    # eventlet's test_put_with_timed_out_getters, then a live getter.
    pool = IntPool(max_size=2)
    pool.get()
    pool.get()
    for _ in range(3):
        with pytest.raises(TimeOut):
            pool.get(timeout=0.01)  # gave up: must not swallow what comes next
    pool.put(0)
    assert len(pool.free_items) == 1 and pool.waiting() == 0
    assert pool.get(timeout=0) == 0
    waiter = Worker(lambda: pool.get(timeout=DEADLINE))
    wait_until(lambda: pool.waiting() == 1, DEADLINE, what="the getter to block")
    assert pool.channel.getting() == 1 and pool.channel.putting() == 0
    pool.put("foreign")
    assert waiter.join() == "foreign"
    assert len(pool.free_items) == 0 and pool.channel.getting() == 0


def test_get_rejects_bad_timeouts() -> None:
    pool = IntPool(max_size=1)
    for bad, exc in ((-1, ValueError), (float("nan"), ValueError), ("1", TypeError)):
        with pytest.raises(exc, match="timeout"):
            pool.get(timeout=bad)  # type: ignore[arg-type]
    assert pool.get(timeout=float("inf")) == 1  # inf: wait for ever, and nothing to wait for


def test_foreign_item_follows_order_as_stack() -> None:
    pool = IntPool(max_size=1, order_as_stack=True)
    pool.put("a")
    pool.put("b")
    assert list(pool.free_items) == ["b", "a"]
    assert [pool.get(), pool.get()] == ["b", "a"]
    fifo = IntPool(max_size=1)
    fifo.put("a")
    fifo.put("b")
    assert [fifo.get(), fifo.get()] == ["a", "b"]


def test_pool_filled_by_hand_needs_no_create() -> None:
    pool: Pool[str] = Pool(max_size=2)
    pool.put("a")
    pool.put("b")
    assert {pool.get(), pool.get()} == {"a", "b"}
    with pytest.raises(NotImplementedError):
        pool.get()  # the free items are used up: now create() is needed


def test_free_items_lists_idle_items_in_handout_order() -> None:
    pool = IntPool(min_size=3, max_size=3)
    assert list(pool.free_items) == [1, 2, 3]  # eventlet's TestIntPool2
    assert pool.get() == 1
    pool.put(1)
    assert list(pool.free_items) == [2, 3, 1]
    pool.free_items.clear()  # a snapshot: the pool is unchanged
    assert pool.free() == 3


def test_put_twice_is_ignored(pool: IntPool, caplog: pytest.LogCaptureFixture) -> None:
    one = pool.get()
    pool.put(one)
    with caplog.at_level(logging.WARNING, logger="mppool"):
        pool.put(one)
    assert "already idle" in caplog.text
    assert (pool.free(), pool.current_size) == (4, 1)
    assert [pool.get(), pool.get()] == [1, 2]  # never lent twice at once


def test_foreign_item_put_twice_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    pool = IntPool(max_size=2)
    pool.put(100)
    with caplog.at_level(logging.WARNING, logger="mppool"):
        pool.put(100)
    assert "already idle" in caplog.text
    assert list(pool.free_items) == [100]


def test_identical_items_are_counted_per_lease() -> None:
    pool: Pool[str] = Pool(max_size=3, create=lambda: "same")
    items = [pool.get() for _ in range(3)]
    for x in items:
        pool.put(x)
    assert (pool.free(), pool.current_size) == (3, 3)


# ---------------------------------------------------------------- TokenPool


def test_token_pool_hands_out_distinct_tokens() -> None:
    pool = TokenPool(max_size=4)
    tokens = [pool.get() for _ in range(4)]
    assert all(isinstance(t, Token) for t in tokens)
    assert len({id(t) for t in tokens}) == 4
    with pytest.raises(TimeOut):
        pool.get(timeout=0)
    s = pool.stats()
    assert (s["out"], s["available"], s["max_size"]) == (4, 0, 4)
    for t in tokens:
        pool.put(t)
    s = pool.stats()
    assert (s["out"], s["available"]) == (0, 4)
    assert pool.free() == 4


def test_a_token_pickles_as_a_distinct_token_with_its_number() -> None:
    """A shared token pool's get unpickles the supervisor's token: same number, new object;
    a subclass keeps the default pickling, its own attributes included."""
    for number in (7, None):
        token = Token(number)
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            copy = pickle.loads(pickle.dumps(token, protocol=protocol))
            assert type(copy) is Token and copy is not token and copy.number == number
    assert copy_module.copy(Token(3)).number == 3
    copy = pickle.loads(pickle.dumps(_Labelled("x")))
    assert type(copy) is _Labelled and (copy.number, copy.label) == (1, "x")


class _Labelled(Token):
    def __init__(self, label: str) -> None:
        super().__init__(1)
        self.label = label


def test_token_pool_obj_and_waiting() -> None:
    pool = TokenPool(max_size=2)
    with pool.obj() as t1, pool.item() as t2:
        assert t1 is not t2
        waiter = Worker(lambda: pool.get(timeout=DEADLINE))
        wait_until(lambda: pool.waiting() == 1, DEADLINE, what="the waiter to block")
        assert pool.stats()["nwaiting"] == 1
    assert waiter.join() in (t1, t2)
    assert pool.waiting() == 0


def test_token_pool_signature_is_eventlets() -> None:
    assert TokenPool().max_size == 4
    assert TokenPool(max_size=3, min_size=3).current_size == 3
    pool = TokenPool(2)  # eventlet's order: min_size first
    assert (pool.min_size, pool.max_size, pool.current_size) == (2, 4, 2)
    pool = TokenPool(0, 10, True)
    assert (pool.max_size, pool.order_as_stack) == (10, True)
    with pytest.raises(ValueError, match="min_size=5 must not exceed max_size=4"):
        TokenPool(5)  # eventlet would make 5 tokens with a bound of 4


def test_token_pool_invariant_under_threads() -> None:
    max_size, nthreads, rounds = 4, 12, 300
    pool = TokenPool(max_size=max_size)
    held: set[int] = set()
    held_lock = threading.Lock()
    peak = [0]
    stop = threading.Event()
    violations: list[dict[str, Any]] = []

    def worker() -> None:
        for _ in range(rounds):
            with pool.item(timeout=DEADLINE) as token:
                with held_lock:
                    assert id(token) not in held, "a token was lent twice at once"
                    held.add(id(token))
                    peak[0] = max(peak[0], len(held))
                with held_lock:
                    held.discard(id(token))

    def monitor() -> int:
        samples = 0
        while not stop.is_set():
            s = pool.stats()
            if s["out"] + s["available"] != max_size or s["out"] > max_size:
                violations.append(s)
            samples += 1
        return samples

    watcher = Worker(monitor)
    workers = [Worker(worker) for _ in range(nthreads)]
    try:
        for w in workers:
            w.join()
    finally:
        stop.set()
        samples = watcher.join()
    assert samples > 0
    assert violations == []
    assert 1 <= peak[0] <= max_size
    s = pool.stats()
    assert (s["out"], s["available"], s["nwaiting"]) == (0, max_size, 0)
    assert s["ncreated"] <= max_size
    assert s["nborrows"] == nthreads * rounds
