"""The supervisor's named pools: create, attach, drop, and what each one is.

A pool is created by the first client that names it with options (``fun`` and hooks travel
once, with dill, on the control plane) and attached to by every later one. Options are
compared across processes by a *fingerprint*: functions by what shapes what they do (code,
constants, names, defaults, closure values), the rest by value, so two processes asking for
"the same" pool get one pool, and a different ``fun`` under the same name is refused.

Each pool's user code (``fun``, hooks, proxied calls) runs on that pool's own threads
(`Record.submit`, and the pool's runner for housekeeping): a hook that hangs holds only them.
"""

from __future__ import annotations

import logging
import pickle
import threading
import types
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

import dill

from ..clock import REAL_CLOCK, Clock
from ..errors import PoolClosed
from ..holder import Holder
from ..options import TRANSFERS
from ..pool import Entry, Pool
from ..ratelog import RateLimitedLog
from ..sched import HookExecutor, Scheduler

log = logging.getLogger("mppool")

POOL_THREADS = 4  # threads one pool's user code may occupy at most
STOP_GRACE = 5.0  # how long stop() waits for the pools' closers before leaving them behind


def _reset_default(obj: Any) -> None:
    """Reset a proxied object whose holder died: roll back a DB connection."""
    rollback = getattr(obj, "rollback", None)
    if callable(rollback):
        rollback()


def pool_executor(name: str) -> HookExecutor:
    """The threads that run one pool's user code (started on demand, daemons)."""
    return HookExecutor(POOL_THREADS, f"mppool-{name[:40]}")


class Record:
    """A named pool served by the supervisor.

    Its user code runs on its own ``HookExecutor``: through ``submit()`` for the lease loop
    (creating objects, proxied calls, returns that run hooks) and as the pool's ``runner``
    for housekeeping (closers, health checks, refills). ``Supervisor.create`` makes the
    executor first, since the pool needs it as its runner.
    """

    def __init__(self, name: str, pool_id: int, pool: Pool, transfer: str, kind: str,
                 fingerprint: Any, options: dict[str, Any],
                 executor: HookExecutor | None = None) -> None:
        self.name = name
        self.id = pool_id  # what the lease channel names the pool by
        self.pool = pool
        # Fixed at the pool's construction; read here by every get that does not name its
        # own (a property would cost a Python call each time).
        self.timeout: float | None = pool.timeout
        self.transfer = transfer
        self.kind = kind
        self.fingerprint = fingerprint
        # Its fastregion.FastRegion once a client asked for the fast path. Set here, not as a
        # class default: read on every get and put, an instance attribute is the fast lookup.
        self.fast: Any = None
        # The options that are plain data, to name their values when a client's differ.
        self.plain_options = {k: v for k, v in options.items() if _plain(v)}
        # Slow returns run on a worker thread, never on the lease loop.
        self.slow_ret = bool(options.get("retter") or options.get("closer") or options.get("max_use")
                             or options.get("max_lifetime"))
        self.cache_blobs = options.get("getter") is None and options.get("retter") is None
        self.has_getter = options.get("getter") is not None
        self.has_check = options.get("check") is not None  # a pre-ping before each get
        self.reset = (options.get("retter") or _reset_default) if transfer == "proxy" else None
        self.executor = executor if executor is not None else pool_executor(name)
        self._submit_errors = RateLimitedLog(10.0)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
        """Run ``fn(*args)`` (user code of this pool) on the pool's own threads.

        Returns a ``concurrent.futures.Future`` (fn's result or exception), or None when it
        could not be queued: no thread could be started, or the pool was dropped. None means
        for certain that ``fn`` will never run (logged here, at most every 10 s). Never
        raises, never blocks: with every thread of this pool busy (say, in a ``fun`` that
        hangs), ``fn`` waits in this pool's queue, and other pools are not affected.
        """
        try:
            return self.executor.submit(fn, *args)
        except RuntimeError as exc:
            self._submit_errors.error("submit", "mppool: pool %r: cannot run %s: %s", self.name,
                                      getattr(fn, "__qualname__", fn), exc)
            return None

    def close(self) -> None:
        """The pool is gone: cancel its queued calls (running ones are left to finish)."""
        self.executor.close()

    def blob(self, entry: Entry) -> bytes | None:
        """The bytes a client unpickles into its copy (None: the object stays here)."""
        if self.transfer == "proxy":
            return None
        blob = entry.blob
        if blob is None:
            try:
                blob = pickle.dumps(entry.obj, protocol=5)
            except Exception:
                try:
                    blob = dill.dumps(entry.obj, recurse=True)  # unpickles with pickle + dill
                except Exception as exc:
                    raise TypeError(
                        f"pool {self.name!r}: cannot copy its {type(entry.obj).__qualname__} "
                        f"to the caller ({exc}): a transfer=\"copy\" pool hands out pickled "
                        "copies. Keep such objects (connections, sockets) in the supervisor "
                        "in a pool created with client.pool(name, fun, transfer=\"proxy\"), "
                        "or in each process under a budget") from None
            if self.cache_blobs:
                entry.blob = blob
        return blob


def fingerprint(options: dict[str, Any]) -> Any:
    """Compare options across processes: functions by everything that shapes what they do
    (code, constants, names, defaults, closure values), the rest by value."""
    return sorted((k, _fp(v, 0)) for k, v in options.items())


def _fp(v: Any, depth: int) -> Any:
    if depth > 6:
        return "..."
    if isinstance(v, types.CodeType):
        # Not repr(): a nested code object's repr holds its address, which differs per process.
        return ("code", v.co_code, tuple(_fp(c, depth + 1) for c in v.co_consts), v.co_names)
    if isinstance(v, types.FunctionType):
        cells = []
        for cell in v.__closure__ or ():
            try:
                cells.append(_fp(cell.cell_contents, depth + 1))
            except ValueError:  # an empty cell
                cells.append("<empty>")
        return ("fn", v.__qualname__, _fp(v.__code__, depth + 1), _fp(v.__defaults__, depth + 1),
                _fp(v.__kwdefaults__, depth + 1), tuple(cells))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_fp(x, depth + 1) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((repr(k), _fp(x, depth + 1)) for k, x in v.items())))
    if callable(v) and not isinstance(v, type) and hasattr(v, "__dict__"):
        return ("obj", type(v).__qualname__, _fp(vars(v), depth + 1))
    if isinstance(v, type):
        return ("type", v.__module__, v.__qualname__)
    return repr(v)


def conflict(rec: Record, kind: str, transfer: str, fp: Any,
             options: dict[str, Any]) -> ValueError:
    """Why ``rec`` cannot be attached with these options: each option that differs, named
    (from the per-option fingerprints), with its value where it is plain data."""
    name = rec.name
    what = []
    if rec.kind != kind:
        what.append(f"it is a {'token pool' if rec.kind == 'token' else 'pool of objects'}, "
                    f"not a {'token pool' if kind == 'token' else 'pool of objects'}")
    if rec.transfer != transfer:
        what.append(f"transfer={rec.transfer!r}, not {transfer!r}")
    if rec.kind == kind:
        old, new = dict(rec.fingerprint or ()), dict(fp)
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) == new.get(key):
                continue
            a, b = rec.plain_options.get(key, _UNSET), options.get(key, _UNSET)
            if key not in old and _plain(b):
                what.append(f"{key}={b!r}, not set when it was created")
            elif key not in new or key not in old or a is _UNSET or not _plain(b):
                what.append(f"{key} differs")
            else:
                what.append(f"{key}={a!r}, not {b!r}")
    if rec.kind == "cluster":
        attach = f"attach with client.token_pool({name!r}, scope=\"cluster\")"
    elif rec.kind == "token":
        attach = f"attach with client.token_pool({name!r})"
    else:
        attach = f"attach with client.pool({name!r})"
    return ValueError(f"pool {name!r} exists with other options ({'; '.join(what)}): {attach} "
                      "(no options), or use another name")


_UNSET = object()


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, bytes))


class Registry:
    """Named pools by name and by id (the id is what the lease channel carries)."""

    def __init__(self, clock: Clock, sched: Scheduler) -> None:
        self.clock = clock
        self.sched = sched
        self.lock = threading.Lock()
        self.records: dict[str, Record] = {}
        self.by_id: dict[int, Record] = {}
        # The names of dropped pools, so that a client still using one hears it by name.
        self.dropped: dict[int, str] = {}
        self.next_id = 1
        # Called with the holder of a lease killed with kill_holder=True (the watchdog's).
        self.on_kill_holder: Callable[[Holder, float], None] | None = None
        # Makes the pool of a kind="cluster" record (set when the supervisor has a cluster).
        self.make_cluster: Callable[[str, dict[str, Any]], Any] | None = None

    def create(self, name: str, kind: str, transfer: str, blob: bytes | None) -> Record:
        """The pool ``name``, created from the dill-shipped options in ``blob`` unless it
        exists (then ``blob``, if given, must describe it: ValueError otherwise)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
        options: dict[str, Any] = dill.loads(blob) if blob else {}
        fp = fingerprint(options) if options else None
        with self.lock:
            found = self._existing(name, kind, transfer, fp, options)
        if found is not None:
            return found
        if not options:
            raise ValueError(f"no pool named {name!r}: give fun and options to create it")
        # Built outside the supervisor's lock: filling min_size runs fun (a slow database
        # would otherwise stall every other create, drop and host).
        pool: Any
        if kind == "cluster":
            if self.make_cluster is None:
                raise ValueError(f"pool {name!r}: scope=\"cluster\" needs a supervisor started "
                                 "with a cluster (Server(cluster=URL), mppool serve --cluster "
                                 "URL or MPPOOL_CLUSTER)")
            pool = self.make_cluster(name, options)
        executor = pool_executor(name)
        if kind != "cluster":
            pool = Pool._made_with(**options, name=name, scheduler=self.sched, clock=self.clock
                                    if self.clock is not REAL_CLOCK else None, runner=executor.run)
        pool.on_kill_holder = self.on_kill_holder
        with self.lock:
            try:
                found = self._existing(name, kind, transfer, fp, options)
            except ValueError as exc:
                found = None
                raced = True
                conflict = exc
            else:
                raced = found is not None
            if not raced:
                rec = Record(name, self.next_id, pool, transfer, kind, fp, options, executor)
                self.next_id += 1
                self.records[name] = rec
                self.by_id[rec.id] = rec
        if raced:  # another caller created it meanwhile: theirs stands, ours goes
            pool.shutdown()
            executor.close()
            if found is None:
                raise conflict
            return found
        log.info("mppool: created %s pool %r (transfer=%s, max_size=%s)", kind, name, transfer,
                 options.get("max_size"))
        return rec

    def _existing(self, name: str, kind: str, transfer: str, fp: Any,
                  options: dict[str, Any]) -> Record | None:
        """Under the lock: attach to ``name`` if it exists (ValueError if options differ)."""
        rec = self.records.get(name)
        if rec is None:
            return None
        if fp is not None and rec.kind == kind and kind in ("cluster", "token"):
            # A token pool is its size; its other options (lease limits) come from whoever
            # declared it (a config file), and attaching with its size is attaching.
            if rec.plain_options.get("max_size") != options.get("max_size"):
                raise conflict(rec, kind, transfer, fp, options)
            return rec
        if fp is not None and (rec.kind != kind or rec.transfer != transfer or rec.fingerprint != fp):
            raise conflict(rec, kind, transfer, fp, options)
        return rec

    def get_record(self, name: str) -> Record:
        rec = self.records.get(name)
        if rec is None:
            raise PoolClosed(f"pool {name!r} is shutting down or was never created")
        return rec

    def unknown(self, pool_id: int) -> PoolClosed:
        """The error for a request naming a pool id that is not served (any more)."""
        name = self.dropped.get(pool_id)
        if name is None:
            return PoolClosed(f"no pool with id {pool_id} (never created here: was the "
                              "supervisor restarted?)")
        return PoolClosed(f"pool {name!r} is shutting down or was dropped")

    def drop(self, name: str, delay: float = 0.0) -> None:
        rec = self.detach(name)
        if rec is not None:
            self.shut(rec, delay)

    def detach(self, name: str) -> Record | None:
        """Take ``name`` out of the registry (new gets and attaches fail); None if unknown."""
        with self.lock:
            rec = self.records.pop(name, None)
            if rec is not None:
                self.by_id.pop(rec.id, None)
                self.dropped[rec.id] = name
        return rec

    @staticmethod
    def shut(rec: Record, delay: float | None = 0.0) -> None:
        """Shut a detached pool down, leases given ``delay`` seconds to come back."""
        try:
            if rec.fast is not None:  # its fast path off: every get and put via the Pool
                rec.fast.pull_back(closed=True)
            rec.pool.shutdown(delay)
        finally:
            rec.close()

    def stats(self) -> dict[str, Any]:
        out = {}
        for name, rec in list(self.records.items()):
            s = rec.pool.stats()
            if rec.fast is not None:
                s = rec.fast.overlay(s)
            s.update(name=name, kind=rec.kind, transfer=rec.transfer)
            out[name] = s
        return out

    def close_all(self) -> None:
        """Shut every pool down (their closers run) on their own threads, all at once, for
        at most STOP_GRACE seconds: a closer that hangs must not keep the process alive."""
        with self.lock:
            records = list(self.records.values())
        futures = []
        for rec in records:
            fut = rec.submit(_shutdown_pool, rec)
            if fut is None:
                _shutdown_pool(rec)
            else:
                futures.append(fut)
        if futures:
            _, hung = wait_futures(futures, timeout=STOP_GRACE)
            if hung:
                log.warning("mppool: %d pool(s) still closing objects after %.0f s: leaving them",
                            len(hung), STOP_GRACE)
        for rec in records:
            rec.close()


def _shutdown_pool(rec: Record) -> None:
    try:
        if rec.fast is not None:
            rec.fast.pull_back(closed=True)
        rec.pool.shutdown()
    except Exception:
        log.warning("mppool: shutting down pool %r failed", rec.name, exc_info=True)
