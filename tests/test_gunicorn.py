"""gunicorn end to end: 4 workers, a budget of 2 PostgreSQL connections."""

from __future__ import annotations

import http.client
import os
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

import mppool

pytestmark = [pytest.mark.gunicorn, pytest.mark.postgres, pytest.mark.slow, pytest.mark.kill]

APP_DIR = Path(__file__).parent / "gunicorn_app"


@pytest.mark.timeout(180)
def test_gunicorn_workers_share_a_budget_of_two(postgres_dsn):
    import psycopg

    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    assert gunicorn, "gunicorn is a test dependency"
    port = free_port()
    app_name = f"mppool-gu-{uuid.uuid4().hex[:8]}"
    address = os.path.join(tempfile.mkdtemp(prefix="mpg"), "s.sock")
    env = dict(os.environ, APP_DSN=postgres_dsn, APP_NAME=app_name, MPPOOL_ADDRESS=address,
               PYTHONPATH=os.pathsep.join([str(APP_DIR), *sys.path]))
    env.pop("MPPOOL_AUTHKEY", None)
    proc = subprocess.Popen([gunicorn, "-c", str(APP_DIR / "gunicorn.conf.py"),
                             "-b", f"127.0.0.1:{port}", "app:app"],
                            cwd=APP_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    arbiter = psutil.Process(proc.pid)
    try:
        wait_until(lambda: _request_ok(port), timeout=30, what="gunicorn serving")
        client = mppool.connect(address)  # the key file the supervisor wrote
        sup_pid = client.info()["pid"]
        budget = client.token_pool("pg")
        workers = wait_until(lambda: len(arbiter.children()) >= 5 and arbiter.children(),
                             timeout=20, what="4 workers and the supervisor")
        assert sup_pid in {p.pid for p in workers}  # the arbiter's child, started before forks

        peak, stop = [0], threading.Event()

        def sample() -> None:
            with psycopg.connect(postgres_dsn, autocommit=True) as db:
                while not stop.is_set():
                    n = db.execute("select count(*) from pg_stat_activity where application_name = %s",
                                   (app_name,)).fetchone()[0]
                    peak[0] = max(peak[0], n)
                    stop.wait(0.005)

        results: list[int] = []
        retries = [0]
        lock = threading.Lock()

        def load(n: int) -> None:
            for _ in range(n):
                for _attempt in range(3):
                    try:
                        status, _ = http_get(port, 30)
                        break
                    except (ConnectionError, http.client.HTTPException):
                        with lock:
                            retries[0] += 1  # the request in flight on the killed worker
                else:
                    status = 0
                with lock:
                    results.append(status)

        sampler = threading.Thread(target=sample)
        sampler.start()
        loaders = [threading.Thread(target=load, args=(40,)) for _ in range(10)]
        for t in loaders:
            t.start()
        wait_until(lambda: len(results) >= 100, timeout=60, what="traffic flowing")
        victim = next(p for p in arbiter.children() if p.pid != sup_pid)
        victim.send_signal(signal.SIGKILL)  # a worker gunicorn started for this test
        for t in loaders:
            t.join(120)
        stop.set()
        sampler.join(10)

        print(f"gunicorn: {len(results)} requests, {results.count(200)} OK, {retries[0]} retried "
              f"after the worker kill, PostgreSQL peak {peak[0]} connections of the app")
        assert len(results) == 400 and all(s == 200 for s in results), results.count(200)
        assert retries[0] <= 4
        assert 1 <= peak[0] <= 2, f"PostgreSQL saw {peak[0]} connections of the app"
        # gunicorn replaced the worker; the dead one's token came back
        wait_until(lambda: len([p for p in arbiter.children() if p.pid != sup_pid]) == 4,
                   timeout=30, what="worker replaced")
        wait_until(lambda: victim.pid not in {u["pid"] for u in budget.stats()["using"]},
                   timeout=5, what="the killed worker's token reclaimed")
        assert budget.stats()["nusing"] + budget.free() == 2
        client.close()
    finally:
        _stop_gunicorn(proc, arbiter, wait=30)
        proc.stderr.close()
    assert not os.path.exists(address)


def _request_ok(port: int) -> bool:
    try:
        return http_get(port, 30)[0] == 200
    except OSError:
        time.sleep(0.05)  # gunicorn still binding its port
        return False


def _get(port: int) -> tuple[int, str] | None:
    try:
        return http_get(port, 30)
    except OSError:
        return None


@pytest.mark.timeout(60)
def test_gunicorn_restarts_a_supervisor_that_died(tmp_path):
    """SIGKILL the supervisor the arbiter started: a new one comes up at the same address
    with the same key, and workers reach it again, without a redeploy."""
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
    assert gunicorn, "gunicorn is a test dependency"
    port = free_port()
    address = os.path.join(tempfile.mkdtemp(prefix="mpg"), "s.sock")
    env = dict(os.environ, MPPOOL_ADDRESS=address,
               PYTHONPATH=os.pathsep.join([str(APP_DIR), *sys.path]))
    env.pop("MPPOOL_AUTHKEY", None)
    logfile = tmp_path / "gunicorn.log"
    with open(logfile, "w") as log:
        proc = subprocess.Popen([gunicorn, "-c", str(APP_DIR / "gunicorn.conf.py"), "-w", "2",
                                 "-b", f"127.0.0.1:{port}", "restart_app:app"],
                                cwd=APP_DIR, env=env, stdout=subprocess.DEVNULL, stderr=log)
    arbiter = psutil.Process(proc.pid)
    try:
        first = wait_until(lambda: (r := _get(port)) and r[0] == 200 and r[1], timeout=20,
                           interval=0.05, what="gunicorn serving")
        first_pid = int(first)
        key = Path(address + ".key").read_text()
        assert first_pid in {p.pid for p in arbiter.children()}
        os.kill(first_pid, signal.SIGKILL)  # the supervisor gunicorn started for this test
        second = wait_until(lambda: (r := _get(port)) and r[0] == 200 and r[1] != first and r[1],
                            timeout=15, interval=0.05, what="a worker to reach a new supervisor")
        assert int(second) in {p.pid for p in arbiter.children()}  # the arbiter's child again
        assert Path(address + ".key").read_text() == key  # same key: the workers' env still holds
        assert "restarted it as pid " + second in logfile.read_text()
    finally:
        _stop_gunicorn(proc, arbiter, wait=20)
    assert not os.path.exists(address)


def _stop_gunicorn(proc: Any, arbiter: psutil.Process, wait: float) -> None:
    """SIGTERM the gunicorn this test started and check nothing it started is left."""
    children = arbiter.children(recursive=True) if arbiter.is_running() else []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    _, alive = psutil.wait_procs(children, timeout=wait / 2)
    for p in alive:  # processes this test started, by pid
        p.kill()
    assert not alive, f"left running after gunicorn stopped: {[p.pid for p in alive]}"
