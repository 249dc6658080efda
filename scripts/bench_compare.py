"""Compare ``make bench`` between two checkouts of mppool, in one run.

A change that touches the hot path must not make any cell slower. This runs
``scripts/bench.py`` of each checkout (with that checkout's own ``.venv``) in turns, ROUNDS
times, so that both see the same machine at the same moments, then prints every cell's
median over the rounds side by side with the ratio after/before.

    git worktree add ../before <old commit> && (cd ../before && make .venv/.mppool-installed-bench)
    python scripts/bench_compare.py ../before . [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def run(tree: Path, out: Path, quick: bool) -> dict[str, Any]:
    cmd = [str(tree / ".venv" / "bin" / "python"), str(tree / "scripts" / "bench.py"),
           "--out", str(out), "--no-docs"]
    if quick:
        cmd.append("--quick")
    subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "bench.json").read_text())  # type: ignore[no-any-return]


def cells(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """name -> {rate, p99_us} for every lease and in-process cell, and the supervisor CPU."""
    out: dict[str, dict[str, float]] = {}
    for c in res.get("lease", []):
        out[f"lease {c['peer']} N={c['n']} C={c['c']}"] = {"rate": c["rate"], "p99_us": c["p99_us"]}
    for c in res.get("inproc", []):
        out[f"in-process {c['peer']}"] = {"rate": c["rate"], "p99_us": c["p99_us"]}
    for c in res.get("cpu", []):
        if c.get("server_cpu_us_per_cycle") is not None:
            out[f"supervisor CPU µs/lease {c['peer']} N={c['n']}"] = {
                "cpu": c["server_cpu_us_per_cycle"]}
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="bench.py --quick in each round")
    ns = ap.parse_args(argv)
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ns.rounds):
            order = [("before", ns.before), ("after", ns.after)]
            if i % 2:
                order.reverse()  # neither side always runs first
            for label, tree in order:
                print(f"round {i + 1}/{ns.rounds}: {label} ({tree})", file=sys.stderr)
                runs[label].append(cells(run(tree.resolve(), Path(tmp) / f"{label}{i}", ns.quick)))
    names = [n for n in runs["after"][0] if n in runs["before"][0] and "mppool" in n]
    print(f"{'cell':52} {'before':>10} {'after':>10} {'after/before':>13}")
    for name in names:
        for metric in ("rate", "p99_us", "cpu"):
            before = [r[name][metric] for r in runs["before"] if metric in r.get(name, {})]
            after = [r[name][metric] for r in runs["after"] if metric in r.get(name, {})]
            if not before or not after:
                continue
            b, a = statistics.median(before), statistics.median(after)
            unit = {"rate": "/s", "p99_us": " µs p99", "cpu": " µs"}[metric]
            label = name if metric != "p99_us" else f"{name} (p99)"
            print(f"{label:52} {b:>10.1f} {a:>10.1f} {a / b if b else float('nan'):>12.2f}x"
                  f"  {unit.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
