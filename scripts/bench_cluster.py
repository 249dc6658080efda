"""Cluster pools: lease cycles through the supervisors against a plain Redis semaphore used
directly by the same processes, and how long a dead host's units take to come back.

    python scripts/bench_cluster.py [--quick] [--seconds 1.0] [--reps 3] [--redis-url URL]

(also run by ``make bench``, through scripts/bench.py)

- lease cycles (get + put): N worker processes (N = 2, 4, 8) split over two supervisors
  started with the same cluster (two "hosts" on this machine), on a cluster budget of C = N
  (no contention) and C = N/2; against the same N processes using a Redis semaphore
  themselves (a list of C tokens, BLPOP/RPUSH: one round trip each way, no crash safety: a
  holder that dies loses its token for ever). Cells interleaved, peers' order rotated every
  rep, medians over reps; the ratio is mppool's cycles/s over the semaphore's.
- dead worker: a holder on one host is SIGKILLed, a waiter on the other gets its unit;
- dead host: a supervisor and its holders are SIGKILLed, waiters on the other host get the
  units once the leases lapse: within ``cluster_lease_ttl`` plus one renewal period.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mppool

CTX = multiprocessing.get_context("fork")
NS = (2, 4, 8)
PEERS = ("mppool-cluster", "redis-semaphore")


def _cycles(peer: str, spec: dict[str, Any], barrier: Any, seconds: float, out: Any) -> None:
    get: Callable[[], Any]
    put: Callable[[Any], Any]
    close: Callable[[], Any]
    if peer == "mppool-cluster":
        client = mppool.connect(spec["address"], spec["authkey"])
        tokens = client.token_pool(spec["name"], spec["cap"], scope="cluster")
        get, put, close = tokens.get, tokens.put, client.close
    else:
        import redis

        r = redis.Redis.from_url(spec["url"])
        key = spec["key"]

        def get() -> Any:
            return r.blpop([key], timeout=0)[1]  # type: ignore[index]

        def put(tok: Any) -> None:
            r.rpush(key, tok)

        close = r.close
    for _ in range(50):  # warm up
        put(get())
    barrier.wait(60)
    lat = []
    n = 0
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter_ns()
        put(get())
        lat.append(time.perf_counter_ns() - t0)
        n += 1
        if time.perf_counter() >= end:
            break
    close()
    out.put((n, lat[:: max(1, len(lat) // 5000)]))


def _cell(peer: str, n: int, cap: int, servers: list[mppool.Server], url: str, prefix: str,
          seconds: float) -> dict[str, Any]:
    import redis

    name = f"b{uuid.uuid4().hex[:8]}"
    key = f"{prefix}:sem:{name}"
    if peer == "redis-semaphore":
        with redis.Redis.from_url(url) as r:
            r.delete(key)
            r.rpush(key, *range(cap))
    barrier = CTX.Barrier(n + 1)
    out = CTX.Queue()
    procs = []
    for i in range(n):
        s = servers[i % len(servers)]
        spec = {"address": s.address, "authkey": s.authkey, "name": name, "cap": cap,
                "url": url, "key": key}
        p = CTX.Process(target=_cycles, args=(peer, spec, barrier, seconds, out))
        p.start()
        procs.append(p)
    barrier.wait(120)
    t0 = time.perf_counter()
    got = [out.get(timeout=seconds + 60) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(10)
    if peer == "redis-semaphore":
        with redis.Redis.from_url(url) as r:
            r.delete(key)
    total = sum(g[0] for g in got)
    lat = sorted(x for g in got for x in g[1])
    return {"peer": peer, "n": n, "c": cap, "cycles": total, "rate": total / max(wall, 1e-9),
            "p50_us": lat[len(lat) // 2] / 1000 if lat else None,
            "p99_us": lat[int(len(lat) * 0.99)] / 1000 if lat else None,
            "per_process": [g[0] for g in got]}


def _holder(address: Any, authkey: bytes, name: str, cap: int, ready: Any) -> None:
    client = mppool.connect(address, authkey)
    client.token_pool(name, cap, scope="cluster").get(timeout=10)
    ready.put(os.getpid())
    time.sleep(600)


def _waiter(address: Any, authkey: bytes, name: str, cap: int, ready: Any, out: Any) -> None:
    client = mppool.connect(address, authkey)
    tokens = client.token_pool(name, cap, scope="cluster")
    ready.put(os.getpid())
    tokens.get(timeout=60)
    out.put(time.monotonic())
    client.close()


def _queued(url: str, prefix: str, name: str, n: int) -> None:
    import redis

    key = "{" + f"{prefix}:{name}" + "}:queue"
    with redis.Redis.from_url(url) as r:
        deadline = time.monotonic() + 20
        while r.zcard(key) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("waiters never queued")
            time.sleep(0.002)


def measure_reclaim(url: str, prefix: str, ttl: float, rounds: int) -> dict[str, Any]:
    """Seconds until units come back on another host: after SIGKILL of a holder (its
    supervisor gives the unit back), and of a whole supervisor with its holders."""
    worker: list[float] = []
    host: list[float] = []
    for _ in range(rounds):
        a = mppool.Server(cluster=url, cluster_lease_ttl=ttl, cluster_host="ra",
                          cluster_prefix=prefix).start()
        b = mppool.Server(cluster=url, cluster_lease_ttl=ttl, cluster_host="rb",
                          cluster_prefix=prefix).start()
        procs: list[Any] = []
        try:
            for kind in ("worker", "host"):
                name = f"r{uuid.uuid4().hex[:8]}"
                ready, out = CTX.Queue(), CTX.Queue()
                holders = []
                for _ in range(2):
                    p = CTX.Process(target=_holder, args=(a.address, a.authkey, name, 2, ready))
                    p.start()
                    procs.append(p)
                    holders.append(p)
                    ready.get(timeout=20)
                for _ in range(2):
                    p = CTX.Process(target=_waiter, args=(b.address, b.authkey, name, 2, ready, out))
                    p.start()
                    procs.append(p)
                    ready.get(timeout=20)
                _queued(url, prefix, name, 2)
                t0 = time.monotonic()
                if kind == "host":
                    os.kill(a.pid, signal.SIGKILL)  # type: ignore[arg-type]
                for p in holders:
                    os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
                back = max(out.get(timeout=ttl * 4 + 20) for _ in range(2)) - t0
                (worker if kind == "worker" else host).append(back)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
            a.shutdown()
            b.shutdown()
    return {"ttl": ttl, "renewal": ttl / 3, "dead_worker_ms": [w * 1000 for w in worker],
            "dead_host_s": host, "bound_s": ttl + ttl / 3}


def run(url: str, quick: bool = False, seconds: float | None = None,
        reps: int | None = None) -> dict[str, Any]:
    seconds = seconds or (0.5 if quick else 1.0)
    reps = reps or (1 if quick else 3)
    prefix = f"mppool-bench-{os.getpid()}"
    servers = [mppool.Server(cluster=url, cluster_lease_ttl=5.0, cluster_host=f"bench{i}",
                             cluster_prefix=prefix).start() for i in range(2)]
    cells = []
    try:
        configs = [(n, c) for n in NS for c in sorted({n, max(1, n // 2)})]
        for rep in range(reps):
            for n, c in configs:
                peers = PEERS if (rep + n) % 2 == 0 else PEERS[::-1]
                for peer in peers:
                    cells.append({**_cell(peer, n, c, servers, url, prefix, seconds), "rep": rep})
    finally:
        for s in servers:
            s.shutdown()
    table = []
    for n, c in configs:
        row: dict[str, Any] = {"n": n, "c": c}
        for peer in PEERS:
            mine = [x for x in cells if x["peer"] == peer and x["n"] == n and x["c"] == c]
            row[peer] = {"rate": statistics.median(x["rate"] for x in mine),
                         "p50_us": statistics.median(x["p50_us"] for x in mine),
                         "p99_us": statistics.median(x["p99_us"] for x in mine),
                         # fairness: the least served process's cycles over the most served's
                         "fair": statistics.median(min(x["per_process"]) / max(1, max(x["per_process"]))
                                                   for x in mine)}
        row["ratio"] = row["mppool-cluster"]["rate"] / row["redis-semaphore"]["rate"]
        table.append(row)
    reclaim = [measure_reclaim(url, prefix, ttl, 1 if quick else 3) for ttl in (1.5, 3.0)]
    _clean(url, prefix)
    return {"seconds": seconds, "reps": reps, "table": table, "reclaim": reclaim, "cells": cells}


def _clean(url: str, prefix: str) -> None:
    import redis

    with redis.Redis.from_url(url) as r:
        for pattern in ("{" + prefix + ":*", prefix + ":*"):
            keys = list(r.scan_iter(match=pattern, count=1000))
            if keys:
                r.delete(*keys)


def report(res: dict[str, Any]) -> str:
    lines = ["cluster pools (2 supervisors on one Redis) vs a Redis semaphore used directly "
             f"(medians of {res['reps']} rep(s) x {res['seconds']} s):",
             f"  {'N':>2} {'C':>2}  {'mppool cycles/s':>15} {'p50':>8} {'p99':>8} {'fair':>5}   "
             f"{'Redis sem cycles/s':>18} {'p50':>8} {'p99':>8} {'fair':>5}   ratio",
             "  (fair: cycles of the least served process / the most served, 1.00 = equal)"]
    for row in res["table"]:
        m, r = row["mppool-cluster"], row["redis-semaphore"]
        lines.append(f"  {row['n']:>2} {row['c']:>2}  {m['rate']:>15,.0f} {m['p50_us']:>6.0f}us "
                     f"{m['p99_us']:>6.0f}us {m['fair']:>5.2f}   {r['rate']:>18,.0f} "
                     f"{r['p50_us']:>6.0f}us {r['p99_us']:>6.0f}us {r['fair']:>5.2f}   "
                     f"{row['ratio']:.2f}x")
    for rc in res["reclaim"]:
        lines.append(f"  lease TTL {rc['ttl']:g} s: dead worker's unit back on another host in "
                     + ", ".join(f"{x:.1f}" for x in rc["dead_worker_ms"]) + " ms; dead host's "
                     "units back in " + ", ".join(f"{x:.2f}" for x in rc["dead_host_s"])
                     + f" s (bound TTL + renewal = {rc['bound_s']:.2f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--redis-url", default=os.environ.get("MPPOOL_BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "bench-results")
    ns = ap.parse_args(argv)
    res = run(ns.redis_url, ns.quick, ns.seconds, ns.reps)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "bench-cluster.json").write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
