"""``ClusterTokens``: a cluster token pool as one supervisor serves it.

The lease loop treats it like any pool of its registry (``acquire``, ``checkin``,
``reclaim``, ``cancel``, ``stats``...), so workers, the watchdog and ``mppool top`` need
nothing new. But a unit is granted by Redis, not here: every get becomes a ticket that the
supervisor's `ClusterAgent` sends to Redis on its own thread, and the answer (granted now,
queued, or granted later through the wake-up list or a renewal) comes back as a call on this
object, which hands the unit to the waiting client. Nothing here ever blocks on Redis.

What a unit is, locally: an ``Entry`` whose object is a numbered `mppool.pools.Token`, lent
under a random lease id (what the client returns) and tied to its Redis member. A lease
that Redis no longer has when it is renewed or returned is *lost* (the supervisor was frozen
past its lease, or a failover dropped it): it is counted in ``lost_leases``, logged, and its
holder's later return is ignored.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Any

from ..errors import PoolClosed, ServerUnavailable, TimeOut
from ..holder import Holder
from ..pool import Entry
from ..pools import Token
from ..ratelog import RateLimitedLog
from ..sched import Scheduler, Task
from .keys import PoolKeys, host_counts

if TYPE_CHECKING:
    from .agent import ClusterAgent

log = logging.getLogger("mppool")

MAX_LOST_REMEMBERED = 10000  # lost lease ids kept so that their late return is ignored quietly

# Lease ids are random, as in every pool: a client cannot guess another's.
_lease_rng = random.Random(os.urandom(16))


class ClusterTokens:
    """One cluster token pool in one supervisor (see the module docstring)."""

    def __init__(self, name: str, max_size: int, agent: ClusterAgent, sched: Scheduler,
                 waiter_class: Callable[..., Any], *, kill_delay: float = 0.0,
                 kill_holder: bool = False) -> None:
        self.name = name
        self.max_size = max_size
        self.agent = agent
        self.keys = PoolKeys.of(agent.prefix, name)
        self.sched = sched
        self.waiter_class = waiter_class
        self.kill_delay = kill_delay
        self.kill_holder = kill_holder
        self.on_kill_holder: Callable[[Holder, float], None] | None = None
        self._lock = threading.Lock()
        self._tickets: dict[str, Any] = {}  # member -> local waiter, oldest first
        self._member_of: dict[Any, str] = {}  # waiter -> member
        self._inflight: set[str] = set()  # acquires sent to Redis, not answered yet
        self._try_only: set[str] = set()  # gets with timeout=0: Redis's first answer decides
        # Woken (granted) while their acquire was still in flight: granted when it answers.
        self._early: set[str] = set()
        self._using: dict[int, Entry] = {}
        self._member: dict[int, str] = {}  # lease id -> member
        self._kills: dict[int, Task] = {}
        self._lost: OrderedDict[int, None] = OrderedDict()
        self._numbers = itertools.count(1)
        self._shutdown = False
        self._registered = False
        self._counts = {"nborrows": 0, "nreturns": 0, "nkilled": 0, "lost_leases": 0,
                        "nunavailable": 0, "ntimeouts": 0}
        # The cluster as the last renewal saw it.
        self.snapshot: dict[str, Any] = {"held": None, "hosts": {}, "queue": 0, "lapsed": 0,
                                         "at": None}
        self._logs = RateLimitedLog(5.0)

    # ------------------------------------------------------------ what the lease loop calls

    @property
    def timeout(self) -> float | None:
        return None

    def _acquire(self, holder: Holder, waiter: Callable[..., Any] | None = None,
                 args: tuple[Any, ...] = ()) -> Any:
        """Every get queues a waiter; its ticket goes to Redis on the agent's thread."""
        if self._shutdown:
            raise PoolClosed(f"pool {self.name!r} is shutting down")
        w = (waiter or self.waiter_class)(holder, *args)
        if getattr(w, "since", 0.0) is None:
            w.since = time.monotonic()
        if not self._registered:
            try:
                self.register()
            except Exception as exc:  # no thread for its wake-up list: say so to this get
                w.set(ServerUnavailable(f"pool {self.name!r}: cannot listen to the cluster: "
                                        f"{type(exc).__name__}: {exc}"))
                return w
        member = self.agent.new_member()
        with self._lock:
            self._tickets[member] = w
            self._member_of[w] = member
            self._inflight.add(member)
            if waiter is None:
                self._try_only.add(member)
        self.agent.acquire(self, member, enqueue=waiter is not None)
        return w

    @property
    def closed(self) -> bool:
        return self._shutdown

    def register(self) -> None:
        """Have the agent renew this pool and listen for its grants (see agent.register)."""
        self._registered = self.agent.register(self)

    def _cancel(self, waiter: Any) -> bool:
        """The get's deadline passed. True: withdrawn (the loop answers TimeOut). False: it
        was answered (served, or told here that Redis did not answer in time)."""
        with self._lock:
            member = self._member_of.get(waiter)
            if member is None or waiter.done:
                return False
            if member in self._try_only and member in self._inflight:
                return False  # timeout=0: Redis's answer, whatever it is, is the answer
            unanswered = member in self._inflight or not self.agent.healthy
            self._forget_waiter(member)
            if unanswered:
                self._counts["nunavailable"] += 1
                waiter.set(ServerUnavailable(
                    f"pool {self.name!r}: the cluster's Redis did not answer in time "
                    f"({self.agent.why_down() or 'no reply'})"))
                withdrawn = False
            else:
                self._counts["ntimeouts"] += 1
                withdrawn = waiter.cancel()
        self.agent.forget(self, [member])
        return withdrawn

    def _drop_waiters(self, pred: Callable[[Any], bool]) -> int:
        with self._lock:
            gone = [(m, w) for m, w in self._tickets.items() if pred(w) and w.cancel()]
            for m, _ in gone:
                self._forget_waiter(m)
        if gone:
            self.agent.forget(self, [m for m, _ in gone])
        return len(gone)

    def _hand_out(self, entry: Entry) -> Entry:
        return entry

    def _release_slot(self) -> None:  # never handed CREATE: nothing to release
        pass

    def _lent(self, lease: int, holder: Holder | None = None) -> Entry | None:
        with self._lock:
            entry = self._using.get(lease)
            if entry is None or (holder is not None and entry.holder != holder):
                return None
            return entry

    def _checkin(self, lease: int, discard: bool = False, holder: Holder | None = None) -> bool:
        with self._lock:
            entry = self._using.get(lease)
            if entry is None:
                # A lost lease (already counted and logged) is ignored: True, quietly.
                return self._lost.pop(lease, 1) is None
            if holder is not None and entry.holder != holder:
                return False
            member = self._take(lease)
            self._counts["nreturns"] += 1
        self.agent.forget(self, [member], returning=True)
        return True

    def _reclaim(self, pred: Callable[[Holder], bool], reset: Any = None,
                 spare: Container[int] = ()) -> int:
        # ``spare``: the core Pool's signature; a token has no proxied calls to wait for.
        with self._lock:
            leases = [k for k, e in self._using.items() if e.holder is not None and pred(e.holder)]
            members = [self._take(k) for k in leases]
        if members:
            self.agent.forget(self, members)
        return len(members)

    def waiting(self) -> int:
        """Gets waiting here, or in the whole cluster as last seen, whichever is more: a
        budget's idle holders give back their units when anyone waits, on any host."""
        with self._lock:
            local = sum(1 for w in self._tickets.values() if not w.done)
        return max(local, int(self.snapshot.get("queue") or 0))

    def free(self) -> int:
        held = self.snapshot.get("held")
        return max(0, self.max_size - (held if held is not None else len(self._using)))

    def __len__(self) -> int:
        return len(self._using)

    def __repr__(self) -> str:
        return (f"<mppool cluster token pool {self.name!r} [here: {len(self._using)} held, "
                f"{len(self._tickets)} waiting | max_size: {self.max_size}]>")

    def resize(self, max_size: int) -> None:
        raise ValueError(f"pool {self.name!r} is a cluster pool: its max_size is shared by "
                         "every host and cannot be changed from one")

    def pause(self) -> bool:
        raise ValueError(f"pool {self.name!r} is a cluster pool: pause it on no host")

    resume = pause
    drain = pause

    def clear(self) -> int:
        return 0

    def shutdown(self, delay: float | None = 0.0) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            members = list(self._tickets)
            for m in members:
                w = self._tickets[m]
                self._forget_waiter(m)
                w.set(PoolClosed(f"pool {self.name!r} is shutting down"))
            members += [self._take(k) for k in list(self._using)]
        self.agent.unregister(self, members)

    # ------------------------------------------------- what the agent calls (its threads)

    def acquired(self, member: str, result: Any) -> None:
        """Redis answered the acquire of ``member`` (or the call failed: an exception)."""
        with self._lock:
            self._inflight.discard(member)
            try_only = member in self._try_only
            self._try_only.discard(member)
            w = self._tickets.get(member)
            if w is None:
                return  # withdrawn meanwhile: its forget follows in the same order
            if isinstance(result, BaseException):
                self._forget_waiter(member)
                self._counts["nunavailable"] += 1
                w.set(ServerUnavailable(f"pool {self.name!r}: the cluster's Redis is "
                                        f"unreachable ({type(result).__name__}: {result})"))
                forget = True
            else:
                code = int(result[0])
                forget = False
                if code == 1:
                    forget = not self._grant(member, w)
                elif code == 0 and not try_only:
                    if member not in self._early:
                        return  # queued: the wake-up list or a renewal will tell
                    forget = not self._grant(member, w)  # and the wake-up came first
                else:
                    self._forget_waiter(member)
                    if code == -1:
                        w.set(ValueError(f"pool {self.name!r}: the cluster has max_size="
                                         f"{int(result[1])}, not {self.max_size}"))
                    else:
                        self._counts["ntimeouts"] += 1
                        w.set(TimeOut(f"pool {self.name!r}: no unit available in the cluster "
                                      "(timeout=0)"))
                    forget = code != -1
        if forget:
            self.agent.forget(self, [member])

    def granted(self, member: str) -> None:
        """Redis granted ``member``'s ticket (its wake-up list, or a renewal saw it)."""
        with self._lock:
            w = self._tickets.get(member)
            if w is None:
                return  # not waiting here (any more)
            if member in self._inflight:
                self._early.add(member)  # its acquire's answer, still to come, acts on it
                return
            ok = self._grant(member, w)
        if not ok:
            self.agent.forget(self, [member])

    def renewal(self) -> tuple[list[int], list[str], list[str]]:
        """What the next renewal covers: (lease ids, their members, queued tickets)."""
        with self._lock:
            leases = list(self._member)
            return (leases, [self._member[k] for k in leases],
                    [m for m in self._tickets if m not in self._inflight])

    def renewed(self, leases: list[int], members: list[str], tickets: list[str],
                result: list[Any]) -> None:
        lease_status, ticket_status = _text(result[0]), _text(result[1])
        lost = []
        granted, again = [], []
        with self._lock:
            for lease, member, ok in zip(leases, members, lease_status, strict=False):
                if ok == "0" and self._member.get(lease) == member:
                    lost.append((self._using[lease].holder, member))
                    self._take(lease)
                    self._remember_lost(lease)
            for member, st in zip(tickets, ticket_status, strict=False):
                if member not in self._tickets or member in self._inflight:
                    continue
                if st == "L":
                    granted.append(member)
                elif st == "X":  # its liveness lapsed (a frozen supervisor): queue it again
                    self._inflight.add(member)
                    again.append(member)
            self._counts["lost_leases"] += len(lost)
            all_members = [_text(m) for m in result[3]]
            self.snapshot = {"held": len(all_members), "hosts": host_counts(all_members),
                             "queue": int(result[2]), "lapsed": int(result[5]),
                             "at": time.monotonic()}
        for holder, member in lost:
            pid = holder.pid if holder is not None else "?"
            log.warning("mppool: pool %r: lost the cluster lease of pid %s (%s): it lapsed in "
                        "Redis before it was renewed (this supervisor was frozen, or Redis "
                        "failed over); its return will be ignored", self.name, pid, member)
        for member in granted:
            self.granted(member)
        for member in again:
            self.agent.acquire(self, member, enqueue=True)

    def forgotten(self, members: list[str], held: list[Any], returning: bool) -> None:
        """Redis forgot ``members``; a returned lease it no longer had was lost."""
        if not returning:
            return
        nlost = sum(1 for h in held if int(h) == 0)
        if nlost:
            with self._lock:
                self._counts["lost_leases"] += nlost
            self._logs.warning("lost", "mppool: pool %r: %d returned cluster lease(s) had "
                               "already lapsed in Redis (this supervisor was frozen past its "
                               "lease, or Redis failed over)", self.name, nlost)

    def unavailable(self, exc: BaseException) -> None:
        """A renewal failed: Redis is unreachable. Waiting gets fail now (their tickets are
        withdrawn once Redis is back); units held stay usable."""
        with self._lock:
            gone = list(self._tickets.items())
            for m, _ in gone:
                self._forget_waiter(m)
            self._counts["nunavailable"] += len(gone)
        for _, w in gone:
            w.set(ServerUnavailable(f"pool {self.name!r}: the cluster's Redis is unreachable "
                                    f"({type(exc).__name__}: {exc})"))
        if gone:
            self.agent.forget(self, [m for m, _ in gone])

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            using = [_describe(e, now) for e in self._using.values()]
            waiters = [{"pid": getattr(w.holder, "pid", None),
                        "waited": max(0.0, now - (w.since or now))}
                       for w in self._tickets.values() if not w.done]
            counts = dict(self._counts)
            snap = dict(self.snapshot)
        at = snap.pop("at")
        cluster = {**snap, "host": self.agent.host, "url": self.agent.display_url,
                   "lease_ttl": self.agent.ttl, "redis_ok": self.agent.healthy,
                   "seen_ago": None if at is None else now - at,
                   "max_using_delay_kill": self.kill_delay or None}
        return {"max_size": self.max_size, "min_size": 0, "scope": "cluster",
                "nusing": len(using), "navail": 0, "nobjs": len(using), "ntodel": 0,
                "nwaiting": len(waiters), "waiters": waiters, "using": using, "avail": [],
                "ncreating": 0, "ncreated": counts["nborrows"], "ndestroys": 0,
                "shutdown": self._shutdown, "paused": False, "timeout": None,
                "max_using_delay_kill": self.kill_delay or None, "cluster": cluster, **counts}

    # ------------------------------------------------------------------ under the lock

    def _grant(self, member: str, w: Any) -> bool:
        """Hand ``member``'s unit to waiter ``w``; False if it cannot take it any more."""
        entry = Entry(Token(next(self._numbers)), 0, time.monotonic(), 0.0, None)
        lease = _lease_rng.getrandbits(63) or 1
        while lease in self._using or lease in self._lost:
            lease = _lease_rng.getrandbits(63) or 1
        entry.lease = lease
        entry.holder = w.holder
        entry.uses = 1
        self._using[lease] = entry
        self._member[lease] = member
        self._forget_waiter(member)
        if not w.set(entry):
            del self._using[lease]
            del self._member[lease]
            return False
        self._counts["nborrows"] += 1
        if self.kill_delay:
            self._kills[lease] = self.sched.enter(self.kill_delay, lambda: self._kill(lease))
        return True

    def _take(self, lease: int) -> str:
        entry = self._using.pop(lease)
        entry.holder = None
        task = self._kills.pop(lease, None)
        if task is not None:
            task.cancel()
        return self._member.pop(lease)

    def _forget_waiter(self, member: str) -> None:
        w = self._tickets.pop(member, None)
        if w is not None:
            self._member_of.pop(w, None)
        self._try_only.discard(member)
        self._early.discard(member)

    def _remember_lost(self, lease: int) -> None:
        self._lost[lease] = None
        while len(self._lost) > MAX_LOST_REMEMBERED:
            self._lost.popitem(last=False)

    def _kill(self, lease: int) -> None:
        """max_using_delay_kill: the lease is taken back (Redis frees it at the same deadline
        even if this supervisor is wedged)."""
        with self._lock:
            entry = self._using.get(lease)
            if entry is None:
                return
            holder = entry.holder
            self._kills.pop(lease, None)
            member = self._take(lease)
            self._counts["nkilled"] += 1
        age = time.monotonic() - entry.last_get
        log.warning("mppool: pool %r: killed the cluster lease of pid %s held for %.1f s "
                    "(max_using_delay_kill=%g)", self.name, holder.pid if holder else "?", age,
                    self.kill_delay)
        self.agent.forget(self, [member])
        if self.kill_holder and holder is not None and self.on_kill_holder is not None:
            self.on_kill_holder(holder, age)


def _describe(entry: Entry, now: float) -> dict[str, Any]:
    data: dict[str, Any] = {"trace": repr(entry.obj), "uses": entry.uses,
                            "last_get": entry.last_get - now, "last_ret": entry.last_ret - now}
    if entry.holder is not None:
        data.update(lease=entry.lease, pid=entry.holder.pid, holder=entry.holder.as_dict())
    return data


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
