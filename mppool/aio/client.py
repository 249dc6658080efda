"""The asyncio client: ``await mppool.aio.connect()``, `AsyncClient` and `AsyncSharedPool`.

    this process (one event loop)                       supervisor
    AsyncClient ─ AsyncControl (asyncio streams) ─────▶ Control: create, stats, pool calls
                └ AsyncChannel (one reader task) ─────▶ lease loop: get, put, cancel

The same supervisor, lease channel and watchdog as the blocking client (`mppool.client`):
an async holder that dies gives its units back at once, and sync and async clients may share
a process (each has its own connections). Nothing waits on a thread or a blocking socket,
except ``connect(autostart=True)``, which starts a supervisor in a thread executor.

Leases are tracked per client and pool name, as in the blocking client. A pool id is valid
on the run of the supervisor that issued it: when the channel reaches another run (a
restart at the same address), the pool is created again there from the options it was
created with. After a bare ``os.fork()`` the child drops, never closes, the parent's
connections and opens its own on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import weakref
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import dill

from .. import protocol as P
from ..address import Address, display
from ..client import (
    _DEFAULT_TOKENS,
    GRACE,
    PoolWhere,
    check_timeout_arg,
    connect_target,
    granted,
    known_key,
)
from ..errors import ServerUnavailable, TimeOut
from ..leasemap import LeaseMap
from ..options import POOL_OPTIONS, token_pool_options
from ..validate import check_delay, check_int
from .channel import AsyncChannel
from .control import AsyncControl

log = logging.getLogger("mppool")

_clients: weakref.WeakSet[AsyncClient] = weakref.WeakSet()
# What a forked child dropped from its parent: kept alive for ever, never closed, since
# closing an asyncio transport would touch the parent's event loop (its epoll set is shared).
_forked_away: list[Any] = []


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class AsyncClient:
    """A connection to a supervisor from asyncio code. Use ``await mppool.aio.connect()``."""

    def __init__(self, address: Address, authkey: bytes, timeout: float,
                 autostart: bool = False) -> None:
        self.address = address
        self.authkey = authkey
        self._timeout = timeout
        self._autostart = autostart
        self._control = AsyncControl(address, authkey, timeout)
        self._chan: AsyncChannel | None = None
        self._opening: asyncio.Task[AsyncChannel] | None = None
        self._pools: weakref.WeakValueDictionary[str, AsyncSharedPool] = \
            weakref.WeakValueDictionary()
        # pool name -> id(obj) -> (obj, lease, channel, pool id): what this process holds.
        self._held: dict[str, LeaseMap] = {}  # pool name -> obj -> (lease, channel, pool id)
        self._closed = False
        self._pid = os.getpid()
        self._loop: asyncio.AbstractEventLoop | None = None  # bound at first use
        _clients.add(self)

    # --------------------------------------------------------------- connections

    def _check_loop(self) -> None:
        """A client's streams belong to the event loop that made them."""
        running = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = running
        elif self._loop is not running:
            raise RuntimeError(f"{self!r} belongs to another event loop: connect once per "
                               "event loop")

    async def _call(self, method: str, *args: Any) -> Any:
        """A control-plane call, after every put this process sent has taken effect."""
        if self._closed:
            raise ServerUnavailable("client is closed")
        self._check_loop()
        chan = self._chan
        if chan is not None and chan.unsynced and not chan.broken:
            with contextlib.suppress(ServerUnavailable, TimeoutError):
                await chan.sync()  # the control call below says what is wrong, if anything
        try:
            return await self._control.call(method, *args)
        except ServerUnavailable:
            if not self._autostart:
                raise
        await _ensure_supervisor(self.address, self.authkey, self._timeout)
        return await self._control.call(method, *args)

    async def _channel(self) -> AsyncChannel:
        """This process's lease channel; a new one once the old one broke (a restart).

        The opening runs in a task of its own, shielded: a get cancelled while the channel
        is being opened does not abort the opening that every other task waits for.
        """
        chan = self._chan
        if chan is not None and not chan.broken:
            if chan.loop is not asyncio.get_running_loop():
                self._check_loop()
            return chan
        self._check_loop()
        if self._closed:
            raise ServerUnavailable("client is closed")
        opening = self._opening
        if opening is None or opening.done():
            opening = self._opening = asyncio.get_running_loop().create_task(self._open())
            # Its failure is told to whoever awaits it; if every one of them was cancelled,
            # nobody is left to, and that is no error.
            opening.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(opening)

    async def _open(self) -> AsyncChannel:
        old, self._chan = self._chan, None
        if old is not None:
            await old.close()
        info = await self._call("info")
        chan = await AsyncChannel.open(info["lease_address"], self.authkey, self._timeout)
        if self._closed:
            await chan.close()
            raise ServerUnavailable("client is closed")
        self._chan = chan
        return chan

    def _forked(self) -> None:
        """In a child of a bare fork: forget the parent's connections, never close them."""
        if self._chan is not None:
            _forked_away.extend(self._chan.forget())
        self._chan = None
        self._opening = None
        _forked_away.extend(self._control.forget())
        self._held = {}
        self._pid = os.getpid()
        self._loop = None  # the child runs an event loop of its own

    # --------------------------------------------------------------- public API

    async def pool(self, name: str, fun: Any = None, *, transfer: str = "copy",
                   **options: Any) -> AsyncSharedPool:
        """The shared pool ``name``, created on first use with ``fun`` and ``mppool.Pool``
        options; without either, an existing pool is attached."""
        unknown = sorted(set(options) - POOL_OPTIONS)
        if unknown:
            raise TypeError(f"unknown pool option(s) {', '.join(unknown)} for pool {name!r}")
        if transfer != "copy":
            raise NotImplementedError(
                f"pool {name!r}: the asyncio client hands out copies only (transfer='copy'); "
                "a proxy's calls would block the event loop")
        if fun is not None:
            options["fun"] = fun
        if options and "fun" not in options:
            raise TypeError(f"fun must be given to create pool {name!r}, got options only")
        blob = dill.dumps(options, recurse=True) if options else None
        return await self._attach(name, "pool", transfer, blob)

    async def token_pool(self, name: str, max_size: int = _DEFAULT_TOKENS) -> AsyncSharedPool:
        """The shared token pool ``name``: at most ``max_size`` tokens out at once.

        Without ``max_size`` an existing token pool is attached whatever its size (a new one
        gets 4); with it, an existing pool of another size raises ValueError.
        """
        check_int("max_size", max_size, minimum=1)
        if max_size is _DEFAULT_TOKENS:
            try:
                return await self._attach(name, "token", "copy", None)
            except ValueError:
                pass  # no such pool yet: create it with the default size
        return await self._attach(name, "token", "copy", dill.dumps(token_pool_options(max_size)))

    async def _attach(self, name: str, kind: str, transfer: str,
                      blob: bytes | None) -> AsyncSharedPool:
        pool_id, transfer, timeout, instance = await self._call("create", name, kind, transfer,
                                                                blob)
        if transfer != "copy":
            raise NotImplementedError(f"pool {name!r} was created with transfer={transfer!r}: "
                                      "the asyncio client hands out copies only")
        known = self._pools.get(name)
        if known is not None:
            known._learn(instance, pool_id, timeout, kind, blob)
            return known
        pool = AsyncSharedPool(self, name, (instance, pool_id), timeout, kind, blob)
        self._pools[name] = pool
        return pool

    async def stats(self) -> dict[str, Any]:
        """Every pool's stats, by name."""
        return await self._call("stats")

    async def info(self) -> dict[str, Any]:
        """The supervisor's pid, addresses, connection count and reclaimed leases."""
        return await self._call("info")

    async def close(self) -> None:
        """Close this client; leases it still holds go back to their pools."""
        self._closed = True
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
        chan, self._chan = self._chan, None
        if chan is not None:
            await chan.close()
        await self._control.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<mppool.aio.AsyncClient {display(self.address)}>"


class AsyncSharedPool(PoolWhere):
    """A pool served by the supervisor, with the API of ``mppool.Pool`` as coroutines."""

    def __init__(self, client: AsyncClient, name: str, where: tuple[int, int],
                 timeout: float | None, kind: str, blob: bytes | None) -> None:
        self._client = client
        self.name = name
        self.transfer = "copy"
        self._learn(*where, timeout, kind, blob)

    async def _route(self) -> tuple[AsyncChannel, int]:
        """The channel and this pool's id on the supervisor it reaches: after a restart,
        the pool is created again there from the options it was created with."""
        client = self._client
        for _ in range(3):
            chan = await client._channel()
            if chan.instance == self._instance:
                return chan, self._id
            pool_id, _, timeout, instance = await client._call(
                "create", self.name, self._kind, self.transfer, self._blob)
            self._learn(instance, pool_id, timeout, self._kind, None)
            if instance != chan.instance:
                # The control plane reached a newer run than our channel: that channel's
                # supervisor is gone. Open a new one and look again.
                await chan.close()
        raise ServerUnavailable(f"pool {self.name!r}: the supervisor at "
                                f"{display(client.address)} keeps restarting")

    @property
    def _held(self) -> LeaseMap:
        return self._client._held.setdefault(self.name, LeaseMap())

    async def get(self, timeout: float | None = None) -> Any:
        """Get a copy of an object; ``timeout=None`` uses the pool's, 0 means do not wait,
        ``math.inf`` waits forever. Cancelling the task that waits loses nothing."""
        t = check_timeout_arg(timeout)
        wait = t if timeout is not None else self._timeout
        # None: the pool's own timeout (-1 on the wire); inf: for ever (the longest wait).
        wire_timeout = None if timeout is None else P.MAX_TIMEOUT if t is None else t
        for attempt in (1, 2):
            chan, pool_id = await self._route()
            rid = chan.next_rid()
            try:
                reply = await chan.request(rid, P.encode_get(rid, pool_id, wire_timeout),
                                           None if wait is None else wait + GRACE, pool_id)
                break
            except TimeoutError:
                raise TimeOut(f"pool {self.name!r}: the supervisor did not answer within "
                              f"{(wait or 0.0) + GRACE:g} s (frozen?)") from None
            except ServerUnavailable:
                # A channel found dead only now (the supervisor died since we last talked):
                # whatever it granted is void, and a restarted one may be there. Once more.
                if attempt == 2:
                    raise
        # From here on nothing awaits: a cancellation cannot come between the grant and
        # the lease being recorded as held.
        reply = granted(reply)
        try:
            obj = pickle.loads(reply.blob)
        except Exception as exc:
            chan.post(P.encode_put(pool_id, reply.lease, discard=True))  # not usable: discard
            raise TypeError(f"pool {self.name!r}: the object cannot be rebuilt here "
                            f"({exc!r})") from exc
        self._held.add(obj, (reply.lease, chan, pool_id))
        return obj

    async def ret(self, obj: Any, discard: bool = False) -> None:
        """Return an object; with ``discard=True`` the supervisor closes it instead. It never
        waits (no cancellation can interrupt it)."""
        held = self._held.take(obj)
        if not held:
            log.warning("mppool: pool %r: ret() of an object this process does not hold "
                        "(returned twice?): ignored", self.name)
            return
        lease, chan, pool_id = held
        if chan.broken:
            log.info("mppool: pool %r: ret() of a lease from a supervisor connection that is "
                     "gone (%s): nothing to give back", self.name, chan.broken)
            return
        chan.post(P.encode_put(pool_id, lease, discard))

    put = ret

    @contextlib.asynccontextmanager
    async def obj(self, timeout: float | None = None) -> AsyncIterator[Any]:
        """``async with pool.obj() as o:``: the object always goes back, also when the
        task is cancelled inside the block."""
        o = await self.get(timeout)
        try:
            yield o
        finally:
            await self.ret(o)

    item = obj

    async def stats(self) -> dict[str, Any]:
        """The pool's stats (those of ``mppool.Pool``, plus name, kind and transfer)."""
        return await self._client._call("stats", self.name)

    async def free(self) -> int:
        """How many gets would succeed now without waiting."""
        return await self._client._call("pool_call", self.name, "free")

    async def waiting(self) -> int:
        """How many gets are queued (from every process)."""
        chan, pool_id = await self._route()
        rid = chan.next_rid()
        try:
            reply = await chan.request(rid, P.encode_waiting(rid, pool_id), self._client._timeout)
        except TimeoutError:
            raise ServerUnavailable(f"pool {self.name!r}: the supervisor did not answer "
                                    "waiting() in time (frozen?)") from None
        return reply.value

    async def resize(self, max_size: int) -> None:
        """Change the bound; new room goes to waiters at once."""
        await self._client._call("pool_call", self.name, "resize", max_size)

    async def clear(self) -> int:
        """Close every idle object in the supervisor; returns how many."""
        return await self._client._call("pool_call", self.name, "clear")

    async def shutdown(self, delay: float = 0.0) -> None:
        """Shut the pool down in the supervisor (for every process)."""
        await self._client._call("pool_call", self.name, "shutdown", check_delay("delay", delay))

    def __repr__(self) -> str:
        return f"<mppool.aio.AsyncSharedPool {self.name!r} at {display(self._client.address)}>"


async def _ensure_supervisor(address: Address, authkey: object, timeout: float) -> bytes:
    """autostart: blocking (a file lock, maybe a process start), so on a thread."""
    from ..autostart import ensure_supervisor

    return await asyncio.get_running_loop().run_in_executor(
        None, ensure_supervisor, address, authkey, timeout)


async def connect(address: object = None, authkey: object = None, *, autostart: bool = False,
                  timeout: float = 5.0) -> AsyncClient:
    """Connect to a supervisor (``MPPOOL_ADDRESS`` or the per-user default if no address).

    With ``autostart=True`` the first caller starts a supervisor that outlives it, and every
    racing or later caller connects to that same one.
    """
    addr, timeout = connect_target(address, timeout)
    if autostart:
        key = await _ensure_supervisor(addr, authkey, timeout)
    else:
        key = known_key(addr, authkey)
    client = AsyncClient(addr, key, timeout, autostart=autostart)
    try:
        await client._call("info")  # fail now, not at first use
    except BaseException:
        await client.close()
        raise
    return client
