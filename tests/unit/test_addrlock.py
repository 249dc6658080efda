"""The lock beside a socket (mppool/addrlock.py): removing the lock file never lets two
takers hold it at once."""

from __future__ import annotations

import fcntl
import os
import random
import threading

import pytest

from mppool.addrlock import AddressLock, LockTimeout, remove_if_unused, try_lock


def test_a_lock_on_a_file_removed_since_it_was_opened_counts_for_nothing(tmp_path):
    path = tmp_path / "s.sock.lock"
    a = AddressLock(path)
    a.acquire(timeout=0)
    stale = os.open(path, os.O_RDWR)  # B opened the file and is about to lock it
    try:
        a.release(remove=True)  # A removes it while holding it, then releases
        c = AddressLock(path)
        c.acquire(timeout=0)  # C creates a fresh file under the name and locks it
        try:
            # flock alone would give B the removed file's lock: the trap...
            fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(stale, fcntl.LOCK_UN)
            # ...which the check against the name refuses.
            assert try_lock(stale, path) is False
            with pytest.raises(LockTimeout):
                AddressLock(path).acquire(timeout=0.05)  # C holds the one that counts
        finally:
            c.release()
    finally:
        os.close(stale)


def test_never_two_holders_while_holders_remove_the_file(tmp_path):
    path = tmp_path / "s.sock.lock"
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(150):
                lock = AddressLock(path)
                lock.acquire(timeout=20)
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                with guard:
                    inside[0] -= 1
                lock.release(remove=rnd.random() < 0.5)
                if rnd.random() < 0.3:
                    remove_if_unused(path)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert most[0] == 1


def test_a_held_lock_times_out_and_is_not_removed(tmp_path):
    path = tmp_path / "s.sock.lock"
    held = AddressLock(path)
    held.acquire(timeout=0)
    try:
        with pytest.raises(LockTimeout, match="held by another process"):
            AddressLock(path).acquire(timeout=0.02)
        assert remove_if_unused(path) is False and path.exists()
    finally:
        held.release()
    assert remove_if_unused(path) is True and not path.exists()
    assert remove_if_unused(path) is False  # nothing there: nothing created either
    assert not path.exists()


def test_a_symlink_is_not_followed(tmp_path):
    target = tmp_path / "victim"
    target.write_text("data")
    (tmp_path / "s.sock.lock").symlink_to(target)
    with pytest.raises(OSError):
        AddressLock(tmp_path / "s.sock.lock").acquire(timeout=0)
    assert target.read_text() == "data"
