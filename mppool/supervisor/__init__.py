"""Everything that runs only in the supervisor process.

    worker processes                                  the supervisor process
    client ─ control connection (dill, slow) ───────▶ acceptor.py → control.py ─┐
                                                                                ▼
    client ─ lease channel (get/put, fast) ─────────▶ leases.py ──────────▶ registry.py
                                                          │                  (named Pools)
                                          socket closed ─ ▼                     ▲
                                                     watchdog.py ──── reclaim ──┘

- process.py  the process: sockets, signals, parent watch, ``main()``
- core.py     ``Supervisor``: registry, lease loop, watchdog, hosted objects, wired together
- registry.py named pools: create, attach, drop; each pool's own threads for user code
- control.py  what the control plane exposes (``Control``) and the manager that serves it
- acceptor.py the control socket's accept loop: authentication under a deadline
- leases.py   the lease loop (epoll, one thread): sockets, handshakes, limits, timers
- requests.py what the loop does with each request (get, put, proxied calls), mixed into it
- conn.py     one client connection as the loop sees it, and a get queued in a pool
- watchdog.py reclaims the leases of processes that died; kill_holder's signals
- hosted.py   ``client.execute()`` / ``client.host()``
- metrics.py  Prometheus metrics

Nothing here imports the client side (`mppool.client`): the two halves meet only in
`mppool.protocol` and the core `mppool.pool`.
"""

from .process import main, raise_nofile_limit, serve
from .registry import TRANSFERS, Record

__all__ = ["TRANSFERS", "Record", "main", "raise_nofile_limit", "serve"]
