"""Connection churn under a budget: connections opened per 1,000 queries, and query latency.

    python scripts/bench_churn.py [--quick] [--seconds 1.5] [--dsn postgresql://...] [--json FILE]

8 worker processes (forked), one thread each, run queries against the local PostgreSQL for a
few seconds per cell. A query is ``get`` a connection, ``SELECT pg_backend_pid() FROM
pg_sleep(0.0005)`` (half a millisecond of server work), rollback, ``put``; its latency runs
from the get to the put, waiting for a connection included. Loads:

- ``uniform``: each process runs one query every 10 ms (random phase), ~800 queries/s in all;
- ``bursty``: each process runs 20 queries back to back, then idles 100-300 ms;
- ``flat-out``: each process runs queries back to back (the queries/s figure).

Peers, side by side in the same run, for a budget of B = 2, 4, 8 connections:

- ``budget``: ``db_pool.RawConnectionPool(max_size=1, budget=<token pool of B>)`` per process,
  connections in the processes, at most B in all;
- ``local``: the same without a budget (8 connections: the cap broken), once per load;
- ``tpooled``: ``db_pool.TpooledConnectionPool(max_size=B)``: B connections in the supervisor,
  shared through proxies;
- ``pgbouncer``: Debian's PgBouncer in transaction mode (``default_pool_size=B``) on a private
  port with a private configuration in a temporary folder, started and stopped (by pid) by
  this script; each process keeps one client connection to it. Skipped, with a message, when
  ``pgbouncer`` is not installed (``apt-get install -y pgbouncer``).

Each cell runs 0.5 s of warm-up, then is measured (steady state). Opens are counted the same
way for every peer: the server backends (pids) the measured queries ran on that no query of the
warm-up ran on. The exit status is 0 whatever the figures say.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import mppool
import mppool.budget
from mppool import db_pool

CTX = multiprocessing.get_context("fork")
PROCS = 8
BUDGETS = (2, 4, 8)
LOADS = ("uniform", "bursty", "flat-out")
PERIOD = 0.010  # uniform: one query per process every 10 ms
BURST, GAP = 20, (0.100, 0.300)  # bursty: 20 back to back, then idle
QUERY = "SELECT pg_backend_pid() FROM pg_sleep(0.0005)"
WARMUP = 0.5  # seconds run before measuring: first connections are not churn
DEFAULT_DSN = os.environ.get("MPPOOL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _open(peer: str, spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(get, put, close) for one worker process."""
    import psycopg

    if peer == "pgbouncer":
        conn = psycopg.connect(spec["bouncer_dsn"], prepare_threshold=None)

        def put_b(c: Any) -> None:
            c.rollback()

        return (lambda: conn), put_b, conn.close
    client = mppool.connect(spec["address"], spec["authkey"])
    dsn = f"{spec['dsn']}?application_name={spec['tag']}"
    pool: Any
    if peer == "tpooled":
        pool = db_pool.TpooledConnectionPool("psycopg", min_size=0, max_size=spec["budget"],
                                             client=client, conninfo=dsn)
    else:
        budget = client.token_pool(spec["tokens"]) if peer == "budget" else None
        pool = db_pool.RawConnectionPool(psycopg, min_size=0, max_size=1, budget=budget,
                                         conninfo=dsn)

    def close() -> None:
        if peer == "tpooled":
            pool.clear()
        else:
            pool.shutdown()
        client.close()

    return (lambda: pool.get(timeout=30)), pool.put, close


def _worker(peer: str, load: str, spec: dict[str, Any], seconds: float, seed: int,
            barrier: Any, out: Any) -> None:
    res: dict[str, Any] = {"n": 0, "errors": 0, "lat": [], "pids": []}
    try:
        get, put, close = _open(peer, spec)
        rnd = random.Random(seed)
        pids: set[int] = set()
        warm_pids: set[int] = set()
        lat: list[float] = []
        barrier.wait(60)
        t0 = time.perf_counter()
        measured = t0 + WARMUP
        end = measured + seconds
        nxt = t0 + rnd.uniform(0, PERIOD if load == "uniform" else GAP[1])
        burst = 0
        while True:
            now = time.perf_counter()
            if load != "flat-out" and now < nxt:
                time.sleep(max(0.0, min(nxt, end) - now))
                now = time.perf_counter()
            if now >= end:
                break
            try:
                conn = get()
                try:
                    cur = conn.cursor()
                    cur.execute(QUERY)
                    (warm_pids if now < measured else pids).add(cur.fetchone()[0])
                    cur.close()
                finally:
                    put(conn)
                if now >= measured:
                    lat.append(time.perf_counter() - now)
            except Exception as exc:
                res["errors"] += 1
                res.setdefault("error", repr(exc))
            if load == "uniform":
                nxt = max(nxt + PERIOD, time.perf_counter() - PERIOD)
            elif load == "bursty":
                burst += 1
                if burst >= BURST:
                    burst = 0
                    nxt = time.perf_counter() + rnd.uniform(*GAP)
        res.update(n=len(lat), lat=lat, pids=sorted(pids), warm_pids=sorted(warm_pids),
                   wall=time.perf_counter() - measured)
        close()
    except Exception as exc:
        res["fatal"] = repr(exc)
    out.put(res)


def run_cell(peer: str, load: str, budget: int, seconds: float, spec: dict[str, Any]) -> dict[str, Any]:
    spec = dict(spec, budget=budget, tag=f"churn_{uuid.uuid4().hex[:10]}",
                tokens=f"churn-{uuid.uuid4().hex[:10]}")
    if peer == "budget":
        with mppool.connect(spec["address"], spec["authkey"]) as client:
            client.token_pool(spec["tokens"], budget)  # created before any worker uses it
    barrier, out = CTX.Barrier(PROCS), CTX.Queue()
    procs = [CTX.Process(target=_worker, args=(peer, load, spec, seconds, i, barrier, out))
             for i in range(PROCS)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            results.append(out.get(timeout=seconds + 120))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()  # a worker this script started
                p.join(5)
    fatal = [r["fatal"] for r in results if "fatal" in r]
    if fatal:
        raise RuntimeError(f"{peer}/{load}/B={budget}: {fatal[0]}")
    lat = sorted(x for r in results for x in r["lat"])
    n = len(lat)
    warm = {pid for r in results for pid in r["warm_pids"]}
    opens = len({pid for r in results for pid in r["pids"]} - warm)
    wall = max(r["wall"] for r in results)
    errors = sum(r["errors"] for r in results)
    return {"peer": peer, "load": load, "budget": budget, "queries": n, "errors": errors,
            "error": next((r["error"] for r in results if "error" in r), None),
            "opens": opens, "opens_per_1000": 1000.0 * opens / n if n else float("nan"),
            "p50_ms": 1000 * lat[n // 2] if n else float("nan"),
            "p99_ms": 1000 * lat[min(n - 1, int(0.99 * n))] if n else float("nan"),
            "qps": n / wall if wall else 0.0}


# ------------------------------------------------------------------------------ PgBouncer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgBouncer:
    """One private PgBouncer (transaction mode, ``auth_type = any``) per pool size, in a
    temporary folder, switching to the PostgreSQL system user when started as root (PgBouncer
    refuses to run as root), stopped by its pid."""

    def __init__(self, exe: str, pool_size: int, pg_user: str) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="mppool-pgbouncer-")
        ini = Path(self.dir, "pgbouncer.ini")
        ini.write_text(
            "[databases]\n"
            f"test = host=127.0.0.1 port=5432 dbname=test user={pg_user}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            "auth_type = any\npool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
            "max_client_conn = 200\nlog_connections = 0\nlog_disconnections = 0\n"
            f"logfile = {self.dir}/pgbouncer.log\n")
        cmd = [exe, "-q", str(ini)]
        if os.geteuid() == 0:
            # PgBouncer itself switches user (-u): its pid stays the one Popen knows.
            os.chmod(self.dir, 0o777)
            cmd = [exe, "-q", "-u", "postgres", str(ini)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not start: {err.strip()[-300:]}") from exc
                time.sleep(0.05)

    @property
    def dsn(self) -> str:
        return f"postgresql://any@127.0.0.1:{self.port}/test"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # PgBouncer's immediate shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------ the run


def _row(c: dict[str, Any] | None) -> str:
    if c is None:
        return f"{'-':>8} {'-':>7} {'-':>7} {'-':>7}"
    return (f"{c['opens_per_1000']:8.1f} {c['p50_ms']:7.2f} {c['p99_ms']:7.2f} "
            f"{c['qps']:7.0f}")


def print_table(cells: list[dict[str, Any]], peers: list[str]) -> None:
    by = {(c["peer"], c["load"], c["budget"]): c for c in cells}
    budgets = sorted({c["budget"] for c in cells if c["budget"]})
    print(f"\nconnection churn: {PROCS} processes, steady state: opens per 1,000 queries, "
          "p50 and p99 query latency (ms, waiting for a connection included), queries/s")
    head = "".join(f" | {p:^32}" for p in peers)
    print(f"{'load':9} {'B':>2}{head}")
    print(f"{'':12}" + " | opens/1k     p50     p99   q/s" * len(peers))
    for load in LOADS:
        for b in budgets:
            cols = [by.get((p, load, 0 if p == "local" else b)) for p in peers]
            if all(c is None for c in cols):
                continue
            print(f"{load:9} {b:>2}" + "".join(f" | {_row(c)}" for c in cols))
    errs = [c for c in cells if c["errors"]]
    for c in errs:
        print(f"errors: {c['peer']}/{c['load']}/B={c['budget']}: {c['errors']} ({c['error']})")


def goals(cells: list[dict[str, Any]]) -> list[str]:
    by = {(c["peer"], c["load"], c["budget"]): c for c in cells}
    lines = []
    b, loc = by.get(("budget", "uniform", 2)), by.get(("local", "uniform", 0))
    if b and loc:
        ok = b["opens_per_1000"] <= 50
        lines.append(f"{'PASS' if ok else 'FAIL'}: budget 2, uniform: {b['opens_per_1000']:.1f} "
                     "opens per 1,000 queries (goal <= 50)")
        ratio = b["p99_ms"] / loc["p99_ms"] if loc["p99_ms"] else float("nan")
        lines.append(f"{'PASS' if ratio <= 1.2 else 'FAIL'}: budget 2, uniform: p99 "
                     f"{b['p99_ms']:.2f} ms = {ratio:.2f}x per-process pools' {loc['p99_ms']:.2f} ms"
                     " (goal <= 1.20x)")
    for bb in BUDGETS:
        t, p = by.get(("tpooled", "flat-out", bb)), by.get(("pgbouncer", "flat-out", bb))
        if t and p:
            r = t["qps"] / p["qps"] if p["qps"] else float("nan")
            lines.append(f"{'PASS' if r >= 1.0 else 'FAIL'}: flat-out, B={bb}: tpooled "
                         f"{t['qps']:.0f} q/s = {r:.2f}x pgbouncer's {p['qps']:.0f} (goal >= 1.00x)")
    return lines


def run(quick: bool = False, seconds: float | None = None, dsn: str = DEFAULT_DSN,
        peers: list[str] | None = None) -> dict[str, Any]:
    """Every cell (budgets 2 only, 1 s cells with ``quick``); what scripts/bench.py calls.
    Returns {"cells", "peers", "budgets", "seconds", "notes", "goals"}; "skipped" (and no
    cells) when PostgreSQL does not answer."""
    seconds = seconds or (1.0 if quick else 1.5)
    budgets = (2,) if quick else BUDGETS
    peers = list(peers or ("budget", "local", "tpooled", "pgbouncer"))
    notes: list[str] = []
    try:
        import psycopg

        psycopg.connect(dsn, connect_timeout=3).close()
    except Exception as exc:
        return {"skipped": f"PostgreSQL at {dsn} unavailable ({exc})", "cells": []}
    exe = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None)
    if "pgbouncer" in peers and exe is None:
        notes.append("the pgbouncer column is skipped: pgbouncer is not installed "
                     "(Debian/Ubuntu: apt-get install -y pgbouncer)")
        peers.remove("pgbouncer")
    pg_user = psycopg.conninfo.conninfo_to_dict(dsn).get("user") or "postgres"
    cells: list[dict[str, Any]] = []
    print(f"churn benchmark: {PROCS} processes, budgets {budgets}, loads {LOADS}, "
          f"{seconds} s per cell, peers {', '.join(peers)}, "
          f"recall patience {getattr(mppool.budget, 'RECALL_PATIENCE', None)} s, "
          f"min uses {getattr(mppool.budget, 'RECALL_MIN_USES', None)}", flush=True)
    with mppool.Server() as srv:
        spec = {"address": srv.address, "authkey": srv.authkey, "dsn": dsn}
        for load in LOADS:
            if "local" in peers:
                cells.append(run_cell("local", load, 0, seconds, spec))
            for b in budgets:
                for peer in peers:
                    if peer == "local":
                        continue
                    if peer == "pgbouncer":
                        bouncer = PgBouncer(exe, b, pg_user)  # type: ignore[arg-type]
                        try:
                            cells.append(run_cell(peer, load, b, seconds,
                                                  dict(spec, bouncer_dsn=bouncer.dsn)))
                        finally:
                            bouncer.stop()
                    else:
                        cells.append(run_cell(peer, load, b, seconds, spec))
    return {"cells": cells, "peers": peers, "budgets": list(budgets), "seconds": seconds,
            "patience": getattr(mppool.budget, "RECALL_PATIENCE", None),
            "min_uses": getattr(mppool.budget, "RECALL_MIN_USES", None), "notes": notes,
            "goals": goals(cells)}


def report(res: dict[str, Any]) -> None:
    if "skipped" in res:
        print(f"churn benchmark skipped: {res['skipped']}")
        return
    for note in res["notes"]:
        print(f"churn benchmark: {note}")
    print_table(res["cells"], res["peers"])
    for line in res["goals"]:
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="budget 2 only, 1 s cells")
    ap.add_argument("--seconds", type=float, help="seconds per cell (default 1.5, quick 1.0)")
    ap.add_argument("--dsn", default=DEFAULT_DSN, help="the PostgreSQL to use (trust auth)")
    ap.add_argument("--peers", default="budget,local,tpooled,pgbouncer")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    ap.add_argument("--patience", type=float,
                    help="mppool.budget.RECALL_PATIENCE for the budget peer (default: the library's)")
    ap.add_argument("--min-uses", type=int,
                    help="mppool.budget.RECALL_MIN_USES for the budget peer (default: the library's)")
    ns = ap.parse_args(argv)
    # The forked workers inherit these.
    if ns.patience is not None:
        mppool.budget.RECALL_PATIENCE = ns.patience
    if ns.min_uses is not None:
        mppool.budget.RECALL_MIN_USES = ns.min_uses
    t_start = time.monotonic()
    res = run(ns.quick, ns.seconds, ns.dsn, [p.strip() for p in ns.peers.split(",") if p.strip()])
    report(res)
    print(f"runtime {time.monotonic() - t_start:.1f} s")
    if ns.json:
        ns.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
