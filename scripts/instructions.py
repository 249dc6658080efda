"""Instructions per token lease cycle, supervisor and client, for one or more checkouts.

    python scripts/instructions.py [CHECKOUT ...] [--cycles 2000]

Wall-clock benchmarks (``make bench``) need a quiet machine: on a loaded 2-core box their
cells move by 20%. Instruction counts do not: ``valgrind --tool=callgrind`` counts what the
CPU executes, the same whatever else runs. This script counts, for each checkout (a
directory holding ``mppool/``; default: this one), the instructions that one get + put of
a token pool (the hot path) costs in the supervisor process and in the client process,
after a warm-up, and prints them side by side with ratios to the first checkout.

Each checkout is imported through ``PYTHONPATH``; the interpreter running this script must
have mppool's dependencies installed. Needs valgrind (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 300

# Runs in the client process (under callgrind when the client is measured). The supervisor
# is started by mppool itself; when it is the one measured, sys.executable is a wrapper that
# starts it under callgrind. Counting starts and stops with callgrind_control -z / -d.
_WORKER = r"""
import os, subprocess, sys
import mppool
which, cycles, wrapper = sys.argv[1], int(sys.argv[2]), sys.argv[3]
launch = __import__("mppool.launch", fromlist=["x"]) if os.path.exists(
    os.path.join(os.path.dirname(mppool.__file__), "launch.py")) else __import__(
    "mppool.server", fromlist=["x"])
launch.START_TIMEOUT = 600.0  # an interpreter starting under valgrind is slow
if which == "supervisor":
    os.environ["INSTR_PYTHON"] = sys.executable
    sys.executable = wrapper
srv = mppool.Server().start()
client = mppool.connect(srv.address, srv.authkey, timeout=120)
pool = client.token_pool("instructions", 2)

def run(n):
    for _ in range(n):
        pool.put(pool.get())

run(WARMUP)
target = str(srv.pid if which == "supervisor" else os.getpid())
subprocess.run(["callgrind_control", "-z", target], check=True, capture_output=True)
run(cycles)
subprocess.run(["callgrind_control", "-d", target], check=True, capture_output=True)
print("PID", target, flush=True)
srv.shutdown()
""".replace("WARMUP", str(WARMUP))


def measure(checkout: Path, which: str, cycles: int, tmp: Path) -> float:
    """Instructions per cycle in ``which`` ("supervisor" or "client") for ``checkout``."""
    out = tmp / f"{which}.%p"
    wrapper = tmp / "python-under-callgrind"
    wrapper.write_text("#!/bin/sh\nexec valgrind --tool=callgrind --dump-instr=no "
                       f"--callgrind-out-file={out} \"$INSTR_PYTHON\" \"$@\"\n")
    wrapper.chmod(0o755)
    cmd = [sys.executable, "-c", _WORKER, which, str(cycles), str(wrapper)]
    if which == "client":
        cmd = ["valgrind", "--tool=callgrind", "--dump-instr=no",
               f"--callgrind-out-file={out}", *cmd]
    # MPPOOL_FAST=0: the lease channel's path, the one counted here (the fast path sends no
    # message; checkouts from before it ignore the variable).
    env = dict(os.environ, PYTHONPATH=str(checkout), MPPOOL_FAST="0")
    # cwd: not a directory holding an mppool/ of its own (sys.path[0] of "-c" is the cwd).
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=900)
    pids = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PID ")]
    if proc.returncode != 0 or not pids:
        raise RuntimeError(f"{checkout} ({which}) failed:\n{proc.stderr[-2000:]}")
    total = 0
    for path in glob.glob(str(tmp / f"{which}.{pids[0]}.*")):  # the -d dump, not the exit one
        for line in Path(path).read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    for path in glob.glob(str(tmp / f"{which}.*")):
        os.unlink(path)
    return total / cycles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="*", type=Path, default=[ROOT])
    parser.add_argument("--cycles", type=int, default=2000)
    args = parser.parse_args()
    if args.cycles < 1:
        parser.error(f"--cycles must be >= 1, got {args.cycles}")
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("instructions: valgrind is not installed (apt-get install valgrind)",
              file=sys.stderr)
        return 2
    for checkout in args.checkouts:
        if not (checkout / "mppool" / "__init__.py").is_file():
            parser.error(f"{checkout} holds no mppool/ package")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mppool-instr-") as tmp:
        for checkout in args.checkouts:
            rows.append((checkout, *(measure(checkout.resolve(), w, args.cycles, Path(tmp))
                                     for w in ("supervisor", "client"))))
    first = rows[0]
    print(f"instructions per token lease cycle (get + put), {args.cycles} cycles "
          f"after {WARMUP} warm-up, callgrind")
    print(f"{'checkout':40} {'supervisor':>12} {'ratio':>6} {'client':>12} {'ratio':>6}")
    for checkout, sup, cli in rows:
        print(f"{str(checkout)[-40:]:40} {sup:12,.0f} {sup / first[1]:6.2f} "
              f"{cli:12,.0f} {cli / first[2]:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
