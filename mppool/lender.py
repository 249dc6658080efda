"""The ``with pool.obj() as o:`` context manager, for every pool that has get() and put()."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import add_hint


class Lender:
    """``obj(timeout)`` (alias ``item``): get an object for a ``with`` block, always put back."""

    def get(self, timeout: float | None = None) -> Any:
        raise NotImplementedError

    def put(self, obj: Any) -> None:
        raise NotImplementedError

    @contextmanager
    def obj(self, timeout: float | None = None) -> Iterator[Any]:
        """``with pool.obj(timeout) as o:`` gets an object as ``get(timeout)`` does and
        always gives it back at the end of the block, even when the block raises. ``item``
        is another name for it."""
        o = self.get(timeout)
        try:
            yield o
        except BaseException as exc:
            add_hint(exc)
            raise
        finally:
            self.put(o)

    item = obj
