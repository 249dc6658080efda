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
