"""The outage state machine (mppool.outage): backoff, probes, give-up, fed with times."""

from __future__ import annotations

import pytest

from mppool.outage import MAX_DELAY, NORMAL, PROBE, REFUSED, Outage, fail_fast_error


def no_jitter() -> float:
    return 0.5  # 2 * 0.5 - 1 == 0: the delays are exact


def test_no_outage_lets_every_creation_through() -> None:
    o = Outage(300.0, no_jitter)
    assert o.begin(0.0) == NORMAL and o.begin(0.0) == NORMAL
    assert not o.active and o.describe(0.0) is None


def test_backoff_doubles_from_one_second_and_one_probe_at_a_time() -> None:
    o = Outage(None, no_jitter)
    now = 100.0
    assert not o.failed(now, OSError("down"), NORMAL)
    delays = []
    for _ in range(8):
        assert o.begin(o.next_at - 0.01) == REFUSED  # not due yet
        delays.append(round(o.next_at - now, 6))
        now = o.next_at
        assert o.begin(now) == PROBE
        assert o.begin(now) == REFUSED  # the probe is out: everybody else fails fast
        assert not o.failed(now, OSError("down"), PROBE)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, MAX_DELAY, MAX_DELAY]
    assert o.attempts == 9


def test_jitter_stays_within_ten_percent() -> None:
    for r in (0.0, 1.0):
        o = Outage(None, lambda r=r: r)
        o.failed(0.0, OSError(), NORMAL)
        assert o.next_at == pytest.approx(1.0 + (0.1 if r else -0.1))


def test_failures_that_started_before_the_outage_do_not_speed_up_the_backoff() -> None:
    o = Outage(None, no_jitter)
    o.failed(0.0, OSError("first"), NORMAL)
    o.failed(0.1, OSError("straggler"), NORMAL)  # began before the first failure
    assert o.next_at == 1.0 and o.attempts == 1
    assert str(o.error) == "straggler"  # the latest error is what gets raise


def test_reconnect_failed_is_due_once_at_the_timeout_and_attempts_go_on() -> None:
    o = Outage(3.0, no_jitter)
    now, due = 0.0, []
    o.failed(now, OSError(), NORMAL)
    for _ in range(5):
        now = o.next_at
        assert o.begin(now) == PROBE
        due.append((now, o.failed(now, OSError(), PROBE)))
    # 1 s, then 2 s cut to land on the 3 s deadline: reported there, once; then 4 s, 8 s...
    assert due == [(1.0, False), (3.0, True), (7.0, False), (15.0, False), (31.0, False)]


def test_success_ends_the_outage_and_a_new_one_reports_again() -> None:
    o = Outage(0.0, no_jitter)
    assert o.failed(5.0, OSError(), NORMAL)  # timeout 0: given up at the first failure
    assert o.succeeded() == 5.0
    assert not o.active and o.begin(5.0) == NORMAL
    assert o.failed(9.0, OSError(), NORMAL)  # a new outage: told again
    assert o.describe(9.5) == {"failing_for": 0.5, "attempts": 1, "next_attempt_in": 0.5,
                               "error": "OSError: "}


def test_an_aborted_probe_frees_the_next_attempt() -> None:
    o = Outage(None, no_jitter)
    o.failed(0.0, OSError(), NORMAL)
    assert o.begin(1.0) == PROBE
    o.abort(PROBE)  # no budget token: fun was never called
    assert o.begin(1.0) == PROBE


def test_fail_fast_error_is_a_copy_with_a_note() -> None:
    original = ConnectionRefusedError(111, "refused")
    original.add_note("from the driver")
    again = fail_fast_error(original, 2.5)
    assert again is not original and type(again) is ConnectionRefusedError
    assert again.args == original.args
    assert again.__notes__[0] == "from the driver"
    assert "next attempt in 2.5 s" in again.__notes__[-1]
    assert original.__notes__ == ["from the driver"]  # untouched


def test_fail_fast_error_of_an_uncopyable_exception_is_the_original() -> None:
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:  # args do not rebuild it
            super().__init__(a + b)

    exc = Odd(1, 2)
    assert fail_fast_error(exc, 1.0) is exc
