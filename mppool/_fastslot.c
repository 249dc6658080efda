/* The fast path's two client moves, take and give, in C (optional: mppool.shm falls back to
 * the same moves in Python when this module was not built).
 *
 * Why C: in Python the critical section (the region's mutex held) lasts a few microseconds,
 * so with more processes than cores a holder is often preempted inside it, and everyone else
 * waits for the scheduler to run it again. Here it is a memchr and a few stores, so that
 * rarely happens; and one call replaces the half-dozen ctypes and struct calls of the Python
 * version. The memory layout, the states and the rules are mppool/shm.py's: this file must
 * follow them exactly (tests/unit/test_shm.py runs every move on both implementations).
 *
 * A move writes a slot's state byte last (a release store), so a process that dies in the
 * middle leaves the old state or the new one; the robust mutex reports such a death to the
 * next locker (EOWNERDEAD), who marks the region DIRTY for the supervisor to check.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define FLAGS_AT 12
#define PENDING_AT 16
#define MUTEX_AT 64
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

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
#define HAVE_CLOCKLOCK 1
#endif

/* Take the mutex within `wait` seconds: 0 (ours), EOWNERDEAD (ours, marked consistent,
 * DIRTY set), BUSY (not had in time), or another errno (the mutex is unusable). */
static int lock_within(uint8_t *base, double wait)
{
    pthread_mutex_t *m = (pthread_mutex_t *)(base + MUTEX_AT);
    int rc = pthread_mutex_trylock(m);
    if (rc == EBUSY && wait > 0.0) {
        struct timespec ts;
#ifdef HAVE_CLOCKLOCK
        clock_gettime(CLOCK_MONOTONIC, &ts);
#else
        clock_gettime(CLOCK_REALTIME, &ts);
#endif
        double whole = (double)(long)wait;
        ts.tv_sec += (time_t)whole;
        ts.tv_nsec += (long)((wait - whole) * 1e9);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec += 1;
            ts.tv_nsec -= 1000000000L;
        }
        Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_CLOCKLOCK
        rc = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
#else
        rc = pthread_mutex_timedlock(m, &ts);
#endif
        Py_END_ALLOW_THREADS
    }
    if (rc == EBUSY || rc == ETIMEDOUT)
        return BUSY;
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        uint32_t *flags = (uint32_t *)(base + FLAGS_AT);
        __atomic_store_n(flags, *flags | DIRTY, __ATOMIC_RELAXED);
        return 0;
    }
    return rc;
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

/* Whether the mutex's kind (glibc: the int at offset 16) is still the robust one `kind`
 * (-1: not glibc, nothing to check). glibc dispatches on it, and a kind a client wrote
 * there (priority inheritance or protection) makes glibc abort a locker (see mppool/shm.py,
 * Region.mutex_intact). */
static int kind_intact(uint8_t *base, int kind)
{
    int32_t now;
    if (kind < 0)
        return 1;
    now = __atomic_load_n((int32_t *)(base + MUTEX_AT + 16), __ATOMIC_RELAXED);
    return now == kind;
}

static void unlock(uint8_t *base)
{
    pthread_mutex_unlock((pthread_mutex_t *)(base + MUTEX_AT));
}

static PyObject *lock_error(int rc)
{
    errno = rc;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* take(base, nslots, slots_at, conn, pid, start, now, wait=0.002) -> (slot, generation),
 * QUEUE (-1: pending counted, go to the supervisor) or BUSY (-2: the mutex was not had). */
static PyObject *take(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"base", "nslots", "slots_at", "kind", "conn", "pid", "start", "now",
                         "wait", NULL};
    unsigned long long base, conn;
    Py_ssize_t nslots, slots_at;
    int kind;
    unsigned int pid;
    double start, now, wait = 0.002;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KnniKIdd|d", kw, &base, &nslots, &slots_at,
                                     &kind, &conn, &pid, &start, &now, &wait))
        return NULL;
    uint8_t *b = (uint8_t *)(uintptr_t)base;
    if (!kind_intact(b, kind))
        return PyLong_FromLong(BUSY); /* written over: the supervisor sets it up again */
    int rc = lock_within(b, wait);
    if (rc == BUSY)
        return PyLong_FromLong(BUSY);
    if (rc != 0)
        return lock_error(rc);
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

/* give(base, nslots, slots_at, slot, generation, conn, wait=0.002) -> True (FREE again),
 * POKE (2: RETURNED, the supervisor hands it on), BUSY (-2) or False (not this holder's). */
static PyObject *give(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kw[] = {"base", "nslots", "slots_at", "kind", "slot", "gen", "conn", "wait",
                         NULL};
    unsigned long long base, gen, conn;
    Py_ssize_t nslots, slots_at, i;
    int kind;
    double wait = 0.002;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KnninKK|d", kw, &base, &nslots, &slots_at,
                                     &kind, &i, &gen, &conn, &wait))
        return NULL;
    if (i < 0 || i >= nslots)
        Py_RETURN_FALSE;
    uint8_t *b = (uint8_t *)(uintptr_t)base;
    if (!kind_intact(b, kind))
        return PyLong_FromLong(BUSY);
    int rc = lock_within(b, wait);
    if (rc == BUSY)
        return PyLong_FromLong(BUSY);
    if (rc != 0)
        return lock_error(rc);
    uint8_t *state = b + STATES_AT + i;
    uint8_t *s = b + slots_at + i * SLOT_SIZE;
    uint64_t g, c;
    memcpy(&g, s, 8);
    memcpy(&c, s + 8, 8);
    if (*state != ST_HELD || g != gen || c != conn) {
        unlock(b);
        Py_RETURN_FALSE;
    }
    g = gen + 1;
    memcpy(s, &g, 8);
    count_hold(b, s);
    if (__atomic_load_n((uint32_t *)(b + FLAGS_AT), __ATOMIC_RELAXED)) {
        __atomic_store_n(state, (uint8_t)ST_RETURNED, __ATOMIC_RELEASE);
        unlock(b);
        return PyLong_FromLong(POKE);
    }
    __atomic_store_n(state, (uint8_t)ST_FREE, __ATOMIC_RELEASE);
    unlock(b);
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
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
