"""``ClusterAgent``: a supervisor's side of Redis, for every cluster pool it serves.

    lease loop (never waits) ──acquire/forget──▶ ops queue ──▶ command thread ──▶ Redis
         ▲                                                     (one pipeline per batch)
         └── ClusterTokens.acquired/granted ◀── results ───────┘
                                             ◀── waker thread per pool: BLPOP wake:<run>
                                             ◀── renew thread: one RENEW per pool, every ttl/3

Three kinds of threads talk to Redis, each with its own connection and a deadline on every
call: the *command* thread runs the gets' and returns' scripts, batched (what queued during
one round trip goes in the next pipeline); a *waker* per pool blocks on this run's wake-up
list, where Redis pushes the tickets it grants to our waiters when units free up elsewhere;
the *renew* thread extends every lease and ticket of this host in one script per pool every
``lease_ttl / 3``, finds leases that lapsed (lost) and tickets granted whose wake-up went
astray. Redis load so grows with hosts, not with workers.

When Redis is unreachable the scripts fail within their deadline: gets get
``ServerUnavailable``, returns are retried at the next renewal (and lapse in Redis anyway),
and units already held stay usable. When Redis is back, so is service.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..errors import ServerUnavailable
from ..ratelog import RateLimitedLog
from .keys import check_host_id, check_prefix
from .link import connect, redact, run_scripts

if TYPE_CHECKING:
    from .tokens import ClusterTokens

log = logging.getLogger("mppool")

DEFAULT_LEASE_TTL = 10.0
MIN_LEASE_TTL = 0.3
WAKE_BLOCK = 1.0  # seconds a waker blocks in BLPOP before looking at its stop flag again
MAX_BATCH = 512
RETRY_BACKOFF = 0.2


def check_lease_ttl(ttl: Any) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or math.isnan(ttl) \
            or math.isinf(ttl) or ttl < MIN_LEASE_TTL:
        raise ValueError(f"cluster_lease_ttl must be a finite number of seconds >= "
                         f"{MIN_LEASE_TTL}, got {ttl!r}")
    return float(ttl)


def default_host_id() -> str:
    name = "".join(c if c.isalnum() or c in "_.:@-" else "-" for c in socket.gethostname())
    return (name or "host")[:128]


class _Op:
    __slots__ = ("kind", "members", "pool", "returning")

    def __init__(self, kind: str, pool: ClusterTokens, members: list[str],
                 returning: bool = False) -> None:
        self.kind = kind
        self.pool = pool
        self.members = members
        self.returning = returning


class ClusterAgent:
    """The Redis side of one supervisor (see the module docstring)."""

    def __init__(self, url: str, lease_ttl: float = DEFAULT_LEASE_TTL, host: str | None = None,
                 prefix: str = "mppool") -> None:
        self.ttl = check_lease_ttl(lease_ttl)
        self.ttl_ms = int(self.ttl * 1000)
        self.host = check_host_id(host if host is not None else default_host_id())
        self.prefix = check_prefix(prefix)
        self.display_url = str(redact(url))
        # Every call fails within this: well inside one renewal period.
        self.timeout = max(0.1, min(2.0, self.ttl / 4))
        self.client = connect(url, self.timeout)
        self.url = url
        self.run = f"{self.host}|{secrets.token_hex(6)}"
        self._seq = itertools.count(1)
        self.pools: dict[str, ClusterTokens] = {}
        self._ops: deque[_Op] = deque()
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self.healthy = True
        self._why = ""
        self._logs = RateLimitedLog(10.0)
        self._threads: list[threading.Thread] = []
        self._unforgotten: dict[str, set[str]] = {}  # pool name -> members to forget again
        self._ulock = threading.Lock()
        self.nrenewals = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for target, name in ((self._commands, "mppool-cluster-cmd"),
                             (self._renewals, "mppool-cluster-renew")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Give back what this host holds (best effort, within the call deadline)."""
        for pool in list(self.pools.values()):
            pool.shutdown()
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(self.timeout + WAKE_BLOCK + 1.0)
        try:
            self.client.close()
        except Exception:
            pass

    def new_member(self) -> str:
        return f"{self.run}|{next(self._seq)}"

    def why_down(self) -> str:
        return self._why

    def _args(self, pool: ClusterTokens) -> list[Any]:
        return [pool.keys.wake_prefix, pool.max_size, self.ttl_ms]

    # ------------------------------------------------------------------ pools

    def declare(self, pool: ClusterTokens) -> None:
        """Called on the control thread when a cluster pool is created here: the cluster's
        max_size must be ours (ValueError), and Redis must answer (ServerUnavailable)."""
        try:
            cap = run_scripts(self.client, [("declare", pool.keys.script_keys,
                                             self._args(pool))])[0]
        except Exception as exc:
            raise ServerUnavailable(f"pool {pool.name!r}: cannot reach the cluster's Redis at "
                                    f"{self.display_url}: {type(exc).__name__}: {exc}") from None
        if isinstance(cap, BaseException):
            raise ServerUnavailable(f"pool {pool.name!r}: Redis refused the script: {cap}")
        if int(cap) != pool.max_size:
            raise ValueError(f"cluster pool {pool.name!r} has max_size={int(cap)} in the "
                             f"cluster (Redis at {self.display_url}), not {pool.max_size}")

    def register(self, pool: ClusterTokens) -> bool:
        """Renew ``pool``'s leases and listen to its wake-up list from now on; False if
        another live pool of that name is registered (two creations raced: the registry
        keeps one and shuts the other down, which unregisters it; the one kept registers
        again at its first get)."""
        with self._ulock:
            cur = self.pools.get(pool.name)
            if cur is pool:
                return True
            if cur is not None and not cur.closed:
                return False
            self.pools[pool.name] = pool
        t = threading.Thread(target=self._waker, args=(pool,),
                             name=f"mppool-cluster-wake-{pool.name[:30]}", daemon=True)
        t.start()
        self._threads.append(t)
        return True

    def unregister(self, pool: ClusterTokens, members: list[str]) -> None:
        with self._ulock:
            if self.pools.get(pool.name) is pool:
                del self.pools[pool.name]
        if members:
            try:
                run_scripts(self.client, [("forget", pool.keys.script_keys,
                                           self._args(pool) + members)])
            except Exception as exc:
                log.warning("mppool: pool %r: could not give back %d cluster unit(s) at "
                            "shutdown (%s): they lapse within %g s", pool.name, len(members),
                            exc, self.ttl)

    # ------------------------------------------------------------ from the lease loop

    def acquire(self, pool: ClusterTokens, member: str, enqueue: bool) -> None:
        self._queue(_Op("acquire" if enqueue else "try", pool, [member]))

    def forget(self, pool: ClusterTokens, members: list[str], returning: bool = False) -> None:
        self._queue(_Op("forget", pool, members, returning))

    def _queue(self, op: _Op) -> None:
        with self._cond:
            self._ops.append(op)
            if len(self._ops) == 1:
                self._cond.notify()

    # ------------------------------------------------------------ the command thread

    def _commands(self) -> None:
        while not self._stopped.is_set():
            with self._cond:
                while not self._ops and not self._stopped.is_set():
                    self._cond.wait(1.0)
                batch = [self._ops.popleft() for _ in range(min(len(self._ops), MAX_BATCH))]
            if batch:
                try:
                    self._run_batch(batch)
                except Exception:  # this thread serves every cluster get: it must survive
                    self._logs.error("cmd", "mppool: cluster command thread error",
                                     exc_info=True)

    def _run_batch(self, batch: list[_Op]) -> None:
        calls = []
        for op in batch:
            args = self._args(op.pool)
            if op.kind == "forget":
                calls.append(("forget", op.pool.keys.script_keys, args + op.members))
            else:
                calls.append(("acquire", op.pool.keys.script_keys,
                              [*args, op.members[0], int(op.pool.kill_delay * 1000),
                               1 if op.kind == "acquire" else 0, self.ttl_ms]))
        try:
            results = run_scripts(self.client, calls)
        except Exception as exc:
            self._down(exc)
            results = [exc] * len(batch)
        else:
            self._up()
        for op, res in zip(batch, results, strict=True):
            try:  # one answer that cannot be handled must not strand the others
                if op.kind == "forget":
                    if isinstance(res, BaseException):
                        self._retry_later(op.pool, op.members)
                    else:
                        op.pool.forgotten(op.members, res[0], op.returning)
                        self._handed_on(op.pool, res[1])
                else:
                    op.pool.acquired(op.members[0], res)
            except Exception:
                self._logs.error("answer", "mppool: pool %r: a cluster answer could not be "
                                 "handled", op.pool.name, exc_info=True)

    def _handed_on(self, pool: ClusterTokens, granted: list[Any]) -> None:
        """A return here handed units on to tickets: ours are served now, without waiting
        for the wake-up list (which then tells what is already done: ignored)."""
        mine = self.run + "|"
        for m in granted:
            member = m.decode() if isinstance(m, bytes) else str(m)
            if member.startswith(mine):
                pool.granted(member)

    def _retry_later(self, pool: ClusterTokens, members: list[str]) -> None:
        """Forgets that failed go again with the next renewal (they lapse in Redis anyway)."""
        with self._ulock:
            self._unforgotten.setdefault(pool.name, set()).update(members)

    # ------------------------------------------------------------ the renew thread

    def _renewals(self) -> None:
        period = self.ttl / 3
        due = time.monotonic()
        while not self._stopped.wait(max(0.0, due - time.monotonic())):
            now = time.monotonic()
            if now < due:
                continue
            try:
                self.renew()
            except Exception:
                self._logs.error("renew", "mppool: cluster renewal failed", exc_info=True)
            due += period
            if due <= time.monotonic():  # fell behind (a frozen process): renew at once next
                due = time.monotonic() + period

    def renew(self) -> None:
        """One RENEW per pool (all in one pipeline), and the forgets that failed before."""
        pools = list(self.pools.values())
        if not pools:
            return
        calls: list[tuple[str, list[str], list[Any]]] = []
        forgets: list[tuple[int, ClusterTokens, list[str]]] = []
        plans = []
        for pool in pools:
            with self._ulock:
                retry = sorted(self._unforgotten.pop(pool.name, set()))
            if retry:
                forgets.append((len(calls), pool, retry))
                calls.append(("forget", pool.keys.script_keys, self._args(pool) + retry))
            leases, members, tickets = pool.renewal()
            plans.append((len(calls), pool, leases, members, tickets))
            calls.append(("renew", pool.keys.script_keys,
                          [*self._args(pool), self.ttl_ms, len(members), *members, *tickets]))
        try:
            results = run_scripts(self.client, calls)
        except Exception as exc:
            self._down(exc)
            for _, pool, retry in forgets:
                self._retry_later(pool, retry)
            for _, pool, *_ in plans:
                pool.unavailable(exc)
            return
        self._up()
        self.nrenewals += 1
        for i, pool, leases, members, tickets in plans:
            res = results[i]
            if isinstance(res, BaseException):
                self._logs.error("renew-script", "mppool: pool %r: renewal refused: %s",
                                 pool.name, res)
                continue
            try:
                pool.renewed(leases, members, tickets, res)
            except Exception:
                self._logs.error("renewed", "mppool: pool %r: a renewal's answer could not be "
                                 "handled", pool.name, exc_info=True)

    # ------------------------------------------------------------ the waker threads

    def _waker(self, pool: ClusterTokens) -> None:
        blocking = connect(self.url, self.timeout, read_timeout=WAKE_BLOCK + self.timeout + 1.0)
        key = pool.keys.wake(self.run)
        try:
            while not self._stopped.is_set() and self.pools.get(pool.name) is pool:
                try:
                    got = blocking.blpop([key], timeout=WAKE_BLOCK)
                except Exception as exc:
                    self._logs.warning("wake", "mppool: pool %r: cluster wake-up list: %s: %s",
                                       pool.name, type(exc).__name__, exc)
                    self._stopped.wait(RETRY_BACKOFF)
                    continue
                if got:
                    member = got[1].decode() if isinstance(got[1], bytes) else str(got[1])
                    try:
                        pool.granted(member)
                    except Exception:  # this thread must outlive any one grant
                        self._logs.error("granted", "mppool: pool %r: a cluster grant could "
                                         "not be handled", pool.name, exc_info=True)
        finally:
            try:
                blocking.close()
            except Exception:
                pass

    # ------------------------------------------------------------ health

    def _down(self, exc: BaseException) -> None:
        self._why = f"{type(exc).__name__}: {exc}"
        if self.healthy:
            log.warning("mppool: the cluster's Redis at %s is unreachable (%s): cluster gets "
                        "fail until it is back; host pools are not affected", self.display_url,
                        self._why)
        self.healthy = False

    def _up(self) -> None:
        if not self.healthy:
            log.warning("mppool: the cluster's Redis at %s answers again", self.display_url)
        self.healthy = True
        self._why = ""
