"""The client side of token leases in shared memory: ``client.token_pool(name, n, fast=True)``.

    this process                                      supervisor
    FastTokenPool.get()
      ├ region mapped?  no ── FastMap on a connection of its own ──▶ the region's memfd
      │                                                              (SCM_RIGHTS, once)
      ├ take a FREE slot (the region's lock, no message) ──▶ FastToken(slot, generation)
      └ nothing FREE / slow mode / the lock not had within 2 ms:
          the normal get (SharedPool.get) ──────────────────────────▶ queued, FIFO
    FastTokenPool.put(token)
      ├ FastToken: give the slot back (no message); in slow mode, a FastPoke (one way);
      │ the lock held by a stopped process for 2 ms: a FastGive (the supervisor gives it)
      └ a token from the normal path: the normal put

The region, its states and why each guarantee holds are described in `mppool.shm` and
`mppool.supervisor.fastregion`. The fast path is the default for host token pools
(``fast=False``, or ``MPPOOL_FAST=0`` in the environment, turn it off) and applies only where
it can: a unix-socket supervisor on this host, Linux, mppool's C module built at install (the
lock takes atomics), and a token pool without ``max_use``, ``max_lifetime`` or
``burst_limit``. Anywhere else, or whenever mapping the region fails, the pool is an
ordinary shared token pool (logged once, at INFO).

A fast token belongs to this process's lease channel: when the process dies, the channel
closes and the supervisor frees its slots. A token from a supervisor that has since
restarted is void, and putting it back is ignored, as for the normal path.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from . import framing, shm
from . import protocol as P
from .address import display
from .channel import Channel
from .client import FAST_TOKEN_POOL, SharedPool, _attach_client, granted
from .errors import ServerUnavailable
from .holder import current_holder
from .pools import Token

log = logging.getLogger("mppool")


class FastToken(Token):
    """A token leased through the region: its slot and that slot's generation. A `Token`
    like any other (``get() -> Token``), with what its put needs."""

    __slots__ = ("gen", "slot", "where")

    def __init__(self, slot: int, gen: int, where: tuple[Any, ...]) -> None:
        self.slot = slot
        self.gen = gen
        self.where = where
        self.number = slot

    def __repr__(self) -> str:
        return f"fast token #{self.slot}"


class FastTokenPool(SharedPool):
    """A shared token pool whose uncontended get/put touch only shared memory."""

    _where: tuple[Channel, shm.Region, int, int] | None = None  # chan, region, conn id, pid
    _refused_on: Channel | None = None  # the channel the supervisor refused a region on

    def _region(self) -> tuple[Channel, shm.Region, int, int] | None:
        """The region for this process's current channel, mapped on first use; None where
        there is no fast path (the reason is logged once per channel)."""
        chan = self._client._channel()
        where = self._where
        if where is not None and where[0] is chan and where[3] == os.getpid():
            return where
        if self._refused_on is chan:
            return None
        _, pool_id = self._mp_route()
        chan = self._client._channel()
        try:
            region = map_region(chan, self._client.authkey, pool_id)
        except (ServerUnavailable, ValueError, OSError, shm.Unavailable) as exc:
            self._refused_on = chan
            log.info("mppool: token pool %r: no fast path, using the normal one: %s",
                     self.name, exc)
            return None
        self._where = where = (chan, region, chan.conn_id, os.getpid())
        return where

    def get(self, timeout: float | None = None) -> Any:
        where = self._where
        client_chan = self._client._chan
        if where is None or where[0] is not client_chan or where[0]._broken \
                or where[3] != os.getpid():
            try:
                where = self._region()
            except ServerUnavailable:
                where = None  # the normal path below reconnects, or says what is wrong
        if where is not None:
            h = current_holder()
            try:
                got = where[1].take(where[2], h.pid, h.start, time.monotonic())
            except OSError as exc:  # the region cannot be used any more: the normal path
                self._give_up(where, exc)
            else:
                if got.__class__ is tuple:  # else QUEUE or BUSY: through the supervisor
                    slot, gen = got
                    return FastToken(slot, gen, where)
        return SharedPool.get(self, timeout)

    def _give_up(self, where: tuple[Channel, shm.Region, int, int], exc: OSError) -> None:
        log.warning("mppool: token pool %r: the fast-path region is unusable (%s): using "
                    "the normal path", self.name, exc)
        self._refused_on = where[0]
        self._where = None

    def ret(self, obj: Any, discard: bool = False) -> None:
        if type(obj) is not FastToken:
            SharedPool.ret(self, obj, discard)
            return
        chan, region, conn_id, pid = obj.where
        if chan._broken or pid != os.getpid():
            log.info("mppool: token pool %r: put of a fast token from a supervisor connection "
                     "that is gone: nothing to give back", self.name)
            return
        try:
            done = region.give(obj.slot, obj.gen, conn_id)
        except OSError as exc:
            self._give_up(obj.where, exc)
            done = shm.BUSY
        if done is True:
            return
        if done == shm.POKE or done == shm.BUSY:
            # POKE: given back in slow mode, the supervisor hands it on. BUSY: the mutex's
            # holder is stopped; the supervisor gives it back for us when it can.
            msg = P.encode_fastpoke(self._id) if done == shm.POKE else \
                P.encode_fastgive(self._id, obj.slot, obj.gen)
            try:
                chan.post(msg)
            except ServerUnavailable:
                pass  # the supervisor is gone, and the lease with it
        elif done is False:
            log.warning("mppool: token pool %r: put of %r, which this process no longer holds "
                        "(reclaimed, killed, or put twice): ignored", self.name, obj)

    put = ret

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach_fast, (display(self._client.address), self._client.authkey.hex(),
                               self.name))


FAST_TOKEN_POOL.append(FastTokenPool)  # what client.token_pool(fast=True) makes


def _attach_fast(address: str, authkey: str, name: str) -> SharedPool:
    """Unpickle a fast token pool: it stays fast wherever it lands."""
    return _attach_client(address, authkey).token_pool(name, fast=True)


def map_region(chan: Channel, authkey: bytes, pool_id: int) -> shm.Region:
    """Ask the supervisor for pool ``pool_id``'s region, for the leases of ``chan``, on a
    connection of its own (the memfd comes with the reply), and map it."""
    shm.available()  # Unavailable before any message where there is no fast path
    address = chan_address(chan)
    if address is None:
        raise shm.Unavailable("the supervisor is not on a unix socket")
    side = Channel(address, authkey, chan.timeout)
    try:
        sock = side._sock
        rid = 1
        sock.sendall(P.encode_fastmap(rid, pool_id, chan.conn_id))
        deadline = time.monotonic() + chan.timeout
        data, fds = b"", []
        reader = framing.FrameReader(1 << 16)
        frames: list[Any] = []
        while not frames:
            if time.monotonic() >= deadline:
                raise ServerUnavailable("the supervisor did not send the fast-path region in time")
            try:
                data, got, _, _ = socket.recv_fds(sock, 1 << 16, 1)
            except BlockingIOError:
                continue
            fds += got
            if not data:
                raise ServerUnavailable("the supervisor closed the connection")
            frames = reader.feed(data)
        reply = P.decode_reply(frames[0])
        try:
            if isinstance(reply, P.Reply) and reply.status == P.ERR:
                granted(reply)  # raises the supervisor's reason
            if len(fds) != 1:
                raise ValueError(f"the supervisor sent {len(fds)} descriptors, not 1")
            return shm.Region(fds[0])
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        side.close()


def chan_address(chan: Channel) -> str | None:
    """The unix socket path of ``chan``'s supervisor (None over TCP)."""
    sock = chan._sock
    if sock.family != socket.AF_UNIX:
        return None
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    return peer if isinstance(peer, str) and peer else None

