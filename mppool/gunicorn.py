"""gunicorn server hooks: one supervisor per arbiter, shared by every worker.

In ``gunicorn.conf.py``::

    from mppool.gunicorn import on_starting, post_fork, child_exit, on_exit

``on_starting`` runs in the arbiter before any worker is forked: it starts a supervisor (or
uses the one already serving ``MPPOOL_ADDRESS``) and exports ``MPPOOL_ADDRESS`` and
``MPPOOL_AUTHKEY``, so workers reach it with a plain ``mppool.connect()``. The supervisor lives
as long as the arbiter: worker crashes and restarts do not touch it (the leases of a worker
that dies are reclaimed), and ``on_exit`` stops it. Workers are forked with a bare
``os.fork()``; mppool drops any connection inherited from the arbiter in the child.

If the supervisor the arbiter started dies (OOM killer, a stray ``kill -9``), a watcher thread
in the arbiter starts a new one at the same address with the same key, so workers recover
without a redeploy: their clients reconnect and re-create their pools (leases of the dead
supervisor are void). The watcher probes the address with a plain connect every
``WATCH_INTERVAL`` seconds; it does not wait on the child process, because gunicorn's arbiter
reaps every child itself (``waitpid(-1)``), so our ``Popen`` may never learn of the death. A
supervisor that is merely frozen still accepts connections (the kernel queues them), so it is
never replaced while it could come back.

``child_exit`` matters with prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
set, see `mppool.poolmetrics`): the pools of a worker that died, however it died, leave the
scraped gauges. Without that variable it does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from .address import display
from .errors import ServerUnavailable
from .launch import probe
from .server import Server

log = logging.getLogger("mppool")

WATCH_INTERVAL = 0.5

_server: Server | None = None
_watcher: _Watcher | None = None


class _Watcher:
    """Arbiter thread: restart the supervisor at the same address, same key, if it dies."""

    def __init__(self, arbiter: Any, server: Server, interval: float = WATCH_INTERVAL) -> None:
        self.arbiter = arbiter
        self.address = server.address
        self.authkey = server.authkey
        self.interval = interval
        self.stop = threading.Event()
        self.lock = threading.Lock()  # held while restarting: on_exit waits for it
        self.restarts = 0
        self.thread = threading.Thread(target=self.run, name="mppool-gunicorn-watch", daemon=True)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                if probe(self.address) != "alive":
                    with self.lock:
                        if not self.stop.is_set():
                            self.restart()
            except Exception as exc:  # never die: the next round tries again
                _log(self.arbiter, "mppool: could not restart the supervisor at %s: %s",
                     display(self.address), exc, level=logging.ERROR)

    def restart(self) -> None:
        global _server
        old = _server
        if old is not None and old._proc is not None:
            old._proc.poll()  # settle our Popen if gunicorn has not reaped it already
        new = Server(self.address, self.authkey)
        if old is not None and old._own_dir is not None:
            new._own_directory(old._own_dir)  # Server(None)'s private directory: still ours
        new.start()  # takes over the dead one's files
        _server = new
        self.restarts += 1
        _log(self.arbiter, "mppool: the supervisor (pid %s) at %s died: restarted it as pid %s",
             old.pid if old is not None else "?", display(self.address), new.pid,
             level=logging.WARNING)


def on_starting(server: Any) -> None:
    """Arbiter, before the first fork: start the supervisor and export its address and key."""
    global _server, _watcher
    from .client import connect

    address = os.environ.get("MPPOOL_ADDRESS")
    if address:
        try:
            connect(address, timeout=0.5).close()
            _log(server, "mppool: using the supervisor already serving %s", address)
            return
        except ServerUnavailable:
            pass
    try:
        _server = Server(address or None).start()
    except ServerUnavailable as exc:
        # gunicorn prints a RuntimeError as one line ("Error: ...") and exits 1.
        raise RuntimeError(f"mppool: {exc}") from None
    os.environ["MPPOOL_ADDRESS"] = display(_server.address)
    os.environ["MPPOOL_AUTHKEY"] = _server.authkey.hex()
    _log(server, "mppool: supervisor pid %s serving %s", _server.pid, display(_server.address))
    _watcher = _Watcher(server, _server)
    _watcher.thread.start()


def post_fork(server: Any, worker: Any) -> None:
    """Worker, just forked: nothing to undo (mppool's at-fork hook dropped inherited
    sockets); say where the worker will find its pools."""
    _log(server, "mppool: worker %s uses the supervisor at %s", worker.pid,
         os.environ.get("MPPOOL_ADDRESS"))


def child_exit(server: Any, worker: Any) -> None:
    """Arbiter, after a worker exited (SIGKILL included): with prometheus_client's multiprocess
    mode on, remove the worker's live gauges (``mark_process_dead``), so that the sizes and
    waits of its pools no longer count in the sums."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
    except Exception as exc:  # a hook must not take the arbiter down
        _log(server, "mppool: could not remove the metrics of worker %s: %s: %s", worker.pid,
             type(exc).__name__, exc, level=logging.WARNING)


def on_exit(server: Any) -> None:
    """Arbiter, exiting: stop the watcher, then the supervisor it started."""
    global _server, _watcher
    if _watcher is not None:
        _watcher.stop.set()
        with _watcher.lock:  # a restart in progress finishes first, then none starts
            pass
        _watcher.thread.join(5)
        _watcher = None
    if _server is not None:
        _server.shutdown()
        _log(server, "mppool: supervisor stopped")
        _server = None


def _log(server: Any, msg: str, *args: Any, level: int = logging.INFO) -> None:
    logger = getattr(server, "log", None)
    if logger is not None:
        {logging.ERROR: logger.error, logging.WARNING: logger.warning}.get(level, logger.info)(msg, *args)
    else:
        log.log(level, msg, *args)
