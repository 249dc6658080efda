"""gunicorn server hooks: one supervisor per arbiter, shared by every worker.

In ``gunicorn.conf.py``::

    from mppool.gunicorn import on_starting, post_fork, on_exit

``on_starting`` runs in the arbiter before any worker is forked: it starts a supervisor (or
uses the one already serving ``MPPOOL_ADDRESS``) and exports ``MPPOOL_ADDRESS`` and
``MPPOOL_AUTHKEY``, so workers reach it with a plain ``mppool.connect()``. The supervisor lives
as long as the arbiter: worker crashes and restarts do not touch it (the leases of a worker
that dies are reclaimed), and ``on_exit`` stops it. Workers are forked with a bare
``os.fork()``; mppool drops any connection inherited from the arbiter in the child.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .address import display
from .errors import ServerUnavailable
from .server import Server

log = logging.getLogger("mppool")

_server: Server | None = None


def on_starting(server: Any) -> None:
    """Arbiter, before the first fork: start the supervisor and export its address and key."""
    global _server
    from .client import connect

    address = os.environ.get("MPPOOL_ADDRESS")
    if address:
        try:
            connect(address, timeout=0.5).close()
            _log(server, "mppool: using the supervisor already serving %s", address)
            return
        except ServerUnavailable:
            pass
    _server = Server(address or None).start()
    os.environ["MPPOOL_ADDRESS"] = display(_server.address)
    os.environ["MPPOOL_AUTHKEY"] = _server.authkey.hex()
    _log(server, "mppool: supervisor pid %s serving %s", _server.pid, display(_server.address))


def post_fork(server: Any, worker: Any) -> None:
    """Worker, just forked: nothing to undo (mppool's at-fork hook dropped inherited
    sockets); say where the worker will find its pools."""
    _log(server, "mppool: worker %s uses the supervisor at %s", worker.pid,
         os.environ.get("MPPOOL_ADDRESS"))


def on_exit(server: Any) -> None:
    """Arbiter, exiting: stop the supervisor it started."""
    global _server
    if _server is not None:
        _server.shutdown()
        _log(server, "mppool: supervisor stopped")
        _server = None


def _log(server: Any, msg: str, *args: Any) -> None:
    logger = getattr(server, "log", None)
    if logger is not None:
        logger.info(msg, *args)
    else:
        log.info(msg, *args)
