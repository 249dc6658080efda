"""The client side, in a worker process: ``connect()``, ``Client``, hosted objects, and
attaching again where a pickled pool or proxy is unpickled.

    this process                                    supervisor
    Client ─ ControlConnection (one per thread) ──▶ Control: create, stats, pool calls (dill)
           └ Channel (one per process) ──────────▶ lease loop: get, put, proxied calls
    SharedPool (mppool.shared_pool) leases through its client's Channel; made by
    Client.pool() / token_pool(), unpickled by _attach() (a client per process and address)

The lease channel *is* this process's identity at the supervisor: its leases and waiters are
tied to it, and when it closes they are reclaimed. Leases are tracked per client and pool
name, not per ``SharedPool`` object, so a pool object dropped while it lends something does
not lose the lease: any ``client.pool(name)`` takes the object back.

Restarts: when the supervisor dies, calls fail at once with `ServerUnavailable`. The next
call reconnects (starting a supervisor first when the client was made with ``autostart``),
and every shared pool re-creates its pool there from the options it was created with. Leases
of the dead supervisor are void: returning one is ignored.

After a bare ``os.fork()`` (gunicorn) the child must not touch the parent's sockets: an
``os.register_at_fork`` hook drops them in the child, which opens its own on first use.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import defaultdict
from types import TracebackType
from typing import Any

import dill

from .address import Address, client_authkey, default_address, display, parse_address
from .channel import Channel
from .control import ControlConnection
from .errors import ServerUnavailable, TimeOut
from .launch import no_key
from .leasemap import LeaseMap
from .options import POOL_OPTIONS, SCOPES, cluster_token_options, token_pool_options
from .proxy import ObjectProxy
from .shared_pool import GRACE as GRACE  # the `X as X` names: re-exported (aio, fastpath)
from .shared_pool import PoolWhere as PoolWhere
from .shared_pool import SharedPool
from .shared_pool import check_timeout_arg as check_timeout_arg
from .shared_pool import granted as granted
from .validate import check_delay, check_int

_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class _DefaultSize(int):
    """``max_size`` left at its default (4): attach to an existing token pool of any size."""


_DEFAULT_TOKENS = _DefaultSize(4)


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Client:
    """A connection to a supervisor. Use ``mppool.connect()`` to make one."""

    def __init__(self, address: Address, authkey: bytes, timeout: float,
                 autostart: bool = False) -> None:
        self.address = address
        self.authkey = authkey
        self._timeout = timeout
        self._autostart = autostart
        self._lock = threading.Lock()
        self._control = ControlConnection(address, authkey, timeout)
        self._chan: Channel | None = None
        # Weak: pools point to their client, and a cycle would leave a dropped client to
        # the cyclic GC, which may finalize its socket before Client.__del__ closes it.
        self._pools: weakref.WeakValueDictionary[str, SharedPool] = weakref.WeakValueDictionary()
        # pool name -> obj -> (lease, channel, pool id): what this process holds.
        self._held: defaultdict[str, LeaseMap] = defaultdict(LeaseMap)
        self._closed = False
        self._pid = os.getpid()
        self._info: dict[str, Any] = self._control.call("info")  # fail now, not at first use
        _clients.add(self)

    # --------------------------------------------------------------- connections

    def _call(self, method: str, *args: Any, timeout: float | None = -1.0,
              start: bool = True) -> Any:
        """A control-plane call, after every put this process sent has taken effect.
        ``start=False``: never start a supervisor for it (a finalizer's call at exit)."""
        if self._closed:
            raise ServerUnavailable("client is closed")
        chan = self._chan
        if chan is not None and chan.unsynced and not chan.broken:
            try:
                chan.sync(time.monotonic() + self._timeout)
            except (ServerUnavailable, TimeOut):
                pass  # the control call below says what is wrong
        try:
            return self._control.call(method, *args, timeout=timeout)
        except ServerUnavailable:
            if not (self._autostart and start):
                raise
        from .autostart import ensure_supervisor

        ensure_supervisor(self.address, self.authkey, self._timeout)
        return self._control.call(method, *args, timeout=timeout)

    def _channel(self) -> Channel:
        """This process's lease channel; a new one once the old one broke (a restart)."""
        chan = self._chan
        if chan is not None and not chan.broken:
            return chan
        with self._lock:
            if self._closed:
                raise ServerUnavailable("client is closed")
            if self._chan is None or self._chan.broken:
                self._info = self._call("info")
                self._chan = Channel(self._info["lease_address"], self.authkey, self._timeout)
            return self._chan

    def _forked(self) -> None:
        """In a child of a bare fork: forget the parent's sockets, never close them."""
        self._chan = None
        self._control.forget()
        self._lock = threading.Lock()
        self._held = defaultdict(LeaseMap)
        self._pid = os.getpid()

    # --------------------------------------------------------------- public API

    def pool(self, name: str, fun: Any = None, *, transfer: str = "copy",
             **options: Any) -> SharedPool:
        """The shared pool ``name``, created on first use with ``fun`` and ``mppool.Pool`` options."""
        unknown = sorted(set(options) - POOL_OPTIONS)
        if unknown:
            raise TypeError(f"unknown pool option(s) {', '.join(unknown)} for pool {name!r}")
        if fun is not None:
            options["fun"] = fun
        if options and "fun" not in options:
            raise TypeError(f"fun must be given to create pool {name!r}, got options only")
        blob = dill.dumps(options, recurse=True) if options else None
        return self._attach(name, "pool", transfer, blob)

    def token_pool(self, name: str, max_size: int = _DEFAULT_TOKENS,
                   scope: str = "host", *, fast: bool | None = None) -> SharedPool:
        """The shared token pool ``name``: at most ``max_size`` tokens out at once.

        Without ``max_size`` an existing token pool is attached whatever its size (a new one
        gets 4); with it, an existing pool of another size raises ValueError.
        ``scope="cluster"``: one pool for every supervisor started with the same cluster
        (see docs/cluster.md); its ``max_size`` must be the cluster's.

        ``fast`` (default True, or False when the environment says ``MPPOOL_FAST=0``): lease
        tokens of a host pool in shared memory where it can, without a message to the
        supervisor (`mppool.fastpath`); elsewhere (TCP, not Linux, no C module) the normal
        path is used.
        """
        check_int("max_size", max_size, minimum=1)
        if fast is not None and not isinstance(fast, bool):
            raise TypeError(f"fast must be a bool or None, got {fast!r}")
        if scope == "cluster":
            if fast:
                raise ValueError("fast=True is for host token pools: a cluster pool's "
                                 "leases are decided in Redis (scope=\"cluster\")")
            return self._cluster_token_pool(name, max_size)
        if scope != "host":
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if fast is None:
            fast = fast_default()
        cls = FAST_TOKEN_POOL[0] if fast and FAST_TOKEN_POOL else SharedPool
        if max_size is _DEFAULT_TOKENS:
            try:
                return self._attach(name, "token", "copy", None, cls)
            except ValueError:
                pass  # no such pool yet: create it with the default size
        blob = dill.dumps(token_pool_options(max_size))
        return self._attach(name, "token", "copy", blob, cls)

    def _cluster_token_pool(self, name: str, max_size: int) -> SharedPool:
        if max_size is _DEFAULT_TOKENS:
            try:
                return self._attach(name, "cluster", "copy", None)
            except ValueError:
                pass
        return self._attach(name, "cluster", "copy", dill.dumps(cluster_token_options(max_size)))

    def _attach(self, name: str, kind: str, transfer: str, blob: bytes | None,
                cls: type[SharedPool] | None = None) -> SharedPool:
        pool_id, transfer, timeout, instance = self._call("create", name, kind, transfer, blob)
        with self._lock:
            known = self._pools.get(name)
            if known is not None and known.transfer == transfer \
                    and (cls is None or type(known) is cls):
                known._learn(instance, pool_id, timeout, kind, blob)
                return known
            pool = (cls or SharedPool)(self, name, (instance, pool_id), transfer, timeout, kind,
                                       blob)
            self._pools[name] = pool
            return pool

    def stats(self) -> dict[str, Any]:
        """Every pool's stats, by name."""
        return self._call("stats")

    def info(self) -> dict[str, Any]:
        """The supervisor's pid, addresses, connection count and reclaimed leases."""
        return self._call("info")

    # ------------------------------------------------ the operator's console (audited)

    def _console(self, verb: str, *args: Any) -> Any:
        return self._call("console", verb, os.getpid(), *args)

    def pause(self, name: str) -> bool:
        """Pause pool ``name``: every new ``get()`` waits (FIFO, within its timeout) as if
        the pool were empty; leases out continue and are returned as usual. False if it was
        paused already."""
        return bool(self._console("pause", name))

    def resume(self, name: str) -> bool:
        """Resume a paused pool: the waiting gets are served, oldest first. False if it was
        not paused."""
        return bool(self._console("resume", name))

    def resize(self, name: str, max_size: int) -> None:
        """Change pool ``name``'s ``max_size``: extra idle objects are closed, new room goes
        to the waiting gets at once."""
        self._console("resize", name, max_size)

    def kill_holder(self, name: str, pid: int, terminate: bool = False) -> dict[str, Any]:
        """Take back every lease of pool ``name`` held by process ``pid`` (reset and reused
        as when a holder dies). With ``terminate=True`` also send it SIGTERM (SIGKILL 2 s
        later if it is still running), but only if the supervisor got its pid from the
        kernel (a unix-socket client on its host): ``PermissionError`` otherwise, after the
        leases are taken back. Returns ``{"reclaimed": n, "terminated": [pid, ...]}``."""
        return dict(self._console("kill_holder", name, pid, terminate))

    def drain(self, name: str) -> int:
        """Replace every idle object of pool ``name`` (after a credential rotation, say):
        close them now (``closer`` runs) and refill ``min_size`` at once. Objects in use are
        not touched. Returns how many were closed."""
        return int(self._console("drain", name))

    def reload(self) -> dict[str, Any]:
        """Re-read the config file the supervisor was started with (``mppool serve
        --config``): new pools are created, changed ``max_size`` applied, pools removed from
        the file shut down. Returns ``{"created": [...], "resized": {name: [old, new]},
        "removed": [...], "kept": {name: why}}``; a bad file raises and changes nothing."""
        return dict(self._console("reload"))

    def stop(self) -> None:
        """Stop the supervisor gracefully, as SIGTERM does (every pool's closer runs)."""
        self._console("stop")

    def execute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the supervisor (``fn`` travels with dill) and return
        its result; its exception propagates, as its own class when importable here."""
        return self._call("execute", dill.dumps((fn, args, kwargs), recurse=True), timeout=None)

    def host(self, obj: Any) -> HostedProxy:
        """Keep ``obj`` (shipped with dill) in the supervisor and return a proxy to it that
        every process may call; it pickles, and reconnects wherever it is unpickled.
        Hosted objects live until ``unhost_all()`` (nothing counts proxies across processes).

        This is what ``mppool.tpool`` did before it became eventlet's in-process thread pool.
        """
        return HostedProxy(obj, self)

    def set_num_threads(self, n: int) -> None:
        """How many threads the supervisor may run ``execute`` and hosted calls on."""
        self._call("set_num_threads", check_int("n", n, minimum=1))

    def unhost_all(self) -> None:
        """Forget every object hosted in the supervisor; their proxies fail from now on."""
        self._call("killall")

    def close(self) -> None:
        """Close this client; leases it still holds go back to their pools."""
        self._closed = True
        chan, self._chan = self._chan, None
        if chan is not None:
            chan.close()
        self._control.close()

    def __enter__(self) -> Client:
        return self

    def __del__(self) -> None:
        # A forgotten client still gives its leases back (the supervisor sees the close).
        if getattr(self, "_pid", 0) == os.getpid():
            try:
                self.close()
            except Exception:
                pass

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mppool.Client {display(self.address)}>"

    def _pool_reducer(self, name: str) -> tuple[Any, ...]:
        """How a shared pool of this client pickles (``SharedPool.__reduce__``): as
        (address, key, name), attached again wherever it is unpickled (`_attach`). Here and
        not in mppool.shared_pool, which cannot import the client that makes its pools."""
        return (_attach, (display(self.address), self.authkey.hex(), name))


# The fast path's pool class, registered by mppool.fastpath when the package is imported
# (it subclasses SharedPool, so this module cannot import it without an import circle).
FAST_TOKEN_POOL: list[type[SharedPool]] = []


def fast_default() -> bool:
    """Whether token pools take the fast path when ``fast`` is not given: yes, unless the
    environment says ``MPPOOL_FAST=0`` (or false/no/off)."""
    return os.environ.get("MPPOOL_FAST", "").strip().lower() not in ("0", "false", "no", "off")


class _Hosted:
    """What an ObjectProxy needs to reach an object of client.host() (pool id 0)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _mp_route(self) -> tuple[Channel, int]:
        return self._client._channel(), 0


class HostedProxy(ObjectProxy):
    """A proxy to an object kept in the supervisor by ``client.host(obj)``."""

    __slots__ = ()

    def __init__(self, obj: Any, client: Client, hid: int = 0) -> None:
        hid = hid or client._call("host", dill.dumps(obj, recurse=True))
        super().__init__(_Hosted(client), hid, 0, f"hosted {hid}")

    def __reduce__(self) -> tuple[Any, ...]:
        client = self._mp_pool._client
        return (_rebuild_hosted, (type(self), display(client.address), client.authkey.hex(),
                                  self._mp_lease))


def _rebuild_hosted(cls: type[HostedProxy], address: str, authkey: str, hid: int) -> HostedProxy:
    proxy = cls.__new__(cls)
    HostedProxy.__init__(proxy, None, _attach_client(address, authkey), hid)
    return proxy


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


def connect(address: object = None, authkey: object = None, *, autostart: bool = False,
            timeout: float = 5.0) -> Client:
    """Connect to a supervisor (``MPPOOL_ADDRESS`` or the per-user default if no address).

    With ``autostart=True`` the first caller starts a supervisor that outlives it, and every
    racing or later caller connects to that same one.
    """
    addr, timeout = connect_target(address, timeout)
    if autostart:
        from .autostart import ensure_supervisor
        key = ensure_supervisor(addr, authkey, timeout)
    else:
        key = known_key(addr, authkey)
    return Client(addr, key, timeout, autostart=autostart)


def connect_target(address: object, timeout: float) -> tuple[Address, float]:
    """The address and timeout of a connect() (the sync and the async one), checked."""
    timeout = check_delay("timeout", timeout)
    if math.isinf(timeout):
        raise ValueError(f"timeout must be a finite number of seconds, got {timeout!r}")
    return (default_address() if address is None else parse_address(address)), timeout


def known_key(addr: Address, authkey: object) -> bytes:
    """The key to reach ``addr`` with (given, in MPPOOL_AUTHKEY, or the key file)."""
    key = client_authkey(authkey, addr)
    if key is None:
        raise no_key(addr)
    return key
