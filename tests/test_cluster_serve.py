"""Cluster pools declared in a config file and served by ``mppool serve --cluster``:
``max_using_delay_kill`` on cluster leases (enforced by Redis too when a supervisor is
wedged), ``mppool stats``/``top`` showing each host's holders, and Prometheus metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_kit import clean_prefix, new_prefix, queue_key
from helpers import free_port, wait_until

import mppool

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("MPPOOL_ADDRESS", "MPPOOL_AUTHKEY", "MPPOOL_CLUSTER"):
        env.pop(k, None)
    env["COLUMNS"] = "200"
    return env


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mppool", *args], capture_output=True,
                          text=True, env=_env(), timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    p = new_prefix()
    yield p
    clean_prefix(redis_url, p)


class Served:
    """``mppool serve`` in a subprocess, stopped with SIGTERM (SIGCONT first) at the end."""

    def __init__(self, tmp: Path, sockdir: Path, name: str, args: list[str]) -> None:
        self.address = str(sockdir / f"{name}.sock")
        self.out = tmp / f"{name}.out"
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mppool", "serve", "--address", self.address, *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env())
        wait_until(lambda: "serving on" in self.out.read_text() or self.proc.poll() is not None,
                   timeout=30, interval=0.02, what=f"mppool serve {name}")
        assert self.proc.poll() is None, self.out.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def served(reap: None) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        s.stop()


def _config(tmp: Path, url: str, prefix: str, host: str, kill: float, ttl: float = 3.0) -> Path:
    path = tmp / f"{host}.toml"
    path.write_text(f"""
[cluster]
url = "{url}"
lease_ttl = {ttl}
host = "{host}"
prefix = "{prefix}"

[pools.api]
kind = "token"
scope = "cluster"
max_size = 1
max_using_delay_kill = {kill}
""")
    return path


def test_kill_delay_on_cluster_leases(redis_url: str, prefix: str, tmp_path: Path,
                                      sockdir: Path, served: list[Served]) -> None:
    """A cluster lease held past max_using_delay_kill is taken back and handed on; and
    with its supervisor frozen, Redis itself frees it at that deadline, long before the
    lease TTL."""
    import redis

    # A TTL of 6 s: a lease left to lapse would free the unit 4 s after the freeze at the
    # earliest (renewed at most 2 s before it); the kill deadline frees it within 0.5 s,
    # and b's next renewal (every 2 s) hands it on.
    a = Served(tmp_path, sockdir, "a", ["--config", str(_config(tmp_path, redis_url, prefix,
                                                                  "ka", 0.5, 6.0))])
    b = Served(tmp_path, sockdir, "b", ["--config", str(_config(tmp_path, redis_url, prefix,
                                                                  "kb", 0.5, 6.0))])
    served += [a, b]
    ca, cb = mppool.connect(a.address), mppool.connect(b.address)
    r = redis.Redis.from_url(redis_url)
    try:
        ta = ca.token_pool("api", 1, scope="cluster")
        tb = cb.token_pool("api", 1, scope="cluster")
        # 1. The supervisor kills the lease at its deadline: b's waiter gets the unit.
        tok = ta.get(timeout=5)
        t0 = time.monotonic()
        got = tb.get(timeout=10)
        killed_after = time.monotonic() - t0
        assert ca.stats()["api"]["nkilled"] == 1
        ta.put(tok)  # refused quietly: the lease was killed
        tb.put(got)
        # 2. Frozen supervisor: Redis frees the lease at the kill deadline, not at the TTL.
        tok = ta.get(timeout=5)
        a.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            got = tb.get(timeout=10)
            wedged_after = time.monotonic() - t0
        finally:
            a.proc.send_signal(signal.SIGCONT)
        tb.put(got)
        assert r.zcard(queue_key(prefix, "api")) == 0
    finally:
        ca.close()
        cb.close()
        r.close()
    print(f"\n[cluster figures] max_using_delay_kill=0.5 s: unit handed on after "
          f"{killed_after:.3f} s (supervisor kill), {wedged_after:.3f} s with its supervisor "
          f"frozen (lease TTL 6 s, renewals every 2 s)")
    assert 0.4 <= killed_after < 3.0
    assert wedged_after < 3.9  # a lapse would take 4 s at least: Redis enforced the deadline


def test_stats_top_and_metrics_show_hosts(redis_url: str, prefix: str, tmp_path: Path,
                                          sockdir: Path, served: list[Served]) -> None:
    port = free_port()
    a = Served(tmp_path, sockdir, "a", ["--config", str(_config(tmp_path, redis_url, prefix,
                                                                  "web-1", 0)),
                                        "--metrics-port", str(port)])
    b = Served(tmp_path, sockdir, "b", ["--cluster", redis_url, "--cluster-host", "web-2",
                                        "--config", str(_config(tmp_path, redis_url, prefix,
                                                                "ignored", 0))])
    served += [a, b]
    ca, cb = mppool.connect(a.address), mppool.connect(b.address)
    try:
        tok = cb.token_pool("api", 1, scope="cluster").get(timeout=5)
        ca.token_pool("api", 1, scope="cluster")
        wait_until(lambda: ca.stats()["api"]["cluster"]["hosts"] == {"web-2": 1}, 10,
                   what="host a sees b's unit")
        r = _cli("stats", "--json", "--address", a.address)
        assert r.returncode == 0, r.stderr
        s: dict[str, Any] = json.loads(r.stdout)["api"]
        assert s["kind"] == "cluster" and s["cluster"]["hosts"] == {"web-2": 1}
        top = _cli("top", "--once", "--address", a.address)
        assert top.returncode == 0, top.stderr
        assert "web-2" in top.stdout and "cluster" in top.stdout
        status, body = _metrics(port)
        assert status == 200
        assert 'mppool_cluster_held{host="web-2",pool="api"} 1.0' in body
        assert 'mppool_cluster_lost_leases_total{pool="api"} 0.0' in body
        cb.token_pool("api", 1, scope="cluster").put(tok)
    finally:
        ca.close()
        cb.close()


def _metrics(port: int) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.status, resp.read().decode()


def test_serve_refuses_cluster_pools_without_a_cluster(tmp_path: Path, sockdir: Path,
                                                       prefix: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[pools.api]\nkind = "token"\nscope = "cluster"\nmax_size = 2\n')
    r = _cli("serve", "--address", str(sockdir / "x.sock"), "--config", str(config))
    assert r.returncode == 2, r.stderr
    assert "--cluster URL" in r.stderr
    r = _cli("serve", "--address", str(sockdir / "x.sock"), "--cluster", "http://nope")
    assert r.returncode == 2 and "Redis URL" in r.stderr
