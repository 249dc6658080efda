"""The FastAPI example of docs/asyncio.md, run for real: uvicorn with 3 workers, one budget
of 2 PostgreSQL connections shared by all of them."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

import mppool

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

APP = Path(__file__).parent / "asgi_app" / "fastapi_app.py"
DOCS = Path(__file__).parent.parent / "docs" / "asyncio.md"


def test_the_docs_show_the_code_that_is_run():
    """The example in the docs is this file's code, from its first import on."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    code = APP.read_text()
    body = code[code.index("import os"):]
    assert any(block == body for block in blocks), "docs/asyncio.md and the example differ"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int) -> tuple[int, dict[str, int]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_fastapi_workers_share_two_connections(postgres_dsn, tmp_path):
    import psycopg

    port = _free_port()
    app_name = f"mppool-fastapi-{os.getpid()}"
    dsn = postgres_dsn + ("&" if "?" in postgres_dsn else "?") + f"application_name={app_name}"
    with mppool.Server(str(tmp_path / "s.sock")) as server:
        env = dict(os.environ, APP_DSN=dsn, MPPOOL_ADDRESS=str(server.address),
                   MPPOOL_AUTHKEY=server.authkey.hex(), PYTHONPATH=str(APP.parent))
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "fastapi_app:app", "--workers",
                                 "3", "--port", str(port), "--log-level", "warning"],
                                cwd=APP.parent, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            wait_until(lambda: _ok(port), timeout=30, what="uvicorn serving")
            results: list[tuple[int, dict[str, int]]] = []
            lock = threading.Lock()

            def load() -> None:
                for _ in range(20):
                    r = _get(port)
                    with lock:
                        results.append(r)

            peak = [0]
            stop = threading.Event()

            def sample() -> None:
                with psycopg.connect(postgres_dsn, autocommit=True) as watch:
                    while not stop.is_set():
                        (n,) = watch.execute("select count(*) from pg_stat_activity where "
                                             "application_name = %s", (app_name,)).fetchone()
                        peak[0] = max(peak[0], n)

            sampler = threading.Thread(target=sample)
            sampler.start()
            threads = [threading.Thread(target=load) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            stop.set()
            sampler.join(10)
            assert len(results) == 120 and all(status == 200 for status, _ in results)
            assert len({body["backend"] for _, body in results}) >= 1
            assert 1 <= peak[0] <= 2, f"PostgreSQL saw {peak[0]} connections of the app"
            with mppool.connect(server.address, server.authkey) as client:
                stats = client.token_pool("pg").stats()
            assert stats["max_size"] == 2 and stats["nusing"] <= 2
        finally:
            proc.send_signal(signal.SIGTERM)  # the uvicorn this test started
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait(5)
            assert proc.stderr is not None
            proc.stderr.close()


def _ok(port: int) -> bool:
    try:
        return _get(port)[0] == 200
    except OSError:
        return False
