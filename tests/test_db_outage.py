"""A real PostgreSQL outage, seen through db_pool pools with ``check=db_pool.ping``.

The test makes a private role (LOGIN) that only its pool uses, so it can cut that role off
without touching anybody else: every pooled backend is terminated (``pg_terminate_backend``)
and the role's ``CONNECTION LIMIT`` set to 0. Then:

- the dead idle connections are pinged and closed, never handed out (``connections_lost``);
- a get fails fast with the server's own error (``too many connections for role``);
- further attempts back off (1 s, then doubling) instead of connecting at every get: the
  attempt times are recorded by a ``create()`` override (eventlet's subclassing hook);
- ``reconnect_failed`` is called once, ``reconnect_timeout`` after the outage began;
- once the limit is lifted, the pool refills ``min_size`` by itself and serves again.

The role is always given back its connections and dropped at the end. Run with ``-s`` to
see the timeline it prints.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from helpers import wait_until
from outage_kit import (
    Timeline,
    admin,
    cut_off,
    fail_fast_until_told,
    private_role,
    role_backends,
    unique,
)
from psycopg.conninfo import make_conninfo

from mppool import db_pool
from mppool.db_pool import RawConnectionPool, TpooledConnectionPool

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

RECONNECT_TIMEOUT = 2.0


def test_outage_fails_fast_backs_off_tells_once_and_recovers(postgres_dsn: str) -> None:
    tl = Timeline()
    attempts: list[float] = []  # when each connect was tried (test clock)
    told: list[float] = []

    class Timed(RawConnectionPool):
        def create(self) -> Any:
            attempts.append(tl.now())
            return super().create()

    def reconnect_failed(pool: Any) -> None:
        told.append(tl.note("reconnect_failed(pool) called"))

    app = unique("mppool")
    with admin(postgres_dsn) as adm, private_role(adm) as role:
        pool = Timed(psycopg, min_size=2, max_size=3, max_idle=600, max_age=600,
                     connect_timeout=5, check=db_pool.ping, reconnect_timeout=RECONNECT_TIMEOUT,
                     reconnect_failed=reconnect_failed,
                     conninfo=make_conninfo(postgres_dsn, user=role), application_name=app)
        try:
            pool.wait(timeout=10)
            with pool.item(timeout=5) as conn:
                assert conn.execute("select current_user").fetchone() == (role,)
            tl.note(f"pool up: {len(role_backends(adm, role))} connections as role {role}")

            cut_off(adm, role)
            start = tl.note("outage: CONNECTION LIMIT 0, every pooled backend terminated")
            before = len(attempts)

            with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
                pool.get(timeout=10)
            first_fail = tl.note("get #1 raised OperationalError (too many connections for role)")
            assert first_fail - start < 5.0, "the first get did not fail fast"
            s = pool.stats()
            # Both dead connections failed their ping and were closed: none was handed out.
            assert s["connections_lost"] == 2, s
            tl.note(f"check=ping discarded {s['connections_lost']} dead idle connections")

            # Gets keep failing fast while the pool backs off, until reconnect_failed.
            outage_attempts = fail_fast_until_told(
                tl, lambda: pool.get(timeout=10), psycopg.OperationalError, attempts, before,
                told, first_fail, RECONNECT_TIMEOUT, "get", "connect")

            # The limit is lifted: nobody calls anything, the pool comes back by itself.
            adm.execute(f'alter role "{role}" connection limit -1')
            lifted = tl.note("CONNECTION LIMIT -1")
            wait_until(lambda: len(role_backends(adm, role)) == 2, timeout=30,
                       what="min_size refilled by the pool itself")
            back = tl.note("service resumed: 2 connections open again (min_size refilled)")
            assert back - lifted < 10.0  # the next backoff step (4 s, ±10%) after give-up
            for t in attempts[before + len(outage_attempts):]:
                tl.note("connect attempt", t)
            with pool.item(timeout=5) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
            tl.note("get served")
            assert len(told) == 1
            popped = pool.pop_stats()
            tl.note(f"pop_stats: {popped}")
            assert popped["connections_lost"] == 2 and popped["connections_errors"] >= 2
        finally:
            pool.shutdown()
            print(f"\noutage timeline (seconds from the test's start), attempts at "
                  f"{[round(a, 2) for a in attempts]}:\n{tl.show()}")


def test_tpooled_check_ping_replaces_a_terminated_connection(postgres_dsn: str,
                                                             client: Any) -> None:
    app = unique("mppool")
    pool = TpooledConnectionPool(psycopg, max_size=1, client=client, check=db_pool.ping,
                                 conninfo=postgres_dsn, application_name=app)
    try:
        with admin(postgres_dsn) as adm:
            with pool.item(timeout=10) as conn:
                pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            adm.execute("select pg_terminate_backend(%s)", (pid,))
            wait_until(lambda: not adm.execute("select 1 from pg_stat_activity where pid = %s",
                                               (pid,)).fetchone(), timeout=10)
            # The ping runs in the supervisor: the dead connection never reaches us.
            with pool.item(timeout=10) as conn:
                new_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            assert new_pid != pid
            assert pool.stats()["connections_lost"] == 1
    finally:
        pool.shutdown()
