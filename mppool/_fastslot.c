/* The fast path's shared-memory moves in C: the region's lock (a 32-bit word taken with atomics
 * and futex calls), and the client's take and give under it. The fast path needs this
 * module (Python has no atomic compare-and-swap); where it was not built, there is none.
 *
 * Why a lock word of our own and not a pthread mutex: the lock lives in memory that every
 * client of the pool can write, and the C library's mutex code trusts its bytes (a client
 * writing over a glibc robust mutex could make the next locker abort, or write through the
 * robust-list pointers kept inside it). Here nothing but a compare-and-swap, an exchange
 * and futex calls ever touch the word: whatever a client writes makes the lock wrong for a
 * while, never a process crash. A holder that dies inside leaves its thread id in the word;
 * mppool.shm.Region.try_lock finds that thread gone and takes the lock over (the region is
 * then marked DIRTY and checked by the supervisor).
 *
 * Why C for take and give: one call, and a critical section of a memchr and a few stores, so
 * a holder is rarely preempted inside it. The layout, states and rules are mppool/shm.py's.
 * A move writes a slot's state byte last (a release store), so a process that dies in the
 * middle leaves the old state or the new one.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FLAGS_AT 12
#define PENDING_AT 16
#define MUTEX_AT 64 /* the lock word */
#define HIST_AT 128
#define TAKES_AT 232
#define GIVES_AT 240
#define STATES_AT 256
#define SLOT_SIZE 40
#define WAITERS 1u
#define DIRTY 4u
#define ST_FREE 1
#define ST_HELD 2
#define ST_RETURNED 3
#define QUEUE (-1)
#define BUSY (-2)
#define POKE 2

#define TID_MASK 0x3FFFFFFFu
#define LOCK_WAITERS 0x80000000u

/* The region's lock is one 32-bit word at MUTEX_AT, taken and given back with atomics and
 * futex calls only: 0 when free, else the owner's thread id, with LOCK_WAITERS set when
 * someone sleeps on it. No C library code ever runs on these bytes, so a client that writes
 * anything over them can make the lock wrong (two in at once, or nobody able to enter until
 * the supervisor takes it back), never make a process crash. */
static uint32_t my_tid(void)
{
    return (uint32_t)syscall(SYS_gettid) & TID_MASK;
}

static long futex(uint32_t *word, int op, uint32_t val, const struct timespec *rel)
{
    return syscall(SYS_futex, word, op, val, rel, NULL, 0);
}

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Take the lock within `wait` seconds: 0 (ours) or BUSY. */
static int lock_within(uint8_t *base, double wait)
{
    uint32_t *w = (uint32_t *)(base + MUTEX_AT);
    uint32_t tid = my_tid();
    uint32_t c = 0;
    if (__atomic_compare_exchange_n(w, &c, tid, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return 0;
    if (wait <= 0.0)
        return BUSY;
    double deadline = monotonic() + wait;
    int rc = BUSY;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        c = __atomic_load_n(w, __ATOMIC_RELAXED);
        if ((c & TID_MASK) == 0) { /* free (whatever else a client wrote around it) */
            /* Taken with the waiters bit: others may still sleep on the word. */
            if (__atomic_compare_exchange_n(w, &c, tid | LOCK_WAITERS, 0, __ATOMIC_ACQUIRE,
                                            __ATOMIC_RELAXED)) {
                rc = 0;
                break;
            }
            continue;
        }
        if (!(c & LOCK_WAITERS)) {
            uint32_t want = c | LOCK_WAITERS;
            if (!__atomic_compare_exchange_n(w, &c, want, 0, __ATOMIC_RELAXED,
                                             __ATOMIC_RELAXED))
                continue;
            c = want;
        }
        double left = deadline - monotonic();
        if (left <= 0.0)
            break;
        struct timespec rel;
        rel.tv_sec = (time_t)left;
        rel.tv_nsec = (long)((left - (double)rel.tv_sec) * 1e9);
        futex(w, FUTEX_WAIT, c, &rel); /* woken, timed out, or the word changed */
    }
    Py_END_ALLOW_THREADS
    return rc;
}

/* Give the lock back if this thread holds it (else EPERM, nothing changed). */
static int unlock_word(uint8_t *base)
{
    uint32_t *w = (uint32_t *)(base + MUTEX_AT);
    uint32_t c = __atomic_load_n(w, __ATOMIC_RELAXED);
    if ((c & TID_MASK) != my_tid())
        return EPERM;
    c = __atomic_exchange_n(w, 0, __ATOMIC_RELEASE);
    if (c & LOCK_WAITERS)
        futex(w, FUTEX_WAKE, 1, NULL);
    return 0;
}

/* One more in a u64 counter that the supervisor reads without the mutex: one 64-bit store. */
static void bump64(uint8_t *at)
{
    uint64_t *n = (uint64_t *)at;
    __atomic_store_n(n, __atomic_load_n(n, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
}

/* The hold time of the lease in slot `s`, counted in the region's histogram (mppool/shm.py:
 * HOLD_BUCKETS, then +Inf; "le" bounds, as Prometheus's). Under the mutex. */
static const double hold_buckets[] = {0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5,
                                      1.0, 5.0, 30.0};

static void count_hold(uint8_t *base, uint8_t *s)
{
    struct timespec ts;
    double since, hold;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    memcpy(&since, s + 32, 8);
    hold = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 - since;
    if (!(hold >= 0.0)) /* a clock read before the take's, or a scribbled NaN */
        hold = 0.0;
    int i = 0;
    while (i < 11 && hold > hold_buckets[i])
        i++;
    uint64_t n;
    double sum;
    memcpy(&n, base + HIST_AT + 8 * i, 8);
    n += 1;
    memcpy(base + HIST_AT + 8 * i, &n, 8);
    memcpy(&sum, base + HIST_AT + 96, 8);
    sum += hold;
    memcpy(base + HIST_AT + 96, &sum, 8);
    bump64(base + GIVES_AT);
}

static void unlock(uint8_t *base)
{
    unlock_word(base);
}

/* take(base, nslots, slots_at, conn, pid, start, now, wait=0.002) -> (slot, generation),
 * QUEUE (-1: pending counted, go to the supervisor) or BUSY (-2: the mutex was not had). */
static PyObject *take(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"base", "nslots", "slots_at", "conn", "pid", "start", "now", "wait",
                         NULL};
    unsigned long long base, conn;
    Py_ssize_t nslots, slots_at;
    unsigned int pid;
    double start, now, wait = 0.002;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KnnKIdd|d", kw, &base, &nslots, &slots_at,
                                     &conn, &pid, &start, &now, &wait))
        return NULL;
    uint8_t *b = (uint8_t *)(uintptr_t)base;
    if (lock_within(b, wait) == BUSY)
        return PyLong_FromLong(BUSY);
    uint32_t *flags = (uint32_t *)(b + FLAGS_AT);
    if (__atomic_load_n(flags, __ATOMIC_RELAXED) == 0) {
        uint8_t *found = memchr(b + STATES_AT, ST_FREE, (size_t)nslots);
        if (found != NULL) {
            Py_ssize_t i = found - (b + STATES_AT);
            uint8_t *s = b + slots_at + i * SLOT_SIZE;
            uint64_t gen;
            memcpy(&gen, s, 8);
            gen += 1;
            uint32_t pad = 0;
            memcpy(s, &gen, 8);
            memcpy(s + 8, &conn, 8);
            memcpy(s + 16, &pid, 4);
            memcpy(s + 20, &pad, 4);
            memcpy(s + 24, &start, 8);
            memcpy(s + 32, &now, 8);
            __atomic_store_n(found, (uint8_t)ST_HELD, __ATOMIC_RELEASE); /* last */
            bump64(b + TAKES_AT);
            unlock(b);
            return Py_BuildValue("(nK)", i, (unsigned long long)gen);
        }
        __atomic_store_n(flags, WAITERS, __ATOMIC_RELAXED); /* from now on, everyone queues */
    }
    /* One 32-bit store: the supervisor reads pending without the mutex. */
    uint32_t *pending = (uint32_t *)(b + PENDING_AT);
    __atomic_store_n(pending, *pending + 1u, __ATOMIC_RELEASE);
    unlock(b);
    return PyLong_FromLong(QUEUE);
}

/* The give of (slot `i`, generation `gen`) by connection `conn`, the lock held: 1 (FREE
 * again), POKE (RETURNED: the supervisor hands it on) or 0 (not this holder's: nothing
 * changed). Clients through `give`, the supervisor (a FastGive) through `give_locked`. */
static int give_move(uint8_t *b, Py_ssize_t slots_at, Py_ssize_t i, uint64_t gen, uint64_t conn)
{
    uint8_t *state = b + STATES_AT + i;
    uint8_t *s = b + slots_at + i * SLOT_SIZE;
    uint64_t g, c;
    memcpy(&g, s, 8);
    memcpy(&c, s + 8, 8);
    if (*state != ST_HELD || g != gen || c != conn)
        return 0;
    g = gen + 1;
    memcpy(s, &g, 8);
    count_hold(b, s);
    if (__atomic_load_n((uint32_t *)(b + FLAGS_AT), __ATOMIC_RELAXED)) {
        __atomic_store_n(state, (uint8_t)ST_RETURNED, __ATOMIC_RELEASE);
        return POKE;
    }
    __atomic_store_n(state, (uint8_t)ST_FREE, __ATOMIC_RELEASE);
    return 1;
}

static PyObject *give_result(int moved)
{
    if (moved == POKE)
        return PyLong_FromLong(POKE);
    return PyBool_FromLong(moved);
}

/* give(base, nslots, slots_at, slot, generation, conn, wait=0.002) -> True (FREE again),
 * POKE (2: RETURNED, the supervisor hands it on), BUSY (-2) or False (not this holder's). */
static PyObject *give(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"base", "nslots", "slots_at", "slot", "gen", "conn", "wait", NULL};
    unsigned long long base, gen, conn;
    Py_ssize_t nslots, slots_at, i;
    double wait = 0.002;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KnnnKK|d", kw, &base, &nslots, &slots_at,
                                     &i, &gen, &conn, &wait))
        return NULL;
    if (i < 0 || i >= nslots)
        Py_RETURN_FALSE;
    uint8_t *b = (uint8_t *)(uintptr_t)base;
    if (lock_within(b, wait) == BUSY)
        return PyLong_FromLong(BUSY);
    int moved = give_move(b, slots_at, i, gen, conn);
    unlock(b);
    return give_result(moved);
}

/* give_locked(base, nslots, slots_at, slot, generation, conn) -> as give, the caller holding
 * the lock (the supervisor applying a FastGive). */
static PyObject *give_locked(PyObject *self, PyObject *args)
{
    unsigned long long base, gen, conn;
    Py_ssize_t nslots, slots_at, i;
    if (!PyArg_ParseTuple(args, "KnnnKK", &base, &nslots, &slots_at, &i, &gen, &conn))
        return NULL;
    if (i < 0 || i >= nslots)
        Py_RETURN_FALSE;
    return give_result(give_move((uint8_t *)(uintptr_t)base, slots_at, i, gen, conn));
}

/* lock(base, wait) -> 0 (ours) or BUSY (-2): the supervisor's and the tests' lock. */
static PyObject *lock(PyObject *self, PyObject *args)
{
    unsigned long long base;
    double wait;
    if (!PyArg_ParseTuple(args, "Kd", &base, &wait))
        return NULL;
    return PyLong_FromLong(lock_within((uint8_t *)(uintptr_t)base, wait));
}

/* unlock(base) -> 0, or EPERM when this thread does not hold it (nothing changed). */
static PyObject *unlock_(PyObject *self, PyObject *args)
{
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "K", &base))
        return NULL;
    return PyLong_FromLong(unlock_word((uint8_t *)(uintptr_t)base));
}

/* steal(base, word) -> True when the lock word was still `word` (an owner found dead, or no
 * thread of a client) and is now this thread's; False when it changed meanwhile. Whoever
 * sleeps on it is woken: they find it taken and sleep again, or time out. */
static PyObject *steal(PyObject *self, PyObject *args)
{
    unsigned long long base;
    unsigned int word;
    if (!PyArg_ParseTuple(args, "KI", &base, &word))
        return NULL;
    uint32_t *w = (uint32_t *)(uintptr_t)(base + MUTEX_AT);
    uint32_t c = word;
    if (!__atomic_compare_exchange_n(w, &c, my_tid() | (word & LOCK_WAITERS), 0,
                                     __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"lock", lock, METH_VARARGS, "Take the region's lock within a wait: 0, or BUSY (-2)."},
    {"unlock", unlock_, METH_VARARGS, "Give the region's lock back: 0, or EPERM."},
    {"steal", steal, METH_VARARGS, "Take over a lock word held by a dead owner."},
    {"give_locked", give_locked, METH_VARARGS, "A give, the caller holding the lock."},
    {"take", (PyCFunction)(void (*)(void))take, METH_VARARGS | METH_KEYWORDS,
     "A client's get in the region (see mppool.shm.Region.take)."},
    {"give", (PyCFunction)(void (*)(void))give, METH_VARARGS | METH_KEYWORDS,
     "A client's put in the region (see mppool.shm.Region.give)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mppool._fastslot",
    "The fast path's client moves in C (optional; mppool.shm falls back to Python).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastslot(void)
{
    return PyModule_Create(&module);
}
