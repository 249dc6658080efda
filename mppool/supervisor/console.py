"""The operator's console: pause, resume, resize, kill, drain, reload and stop, as
control-plane calls (``mppool pause NAME``, ``client.pause(name)``, ...).

Every verb is audited: one INFO line on the ``mppool.audit`` logger naming the verb, the
pool, the arguments and the caller (on a unix socket, the pid the kernel gave for the control
connection; over TCP, the peer address and the pid the client claims). That logger logs at
INFO whatever ``MPPOOL_LOG_LEVEL`` says, so that an operator's action is always on record.

``reload`` re-reads the TOML file the supervisor was started with (``mppool serve --config``;
also on ``SIGHUP``): pools new in the file are created, a changed ``max_size`` is applied with
``resize``, and pools gone from the file (only those the file had declared) are removed: gone
from the registry at once, their leases given ``RELOAD_DRAIN_GRACE`` seconds to come back, on
a thread of their own. A pool whose other options changed is left as it is, and said so.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dill

from ..errors import PoolClosed
from ..holder import REGION_CONN, Holder
from ..validate import check_int
from .registry import fingerprint

if TYPE_CHECKING:
    from .core import Supervisor

log = logging.getLogger("mppool")
audit_log = logging.getLogger("mppool.audit")
audit_log.setLevel(logging.INFO)

RELOAD_DRAIN_GRACE = 30.0  # how long a pool removed by reload waits for its leases

_caller = threading.local()


def set_caller(who: str) -> None:
    """Who is on the control connection this thread serves (set by the acceptor)."""
    _caller.who = who


def caller(claimed_pid: Any = None) -> str:
    """The caller of the current control call, for the audit line."""
    who = getattr(_caller, "who", None)
    if who is None:
        return "in-process" if claimed_pid is None else f"pid {claimed_pid} (claimed)"
    if who.startswith("pid ") or claimed_pid is None:
        return who
    return f"{who}, pid {claimed_pid} (claimed)"


def audit(verb: str, name: str | None, args: dict[str, Any], claimed_pid: Any) -> None:
    where = f" pool {name!r}" if name is not None else ""
    said = "".join(f" {k}={v!r}" for k, v in args.items())
    audit_log.info("mppool: %s%s%s by %s", verb, where, said, caller(claimed_pid))


class Console:
    """The verbs, on a supervisor (``Control`` packs their errors and calls `audit`)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.config: Path | None = None  # set by serve(config=...)
        self.config_pools: set[str] = set()  # pools the config file declared
        self.request_stop: Any = None  # set by serve(): ends its loop
        self._reload_lock = threading.Lock()

    def pause(self, name: str) -> bool:
        rec = self.sup.get_record(name)
        if rec.fast is not None:  # fast leases off: every get queues in the Pool
            return bool(rec.fast.pool_call("pause"))
        return rec.pool.pause()

    def resume(self, name: str) -> bool:
        rec = self.sup.get_record(name)
        if rec.fast is not None:
            return bool(rec.fast.pool_call("resume"))
        return rec.pool.resume()

    def resize(self, name: str, max_size: int) -> None:
        rec = self.sup.get_record(name)
        if rec.fast is not None:
            rec.fast.pool_call("resize", max_size)
        else:
            rec.pool.resize(max_size)

    def drain(self, name: str) -> int:
        return self.sup.get_record(name).pool.drain()

    def kill_holder(self, name: str, pid: int, terminate: bool = False) -> dict[str, Any]:
        """Take back every lease of pool ``name`` held by process ``pid``; with
        ``terminate``, also SIGTERM it (SIGKILL after a grace), if the kernel vouched for
        its pid. Returns ``{"reclaimed": n, "terminated": [pids]}``."""
        pid = check_int("pid", pid, minimum=1)
        if not isinstance(terminate, bool):
            raise TypeError(f"terminate must be a bool, got {terminate!r}")
        rec = self.sup.get_record(name)
        holders: dict[tuple[int, float], Holder] = {}

        def match(h: Holder) -> bool:
            if h.pid != pid or h.conn == REGION_CONN:  # the fast path's parked tokens
                return False
            holders[(h.pid, h.start)] = h
            return True

        n = rec.pool._reclaim(match, reset=rec.reset)
        if rec.fast is not None:
            n += rec.fast.release_pid(pid)
        self.sup.watchdog.nreclaimed += n
        terminated: list[int] = []
        if terminate:
            for conn in list(self.sup.loop.conns.values()):
                h = conn.holder
                if h is not None and h.pid == pid:
                    holders.setdefault((h.pid, h.start), h)
            verified = [h for h in holders.values() if h.verified]
            if not verified:
                why = ("it holds nothing here and has no connection" if not holders
                       else "its pid is only claimed by a TCP client")
                raise PermissionError(f"pool {name!r}: reclaimed {n} lease(s) but did not "
                                      f"terminate pid {pid}: {why}")
            for h in verified:
                self.sup.watchdog.terminate_holder(h, 0.0)
                terminated.append(h.pid)
        log.info("mppool: pool %r: took back %d lease(s) of pid %d", name, n, pid)
        return {"reclaimed": n, "terminated": terminated}

    def stop(self) -> None:
        if self.request_stop is None:
            raise RuntimeError("this supervisor cannot be stopped from the control plane")
        # After this call's reply is sent: the stop closes the control plane.
        threading.Timer(0.05, self.request_stop).start()

    def reload(self) -> dict[str, Any]:
        """Apply the config file again; returns what changed."""
        from ..config import load_config

        if self.config is None:
            raise ValueError("this supervisor was not started with a config file "
                             "(mppool serve --config FILE): nothing to reload")
        with self._reload_lock:
            pools = load_config(self.config)  # ConfigError: nothing changes
            out: dict[str, Any] = {"created": [], "resized": {}, "removed": [], "kept": {}}
            for name, spec in pools.items():
                opts = dict(spec)
                transfer = opts.pop("transfer", "copy")
                kind = opts.pop("kind", "pool")
                kind = kind if kind in ("token", "cluster") else "pool"
                rec = self.sup.registry.records.get(name)
                if rec is None:
                    self.sup.create(name, kind, transfer, dill.dumps(opts))
                    out["created"].append(name)
                    continue
                same_but_size = (
                    rec.kind == kind and rec.transfer == transfer
                    and _without_size(rec.fingerprint) == _without_size(fingerprint(opts)))
                if not same_but_size:
                    out["kept"][name] = "options other than max_size changed: restart to apply"
                    log.warning("mppool: reload: pool %r: options other than max_size changed; "
                                "kept as it is (restart the supervisor to apply them)", name)
                    continue
                new, old = opts.get("max_size", 0), rec.pool.stats()["max_size"]
                if new != old:
                    self.resize(name, new)  # through the fast path's region, if it has one
                    rec.fingerprint = fingerprint(opts)  # clients declaring the file's options attach
                    out["resized"][name] = [old, new]
            for name in sorted(self.config_pools - set(pools)):
                if name in self.sup.registry.records:
                    self.remove(name)
                    out["removed"].append(name)
            self.config_pools = set(pools)
        log.info("mppool: reloaded %s: %s", self.config, out)
        return out

    def remove(self, name: str) -> None:
        """Drop ``name`` from the registry now; let its leases come back, then close it."""
        rec = self.sup.registry.detach(name)
        if rec is None:
            raise PoolClosed(f"pool {name!r} is shutting down or was never created")
        threading.Thread(target=self.sup.registry.shut, args=(rec, RELOAD_DRAIN_GRACE),
                         name=f"mppool-remove-{name[:40]}", daemon=True).start()


def _without_size(fp: Any) -> Any:
    return [kv for kv in fp if kv[0] != "max_size"] if isinstance(fp, list) else fp


def describe_peer(sock_fileno: int) -> str | None:
    """``pid N`` from the kernel for a unix-socket peer, ``tcp HOST:PORT`` otherwise."""
    import socket

    try:
        s = socket.socket(fileno=sock_fileno)
    except OSError:
        return None
    try:
        if s.family == socket.AF_UNIX and hasattr(socket, "SO_PEERCRED"):
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            return f"pid {int.from_bytes(creds[:4], 'little')}"
        host, port = s.getpeername()[:2]
        return f"tcp {host}:{port}"
    except OSError:
        return None
    finally:
        s.detach()

