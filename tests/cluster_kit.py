"""What the cluster tests share: supervisors on one Redis with distinct host ids, worker
processes that log when they hold a unit, a sampler of what Redis says is held, and the
overlap of the workers' logs (how many units were really in use at once).

Workers log ``G <t>`` right after get() returned and ``R <t>`` right before put(), with
``time.monotonic()`` (one clock for every process of this machine), so the most intervals
open at once is a lower bound on what the cluster granted at once: it must never exceed the
cap.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from helpers import fork_ctx, wait_until

import mppool
from mppool.errors import PoolException

TTL = 1.5  # seconds: short, so that lapses are seen quickly (renewals every 0.5 s)


def new_prefix() -> str:
    return f"mpt-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def clean_prefix(url: str, prefix: str) -> None:
    import redis

    with redis.Redis.from_url(url, socket_timeout=5) as r:
        keys = list(r.scan_iter(match="{" + prefix + ":*", count=1000))
        if keys:
            r.delete(*keys)


def leases_key(prefix: str, name: str) -> str:
    return "{" + f"{prefix}:{name}" + "}:leases"


def queue_key(prefix: str, name: str) -> str:
    return "{" + f"{prefix}:{name}" + "}:queue"


def start_supervisor(url: str, prefix: str, host: str, ttl: float = TTL,
                     address: Any = None) -> mppool.Server:
    return mppool.Server(address, cluster=url, cluster_lease_ttl=ttl, cluster_host=host,
                         cluster_prefix=prefix).start()


def _worker(address: Any, authkey: bytes, name: str, cap: int, log: str, hold: float,
            until: float, get_timeout: float, ready: Any) -> None:
    client = mppool.connect(address, authkey)
    tokens = client.token_pool(name, cap, scope="cluster")
    ready.put(os.getpid())
    with open(log, "a", buffering=1) as f:
        while time.monotonic() < until:
            try:
                tok = tokens.get(timeout=get_timeout)
            except PoolException:
                continue
            f.write(f"G {time.monotonic():.6f}\n")
            if hold:
                time.sleep(hold)  # the work done with the unit
            f.write(f"R {time.monotonic():.6f}\n")
            try:
                tokens.put(tok)
            except PoolException:
                pass
    client.close()


def start_workers(procs: list[Any], server: mppool.Server, name: str, cap: int, logdir: Path,
                  n: int, hold: float, seconds: float, get_timeout: float = 1.0) -> list[Any]:
    ctx = fork_ctx()
    started = []
    until = time.monotonic() + seconds
    for _ in range(n):
        ready = ctx.Queue()
        log = str(logdir / f"w-{uuid.uuid4().hex[:10]}.log")
        p = ctx.Process(target=_worker, args=(server.address, server.authkey, name, cap, log,
                                              hold, until, get_timeout, ready))
        p.log_name = Path(log).name  # type: ignore[attr-defined]  # for peak_overlap(ends=)
        procs.append(p)
        p.start()
        started.append(p)
        ready.get(timeout=20)
    return started


def peak_overlap(logdir: Path, ends: dict[str, float] | None = None) -> tuple[int, int]:
    """(most units in use at once, intervals seen) from every worker log in ``logdir``; a
    ``G`` without its ``R`` (a worker killed while holding) ends at the end of that log's
    writer (``ends``) or, failing that, now."""
    events: list[tuple[float, int]] = []
    n = 0
    for path in logdir.glob("w-*.log"):
        opened: float | None = None
        for line in path.read_text().splitlines():
            kind, _, t = line.partition(" ")
            try:
                ts = float(t)
            except ValueError:
                continue  # a line cut by a SIGKILL
            if kind == "G":
                opened = ts
            elif kind == "R" and opened is not None:
                events += [(opened, 1), (ts, -1)]
                opened = None
                n += 1
        if opened is not None:
            end = (ends or {}).get(path.name, time.monotonic())
            events += [(opened, 1), (end, -1)]
            n += 1
    events.sort(key=lambda e: (e[0], e[1]))  # a return at the same instant first
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak, n


class Sampler:
    """A thread reading, as fast as it can, how many leases Redis holds for a pool (the
    lease set's size: an upper bound, since lapsed leases stay until a script purges
    them), and every supervisor's own count of units held."""

    def __init__(self, url: str, prefix: str, name: str, clients: list[Any] | None = None) -> None:
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=2)
        self.key = leases_key(prefix, name)
        self.name = name
        self.clients = list(clients or [])
        self.peak_redis = 0
        self.peak_host = 0
        self.samples = 0
        self.errors = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join(10)
        self.r.close()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.peak_redis = max(self.peak_redis, int(self.r.zcard(self.key)))
                self.samples += 1
            except Exception:
                self.errors += 1
                self._stop.wait(0.05)
            i += 1
            if self.clients and i % 20 == 0:
                for c in list(self.clients):
                    try:
                        s = c.stats()[self.name]
                        self.peak_host = max(self.peak_host, int(s["nusing"]))
                    except Exception:
                        pass


def sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_released(url: str, prefix: str, name: str, timeout: float) -> None:
    """Every unit of the pool is back: the lease set is empty (a script purges lapsed ones,
    and a renewal of any live host runs one)."""
    import redis

    with redis.Redis.from_url(url, socket_timeout=2) as r:
        wait_until(lambda: live_leases(r, prefix, name) == 0, timeout,
                   what="every cluster unit back in Redis")


def live_leases(r: Any, prefix: str, name: str) -> int:
    """Leases Redis holds that have not lapsed, by Redis's own clock."""
    sec, usec = r.time()
    now_ms = sec * 1000 + usec // 1000
    return int(r.zcount(leases_key(prefix, name), now_ms + 1, "+inf"))


class PrivateRedis:
    """A redis-server of this test's own, on a free port, without persistence: stop() and
    start() it at will (never the machine's shared one)."""

    def __init__(self, tmp: Path, bind: str = "127.0.0.1", port: int | None = None,
                 also: tuple[str, ...] = ()) -> None:
        import shutil

        from helpers import free_port

        self.exe = shutil.which("redis-server")
        if self.exe is None:
            import pytest

            pytest.skip("redis-server is not installed: cannot run a private Redis")
        self.bind = bind  # where this process reaches it
        self.binds = (bind, *also)  # every address it listens on
        self.port = port or free_port()
        self.dir = tmp
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:{self.port}/0"

    def start(self) -> None:
        import subprocess

        import redis

        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", *self.binds, "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                with redis.Redis(host=self.bind, port=self.port, socket_timeout=0.5,
                                 socket_connect_timeout=0.5) as r:
                    return bool(r.ping())
            except Exception:
                return False

        wait_until(up, 10, interval=0.02, what="the private redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
