"""ASGI end to end: gunicorn with 4 uvicorn workers, each with its own
``mppool.aio.ConnectionPool`` of psycopg ``AsyncConnection``s under one budget of 2."""

from __future__ import annotations

import http.client
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import free_port, http_get, wait_until
from test_gunicorn import _stop_gunicorn

import mppool

pytestmark = [pytest.mark.gunicorn, pytest.mark.postgres, pytest.mark.slow, pytest.mark.kill]

APP_DIR = Path(__file__).parent / "asgi_app"
BUDGET = 2


_CLIENT_CLOSED = {b"04", b"05", b"06", b"07", b"0B"}  # FIN_WAIT1/2, TIME_WAIT, CLOSE, CLOSING


def _closed_client_ports(server_port: int) -> set[int]:
    """Local ports of TCP connections to ``server_port`` that their client end has closed
    (and that no open connection reuses)."""
    entry = re.compile(rb"^ *\d+: [0-9A-F]+:([0-9A-F]{4}) [0-9A-F]+:%04X (\w\w) " % server_port, re.M)
    closed: set[int] = set()
    open_: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, "rb") as f:
                text = f.read()
        except OSError:
            continue
        for m in entry.finditer(text):
            (closed if m[2] in _CLIENT_CLOSED else open_).add(int(m[1], 16))
    return closed - open_


def _request_ok(port: int) -> bool:
    try:
        return http_get(port, 20)[0] == 200
    except OSError:
        time.sleep(0.05)  # gunicorn still binding its port
        return False


@pytest.mark.timeout(60)
def test_uvicorn_workers_share_a_budget_of_two(postgres_dsn):
    assert importlib.util.find_spec("uvicorn_worker"), "uvicorn-worker is a test dependency"
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    assert gunicorn, "gunicorn is a test dependency"
    port = free_port()
    app_name = f"mppool-asgi-{uuid.uuid4().hex[:8]}"
    address = os.path.join(tempfile.mkdtemp(prefix="mpa"), "s.sock")
    env = dict(os.environ, APP_DSN=postgres_dsn, APP_NAME=app_name, APP_BUDGET=str(BUDGET),
               MPPOOL_ADDRESS=address, PYTHONPATH=os.pathsep.join([str(APP_DIR), *sys.path]))
    env.pop("MPPOOL_AUTHKEY", None)
    with tempfile.TemporaryFile() as log:
        _run(gunicorn, port, env, log, postgres_dsn, app_name, address)
    assert not os.path.exists(address)


def _run(gunicorn: str, port: int, env: dict[str, str], log: Any, postgres_dsn: str, app_name: str,
         address: str) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    proc = subprocess.Popen([gunicorn, "-c", str(APP_DIR / "gunicorn.conf.py"),
                             "-b", f"127.0.0.1:{port}", "app:app"],
                            cwd=APP_DIR, env=env, stdout=subprocess.DEVNULL, stderr=log)
    arbiter = psutil.Process(proc.pid)
    try:
        try:
            wait_until(lambda: _request_ok(port), timeout=20, what="gunicorn+uvicorn serving")
        except BaseException:
            log.seek(0)
            print(log.read().decode(errors="replace")[-4000:])
            raise
        client = mppool.connect(address)  # the key file the supervisor wrote
        sup_pid = client.info()["pid"]
        budget = client.token_pool("pg")
        workers = wait_until(lambda: len(arbiter.children()) >= 5 and arbiter.children(),
                             timeout=20, what="4 workers and the supervisor")
        assert sup_pid in {p.pid for p in workers}  # the arbiter's child, started before forks

        # Each sample: the app's backends as (pid, client port), and the client ports whose
        # socket the client had already closed (read just before the query).
        samples: list[tuple[float, list[tuple[int, int]], set[int]]] = []
        stop = threading.Event()
        pg_port = int(str(conninfo_to_dict(postgres_dsn).get("port") or 5432).split(",")[0])

        def sample() -> None:
            with psycopg.connect(postgres_dsn, autocommit=True) as db:
                while not stop.is_set():
                    closed = _closed_client_ports(pg_port)
                    rows = db.execute("select pid, coalesce(client_port, -1) from pg_stat_activity "
                                      "where application_name = %s", (app_name,)).fetchall()
                    samples.append((time.monotonic(), rows, closed))
                    stop.wait(0.005)

        results: list[int] = []
        retries = [0, 0]  # requests retried in all; most retries of one request
        lock = threading.Lock()

        def load(n: int) -> None:
            for _ in range(n):
                for attempt in range(3):
                    try:
                        status, _ = http_get(port, 20)
                        break
                    except (ConnectionError, http.client.HTTPException):
                        with lock:  # a request in flight on the killed worker
                            retries[0] += attempt == 0
                            retries[1] = max(retries[1], attempt + 1)
                else:
                    status = 0
                with lock:
                    results.append(status)

        sampler = threading.Thread(target=sample)
        sampler.start()
        loaders = [threading.Thread(target=load, args=(40,)) for _ in range(10)]
        for t in loaders:
            t.start()
        wait_until(lambda: len(results) >= 100, timeout=30, what="traffic flowing")

        # Kill a worker that holds a token of the budget right now (a connection, idle or in
        # use), so the reclaim is of a real token; any worker if none is caught holding one.
        worker_pids = {p.pid for p in arbiter.children()} - {sup_pid}
        holders = wait_until(
            lambda: [u["pid"] for u in budget.stats()["using"] if u["pid"] in worker_pids],
            timeout=5, interval=0.002, what="a worker holding a token")
        victim = psutil.Process(holders[0])
        done_at_kill = len(results)
        t_kill = time.monotonic()
        victim.send_signal(signal.SIGKILL)  # a worker gunicorn started for this test
        wait_until(lambda: victim.pid not in {u["pid"] for u in budget.stats()["using"]},
                   timeout=5, interval=0.002, what="the killed worker's token reclaimed")
        # One snapshot (traffic goes on): out (lent or being made) + available == the budget.
        stats = budget.stats()
        assert stats["nusing"] + stats["ncreating"] + stats["sem"]["value"] == BUDGET, stats
        for t in loaders:
            t.join(40)
        stop.set()
        sampler.join(10)

        # PostgreSQL lists a backend until its process has exited, a little after the client
        # closed the connection (and gave its token back) or died: under load, for tens of ms.
        # Live connections are those whose client had not closed them before the sample.
        live = [len([r for r in rows if r[1] not in closed]) for _t, rows, closed in samples]
        peak, raw_peak = max(live), max(len(rows) for _t, rows, _c in samples)
        closing = sum(len(rows) > n for (_t, rows, _c), n in zip(samples, live, strict=True))
        print(f"asgi: {len(results)} requests, {results.count(200)} OK, {retries[0]} retried "
              f"(at most {retries[1]} time each) after killing worker {victim.pid} "
              f"(which held a token) at request {done_at_kill}; PostgreSQL peak {peak} live "
              f"connections of the app over {len(samples)} samples (listed: {raw_peak}, with "
              f"backends of connections the client had closed in {closing} samples)")
        assert not any(t.is_alive() for t in loaders)
        assert len(results) == 400 and all(s == 200 for s in results), results.count(200)
        # An async worker serves many requests at once: at most one per client thread was in
        # flight on the killed worker, and one retry each sufficed.
        assert retries[0] <= 10 and retries[1] <= 1, retries
        assert len(results) - done_at_kill > 50  # traffic went on after the kill
        assert 1 <= peak <= BUDGET, f"PostgreSQL saw {peak} live connections of the app"
        # Closing a connection waits for PostgreSQL to drop it before the token goes back, so
        # every backend PostgreSQL lists counts, but in the moment after the SIGKILL: the dead
        # worker's token is back at once, while its backend lingers until the server sees EOF.
        listed = [len(rows) for t, rows, _c in samples if not t_kill <= t < t_kill + 0.25]
        assert max(listed) <= BUDGET, f"PostgreSQL listed {max(listed)} connections of the app"
        assert sum(t > t_kill for t, _r, _c in samples) >= 5  # sampled after the kill too
        # gunicorn replaced the worker; the budget is whole again
        wait_until(lambda: len([p for p in arbiter.children() if p.pid != sup_pid]) == 4,
                   timeout=15, what="worker replaced")
        assert budget.stats()["nusing"] + budget.free() == BUDGET
        assert victim.pid not in {u["pid"] for u in budget.stats()["using"]}
        client.close()
    finally:
        _stop_gunicorn(proc, arbiter, wait=15)
