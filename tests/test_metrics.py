"""Prometheus metrics of a supervisor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator

import pytest
from helpers import NEEDS_FAST_PATH, wait_until

import mppool

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


@pytest.fixture
def metrics_supervisor() -> Iterator[tuple[str, bytes, int]]:
    """A supervisor serving Prometheus metrics: (address, key, metrics port)."""
    pytest.importorskip("prometheus_client")
    port = _free_port()
    addr = os.path.join(tempfile.mkdtemp(prefix="mpm"), "s.sock")
    key = os.urandom(16)
    env = dict(os.environ, MPPOOL_AUTHKEY=key.hex())
    code = ("from mppool.supervisor import serve; from mppool.address import parse_address; "
            f"import os; serve(parse_address({addr!r}), bytes.fromhex(os.environ['MPPOOL_AUTHKEY']), "
            f"metrics_port={port})")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        wait_until(lambda: os.path.exists(addr + ".key"), timeout=20, what="supervisor ready")
        yield addr, key, port
    finally:
        proc.send_signal(signal.SIGTERM)  # the supervisor this test started
        assert proc.wait(10) == 0


def test_metrics_endpoint_reports_pools_and_histograms(metrics_supervisor):
    addr, key, port = metrics_supervisor
    c = mppool.connect(addr, key)
    pool = c.pool("nums", lambda i: i, max_size=2)
    held = pool.get()
    with pool.obj():
        pass
    pool.stats()  # a control-plane call syncs this process's puts; a scrape does not
    text = _scrape(port)
    assert 'mppool_pool_in_use{pool="nums"} 1.0' in text
    assert 'mppool_pool_max_size{pool="nums"} 2.0' in text
    assert 'mppool_acquire_wait_seconds_count{pool="nums"} 2.0' in text
    assert 'mppool_hold_seconds_count{pool="nums"} 1.0' in text
    assert "mppool_reclaimed_total 0.0" in text
    # psycopg_pool's counters, from the pool's stats() at scrape time.
    assert 'mppool_pool_requests_num_total{pool="nums"} 2.0' in text
    assert 'mppool_pool_connections_num_total{pool="nums"} 2.0' in text
    assert 'mppool_pool_connections_lost_total{pool="nums"} 0.0' in text
    assert "# HELP mppool_pool_usage_ms_total psycopg_pool's usage_ms" in text
    pool.ret(held)
    c.close()
    wait_until(lambda: "mppool_pool_in_use{pool=\"nums\"} 0.0" in _scrape(port), what="returned")


@NEEDS_FAST_PATH
def test_fast_leases_in_gauges_counters_and_histograms(metrics_supervisor):
    """A token pool leasing in shared memory: no message per lease, and still counted in the
    gauges, the lease counters and the histograms."""
    addr, key, port = metrics_supervisor
    c = mppool.connect(addr, key)
    tok = c.token_pool("tok", 2, fast=True)
    t = tok.get()
    assert type(t).__name__ == "FastToken"
    for _ in range(3):
        tok.put(tok.get())
    text = _scrape(port)
    assert 'mppool_pool_in_use{pool="tok"} 1.0' in text
    assert 'mppool_pool_requests_num_total{pool="tok"} 4.0' in text
    assert 'mppool_hold_seconds_count{pool="tok"} 3.0' in text  # 3 given back
    assert 'mppool_acquire_wait_seconds_bucket{le="0.0001",pool="tok"} 4.0' in text
    text = _scrape(port)  # a second scrape adds nothing twice
    assert 'mppool_acquire_wait_seconds_count{pool="tok"} 4.0' in text
    tok.put(t)
    wait_until(lambda: 'mppool_pool_in_use{pool="tok"} 0.0' in _scrape(port),
               what="the fast token back")
    c.close()
