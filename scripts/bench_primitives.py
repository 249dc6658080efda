"""Candidate primitives for token leases in shared memory, measured side by side from Python.

    python scripts/bench_primitives.py [--seconds 1.0] [--procs 1,8]

Each cell forks N processes that cycle "take + release" on one shared primitive for a fixed
time and record every cycle's latency (``time.perf_counter_ns``, whose own cost, ~80 ns, is
in every figure). Printed: cycles/s over all processes, p50 and p99 in microseconds.

- ``robust-mutex``: a process-shared ``PTHREAD_MUTEX_ROBUST`` mutex in an anonymous shared
  mapping, locked and unlocked through ctypes (a dying owner is reported to the next locker
  as ``EOWNERDEAD``);
- ``sysv-sem``: a SysV semaphore, ``semop`` -1 then +1 with ``SEM_UNDO`` (the kernel undoes
  a dead process's operations), through ctypes;
- ``flock`` and ``lockf``: ``fcntl.flock`` / ``fcntl.lockf`` on a file (released by the
  kernel when the process dies);
- ``c-atomics``: a compare-and-swap spin lock in a tiny C library compiled here with the
  system ``cc`` and called through ctypes (what a C extension's critical section would cost,
  plus the ctypes call); skipped when there is no compiler;
- ``python-floor``: two ctypes calls to a no-op C function (``getpid``... of libc), the cost
  of crossing into C twice from Python, which every candidate above pays.

Used to choose the fast path's primitive (docs/performance.md, "Token leases in shared
memory").
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import fcntl
import mmap
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable

CTX = multiprocessing.get_context("fork")
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

PTHREAD_PROCESS_SHARED = 1
PTHREAD_MUTEX_ROBUST = 1
MUTEX_SIZE = 64  # sizeof(pthread_mutex_t) is 40 on x86-64 glibc; room to spare


def robust_mutex() -> Callable[[], tuple[Callable[[], object], Callable[[], object]]]:
    mem = mmap.mmap(-1, 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    attr = ctypes.create_string_buffer(64)
    libc.pthread_mutexattr_init(attr)
    libc.pthread_mutexattr_setpshared(attr, PTHREAD_PROCESS_SHARED)
    libc.pthread_mutexattr_setrobust(attr, PTHREAD_MUTEX_ROBUST)
    assert libc.pthread_mutex_init(ctypes.c_void_p(addr), attr) == 0

    def make() -> tuple[Callable[[], object], Callable[[], object]]:
        lock, unlock = libc.pthread_mutex_lock, libc.pthread_mutex_unlock
        p = ctypes.c_void_p(addr)
        return (lambda: lock(p)), (lambda: unlock(p))
    make.keep = mem  # type: ignore[attr-defined]
    return make


class _Sembuf(ctypes.Structure):
    _fields_ = [("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short),
                ("sem_flg", ctypes.c_short)]


def sysv_sem() -> Callable[[], tuple[Callable[[], object], Callable[[], object]]]:
    semid = libc.semget(0, 1, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    assert semid >= 0
    libc.semctl(semid, 0, 16, 1)  # SETVAL 1
    down, up = _Sembuf(0, -1, 0x1000), _Sembuf(0, 1, 0x1000)  # SEM_UNDO

    def make() -> tuple[Callable[[], object], Callable[[], object]]:
        semop = libc.semop
        d, u = ctypes.byref(down), ctypes.byref(up)
        return (lambda: semop(semid, d, 1)), (lambda: semop(semid, u, 1))
    make.cleanup = lambda: libc.semctl(semid, 0, 0)  # type: ignore[attr-defined]  # IPC_RMID
    return make


def file_lock(kind: str) -> Callable[[], tuple[Callable[[], object], Callable[[], object]]]:
    fd, path = tempfile.mkstemp(prefix="mppool-prim-")
    os.close(fd)

    def make() -> tuple[Callable[[], object], Callable[[], object]]:
        f = os.open(path, os.O_RDWR)  # per process: flock locks belong to the open file
        if kind == "flock":
            return (lambda: fcntl.flock(f, fcntl.LOCK_EX)), (lambda: fcntl.flock(f, fcntl.LOCK_UN))
        return (lambda: fcntl.lockf(f, fcntl.LOCK_EX)), (lambda: fcntl.lockf(f, fcntl.LOCK_UN))
    make.cleanup = lambda: os.unlink(path)  # type: ignore[attr-defined]
    return make


C_SOURCE = r"""
#include <sched.h>
int spin_lock(int *p) { int n = 0;
  while (!__atomic_compare_exchange_n(p, &n, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
    n = 0; sched_yield(); }
  return 0; }
int spin_unlock(int *p) { __atomic_store_n(p, 0, __ATOMIC_RELEASE); return 0; }
"""


def c_atomics() -> Callable[[], tuple[Callable[[], object], Callable[[], object]]] | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    tmp = tempfile.mkdtemp(prefix="mppool-prim-")
    src, lib = os.path.join(tmp, "spin.c"), os.path.join(tmp, "spin.so")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    if subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, src]).returncode:
        return None
    so = ctypes.CDLL(lib)
    mem = mmap.mmap(-1, 4096)
    addr = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(mem)))

    def make() -> tuple[Callable[[], object], Callable[[], object]]:
        lock, unlock = so.spin_lock, so.spin_unlock
        return (lambda: lock(addr)), (lambda: unlock(addr))
    make.keep = mem  # type: ignore[attr-defined]
    make.cleanup = lambda: shutil.rmtree(tmp)  # type: ignore[attr-defined]
    return make


def python_floor() -> Callable[[], tuple[Callable[[], object], Callable[[], object]]]:
    def make() -> tuple[Callable[[], object], Callable[[], object]]:
        f = libc.getpid
        return (lambda: f()), (lambda: f())
    return make


def _worker(make: Callable[[], tuple[Callable[[], object], Callable[[], object]]],
            start: float, seconds: float, out: multiprocessing.queues.Queue) -> None:  # type: ignore[name-defined]
    take, release = make()
    clock = time.perf_counter_ns
    lat: list[int] = []
    while time.time() < start:
        pass
    end = clock() + int(seconds * 1e9)
    t = clock()
    while t < end:
        take()
        release()
        t2 = clock()
        lat.append(t2 - t)
        t = t2
    out.put(lat)


def measure(make: Callable[..., tuple[Callable[[], object], Callable[[], object]]], n: int,
            seconds: float) -> tuple[float, float, float]:
    out = CTX.Queue()
    start = time.time() + 0.3
    procs = [CTX.Process(target=_worker, args=(make, start, seconds, out)) for _ in range(n)]
    for p in procs:
        p.start()
    lats = [out.get(timeout=seconds + 30) for _ in procs]
    for p in procs:
        p.join(10)
    total = sum(len(x) for x in lats)
    every = sorted(v for x in lats for v in x)
    return total / seconds, every[len(every) // 2] / 1e3, every[int(len(every) * 0.99)] / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--procs", default="1,8")
    args = ap.parse_args()
    ns = [int(x) for x in args.procs.split(",")]
    cands: dict[str, Callable[..., tuple[Callable[[], object], Callable[[], object]]] | None] = {
        "python-floor": python_floor(),
        "robust-mutex": robust_mutex(),
        "sysv-sem": sysv_sem(),
        "flock": file_lock("flock"),
        "lockf": file_lock("lockf"),
        "c-atomics": c_atomics(),
    }
    print(f"{'primitive':14} {'N':>2} {'cycles/s':>12} {'p50 us':>8} {'p99 us':>8}")
    try:
        for name, make in cands.items():
            if make is None:
                print(f"{name:14} skipped (no C compiler)")
                continue
            for n in ns:
                rate, p50, p99 = measure(make, n, args.seconds)
                print(f"{name:14} {n:>2} {rate:>12,.0f} {p50:>8.2f} {p99:>8.2f}", flush=True)
    finally:
        for make in cands.values():
            cleanup = getattr(make, "cleanup", None)
            if cleanup is not None:
                cleanup()


if __name__ == "__main__":
    main()
