"""Logging that cannot flood (``mppool.ratelog.RateLimitedLog``), on an injected clock."""

from __future__ import annotations

import logging
import threading

import pytest

from mppool.ratelog import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="mppool")
    return caplog


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    # Only what RateLimitedLog emitted: a pool of an earlier test closing in a background
    # thread may log on the "mppool" logger meanwhile (seen once in a full run).
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name == "mppool" and r.filename == "ratelog.py"]


def test_a_key_logs_once_per_interval_then_says_how_many_were_held(
        clock: Clock, logs: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(interval=10.0, clock=clock)
    assert log.warning("accept", "accept failed: %s", "EMFILE") is True
    for _ in range(5):
        clock.now += 1.0
        assert log.warning("accept", "accept failed: %s", "EMFILE") is False
    assert lines(logs) == [(logging.WARNING, "accept failed: EMFILE")]
    clock.now = 110.0  # an interval after the first line
    assert log.warning("accept", "accept failed: %s", "EAGAIN") is True
    assert lines(logs)[1:] == [
        (logging.WARNING, "accept failed: EAGAIN (and 5 more like it in the last 10 s)")]


def test_the_count_starts_again_after_it_was_reported(clock: Clock,
                                                      logs: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(interval=1.0, clock=clock)
    log.warning("k", "m")
    log.warning("k", "m")
    clock.now += 1.0
    log.warning("k", "m")  # reports the one held back
    clock.now += 1.0
    log.warning("k", "m")  # nothing was held since
    assert [m for _, m in lines(logs)] == ["m", "m (and 1 more like it in the last 1 s)", "m"]


def test_the_interval_counts_from_the_last_line_logged(clock: Clock,
                                                       logs: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(interval=1.0, clock=clock)
    assert log.warning("k", "a")
    clock.now += 0.999
    assert not log.warning("k", "b")  # held: does not move the interval
    clock.now += 0.001
    assert log.warning("k", "c")
    clock.now += 0.5
    assert not log.warning("k", "d")


def test_keys_are_independent(clock: Clock, logs: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(interval=5.0, clock=clock)
    assert log.warning("a", "first a")
    assert log.warning("b", "first b")
    assert not log.warning("a", "again a")
    assert log.error("c", "first c")
    assert [m for _, m in lines(logs)] == ["first a", "first b", "first c"]


def test_levels_and_exc_info(clock: Clock, logs: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(interval=1.0, clock=clock)
    try:
        raise RuntimeError("inside")
    except RuntimeError:
        assert log.error("e", "failed %d times", 3, exc_info=True)
    assert log(logging.INFO, "i", "info %s", "line")
    records = [r for r in logs.records if r.name == "mppool" and r.filename == "ratelog.py"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, "failed 3 times"), (logging.INFO, "info line")]
    assert records[0].exc_info is not None and records[0].exc_info[0] is RuntimeError
    assert not records[1].exc_info


def test_the_default_is_one_line_a_second_on_the_monotonic_clock(
        logs: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog()
    assert log.interval == 1.0
    assert log.warning("k", "once")
    assert not log.warning("k", "twice")  # within a second of real time


def test_threads_never_log_a_key_twice_in_an_interval(clock: Clock,
                                                      logs: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(interval=60.0, clock=clock)
    logged: list[bool] = []
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait(5)
        for _ in range(200):
            logged.append(log.warning("k", "x"))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert logged.count(True) == 1 and len(logged) == 1600
    clock.now += 60.0
    log.warning("k", "x")
    assert lines(logs)[-1][1] == "x (and 1599 more like it in the last 60 s)"
