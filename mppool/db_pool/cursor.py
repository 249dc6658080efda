"""``conn.cursor()`` of a TpooledConnectionPool: the cursor is made in the supervisor by its
first execute, in the same round trip, and closing it waits for nothing.

    this process                                  supervisor (where the connection lives)
    cur = conn.cursor()          no message
    cur.execute(sql, params)     ── one call ──▶  c = conn.cursor(); c.execute(sql, params)
                                 ◀── a proxy of c, and what execute() returned
    cur.fetchone(), cur.rowcount ── forwarded ──▶ c (one call each, as any proxied object)
    cur.close()                  ── dropped ───▶  c is forgotten there, which closes it

A query through a plain proxy costs a round trip for ``cursor()``, one for ``execute()``, one
per fetch and one for ``close()``; this one saves two of them, and each costs the supervisor
a message and a thread hand-off. What it changes, and nothing else:

- an error that ``conn.cursor()`` would raise (a connection the server closed) is raised by
  the first ``execute()`` (or the first other use) instead;
- ``close()`` does not wait for the supervisor to close the cursor; any use after it raises
  the driver's ``InterfaceError`` (``ProgrammingError`` for drivers without one), as the
  drivers do for a closed cursor;
- ``with conn.cursor() as cur:`` works whatever the driver (it closes the cursor).

``cursor()`` with positional arguments or ``name=`` (server-side cursors, whose creation
means something to the server) makes the real cursor at once, through the proxy.
"""

from __future__ import annotations

from typing import Any

# The cursor methods whose first call also makes the cursor.
_EXECUTES = ("execute", "executemany", "callproc")


class DeferredCursor:
    """A cursor made in the supervisor by its first ``execute()`` (see the module docstring).
    Every attribute other than the execute methods and ``close()`` is the real cursor's."""

    __slots__ = ("_mp_args", "_mp_closed", "_mp_conn", "_mp_error", "_mp_kwargs", "_mp_real")

    def __init__(self, conn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 closed_error: type[Exception]) -> None:
        object.__setattr__(self, "_mp_conn", conn)  # the connection's proxy
        object.__setattr__(self, "_mp_args", args)
        object.__setattr__(self, "_mp_kwargs", kwargs)
        object.__setattr__(self, "_mp_real", None)  # the real cursor's proxy, once made
        object.__setattr__(self, "_mp_closed", False)
        object.__setattr__(self, "_mp_error", closed_error)

    def _mp_cursor(self) -> Any:
        """The real cursor, made now (one round trip) if no execute has made it."""
        if self._mp_closed:
            raise self._mp_error("the cursor is closed")
        real = self._mp_real
        if real is None:
            real = self._mp_conn.cursor(*self._mp_args, **self._mp_kwargs)
            object.__setattr__(self, "_mp_real", real)
        return real

    def _mp_execute(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._mp_real is not None or self._mp_closed:
            return getattr(self._mp_cursor(), method)(*args, **kwargs)
        real, (kind, value) = self._mp_conn._mppool_execute(self._mp_args, self._mp_kwargs,
                                                           method, args, kwargs)
        object.__setattr__(self, "_mp_real", real)
        if self._mp_closed:
            # Another thread closed this cursor while the execute ran, and found no cursor to
            # drop: drop it now, or the supervisor keeps it open until the connection's
            # return. (close() marks first and looks second, so one of the two drops it.)
            self._mp_drop()
        return self if kind == "self" else value

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._mp_execute("execute", args, kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        return self._mp_execute("executemany", args, kwargs)

    def callproc(self, *args: Any, **kwargs: Any) -> Any:
        return self._mp_execute("callproc", args, kwargs)

    def close(self) -> None:
        """Forget the cursor, here and (without waiting) in the supervisor."""
        object.__setattr__(self, "_mp_closed", True)  # before looking: see _mp_execute
        self._mp_drop()

    def _mp_drop(self) -> None:
        real = self._mp_real
        object.__setattr__(self, "_mp_real", None)
        if real is not None:
            real._mp_release()  # twice at worst (racing threads): a second drop is a no-op

    @property
    def closed(self) -> Any:
        if self._mp_closed:
            return True
        return False if self._mp_real is None else self._mp_real.closed

    def __enter__(self) -> DeferredCursor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Any:
        return iter(self._mp_cursor())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # copy/pickle probes must not reach the supervisor
        return getattr(self._mp_cursor(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._mp_cursor(), name, value)

    def __repr__(self) -> str:
        state = "closed" if self._mp_closed else "made" if self._mp_real is not None else \
            "not made yet"
        return f"<mppool cursor of a shared connection ({state})>"


def deferrable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """May ``conn.cursor(*args, **kwargs)`` wait for the first execute? Not for a named
    (server-side) cursor, nor with positional arguments (psycopg2's first is the name)."""
    return not args and "name" not in kwargs
