"""What crosses the process boundary (``mppool.remote``): exceptions packed in the supervisor
and rebuilt in the caller, and which values travel by copy.

An exception is packed, pickled (as the lease channel and the control plane do), unpickled
and unpacked, all in this process: that is exactly what the two ends do to it.
"""

from __future__ import annotations

import datetime
import decimal
import pickle
import uuid
from typing import Any

import pytest

import mppool
from mppool.remote import PackedException, RemoteFailure, is_plain, pack_errors


class Importable(Exception):
    """An exception the caller can import (it lives in this test module)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


class TwoArgs(Exception):
    """Its args are not what its constructor takes: rebuilt without calling __init__."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}+{b}")
        self.a, self.b = a, b


class Outer:
    class Nested(ValueError):
        pass


def cross(exc: BaseException) -> BaseException:
    """Raise ``exc`` (so that it has a traceback), pack it, send it, unpack it."""
    try:
        raise exc
    except BaseException as raised:
        packed = PackedException(raised)
    return pickle.loads(pickle.dumps(packed, protocol=5)).unpack()


def test_a_builtin_exception_arrives_as_itself() -> None:
    back = cross(KeyError("missing"))
    assert type(back) is KeyError and back.args == ("missing",)
    back = cross(OSError(2, "No such file"))
    assert type(back) is FileNotFoundError  # OSError picks its subclass from errno, as raised
    assert (back.errno, back.strerror) == (2, "No such file")


def test_an_os_error_keeps_its_file_names() -> None:
    """OSError keeps ``filename`` and ``filename2`` outside ``args`` (and outside
    ``__dict__``), yet they are part of it: its message names the file."""
    exc = OSError(2, "No such file or directory", "/etc/mppool.toml")
    back = cross(exc)
    assert type(back) is FileNotFoundError
    assert back.filename == "/etc/mppool.toml"
    assert str(back) == str(exc) == "[Errno 2] No such file or directory: '/etc/mppool.toml'"
    moved = cross(PermissionError(13, "Permission denied", "/a", None, "/b"))
    assert (moved.filename, moved.filename2) == ("/a", "/b")


def test_an_import_error_keeps_the_module_name() -> None:
    back = cross(ImportError("No module named 'psycopg'", name="psycopg", path="/site"))
    assert type(back) is ImportError
    assert (back.name, back.path) == ("psycopg", "/site")


def test_an_importable_class_arrives_with_its_args_and_attributes() -> None:
    exc = Importable("boom", 42)
    exc.extra = ["later", 1]  # type: ignore[attr-defined]
    back = cross(exc)
    assert type(back) is Importable
    assert back.args == ("boom", 42)
    assert back.code == 42 and back.extra == ["later", 1]  # type: ignore[attr-defined]


def test_a_nested_class_is_found_by_its_qualified_name() -> None:
    back = cross(Outer.Nested("inner"))
    assert type(back) is Outer.Nested and back.args == ("inner",)


def test_a_class_whose_init_takes_other_args_is_rebuilt_anyway() -> None:
    back = cross(TwoArgs("x", "y"))
    assert type(back) is TwoArgs
    assert back.args == ("x+y",) and str(back) == "x+y"
    assert (back.a, back.b) == ("x", "y")  # type: ignore[attr-defined]


def test_an_unimportable_class_arrives_as_remote_error_naming_it() -> None:
    class Local(Exception):
        pass

    back = cross(Local("not here"))
    assert type(back) is mppool.RemoteError
    assert isinstance(back, mppool.PoolException)
    assert str(back) == (f"{__name__}.test_an_unimportable_class_arrives_as_remote_error_naming_it"
                         ".<locals>.Local: not here")


def test_a_class_from_a_module_the_caller_lacks_is_a_remote_error() -> None:
    exc = Importable("x", 1)
    packed = PackedException(exc)
    packed.module = "mppool_no_such_module_here"
    back = pickle.loads(pickle.dumps(packed)).unpack()
    assert type(back) is mppool.RemoteError
    assert str(back) == "mppool_no_such_module_here.Importable: ('x', 1)"


def test_a_name_that_is_not_an_exception_class_is_a_remote_error() -> None:
    packed = PackedException(ValueError("v"))
    packed.module, packed.qualname = "builtins", "len"
    back = packed.unpack()
    assert type(back) is mppool.RemoteError and str(back) == "len: v"


def test_the_remote_traceback_is_always_set() -> None:
    class Local(Exception):
        pass

    for exc in (KeyError("k"), Importable("m", 1), Local("l")):
        back = cross(exc)
        tb = back.remote_traceback  # type: ignore[attr-defined]
        assert "Traceback (most recent call last)" in tb
        assert "in cross" in tb and "raise exc" in tb
        assert type(exc).__name__ in tb


def test_a_traceback_from_further_away_is_kept() -> None:
    """An exception that already came from elsewhere keeps the traceback of its origin."""
    first = cross(Importable("deep", 7))
    again = cross(first)
    assert again.remote_traceback == first.remote_traceback  # type: ignore[attr-defined]


def test_unpicklable_args_degrade_to_the_message() -> None:
    def unpicklable() -> None:
        pass

    back = cross(ValueError("bad value", unpicklable))
    assert type(back) is ValueError
    assert back.args == (str(ValueError("bad value", unpicklable)),)


def test_unpicklable_attributes_are_dropped_not_fatal() -> None:
    exc = Importable("keep me", 3)
    exc.callback = lambda: None  # type: ignore[attr-defined]
    back = cross(exc)
    assert type(back) is Importable and back.args == ("keep me", 3)
    assert not hasattr(back, "callback")


def test_a_base_exception_crosses_too() -> None:
    back = cross(KeyboardInterrupt())
    assert type(back) is KeyboardInterrupt


def test_pack_errors_packs_every_exception_once() -> None:
    @pack_errors
    def fails(kind: type[BaseException]) -> None:
        raise kind("from the supervisor")

    @pack_errors
    def works(x: int) -> int:
        return x + 1

    assert works(1) == 2
    assert works.__name__ == "works"
    with pytest.raises(RemoteFailure) as info:
        fails(LookupError)
    failure = pickle.loads(pickle.dumps(info.value))  # as the control plane sends it
    back = failure.packed.unpack()
    assert type(back) is LookupError and back.args == ("from the supervisor",)

    @pack_errors
    def passes_on() -> None:
        fails(KeyError)

    with pytest.raises(RemoteFailure) as info:
        passes_on()
    assert type(info.value.packed.unpack()) is KeyError  # not packed twice


@pytest.mark.parametrize("value", [
    None, True, 3, 2.5, 1j, "s", b"b", bytearray(b"ba"), decimal.Decimal("1.5"),
    datetime.date(2024, 1, 2), datetime.datetime(2024, 1, 2, 3, 4), datetime.time(1, 2),
    datetime.timedelta(seconds=3), uuid.UUID(int=5), (1, "a"), [1, [2, (3,)]], {1, 2},
    frozenset({"a"}), {"k": [1, 2], 3: None}, ValueError("an exception is data"),
])
def test_plain_values_travel_by_copy(value: Any) -> None:
    assert is_plain(value)


@pytest.mark.parametrize("value", [
    object(), len, lambda: None, [object()], {"k": object()}, {(1, object()): 1}, iter([1]),
    [[[[[[1]]]]]],  # deeper than five levels: not worth walking
])
def test_objects_with_behaviour_stay_behind_a_proxy(value: Any) -> None:
    assert not is_plain(value)


def test_a_tuple_subclass_row_is_plain() -> None:
    from collections import namedtuple

    Row = namedtuple("Row", "a b")
    assert is_plain(Row(1, "x"))
