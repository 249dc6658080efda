"""What the lease loop does with each request: get, put, proxied calls, ping, cancel.

Runs on the loop's thread, never blocking: user code (``fun``, the getter hook, the
``check`` pre-ping, proxied methods, returns that run hooks) is handed to the pool's own
threads (``Record.submit``), which answer the client themselves. An idle object that fails
its ``check`` there is closed, and the get is made again on the loop with what is left of
its timeout. A get takes one decision of the core pool
(``pool._acquire``): an idle entry (answered at once), ``CREATE`` (``fun`` on the pool's
threads), or a queued ``RemoteWaiter`` whose deadline the loop keeps. A put is honoured only
from the connection that holds the lease.

A mixin of `LeaseLoop` (leases.py), which owns the sockets and the event loop.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from ..errors import PoolClosed, ServerUnavailable, TimeOut, TooManyRequests, add_hint
from ..pool import CREATE, Entry, Pool
from ..remote import WithValue, is_plain
from .conn import Conn, RemoteWaiter
from .fastmap import serve_fastmap

if TYPE_CHECKING:
    from .registry import Record

# The loop's own attributes (sup, records, refs, thread, ratelog, at, close...) are
# LeaseLoop's, which mixes this in; typed loosely here, checked there.
_Loop: Any = object


class Requests(_Loop):
    """The request handlers of the lease loop."""

    def deliver(self, waiter: RemoteWaiter, result: Any) -> None:
        """A waiter was handed ``result`` under the pool lock: act on it, never blocking."""
        waiter.conn.waiters.pop(waiter.rid, None)
        if result is CREATE:
            self.create(waiter)
        elif isinstance(result, BaseException):
            waiter.conn.fail(waiter.rid, result)
        else:
            self.reply_entry(waiter.conn, waiter.rid, waiter.rec, result, waiter.since,
                             deadline=waiter.deadline)

    def dispatch(self, conn: Conn, msg: P.Request) -> None:
        if isinstance(msg, P.Call):
            self.call(conn, msg)
        elif isinstance(msg, P.DropRef):
            conn.refs.pop(msg.ref, None)
        elif isinstance(msg, P.Waiting):
            rec = self.records.get(msg.pool_id)
            conn.send_raw(P.encode_reply(msg.rid, P.OK, rec.pool.waiting() if rec else 0))
        elif isinstance(msg, P.Ping):
            self.ping(conn, msg.rid)
        elif isinstance(msg, P.Cancel):
            self.cancel_get(conn, msg.rid)
        elif isinstance(msg, P.Bye):
            conn.bye = True  # its EOF, next, is a clean exit: leases still held are logged at INFO
        elif isinstance(msg, P.FastPoke):
            region = self.fast_regions.get(msg.pool_id)  # a pool shutting down too
            if region is not None:
                region.settle()
        elif isinstance(msg, P.FastGive):
            region = self.fast_regions.get(msg.pool_id)
            if region is not None:
                region.give(conn.id, msg.slot, msg.gen)
        elif isinstance(msg, P.FastMap):
            serve_fastmap(self, conn, msg)
        # Get and Put never get here: read() decodes them in place, before anything else.

    def ping(self, conn: Conn, rid: int) -> None:
        reply = P.encode_reply(rid, P.OK, os.getpid())
        running = list(conn.puts_running)
        if not running:
            conn.send_raw(reply)
            return
        left = [len(running)]
        lock = threading.Lock()

        def one_done(_: Future[Any]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                conn.send_raw(reply)

        for fut in running:
            fut.add_done_callback(one_done)

    def get(self, conn: Conn, rid: int, pool_id: int, timeout: float | None) -> None:
        """Also called again when the object a get was leased failed the pool's ``check``,
        with what is left of its ``timeout``."""
        rec = self.records.get(pool_id)
        if rec is None:
            conn.fail(rid, self.sup.registry.unknown(pool_id))
            return
        if conn.closed:
            return  # a retry for a client that left meanwhile
        pool = rec.pool
        if timeout is None:
            timeout = rec.timeout
        fast = rec.fast
        if fast is not None:  # the region goes slow; its FREE tokens back to the Pool
            fast.on_get(conn.id)
        try:
            # One decision; a waiter is made only if the get must queue.
            got = pool._acquire(conn.holder, None if timeout == 0 else RemoteWaiter,
                                (conn, rid, rec))
        except PoolClosed:
            conn.fail(rid, PoolClosed(f"pool {rec.name!r} is shutting down"))
            return
        except TooManyRequests as exc:
            conn.fail(rid, exc)
            return
        if got is None:
            conn.fail(rid, TimeOut(f"pool {rec.name!r}: no object available (timeout=0)"))
        elif type(got) is Entry:
            if rec.has_check:  # a retry after a failed check needs what is left of the time
                self.reply_entry(conn, rid, rec, got, deadline=None if timeout is None
                                 else self.sup.clock.now() + timeout)
            else:
                self.reply_entry(conn, rid, rec, got)
        elif got is CREATE:
            waiter = RemoteWaiter(conn.holder, conn, rid, rec)  # type: ignore[arg-type]
            waiter.done = True
            self.create(waiter)
        else:  # queued: the client may withdraw it, and its deadline is ours to keep
            conn.waiters[rid] = got  # the waiter made above
            if timeout is not None:
                got.deadline = deadline = self.sup.clock.now() + timeout
                self.at(deadline, 0, got)
            if fast is not None:
                fast.queued()  # the region slow while it waits, nothing to park
            return
        if fast is not None:
            fast.settle()

    def cancel_get(self, conn: Conn, rid: int) -> None:
        """The client gave up on its get ``rid`` (an asyncio task cancelled): withdraw it if
        it is still queued. If it was served meanwhile, the grant is already on its way and
        the client gives it back."""
        waiter = conn.waiters.pop(rid, None)
        if waiter is not None and waiter.rec.pool._cancel(waiter):
            conn.fail(rid, TimeOut(f"pool {waiter.rec.name!r}: the get was withdrawn"))

    def create(self, waiter: RemoteWaiter) -> None:
        """Run fun for a waiter that was granted a slot, on the pool's own threads."""
        if self.submit(waiter.rec, waiter.conn, waiter.rid, self._create, waiter) is None:
            waiter.rec.pool._release_slot()

    def _create(self, waiter: RemoteWaiter) -> None:
        rec, conn = waiter.rec, waiter.conn
        if conn.closed:
            rec.pool._release_slot()
            return
        try:
            entry = rec.pool._create_for(conn.holder)  # type: ignore[arg-type]
        except BaseException as exc:
            conn.fail(waiter.rid, exc)
            return
        # _create_for() already handed it out (getter hook).
        self.reply_entry(conn, waiter.rid, rec, entry, waiter.since, handed=True)

    def submit(self, rec: Record, conn: Conn, rid: int, fn: Callable[..., Any],
               *args: Any) -> Future[Any] | None:
        """Run user code for ``rec`` on its own threads; None (and an error to the client)
        when no thread could be had."""
        fut = rec.submit(fn, *args)
        if fut is None and rid:
            conn.fail(rid, ServerUnavailable("the supervisor is out of threads; try again"))
        return fut

    def reply_entry(self, conn: Conn, rid: int, rec: Record, entry: Entry,
                    since: float = 0.0, handed: bool = False,
                    deadline: float | None = None) -> None:
        """Send ``entry`` to the client (``handed``: the getter hook ran already). An idle
        entry passes the pool's ``check`` first, when it is due; one found broken is closed
        and the get goes on with what is left of its ``deadline``."""
        pool = rec.pool
        if not handed and (rec.has_getter or (rec.has_check and pool._check_due(entry))):
            if threading.get_ident() == self.thread.ident:
                # The getter and check are user code: on the pool's threads, never on the loop.
                if self.submit(rec, conn, rid, self.reply_entry, conn, rid, rec, entry, since,
                               False, deadline) is None:
                    pool._checkin(entry.lease)
                return
            if rec.has_check and not pool._verify(entry):
                self._get_again(conn, rid, rec, deadline)
                return
        metrics = self.sup.metrics
        if metrics is not None:
            metrics.wait.labels(rec.name).observe(self.sup.clock.now() - since if since else 0.0)
        if not handed and rec.has_getter:
            pool._hand_out(entry)
        blob = entry.blob  # a cached copy (never set for proxy pools)
        if blob is None:
            try:
                blob = rec.blob(entry)
            except Exception as exc:
                pool._checkin(entry.lease)
                conn.fail(rid, exc)
                return
        if blob is None:
            conn.send_raw(P.encode_granted_proxy(rid, entry.lease))
        else:
            conn.send_raw(P.encode_granted(rid, entry.lease, blob))
        if conn.closed:
            # The connection went away while we were leasing: it never got the object.
            _reclaim_conn(rec, conn)

    # The closures of the rare paths are made in methods of their own: a lambda in a hot
    # method would make its variables cells, created on every call (CPython 3.11).

    def _get_again(self, conn: Conn, rid: int, rec: Record, deadline: float | None) -> None:
        """The idle object a get was leased failed its check: the get again, on the loop,
        with what is left of its time."""
        left = None if deadline is None else max(0.0, deadline - self.sup.clock.now())
        self.call_soon(lambda: self.get(conn, rid, rec.id, left))

    def put(self, conn: Conn, pool_id: int, lease: int, discard: bool = False) -> None:
        rec = self.records.get(pool_id)
        if rec is None:
            return
        if conn.calls and self._hold_put(conn, pool_id, lease, discard):
            return
        pool = rec.pool
        metrics = self.sup.metrics
        if metrics is not None:
            entry = pool._lent(lease, conn.holder)
            if entry is not None:
                metrics.hold.labels(rec.name).observe(self.sup.clock.now() - entry.last_get)
        if rec.slow_ret or discard:  # hooks run: on the pool's threads, off the loop
            if conn.refs:  # its sub-objects (cursors) are unusable from now on
                _drop_refs(conn, lease)
            if pool._lent(lease, conn.holder) is None:
                # Not its lease: refused here, as _checkin would refuse it there. A thread
                # hand-off each, for a flood of discards of random leases, stalled every
                # other client of the loop (565 ms for 100 000 of them, against 13 ms).
                self._refused(conn, rec, lease)
            else:
                fut = self.submit(rec, conn, 0, self._checkin, conn, rec, lease, discard)
                if fut is not None:
                    conn.puts_running.add(fut)
                    fut.add_done_callback(conn.puts_running.discard)
        else:
            if not pool._checkin(lease, discard, conn.holder):
                self._refused(conn, rec, lease)
            if conn.refs:  # after the checkin: see _call, which keeps a ref only if still lent
                _drop_refs(conn, lease)
        if rec.fast is not None:
            rec.fast.settle()

    def _checkin(self, conn: Conn, rec: Record, lease: int, discard: bool) -> None:
        if not rec.pool._checkin(lease, discard, conn.holder):
            self._refused(conn, rec, lease)
        if conn.refs:  # see put()
            _drop_refs(conn, lease)

    def _refused(self, conn: Conn, rec: Record, lease: int) -> None:
        conn.refused += 1
        self.ratelog(logging.WARNING, "refused", "mppool: pool %r: refused a return of lease "
                     "%d by pid %s: not its lease (returned twice, killed, or another's)",
                     rec.name, lease, conn.holder.pid if conn.holder else "?")

    def call(self, conn: Conn, msg: P.Call) -> None:
        if msg.pool_id == 0:
            fut = self.sup.submit_hosted(self._call, conn, msg)
            if fut is None:
                conn.fail(msg.rid, ServerUnavailable("the supervisor is out of threads"))
            return
        rec = self.records.get(msg.pool_id)
        if rec is None:
            conn.fail(msg.rid, self.sup.registry.unknown(msg.pool_id))
            return
        ref = conn.refs.get(msg.ref) if msg.ref else None
        lease = msg.lease if ref is None else ref[0]  # whose object the call runs on
        with conn.calls_lock:
            conn.calls[lease] = conn.calls.get(lease, 0) + 1
        if self.submit(rec, conn, msg.rid, self._tracked_call, conn, msg, rec, lease) is None:
            self._call_ended(conn, lease, rec)

    # A put of a lease whose object a call still runs on (another thread of the client
    # returned it meanwhile) is held until the last such call ends: otherwise the next holder
    # would share the object with that call (a query still running on its DB connection).

    def _hold_put(self, conn: Conn, pool_id: int, lease: int, discard: bool) -> bool:
        """On the loop: hold this put if calls on ``lease`` run; False if none does."""
        with conn.calls_lock:
            if lease not in conn.calls:
                return False
            if lease not in conn.held_puts:
                done: Future[Any] = Future()  # a Ping waits for it, as for a put with hooks
                conn.puts_running.add(done)
                done.add_done_callback(conn.puts_running.discard)
                conn.held_puts[lease] = (pool_id, discard, done)
        return True

    def _tracked_call(self, conn: Conn, msg: P.Call, rec: Record, lease: int) -> None:
        try:
            self._call(conn, msg, rec)
        finally:
            self._call_ended(conn, lease, rec)

    def _call_ended(self, conn: Conn, lease: int, rec: Record | None = None) -> None:
        """Any thread: a call on ``lease``'s object ended; the loop makes a put held for it,
        or takes the lease back if the client is gone (the watchdog left it while busy)."""
        with conn.calls_lock:
            left = conn.calls[lease] - 1
            if left:
                conn.calls[lease] = left
                return
            del conn.calls[lease]
            held = lease in conn.held_puts
        if conn.closed:
            if rec is not None and conn.holder is not None:
                self.call_soon(lambda: self.sup.watchdog.reclaim_rest(rec, conn))
        elif held:
            self.call_soon(lambda: self._release_put(conn, lease))

    def _release_put(self, conn: Conn, lease: int) -> None:
        with conn.calls_lock:
            if lease in conn.calls:  # a call came meanwhile: its end releases the put
                return
            held = conn.held_puts.pop(lease, None)
        if held is None:
            return
        pool_id, discard, done = held
        try:
            if not conn.closed:  # else release_conn took it back
                self.put(conn, pool_id, lease, discard)
        finally:
            done.set_result(None)

    def _call(self, conn: Conn, msg: P.Call, rec: Record | None = None) -> None:
        """On a pool's thread: a method call or attribute read on a proxied object."""
        pool: Pool | None = None  # the pool the object belongs to (None: a hosted one)
        try:
            if msg.ref:
                held = conn.refs.get(msg.ref)
                if held is None:
                    raise PoolClosed(f"proxied object {msg.ref} is gone: dropped, or its lease "
                                     "was returned, killed or reclaimed")
                owner, target, pool = held
                # A sub-object (a cursor) is used only while its lease is lent to this
                # connection: a killed or reclaimed lease leaves its refs behind, and the
                # object (a DB connection) may be somebody else's by now.
                if pool is not None and pool._lent(owner, conn.holder) is None:
                    conn.refs.pop(msg.ref, None)
                    raise PoolClosed(f"lease {owner} was killed, reclaimed or returned: this "
                                     "object came from it and is no longer yours")
            elif rec is None:  # an object hosted with client.host(), shared by every process
                owner, target = 0, self.sup.hosted[msg.lease]
            else:
                pool = rec.pool
                entry = pool._lent(msg.lease, conn.holder)
                if entry is None:
                    raise PoolClosed(f"pool {rec.name!r}: lease {msg.lease} was killed, reclaimed "
                                     "or returned (pool shutting down or object no longer yours)")
                owner, target = msg.lease, entry.obj
            if msg.args is None:
                value = getattr(target, msg.name)
            else:
                value = getattr(target, msg.name)(*msg.args, **msg.kwargs)
        except BaseException as exc:
            conn.fail(msg.rid, add_hint(exc))
            return
        extra: tuple[Any, ...] = ()
        if type(value) is WithValue:  # an object to proxy, and a value in the same reply
            value, extra = value.obj, (value.value if is_plain(value.value) else None,)
        try:
            if not extra and is_plain(value):
                conn.send_raw(P.encode_reply(msg.rid, P.OK, value))
                return
            newref = next(self.refs)
            kind = type(value)
            reply = P.encode_reply(
                msg.rid, P.REF, (newref, f"{kind.__module__}.{kind.__qualname__}", *extra))
        except Exception as exc:  # a result that does not pickle: the caller must not hang
            conn.fail(msg.rid, exc)
            return

        def keep() -> None:
            conn.refs[newref] = (owner, value, pool)

        # Kept only while the lease is this connection's, checked under the pool's lock: a
        # put (or kill) that came while the call ran ends the lease first and drops its refs
        # after, so no ref outlives its lease unseen.
        if pool is None:
            keep()
        elif not pool._while_lent(owner, conn.holder, keep):  # type: ignore[arg-type]
            conn.fail(msg.rid, PoolClosed(
                f"lease {owner} was returned, killed or reclaimed while the call ran: what it "
                "returned is no longer yours"))
            return
        conn.send_raw(reply)


def _reclaim_conn(rec: Record, conn: Conn) -> None:
    """Take back whatever ``rec``'s pool lent to ``conn``, a connection that is gone."""
    rec.pool._reclaim(lambda h: h.conn == conn.id)


def _drop_refs(conn: Conn, lease: int) -> None:
    """Forget the proxied sub-objects (cursors) of ``lease``, given back."""
    # list(): pool threads add refs (call()) while the loop drops them here.
    for ref in [r for r, (ls, _, _) in list(conn.refs.items()) if ls == lease]:
        conn.refs.pop(ref, None)  # the loop and a pool's thread may both be dropping it
