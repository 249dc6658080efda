"""One "host" of the multi-host cluster test, run inside a network namespace:
``python cluster_node.py URL PREFIX HOST WORKERS SECONDS LOGDIR CAP``.

It starts a supervisor on the cluster at URL and WORKERS worker processes holding units of
the cluster pool "net" for SECONDS, then writes ``<LOGDIR>/<HOST>.done`` with how many units
its supervisor lent, and exits 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cluster_kit import start_supervisor, start_workers


def main() -> None:
    url, prefix, host, nworkers, seconds, logdir, cap = sys.argv[1:8]
    sup = start_supervisor(url, prefix, host)
    procs: list = []
    try:
        workers = start_workers(procs, sup, "net", int(cap), Path(logdir), int(nworkers),
                                hold=0.002, seconds=float(seconds))
        for w in workers:
            w.join(float(seconds) + 30)
        with sup.client() as c:
            stats = c.stats()["net"]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        sup.shutdown()
    (Path(logdir) / f"{host}.done").write_text(json.dumps(
        {"nborrows": stats["nborrows"], "lost_leases": stats["lost_leases"],
         "exitcodes": [w.exitcode for w in workers]}))


if __name__ == "__main__":
    main()
