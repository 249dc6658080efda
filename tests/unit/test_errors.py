"""The exception hierarchy, and every exception pickles to the same class and message."""

from __future__ import annotations

import pickle

import pytest

import mppool
from mppool import ConnectTimeout, PoolClosed, PoolException, ServerUnavailable, TimeOut

ALL = [PoolException, TimeOut, PoolClosed, ServerUnavailable, ConnectTimeout]


def test_hierarchy() -> None:
    assert issubclass(PoolException, Exception)
    for cls in (TimeOut, PoolClosed, ServerUnavailable, ConnectTimeout):
        assert issubclass(cls, PoolException), cls
        assert cls is not PoolException
    # They are distinct: catching one does not catch its siblings.
    assert len(set(ALL)) == 5
    assert not issubclass(TimeOut, PoolClosed) and not issubclass(PoolClosed, TimeOut)


def test_exported_from_package() -> None:
    for cls in ALL:
        assert getattr(mppool, cls.__name__) is cls
        assert cls.__name__ in mppool.__all__


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_round_trip(cls: type[Exception], protocol: int) -> None:
    message = "pool 7 is shutting down: no object within 1.5 s"
    err = cls(message)
    back = pickle.loads(pickle.dumps(err, protocol=protocol))
    assert type(back) is cls
    assert str(back) == str(err) == message
    assert back.args == err.args


@pytest.mark.parametrize("cls", ALL)
def test_dill_round_trip(cls: type[Exception]) -> None:
    dill = pytest.importorskip("dill")
    err = cls("crossing processes, shutting down")
    back = dill.loads(dill.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err)


@pytest.mark.parametrize("cls", ALL)
def test_raised_and_caught_as_pool_exception(cls: type[Exception]) -> None:
    with pytest.raises(PoolException) as info:
        raise cls("boom shutting down")
    assert type(info.value) is cls


def test_pool_closed_message_always_says_shutting_down() -> None:
    assert "shutting down" in str(PoolClosed())
    custom = PoolClosed("pool db closed by the operator")
    assert "shutting down" in str(custom)
    assert "pool db closed by the operator" in str(custom)
    kept = PoolClosed("pool 3 is shutting down")
    assert str(kept) == "pool 3 is shutting down"
    # The augmented message survives a round trip unchanged (not augmented twice).
    back = pickle.loads(pickle.dumps(custom))
    assert type(back) is PoolClosed and str(back) == str(custom)
    assert str(back).count("shutting down") == 1


def test_exceptions_raised_by_a_pool_pickle() -> None:
    pool = mppool.Pool(lambda i: object(), max_size=1, min_size=0)
    held = pool.get()
    try:
        with pytest.raises(TimeOut) as timeout:
            pool.get(timeout=0)
        back = pickle.loads(pickle.dumps(timeout.value))
        assert type(back) is TimeOut and str(back) == str(timeout.value)
    finally:
        pool.ret(held)
        pool.shutdown()
    with pytest.raises(PoolClosed) as closed:
        pool.get()
    back = pickle.loads(pickle.dumps(closed.value))
    assert type(back) is PoolClosed and str(back) == str(closed.value)
    assert "shutting down" in str(back)
