"""LeaseMap (object -> leases, for ret(obj)/put(obj)) and the size checks: pure, fast units."""

from __future__ import annotations

import pytest

from mppool.leasemap import LeaseMap
from mppool.validate import check_resize, check_size, check_sizes


def test_one_lease_per_object() -> None:
    m = LeaseMap()
    a, b = object(), object()
    m.add(a, 1)
    m.add(b, 2)
    assert len(m) == 2
    assert m.take(b) == 2 and m.take(b) == 0
    assert m.take(a) == 1 and len(m) == 0


def test_several_leases_of_one_object_come_back_most_recent_first() -> None:
    m = LeaseMap()
    m.add(0, 7)  # one object lent twice: a fun that returns the same small int
    m.add(0, 8)
    m.add(0, 9)
    assert len(m) == 3
    assert [m.take(0), m.take(0), m.take(0), m.take(0)] == [9, 8, 7, 0]
    assert len(m) == 0


def test_unhashable_objects_and_strangers() -> None:
    m = LeaseMap()
    held = [1, 2]  # unhashable: keyed by id
    m.add(held, 5)
    assert m.take([1, 2]) == 0  # equal is not the same object
    assert m.take(held) == 5


def test_discard_forgets_one_given_lease() -> None:
    m = LeaseMap()
    a = object()
    m.add(a, 1)
    m.discard(a, 2)  # not its lease: nothing changes
    assert len(m) == 1
    m.add(a, 2)
    m.add(a, 3)
    m.discard(a, 2)
    assert [m.take(a), m.take(a)] == [3, 1]
    m.add(a, 4)
    m.discard(a, 4)
    assert len(m) == 0
    m.clear()


@pytest.mark.parametrize(("args", "kwargs", "error", "words"), [
    ((1, 0), {}, None, []),  # 0: unbounded, so any min_size
    ((0, 0), {"bounded": True}, ValueError, ["max_size", "0"]),
    ((3, 2), {}, ValueError, ["min_size=3", "max_size=2"]),
    ((-1, 2), {}, ValueError, ["min_size", "-1"]),
    ((1, 2.5), {}, TypeError, ["max_size", "2.5"]),
])
def test_check_sizes(args: tuple[object, object], kwargs: dict[str, bool],
                     error: type[Exception] | None, words: list[str]) -> None:
    if error is None:
        assert check_sizes(*args, **kwargs) == args
        return
    with pytest.raises(error) as info:
        check_sizes(*args, **kwargs)
    assert all(w in str(info.value) for w in words)


def test_check_size_and_resize() -> None:
    assert check_size("new_size", 3, bounded=True) == 3
    with pytest.raises(ValueError, match="new_size"):
        check_size("new_size", 0, bounded=True)
    check_resize(0, 5)  # unbounded: above any min_size
    with pytest.raises(ValueError, match="max_size=1 is below min_size=2"):
        check_resize(1, 2)
