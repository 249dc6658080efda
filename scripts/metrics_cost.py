"""The cost of worker-side metrics (mppool/poolmetrics.py) on an in-process pool's get+ret.

    python scripts/metrics_cost.py [--cycles 50000] [--rounds 5]

The same loop (``pool.ret(pool.get())`` on an idle object, the fast path) runs in two fresh
interpreters in turns: one without ``PROMETHEUS_MULTIPROC_DIR`` (metrics off: the pool is the
class's own), one with it (every get timed, the gauges that changed written to the mmap
files). Prints the best microseconds per cycle of each, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

LOOP = """
import sys, time, mppool
pool = mppool.Pool(lambda i: object(), max_size=4, min_size=1, name="bench")
for _ in range(1000):
    pool.ret(pool.get())
n = int(sys.argv[1])
t = time.perf_counter()
for _ in range(n):
    pool.ret(pool.get())
print((time.perf_counter() - t) / n * 1e6)
"""


def one(cycles: int, metrics: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    directory = tempfile.mkdtemp(prefix="mppool-metrics-") if metrics else None
    if directory is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        out = subprocess.run([sys.executable, "-c", LOOP, str(cycles)], env=env, check=True,
                             capture_output=True, text=True, timeout=300)
        return float(out.stdout.strip())
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=5)
    ns = ap.parse_args()
    off, on = [], []
    for _ in range(ns.rounds):  # in turns: machine noise hits both sides alike
        off.append(one(ns.cycles, False))
        on.append(one(ns.cycles, True))
    print(f"get+ret, metrics off: {min(off):.2f} us   on: {min(on):.2f} us   "
          f"on/off: {min(on) / min(off):.1f}x   (best of {ns.rounds} x {ns.cycles} cycles)")


if __name__ == "__main__":
    main()
