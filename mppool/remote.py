"""What crosses to a client by value, and what stays in the supervisor behind a proxy."""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray, decimal.Decimal,
            datetime.date, datetime.time, datetime.datetime, datetime.timedelta, uuid.UUID)


def is_plain(value: Any, depth: int = 0) -> bool:
    """Data (sent as a copy) rather than an object with behaviour (kept, and proxied).

    A DB-API cursor is not plain, so ``conn.cursor()`` returns a proxy; rows (tuples of
    scalars, or subclasses of tuple such as psycopg's rows) are plain and travel by value.
    """
    if isinstance(value, _SCALARS):
        return True
    if depth > 4:
        return False
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(is_plain(k, depth + 1) and is_plain(v, depth + 1) for k, v in value.items())
    return isinstance(value, BaseException)


class WithValue:
    """Returned by a method that runs in the supervisor to send back an object *and* a plain
    value in one reply: the object stays there behind a proxy, the value travels by copy (a
    cursor and what its ``execute()`` returned: one round trip, where two would be needed
    otherwise). The caller's proxy call returns ``(proxy, value)``; a value that is not
    plain data arrives as None."""

    __slots__ = ("obj", "value")

    def __init__(self, obj: Any, value: Any) -> None:
        self.obj = obj
        self.value = value


# ------------------------------------------------------------------ exceptions across the boundary
#
# An exception raised by user code in the supervisor (``fun``, a hook, a proxied method) must
# arrive as its own class when the caller can import it, else as RemoteError naming it, and
# always with the supervisor's traceback as text. Pickling the exception itself does not do
# that: a class shipped with dill lives in the supervisor under a name that does not resolve
# there, and stdlib pickle refuses it. So it travels as (module, qualified name, args, state,
# message, traceback) and is rebuilt here by looking the class up by name.


class PackedException:
    """The portable form of an exception; ``unpack()`` rebuilds it in the caller."""

    __slots__ = ("args", "message", "module", "qualname", "state", "traceback", "whole")

    def __init__(self, exc: BaseException) -> None:
        import pickle
        import traceback as tb_mod

        cls = type(exc)
        self.module = cls.__module__
        self.qualname = cls.__qualname__
        self.message = str(exc)
        self.traceback = getattr(exc, "remote_traceback", None) or "".join(
            tb_mod.format_exception(exc))
        try:
            # The exception itself when it pickles: some keep fields outside args and
            # __dict__ (OSError's filename, ImportError's name) that only its reduce knows.
            self.whole: bytes | None = pickle.dumps(exc, protocol=5)
        except Exception:
            self.whole = None
        try:
            self.args = pickle.dumps(exc.args, protocol=5)
        except Exception:
            self.args = pickle.dumps((self.message,), protocol=5)
        state = {k: v for k, v in getattr(exc, "__dict__", {}).items() if k != "remote_traceback"}
        try:
            self.state: bytes | None = pickle.dumps(state, protocol=5) if state else None
        except Exception:
            self.state = None

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.module, self.qualname, self.message, self.traceback, self.args, self.state,
                self.whole)

    def __setstate__(self, st: tuple[Any, ...]) -> None:
        (self.module, self.qualname, self.message, self.traceback, self.args, self.state,
         self.whole) = st

    def unpack(self) -> BaseException:
        from .errors import RemoteError

        exc: BaseException | None = None
        cls = _find_class(self.module, self.qualname)
        if cls is not None and self.whole is not None:
            import pickle

            try:
                whole = pickle.loads(self.whole)
                if type(whole) is cls:
                    exc = whole
            except Exception:
                exc = None
        if cls is not None and exc is None:
            import pickle

            try:
                args = pickle.loads(self.args)
                try:
                    exc = cls(*args)
                except Exception:
                    exc = cls.__new__(cls, *args)
                    exc.args = args
                if self.state:
                    exc.__dict__.update(pickle.loads(self.state))
            except Exception:
                exc = None
        if exc is None:
            name = self.qualname if self.module == "builtins" else f"{self.module}.{self.qualname}"
            exc = RemoteError(f"{name}: {self.message}")
        exc.remote_traceback = self.traceback  # type: ignore[attr-defined]
        return exc


def _find_class(module: str, qualname: str) -> type[BaseException] | None:
    import importlib
    import sys

    try:
        obj: Any = sys.modules.get(module) or importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


class RemoteFailure(Exception):
    """Carries a `PackedException` from the supervisor's control plane to the caller."""

    def __init__(self, packed: PackedException) -> None:
        super().__init__(packed)
        self.packed = packed


def pack_errors(fn: Any) -> Any:
    """Decorate a control-plane method: any exception leaves it packed (`RemoteFailure`)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RemoteFailure:
            raise
        except BaseException as exc:
            raise RemoteFailure(PackedException(exc)) from None

    return wrapper


def control_result(kind: str, result: Any, method: str) -> Any:
    """What a control-plane call returns (the manager's ``(kind, result)`` reply), or raises:
    an exception from the supervisor as its own class, with its traceback."""
    if kind == "#RETURN":
        return result
    if kind == "#ERROR" and isinstance(result, RemoteFailure):
        raise result.packed.unpack() from None
    if kind == "#ERROR" and isinstance(result, BaseException):
        raise result
    from .errors import ServerUnavailable

    raise ServerUnavailable(f"supervisor failed {method}(): {result}")
