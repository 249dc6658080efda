"""The client side: ``connect()``, shared pools, and fork safety.

Each client has, per process, one control connection (multiprocess proxies to the
supervisor's ``Control``) and one lease channel (``wire``), shared by all its threads with
request ids. The lease channel *is* this process's identity at the supervisor: its leases and
waiters are tied to it, and when it closes they are reclaimed.

After a bare ``os.fork()`` (gunicorn) the child must not touch the parent's sockets
(DESIGN.md, trap 2): an ``os.register_at_fork`` hook drops them in the child, which then opens
its own on first use.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import pickle
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import dill
from multiprocess.context import AuthenticationError
from multiprocess.managers import BaseProxy

from . import wire
from .address import Address, client_authkey, default_address, display, parse_address
from .errors import PoolException, ServerUnavailable
from .holder import current_holder
from .lender import Lender
from .validate import check_delay

log = logging.getLogger("mppool")

_POOL_OPTIONS = frozenset([
    "max_size", "min_size", "timeout", "max_use", "max_avail_delay", "max_using_delay",
    "max_using_delay_kill", "health_freq", "delay", "opener", "getter", "retter", "closer",
    "health", "stats", "tracer", "log_level", "max_lifetime", "kill_holder",
])

_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class _DefaultSize(int):
    """``max_size`` left at its default (4): attach to an existing token pool of any size."""


_DEFAULT_TOKENS = _DefaultSize(4)


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _forget_proxy_connections(address: Address) -> None:
    """Drop multiprocess's cached proxy connection to ``address``: after a supervisor died,
    a new one at the same address must not be reached through the dead socket."""
    key = address if isinstance(address, str) else tuple(address)
    entry = BaseProxy._address_to_local.get(key)
    if entry is not None:
        entry[0].__dict__.clear()


class _Slot:
    """A request's reply box. Its Event is made only if its thread has to wait for another
    reader: most requests read their own reply and never need one."""

    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event: threading.Event | None = None
        self.reply: tuple[Any, ...] | None = None


class Channel:
    """The lease connection: many threads, one socket, replies matched by request id.

    Whoever finds the reader lock free reads frames for everybody until its own reply
    arrives, then wakes one still-waiting thread to take over (leader/follower).
    """

    def __init__(self, address: Address, authkey: bytes, timeout: float) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address if isinstance(address, str) else tuple(address))
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nonce = wire.recv_raw(sock)
            if nonce[:1] != b"N" or len(nonce) != 1 + wire.NONCE_SIZE:
                raise EOFError("not a supervisor's greeting")
            mine = wire.new_nonce()
            h = current_holder()
            sock.sendall(wire.dump_hello(wire.digest(authkey, nonce[1:]), mine, h.pid, h.start,
                                         h.host))
            answer, conn_id = wire.parse_ack(wire.recv_raw(sock))
            if not hmac.compare_digest(answer, wire.digest(authkey, mine)):
                raise EOFError("the supervisor does not know the key")
        except (OSError, EOFError) as exc:
            sock.close()
            raise ServerUnavailable(f"cannot open the lease channel at {display(address)}: "
                                    f"{exc or 'refused (wrong key?)'}") from None
        sock.settimeout(None)
        self.conn_id = conn_id
        self._sock = sock
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._pending: dict[int, _Slot] = {}
        self._rbuf = bytearray()
        self._rids = itertools.count(1)
        self._broken: str | None = None
        self.unsynced = False  # puts sent whose effect this process has not yet observed

    def request(self, *msg: Any) -> tuple[Any, ...]:
        if self._broken:
            raise ServerUnavailable(self._broken)
        rid = next(self._rids) & 0xFFFFFFFF or 1  # 32 bits on the wire; 0 means "no reply"
        frame = wire.dump_get(rid, msg[1], msg[2]) if msg[0] == wire.GET else wire.dumps((rid, *msg))
        slot = _Slot()
        pending = self._pending
        pending[rid] = slot
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as exc:
            self._fail(f"supervisor unreachable: {exc}")
        while slot.reply is None:
            if self._read_lock.acquire(blocking=False):
                try:
                    while slot.reply is None:
                        reply = self._read_frame()
                        other = pending.pop(reply[0], None)
                        if other is not None:
                            other.reply = reply
                            if other.event is not None:
                                other.event.set()
                except (OSError, EOFError) as exc:
                    self._fail(f"supervisor connection lost: {exc or 'closed'}")
                except Exception as exc:
                    # A reply that cannot be read may be another thread's: fail them all
                    # rather than leave one waiting for ever.
                    self._fail(f"unreadable reply from the supervisor: {exc!r}")
                finally:
                    self._read_lock.release()
                    for waiting in pending.values():  # hand the reading over to one waiter
                        if waiting.event is not None:
                            waiting.event.set()
                        break
            else:
                if slot.event is None:
                    slot.event = threading.Event()
                    continue  # the reader may have left before seeing our event: try again
                # The timeout only recovers a hand-over that raced with making our Event.
                slot.event.wait(0.05)
                slot.event.clear()
        if slot.reply[0] == -1:
            raise ServerUnavailable(slot.reply[1])
        return slot.reply

    def _read_frame(self) -> Any:
        """One frame, with as few recv calls as possible (usually one)."""
        buf = self._rbuf
        size = wire.HEADER.size
        while True:
            if len(buf) >= size:
                (n,) = wire.HEADER.unpack_from(buf)
                if len(buf) >= size + n:
                    msg = wire.loads(bytes(buf[size:size + n]))
                    del buf[:size + n]
                    return msg
            data = self._sock.recv(wire.RECV_SIZE)
            if not data:
                raise EOFError("connection closed")
            if not buf and len(data) >= size:
                (n,) = wire.HEADER.unpack_from(data)
                if len(data) == size + n:  # the usual case: exactly one whole frame
                    return wire.loads(memoryview(data)[size:])
            buf += data

    def post(self, *msg: Any) -> None:
        """Send without waiting for a reply (put): order on the socket is kept."""
        if self._broken:
            raise ServerUnavailable(self._broken)
        frame = (wire.dump_put(msg[1], msg[2]) if msg[0] == wire.PUT and len(msg) == 3
                 else wire.dumps((0, *msg)))
        try:
            with self._send_lock:
                self._sock.sendall(frame)
            self.unsynced = True
        except OSError as exc:
            self._fail(f"supervisor unreachable: {exc}")
            raise ServerUnavailable(self._broken or str(exc)) from None

    def sync(self) -> None:
        """Wait until the supervisor has handled every put sent so far (it keeps order)."""
        if self.unsynced:
            self.unsynced = False
            self.request(wire.PING)

    def _fail(self, why: str) -> None:
        self._broken = why
        try:
            self._sock.close()
        except OSError:
            pass
        for rid in list(self._pending):
            slot = self._pending.pop(rid, None)
            if slot is not None:
                slot.reply = (-1, why)
                if slot.event is not None:
                    slot.event.set()

    def close(self) -> None:
        self._broken = self._broken or "client closed"
        try:
            self._sock.close()
        except OSError:
            pass


class Client:
    """A connection to a supervisor. Use ``mppool.connect()`` to make one."""

    def __init__(self, address: Address, authkey: bytes, timeout: float) -> None:
        self.address = address
        self.authkey = authkey
        self._timeout = timeout
        self._lock = threading.Lock()
        self._manager_pid = 0
        self._control: Any = None
        self._chan: Channel | None = None
        # Weak: pools point to their client, and a cycle would leave a dropped client to
        # the cyclic GC, which may finalize its socket before Client.__del__ closes it.
        self._pools: weakref.WeakValueDictionary[str, SharedPool] = weakref.WeakValueDictionary()
        self._closed = False
        self._info: dict[str, Any] = {}
        self._ctl()  # fail now, not at first use
        _clients.add(self)

    # --------------------------------------------------------------- connections

    def _ctl(self) -> Any:
        if self._closed:
            raise ServerUnavailable("client is closed")
        ctl = self._control
        if ctl is not None and self._manager_pid == os.getpid():
            return ctl
        with self._lock:
            if self._control is None or self._manager_pid != os.getpid():
                from multiprocess.managers import BaseManager

                from .server import Server

                deadline = time.monotonic() + self._timeout
                while True:
                    try:
                        manager = Server.__new__(Server)
                        BaseManager.__init__(manager, address=self.address, authkey=self.authkey)
                        BaseManager.connect(manager)
                        control = manager.Control()
                        # multiprocess shares one cached connection per address among all
                        # proxies of a process: a stale client's dead socket could then serve
                        # a fresh client. Each client keeps its own.
                        control._tls = threading.local()
                        self._info = control.info()
                        self._control = control
                        break
                    except AuthenticationError:
                        raise ServerUnavailable(f"supervisor at {display(self.address)} refused "
                                                "the key (wrong authkey)") from None
                    except (OSError, EOFError) as exc:
                        _forget_proxy_connections(self.address)
                        if time.monotonic() >= deadline:
                            raise ServerUnavailable(
                                f"no supervisor at {display(self.address)}: {exc}") from None
                        time.sleep(0.05)
                self._manager_pid = os.getpid()
            return self._control

    def _call(self, method: str, *args: Any) -> Any:
        # Read your own writes: a stats() or free() after ret() sees that ret().
        chan = self._chan
        if chan is not None and chan.unsynced:
            chan.sync()
        try:
            return getattr(self._ctl(), method)(*args)
        except (OSError, EOFError) as exc:
            self._control = None
            _forget_proxy_connections(self.address)
            raise ServerUnavailable(f"supervisor at {display(self.address)} is gone: {exc}") from None

    def channel(self) -> Channel:
        chan = self._chan
        if chan is not None:
            return chan
        with self._lock:
            if self._chan is None:
                if self._closed:
                    raise ServerUnavailable("client is closed")
                if not self._info:
                    self._ctl()
                self._chan = Channel(self._info["lease_address"], self.authkey, self._timeout)
            return self._chan

    def _forked(self) -> None:
        """In a child of a bare fork: forget the parent's sockets, never close them."""
        self._chan = None
        self._control = None
        self._manager_pid = 0
        self._lock = threading.Lock()
        for addr_local in list(BaseProxy._address_to_local.values()):
            addr_local[0].__dict__.clear()  # the proxies' thread-local connection
        for pool in list(self._pools.values()):
            pool._forked()

    # --------------------------------------------------------------- public API

    def pool(self, name: str, fun: Any = None, *, transfer: str = "copy",
             **options: Any) -> SharedPool:
        """The shared pool ``name``, created on first use with ``fun`` and ``mppool.Pool`` options."""
        unknown = sorted(set(options) - _POOL_OPTIONS)
        if unknown:
            raise TypeError(f"unknown pool option(s) {', '.join(unknown)} for pool {name!r}")
        if fun is not None:
            options["fun"] = fun
        if options and "fun" not in options:
            raise TypeError(f"fun must be given to create pool {name!r}, got options only")
        blob = dill.dumps(options, recurse=True) if options else None
        pid, transfer, _ = self._call("create", name, "pool", transfer, blob)
        return self._remember(SharedPool(self, name, pid, transfer))

    def token_pool(self, name: str, max_size: int = _DEFAULT_TOKENS) -> SharedPool:
        """The shared token pool ``name``: at most ``max_size`` tokens out at once.

        Without ``max_size`` an existing token pool is attached whatever its size (a new one
        gets 4); with it, an existing pool of another size raises ValueError.
        """
        from .pools import Token
        from .validate import check_int

        check_int("max_size", max_size, minimum=1)
        if max_size is _DEFAULT_TOKENS:
            try:
                pid, _, _ = self._call("create", name, "token", "copy", None)
                return self._remember(SharedPool(self, name, pid, "copy"))
            except ValueError:
                pass  # no such pool yet: create it with the default size
        blob = dill.dumps({"fun": _TokenMaker(Token), "max_size": int(max_size), "min_size": 0})
        pid, _, _ = self._call("create", name, "token", "copy", blob)
        return self._remember(SharedPool(self, name, pid, "copy"))

    def _remember(self, pool: SharedPool) -> SharedPool:
        with self._lock:
            known = self._pools.get(pool.name)
            if known is not None:
                return known
            self._pools[pool.name] = pool
            return pool

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def info(self) -> dict[str, Any]:
        return self._call("info")

    def close(self) -> None:
        """Close this client; leases it still holds go back to their pools."""
        self._closed = True
        chan, self._chan = self._chan, None
        if chan is not None:
            chan.close()
        self._control = None

    def __enter__(self) -> Client:
        return self

    def __del__(self) -> None:
        # A forgotten client still gives its leases back (the supervisor sees the close).
        if getattr(self, "_manager_pid", 0) == os.getpid():
            try:
                self.close()
            except Exception:
                pass

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mppool.Client {display(self.address)}>"


class _TokenMaker:
    """Picklable ``fun`` for token pools."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __call__(self, i: int) -> Any:
        return self.cls()


class SharedPool(Lender):
    """A pool served by the supervisor, with the API of ``mppool.Pool``.

    It pickles as (address, key, name) and reconnects wherever it is unpickled.
    """

    def __init__(self, client: Client, name: str, pool_id: int, transfer: str) -> None:
        self._client = client
        self.name = name
        self._id = pool_id
        self.transfer = transfer
        self._lock = threading.Lock()
        self._leases: dict[int, tuple[Any, int]] = {}  # id(obj) -> (obj, lease)

    def get(self, timeout: float | None = None) -> Any:
        if timeout is not None:
            timeout = check_delay("timeout", timeout)
        reply = self._client.channel().request(wire.GET, self._id, timeout)
        if reply[1] == wire.ERR:
            raise reply[2]
        lease, blob = reply[2], reply[3]
        try:
            # The method cache of proxies is per kind of object: here, per pool.
            obj = ObjectProxy(self, lease, 0, f"pool {self.name}") if blob is None else pickle.loads(blob)
        except Exception:
            self._client.channel().post(wire.PUT, self._id, lease, True)  # not usable: discard
            raise
        with self._lock:
            self._leases[id(obj)] = (obj, lease)
        return obj

    def ret(self, obj: Any, discard: bool = False) -> None:
        """Return an object; with ``discard=True`` the supervisor closes it instead."""
        with self._lock:
            held = self._leases.pop(id(obj), None)
        if held is None or held[0] is not obj:
            if held is not None:
                with self._lock:
                    self._leases[id(held[0])] = held
            log.warning("mppool: pool %r: ret() of an object this process does not hold "
                        "(returned twice?): ignored", self.name)
            return
        if isinstance(obj, ObjectProxy):
            object.__setattr__(obj, "_mp_lease", 0)  # further calls fail clearly
        if discard:
            self._client.channel().post(wire.PUT, self._id, held[1], True)
        else:
            self._client.channel().post(wire.PUT, self._id, held[1])

    put = ret

    def stats(self) -> dict[str, Any]:
        return self._client._call("stats", self.name)

    def free(self) -> int:
        return self._client._call("pool_call", self.name, "free")

    def waiting(self) -> int:
        # On the lease channel, not the dill control plane: budgets poll it (Pool.recall()).
        return self._client.channel().request(wire.WAITING, self._id)[2]

    def resize(self, max_size: int) -> None:
        self._client._call("pool_call", self.name, "resize", max_size)

    def clear(self) -> int:
        """Close every idle object in the supervisor; returns how many."""
        return self._client._call("pool_call", self.name, "clear")

    def shutdown(self, delay: float = 0.0) -> None:
        self._client._call("pool_call", self.name, "shutdown", check_delay("delay", delay))

    def __len__(self) -> int:
        return self._client._call("pool_call", self.name, "__len__")

    def __str__(self) -> str:
        import json
        return json.dumps(self.stats())

    def __repr__(self) -> str:
        return f"<mppool.SharedPool {self.name!r} at {display(self._client.address)}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach, (display(self._client.address), self._client.authkey.hex(), self.name))

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._leases = {}  # the parent's leases are the parent's


_attached: dict[tuple[int, str, str], Client] = {}


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process's client of the default supervisor (``connect(autostart=True)``), made
    once and shared: tpool and TpooledConnectionPool(client=None) use it."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = connect(autostart=True)
        return _default


def _attach_client(address: str, authkey: str) -> Client:
    """One client per process and supervisor for unpickled pools and proxies, reused."""
    key = (os.getpid(), address, authkey)
    client = _attached.get(key)
    if client is None or client._closed:
        client = _attached[key] = connect(address, authkey)
    return client


def _attach(address: str, authkey: str, name: str) -> SharedPool:
    """Unpickle a shared pool."""
    return _attach_client(address, authkey).pool(name)


# What a proxied attribute is when it is a method (qualified type names, as the supervisor
# sends them): calling it then needs one round trip, not two.
_CALLABLE_TYPES = frozenset(("builtins.method", "builtins.builtin_function_or_method",
                             "builtins.function", "builtins.method-wrapper"))


class ObjectProxy:
    """A ``transfer="proxy"`` object: method calls run in the supervisor, on the real object."""

    __slots__ = ("__weakref__", "_mp_lease", "_mp_pool", "_mp_ref", "_mp_type")
    _callables: dict[str, set[str]] = {}

    def __init__(self, pool: SharedPool, lease: int, ref: int, typename: str) -> None:
        object.__setattr__(self, "_mp_pool", pool)
        object.__setattr__(self, "_mp_lease", lease)
        object.__setattr__(self, "_mp_ref", ref)
        object.__setattr__(self, "_mp_type", typename)

    def _mp_request(self, op: int, name: str, *rest: Any) -> Any:
        if not self._mp_lease and not self._mp_ref:
            raise PoolException("this object was returned to its pool and is no longer "
                                "yours: get() another one")
        reply = self._mp_pool._client.channel().request(
            op, self._mp_pool._id, self._mp_lease, self._mp_ref, name, *rest)
        status = reply[1]
        if status == wire.OK:
            return reply[2]
        if status == wire.REF:
            return ObjectProxy(self._mp_pool, self._mp_lease, reply[2], reply[3])
        if status == wire.ERR:
            raise reply[2]
        raise ServerUnavailable(f"unexpected reply {reply!r}")

    def _mp_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._mp_request(wire.CALL, name, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        known = ObjectProxy._callables.setdefault(self._mp_type, set())
        if name in known:
            return _Method(self, name)
        value = self._mp_request(wire.GETATTR, name)
        if isinstance(value, ObjectProxy) and value._mp_type in _CALLABLE_TYPES:
            value._mp_release()
            known.add(name)
            return _Method(self, name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self._mp_call("__setattr__", name, value)

    def __enter__(self) -> Any:
        return self._mp_call("__enter__")

    def __exit__(self, t: Any, v: Any, tb: Any) -> Any:
        return self._mp_call("__exit__", None, None, None) if t is None else \
            self._mp_call("__exit__", t, v if _picklable(v) else None, None)

    def __iter__(self) -> Iterator[Any]:
        it = self._mp_call("__iter__")
        while True:
            try:
                yield it._mp_call("__next__") if isinstance(it, ObjectProxy) else next(it)
            except StopIteration:
                return

    def __len__(self) -> int:
        return self._mp_call("__len__")

    def __getitem__(self, key: Any) -> Any:
        return self._mp_call("__getitem__", key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._mp_call("__setitem__", key, value)

    def __delitem__(self, key: Any) -> None:
        self._mp_call("__delitem__", key)

    def __contains__(self, key: Any) -> bool:
        return self._mp_call("__contains__", key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._mp_call("__call__", *args, **kwargs)

    def __repr__(self) -> str:
        return f"<mppool proxy of {self._mp_type or 'pooled object'} lease={self._mp_lease}>"

    def _mp_release(self) -> None:
        if self._mp_ref:
            try:
                self._mp_pool._client.channel().post(wire.DROPREF, self._mp_ref)
            except Exception:
                pass
            object.__setattr__(self, "_mp_ref", 0)

    def __del__(self) -> None:
        if getattr(self, "_mp_ref", 0):
            try:
                self._mp_release()
            except Exception:
                pass


class _Method:
    __slots__ = ("_name", "_proxy")

    def __init__(self, proxy: ObjectProxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._proxy._mp_call(self._name, *args, **kwargs)


def _picklable(v: Any) -> bool:
    try:
        pickle.dumps(v)
        return True
    except Exception:
        return False


def connect(address: object = None, authkey: object = None, *, autostart: bool = False,
            timeout: float = 5.0) -> Client:
    """Connect to a supervisor (``MPPOOL_ADDRESS`` or the per-user default if no address).

    With ``autostart=True`` the first caller starts a supervisor that outlives it, and every
    racing or later caller connects to that same one.
    """
    timeout = check_delay("timeout", timeout)
    addr = default_address() if address is None else parse_address(address)
    key: bytes | None
    if autostart:
        from .autostart import ensure_supervisor
        key = ensure_supervisor(addr, authkey, timeout)
    else:
        key = client_authkey(authkey, addr)
        if key is None:
            raise ServerUnavailable(f"no authkey for {display(addr)}: pass authkey=, set "
                                    "MPPOOL_AUTHKEY, or start the supervisor so it writes its key file")
    return Client(addr, key, timeout)
