"""A token pool's slots in shared memory, guarded by a robust process-shared mutex.

This module is the memory layout and the moves on it, without any I/O: the client side
(`mppool.fastpath`) and the supervisor side (`mppool.supervisor.fastregion`) both go through
it. Why this primitive: docs/performance.md, "Token leases in shared memory".

Layout (native byte order; the region is a memfd made by the supervisor and mapped by
clients that proved the key)::

    0    magic u32, version u32, nslots u32, flags u32, pending u32, pad
    64   pthread_mutex_t (PTHREAD_PROCESS_SHARED, PTHREAD_MUTEX_ROBUST), 64 bytes reserved
    128  hold times of the leases given back: 12 counts u64 (HOLD_BUCKETS, then +Inf), sum f64
    232  takes u64, gives u64: fast leases taken and given back (each one 64-bit store)
    256  states: one byte per slot
    ...  slots, 40 bytes each: generation u64, conn u64, pid u32, pad u32, start f64, since f64

A slot's state is one byte, written last, so a process that dies in the middle of a move
leaves either the old state or the new one, never half of it:

    ABSENT    the token is in the supervisor's core Pool (not in this region)
    FREE      the supervisor parked the token here: a client may take it without a message
    HELD      a client holds it: conn (its lease channel), pid, start time, since (monotonic)
    RETURNED  given back while the region is in slow mode: the supervisor takes it into its
              core Pool, which hands it to the oldest waiter

``flags``: WAITERS (somebody waits at the supervisor: every get and put goes through it, so
the oldest waiter is served first), CLOSED (the pool is shutting down or being resized: the
fast path is off), DIRTY (a process died holding the mutex: the supervisor must check the
region before anyone uses it fast again). ``pending`` counts (modulo 2**32) the gets that
decided to go to the supervisor; only clients write it. The supervisor counts the ones that
reached it, in its own memory, so the difference is what is on its way: it does not leave
slow mode while that is nonzero, so a get on its way cannot be overtaken, and counting an
arrival costs it no lock.

The generation of a slot grows with every take and every give-back, so a token names its slot
*and* generation: a put of a token whose slot was reclaimed, killed or repaired since is a
no-op.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import struct
import sys
import time
from typing import Any

try:
    from . import _fastslot  # type: ignore[attr-defined]
except ImportError:  # not built here (no compiler at install time): the Python moves
    _fastslot = None

MAGIC = 0x4D505446  # "MPTF"
VERSION = 2
ABSENT, FREE, HELD, RETURNED = 0, 1, 2, 3
STATES = (ABSENT, FREE, HELD, RETURNED)
WAITERS, CLOSED, DIRTY = 1, 2, 4
SLOW = WAITERS | CLOSED | DIRTY

HEADER = struct.Struct("=IIIII")
FLAGS_AT, PENDING_AT = 12, 16
MUTEX_AT, MUTEX_SIZE = 64, 64
# Hold times, counted by each give under the mutex (the supervisor's metrics fold them into
# its hold-time histogram): upper bounds in seconds, as the metrics' buckets.
HOLD_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
HIST_AT = 128
HIST = struct.Struct("=12Qd")
TAKES_AT, GIVES_AT = 232, 240
SINCE_AT = 32  # in a slot
F64 = struct.Struct("=d")
STATES_AT = 256
SLOT = struct.Struct("=QQIIdd")
GEN_CONN = struct.Struct("=QQ")
PID_AT = 16
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
MAX_SLOTS = 1 << 16


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):
        return False


_GLIBC = _is_glibc()
_KIND_AT = MUTEX_AT + 16  # glibc's pthread_mutex_t: lock, count, owner, nusers, kind

# What a take() that does not get a slot says: go to the supervisor (``pending`` counted).
QUEUE = -1
# What give() says besides True/False: the token went back in slow mode; poke the supervisor.
POKE = 2
# What take() and give() say when the mutex could not be had within their wait (its holder
# is stopped or descheduled): take the normal path (a get) or send the give as a message.
BUSY = -2
# How long a client waits for the mutex before it goes through the supervisor instead. The
# critical sections are a few hundred nanoseconds; a holder that takes longer was preempted
# or stopped (SIGSTOP, a debugger), and waiting on it would stall this process for as long.
CLIENT_WAIT = 0.002


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Unavailable(Exception):
    """No robust process-shared mutex here (not Linux with glibc/musl): use the normal path."""


_libc: Any = None


def libc() -> Any:
    """The C library with the robust-mutex calls, or Unavailable."""
    global _libc
    if _libc is not None:
        return _libc
    if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
        raise Unavailable("the shared-memory fast path needs Linux (memfd, robust mutexes)")
    # The symbols already loaded in this process first: the interpreter links the C library,
    # and ctypes.util.find_library would run a compiler or ldconfig in a subprocess.
    lib = None
    for name in (None, "libc.so.6", "libpthread.so.0"):
        try:
            cand = ctypes.CDLL(name, use_errno=True)
            for fn in ("pthread_mutex_lock", "pthread_mutex_trylock", "pthread_mutex_unlock",
                       "pthread_mutex_timedlock", "pthread_mutex_consistent",
                       "pthread_mutexattr_setrobust", "pthread_mutexattr_setpshared"):
                getattr(cand, fn)
        except (OSError, AttributeError):
            continue
        lib = cand
        break
    if lib is None:
        raise Unavailable("no robust process-shared mutex in the C library")
    _libc = lib
    return lib


_KIND: list[int | None] = []


def _robust_kind(lib: Any) -> int | None:
    """The kind int glibc writes in a robust, process-shared mutex (None elsewhere: the
    layout is glibc's), found once by setting up a private one."""
    if not _KIND:
        kind = None
        if _GLIBC:
            buf = ctypes.create_string_buffer(MUTEX_SIZE)
            attr = ctypes.create_string_buffer(64)
            lib.pthread_mutexattr_init(attr)
            lib.pthread_mutexattr_setpshared(attr, 1)
            lib.pthread_mutexattr_setrobust(attr, 1)
            if lib.pthread_mutex_init(buf, attr) == 0:
                kind = ctypes.c_int32.from_buffer(buf, _KIND_AT - MUTEX_AT).value
            lib.pthread_mutexattr_destroy(attr)
        _KIND.append(kind)
    return _KIND[0]


def region_size(nslots: int) -> int:
    return STATES_AT + _pad8(nslots) + nslots * SLOT.size


def _pad8(n: int) -> int:
    return (n + 7) & ~7


class Region:
    """One mapping of a token pool's region (the supervisor's, or a client's)."""

    def __init__(self, fd: int, nslots: int | None = None, use_c: bool = True) -> None:
        lib = libc()
        size = os.fstat(fd).st_size
        if size < STATES_AT or size > region_size(MAX_SLOTS):
            raise ValueError(f"a fast-path region of {size} bytes")
        self.mm = mmap.mmap(fd, size)
        self._buf = ctypes.c_char.from_buffer(self.mm)
        # ``pending`` is read by the supervisor without the mutex, so it is accessed as one
        # aligned 32-bit load/store: struct's "=I" writes byte by byte, and a reader could
        # see a torn value (0x0100 read as 0x0000 half-way through an increment).
        self._pend = ctypes.c_uint32.from_buffer(self.mm, PENDING_AT)
        self._takes = ctypes.c_uint64.from_buffer(self.mm, TAKES_AT)  # the same, 64 bits
        self._gives = ctypes.c_uint64.from_buffer(self.mm, GIVES_AT)
        self._mutex = ctypes.c_void_p(ctypes.addressof(self._buf) + MUTEX_AT)
        # The mutex's kind, as glibc reads it, and what it must be (`mutex_intact`).
        self._kindv = ctypes.c_int32.from_buffer(self.mm, _KIND_AT)
        self._want_kind = _robust_kind(lib)
        if nslots is not None:  # the supervisor, creating it
            self._init(lib, nslots)
        magic, version, n, _, _ = HEADER.unpack_from(self.mm)
        if magic != MAGIC or version != VERSION or region_size(n) != size:
            self.close()
            raise ValueError("not a fast-path region of this version")
        self.nslots = n
        self.slots_at = STATES_AT + _pad8(n)
        if use_c and _fastslot is not None:
            # The client moves in C: one call each (see _fastslot.c); the methods below are
            # the same moves in Python, used where the module was not built.
            kind = -1 if self._want_kind is None else self._want_kind
            at = (ctypes.addressof(self._buf), n, self.slots_at, kind)
            self.take = functools.partial(_fastslot.take, *at)  # type: ignore[method-assign]
            self.give = functools.partial(_fastslot.give, *at)  # type: ignore[method-assign]
        self._lock = lib.pthread_mutex_lock
        self._trylock = lib.pthread_mutex_trylock
        self._unlock = lib.pthread_mutex_unlock
        self._consistent = lib.pthread_mutex_consistent
        # pthread_mutex_clocklock (glibc 2.30) waits on the monotonic clock, so a wall-clock
        # jump cannot stretch a wait; timedlock (the realtime clock) where it is missing.
        clocklock = getattr(lib, "pthread_mutex_clocklock", None)
        self._clocklock = clocklock
        self._timedlock = lib.pthread_mutex_timedlock

    @classmethod
    def create(cls, nslots: int, name: str = "mppool") -> tuple[Region, int]:
        """A new region of ``nslots`` ABSENT slots and the memfd behind it (the caller owns
        the descriptor)."""
        if not 1 <= nslots <= MAX_SLOTS:
            raise ValueError(f"nslots must be between 1 and {MAX_SLOTS}, got {nslots!r}")
        libc()
        seals = getattr(fcntl, "F_ADD_SEALS", None)
        if seals is None or not hasattr(os, "MFD_ALLOW_SEALING"):
            raise Unavailable("memfd seals are needed (a client could shrink the region)")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, region_size(nslots))
            # Every client gets this descriptor, read-write: shrinking it would make each
            # access past the new end a SIGBUS, in the supervisor too. Sealed at its size,
            # and the seals themselves sealed, before any client can have it.
            fcntl.fcntl(fd, seals, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            return cls(fd, nslots), fd
        except BaseException:
            os.close(fd)
            raise

    def _init(self, lib: Any, nslots: int) -> None:
        HEADER.pack_into(self.mm, 0, MAGIC, VERSION, nslots, 0, 0)
        self._init_mutex(lib)

    def reset_mutex(self) -> None:
        """The supervisor's way out when the mutex bytes are no mutex any more (a client wrote
        over them: the C library says EINVAL, or a thread that never locked it is its owner):
        initialize it again, unlocked. Nobody can hold a mutex in that state, so nobody is
        thrown out of a critical section; the caller then checks the whole region."""
        self.mm[MUTEX_AT:MUTEX_AT + MUTEX_SIZE] = bytes(MUTEX_SIZE)
        self._init_mutex(libc())

    def owner_tid(self) -> int:
        """The thread id the mutex's lock word names as its owner (0: unlocked), where the C
        library is glibc (the word is the first int, the tid in its low 30 bits); -1 where
        that layout is not known."""
        if _GLIBC:
            return int(U32.unpack_from(self.mm, MUTEX_AT)[0]) & 0x3FFFFFFF
        return -1

    def _init_mutex(self, lib: Any) -> None:
        attr = ctypes.create_string_buffer(64)
        lib.pthread_mutexattr_init(attr)
        lib.pthread_mutexattr_setpshared(attr, 1)  # PTHREAD_PROCESS_SHARED
        lib.pthread_mutexattr_setrobust(attr, 1)  # PTHREAD_MUTEX_ROBUST
        rc = lib.pthread_mutex_init(self._mutex, attr)
        lib.pthread_mutexattr_destroy(attr)
        if rc:
            raise OSError(rc, f"pthread_mutex_init: {os.strerror(rc)}")

    def mutex_intact(self) -> bool:
        """Before each call of the C library on the mutex: whether its kind is still the one
        `pthread_mutex_init` writes (robust, process-shared). glibc dispatches on that int,
        and a kind a client wrote there (priority inheritance or protection) makes glibc's
        own assertions abort the caller on its next lock (``e != ESRCH || !robust``). (A
        client racing to write it between this check and the call can still win: see the
        fastregion docstring, known limits.)"""
        return self._want_kind is None or self._kindv.value == self._want_kind

    def close(self) -> None:
        # The C moves hold the mapping's address: drop them first (the Python ones then
        # fail cleanly on a closed mapping instead of touching unmapped memory).
        self.__dict__.pop("take", None)
        self.__dict__.pop("give", None)
        del self._buf, self._pend, self._takes, self._gives, self._kindv
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still alive somewhere: the mapping goes with the process

    # ------------------------------------------------------------------ the mutex

    def lock(self) -> bool:
        """Take the mutex, waiting as long as it takes (tests and tools only: the supervisor
        and the clients use `try_lock` with a bounded wait). False if its previous owner died
        holding it (see `try_lock`)."""
        rc = self._lock(self._mutex)
        if rc == 0:
            return True
        self._lock_failed(rc)
        return False

    def try_lock(self, wait: float = 0.0) -> bool | None:
        """Take the mutex within ``wait`` seconds: True; False if its previous owner died
        holding it (the state may be half-changed: the mutex is ours, marked consistent, and
        the DIRTY flag is set so that the supervisor checks the region before anyone uses it
        fast again); None if it could not be had in time (nothing changed)."""
        rc = self._acquire(wait)
        if rc == 0:
            return True
        if rc in (errno.EBUSY, errno.ETIMEDOUT):
            return None
        self._lock_failed(rc)
        return False

    def _acquire(self, wait: float) -> int:
        """pthread_mutex_trylock, then a wait of at most ``wait`` seconds; the C status."""
        rc = self._trylock(self._mutex)
        if rc != errno.EBUSY or wait <= 0.0:
            return int(rc)
        if self._clocklock is not None:
            clock, now = time.CLOCK_MONOTONIC, time.monotonic()
        else:
            clock, now = time.CLOCK_REALTIME, time.time()
        at = now + wait
        ts = _Timespec(int(at), int((at % 1.0) * 1e9))
        if self._clocklock is not None:
            return int(self._clocklock(self._mutex, clock, ctypes.byref(ts)))
        return int(self._timedlock(self._mutex, ctypes.byref(ts)))

    def _lock_failed(self, rc: int) -> None:
        """pthread_mutex_lock said ``rc``: EOWNERDEAD (ours now, marked consistent, DIRTY
        set), or an error (ENOTRECOVERABLE: the region can no longer be used), raised."""
        if rc == errno.EOWNERDEAD:
            self._consistent(self._mutex)
            self.set_flags(self.flags | DIRTY)
            return
        raise OSError(rc, f"pthread_mutex_lock: {os.strerror(rc)}")

    def unlock(self) -> None:
        self._unlock(self._mutex)

    # ------------------------------------------------------------------ fields

    @property
    def flags(self) -> int:
        return U32.unpack_from(self.mm, FLAGS_AT)[0]

    def set_flags(self, value: int) -> None:
        U32.pack_into(self.mm, FLAGS_AT, value)

    @property
    def pending(self) -> int:
        return int(self._pend.value)

    def set_pending(self, value: int) -> None:
        self._pend.value = value & 0xFFFFFFFF

    @property
    def takes(self) -> int:
        """Fast leases taken so far (one 64-bit load: read without the mutex)."""
        return int(self._takes.value)

    @property
    def gives(self) -> int:
        """Fast leases given back so far (one 64-bit load)."""
        return int(self._gives.value)

    def hold_times(self) -> tuple[list[int], float]:
        """The hold-time counts per bucket (HOLD_BUCKETS, then +Inf) and their sum, of every
        lease given back so far (read under the mutex: u64s are not read in one load)."""
        *counts, total = HIST.unpack_from(self.mm, HIST_AT)
        return counts, total

    def state(self, i: int) -> int:
        return self.mm[STATES_AT + i]

    def set_state(self, i: int, st: int) -> None:
        self.mm[STATES_AT + i] = st

    def slot(self, i: int) -> tuple[int, int, int, int, float, float]:
        """(generation, conn, pid, pad, start, since) of slot ``i``."""
        return SLOT.unpack_from(self.mm, self.slots_at + i * SLOT.size)

    def bump(self, i: int) -> int:
        """Next generation of slot ``i`` (a late put of the old one is then a no-op)."""
        at = self.slots_at + i * SLOT.size
        gen = (U64.unpack_from(self.mm, at)[0] + 1) & 0xFFFFFFFFFFFFFFFF
        U64.pack_into(self.mm, at, gen)
        return gen

    def write_holder(self, i: int, gen: int, conn: int, pid: int, start: float,
                     since: float) -> None:
        SLOT.pack_into(self.mm, self.slots_at + i * SLOT.size, gen, conn, pid, 0, start, since)

    def count(self, st: int) -> int:
        return self.mm[STATES_AT:STATES_AT + self.nslots].count(st)

    def find(self, st: int) -> int:
        return self.mm.find(bytes((st,)), STATES_AT, STATES_AT + self.nslots) - STATES_AT \
            if st in STATES else -1

    # ------------------------------------------------------------------ client moves

    def take(self, conn: int, pid: int, start: float, now: float,
             wait: float = CLIENT_WAIT) -> tuple[int, int] | int:
        """A client's get: (slot, generation) of a FREE slot now HELD by it; `QUEUE`
        (``pending`` counted: send the get to the supervisor, which counts its arrival); or `BUSY`:
        the mutex was not had within ``wait`` (send a normal get, nothing counted)."""
        mm = self.mm
        if self._want_kind is not None and self._kindv.value != self._want_kind:
            return BUSY  # a client wrote over the mutex: the supervisor sets it up again
        try:
            # Inside the try: a signal handler raising right after the lock is taken still
            # unlocks (and unlocking a robust mutex we do not own is a harmless EPERM).
            rc = self._trylock(self._mutex)
            if rc:
                if rc == errno.EBUSY:
                    rc = self._acquire(wait)
                    if rc in (errno.EBUSY, errno.ETIMEDOUT):
                        return BUSY
                if rc:
                    self._lock_failed(rc)  # a dead owner: DIRTY, which sends us to the supervisor
            if not U32.unpack_from(mm, FLAGS_AT)[0]:
                i = mm.find(b"\x01", STATES_AT, STATES_AT + self.nslots)
                if i >= 0:
                    i -= STATES_AT
                    at = self.slots_at + i * SLOT.size
                    gen = (U64.unpack_from(mm, at)[0] + 1) & 0xFFFFFFFFFFFFFFFF
                    SLOT.pack_into(mm, at, gen, conn, pid, 0, start, now)
                    mm[STATES_AT + i] = HELD  # last: the move is done
                    self._takes.value += 1
                    return i, gen
                U32.pack_into(mm, FLAGS_AT, WAITERS)  # from now on, everyone queues
            self._pend.value += 1  # one 32-bit store (see __init__); wraps at 2**32
            return QUEUE
        finally:
            self._unlock(self._mutex)

    def give(self, i: int, gen: int, conn: int, wait: float = CLIENT_WAIT) -> bool | int:
        """A client's put of (slot, generation): True (FREE again), `POKE` (RETURNED: the
        supervisor must hand it on), `BUSY` (the mutex was not had within ``wait``: send the
        give to the supervisor as a message), or False: not this holder's any more
        (reclaimed, killed, repaired, or put twice), and nothing changed."""
        if not 0 <= i < self.nslots:
            return False
        if self._want_kind is not None and self._kindv.value != self._want_kind:
            return BUSY  # see take()
        try:
            rc = self._trylock(self._mutex)  # inside the try: see take()
            if rc:
                if rc == errno.EBUSY:
                    rc = self._acquire(wait)
                    if rc in (errno.EBUSY, errno.ETIMEDOUT):
                        return BUSY
                if rc:
                    self._lock_failed(rc)
            return self._give_locked(i, gen, conn)
        finally:
            self._unlock(self._mutex)

    def _give_locked(self, i: int, gen: int, conn: int) -> bool | int:
        mm = self.mm
        at = self.slots_at + i * SLOT.size
        if mm[STATES_AT + i] != HELD or GEN_CONN.unpack_from(mm, at) != (gen, conn):
            return False
        U64.pack_into(mm, at, (gen + 1) & 0xFFFFFFFFFFFFFFFF)
        hold = time.monotonic() - F64.unpack_from(mm, at + SINCE_AT)[0]
        if not hold >= 0.0:  # a clock read before the take's, or a scribbled NaN
            hold = 0.0
        b = bisect.bisect_left(HOLD_BUCKETS, hold)
        U64.pack_into(mm, HIST_AT + 8 * b, (U64.unpack_from(mm, HIST_AT + 8 * b)[0] + 1)
                      & 0xFFFFFFFFFFFFFFFF)
        F64.pack_into(mm, HIST_AT + 96, F64.unpack_from(mm, HIST_AT + 96)[0] + hold)
        self._gives.value += 1
        if U32.unpack_from(mm, FLAGS_AT)[0]:
            mm[STATES_AT + i] = RETURNED
            return POKE
        mm[STATES_AT + i] = FREE
        return True
