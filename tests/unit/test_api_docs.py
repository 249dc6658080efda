"""The public face of the API: what ``help()`` and the reference show is the API and only the
API, and every part of it says what it does."""

from __future__ import annotations

import inspect
import pydoc

import pytest

import mppool
import mppool.aio
from mppool.clock import FakeClock

PUBLIC = [mppool.Pool, mppool.Client, mppool.SharedPool, mppool.Server, mppool.aio.AsyncClient,
          mppool.aio.AsyncSharedPool]
INTERNAL_PARAMETERS = ("clock", "scheduler", "runner")
# The lease-level methods the supervisor and the thin pools call: not the API.
LEASE_API = ("checkout", "acquire", "cancel", "abandon", "hand_out", "create_for",
             "release_slot", "lent", "checkin", "reclaim", "drop_waiters")


def _own_doc(cls: type, name: str) -> str | None:
    for klass in cls.__mro__:
        if name in vars(klass):
            attr = vars(klass)[name]
            func = getattr(attr, "fget", None) or getattr(attr, "__func__", None) or attr
            return getattr(func, "__doc__", None)
    return None


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_every_public_method_and_property_has_a_docstring(cls: type) -> None:
    public = [n for n in dir(cls) if not n.startswith("_")
              and (callable(getattr(cls, n)) or isinstance(inspect.getattr_static(cls, n),
                                                             property))]
    assert public, cls
    assert not [n for n in public if not (_own_doc(cls, n) or "").strip()]
    assert (cls.__doc__ or "").strip()


def test_pool_signature_and_help_show_no_internals() -> None:
    params = inspect.signature(mppool.Pool).parameters
    assert not set(INTERNAL_PARAMETERS) & set(params)
    text = pydoc.render_doc(mppool.Pool, renderer=pydoc.plaintext)
    for name in INTERNAL_PARAMETERS:
        assert f"{name}=" not in text and f"{name}:" not in text
    for name in LEASE_API:
        assert f" {name}(" not in text, name
        assert not hasattr(mppool.Pool, name), name


def test_the_pool_docstring_describes_every_parameter() -> None:
    doc = mppool.Pool.__doc__ or ""
    missing = [p for p in inspect.signature(mppool.Pool).parameters if f"``{p}``" not in doc]
    assert not missing
    # And the lifecycle and pre-ping options of the contract, whatever this version accepts.
    for name in ("check", "check_after", "max_waiting", "reconnect_timeout", "reconnect_failed",
                 "open", "burst_limit", "name"):
        assert f"``{name}``" in doc, name


def test_internals_are_given_through_the_factory_only() -> None:
    clock = FakeClock()
    pool = mppool.Pool._made_with(lambda i: i, max_size=1, min_size=0, clock=clock)
    try:
        assert pool._clock is clock
        assert "_internals" not in vars(pool)
    finally:
        pool.shutdown()
    with pytest.raises(TypeError, match="clock"):
        mppool.Pool(lambda i: i, clock=clock)  # type: ignore[call-arg]
