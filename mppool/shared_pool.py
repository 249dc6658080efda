"""A pool served by the supervisor, lent in this process: `SharedPool` (a worker process).

    SharedPool.get ── Channel.request(get) ──▶ supervisor lease loop ──▶ Granted(lease, blob)
         │                                                               │
         ◀── the object (unpickled blob, or an ObjectProxy) ─────────────┘
         held: client._held[name] maps obj -> (lease, channel, pool id)
    SharedPool.ret ── Channel.post(put) ───▶ (no answer: the next control call syncs)

The hot path is `SharedPool.get` with no deadline on a live channel, then `ret`: one frame
each way on the client's lease channel, no control-plane call. The rest (``stats``,
``resize``, ``wait``...) are control-plane calls through the client (`mppool.client`).

The `mppool.client.Client` that made a pool is its way to the supervisor: its lease channel
(`Client._channel`), its control plane (`Client._call`) and the leases this process holds.
This module never imports `mppool.client` at run time (the client makes these pools); how
a pool pickles is the client's to say (`Client._pool_reducer`), since unpickling attaches a
client first.

After a supervisor restart, `SharedPool._mp_route` creates the pool again on the new run
from the options it was created with (`PoolWhere`, shared with the asyncio pools).
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import protocol as P
from .address import display
from .channel import Channel
from .errors import ServerUnavailable, TimeOut
from .lender import Lender
from .proxy import ObjectProxy
from .validate import check_delay

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("mppool")

# A get(timeout=t) waits for the supervisor's answer up to t plus this: past it, the
# supervisor is taken to be frozen and the get raises TimeOut.
GRACE = 1.0


def check_timeout_arg(timeout: Any) -> float | None:
    """A get timeout: None or inf wait forever; NaN, negatives and non-numbers are refused."""
    if timeout is None:
        return None
    t = check_delay("timeout", timeout)
    return None if math.isinf(t) else t



class PoolWhere:
    """Where a shared pool is (its id on one run of the supervisor) and how to create it
    again after a restart: the part the sync and the async shared pools share."""

    _blob: bytes | None = None  # the dill-shipped options; None: attached by name only

    def _learn(self, instance: int, pool_id: int, timeout: float | None, kind: str,
               blob: bytes | None) -> None:
        self._instance = instance
        self._id = pool_id
        self._timeout = timeout
        self._kind = kind
        if blob is not None:
            self._blob = blob


class SharedPool(Lender, PoolWhere):
    """A pool served by the supervisor, with the API of ``mppool.Pool``.

    It pickles as (address, key, name) and reconnects wherever it is unpickled.
    """

    def __init__(self, client: Client, name: str, where: tuple[int, int], transfer: str,
                 timeout: float | None, kind: str, blob: bytes | None) -> None:
        self._client = client
        self.name = name
        self.transfer = transfer
        self._lock = threading.Lock()
        self._late: tuple[Channel, int, Callable[[Any], None]] | None = None
        self._learn(*where, timeout, kind, blob)


    def _mp_route(self) -> tuple[Channel, int]:
        """The channel to use and this pool's id on the supervisor it reaches: after a
        restart, the pool is created again there from the options it was created with."""
        chan = self._client._chan
        if chan is not None and chan.instance == self._instance and not chan._broken:
            return chan, self._id  # the common case, checked inline
        for _ in range(3):
            chan = self._client._channel()
            if chan.instance == self._instance:
                return chan, self._id
            pool_id, _, timeout, instance = self._client._call(
                "create", self.name, self._kind, self.transfer, self._blob)
            self._learn(instance, pool_id, timeout, self._kind, None)
            if instance != chan.instance:
                # The control plane reached a newer run than our channel: that channel's
                # supervisor is gone. Open a new one and look again.
                chan.close()
        raise ServerUnavailable(f"pool {self.name!r}: the supervisor at "
                                f"{display(self._client.address)} keeps restarting")

    def _late_handler(self, chan: Channel, pool_id: int) -> Callable[[Any], None]:
        """What a grant that arrives after its get gave up does: go back at once (one per
        route, made once)."""
        late = self._late
        if late is None or late[0] is not chan or late[1] != pool_id:
            late = self._late = (chan, pool_id, functools.partial(_give_back, chan, pool_id))
        return late[2]

    def get(self, timeout: float | None = None) -> Any:
        """Get an object (a copy, or a proxy for ``transfer="proxy"``); ``timeout=None``
        uses the pool's, 0 means do not wait, ``math.inf`` waits forever."""
        if timeout is None and self._timeout is None:
            # The common case, inline: no deadline, and the channel reaches the supervisor
            # run this pool's id belongs to. Anything else takes the general path below.
            fast = self._client._chan
            if fast is not None and fast.instance == self._instance and not fast._broken:
                rid = fast.next_rid()
                try:
                    reply = fast.request(rid, P.encode_get(rid, self._id, None))
                except ServerUnavailable:
                    pass  # the channel died: the general path reconnects and tries again
                else:
                    return self._received(reply, fast, self._id)
        t = check_timeout_arg(timeout)
        wait = t if timeout is not None else self._timeout
        deadline = None if wait is None else time.monotonic() + wait + GRACE
        # None: the pool's own timeout (-1 on the wire); inf: for ever (the longest wait).
        wire_timeout = None if timeout is None else P.MAX_TIMEOUT if t is None else t
        for attempt in (1, 2):
            chan, pool_id = self._mp_route()
            rid = chan.next_rid()
            try:
                reply = chan.request(rid, P.encode_get(rid, pool_id, wire_timeout), deadline,
                                     self._late_handler(chan, pool_id))
                break
            except TimeOut:
                raise TimeOut(f"pool {self.name!r}: the supervisor did not answer within "
                              f"{(wait or 0.0) + GRACE:g} s (frozen?)") from None
            except ServerUnavailable:
                # A channel found dead only now (the supervisor died since we last talked):
                # whatever it granted is void, and a restarted one may be there. Once more.
                if attempt == 2:
                    raise
        return self._received(reply, chan, pool_id)

    def _received(self, reply: Any, chan: Channel, pool_id: int) -> Any:
        """The object a get's reply grants (recorded as held), or the error it carries."""
        lease = (reply if type(reply) is P.Granted else granted(reply)).lease
        try:
            # The method cache of proxies is per kind of object: here, per pool.
            obj = ObjectProxy(self, lease, 0, f"pool {self.name}", chan, pool_id) \
                if reply.blob is None else pickle.loads(reply.blob)
        except Exception as exc:
            chan.post(P.encode_put(pool_id, lease, discard=True))  # not usable: discard
            if "pickle" in type(exc).__name__.lower() or isinstance(exc, AttributeError):
                raise TypeError(f"pool {self.name!r}: the object cannot be rebuilt here "
                                f"({exc}); use transfer='proxy' to keep it in the supervisor") \
                    from exc
            raise
        client = self._client
        with client._lock:
            client._held[self.name].add(obj, (lease, chan, pool_id))
        return obj

    def ret(self, obj: Any, discard: bool = False) -> None:
        """Return an object; with ``discard=True`` the supervisor closes it instead."""
        client = self._client
        with client._lock:
            held = client._held[self.name].take(obj)
        if not held:
            log.warning("mppool: pool %r: ret() of an object this process does not hold "
                        "(returned twice?): ignored", self.name)
            return
        lease, chan, pool_id = held
        if isinstance(obj, ObjectProxy):
            object.__setattr__(obj, "_mp_lease", 0)  # further calls fail clearly
        if chan._broken:
            log.info("mppool: pool %r: ret() of a lease from a supervisor connection that is "
                     "gone (%s): nothing to give back", self.name, chan.broken)
            return
        try:
            chan.post(P.encode_put(pool_id, lease, discard))
        except ServerUnavailable as exc:
            log.info("mppool: pool %r: the supervisor is gone, the lease with it: %s",
                     self.name, exc)

    put = ret

    def stats(self) -> dict[str, Any]:
        """The pool's stats (those of ``mppool.Pool``, plus name, kind and transfer)."""
        return self._client._call("stats", self.name)

    def free(self) -> int:
        """How many gets would succeed now without waiting."""
        return self._client._call("pool_call", self.name, "free")

    def pop_stats(self) -> dict[str, int]:
        """psycopg_pool's counters and gauges; the counters restart at 0 (for every process)."""
        return self._client._call("pool_call", self.name, "pop_stats")

    def wait(self, timeout: float | None = 30.0) -> None:
        """Block until the pool has ``min_size`` objects in the supervisor; TimeOut after
        ``timeout`` seconds (None: as long as it takes)."""
        t = check_timeout_arg(timeout)
        self._client._call("pool_call", self.name, "wait", t,
                           timeout=None if t is None else t + GRACE + self._client._timeout)

    def waiting(self) -> int:
        """How many gets are queued (from every process)."""
        # On the lease channel, not the dill control plane: budgets poll it (Pool.recall()).
        chan, pool_id = self._mp_route()
        rid = chan.next_rid()
        reply = chan.request(rid, P.encode_waiting(rid, pool_id),
                             time.monotonic() + self._client._timeout)
        return reply.value

    def resize(self, max_size: int) -> None:
        """Change the bound; new room goes to waiters at once."""
        self._client._call("pool_call", self.name, "resize", max_size)

    def clear(self) -> int:
        """Close every idle object in the supervisor; returns how many."""
        return self._client._call("pool_call", self.name, "clear")

    def shutdown(self, delay: float = 0.0) -> None:
        """Shut the pool down in the supervisor (for every process)."""
        self._client._call("pool_call", self.name, "shutdown", check_delay("delay", delay))

    def __len__(self) -> int:
        return self._client._call("pool_call", self.name, "__len__")

    def __str__(self) -> str:
        import json
        return json.dumps(self.stats())

    def __repr__(self) -> str:
        return f"<mppool.SharedPool {self.name!r} at {display(self._client.address)}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return self._client._pool_reducer(self.name)


def granted(reply: Any) -> P.Granted:
    """The grant a get's reply is, or the error it carries, raised as its own class."""
    if type(reply) is P.Granted:
        return reply
    if isinstance(reply, P.Reply) and reply.status == P.ERR:
        raise reply.value.unpack()
    raise ServerUnavailable(f"unexpected reply {reply!r}")


def _give_back(chan: Channel, pool_id: int, reply: Any) -> None:
    """A grant that arrived after its get gave up (timeout, interrupt): return it at once."""
    if isinstance(reply, P.Granted):
        try:
            chan.post(P.encode_put(pool_id, reply.lease))
        except ServerUnavailable:
            pass  # the connection is gone, and the lease with it
