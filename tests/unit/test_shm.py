"""The fast path's shared-memory moves (mppool.shm and its C module), on one region in this
process: the moves, the lock word (only atomics touch it), and what a client can write."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import pytest

from mppool import shm

pytestmark = pytest.mark.skipif(shm._fastslot is None or not hasattr(os, "memfd_create"),
                                reason="needs Linux memfd and mppool's C module (built at "
                                "install where a compiler is)")


@contextlib.contextmanager
def held_by_another_thread(region: shm.Region) -> Iterator[None]:
    """The region's lock held by a thread of ours for the duration of the block."""
    held, release = threading.Event(), threading.Event()

    def owner() -> None:
        region.lock()
        held.set()
        release.wait(5)
        region.unlock()

    t = threading.Thread(target=owner)
    t.start()
    assert held.wait(5)
    try:
        yield
    finally:
        release.set()
        t.join(5)


@pytest.fixture
def region():
    """A region of 3 slots: two tokens parked (FREE), one slot ABSENT."""
    r, fd = shm.Region.create(3)
    try:
        for i in range(2):  # two tokens parked, one slot ABSENT
            r.set_state(i, shm.FREE)
        yield r
    finally:
        os.close(fd)


def test_take_and_give(region):
    a = region.take(7, 100, 1.0, 5.0)
    b = region.take(7, 100, 1.0, 5.0)
    assert isinstance(a, tuple) and isinstance(b, tuple) and a[0] != b[0]
    gen, conn, pid, _, start, since = region.slot(a[0])
    assert (gen, conn, pid, start, since) == (a[1], 7, 100, 1.0, 5.0)
    assert region.state(a[0]) == shm.HELD
    assert region.take(7, 100, 1.0, 5.0) == shm.QUEUE  # nothing FREE: go to the supervisor
    assert region.flags == shm.WAITERS and region.pending == 1
    assert region.give(*a, 7) == shm.POKE  # slow mode: RETURNED, the supervisor hands it on
    assert region.state(a[0]) == shm.RETURNED
    region.set_flags(0)
    assert region.give(*b, 7) is True
    assert region.state(b[0]) == shm.FREE


def test_generation_makes_late_and_foreign_puts_noops(region):
    i, gen = region.take(7, 100, 1.0, 0.0)
    assert region.give(i, gen, 8) is False  # another connection's
    assert region.give(i, gen + 1, 7) is False  # a generation that is not the holder's
    assert region.give(i, gen, 7) is True
    assert region.give(i, gen, 7) is False  # twice
    j, gen2 = region.take(7, 100, 1.0, 0.0)
    assert gen2 > gen
    assert region.give(i if j == i else j, gen, 7) is False  # the old lease, late
    assert region.give(-1, 0, 7) is False and region.give(99, 0, 7) is False


def test_flags_send_everyone_to_the_supervisor(region):
    for flag in (shm.WAITERS, shm.CLOSED, shm.DIRTY):
        region.set_flags(flag)
        before = region.pending
        assert region.take(7, 100, 1.0, 0.0) == shm.QUEUE
        assert region.pending == before + 1
        assert region.count(shm.FREE) == 2  # nothing taken


def test_the_lock_excludes_other_threads(region):
    region.lock()
    got = []
    t = threading.Thread(target=lambda: got.append(region.take(7, 1, 1.0, 0.0, wait=30.0)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # blocked on the mutex (ctypes drops the GIL)
    region.unlock()
    t.join(5)
    assert got and isinstance(got[0], tuple)


def test_a_held_lock_sends_take_and_give_elsewhere_within_their_wait(region):
    """A process stopped inside the critical section must not stall the others: after their
    short wait, take() says BUSY (a normal get) and give() says BUSY (a FastGive), and
    neither changed anything."""
    i, gen = region.take(7, 1, 1.0, 0.0)

    def state() -> bytes:  # everything but the lock itself
        mm = region.mm
        return bytes(mm[:shm.MUTEX_AT]) + bytes(mm[shm.MUTEX_AT + shm.MUTEX_SIZE:])

    before = state()
    with held_by_another_thread(region):
        t0 = time.monotonic()
        assert region.take(8, 1, 1.0, 0.0, wait=0.05) == shm.BUSY
        assert region.give(i, gen, 7, wait=0.05) == shm.BUSY
        took = time.monotonic() - t0
        assert region.try_lock(0.0) is None and region.try_lock(0.01) is None
        assert state() == before  # nothing changed, pending not counted
    assert 0.1 <= took < 2.0, took  # each waited its 50 ms, no longer
    assert region.give(i, gen, 7) is True


def test_try_lock_takes_over_from_an_owner_that_died_holding_it(region):
    """A lock whose owner (here a thread) ended holding it: the next try_lock finds the
    owner gone, takes the lock over, says False, and the region is flagged DIRTY."""
    t = threading.Thread(target=region.lock)
    t.start()
    t.join(5)
    assert region.owner_tid() not in (0, threading.get_native_id())
    assert region.try_lock(1.0) is False
    assert region.flags & shm.DIRTY
    assert region.unlock() == 0
    assert region.try_lock(0.0) is True  # free again: usable
    region.unlock()


def test_whatever_is_written_over_the_lock_word_crashes_nothing(region):
    """Only atomics and futex calls touch the lock word: any value a client writes there
    makes the lock wrong for a while (taken over when its owner is no thread, freed by the
    supervisor otherwise), never a process crash."""
    word = region._word
    for value in (0xFFFFFFFF, 0x3FFFFFFF, 0x80000000, 1, 0x40000001, 0):
        word.value = value
        got = region.try_lock(0.01)
        if value & shm.TID_MASK in (0, 1):  # free (the bits around it ignored), or pid 1
            assert got is (True if not value & shm.TID_MASK else None), (hex(value), got)
        else:  # no such thread: taken over
            assert got is False, hex(value)
        if got is not None:
            assert region.unlock() == 0
        region.reset_lock()
        region.set_flags(0)  # the DIRTY of a take-over (the supervisor's repair clears it)
        assert isinstance(region.take(7, 1, 1.0, 0.0), tuple), hex(value)
        region.set_state(0, shm.FREE)
        region.set_state(1, shm.FREE)


def test_bad_regions_are_refused():
    with pytest.raises(ValueError, match="nslots"):
        shm.Region.create(0)
    fd = os.memfd_create("x")
    try:
        os.ftruncate(fd, shm.region_size(2))
        with pytest.raises(ValueError, match="not a fast-path region"):
            shm.Region(fd)  # all zeros: no magic
    finally:
        os.close(fd)


def test_unlocking_a_lock_held_by_another_thread_changes_nothing(region):
    import errno

    with held_by_another_thread(region):
        assert region.unlock() == errno.EPERM
        assert region.try_lock(0.0) is None  # still held
    assert isinstance(region.take(7, 1, 1.0, 0.0), tuple)


def test_takes_gives_and_hold_times_are_counted(region):
    """What the supervisor's stats and histograms read: every take and give counted, and
    each give's hold time (from the slot's ``since``, on the monotonic clock) in its bucket."""
    before = region.hold_times()
    assert before == ([0] * 12, 0.0) and (region.takes, region.gives) == (0, 0)
    i, gen = region.take(7, 1, 1.0, time.monotonic() - 0.002)  # taken 2 ms ago
    assert (region.takes, region.gives) == (1, 0)
    assert region.give(i, gen, 7) is True
    counts, total = region.hold_times()
    assert (region.takes, region.gives) == (1, 1)
    assert counts[shm.HOLD_BUCKETS.index(0.005)] == 1 and sum(counts) == 1, counts
    assert 0.002 <= total < 0.005
    assert region.give(i, gen, 7) is False  # refused: not counted
    assert region.gives == 1 and sum(region.hold_times()[0]) == 1
    j, gen = region.take(7, 1, 1.0, float("nan"))  # a scribbled time: counted as 0 s
    region.give(j, gen, 7)
    assert region.hold_times()[0][0] == 1
