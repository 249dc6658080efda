"""The housekeeping scheduler (``mppool.sched.Scheduler``) on a fake clock: what runs, when,
and in which order. Huge delays, bad delays and failing tasks or clocks are in
test_durations.py; ``HookExecutor``'s bounds, idle exit and thread failures are in
tests/test_isolation.py.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mppool.clock import FakeClock
from mppool.sched import HookExecutor, Scheduler, Task, check_task_delay, default_scheduler

try:
    from helpers import wait_until
except ImportError:  # tests/ became a package
    from tests.helpers import wait_until


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def schedulers() -> Iterator[Callable[..., Scheduler]]:
    made: list[Scheduler] = []

    def make(clock: Any, workers: int = 1) -> Scheduler:
        s = Scheduler(clock, workers=workers, name="mppool-unit-hk")
        made.append(s)
        return s

    yield make
    for s in made:
        s.close(wait=True)
        assert not any(t.is_alive() for t in s._threads)


class Log:
    def __init__(self) -> None:
        self.ran: list[Any] = []
        self.lock = threading.Lock()

    def task(self, name: Any) -> Callable[[], None]:
        def run() -> None:
            with self.lock:
                self.ran.append(name)
        return run

    def __len__(self) -> int:
        with self.lock:
            return len(self.ran)


def settle() -> None:
    """Real time for a worker to run something it should not: a negative check."""
    time.sleep(0.05)


def test_a_task_runs_once_it_is_due_on_the_fake_clock(clock: FakeClock,
                                                      schedulers: Callable[..., Scheduler]) -> None:
    sched, log = schedulers(clock), Log()
    sched.enter(5.0, log.task("five"))
    settle()
    assert log.ran == []
    clock.advance(4.999)
    settle()
    assert log.ran == []
    clock.advance(0.001)
    wait_until(lambda: log.ran == ["five"], what="the task due at 5 s")


def test_a_zero_delay_runs_at_once(clock: FakeClock, schedulers: Callable[..., Scheduler]) -> None:
    sched, log = schedulers(clock), Log()
    sched.enter(0, log.task("now"))
    wait_until(lambda: log.ran == ["now"])


def test_tasks_run_in_due_order_and_ties_in_entry_order(
        clock: FakeClock, schedulers: Callable[..., Scheduler]) -> None:
    sched, log = schedulers(clock, workers=1), Log()
    for name, delay in [("c", 3), ("a1", 1), ("b", 2), ("a2", 1), ("d", 4), ("a3", 1)]:
        sched.enter(delay, log.task(name))
    clock.advance(3.5)
    wait_until(lambda: len(log) == 5)
    settle()
    assert log.ran == ["a1", "a2", "a3", "b", "c"]
    clock.advance(1)
    wait_until(lambda: len(log) == 6)
    assert log.ran[-1] == "d"


def test_a_task_entered_later_but_due_sooner_runs_first(
        clock: FakeClock, schedulers: Callable[..., Scheduler]) -> None:
    """The worker waiting for a far task is woken by a nearer one."""
    sched, log = schedulers(clock), Log()
    sched.enter(100, log.task("far"))
    settle()  # the worker now waits for "far"
    sched.enter(1, log.task("near"))
    clock.advance(1)
    wait_until(lambda: log.ran == ["near"])
    clock.advance(99)
    wait_until(lambda: log.ran == ["near", "far"])


def test_delays_count_from_when_the_task_is_entered(
        clock: FakeClock, schedulers: Callable[..., Scheduler]) -> None:
    sched, log = schedulers(clock), Log()
    clock.advance(50)
    sched.enter(2, log.task("x"))
    clock.advance(1.5)
    settle()
    assert log.ran == []
    clock.advance(0.5)
    wait_until(lambda: log.ran == ["x"])


def test_a_cancelled_task_never_runs(clock: FakeClock,
                                     schedulers: Callable[..., Scheduler]) -> None:
    sched, log = schedulers(clock), Log()
    doomed = sched.enter(1, log.task("doomed"))
    sched.enter(2, log.task("kept"))
    doomed.cancel()
    assert doomed.cancelled
    clock.advance(2)
    wait_until(lambda: log.ran == ["kept"])
    settle()
    assert log.ran == ["kept"]


def test_a_task_can_enter_the_next_round_itself(clock: FakeClock,
                                                schedulers: Callable[..., Scheduler]) -> None:
    sched, log = schedulers(clock), Log()

    def periodic() -> None:
        log.task(clock.now())()
        if len(log) < 3:
            sched.enter(10, periodic)

    sched.enter(10, periodic)
    for n in (1, 2, 3):
        clock.advance(10)
        wait_until(lambda n=n: len(log) == n, what=f"round {n}")
    assert log.ran == [1010.0, 1020.0, 1030.0]


def test_workers_run_tasks_side_by_side(clock: FakeClock,
                                        schedulers: Callable[..., Scheduler]) -> None:
    """Two workers: a task that takes (real) time does not hold back the next one."""
    sched = schedulers(clock, workers=2)
    entered, release, other = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        entered.set()
        release.wait(5)

    sched.enter(0, slow)
    assert entered.wait(5)
    sched.enter(0, other.set)
    try:
        assert other.wait(5), "the second worker did not run the task"
    finally:
        release.set()


def test_close_runs_nothing_more_and_ends_the_workers(clock: FakeClock) -> None:
    sched, log = Scheduler(clock, workers=2, name="mppool-unit-close"), Log()
    sched.enter(1, log.task("never"))
    sched.close(wait=True)
    assert not any(t.is_alive() for t in sched._threads)
    clock.advance(10)
    settle()
    assert log.ran == []


def test_close_from_a_task_does_not_wait_for_itself(clock: FakeClock) -> None:
    sched = Scheduler(clock, workers=1, name="mppool-unit-selfclose")
    done = threading.Event()

    def closer() -> None:
        sched.close(wait=True)  # joins the other workers, not the current thread
        done.set()

    sched.enter(0, closer)
    assert done.wait(5)
    wait_until(lambda: not any(t.is_alive() for t in sched._threads))


def test_workers_are_daemons_named_after_the_scheduler(clock: FakeClock,
                                                       schedulers: Callable[..., Scheduler]) -> None:
    sched = schedulers(clock, workers=3)
    assert [t.name for t in sched._threads] == [f"mppool-unit-hk-{i}" for i in range(3)]
    assert all(t.daemon for t in sched._threads)


def test_tasks_order_by_due_time_then_sequence() -> None:
    a, b, c = Task(1.0, 2, lambda: None), Task(1.0, 3, lambda: None), Task(0.5, 9, lambda: None)
    assert sorted([b, a, c]) == [c, a, b]
    assert not a < a


@pytest.mark.parametrize("value,expected", [(0, 0.0), (3, 3.0), (2.5, 2.5), (math.inf, math.inf),
                                            (1e308, 1e308)])
def test_check_task_delay_accepts_numbers(value: Any, expected: float) -> None:
    got = check_task_delay(value)
    assert got == expected and type(got) is float


@pytest.mark.parametrize("value,exc", [(True, TypeError), (False, TypeError), ("1", TypeError),
                                       (None, TypeError), (1j, TypeError), (-0.001, ValueError),
                                       (-math.inf, ValueError), (math.nan, ValueError)])
def test_check_task_delay_refuses_the_rest(value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="delay"):
        check_task_delay(value)


def test_the_default_scheduler_is_one_per_process() -> None:
    s = default_scheduler()
    assert default_scheduler() is s
    assert s.clock.now() == pytest.approx(time.monotonic(), abs=1.0)


# ------------------------------------------------------------------------- HookExecutor


def test_executor_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        HookExecutor(0)


def test_executor_run_is_the_pools_runner() -> None:
    ex = HookExecutor(1, "mppool-unit-run")
    try:
        done = threading.Event()
        ex.run(done.set)
        assert done.wait(5)
        assert threading.current_thread().name != "mppool-unit-run-0"
    finally:
        ex.close()
