"""The lock beside a socket (``<socket>.lock``): one supervisor start at a time per address.

``connect(autostart=True)`` and ``mppool serve`` hold it while they look for a live supervisor
and start one, so that racing callers end up with one supervisor, not two. It is an
``flock`` on the file, so it dies with its holder (a SIGKILLed starter blocks nobody).

The file is removed once nobody needs it (a supervisor's clean stop, ``Server.shutdown()``),
and removing a lock file is the classic trap: process B opens the file and is about to lock
it; A, the holder, removes the name and releases; B now locks the removed inode while C
creates a fresh file under the name and locks that one: B and C both "hold" the lock. The
same happens whatever order A removes and releases in. So every taker here follows the safe
protocol, and filelock's behaviour (which changed across versions: some unlink on release,
some check the link count) is not relied upon:

- take: open (create) the name without following symlinks, ``flock`` it, then check that the
  name still points at the very inode that was locked (``fstat(fd)`` against ``lstat(name)``:
  same device and inode). If not, the file was removed or replaced after it was opened:
  close it and start over. The lock that counts is always the one on the file the name
  points at now;
- remove: only by a holder, while it holds it (``unlink`` then release). ``remove_if_unused``
  takes it without waiting: a lock somebody holds is left alone.

Nobody can change what the name points at without holding the lock on what it points at,
so a taker that verified the name holds the one lock that counts, until it releases.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class LockTimeout(TimeoutError):
    """The lock was held by somebody else for the whole ``timeout``."""


class AddressLock:
    """An exclusive, verified ``flock`` on ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float = 30.0) -> None:
        """Take the lock, waiting at most ``timeout`` seconds (0: do not wait)."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            fd = os.open(self.path, _FLAGS, 0o600)
            try:
                if try_lock(fd, self.path):
                    self._fd, fd = fd, -1
                    return
            finally:
                if fd >= 0:
                    os.close(fd)
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"lock {self.path} is held by another process")
            time.sleep(min(pause, left))  # flock has no timeout: poll, backing off to 50 ms
            pause = min(pause * 2, 0.05)

    def release(self, remove: bool = False) -> None:
        """Release (idempotent); with ``remove``, remove the file first, while still held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if remove:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> AddressLock:
        self.acquire()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def try_lock(fd: int, path: str | os.PathLike[str]) -> bool:
    """Lock ``fd`` without waiting; True only if it is locked *and* ``path`` still names its
    file (a lock on a file removed or replaced since it was opened is worth nothing)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    mine = os.fstat(fd)
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False  # closing fd drops the lock on the removed file
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def remove_if_unused(path: str | os.PathLike[str]) -> bool:
    """Remove the lock file unless somebody holds it now; True if it was removed."""
    if not os.path.lexists(path):
        return False
    lock = AddressLock(path)
    try:
        lock.acquire(timeout=0)
    except (LockTimeout, OSError):
        return False  # in use (an autostart or a serve on its way), or not ours to touch
    lock.release(remove=True)
    return True
