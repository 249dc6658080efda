"""The real services the integration tests rely on answer (see conftest.py)."""

from __future__ import annotations

import pytest


@pytest.mark.postgres
def test_postgres_select_1(postgres_dsn: str) -> None:
    import psycopg

    with psycopg.connect(postgres_dsn, application_name="mppool-test", connect_timeout=2) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("show application_name").fetchone() == ("mppool-test",)


@pytest.mark.redis
def test_redis_ping(redis_url: str) -> None:
    import redis

    with redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2) as client:
        assert client.ping() is True
