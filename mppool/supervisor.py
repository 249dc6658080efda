"""The supervisor process: named pools, the control plane, housekeeping and the watchdog.

It runs as ``python -m mppool.supervisor`` (started by ``Server.start()``, ``connect(autostart=
True)`` or ``mppool serve``). Two sockets:

- the ``SyncManager`` socket (the address users give): control plane, through multiprocess
  proxies with dill — creating pools (``fun`` and hooks travel here once), attaching, stats;
- the lease socket (``<address>.lease``): get/put on the hot path (``leases.LeaseLoop``).

The watchdog has two eyes: a lease connection closing (instant, free) and a periodic psutil
scan of connected holders (pid + start time) for a holder whose socket outlives it, e.g. an
fd inherited by a child process.

Threads, and whose code they run. User code (``fun``, hooks, proxied calls) may hang forever,
so it runs only on its own pool's ``HookExecutor`` (``Record.submit``, and the pool's runner
for housekeeping): at most a few threads per pool, and a pool whose hooks hang holds only
those. The threads that must always run never run user code: the lease loop, the housekeeping
scheduler (rounds only decide: lease kills, what to close, check or create), the watchdog
scan (a thread of its own) and the kill-holder timers (a scheduler of their own).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import dill
import psutil
from multiprocess import process as mp_process

from .address import Address, display, lease_address, parse_address, write_key
from .clock import REAL_CLOCK, Clock, clamp_wait
from .errors import PoolClosed
from .holder import Holder
from .leases import Conn, LeaseLoop
from .pool import Entry, Pool
from .ratelog import RateLimitedLog
from .remote import pack_errors
from .sched import HookExecutor, Scheduler

log = logging.getLogger("mppool")

TRANSFERS = ("copy", "proxy")
KILL_GRACE = 2.0
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

    def __init__(self, name: str, pid: int, pool: Pool, transfer: str, kind: str,
                 fingerprint: Any, options: dict[str, Any],
                 executor: HookExecutor | None = None) -> None:
        self.name = name
        self.id = pid
        self.pool = pool
        self.transfer = transfer
        self.kind = kind
        self.fingerprint = fingerprint
        # Slow returns run on a worker thread, never on the lease loop.
        self.slow_ret = bool(options.get("retter") or options.get("closer") or options.get("max_use")
                             or options.get("max_lifetime"))
        self.cache_blobs = options.get("getter") is None and options.get("retter") is None
        self.has_getter = options.get("getter") is not None
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
                blob = dill.dumps(entry.obj, recurse=True)  # unpickles with plain pickle + dill
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


class Supervisor:
    def __init__(self, address: Address, authkey: bytes, clock: Clock = REAL_CLOCK,
                 scan_interval: float = 0.2) -> None:
        self.address = address
        self.clock = clock
        # Housekeeping rounds of every pool: they only decide, user code goes to the pools'
        # executors. SIGKILL timers of kill_holder get a scheduler of their own all the same.
        self.sched = Scheduler(clock, workers=2, name="mppool-hk")
        self.kill_timers = Scheduler(clock, workers=1, name="mppool-kill")
        self.lock = threading.Lock()
        self.records: dict[str, Record] = {}
        self.by_id: dict[int, Record] = {}
        self.next_id = 1
        self.loop = LeaseLoop(self, lease_address(address), authkey)
        self.scan_interval = scan_interval
        self.nreclaimed = 0
        self.suspects: set[int] = set()
        self.hosted: dict[int, Any] = {}  # objects of client.host(), by id
        self.hosted_executor = ThreadPoolExecutor(8, thread_name_prefix="mppool-hosted")
        self.metrics: Any = None  # metrics.Metrics when serving Prometheus metrics
        self.next_hosted = 1
        self.stopped = threading.Event()
        self.nscans = 0
        self.watchdog = threading.Thread(target=self._watch, name="mppool-watchdog", daemon=True)
        self._scan_errors = RateLimitedLog(10.0)

    def start(self) -> None:
        self.loop.thread.start()
        self.watchdog.start()

    def _watch(self) -> None:
        """The watchdog's own thread: scan() every scan_interval until stopped.

        Not a task on the housekeeping scheduler: nothing a pool does can delay it.
        Deadline-based, so a slow scan does not shift the ones after it.
        """
        interval = self.scan_interval
        due = time.monotonic() + interval
        while not self.stopped.wait(clamp_wait(due - time.monotonic())):
            now = time.monotonic()
            if now < due:
                continue  # a clamped wait ended early
            try:
                self.scan()
            except Exception:
                self._scan_errors.error("scan", "mppool: watchdog scan failed", exc_info=True)
            due += interval
            if due <= time.monotonic():  # fell behind (a long scan, a frozen process)
                due = time.monotonic() + interval

    def stop(self) -> None:
        self.stopped.set()
        self.loop.stop()
        with self.lock:
            records = list(self.records.values())
        # Each pool is shut down (its closers run) on its own threads, all at once, for at
        # most STOP_GRACE seconds: a closer that hangs must not keep this process alive.
        futures = []
        for rec in records:
            fut = rec.submit(self._shutdown_pool, rec)
            if fut is None:
                self._shutdown_pool(rec)
            else:
                futures.append(fut)
        if futures:
            _, hung = wait_futures(futures, timeout=STOP_GRACE)
            if hung:
                log.warning("mppool: %d pool(s) still closing objects after %.0f s: leaving them",
                            len(hung), STOP_GRACE)
        for rec in records:
            rec.close()
        self.hosted_executor.shutdown(wait=False, cancel_futures=True)
        self.sched.close()
        self.kill_timers.close()
        if self.watchdog.is_alive() and self.watchdog is not threading.current_thread():
            self.watchdog.join(clamp_wait(max(1.0, 2 * self.scan_interval)))

    @staticmethod
    def _shutdown_pool(rec: Record) -> None:
        try:
            rec.pool.shutdown()
        except Exception:
            log.warning("mppool: shutting down pool %r failed", rec.name, exc_info=True)

    def submit_hosted(self, fn: Any, *args: Any) -> Future[Any] | None:
        try:
            return self.hosted_executor.submit(fn, *args)
        except RuntimeError:
            log.warning("mppool: cannot start a thread for a hosted call", exc_info=True)
            return None

    # ---------------------------------------------------------------------- registry

    def create(self, name: str, kind: str, transfer: str, blob: bytes | None) -> tuple[int, str, bool]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
        options: dict[str, Any] = dill.loads(blob) if blob else {}
        fp = fingerprint(options) if options else None
        with self.lock:
            found = self._existing(name, kind, transfer, fp)
        if found is not None:
            return found
        if not options:
            raise ValueError(f"no pool named {name!r}: give fun and options to create it")
        # Built outside the supervisor's lock: filling min_size runs fun (a slow database
        # would otherwise stall every other create, drop and host).
        executor = pool_executor(name)
        pool = Pool(**options, scheduler=self.sched, clock=self.clock
                    if self.clock is not REAL_CLOCK else None, runner=executor.run)
        pool.on_kill_holder = self.terminate_holder
        with self.lock:
            try:
                found = self._existing(name, kind, transfer, fp)
            except ValueError:
                found = None
                raced = True
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
            return found if found is not None else self._raise_conflict(name)
        log.info("mppool: created %s pool %r (transfer=%s, max_size=%s)", kind, name, transfer,
                 options.get("max_size"))
        return rec.id, rec.transfer, True

    def _existing(self, name: str, kind: str, transfer: str,
                  fp: Any) -> tuple[int, str, bool] | None:
        """Under the lock: attach to ``name`` if it exists (ValueError if options differ)."""
        rec = self.records.get(name)
        if rec is None:
            return None
        if fp is not None and (rec.kind != kind or rec.transfer != transfer or rec.fingerprint != fp):
            self._raise_conflict(name)
        return rec.id, rec.transfer, False

    @staticmethod
    def _raise_conflict(name: str) -> Any:
        raise ValueError(f"pool {name!r} exists with other options; attach with "
                         f"client.pool({name!r}) or use another name")

    def get_record(self, name: str) -> Record:
        rec = self.records.get(name)
        if rec is None:
            raise PoolClosed(f"pool {name!r} is shutting down or was never created")
        return rec

    def drop(self, name: str, delay: float = 0.0) -> None:
        with self.lock:
            rec = self.records.pop(name, None)
            if rec is not None:
                self.by_id.pop(rec.id, None)
        if rec is not None:
            try:
                rec.pool.shutdown(delay)
            finally:
                rec.close()

    # ---------------------------------------------------------------------- watchdog

    def release_conn(self, conn: Conn) -> None:
        """A client connection closed: drop its waiters, reclaim its leases."""
        for rec in list(self.records.values()):
            rec.pool.drop_waiters(lambda w: getattr(w, "conn", None) is conn)
            if rec.reset is None or rec.submit(self._reclaim, rec, conn.id) is None:
                self._reclaim(rec, conn.id)

    def _reclaim(self, rec: Record, cid: int) -> None:
        n = rec.pool.reclaim(lambda h: h.conn == cid, reset=rec.reset)
        if n:
            self.nreclaimed += n
            log.warning("mppool: pool %r: reclaimed %d lease(s) of connection %d whose holder "
                        "went away", rec.name, n, cid)

    def scan(self) -> None:
        """Close connections whose holder process is gone although its socket lives on.

        A holder found dead is closed at the next scan if its socket is still open, so a
        process whose EOF is already on its way is left to the (instant) close path.
        """
        try:
            suspects, self.suspects = self.suspects, set()
            for conn in list(self.loop.conns.values()):
                holder = conn.holder
                if holder is None or conn.closed or holder.alive():
                    continue
                if conn.id not in suspects:
                    self.suspects.add(conn.id)
                    continue
                log.warning("mppool: holder pid %d is gone but its connection is still open "
                            "(socket inherited by another process?): closing it", holder.pid)
                self.loop.call_soon(lambda conn=conn: self.loop.close(conn))  # type: ignore[misc]
        finally:
            self.nscans += 1  # driven by _watch(), on the watchdog's own thread

    def terminate_holder(self, holder: Holder, age: float) -> None:
        """kill_holder=True: SIGTERM the holder of a killed lease, SIGKILL after a grace.

        Only a holder whose pid the kernel vouched for (a unix-socket peer) is ever signalled:
        a TCP client's pid is only its claim, and could name any process.
        """
        if not holder.verified or holder.pid == os.getpid():
            log.warning("mppool: not terminating pid %s (held a lease for %.1f s): its pid is "
                        "only claimed by a TCP client", holder.pid, age)
            return
        try:
            proc = psutil.Process(holder.pid)
            if not holder.is_process(proc):
                return  # the pid was reused: not our holder
            log.warning("mppool: terminating pid %d, which held a lease for %.1f s", holder.pid, age)
            proc.terminate()
        except psutil.Error:
            return

        def finish() -> None:
            try:
                if proc.is_running() and holder.is_process(proc):
                    log.warning("mppool: pid %d ignored SIGTERM for %.1f s: SIGKILL", holder.pid,
                                KILL_GRACE)
                    proc.kill()
            except psutil.Error:
                pass
        self.kill_timers.enter(KILL_GRACE, finish)

    # ---------------------------------------------------------------------- tpool

    def execute(self, blob: bytes) -> Any:
        """Run a dill-shipped call on the worker threads; its exception propagates."""
        fn, args, kwargs = dill.loads(blob)
        return self.hosted_executor.submit(fn, *args, **kwargs).result()

    def host(self, blob: bytes) -> int:
        obj = dill.loads(blob)
        with self.lock:
            hid = self.next_hosted
            self.next_hosted += 1
            self.hosted[hid] = obj
        return hid

    def unhost(self, hid: int) -> None:
        with self.lock:
            self.hosted.pop(hid, None)

    def set_num_threads(self, n: int) -> None:
        # ThreadPoolExecutor grows up to _max_workers on demand; idle extra threads stay
        # parked if it shrinks, which is harmless.
        self.hosted_executor._max_workers = n

    def killall(self) -> None:
        with self.lock:
            self.hosted.clear()

    # ---------------------------------------------------------------------- control plane

    def stats(self) -> dict[str, Any]:
        out = {}
        for name, rec in list(self.records.items()):
            s = rec.pool.stats()
            s.update(name=name, kind=rec.kind, transfer=rec.transfer)
            out[name] = s
        return out

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "lease_address": self.loop.address,
                "address": display(self.address), "connections": len(self.loop.conns),
                "nreclaimed": self.nreclaimed, "nscans": self.nscans}


class Control:
    """What clients call through the SyncManager (one instance, shared by all proxies)."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    @pack_errors
    def info(self) -> dict[str, Any]:
        return self._sup.info()

    @pack_errors
    def create(self, name: str, kind: str, transfer: str,
               blob: bytes | None) -> tuple[int, str, float | None]:
        """(pool id, transfer, the pool's default timeout) of a pool created or attached."""
        pool_id, transfer, _ = self._sup.create(name, kind, transfer, blob)
        return pool_id, transfer, self._sup.by_id[pool_id].pool.timeout

    @pack_errors
    def stats(self, name: str | None = None) -> dict[str, Any]:
        if name is None:
            return self._sup.stats()
        rec = self._sup.get_record(name)
        s = rec.pool.stats()
        s.update(name=name, kind=rec.kind, transfer=rec.transfer)
        return s

    @pack_errors
    def pool_call(self, name: str, method: str, *args: Any) -> Any:
        if method not in ("free", "waiting", "resize", "shutdown", "clear", "__len__", "__repr__"):
            raise ValueError(f"method must be a pool method, got {method!r}")
        if method == "shutdown":
            self._sup.drop(name, *args)
            return None
        return getattr(self._sup.get_record(name).pool, method)(*args)

    @pack_errors
    def names(self) -> list[str]:
        return list(self._sup.records)

    @pack_errors
    def execute(self, blob: bytes) -> Any:
        return self._sup.execute(blob)

    @pack_errors
    def host(self, blob: bytes) -> int:
        return self._sup.host(blob)

    @pack_errors
    def unhost(self, hid: int) -> None:
        self._sup.unhost(hid)

    @pack_errors
    def set_num_threads(self, n: int) -> None:
        from .validate import check_int
        self._sup.set_num_threads(check_int("n", n, minimum=1))

    @pack_errors
    def killall(self) -> None:
        self._sup.killall()


# ------------------------------------------------------------------------ process entry point

_control: Control | None = None


def get_control() -> Control:
    if _control is None:
        raise PoolClosed("supervisor is shutting down")
    return _control


def serve(address: Address, authkey: bytes, *, parent: int | None = None,
          pools: dict[str, dict[str, Any]] | None = None, ready: Any = None,
          metrics_port: int | None = None) -> None:
    """Run a supervisor in this process until SIGTERM/SIGINT, shutdown() or the parent dies."""
    global _control
    from .acceptor import ControlAcceptor, serve_authenticated
    from .address import check_address_dir
    from .server import Server

    logging.basicConfig(level=os.environ.get("MPPOOL_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s mppool[%(process)d] %(levelname)s %(message)s")
    raise_nofile_limit()
    try:
        check_address_dir(address)
    except FileNotFoundError as exc:
        raise FileNotFoundError(exc.errno, f"cannot serve on {display(address)}: directory "
                                f"{exc.filename!r} does not exist", exc.filename) from None
    old = os.umask(0o177)  # sockets are created 0777 & ~umask: 0600
    try:
        manager = Server(address, authkey)
        server = manager.get_server()
    finally:
        os.umask(old)
    if isinstance(address, tuple):
        address = tuple(server.address)
    sup = Supervisor(address, authkey)
    if metrics_port is not None:
        from .metrics import Metrics

        sup.metrics = Metrics(sup)
        sup.metrics.serve(metrics_port)
        log.info("mppool: Prometheus metrics on http://127.0.0.1:%d/metrics", metrics_port)
    _control = Control(sup)
    sup.start()
    try:
        for name, opts in (pools or {}).items():
            transfer = opts.pop("transfer", "copy")
            kind = "token" if opts.pop("kind", "pool") == "token" else "pool"
            sup.create(name, kind, transfer, dill.dumps(opts))
    except BaseException:
        # Nothing half-started is left behind: threads stopped, sockets closed and removed.
        _control = None
        sup.stop()
        server.listener.close()
        if isinstance(address, str):
            try:
                os.unlink(sup.loop.address)  # type: ignore[arg-type]
            except OSError:
                pass
        raise
    keyfile = write_key(address, authkey)
    # Our own serve loop instead of Server.serve_forever(): that one creates its stop event
    # only once running (a signal before would be lost) and ends with sys.exit().
    stop = threading.Event()
    server.stop_event = stop  # the manager's remote shutdown() sets it
    mp_process.current_process()._manager_server = server

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if parent:
        def watch_parent() -> None:
            # getppid() needs no descriptor (psutil would open /proc files, which fails when
            # descriptors run out); and the loop survives any exception anyway: a dead
            # watcher would leave an orphan supervisor running forever.
            logs = RateLimitedLog()
            while not stop.wait(0.2):
                try:
                    if os.getppid() != parent:
                        log.warning("mppool: parent %d is gone: stopping", parent)
                        stop.set()
                except Exception as exc:
                    logs.warning("parent", "mppool: watching parent %d: %s: %s", parent,
                                 type(exc).__name__, exc)
        threading.Thread(target=watch_parent, name="mppool-parent", daemon=True).start()

    # Not Server.accepter nor Listener.accept(): those authenticate on the accepting thread
    # without a deadline, so one silent peer would stop the control plane for everyone.
    acceptor = ControlAcceptor(server.listener, authkey,
                               lambda conn: serve_authenticated(server, conn), stop)
    acceptor.start()
    if ready is not None:
        ready(display(address), sup.loop.address)
    log.info("mppool: supervisor %d serving on %s", os.getpid(), display(address))
    try:
        while not stop.wait(1.0):
            pass
    finally:
        _control = None
        sup.stop()
        server.listener.close()  # removes the control socket
        for path in ([sup.loop.address] if isinstance(address, str) else []) + [str(keyfile)]:
            try:
                os.unlink(path)  # type: ignore[arg-type]
            except (OSError, TypeError):
                pass
        log.info("mppool: supervisor %d stopped", os.getpid())


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a supervisor holds two sockets per
    client; the usual soft default of 1024 is far too low); returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        try:  # Linux refuses more than fs.nr_open
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("mppool: cannot raise the file descriptor limit from %d to %d: %s",
                        soft, target, exc)
    log.info("mppool: file descriptor limit %d (hard %d)", soft, hard)
    return soft


def main(argv: list[str] | None = None) -> None:
    """Entry point of the supervisor process (``Server.start()``).

    Protocol with the starter, on stdout: one line, ``READY <address> <pid>`` once serving,
    or ``ERROR <why>`` if it cannot start. Then stdout is pointed at /dev/null: the starter
    may be long gone, and its pipe must close when it exits (a detached supervisor keeps
    none of the caller's descriptors; its stderr is its log file).
    """
    ap = argparse.ArgumentParser(prog="python -m mppool.supervisor")
    ap.add_argument("--address", required=True)
    ap.add_argument("--parent", type=int, default=0)
    ns = ap.parse_args(argv)
    key = os.environ.pop("MPPOOL_AUTHKEY", "")
    extra = json.loads(os.environ.pop("MPPOOL_SYS_PATH", "[]"))
    sys.path[:0] = [p for p in extra if p not in sys.path]
    said = False

    def say(line: str) -> None:
        nonlocal said
        if said:
            return
        said = True
        try:
            sys.stdout.write(line.replace("\n", " ") + "\n")
            sys.stdout.flush()
        except OSError:
            pass  # the starter gave up waiting: nobody to tell
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # closes the pipe: the starter sees EOF
        os.close(devnull)

    def ready(addr: str, lease: Any) -> None:
        say(f"READY {addr} {os.getpid()}")

    try:
        address = parse_address(ns.address)
        serve(address, bytes.fromhex(key), parent=ns.parent or None, ready=ready)
    except BaseException as exc:
        if not said:
            log.error("mppool: supervisor for %s could not start", ns.address, exc_info=True)
            say(f"ERROR {type(exc).__name__}: {exc}")
            raise SystemExit(1) from None
        raise


if __name__ == "__main__":

    main()
