"""What clients call through the control plane: the ``Control`` object, and the
multiprocess manager that serves it.

Every method packs whatever it raises (`mppool.remote.pack_errors`), so that an exception
from user code reaches the caller as its own class, with this process's traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from multiprocess.managers import BaseManager

from ..errors import PoolClosed
from ..remote import pack_errors
from ..validate import check_int
from .console import audit

if TYPE_CHECKING:
    from .core import Supervisor

EXPOSED = ("info", "create", "stats", "pool_call", "execute", "host", "unhost",
           "set_num_threads", "killall", "console")

# The operator's verbs (console.py): (takes a pool name, argument names after it).
VERBS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "pause": (True, ()), "resume": (True, ()), "resize": (True, ("max_size",)),
    "kill_holder": (True, ("pid", "terminate")), "drain": (True, ()),
    "reload": (False, ()), "stop": (False, ()),
}


class Control:
    """What clients call through the SyncManager (one instance, shared by all proxies)."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    @pack_errors
    def info(self) -> dict[str, Any]:
        return self._sup.info()

    @pack_errors
    def create(self, name: str, kind: str, transfer: str,
               blob: bytes | None) -> tuple[int, str, float | None, int]:
        """(pool id, transfer, the pool's default timeout, this supervisor's instance) of a
        pool created or attached."""
        rec = self._sup.create(name, kind, transfer, blob)
        return rec.id, rec.transfer, rec.pool.timeout, self._sup.instance

    @pack_errors
    def stats(self, name: str | None = None) -> dict[str, Any]:
        if name is None:
            return self._sup.stats()
        rec = self._sup.get_record(name)
        s = rec.pool.stats()
        if rec.fast is not None:
            s = rec.fast.overlay(s)
        s.update(name=name, kind=rec.kind, transfer=rec.transfer)
        return s

    @pack_errors
    def pool_call(self, name: str, method: str, *args: Any) -> Any:
        if method not in ("free", "waiting", "resize", "shutdown", "clear", "__len__", "__repr__",
                          "pop_stats", "wait"):
            raise ValueError(f"method must be a pool method, got {method!r}")
        if method == "shutdown":
            self._sup.drop(name, *args)
            return None
        rec = self._sup.get_record(name)
        if rec.fast is not None and method in ("resize", "free", "__len__"):
            return rec.fast.pool_call(method, *args)
        return getattr(rec.pool, method)(*args)

    @pack_errors
    def console(self, verb: str, claimed_pid: int, *args: Any) -> Any:
        """One of the operator's verbs (`VERBS`), audited with its caller."""
        if verb not in VERBS:
            raise ValueError(f"verb must be one of {', '.join(VERBS)}, got {verb!r}")
        takes_name, names = VERBS[verb]
        name = args[0] if takes_name else None
        rest = args[1:] if takes_name else args
        if takes_name and (not isinstance(name, str) or not name):
            raise ValueError(f"{verb}: a pool name is required, got {name!r}")
        audit(verb, name, dict(zip(names, rest, strict=False)), claimed_pid)
        return getattr(self._sup.console, verb)(*args)

    @pack_errors
    def execute(self, blob: bytes) -> Any:
        return self._sup.hosted_objects.execute(blob)

    @pack_errors
    def host(self, blob: bytes) -> int:
        return self._sup.hosted_objects.host(blob)

    @pack_errors
    def unhost(self, hid: int) -> None:
        self._sup.hosted_objects.unhost(hid)

    @pack_errors
    def set_num_threads(self, n: int) -> None:
        self._sup.hosted_objects.set_num_threads(check_int("n", n, minimum=1))

    @pack_errors
    def killall(self) -> None:
        self._sup.hosted_objects.killall()


_control: Control | None = None


def set_control(control: Control | None) -> None:
    global _control
    _control = control


def get_control() -> Control:
    if _control is None:
        raise PoolClosed("supervisor is shutting down")
    return _control


class ControlManager(BaseManager):
    """The manager whose server the supervisor runs: it serves one shared ``Control``."""


ControlManager.register("Control", callable=get_control, exposed=EXPOSED)
