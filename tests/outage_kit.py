"""A real PostgreSQL outage, for the outage tests of every pool family: a private role only
the test's pool uses (so that cutting it off touches nobody else), a timeline the tests
print with ``-s``, and the check that requests fail fast and attempts back off until
``reconnect_failed``."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from helpers import wait_until


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@contextmanager
def admin(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """The test's own connection, outside every pool; each query sees fresh activity."""
    conn = psycopg.connect(dsn, autocommit=True, application_name="mppool-test-admin")
    try:
        conn.execute("set lock_timeout = '10s'")  # a cleanup must never hang on a lock
        yield conn
    finally:
        conn.close()


def role_backends(adm: psycopg.Connection[Any], role: str) -> list[int]:
    return [r[0] for r in adm.execute(
        "select pid from pg_stat_activity where usename = %s", (role,)).fetchall()]


@contextmanager
def private_role(adm: psycopg.Connection[Any]) -> Iterator[str]:
    """A LOGIN role for this test only: always given its connections back, its backends
    ended and the role dropped at the end, whatever happened."""
    role = unique("mppool_outage")
    adm.execute(f'create role "{role}" login')
    try:
        yield role
    finally:
        adm.execute(f'alter role "{role}" connection limit -1')
        adm.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s",
                    (role,))
        wait_until(lambda: not role_backends(adm, role), timeout=10, what="role's backends gone")
        adm.execute(f'drop role if exists "{role}"')


def cut_off(adm: psycopg.Connection[Any], role: str) -> None:
    """The outage: the role may no longer connect, and its backends are killed."""
    adm.execute(f'alter role "{role}" connection limit 0')
    adm.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s",
                (role,))
    wait_until(lambda: not role_backends(adm, role), timeout=10, what="backends gone")


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str]] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, what: str, t: float | None = None) -> float:
        t = self.now() if t is None else t
        self.events.append((t, what))
        return t

    def show(self) -> str:
        return "\n".join(f"  {t:7.3f} s  {what}" for t, what in sorted(self.events))


def fail_fast_until_told(tl: Timeline, request: Callable[[], Any], error: type[BaseException],
                         attempts: list[float], since: int, told: list[float],
                         first_fail: float, reconnect_timeout: float, noun: str,
                         attempt_noun: str) -> list[float]:
    """Make requests until ``reconnect_failed`` is called (``told``): each must fail with
    ``error`` at once, while the pool's attempts (``attempts[since:]``, the outage's: the
    pool appends to ``attempts`` meanwhile) back off (1 s, doubling, 10% jitter) instead of
    running at every request. Returns the outage's attempts."""
    fails: list[float] = []

    def one() -> bool:
        t = tl.now()
        try:
            request()
        except error:
            fails.append(tl.now() - t)
        return bool(told)

    wait_until(one, timeout=reconnect_timeout + 10, interval=0.02, what="reconnect_failed")
    outage = attempts[since:]
    gaps = [b - a for a, b in itertools.pairwise(outage)]
    for t in outage:
        tl.note(f"{attempt_noun} attempt: refused", t)
    tl.note(f"{len(fails)} more {noun}s meanwhile, the slowest failing in "
            f"{max(fails) * 1000:.1f} ms, with {len(outage)} {attempt_noun} attempts in all")
    assert len(fails) >= 20
    assert len(outage) <= 4, outage  # no hot loop: 0, ~1, ~2 s
    assert gaps and all(g >= 0.85 for g in gaps), gaps  # 1 s backoff, 10% jitter
    assert gaps[0] <= 1.3, gaps
    assert told[0] - first_fail == pytest.approx(reconnect_timeout, abs=0.6)
    return outage
