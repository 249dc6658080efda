"""A token pool's slots in shared memory, guarded by a lock word that only atomics touch.

This module is the memory layout and the moves on it, without any I/O: the client side
(`mppool.fastpath`) and the supervisor side (`mppool.supervisor.fastregion`) both go through
it. Why this primitive: docs/performance.md, "Token leases in shared memory".

Layout (native byte order; the region is a memfd made by the supervisor and mapped by
clients that proved the key)::

    0    magic u32, version u32, nslots u32, flags u32, pending u32, pad
    64   the lock word u32: 0 free, else its owner's thread id (| 1<<31: someone sleeps on it)
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
fast path is off), DIRTY (a process died holding the lock: the supervisor must check the
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

import ctypes
import fcntl
import functools
import mmap
import os
import struct
import sys

try:
    from . import _fastslot  # type: ignore[attr-defined]
except ImportError:  # not built here (no compiler at install time): no fast path
    _fastslot = None

MAGIC = 0x4D505446  # "MPTF"
VERSION = 3
ABSENT, FREE, HELD, RETURNED = 0, 1, 2, 3
STATES = (ABSENT, FREE, HELD, RETURNED)
WAITERS, CLOSED, DIRTY = 1, 2, 4

HEADER = struct.Struct("=IIIII")
FLAGS_AT, PENDING_AT = 12, 16
MUTEX_AT, MUTEX_SIZE = 64, 64
# Hold times, counted by each give under the mutex (the supervisor's metrics fold them into
# its hold-time histogram): upper bounds in seconds, as the metrics' buckets.
HOLD_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
HIST_AT = 128
HIST = struct.Struct("=12Qd")
TAKES_AT, GIVES_AT = 232, 240
STATES_AT = 256
SLOT = struct.Struct("=QQIIdd")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
MAX_SLOTS = 1 << 16


TID_MASK = 0x3FFFFFFF

# What a take() that does not get a slot says: go to the supervisor (``pending`` counted).
QUEUE = -1
# What give() says besides True/False: the token went back in slow mode; poke the supervisor.
POKE = 2
# What take() and give() say when the mutex could not be had within their wait (its holder
# is stopped or descheduled): take the normal path (a get) or send the give as a message.
BUSY = -2


class Unavailable(Exception):
    """No fast path here (not Linux, no memfd seals, or mppool's C module was not built)."""


def available() -> None:
    """Unavailable unless this platform has what the fast path needs: Linux, sealed memfds,
    and the C module (mppool/_fastslot.c: the lock takes atomics, which Python has not)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create") \
            or not hasattr(os, "MFD_ALLOW_SEALING") or not hasattr(fcntl, "F_ADD_SEALS"):
        raise Unavailable("the shared-memory fast path needs Linux (sealed memfds)")
    if _fastslot is None:
        raise Unavailable("mppool's C module (_fastslot) was not built at install (no C "
                          "compiler then?): the fast path needs it")


def thread_state(tid: int) -> bytes | None:
    """The state letter of thread ``tid`` in this pid namespace (b"R", b"S", b"T", b"Z"...):
    None if there is no such thread, b"?" if it may not be looked at."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()
    except FileNotFoundError:
        return None
    except OSError:
        return b"?"
    return fields[0] if fields else b"?"


def thread_alive(tid: int) -> bool:
    """Whether thread ``tid`` exists and is not a zombie. A thread we may not look at counts
    as alive: only a thread known gone loses the lock."""
    return thread_state(tid) not in (None, b"Z", b"X")


def region_size(nslots: int) -> int:
    return STATES_AT + _pad8(nslots) + nslots * SLOT.size


def _pad8(n: int) -> int:
    return (n + 7) & ~7


class Region:
    """One mapping of a token pool's region (the supervisor's, or a client's)."""

    def __init__(self, fd: int, nslots: int | None = None) -> None:
        available()
        size = os.fstat(fd).st_size
        if size < STATES_AT or size > region_size(MAX_SLOTS):
            raise ValueError(f"a fast-path region of {size} bytes")
        self.mm = mmap.mmap(fd, size)
        self._buf = ctypes.c_char.from_buffer(self.mm)
        # Fields read without the lock are read and written whole (one aligned load/store):
        # struct's "=I" writes byte by byte, and a reader could see a torn value (0x0100 read
        # as 0x0000 half-way through an increment).
        self._pend = ctypes.c_uint32.from_buffer(self.mm, PENDING_AT)
        self._takes = ctypes.c_uint64.from_buffer(self.mm, TAKES_AT)
        self._gives = ctypes.c_uint64.from_buffer(self.mm, GIVES_AT)
        self._word = ctypes.c_uint32.from_buffer(self.mm, MUTEX_AT)
        if nslots is not None:  # the supervisor, creating it (the lock word is 0: free)
            HEADER.pack_into(self.mm, 0, MAGIC, VERSION, nslots, 0, 0)
        magic, version, n, _, _ = HEADER.unpack_from(self.mm)
        if magic != MAGIC or version != VERSION or region_size(n) != size:
            self.close()
            raise ValueError("not a fast-path region of this version")
        self.nslots = n
        self.slots_at = STATES_AT + _pad8(n)
        self._base = ctypes.addressof(self._buf)
        # The client moves, in C (one call each): see mppool/_fastslot.c.
        at = (self._base, n, self.slots_at)
        self.take = functools.partial(_fastslot.take, *at)
        self.give = functools.partial(_fastslot.give, *at)
        # The same give, the caller holding the lock (the supervisor applying a FastGive).
        self.give_locked = functools.partial(_fastslot.give_locked, *at)

    @classmethod
    def create(cls, nslots: int, name: str = "mppool") -> tuple[Region, int]:
        """A new region of ``nslots`` ABSENT slots and the memfd behind it (the caller owns
        the descriptor)."""
        if not 1 <= nslots <= MAX_SLOTS:
            raise ValueError(f"nslots must be between 1 and {MAX_SLOTS}, got {nslots!r}")
        available()
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, region_size(nslots))
            # Every client gets this descriptor, read-write: shrinking it would make each
            # access past the new end a SIGBUS, in the supervisor too. Sealed at its size,
            # and the seals themselves sealed, before any client can have it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            return cls(fd, nslots), fd
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        # The C moves hold the mapping's address: dropped before it goes.
        for move in ("take", "give", "give_locked"):
            self.__dict__.pop(move, None)
        del self._buf, self._pend, self._takes, self._gives, self._word
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still alive somewhere: the mapping goes with the process

    # ------------------------------------------------------------------ the lock

    def try_lock(self, wait: float = 0.0) -> bool | None:
        """Take the lock within ``wait`` seconds: True; False if its owner was a thread that
        is gone (it may have died half-way through a move: the lock is ours and the DIRTY
        flag is set, so that the supervisor checks the region before anyone uses it fast
        again); None if it could not be had in time (nothing changed)."""
        if _fastslot.lock(self._base, wait) == 0:
            return True
        word = self._word.value
        tid = word & TID_MASK
        if tid and not thread_alive(tid) and _fastslot.steal(self._base, word):
            self.set_flags(self.flags | DIRTY)
            return False
        return None

    def lock(self) -> bool:
        """Take the lock, waiting as long as it takes (tests and tools only: the supervisor
        and the clients use `try_lock` with a bounded wait)."""
        while True:
            got = self.try_lock(1.0)
            if got is not None:
                return got

    def unlock(self) -> int:
        """Give the lock back: 0, or EPERM if this thread does not hold it (nothing done)."""
        return int(_fastslot.unlock(self._base))

    def owner_tid(self) -> int:
        """The thread id the lock word names as its owner (0: free)."""
        return int(self._word.value) & TID_MASK

    def reset_lock(self) -> None:
        """The supervisor's way out of a lock word that names an owner which is no thread of
        a client (a client wrote it): free again. Whoever sleeps on it wakes within its own
        short wait."""
        self._word.value = 0

    # ------------------------------------------------------------------ fields

    @property
    def flags(self) -> int:
        return U32.unpack_from(self.mm, FLAGS_AT)[0]

    def set_flags(self, value: int) -> None:
        U32.pack_into(self.mm, FLAGS_AT, value)

    @property
    def pending(self) -> int:
        return int(self._pend.value)

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
