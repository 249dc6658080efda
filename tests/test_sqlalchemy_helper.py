"""mppool.sqlalchemy: the three-line recipe of docs/sqlalchemy.md, against real servers."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy

import mppool.sqlalchemy

pytestmark = [pytest.mark.usefixtures("reap")]


def _hammer(engine: sqlalchemy.Engine, peak: list[int], budget) -> None:
    def work() -> None:
        for _ in range(10):
            with engine.begin() as conn:
                assert conn.execute(sqlalchemy.text("select 1")).scalar() == 1
                peak.append(budget.stats()["nusing"])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.postgres
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2", None])
def test_postgres_under_a_budget(postgres_dsn, client, driver) -> None:
    budget = client.token_pool(f"pg-{driver or 'bare'}", 2)
    url = sqlalchemy.make_url(postgres_dsn)
    if driver is not None:  # None: the bare postgresql:// URL, as MPPOOL_PG_DSN spells it
        url = url.set(drivername=f"postgresql+{driver}")
    engine = mppool.sqlalchemy.create_engine(url, budget=budget, max_size=4)
    peak: list[int] = []
    _hammer(engine, peak, budget)
    assert 1 <= max(peak) <= 2
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("select current_database()")).scalar() == url.database
    mppool.sqlalchemy.pool_of(engine).shutdown()
    assert budget.free() == 2  # every token back once the connections are closed


def test_sqlite_under_a_budget(client, tmp_path) -> None:
    budget = client.token_pool("sqlite", 1)
    engine = mppool.sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'app.db'}", budget=budget)
    peak: list[int] = []
    _hammer(engine, peak, budget)
    assert max(peak) == 1
    mppool.sqlalchemy.pool_of(engine).shutdown()
    assert budget.free() == 1


def test_unsupported_url_says_what_to_do(client) -> None:
    with pytest.raises(ValueError, match="engine_on"):
        mppool.sqlalchemy.create_engine("mysql+pymysql://x@localhost/db",
                                        budget=client.token_pool("b", 1))
